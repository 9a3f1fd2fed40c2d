"""The landscape scan: grids of coefficients, the walk over them, and scatter/gather of a scan across jobs.

Grids (Peng et al. 2024): 1D α ∈ [−a, a] with n points; 2D the n×n product, walked in snake (boustrophedon)
order so that every move changes one coefficient by one grid step (one direction regenerated per move);
interpolation α ∈ [−k/steps, 1 + k/steps] in steps of 1/steps along θ_finetuned − θ_aligned; and
interpolation × random, the interpolation grid as rows and a random direction's grid as columns.

At each point the model is moved in place (directions.Perturbation) and `evaluate_point(model, tokenizer)` is
called; the caller decides what it measures (the refusal evaluation, under one or several system prompts).
ASR = 100 − refusal %, the share of responses without a refusal (the paper's keyword ASR).

What is scanned, its prompts, weights and directions: landscape.subject. Every shard of a scan must have run on
the same kind of device (random directions depend on it); gathering checks this from the shards' manifests.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from tamperlab.errors import UserError
from tamperlab.evaluation.refusal import evaluate
from tamperlab.landscape.directions import Direction, Perturbation
from tamperlab.landscape.spec import KINDS
from tamperlab.landscape.subject import build_directions, device_of, load_subject
from tamperlab.runtime.logs import Progress

# A scan CSV's columns (a shard's and a gathered scan's alike), and how read_scan_csv parses them.
SCAN_COLUMNS = ["subject", "scan", "kind", "target", "i", "j", "alpha", "beta", "system_prompt", "asr", "refusal_rate",
                "compliance_rate", "other_rate", "n", "perturb_s", "eval_s"]
INTEGER_COLUMNS = ("i", "j", "n")
TEXT_COLUMNS = ("subject", "scan", "kind", "target", "system_prompt")
SHARD_ONLY = ("shard", "out")  # the parameters that differ between the shards of one scan

Phase = Callable[[str], AbstractContextManager]  # times a named part of a step (provenance.Step.phase)

# What evaluate_point returns: one result, or one per system prompt (each then becomes a row). A result holds
# "refusal_rate" (a fraction, as refusal.summarise gives it), optionally "eval_s" and any other scalars.
EvaluatePoint = Callable[[nn.Module, Any], Mapping[str, Any] | Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Point:
    index: tuple[int, int]  # (i, j): row i along the first direction, column j along the second; j = 0 in 1D
    coefficients: tuple[float, ...]  # (α,) or (α, β)


def symmetric_grid(extent: float, n: int) -> list[float]:
    """n points evenly over [−extent, extent]; written so that the middle point of an odd n is exactly 0 and
    the grid is exactly symmetric."""
    if n < 1:
        raise ValueError(f"a grid needs at least one point, got n={n}")
    if n == 1:
        return [0.0]
    return [extent * (2 * i - (n - 1)) / (n - 1) for i in range(n)]


def interpolation_grid(steps: int, extend: int) -> list[float]:
    """t / steps for t = −extend … steps + extend: 0 is the aligned model, 1 the fine-tuned one."""
    if steps < 1 or extend < 0:
        raise ValueError(f"interpolation needs steps ≥ 1 and extend ≥ 0, got steps={steps}, extend={extend}")
    return [t / steps for t in range(-extend, steps + extend + 1)]


def snake(rows: Sequence[float], columns: Sequence[float]) -> list[Point]:
    """The product grid, row by row, every other row walked backwards: consecutive points are neighbours."""
    points = []
    for i, alpha in enumerate(rows):
        order = range(len(columns)) if i % 2 == 0 else range(len(columns) - 1, -1, -1)
        points.extend(Point((i, j), (alpha, columns[j])) for j in order)
    return points


def scan_points(kind: str, n: int = 21, extent: float = 0.5, steps: int = 10, extend: int = 0) -> list[Point]:
    """The ordered points of a scan. 1d/2d: n points per axis over [−extent, extent]. interpolation: the grid
    [−extend/steps, 1 + extend/steps]. interpolation_2d: that grid (rows, α) × the random grid (columns, β)."""
    if kind == "1d":
        return [Point((i, 0), (alpha,)) for i, alpha in enumerate(symmetric_grid(extent, n))]
    if kind == "2d":
        grid = symmetric_grid(extent, n)
        return snake(grid, grid)
    if kind == "interpolation":
        return [Point((i, 0), (alpha,)) for i, alpha in enumerate(interpolation_grid(steps, extend))]
    if kind == "interpolation_2d":
        return snake(interpolation_grid(steps, extend), symmetric_grid(extent, n))
    raise ValueError(f"unknown scan kind {kind!r} (one of {', '.join(KINDS)})")


def shard(points: Sequence[Point], shard_index: int, n_shards: int) -> list[Point]:
    """Contiguous chunk `shard_index` of `n_shards`, sizes differing by at most one. Contiguous, so a shard of a
    snake walk is itself a walk of unit moves (only its first move, from θ0, is long)."""
    if n_shards < 1 or not 0 <= shard_index < n_shards:
        raise ValueError(f"shard {shard_index} of {n_shards}: need 0 ≤ shard_index < n_shards")
    size, extra = divmod(len(points), n_shards)
    start = shard_index * size + min(shard_index, extra)
    return list(points[start:start + size + (shard_index < extra)])


def asr_from_refusal_rate(refusal_rate: float) -> float:
    """ASR in percent from a refusal rate in [0, 1]; rounded so that no refusals is exactly 100."""
    return round(100.0 * (1.0 - refusal_rate), 4)


def _synchronise(model: nn.Module) -> None:
    # CUDA kernels are asynchronous: without this the perturbation's time would land in the evaluation's. Every
    # GPU the model is spread over (placement.py), not only the current one.
    for device in {p.device for p in model.parameters() if p.is_cuda}:
        torch.cuda.synchronize(device)


def _row(point: Point, result: Mapping[str, Any], perturb_s: float, eval_s: float) -> dict[str, Any]:
    if result.get("refusal_rate") is None:
        raise ValueError("evaluate_point must return a refusal_rate (were there no harmful prompts?)")
    i, j = point.index
    alpha, beta = (*point.coefficients, 0.0)[:2]
    extras = {k: v for k, v in result.items() if k not in ("refusal_rate", "eval_s")}
    return {"i": i, "j": j, "alpha": alpha, "beta": beta, **extras,
            "asr": asr_from_refusal_rate(result["refusal_rate"]), "refusal_rate": result["refusal_rate"],
            "perturb_s": round(perturb_s, 6), "eval_s": round(result.get("eval_s", eval_s), 6)}


def anchor_period(model: nn.Module, anchor_every: int | Literal["auto"] | None) -> int | None:
    """How often run_scan derives a point from θ0 instead of stepping to it. auto: every point for weights below
    fp32 precision (incremental bf16 steps drift by about half a grid step along a row, see Perturbation),
    never for fp32, where stepping is exact to ~1e-5 of a grid step and much cheaper on a GPU."""
    if anchor_every == "auto":
        exact = all(p.dtype in (torch.float32, torch.float64) for p in model.parameters())
        return None if exact else 1
    if anchor_every is not None and (isinstance(anchor_every, bool) or anchor_every < 1):
        raise ValueError(f"anchor_every must be 'auto', None or ≥ 1, got {anchor_every!r}")
    return anchor_every


def run_scan(model: nn.Module, tokenizer: Any, points: Sequence[Point], directions: Sequence[Direction],
             evaluate_point: EvaluatePoint,
             anchor_every: int | Literal["auto"] | None = "auto") -> list[dict[str, Any]]:
    """Walk the points in order, moving the model in place and evaluating it at each; rows in walk order.

    The model must be at its unperturbed weights; it is back there, bitwise, when this returns or raises.
    `anchor_every=k` derives every k-th point from θ0 instead of stepping to it; None always steps; "auto"
    (default) anchors every point of a half-precision model (anchor_period). A row: i, j, alpha, beta, the
    result's extra keys (e.g. system_prompt), asr, refusal_rate, perturb_s (the move to this point), eval_s
    (the result's own, else the whole call's)."""
    anchor_every = anchor_period(model, anchor_every)
    perturbation = Perturbation(model, directions)
    rows: list[dict[str, Any]] = []
    progress = Progress(logging.getLogger(__name__), "landscape: point", len(points))  # a line every 10 s at most
    try:
        for count, point in enumerate(points):
            start = time.perf_counter()
            if anchor_every is not None and count > 0 and count % anchor_every == 0:
                perturbation.anchor(point.coefficients)
            else:
                perturbation.move_to(point.coefficients)
            _synchronise(model)
            perturb_s = time.perf_counter() - start
            start = time.perf_counter()
            results = evaluate_point(model, tokenizer)
            eval_s = time.perf_counter() - start
            for result in [results] if isinstance(results, Mapping) else results:
                rows.append(_row(point, result, perturb_s, eval_s))
            progress.update(count + 1, f"coefficients {point.coefficients}")
    finally:
        perturbation.restore()
    return rows


def gather(shard_rows: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of all shards as one table, ordered by grid index (i, j) and, within a point, as evaluated.
    A point seen twice (same i, j and system prompt) is an error: overlapping shards."""
    rows = [dict(row) for rows in shard_rows for row in rows]
    seen: set[tuple[int, int, Any]] = set()
    for row in rows:
        key = (int(row["i"]), int(row["j"]), row.get("system_prompt"))
        if key in seen:
            raise ValueError(f"point i={key[0]} j={key[1]} system_prompt={key[2]!r} appears in more than one row")
        seen.add(key)
    return sorted(rows, key=lambda row: (int(row["i"]), int(row["j"])))  # stable: keeps per-point order


def refusal_evaluator(rows: Sequence[Mapping[str, Any]], judge: Callable, system_prompts: Mapping[str, str | None],
                      max_new_tokens: int, batch_size: int, compliance_marker: str | None = None) -> EvaluatePoint:
    """evaluate_point for the paper's measurement: the refusal evaluation of the harmful rows, once per named
    system prompt (system prompts as a scan dimension at the cost of one move). One result per system prompt."""

    def evaluate_point(model: nn.Module, tokenizer: Any) -> list[dict[str, Any]]:
        results = []
        for name, system_prompt in system_prompts.items():
            start = time.perf_counter()
            summary, _ = evaluate(model, tokenizer, rows, judge, system_prompt, max_new_tokens, batch_size,
                                  compliance_marker)
            results.append({"system_prompt": name, "refusal_rate": summary["refusal_rate"], "n": summary["n"],
                            "compliance_rate": summary["compliance_rate"], "other_rate": summary["other_rate"],
                            "eval_s": time.perf_counter() - start})
        return results

    return evaluate_point


# --- one shard ---------------------------------------------------------------------------------------------------


def scan_subject(model_dir: Path, adapter: Path | None, kind: str, seed: int, points: Sequence[Point],
                 evaluate_point: EvaluatePoint, *, target_dir: Path | None = None,
                 target_adapter: Path | None = None, anchor_every: int | Literal["auto"] | None = "auto",
                 max_memory: dict[str, Any] | None = None,
                 phase: Phase = lambda name: nullcontext()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows, device_of the subject) of a subject's walk over `points` (run_scan) along its `kind` of directions.
    `phase(name)` times the load and the scan."""
    with phase("load"):
        model, tokenizer = load_subject(model_dir, adapter, max_memory)
        directions = build_directions(kind, model, seed, target_dir, target_adapter, max_memory)
    with phase("scan"):
        rows = run_scan(model, tokenizer, points, directions, evaluate_point, anchor_every=anchor_every)
    return rows, device_of(model)


def timings(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The seconds spent moving the weights (once per point) and evaluating (every row), and their ratio."""
    perturb = sum({(r["i"], r["j"]): r["perturb_s"] for r in rows}.values())
    evaluate_s = sum(r["eval_s"] for r in rows)
    return {"perturb_s": round(perturb, 4), "eval_s": round(evaluate_s, 4),
            "perturb_share": round(perturb / evaluate_s, 5) if evaluate_s else None}


# --- scan CSVs ---------------------------------------------------------------------------------------------------


def write_scan_csv(path: Path, rows: Sequence[Mapping[str, Any]], **labels: Any) -> None:
    """Rows in SCAN_COLUMNS (an empty cell for None), each with `labels` (subject, scan, kind, target) set."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SCAN_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            row = {**row, **labels}
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SCAN_COLUMNS})


def read_scan_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a shard or gathered scan CSV, numbers parsed (an empty cell is None)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if key in TEXT_COLUMNS:
                    parsed[key] = value
                elif value == "":
                    parsed[key] = None
                elif key in INTEGER_COLUMNS:
                    parsed[key] = int(value)
                else:
                    parsed[key] = float(value)
            rows.append(parsed)
    return rows


def read_scans(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Gathered scans, each {subject, scan, kind, target, rows} (the labels of its first row)."""
    scans = []
    for path in paths:
        rows = read_scan_csv(path)
        if not rows:
            raise UserError(f"{path}: no rows")
        scans.append({**{k: rows[0][k] for k in ("subject", "scan", "kind", "target")}, "rows": rows})
    return scans


# --- gathering the shards ----------------------------------------------------------------------------------------


def shard_parameters(paths: Sequence[Path], shards: int) -> dict[str, Any]:
    """The scan's parameters, the same in every shard's manifest, and the device they all ran on."""
    from tamperlab.runtime.provenance import read_manifest

    manifests = [read_manifest(p) for p in paths]
    first = manifests[0]
    common = {k: v for k, v in first["params"].items() if k not in SHARD_ONLY}
    seen = set()
    for path, manifest in zip(paths, manifests, strict=True):
        params = manifest["params"]
        other = {k: v for k, v in params.items() if k not in SHARD_ONLY}
        if other != common:
            changed = sorted(k for k in set(other) | set(common) if other.get(k) != common.get(k))
            raise UserError(f"{path}: a shard of another scan (parameters differ: {', '.join(changed)})")
        weights = {k: v["sha256"] for k, v in manifest["inputs"].items()}
        if weights != {k: v["sha256"] for k, v in first["inputs"].items()}:
            raise UserError(f"{path}: scanned other weights or prompts than {paths[0]} (input hashes differ)")
        if params["shards"] != shards:
            raise UserError(f"{path}: shard of {params['shards']}, expected {shards} shards")
        where = (manifest["results"]["device_type"], manifest["results"]["dtype"])
        if where != (first["results"]["device_type"], first["results"]["dtype"]):
            raise UserError(f"{path}: ran on {where[0]} in {where[1]}, another shard on "
                            f"{first['results']['device_type']} in {first['results']['dtype']}: random directions "
                            f"differ between device types and dtypes")
        seen.add(params["shard"])
    if seen != set(range(shards)):
        raise UserError(f"shards {sorted(set(range(shards)) - seen)} of {shards} are missing")
    return {**common, "device_type": first["results"]["device_type"], "dtype": first["results"]["dtype"]}


def check_complete(rows: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> None:
    """The gathered rows are the scan's grid, every point under every system prompt, exactly once."""
    points = scan_points(params["kind"], n=params["n"], extent=params["extent"], steps=params["steps"],
                         extend=params["extend"])
    expected = {(*p.index, name) for p in points for name in params["system_prompts"]}
    found = {(r["i"], r["j"], r["system_prompt"]) for r in rows}
    if found != expected:
        missing = sorted(expected - found)[:3]
        raise UserError(f"the shards do not cover the grid exactly: {len(expected - found)} points missing "
                        f"(e.g. {missing}), {len(found - expected)} unexpected")


def gather_scan(paths: Sequence[Path], subject: str, scan: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rows in grid order, the scan's parameters) from every shard of one scan of one subject, checked to be
    that scan's shards, all of them, from the same weights and device, covering its grid exactly."""
    params = shard_parameters(paths, len(paths))
    if (params["subject"], params["scan"]) != (subject, scan):
        raise UserError(f"the shards are of {params['subject']}/{params['scan']}, not {subject}/{scan}")
    try:
        rows = gather(read_scan_csv(p) for p in paths)
    except ValueError as error:
        raise UserError(str(error)) from None
    check_complete(rows, params)
    return rows, params
