"""The subject of a landscape scan: what is scanned, its prompts, its weights and its directions.

A subject is a model as built or registered, a defended model, or an attacked cell (its LoRA adapter merged into
the weights first: the landscape is over the full weights). Random directions depend on the device type and the
dtype they are drawn in (directions.py): every shard of a scan and its projections must run on the same kind of
device; gathering checks this from the shards' manifests (device_of).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tamperlab.errors import UserError
from tamperlab.landscape.directions import Direction, InterpolationDirection, RandomDirection
from tamperlab.landscape.spec import INTERPOLATION, KINDS, NO_SYSTEM_PROMPT, TWO_DIRECTIONS


def system_prompts(specs: Sequence[str]) -> dict[str, str | None]:
    """{name: text or None} from --system-prompt values: `none` (no system prompt) or NAME=TEXT, in order."""
    prompts: dict[str, str | None] = {}
    for spec in specs:
        if spec == NO_SYSTEM_PROMPT:
            name, text = spec, None
        elif "=" in spec and spec.split("=", 1)[0] not in ("", NO_SYSTEM_PROMPT):
            name, text = spec.split("=", 1)
        else:
            raise UserError(f"--system-prompt {spec[:40]!r}: expected 'none' or NAME=TEXT (NAME not 'none')")
        if name in prompts:
            raise UserError(f"--system-prompt: {name!r} given twice")
        prompts[name] = text
    return prompts


def harmful_prompts(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` harmful rows of a JSON-lines file (a split, or a prepared data set in file order)."""
    from tamperlab.data.jsonl import read_jsonl

    rows = [r for r in read_jsonl(path, required=("id", "prompt", "kind", "source"))
            if r["kind"] == "harmful" and not r.get("probe")]  # the main prompts: no probe's
    if not rows:
        raise UserError(f"{path}: no harmful prompts to evaluate the landscape on")
    if limit is not None and limit > len(rows):
        raise UserError(f"{path}: --limit {limit} but only {len(rows)} harmful prompts")
    return rows[:limit]


def load_subject(model_dir: Path, adapter: Path | None, max_memory: dict[str, Any] | None = None):
    """(model, tokenizer) with the adapter merged into the weights: the landscape core refuses unmerged LoRA.
    With max_memory, across the devices it names (placement.py): every weight must be on a device, where it is
    moved in place; an offloaded one (host or disk, behind accelerate's hooks) cannot be."""
    from tamperlab.models.placement import offloaded
    from tamperlab.models.registry import load_model
    from tamperlab.training.trainer import diverged

    if diverged(adapter or model_dir):
        raise UserError(f"{adapter or model_dir}: the attack diverged there (non-finite loss); no weights to scan")
    model, tokenizer = load_model(model_dir, adapter, max_memory=max_memory, merge=True)
    away = offloaded(model)
    if away:
        raise UserError(f"{model_dir}: {len(away)} weight tensors (first: {away[0]}) do not fit --max-memory "
                        f"{max_memory} and are offloaded; a scan moves every weight in place on its device: give "
                        f"the job more GPUs or GPU memory")
    return model, tokenizer


def build_directions(kind: str, model: nn.Module, seed: int, target_dir: Path | None = None,
                     target_adapter: Path | None = None, max_memory: dict[str, Any] | None = None
                     ) -> list[Direction]:
    """The scan's directions: 1d d1; 2d (d1, d2); interpolation θ_target − θ; interpolation_2d (θ_target − θ, d2).
    d1 and d2 are the random directions of index 0 and 1, so the 2D scan's α axis is the 1D scan's direction."""
    if kind in INTERPOLATION:
        if target_dir is None:
            raise UserError(f"a {kind} scan needs --target-model (the fine-tuned end of the path)")
        target, _ = load_subject(target_dir, target_adapter, max_memory)
        try:
            first = InterpolationDirection(model, target)
        except (KeyError, ValueError) as error:
            raise UserError(f"--target-model {target_dir}: {error}") from None
        del target
    elif kind in ("1d", "2d"):
        first = RandomDirection(model, seed, 0)
    else:
        raise UserError(f"unknown scan kind {kind!r} (one of {', '.join(KINDS)})")
    if kind in TWO_DIRECTIONS:
        return [first, RandomDirection(model, seed, 1)]
    return [first]


def device_of(model: nn.Module) -> dict[str, Any]:
    """{device_type, dtype, devices} of a model's weights: what its random directions were drawn on. Each tensor's
    direction is drawn on its own device, so a model spread over several GPUs (devices > 1) draws the same
    directions as on one: one generator algorithm per device type (gathering compares device_type and dtype)."""
    devices = {p.device for p in model.parameters()}
    kinds = {d.type for d in devices}
    if len(kinds) > 1:
        raise UserError(f"the weights are on {sorted(kinds)}: a scan draws its directions on one device type")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"device_type": kinds.pop(), "dtype": dtype, "devices": len(devices)}
