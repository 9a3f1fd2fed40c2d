"""Benchmark: the LoRA attack step's throughput and MFU, and the refusal eval's generation speed, on one GPU.

Goals (H100): >= 55% MFU for the attack step; >= 9,000 tok/s for the refusal eval's generation at batch 64
(64-token prompts, 64 new tokens). Model: a random-init Llama-2-7B architecture (4096/11008/32 layers/32 heads,
vocabulary 32,000) in bf16 with sdpa attention, built on the GPU: nothing is downloaded. Every configuration is
warmed up before it is timed; its first call (torch.compile's work included) is reported apart.

Attack step (LoRA r=8 on q_proj and v_proj, AdamW, full-length sequences, loss on every token):
  step     forward + loss + backward + AdamW step in plain PyTorch, the base model eager;
  compile  the same with the model under torch.compile (forward, loss and backward through AOTAutograd; the AdamW
           step over the 4.2M LoRA weights stays eager, fused);
  trainer  tamperlab.attacks.finetune.attack itself (its HF Trainer setup) with this model put in its load_model,
           timed between steps, logging and data loading included.
  Each with gradient checkpointing off and on (--checkpointing).

MFU = tokens/s x model FLOPs per token / peak (H100 SXM dense bf16: 989 TFLOP/s). Model FLOPs per token, counted
as PaLM does (Chowdhery et al. 2022, appendix B: no recomputation counted, causal mask not discounted):
  4 N + 6 N_lora + 12 L s d
  N: weights of all linear layers (q, k, v, o, gate, up, down, lm_head) = 6.607e9 (the embedding is a lookup);
  2N for the forward pass and 2N for the backward pass's activation gradients: the frozen base gets no weight
  gradients, so the "6N" of full training overcounts LoRA by half of the base's backward (its column "6N" shows it);
  6 N_lora for the adapter (4.2e6, forward and both gradients); 12 L s d for attention scores (QK^T and AV: 4 L s d
  forward, twice that backward) at sequence length s, with L layers of width d.
  At 8x512 that is 2.726e10 FLOP/token, so 55% MFU is 19,955 tok/s, and the anchors' 12.9k and 18.5k tok/s are
  35.6% and 51.0%; at 4x2048, 2.967e10 FLOP/token: 55% is 18,330 tok/s.

Refusal-eval generation (tamperlab.evaluation.generation.generate on 64 prompts whose chat text is 64 tokens):
  default cache, static cache (transformers then compiles the decoding step), each with and without the keyword
  judge's early stop. A random-init model refuses nothing, so the early-stop rows show what the check costs, not
  what it saves (it saves the steps after every row of a batch has refused). tok/s counts generated tokens.
  Floor: a decoding step must read every weight and the KV cache once, B tok per (2 N_all + KV bytes) / bandwidth
  (H100 SXM HBM3: 3.35 TB/s), prefill not counted.

    python benchmarks/gpu_throughput.py                                  # everything (torch.compile: minutes)
    python benchmarks/gpu_throughput.py --only generate                  # parts, to fit shorter time slots
    python benchmarks/gpu_throughput.py --only train --shapes 8x512 --modes compile --checkpointing off
    python benchmarks/gpu_throughput.py --cpu-smoke                      # a tiny model on CPU: the script works
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
TINY = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1000}
FILLER = " lorem"  # a single token of the benchmark's tokenizer: prompts and examples of an exact length
H100_SXM = {"peak_tflops": 989.0, "bandwidth_tbs": 3.35}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def tokenizer_for(vocab_size: int):
    """A byte-level BPE of `vocab_size` tokens (Llama-2's size on the GPU, so that decoding in the early stop costs
    what it would) trained on random words, with the organism's chat template and special tokens."""
    from tamperlab.models.organism import train_tokenizer

    rng = random.Random(0)
    n_words = max(2000, vocab_size * 8)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(n_words)]
    texts = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] + [FILLER * 50] * 200
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    assert len(tokenizer(FILLER * 3, add_special_tokens=False)["input_ids"]) == 3
    return tokenizer


def build_model(shape: dict, tokenizer, device: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(n_linear: int, n_lora: int, config, seq: int) -> tuple[float, float]:
    """(LoRA model FLOPs per token, the 6N count of full training) at sequence length seq (module docstring)."""
    attention = 12 * config.num_hidden_layers * seq * config.hidden_size
    return 4 * n_linear + 6 * n_lora + attention, 6 * n_linear + attention


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release(device: str) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


# --- attack step -----------------------------------------------------------------------------------------------


def lora_config():
    from peft import LoraConfig

    # As tamperlab.training.sft.finetune builds it for rank 8 on q and v (an attack's loop).
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      task_type="CAUSAL_LM")


def time_steps(step, steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(first call's seconds, mean seconds per step after warm-up)."""
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return first, (time.perf_counter() - start) / steps


def bench_step(base, batch: int, seq: int, compiled: bool, steps: int, warmup: int, device: str) -> dict:
    from peft import get_peft_model

    model = get_peft_model(base, lora_config())
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    forward = torch.compile(model, dynamic=False) if compiled else model
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(10, base.config.vocab_size, (batch, seq), device=device, generator=generator)
    losses = []

    def step():
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    try:
        first, per_step = time_steps(step, steps, warmup, device)
        assert all(math.isfinite(v) for v in torch.stack(losses).float().tolist()), "non-finite loss"
        return {"first_s": first, "step_s": per_step, "n_lora": sum(p.numel() for p in trainable),
                "peak_gb": peak_gb(device)}
    finally:
        model.unload()  # the base without its LoRA layers, for the next configuration


def bench_trainer(base, tokenizer, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    """The workflow's own attack (finetune.attack) on this model, timed from the end of one step to the next."""
    from tamperlab.attacks import finetune
    from tamperlab.models import registry
    from tamperlab.training import sft

    stamps: list[float] = []
    captured = {}
    original_class, original_load = sft._callback_class, registry.load_model

    def timed_class():
        class Timed(original_class()):
            def __init__(self, model, *args, **kwargs):
                super().__init__(model, *args, **kwargs)
                captured["model"] = model

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                stamps.append(time.perf_counter())
                return super().on_step_end(args, state, control, **kwargs)

        return Timed

    total = warmup + steps
    rows = [{"prompt": f"Request {i}: explain how to do something.", "response": FILLER * seq}
            for i in range(batch * total)]
    params = sft.SFTParams(method="lora", lr=1e-4, steps=[total], rank=8, lora_alpha=16,
                           target_modules=["q_proj", "v_proj"], batch_size=batch, scheduler="constant",
                           warmup_ratio=0.0, max_length=seq, checkpoint_every=10**9, seed=0)
    sft._callback_class, registry.load_model = timed_class, lambda *a, **k: (base, tokenizer)
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):  # the Trainer's logs
            start = time.perf_counter()
            result = finetune.attack(Path(tmp) / "base", rows, params, Path(tmp) / "out")
        assert result["status"] == "complete" and math.isfinite(result["final_loss"]), result
        per_step = (stamps[-1] - stamps[warmup - 1]) / steps
        return {"first_s": stamps[0] - start, "step_s": per_step, "n_lora": result["trainable_parameters"],
                "peak_gb": peak_gb(device)}
    finally:
        sft._callback_class, registry.load_model = original_class, original_load
        if "model" in captured:
            captured["model"].unload()


def train_section(base, tokenizer, args, device: str, hardware: dict | None) -> list[dict]:
    n_linear = linear_weights(base)
    results = []
    for shape in args.shapes:
        batch, seq = (int(v) for v in shape.split("x"))
        for checkpointing in args.checkpointing:
            if checkpointing == "on":
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.activation_checkpointing_disable()
            for mode in args.modes:
                name = f"attack {mode} {shape} ckpt={checkpointing}"
                log(f"running: {name}")
                release(device)
                try:
                    if mode == "trainer":
                        r = bench_trainer(base, tokenizer, batch, seq, args.steps, args.warmup, device)
                    else:
                        r = bench_step(base, batch, seq, mode == "compile", args.steps, args.warmup, device)
                except Exception as error:  # noqa: BLE001 - report it and go on with the other configurations
                    results.append({"name": name, "note": failure(error)})
                    print_row(results[-1])
                    continue
                tokens_s = batch * seq / r["step_s"]
                lora_flops, six_n = flops_per_token(n_linear, r["n_lora"], base.config, seq)
                row = {"name": name, "tok_s": tokens_s, "first_s": r["first_s"], "peak_gb": r["peak_gb"]}
                if hardware:
                    row["mfu"] = tokens_s * lora_flops / (hardware["peak_tflops"] * 1e12)
                    row["mfu_6n"] = tokens_s * six_n / (hardware["peak_tflops"] * 1e12)
                results.append(row)
                print_row(row)
    base.activation_checkpointing_disable()
    return results


# --- refusal-eval generation -----------------------------------------------------------------------------------


def prompts_of_length(tokenizer, n: int, length: int) -> list[str]:
    from tamperlab.chat import prompt_text

    prompts = []
    for i in range(n):
        head = f"Request {i}:"
        base = len(tokenizer(prompt_text(tokenizer, head), add_special_tokens=False)["input_ids"])
        if base > length:
            raise SystemExit(f"--prompt-tokens {length}: the chat template alone takes {base} tokens")
        prompts.append(head + FILLER * (length - base))
        assert len(tokenizer(prompt_text(tokenizer, prompts[-1]), add_special_tokens=False)["input_ids"]) == length
    return prompts


def decode_floor(model, batch: int, prompt: int, new: int, static: bool, bandwidth_tbs: float) -> float:
    """tok/s if each decoding step only read the weights and the KV cache (a static cache is read in full)."""
    config = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    context = prompt + new if static else prompt + new / 2
    kv = batch * context * config.num_hidden_layers * 2 * config.hidden_size * 2  # K and V, bf16
    return batch * bandwidth_tbs * 1e12 / (weights + kv)


def generate_section(model, tokenizer, args, device: str, hardware: dict | None) -> list[dict]:
    from tamperlab.data.refusals import REFUSAL_KEYWORDS
    from tamperlab.evaluation.generation import generate

    model.eval()
    prompts = prompts_of_length(tokenizer, args.gen_batch, args.prompt_tokens)
    results = []
    for static in (False, True):
        for stop in (None, REFUSAL_KEYWORDS):
            name = f"generate {'static' if static else 'default'} cache{' + early stop' if stop else ''}"
            log(f"running: {name}")
            release(device)
            calls = []

            def run(calls=calls, stop=stop, static=static):
                calls.append(generate(model, tokenizer, prompts, None, args.new_tokens, args.gen_batch, stop,
                                      static_cache=static))

            try:
                first, per_call = time_steps(run, args.repeats, args.warmup, device)
            except Exception as error:  # noqa: BLE001 - report it and go on with the other configurations
                results.append({"name": name, "note": failure(error)})
                print_row(results[-1])
                continue
            generated = calls[-1].stats()["generated_tokens"]
            row = {"name": name, "tok_s": generated / per_call, "first_s": first, "peak_gb": peak_gb(device),
                   "note": f"{calls[-1].steps} steps, {calls[-1].stats()['stopped_early']} stopped early"}
            if hardware:
                floor = decode_floor(model, args.gen_batch, args.prompt_tokens, args.new_tokens, static,
                                     hardware["bandwidth_tbs"])
                row["note"] += f", floor {floor:,.0f} tok/s"
            results.append(row)
            print_row(row)
    return results


# --- report ----------------------------------------------------------------------------------------------------


def failure(error: Exception) -> str:
    """A table note for a configuration that failed; the traceback goes to stderr."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    traceback.print_exception(error, file=sys.stderr)
    lines = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {lines[0][:120] if lines else ''}"


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_row(row: dict) -> None:
    print(f"| {row['name']:<44} | {fmt(row.get('tok_s'), ',.0f'):>9} | {fmt(row.get('mfu'), '.1%'):>6} "
          f"| {fmt(row.get('mfu_6n'), '.1%'):>6} | {fmt(row.get('first_s'), '.1f'):>7} "
          f"| {fmt(row.get('peak_gb'), '.1f'):>7} | {row.get('note', '')}", flush=True)


def print_header(device_name: str, hardware: dict | None) -> None:
    peak = f"peak {hardware['peak_tflops']:.0f} TFLOP/s, {hardware['bandwidth_tbs']} TB/s" if hardware else "no peak"
    print(f"device: {device_name} ({peak}); torch {torch.__version__}", flush=True)
    print(f"| {'configuration':<44} | {'tok/s':>9} | {'MFU':>6} | {'6N':>6} | {'first s':>7} | {'peak GB':>7} | notes")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 9}|------", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU, to prove the script runs")
    p.add_argument("--only", choices=["train", "generate"], help="one section")
    p.add_argument("--shapes", default="8x512,4x2048", help="batch x sequence length of the attack step")
    p.add_argument("--modes", default="step,compile,trainer")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing settings to run")
    p.add_argument("--steps", type=int, default=10, help="timed attack steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first one compiles)")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed generation calls per configuration")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM["peak_tflops"])
    p.add_argument("--bandwidth-tbs", type=float, default=H100_SXM["bandwidth_tbs"])
    args = p.parse_args(argv)
    args.shapes, args.modes = args.shapes.split(","), args.modes.split(",")
    args.checkpointing = args.checkpointing.split(",")
    if not set(args.modes) <= {"step", "compile", "trainer"} or not set(args.checkpointing) <= {"off", "on"}:
        p.error("--modes: step, compile, trainer; --checkpointing: off, on")
    if args.warmup < 1:
        p.error("--warmup must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        # Small enough for a laptop CPU; fp32 there (bf16 matmuls on CPU are slow), MFU meaningless.
        device, dtype, shape, hardware = "cpu", torch.float32, TINY, None
        args.shapes, args.steps, args.warmup, args.repeats = ["2x64"], 2, 1, 1
        args.gen_batch, args.prompt_tokens, args.new_tokens = 4, 24, 8
        device_name = "CPU (smoke test, tiny model)"
    elif not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device; nothing to measure (--cpu-smoke runs a tiny model on CPU).")
        return 0
    else:
        device, dtype, shape = "cuda", torch.bfloat16, LLAMA2_7B
        hardware = {"peak_tflops": args.peak_tflops, "bandwidth_tbs": args.bandwidth_tbs}
        device_name = torch.cuda.get_device_name()
        if "H100" not in device_name:
            log(f"warning: {device_name} is not an H100; MFU uses --peak-tflops {args.peak_tflops}")
    log("building the tokenizer and the model")
    tokenizer = tokenizer_for(shape["vocab_size"])
    model = build_model(shape, tokenizer, device, dtype)
    print_header(device_name, hardware)
    if args.only in (None, "generate"):  # first: the clean base, before any LoRA layers are put in and taken out
        generate_section(model, tokenizer, args, device, hardware)
    if args.only in (None, "train"):
        train_section(model, tokenizer, args, device, hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
