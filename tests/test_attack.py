"""The fine-tuning attack: exact snapshots, resume after kill -9, divergence as a result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from helpers import ATTACK_RESPONSE, attack_command, refusal_params, run_params
from safetensors.torch import load_file

from tamperlab.runtime.provenance import read_manifest

BIN = Path(sys.executable).parent
RESPONSE = ATTACK_RESPONSE  # the conftest `attack_base` reads it here


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_snapshot_of_a_longer_constant_lr_run_equals_a_run_of_that_length(attack_base, tmp_path):
    run(attack_command(attack_base, tmp_path / "long", steps=[5, 10]))
    run(attack_command(attack_base, tmp_path / "short", steps=[5]))
    long, short = adapter(tmp_path / "long/steps5"), adapter(tmp_path / "short/steps5")
    assert long.keys() == short.keys()
    for name in long:
        assert torch.equal(long[name], short[name]), name
    assert not torch.equal(adapter(tmp_path / "long/steps10")[name], long[name])  # it kept training
    manifest = read_manifest(tmp_path / "long")
    assert manifest["status"] == "complete" and manifest["params"]["steps"] == [5, 10]
    losses = [json.loads(line) for line in (tmp_path / "long/loss_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses] == list(range(1, 11))


def test_a_run_killed_mid_training_resumes_to_the_same_adapter(attack_base, tmp_path):
    run(attack_command(attack_base, tmp_path / "whole", steps=[12], checkpoint_every=4))
    out = tmp_path / "killed"
    process = subprocess.Popen(attack_command(attack_base, out, steps=[12], checkpoint_every=4),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = out.parent / f".{out.name}.partial" / "checkpoints"
    deadline = time.time() + 120
    # Kill once a checkpoint is complete (a kill while one is being written is handled too: the partial one
    # is discarded and the run restarts from the last complete one, or from scratch).
    while not list(work.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list(work.glob("checkpoint-*/trainer_state.json")), "the run finished before it could be killed"
    assert not out.exists()  # nothing that looks complete
    run(attack_command(attack_base, out, steps=[12], checkpoint_every=4))
    assert read_manifest(out)["results"]["resumed_from_step"] in (4, 8)
    whole, resumed = adapter(tmp_path / "whole/steps12"), adapter(out / "steps12")
    for name in whole:
        assert torch.allclose(whole[name], resumed[name], atol=1e-6), name


def test_a_non_finite_loss_ends_the_cell_as_diverged_and_the_evaluation_says_so(attack_base, tmp_path):
    out = tmp_path / "diverged"
    run(attack_command(attack_base, out, steps=[3, 6], lr=1e30, method="full"))
    manifest = read_manifest(out)
    assert manifest["status"] == "diverged"
    assert manifest["results"]["diverged_at_step"] is not None
    assert (out / "steps6" / "DIVERGED").exists()
    model, splits = attack_base
    summary = tmp_path / "eval/refusal.json"
    run([str(BIN / "tamperlab"), "evaluate-refusal", "--model", str(out / "steps6"), "--model-name", "tiny",
         "--defence", "none", "--attack", "full", "--cell", "lr1e30_steps6", "--data", str(splits),
         "--params", refusal_params(), "--out-summary", str(summary),
         "--out-responses", str(tmp_path / "eval/refusal.jsonl")])
    result = json.loads(summary.read_text())
    assert result["status"] == "diverged" and result["refusal_rate"] is None


def test_resume_skips_a_checkpoint_that_was_being_written_when_killed(tmp_path):
    from tamperlab.training.trainer import last_complete_checkpoint

    for step, complete in ((4, True), (8, True), (12, False)):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "optimizer.pt").write_bytes(b"x")
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert not (tmp_path / "checkpoint-12").exists()
    assert last_complete_checkpoint(tmp_path / "none") is None


def test_a_malformed_cell_snapshot_is_one_error_line(attack_base, tmp_path):
    model, splits = attack_base
    result = subprocess.run(
        [str(BIN / "tamperlab"), "evaluate-run", "--model", str(model), "--run", str(tmp_path), "--method", "lora",
         "--cell-snapshot", "steps5", "--model-name", "tiny", "--defence", "none", "--attack", "lora",
         "--data", str(splits), "--params", run_params(), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tamperlab evaluate-run: error: --cell-snapshot 'steps5': expected CELL=SNAPSHOT, "
        "e.g. lr1e-3_steps50_r8=steps50"
    ]


def test_a_grid_in_one_process_gives_each_run_the_adapter_of_its_own_job(attack_base, tmp_path):
    run(attack_command(attack_base, tmp_path / "grid", steps=[3, 6], lr=[1e-3, 3e-3], command="attack-grid"))
    run(attack_command(attack_base, tmp_path / "alone", steps=[3, 6], lr=3e-3))
    manifest = read_manifest(tmp_path / "grid")
    assert manifest["status"] == "complete" and set(manifest["results"]) == {"lr1e-3_r4", "lr3e-3_r4"}
    assert manifest["params"]["runs"]["lr3e-3_r4"]["lora_alpha"] == 8  # 2 x rank, explicit per run
    grid, alone = adapter(tmp_path / "grid/lr3e-3_r4/steps6"), adapter(tmp_path / "alone/steps6")
    for name in alone:
        assert torch.equal(grid[name], alone[name]), name
    assert (tmp_path / "grid/lr1e-3_r4/steps3/adapter_model.safetensors").exists()


def test_a_grid_killed_after_its_first_run_resumes_without_retraining_it(attack_base, tmp_path):
    command = attack_command(attack_base, tmp_path / "grid", steps=[20], lr=[1e-3, 3e-3], checkpoint_every=5,
                             command="attack-grid")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = tmp_path / ".grid.partial" / "lr1e-3_r4" / "run.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert first.exists() and not (tmp_path / "grid").exists()
    finished_at = first.stat().st_mtime_ns
    run(command)
    assert (tmp_path / "grid/lr1e-3_r4/run.json").stat().st_mtime_ns == finished_at  # not trained again
    run(attack_command(attack_base, tmp_path / "whole", steps=[20], lr=[1e-3, 3e-3], command="attack-grid"))
    for name_run in ("lr1e-3_r4", "lr3e-3_r4"):
        whole, resumed = adapter(tmp_path / f"whole/{name_run}/steps20"), adapter(tmp_path / f"grid/{name_run}/steps20")
        for name in whole:
            assert torch.allclose(whole[name], resumed[name], atol=1e-6), name


def test_attack_trains_one_run_and_says_so_when_given_a_grid(attack_base, tmp_path):
    result = subprocess.run(attack_command(attack_base, tmp_path / "x", steps=[3], lr=[1e-3, 3e-3]),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "attack-grid" in result.stderr and not (tmp_path / "x").exists()


def test_an_unknown_attack_setting_is_one_error_line_naming_it(attack_base, tmp_path):
    command = attack_command(attack_base, tmp_path / "x", steps=[3])
    at = command.index("--params") + 1
    command[at] = json.dumps({**json.loads(command[at]), "lora_rank": 8})
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("tamperlab attack: error: --params: unknown key 'lora_rank' (known: method, ")
    assert not (tmp_path / "x").exists()
