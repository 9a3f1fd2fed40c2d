"""Benchmark: one training step of the default organism's shape under each OpenMP thread policy, on an idle machine
and with one core busy (a pure-Python spin loop in another process).

Why: the default organism's build takes 2 threads (models.<m>.organism.threads), and torch's OpenMP threads spin
while they wait for each other; when another process holds one of the two cores, the spinning thread keeps the
working one off it (measured: the whole build 3.4x slower). This measures what the remedies cost when the machine
is idle: one thread, OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning), a shorter GOMP_SPINCOUNT.

    python benchmarks/thread_policy.py            # every policy, idle and busy (about 3 minutes on 2 cores)
    python benchmarks/thread_policy.py --steps 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys

# (name, threads, extra environment)
POLICIES = [
    ("2 threads, default (spin)", 2, {}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, GOMP_SPINCOUNT=1000", 2, {"GOMP_SPINCOUNT": "1000"}),
    ("2 threads, GOMP_SPINCOUNT=30000", 2, {"GOMP_SPINCOUNT": "30000"}),
    ("1 thread", 1, {}),
]


def spin() -> None:
    while True:
        pass


def step_ms(threads: int, steps: int) -> float:
    """ms per AdamW step of the default organism's shape (hidden 128, 4 layers, vocabulary 2000) on a batch of
    32 x 80 tokens, after 3 warm-up steps: run in this process, which the caller started with the policy's
    environment (OpenMP reads it once, at start-up)."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=192)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 2000, (32, 80))

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # threads, inside one measurement
    args = parser.parse_args()
    if args.child:
        print(f"{step_ms(args.child, args.steps):.0f}")
        return
    print(f"{'policy':<38} {'idle ms/step':>12} {'busy ms/step':>12} {'busy/idle':>9}")
    for name, threads, env in POLICIES:
        times = []
        for busy in (False, True):
            burner = multiprocessing.Process(target=spin, daemon=True) if busy else None
            if burner:
                burner.start()
            try:
                out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--steps", str(args.steps)],
                                     env={**os.environ, **env, "OMP_NUM_THREADS": str(threads)}, check=True,
                                     capture_output=True, text=True).stdout
            finally:
                if burner:
                    burner.terminate()
                    burner.join()
            times.append(float(out.strip().splitlines()[-1]))
        print(f"{name:<38} {times[0]:>12.0f} {times[1]:>12.0f} {times[1] / times[0]:>9.2f}")


if __name__ == "__main__":
    main()
