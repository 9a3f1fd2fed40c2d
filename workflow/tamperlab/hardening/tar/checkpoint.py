"""Checkpoints: out_dir/checkpoints/step-<n>.pt after every checkpoint_every-th outer step, removed at the end;
and the global RNG states they carry, so that a resumed run goes on bit for bit as if never stopped."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tamperlab.hardening.tar.params import TARParams

log = logging.getLogger("tamperlab.hardening.tar")  # one logger for the package


def run_key(params: TARParams, model_dir: Path, anchor_dir: Path | None, placement: dict[str, Any]) -> str:
    """What must match for a checkpoint to be continued: the settings (checkpoint_every aside: it does not change
    the result), the model, the anchor and where the model lives."""
    return json.dumps({"params": {**params.record(), "checkpoint_every": None}, "model": str(model_dir),
                       "anchor": str(anchor_dir), **placement}, sort_keys=True)


def rng_states() -> dict[str, Any]:
    """Every global RNG (python, numpy, torch CPU and CUDA): dropout and anything else may draw from them."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], prune: bool = True) -> None:
    """Write state as directory/step-<step>.pt, atomically: into a .tmp file, fsynced, then renamed, so a kill
    mid-write leaves a .tmp that never counts as a checkpoint. Older checkpoints are removed once it is in place
    (with `prune`; else by `prune_checkpoints`, once every process has written its own)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / f"step-{step}.pt", directory / f"step-{step}.pt.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if prune:
        prune_checkpoints(directory, step)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Remove every checkpoint in directory but step-<keep>.pt."""
    for old in directory.glob("step-*.pt"):
        if old.name != f"step-{keep}.pt":
            old.unlink()


def checkpoint_steps(directory: Path) -> list[Path]:
    """The complete checkpoints in directory, oldest first; partial writes (.tmp) are removed."""
    for tmp in directory.glob("step-*.pt.tmp"):
        tmp.unlink()
    return sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def load_checkpoint(directory: Path, run: str) -> dict[str, Any] | None:
    """The latest complete checkpoint of this very run (same `run` key: hyperparameters, model, anchor), or None.
    Partial writes (.tmp) and checkpoints of another run (the config changed since) are removed."""
    import torch

    found = checkpoint_steps(directory)
    if not found:
        return None
    state = torch.load(found[-1], map_location="cpu", weights_only=False)  # written by this job: RNG states, logs
    if state["run"] != run:
        log.warning("TAR: %s is from other settings; starting over", found[-1])
        shutil.rmtree(directory)
        return None
    return state
