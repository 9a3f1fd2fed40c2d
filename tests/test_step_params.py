"""The evaluations' and the landscape's --params: one JSON object per step, one dataclass per block of settings; a
wrong key stops the command before it reads anything, in one line naming the key."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers import BIN, capability_params, refusal_params, run_params

CHECKPOINT = ["--model", "m", "--model-name", "tiny", "--defence", "none", "--data", "d"]
SUBJECT = ["--subject", "tiny/none", "--scan", "s", "--model", "m"]
SCAN = {"kind": "1d", "seed": 0, "n": 3, "extent": 1.0, "split": "evaluation", "limit": None,
        "system_prompt": ["none"], "judge": "keyword", "classifier_model": None, "classifier_revision": None,
        "refusal_label": None, "max_new_tokens": 4, "batch_size": 4, "compliance_marker": None, "anchor_every": "auto"}


def without(text: str, key: str) -> str:
    return json.dumps({k: v for k, v in json.loads(text).items() if k != key})


def evaluate_refusal(settings: str) -> list[str]:
    return ["evaluate-refusal", *CHECKPOINT, "--params", settings, "--out-summary", "s", "--out-responses", "r"]


def evaluate_capability(settings: str) -> list[str]:
    return ["evaluate-capability", *CHECKPOINT, "--params", settings, "--out", "o"]


def evaluate_run(settings: str) -> list[str]:
    return ["evaluate-run", "--model", "m", "--run", "r", "--method", "lora", "--cell-snapshot", "c=steps5",
            "--model-name", "tiny", "--defence", "none", "--attack", "lora", "--data", "d", "--params", settings,
            "--out", "o"]


def landscape_scan(settings: dict) -> list[str]:
    return ["landscape-scan", *SUBJECT, "--data", "d", "--params", json.dumps(settings), "--shard", "0",
            "--shards", "1", "--out", "o"]


def landscape_project(settings: dict) -> list[str]:
    return ["landscape-project", *SUBJECT, "--params", json.dumps(settings), "--cell", "c", "m", "-", "--out", "o"]


@pytest.mark.parametrize(("command", "message"), [
    (evaluate_refusal(refusal_params(max_new_token=4)), "--params: unknown key 'max_new_token' (known: judge, "),
    (evaluate_refusal(without(refusal_params(), "split")), "--params: missing key 'split'"),
    (evaluate_refusal(refusal_params(judge="keywords")), "--params judge: 'keywords' is not a registered judge"),
    (evaluate_capability(capability_params(task=["organism"])), "--params: unknown key 'task' (known: split, tasks, "),
    (evaluate_capability(without(capability_params(), "seed")), "--params: missing key 'seed'"),
    (evaluate_run(run_params(refusal={"limit": 3})), "--params refusal: unknown key 'limit' (known: judge, "),
    (evaluate_run(run_params(capability={"prompt_limit": 3})), "--params capability: unknown key 'prompt_limit'"),
    (evaluate_run(without(run_params(), "capability")), "--params: missing key 'capability'"),
    (evaluate_run(json.dumps({**json.loads(run_params()), "seed": 0})),
     "--params: unknown key 'seed' (known: refusal, capability)"),
    (landscape_scan({**SCAN, "extnt": 1.0}), "--params: unknown key 'extnt' (known: judge, "),
    (landscape_scan({k: v for k, v in SCAN.items() if k != "anchor_every"}), "--params: missing key 'anchor_every'"),
    (landscape_scan({**SCAN, "steps": 10}), "--params steps: not a parameter of a 1d scan"),
    (landscape_scan({k: v for k, v in SCAN.items() if k != "n"}), "--params: a 1d scan needs n"),
    (landscape_scan({**SCAN, "anchor_every": 0}), "--params anchor_every: expected auto, null or an integer ≥ 1"),
    (landscape_project({"kind": "2d", "seed": 0, "n": 9}), "--params: unknown key 'n' (known: kind, seed)"),
    (landscape_project({"kind": "3d", "seed": 0}), "--params kind: '3d' is not one of 1d, 2d, interpolation, "),
])
def test_a_wrong_key_in_params_is_one_line_naming_it(command, message, tmp_path):
    result = subprocess.run([str(BIN / "tamperlab"), *command], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tamperlab {command[0]}: error: {message}"), result.stderr
    assert not (tmp_path / "o").exists()
