"""TAR checkpoints: a run killed with SIGKILL after a checkpoint and started again ends bit for bit where an
uninterrupted run ends; partial and foreign checkpoints are never resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TAR_ROWS, small_params
from safetensors.torch import load_file

from tamperlab.hardening.tar import TAR_LOG, harden, load_checkpoint, save_checkpoint
from tamperlab.training.trainer import CHECKPOINTS

ROWS = TAR_ROWS  # the conftest `tar_model` reads them here

TESTS = Path(__file__).resolve().parent
# A child process that runs TAR on the saved tiny model: argv = setting, base dir, out dir, params (JSON).
DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from helpers import TAR_ROWS as ROWS
from tamperlab.hardening.tar import TARParams, harden
setting, base, out, params = sys.argv[1:]
forget, retain = ROWS[setting]
harden(base, forget, retain, TARParams(**json.loads(params)), __import__("pathlib").Path(out))
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def params_for(setting: str, **overrides):
    # two adversaries per step (one may be the switch adversary), Random Mapping first in the knowledge setting
    return small_params(setting, outer_steps=12, inner_steps=4, adversaries_per_step=2,
                        random_mapping_steps=2 if setting == "knowledge" else 0, random_mapping_lr=1e-3, **overrides)


@pytest.mark.parametrize("setting", ["knowledge", "refusal"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tar_model, tmp_path, setting):
    base = tar_model[0]  # the saved model
    forget, retain = ROWS[setting]
    whole = harden(base, forget, retain, params_for(setting), tmp_path / "whole")  # never checkpoints (default 25)

    out, params = tmp_path / "killed", params_for(setting, checkpoint_every=2)
    values = {**vars(params), "adversary_lrs": list(params.adversary_lrs)}
    process = subprocess.Popen([sys.executable, "-c", DRIVER.format(tests=str(TESTS)), setting, str(base), str(out),
                                json.dumps(values)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.time() + 120
    while not list((out / CHECKPOINTS).glob("step-*.pt")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "model.safetensors").exists(), "the run finished before it could be killed"

    resumed = harden(base, forget, retain, params, out)
    assert resumed["resumed_from_step"] in range(2, 12, 2)
    assert not (out / CHECKPOINTS).exists()  # the output is the model alone
    first, second = load_file(tmp_path / "whole/model.safetensors"), load_file(out / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # the log runs on as one, the steps before the kill included
    logs = [[json.loads(line) for line in (d / TAR_LOG).read_text().splitlines()] for d in (tmp_path / "whole", out)]
    same = ("step", "outer_lr", "adversaries", "retain_loss", "tr_loss", "tr_weighted_sum", "adversary_loss")
    assert [{k: h[k] for k in same} for h in logs[0]] == [{k: h[k] for k in same} for h in logs[1]]
    assert whole["random_mapping"] == resumed["random_mapping"]


def test_only_the_latest_complete_checkpoint_of_the_same_run_is_resumed(tmp_path):
    directory = tmp_path / CHECKPOINTS
    for step in (2, 4):
        save_checkpoint(directory, step, {"run": "a", "step": step})
    assert sorted(p.name for p in directory.iterdir()) == ["step-4.pt"]  # older ones go once a newer one is in
    (directory / "step-6.pt.tmp").write_bytes(b"killed mid-write")
    assert load_checkpoint(directory, "a")["step"] == 4
    assert not (directory / "step-6.pt.tmp").exists()
    assert load_checkpoint(directory, "b") is None and not directory.exists()  # settings changed: start over
