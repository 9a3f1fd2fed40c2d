"""Where attacked checkpoints lie in a 2D scan's plane (the marks on its figure).

a_k = ⟨Δ, d_k⟩ / ⟨d_k, d_k⟩ for Δ = θ_other − θ is each axis's own projection; the two random directions are not
orthogonalised, so the least-squares coordinates (G c = b with the Gram matrix G) are given too. The directions
are regenerated tensor by tensor, as the scan drew them: a projection must run on the device type and dtype of its
scan (scan.py), which gathering checks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tamperlab.errors import UserError
from tamperlab.landscape.directions import Direction, weight_tensors
from tamperlab.landscape.scan import Phase
from tamperlab.landscape.subject import build_directions, device_of, load_subject

SUMMARY = ("alpha", "beta", "distance_d1", "outside_plane")  # what a manifest records of each cell


def projection(direction_pair: Sequence[Direction], model: nn.Module, other: nn.Module) -> dict[str, float]:
    """Coordinates of θ_other − θ in the plane of two directions, tensor by tensor from regenerated directions.

    Besides the coordinates (module docstring): ‖Δ‖ in units of ‖d_k‖ (how far the other model is, on the scan's
    own scale) and the share of ‖Δ‖ outside the plane: random directions in a space of millions of dimensions are
    nearly orthogonal to any given Δ, so an attacked model projects near the origin however far away it is."""
    state = other.state_dict()
    gram = torch.zeros(2, 2, dtype=torch.float64)
    inner = torch.zeros(2, dtype=torch.float64)
    delta_sq = 0.0
    with torch.no_grad():
        for name, param in weight_tensors(model):
            if name not in state or tuple(state[name].shape) != tuple(param.shape):
                raise UserError(f"{name}: missing or of another shape in the projected model")
            delta = state[name].detach().to(param.device, torch.float32) - param.detach().float()
            delta_sq += float(torch.sum(delta.double() ** 2))
            components = []
            for direction in direction_pair:
                component = direction.component(name, param)
                components.append(None if component is None else component[0].float() * component[1])
            for k, dk in enumerate(components):
                if dk is None:
                    continue
                inner[k] += float(torch.sum(delta.double() * dk.double()))
                for m, dm in enumerate(components):
                    if dm is not None:
                        gram[k, m] += float(torch.sum(dk.double() * dm.double()))
            del delta, components
    axes = [float(inner[k] / gram[k, k]) if gram[k, k] > 0 else 0.0 for k in range(2)]
    least = torch.linalg.lstsq(gram, inner.unsqueeze(1)).solution.squeeze(1)
    in_plane = float(least @ inner)  # ‖P Δ‖² for the orthogonal projection P onto span(d1, d2)
    norms = [math.sqrt(float(gram[k, k])) for k in range(2)]
    return {
        "alpha": axes[0], "beta": axes[1], "alpha_lstsq": float(least[0]), "beta_lstsq": float(least[1]),
        "delta_norm": math.sqrt(delta_sq), "d1_norm": norms[0], "d2_norm": norms[1],
        "distance_d1": math.sqrt(delta_sq) / norms[0] if norms[0] else None,
        "cosine_d1_d2": float(gram[0, 1]) / (norms[0] * norms[1]) if norms[0] and norms[1] else None,
        "outside_plane": math.sqrt(max(delta_sq - in_plane, 0.0) / delta_sq) if delta_sq else 0.0,
    }


def project_cells(model_dir: Path, adapter: Path | None, kind: str, seed: int,
                  cells: Sequence[tuple[str, Path, Path | None]], *, target_dir: Path | None = None,
                  target_adapter: Path | None = None, max_memory: dict[str, Any] | None = None,
                  phase: Phase = lambda name: nullcontext()) -> dict[str, Any]:
    """{cells: {name: projection}, device_type, dtype, devices}: each (name, model directory, adapter) checkpoint
    in the plane of the subject's `kind` of directions (every model within max_memory, placement.py).
    `phase(name)` times the load and the projections."""
    with phase("load"):
        model, _ = load_subject(model_dir, adapter, max_memory)
        directions = build_directions(kind, model, seed, target_dir, target_adapter, max_memory)
    found: dict[str, Any] = {}
    with phase("project"):
        for name, other_dir, other_adapter in cells:
            other, _ = load_subject(other_dir, other_adapter, max_memory)
            found[name] = projection(directions, model, other)
            del other
    return {"cells": found, **device_of(model)}


def summary(cells: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The coordinates, distance and share outside the plane of each cell (a manifest's record)."""
    return {name: {k: cell[k] for k in SUMMARY} for name, cell in cells.items()}


def read_projections(path: Path, scan: str, device_type: str, dtype: str) -> dict[str, Any]:
    """A projections file, checked to be of `scan` and computed on the device type and dtype the scan ran on."""
    from tamperlab.runtime.provenance import read_manifest

    projections = json.loads(path.read_text())
    ran = (read_manifest(path)["results"]["device_type"], projections["dtype"])
    if ran != (device_type, dtype) or projections["scan"] != scan:
        raise UserError(f"{path}: projections of {projections['scan']} on {ran[0]} in {ran[1]}, "
                        f"the scan ran on {device_type} in {dtype}")
    return projections


def projections_by_scan(paths: Sequence[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(subject, scan): projections} of projections files (the figures' marks)."""
    return {(p["subject"], p["scan"]): p for p in (json.loads(Path(f).read_text()) for f in paths)}
