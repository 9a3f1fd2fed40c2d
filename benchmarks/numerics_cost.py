"""Benchmark: what portable CPU numerics cost, and where (docs/benchmarks.md).

Each setting runs in a fresh process (MKL, ATen and oneDNN read their settings once, when torch first uses them):
the default organism's matrix products alone (GFLOP/s, one shape per row), and one AdamW training step of the
default organism's shape (batch 32 x 60 tokens), with the share of that step spent in matrix products (torch's
profiler). Settings: native; portable (tamperlab.runtime.numerics.PORTABLE); MKL's COMPATIBLE branch alone; ATen's AVX2
kernels alone; portable with ATen's baseline kernels (ATEN_CPU_CAPABILITY=default) instead of AVX2. One thread and
two. Run it on an idle machine: `python benchmarks/numerics_cost.py [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "native": {},
    "portable": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL COMPATIBLE only": {"MKL_CBWR": "COMPATIBLE"},
    "ATen AVX2 only": {"ATEN_CPU_CAPABILITY": "avx2"},
    "portable, ATen baseline": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default",
                                "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
# (rows, inner, columns) of the organism's products: batch 32 x 60 tokens through h128 / i512 / vocab 2000
SHAPES = {"attention projection": (1920, 128, 128), "MLP up": (1920, 128, 512), "MLP down": (1920, 512, 128),
          "output layer": (1920, 128, 2000), "weight gradient": (128, 1920, 512)}

CHILD = r'''
import json, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
shapes = json.loads(SHAPES)
result = {"capability": torch.backends.cpu.get_cpu_capability(), "gflops": {}}
generator = torch.Generator().manual_seed(0)
for name, (m, k, n) in shapes.items():
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(30):
        a @ b
    result["gflops"][name] = round(2 * m * k * n * 30 / (time.perf_counter() - start) / 1e9, 1)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, max_position_embeddings=192, tie_word_embeddings=True))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 2000, (32, 60), generator=generator)
def step():
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(3):
    step()
start = time.perf_counter()
for _ in range(10):
    step()
result["step_ms"] = round((time.perf_counter() - start) / 10 * 1e3, 1)
from torch.profiler import profile
with profile() as prof:
    for _ in range(3):
        step()
events = prof.key_averages()
total = sum(e.self_cpu_time_total for e in events)
result["matmul_share"] = round(sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm",
                                   "aten::addmm")) / total, 3)
print(json.dumps(result))
'''


def measure(environment: dict[str, str], threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    env.update(environment, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    code = CHILD.replace("SHAPES", repr(json.dumps(SHAPES)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = []
    for threads in args.threads:
        for name, environment in SETTINGS.items():
            rows.append({"setting": name, "threads": threads, **measure(environment, threads)})
    print("| setting | threads | ATen | step ms | vs native | matmul share | "
          + " | ".join(f"{s} GFLOP/s" for s in SHAPES) + " |")
    print("|" + "---|" * (5 + len(SHAPES)))
    for row in rows:
        native = next(r for r in rows if r["setting"] == "native" and r["threads"] == row["threads"])
        print(f"| {row['setting']} | {row['threads']} | {row['capability']} | {row['step_ms']} | "
              f"{row['step_ms'] / native['step_ms']:.2f}x | {row['matmul_share']:.0%} | "
              + " | ".join(str(row["gflops"][s]) for s in SHAPES) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
