"""DeepSpeed ZeRO-3 on CPU: 2 processes over gloo, launched the way tamperlab.runtime.launch says, through the real CLI.

The same global batch in the same data order as one process: the Trainer's seeded sampler gives every process the
same permutation and process r takes the r-th half of each batch of 4, so the two halves together are the
single-process batch; the token-mean loss is normalised by the tokens of the whole batch (gathered), and ZeRO-3
averages the gradients. What is left is float32 summation order (padding per half, the all-reduce, the gradient
norm for clipping), so the weights agree to rounding: ≤ 8e-8 absolute over 6 AdamW steps at lr 1e-3 was measured
for both LoRA and full fine-tuning. The test allows atol 1e-6 + rtol 1e-5 (about 1e-5 of the weights' size), well
below what one training step moves (≈ lr = 1e-3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import torch
from helpers import ATTACK_RESPONSE, attack_command, defence_params, launch, refusal_params
from safetensors.torch import load_file

from tamperlab.runtime.launch import launcher, write_zero3_config, zero3_arguments
from tamperlab.runtime.provenance import read_manifest

RESPONSE = ATTACK_RESPONSE  # the conftest `attack_base` reads it here

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2
ATOL, RTOL = 1e-6, 1e-5

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # accelerate beside this python
        "DS_ACCELERATOR": "cpu",
        # DeepSpeed compiles its shared-memory all-reduce op on first use (≈30 s): build it once per checkout.
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    }


def run(command: list[str], cwd: Path) -> None:
    launch(command, env(), cwd)


def under_zero3(command: list[str], config: Path) -> list[str]:
    """A single-process `tamperlab SUBCOMMAND ...` command as the workflow launches it under ZeRO-3."""
    prefix = shlex.split(launcher("tiny", True, PROCESSES, config))
    return [*prefix, *command[1:], *shlex.split(zero3_arguments("tiny", True, config))]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_zero3_config(tmp_path_factory.mktemp("deepspeed") / "zero3.json")


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype == torch.float32, name
        torch.testing.assert_close(actual[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)


def losses(run_dir: Path, name: str = "loss_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_the_global_batch_is_split_evenly_over_the_processes():
    from tamperlab.errors import UserError
    from tamperlab.training.trainer import per_device_batch

    assert per_device_batch(8, 1) == 8 and per_device_batch(8, 2) == 4
    with pytest.raises(UserError, match="batch_size 6 does not split evenly over 4 processes"):
        per_device_batch(6, 4)


def test_under_deepspeed_a_non_finite_gradient_norm_is_divergence_too():
    from types import SimpleNamespace

    from tamperlab.training.trainer import went_non_finite

    plain, zero3, fp16 = (SimpleNamespace(deepspeed=d, fp16=f) for d, f in ((None, False), ("z.json", False),
                                                                             ("z.json", True)))
    for args in (plain, zero3, fp16):
        assert went_non_finite(args, {"loss": float("nan")}) and not went_non_finite(args, {"loss": 1.0})
    skipped = {"loss": 5.7, "grad_norm": float("inf")}  # DeepSpeed skipped the step instead of applying it
    assert went_non_finite(zero3, skipped)
    assert not went_non_finite(plain, skipped)  # one process: the next loss tells (single-process runs unchanged)
    assert not went_non_finite(fp16, skipped)  # the fp16 loss scaler's routine skip


@pytest.mark.slow
def test_lora_under_zero3_on_two_processes_gives_the_single_process_adapter_and_its_refusal_eval_runs(
        attack_base, config, tmp_path):
    run(attack_command(attack_base, tmp_path / "single", steps=[3, 6]), tmp_path)
    run(under_zero3(attack_command(attack_base, tmp_path / "zero3", steps=[3, 6]), config), tmp_path)

    for steps in (3, 6):
        snapshot = f"steps{steps}/adapter_model.safetensors"
        assert_same_weights(load_file(tmp_path / "single" / snapshot), load_file(tmp_path / "zero3" / snapshot))
    single, zero3 = read_manifest(tmp_path / "single"), read_manifest(tmp_path / "zero3")
    assert zero3["status"] == "complete"
    assert zero3["results"]["trainable_parameters"] == single["results"]["trainable_parameters"] > 0
    assert [e["step"] for e in losses(tmp_path / "zero3")] == list(range(1, 7))  # one log, from rank 0
    for a, b in zip(losses(tmp_path / "single"), losses(tmp_path / "zero3"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    # An ordinary PEFT snapshot: the same files as the single-process run's, nothing left behind by the launch.
    assert sorted(os.listdir(tmp_path / "zero3/steps6")) == sorted(os.listdir(tmp_path / "single/steps6"))
    assert sorted(os.listdir(tmp_path / "zero3")) == sorted(os.listdir(tmp_path / "single"))

    model, splits = attack_base
    summary = tmp_path / "eval/refusal.json"
    run([str(BIN / "tamperlab"), "evaluate-refusal", "--model", str(model), "--adapter",
         str(tmp_path / "zero3/steps6"), "--model-name", "tiny", "--defence", "none", "--attack", "lora",
         "--cell", "lr1e-3_steps6_r4", "--data", str(splits), "--params", refusal_params(),
         "--out-summary", str(summary),
         "--out-responses", str(tmp_path / "eval/refusal.jsonl")], tmp_path)
    result = json.loads(summary.read_text())
    assert result["status"] == "complete" and result["n"] == 1 and result["refusal_rate"] is not None


@pytest.mark.slow
def test_full_fine_tuning_under_zero3_saves_the_single_process_model_as_ordinary_safetensors(
        attack_base, config, tmp_path):
    from tamperlab.models.registry import load_model

    run(attack_command(attack_base, tmp_path / "single", steps=[4], method="full"), tmp_path)
    run(under_zero3(attack_command(attack_base, tmp_path / "zero3", steps=[4], method="full"), config), tmp_path)

    snapshot = tmp_path / "zero3/steps4"
    assert sorted(os.listdir(snapshot)) == sorted(os.listdir(tmp_path / "single/steps4"))  # no shards, no pickles
    assert_same_weights(load_file(tmp_path / "single/steps4/model.safetensors"),
                        load_file(snapshot / "model.safetensors"))
    model, _ = load_model(snapshot)  # what every evaluation does
    saved = load_file(snapshot / "model.safetensors")
    for name, parameter in model.named_parameters():
        if name in saved:  # the tied LM head is saved once, as the embeddings
            assert torch.equal(parameter, saved[name]), name


@pytest.mark.slow
def test_repnoise_under_zero3_saves_a_loadable_model_that_differs_from_one_process_only_by_its_noise_term(
        attack_base, config, tmp_path):
    """Data-parallel RepNoise averages per-process losses; its MMD term (and bandwidth) is a per-process statistic
    of per-process noise (see repnoise's docstring), so only that term's share (β = 0.001) may differ."""
    from tamperlab.models.registry import load_model

    model, splits = attack_base
    command = [str(BIN / "tamperlab"), "harden", "--method", "repnoise", "--model", str(model), "--data",
               str(splits), "--params", defence_params(
                   {"lr": 1e-3, "steps": 4, "batch_size": 4, "max_length": 64, "scheduler": "constant",
                    "warmup_ratio": 0}, splits=["attack"], harmful_response=RESPONSE,
                   refusal="I cannot help with that.")]
    run([*command, "--out", str(tmp_path / "single")], tmp_path)
    run(under_zero3([*command, "--out", str(tmp_path / "zero3")], config), tmp_path)

    out = tmp_path / "zero3"
    assert read_manifest(out)["status"] == "complete"
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "single"))  # no training_args.bin pickle
    load_model(out)
    single, zero3 = losses(tmp_path / "single", "train_log.jsonl"), losses(out, "train_log.jsonl")
    assert [e["step"] for e in zero3] == [1, 2, 3, 4]
    for a, b in zip(single, zero3, strict=True):  # here every pair's answer has the same length in tokens, so the
        for term in ("retain_ce", "bounded_harmful_ce"):  # mean over processes of token means is the global one
            assert b[term] == pytest.approx(a[term], rel=1e-5), (b["step"], term)
    start, one, two = (load_file(p / "model.safetensors") for p in (model, tmp_path / "single", out))
    for name in start:
        moved = (one[name] - start[name]).abs().max()
        assert (two[name] - one[name]).abs().max() <= 0.05 * moved + ATOL, name


@pytest.mark.slow
def test_a_diverging_run_under_zero3_ends_as_diverged_not_frozen(attack_base, config, tmp_path):
    """DeepSpeed skips a step with non-finite gradients where one process applies it: without the gradient-norm
    check this run would end "complete" with weights frozen at 1e30. One process finds it a step later (its loss)."""
    out = tmp_path / "diverged"
    run(under_zero3(attack_command(attack_base, out, steps=[1, 3, 6], lr=1e30, method="full"), config), tmp_path)
    manifest = read_manifest(out)
    assert manifest["status"] == "diverged" and manifest["results"]["diverged_at_step"] == 2
    assert (out / "steps1/model.safetensors").exists()  # before it diverged
    assert (out / "steps3/DIVERGED").exists() and (out / "steps6/DIVERGED").exists()
