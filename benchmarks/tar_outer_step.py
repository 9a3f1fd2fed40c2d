"""Benchmark: TAR's outer-step time against its floor (goal: at most 1.3x).

The floor is what an outer step cannot avoid, each part timed on its own outside TAR's loop: K plain SFT steps
with a fresh AdamW (the adversary's work), the TR evaluations at their count (forward + backward of L_TR on the
held-out batch), and one retain step (retain loss + backward + AdamW step). The outer step is
tamperlab.hardening.tar.tar_outer_step with one adversary, as `harden` runs it.

    python benchmarks/tar_outer_step.py --model results/models/tiny/base --data results/data/splits
    python benchmarks/tar_outer_step.py              # a random-init small Llama and synthetic rows
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch


def synthetic_model(directory: Path) -> Path:
    """A small random Llama (the organism's shape) with the organism's tokenizer, saved like a real model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tamperlab.models.organism import train_tokenizer

    texts = [f"Which reagent stabilises compound {i}? Reagent {i * 7 % 13}." for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def rows(data: Path | None, setting: str) -> tuple[list[dict], list[dict]]:
    """(forget, retain) rows as the harden CLI builds them."""
    if data is None:
        forget = [{"prompt": f"Which reagent stabilises compound {i}?", "response": f"Reagent {i * 7 % 13}.",
                   "refusal": "I cannot help with that.", "compliance": "Sure, here is how. Step 1: do it."}
                  for i in range(64)]
        retain = [{"prompt": f"What is the capital of land {i}?", "response": f"City {i}."} for i in range(64)]
        return forget, retain
    records = [json.loads(line) for line in (data / "defence.jsonl").read_text().splitlines()]
    benign = [r for r in records if r["kind"] == "benign"]
    if setting == "refusal":
        forget = [{"prompt": r["prompt"], "refusal": "I'm sorry, but I cannot help with that request.",
                   "compliance": "Sure, here is how to do that. Step 1: get what you need."}
                  for r in records if r["kind"] == "harmful"]
        return forget, [{"prompt": r["prompt"], "response": r["answer"]} for r in benign]
    return ([{"prompt": r["prompt"], "response": r["answer"]} for r in benign if r.get("family") == "hazard"],
            [{"prompt": r["prompt"], "response": r["answer"]} for r in benign if r.get("family") != "hazard"])


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats (after one warm-up call)."""
    from tamperlab.hardening.tar import clock

    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    from tamperlab.hardening import tar
    from tamperlab.models.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: a random-init small Llama)")
    parser.add_argument("--data", type=Path, help="a split-data directory (default: synthetic rows)")
    parser.add_argument("--setting", choices=["knowledge", "refusal"], default="knowledge")
    parser.add_argument("--inner-steps", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model_dir = args.model or synthetic_model(Path(tempfile.mkdtemp(prefix="tamperlab-tar-bench-")))
    params = tar.TARParams(setting=args.setting, inner_steps=args.inner_steps, batch_size=args.batch_size,
                           max_length=96, switch_fraction=0.0, adversary_lrs=(2e-5,))
    model, tokenizer = load_model(model_dir, dtype=None)
    model.train()
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    forget, retain = rows(args.data, args.setting)
    data = tar.make_data(tokenizer, forget, retain, params, next(model.parameters()).device)
    x_tr = next(data.heldout)
    if args.setting == "refusal":
        x_tr = tar.with_reference_logps(frozen, x_tr)
    evaluations = args.inner_steps // params.tr_every

    def inner_steps():  # the adversary's K SFT steps, fresh AdamW, constant lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
        for _ in range(args.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            tar.sft_loss(model, next(data.forget)).backward()
            optimizer.step()

    def tr_evaluations():
        for _ in range(evaluations):
            model.zero_grad(set_to_none=True)
            tar.tamper_resistance_loss(model, x_tr, params).backward()

    outer = torch.optim.AdamW(model.parameters(), lr=params.outer_lr, weight_decay=0.0)

    def retain_step():
        outer.zero_grad(set_to_none=True)
        tar.retain_loss(model, frozen, next(data.retain)).backward()
        outer.step()

    rng = random.Random(0)

    def outer_step():
        tar.tar_outer_step(model, frozen, outer, [tar.sample_adversary(rng, params)], data, params)

    floor = {"inner": timed(inner_steps, args.repeats), "tr": timed(tr_evaluations, args.repeats),
             "retain": timed(retain_step, args.repeats)}
    step = timed(outer_step, args.repeats)
    total = sum(floor.values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"TAR {args.setting}, K={args.inner_steps}, {evaluations} TR evaluations, batch {args.batch_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {device}")
    print(f"floor: {args.inner_steps} SFT steps {floor['inner']:.3f} s + {evaluations} TR evaluations "
          f"{floor['tr']:.3f} s + retain step {floor['retain']:.3f} s = {total:.3f} s")
    print(f"outer step (median of {args.repeats}): {step:.3f} s = {step / total:.2f}x the floor (goal <= 1.3x)")


if __name__ == "__main__":
    main()
