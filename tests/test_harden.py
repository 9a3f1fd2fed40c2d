"""The harden step: RepNoise and TAR through the CLI, on the data each defence takes from its splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import defence_params

from tamperlab.runtime.provenance import read_manifest

BIN = Path(sys.executable).parent
COMPLIANCE = "Sure, here is how to do that. Step 1: get what you need."
REFUSAL = "I'm sorry, but I cannot help with that request."


def harden(base, out: Path, method: str, params: dict, *extra: str, **data) -> subprocess.CompletedProcess:
    """harden on the defence split, COMPLIANCE the unsafe answer; `data` replaces keys of --params's data block."""
    model, splits = base
    command = [str(BIN / "tamperlab"), "harden", "--method", method, "--model", str(model), "--data", str(splits),
               "--params", defence_params(params, **{"harmful_response": COMPLIANCE, **data}),
               "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def changed(base_dir: Path, hardened: Path) -> bool:
    from safetensors.torch import load_file

    before, after = load_file(base_dir / "model.safetensors"), load_file(hardened / "model.safetensors")
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_repnoise_hardens_on_harmful_prompt_pairs_and_records_them(defence_base, tmp_path):
    result = harden(defence_base, tmp_path / "rn", "repnoise",
                    {"lr": 1e-3, "steps": 2, "batch_size": 4, "max_length": 64}, refusal=REFUSAL)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(tmp_path / "rn")
    assert manifest["status"] == "complete" and manifest["step"] == "harden"
    assert manifest["results"]["examples"] == {"pairs": 12}
    assert changed(defence_base[0], tmp_path / "rn")


def test_repnoise_with_benign_retain_pairs_each_pair_with_a_benign_answer(defence_base, tmp_path):
    from tamperlab.data.examples import hardening_examples

    rows = [{"prompt": f"harm {i}", "kind": "harmful"} for i in range(3)] + [
        {"prompt": "task", "kind": "benign", "answer": "Quellport."}, {"prompt": "open", "kind": "benign"}]
    pairs = hardening_examples(rows, "pairs", None, harmful_response="Sure.", refusal="No.", forget_family="x",
                               splits=["defence"], benign_retain=True, benign_answers={"open": "Happy to."})["pairs"]
    assert [(p["retain_prompt"], p["retain_response"]) for p in pairs] == [
        ("task", "Quellport."), ("open", "Happy to."), ("task", "Quellport.")]
    assert "retain_prompt" not in hardening_examples(rows, "pairs", None, harmful_response="Sure.", refusal="No.",
                                                     forget_family="x", splits=["defence"])["pairs"][0]
    params = {"lr": 1e-3, "steps": 2, "batch_size": 4, "max_length": 64}
    result = harden(defence_base, tmp_path / "rb", "repnoise", params, refusal=REFUSAL, benign_retain=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_manifest(tmp_path / "rb")["results"]["examples"] == {"pairs": 12}
    plain = harden(defence_base, tmp_path / "rn", "repnoise", params, refusal=REFUSAL)
    assert plain.returncode == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "rb" / "model.safetensors"), load_file(tmp_path / "rn" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the benign answers changed what was learnt


@pytest.mark.parametrize("setting, examples", [("refusal", {"forget": 12, "retain": 24}),
                                               ("knowledge", {"forget": 12, "retain": 12})])
def test_tar_takes_harmful_triples_or_the_forget_family_from_the_splits(defence_base, tmp_path, setting, examples):
    params = {"setting": setting, "outer_steps": 1, "inner_steps": 4, "tr_every": 2, "batch_size": 4,
              "max_length": 64, "outer_lr": 1e-3, "warmup_steps": 0, "random_mapping_steps": 2}
    result = harden(defence_base, tmp_path / setting, "tar", params, refusal=REFUSAL)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(tmp_path / setting)
    assert manifest["results"]["examples"] == examples
    assert manifest["results"]["steps"] == 1 and changed(defence_base[0], tmp_path / setting)


@pytest.mark.parametrize("method, params, data, message", [
    ("tar", {"outer_stepz": 1}, {"refusal": REFUSAL}, "--params method: unknown key 'outer_stepz'"),
    ("repnoise", {"steps": 1}, {"refusal": REFUSAL, "split": ["defence"]}, "--params data: unknown key 'split'"),
    ("repnoise", {"steps": 1}, {}, "a refusal answer (--params data)"),
    ("tar", {"setting": "knowledge"}, {"forget_family": "nosuch"}, "0 forget"),
])
def test_bad_hardening_input_is_one_error_line_and_no_output(defence_base, tmp_path, method, params, data, message):
    result = harden(defence_base, tmp_path / "out", method, params, **data)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
