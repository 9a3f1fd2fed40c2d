"""The landscape's workflow steps: scan one shard of a grid, gather the shards, project attacked models onto a
2D scan's plane, and VISAGE over every scan (Peng et al. 2024; tamperlab.landscape.{directions,scan,visage}).

    landscape-scan     one shard of a scan's grid points → CSV rows (ASR per point and system prompt, timings)
    landscape-project  attacked checkpoints' coordinates in a 2D scan's (d1, d2) plane → JSON
    landscape-gather   every shard of one scan → <scan>.csv and <scan>.png
    visage             every gathered scan → results/tables/visage.csv and the landscape figures

A subject is what is scanned: a model as built or registered, a defended model, or an attacked cell (its LoRA
adapter merged into the weights first: the landscape is over the full weights). Random directions depend on the
device type and the dtype they are drawn in (directions.py): every shard of a scan and its projections must run
on the same kind of device; gather checks this from their manifests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError

KINDS = ("1d", "2d", "interpolation", "interpolation_2d")
TWO_DIRECTIONS = ("2d", "interpolation_2d")
INTERPOLATION = ("interpolation", "interpolation_2d")
NO_SYSTEM_PROMPT = "none"  # the name of the scan dimension's "no system prompt" value
TIMING = ("perturb_s", "eval_s")
SCAN_COLUMNS = ["subject", "scan", "kind", "target", "i", "j", "alpha", "beta", "system_prompt", "asr", "refusal_rate",
                "compliance_rate", "other_rate", "n", "perturb_s", "eval_s"]


# --- helpers -----------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def _params(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    return {k: _plain(v) for k, v in vars(args).items() if k not in ("func", *skip)}


def _anchor_every(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected auto, none or an integer ≥ 1, got {text!r}")
    return value


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

    rows = [r for r in read_jsonl(path, required=("id", "prompt", "kind", "source")) if r["kind"] == "harmful"]
    if not rows:
        raise UserError(f"{path}: no harmful prompts to evaluate the landscape on")
    if limit is not None and limit > len(rows):
        raise UserError(f"{path}: --limit {limit} but only {len(rows)} harmful prompts")
    return rows[:limit]


def load_subject(model_dir: Path, adapter: Path | None):
    """(model, tokenizer) with the adapter merged into the weights: the landscape core refuses unmerged LoRA."""
    from tamperlab.attacks.finetune import DIVERGED
    from tamperlab.models.registry import load_model

    if ((adapter or model_dir) / DIVERGED).exists():
        raise UserError(f"{adapter or model_dir}: the attack diverged there (non-finite loss); no weights to scan")
    model, tokenizer = load_model(model_dir, adapter)
    if adapter is not None:
        model = model.merge_and_unload().eval()
    return model, tokenizer


def build_directions(kind: str, model, seed: int, target_dir: Path | None = None, target_adapter: Path | None = None):
    """The scan's directions: 1d d1; 2d (d1, d2); interpolation θ_target − θ; interpolation_2d (θ_target − θ, d2).
    d1 and d2 are the random directions of index 0 and 1, so the 2D scan's α axis is the 1D scan's direction."""
    from tamperlab.landscape.directions import InterpolationDirection, RandomDirection

    if kind in INTERPOLATION:
        if target_dir is None:
            raise UserError(f"a {kind} scan needs --target-model (the fine-tuned end of the path)")
        target, _ = load_subject(target_dir, target_adapter)
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


def _device(model) -> tuple[str, str]:
    param = next(model.parameters())
    return param.device.type, str(param.dtype).removeprefix("torch.")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


INTEGER_COLUMNS = ("i", "j", "n")
TEXT_COLUMNS = ("subject", "scan", "kind", "target", "system_prompt")


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


# --- landscape-scan ----------------------------------------------------------------------------------------------


def scan(args: argparse.Namespace) -> None:
    """One shard of a scan: move the subject to each of the shard's grid points in place and evaluate refusal
    there under every system prompt; the weights are back at θ0, bit for bit, afterwards."""
    from tamperlab.cli import _judge
    from tamperlab.landscape.scan import refusal_evaluator, run_scan, scan_points, shard
    from tamperlab.provenance import Step

    prompts = system_prompts(args.system_prompt)
    _check_target(args)
    _check_grid(args)
    try:
        points = shard(scan_points(args.kind, n=args.n, extent=args.extent, steps=args.steps, extend=args.extend),
                       args.shard, args.shards)
    except ValueError as error:
        raise UserError(str(error)) from None
    if (args.dataset is None) == (args.data is None) or (args.data is None) != (args.split is None):
        raise UserError("give --data with --split, or --dataset (where the harmful prompts come from)")
    prompts_file = args.dataset or args.data / f"{args.split}.jsonl"
    inputs = {"model": args.model, **({"dataset": args.dataset} if args.dataset else {"data": args.data})}
    inputs |= {"adapter": args.adapter} if args.adapter else {}
    inputs |= {"target_model": args.target_model} if args.target_model else {}
    inputs |= {"target_adapter": args.target_adapter} if args.target_adapter else {}
    params = {**_params(args, "out", "system_prompt"), "system_prompts": prompts}
    with Step("landscape-scan", params, inputs=inputs, outputs={"scan": args.out}) as step:
        rows = harmful_prompts(prompts_file, args.limit)
        with step.phase("load"):
            model, tokenizer = load_subject(args.model, args.adapter)
            directions = build_directions(args.kind, model, args.seed, args.target_model, args.target_adapter)
        evaluate_point = refusal_evaluator(rows, _judge(args), prompts, args.max_new_tokens, args.batch_size,
                                           args.compliance_marker)
        with step.phase("scan"):
            table = run_scan(model, tokenizer, points, directions, evaluate_point, anchor_every=args.anchor_every)
        for row in table:
            row.update(subject=args.subject, scan=args.scan, kind=args.kind, target=args.target)
        _write_csv(step.path("scan"), table, SCAN_COLUMNS)
        device, dtype = _device(model)
        perturb = sum({(r["i"], r["j"]): r["perturb_s"] for r in table}.values())  # once per point
        evaluate = sum(r["eval_s"] for r in table)
        step.results = {"device_type": device, "dtype": dtype, "points": len(points), "rows": len(table),
                        "prompts": len(rows), "perturb_s": round(perturb, 4), "eval_s": round(evaluate, 4),
                        "perturb_share": round(perturb / evaluate, 5) if evaluate else None}


def _check_grid(args: argparse.Namespace) -> None:
    """The grid flags a kind uses are required, the others refused (an unused flag would be misleading)."""
    random = args.kind != "interpolation"
    for flag, used in (("n", random), ("extent", random), ("steps", args.kind in INTERPOLATION),
                       ("extend", args.kind in INTERPOLATION)):
        given = getattr(args, flag) is not None
        if used and not given:
            raise UserError(f"a {args.kind} scan needs --{flag}")
        if given and not used:
            raise UserError(f"--{flag} is not a parameter of a {args.kind} scan")


def _check_target(args: argparse.Namespace) -> None:
    if args.kind in INTERPOLATION and args.target_model is None:
        raise UserError(f"a {args.kind} scan needs --target-model (and --target-adapter for a LoRA fine-tune)")
    if args.kind not in INTERPOLATION and args.target_model is not None:
        raise UserError(f"--target-model is for interpolation scans, not {args.kind}")


# --- landscape-project -------------------------------------------------------------------------------------------


def projection(direction_pair, model, other) -> dict[str, float]:
    """Coordinates of θ_other − θ in the plane of two directions, tensor by tensor from regenerated directions.

    a_k = ⟨Δ, d_k⟩ / ⟨d_k, d_k⟩ is each axis's own projection (the issue's definition); the two random
    directions are not orthogonalised, so the least-squares coordinates (G c = b with the Gram matrix G) are
    given too. Also ‖Δ‖ in units of ‖d_k‖ (how far the other model is, on the scan's own scale) and the share of
    ‖Δ‖ outside the plane: random directions in a space of millions of dimensions are nearly orthogonal to any
    given Δ, so an attacked model projects near the origin however far away it is."""
    import torch

    from tamperlab.landscape.directions import weight_tensors

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


def project(args: argparse.Namespace) -> None:
    """Where attacked checkpoints lie in a 2D scan's plane, for the scan's figure."""
    from tamperlab.provenance import Step

    if args.kind not in TWO_DIRECTIONS:
        raise UserError(f"projections are onto a 2D scan's plane; {args.kind} has one direction")
    _check_target(args)
    cells = [(name, Path(model), None if adapter == "-" else Path(adapter)) for name, model, adapter in args.cell]
    if len({name for name, _, _ in cells}) != len(cells):
        raise UserError("--cell: a name given twice")
    inputs = {"model": args.model, **({"adapter": args.adapter} if args.adapter else {})}
    inputs |= {"target_model": args.target_model} if args.target_model else {}
    inputs |= {"target_adapter": args.target_adapter} if args.target_adapter else {}
    for k, (_, model_dir, adapter) in enumerate(cells):
        inputs[f"cell{k}_model"] = model_dir
        inputs |= {f"cell{k}_adapter": adapter} if adapter else {}
    with Step("landscape-project", _params(args, "out"), inputs=inputs, outputs={"projections": args.out}) as step:
        with step.phase("load"):
            model, _ = load_subject(args.model, args.adapter)
            directions = build_directions(args.kind, model, args.seed, args.target_model, args.target_adapter)
        result = {"subject": args.subject, "scan": args.scan, "kind": args.kind, "cells": {}}
        with step.phase("project"):
            for name, model_dir, adapter in cells:
                other, _ = load_subject(model_dir, adapter)
                result["cells"][name] = projection(directions, model, other)
                del other
        device, dtype = _device(model)
        result |= {"device_type": device, "dtype": dtype}
        step.path("projections").write_text(json.dumps(result, indent=2) + "\n")
        step.results = {"device_type": device, "dtype": dtype,
                        "cells": {n: {k: c[k] for k in ("alpha", "beta", "distance_d1", "outside_plane")}
                                  for n, c in result["cells"].items()}}


# --- landscape-gather --------------------------------------------------------------------------------------------


SHARD_ONLY = ("shard", "out")  # the parameters that differ between the shards of one scan


def _shard_manifests(paths: Sequence[Path], shards: int) -> dict[str, Any]:
    """The scan's parameters, the same in every shard's manifest, and the device they all ran on."""
    from tamperlab.provenance import read_manifest

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


def _check_complete(rows: Sequence[dict[str, Any]], params: dict[str, Any]) -> None:
    from tamperlab.landscape.scan import scan_points

    points = scan_points(params["kind"], n=params["n"], extent=params["extent"], steps=params["steps"],
                         extend=params["extend"])
    expected = {(*p.index, name) for p in points for name in params["system_prompts"]}
    found = {(r["i"], r["j"], r["system_prompt"]) for r in rows}
    if found != expected:
        missing = sorted(expected - found)[:3]
        raise UserError(f"the shards do not cover the grid exactly: {len(expected - found)} points missing "
                        f"(e.g. {missing}), {len(found - expected)} unexpected")


def gather_scan(args: argparse.Namespace) -> None:
    """Every shard of one scan → the scan's CSV (rows in grid order) and its figure."""
    from tamperlab.landscape import figures
    from tamperlab.landscape.scan import gather
    from tamperlab.provenance import Step, read_manifest

    if len(args.projections) > 1:
        raise UserError("--projections: at most one file (the scan's)")
    args.projections = args.projections[0] if args.projections else None
    inputs = {f"shard{k}": p for k, p in enumerate(args.shard)}
    inputs |= {"projections": args.projections} if args.projections else {}
    outputs = {"csv": args.out_csv, "figure": args.out_figure}
    with Step("landscape-gather", _params(args, "out_csv", "out_figure"), inputs=inputs, outputs=outputs) as step:
        params = _shard_manifests(args.shard, len(args.shard))
        if (params["subject"], params["scan"]) != (args.subject, args.scan):
            raise UserError(f"the shards are of {params['subject']}/{params['scan']}, not {args.subject}/{args.scan}")
        try:
            rows = gather(read_scan_csv(p) for p in args.shard)
        except ValueError as error:
            raise UserError(str(error)) from None
        _check_complete(rows, params)
        projections = None
        if args.projections:
            projections = json.loads(args.projections.read_text())
            ran = (read_manifest(args.projections)["results"]["device_type"], projections["dtype"])
            if ran != (params["device_type"], params["dtype"]) or projections["scan"] != args.scan:
                raise UserError(f"{args.projections}: projections of {projections['scan']} on {ran[0]} in {ran[1]}, "
                                f"the scan ran on {params['device_type']} in {params['dtype']}")
        _write_csv(step.path("csv"), rows, SCAN_COLUMNS)
        figures.scan_figure(rows, params["kind"], args.subject, args.scan, step.path("figure"),
                            projections=projections)
        perturb = sum({(r["i"], r["j"]): r["perturb_s"] for r in rows}.values())
        evaluate = sum(r["eval_s"] for r in rows)
        step.results = {"rows": len(rows), "shards": len(args.shard), "device_type": params["device_type"],
                        "perturb_s": round(perturb, 4), "eval_s": round(evaluate, 4),
                        "perturb_share": round(perturb / evaluate, 5) if evaluate else None}


# --- visage ------------------------------------------------------------------------------------------------------


VISAGE_COLUMNS = [
    "subject", "model", "defence", "attack", "cell", "scan", "kind", "target", "system_prompt", "dimensions", "points",
    "alpha_min", "alpha_max", "beta_min", "beta_max", "asr_at_origin", "visage_official_1d", "visage_mean",
    "basin_width", "basin_width_beta", "basin_tolerance", "official_segment_min", "official_segment_max",
    "asr_at_target", "subject_refusal_rate", "worst_post_attack_refusal_rate", "worst_post_attack_cell",
]


def split_subject(subject: str) -> dict[str, str | None]:
    parts = subject.split("/")
    if len(parts) not in (2, 4) or not all(parts):
        raise UserError(f"subject {subject!r}: expected model/defence or model/defence/attack/cell")
    model, defence, attack, cell = (*parts, None, None)[:4]
    return {"model": model, "defence": defence, "attack": attack, "cell": cell}


def _line(rows: Sequence[dict[str, Any]], fixed: str, value: float, along: str) -> tuple[list[float], list[float]]:
    """A 1D cut of a 2D grid: the points where `fixed` equals value (the grid point nearest it), along `along`."""
    nearest = min({r[fixed] for r in rows}, key=lambda v: abs(v - value))
    cut = sorted((r for r in rows if r[fixed] == nearest), key=lambda r: r[along])
    return [r[along] for r in cut], [r["asr"] for r in cut]


def scan_metrics(rows: Sequence[dict[str, Any]], kind: str, tolerance: float) -> list[dict[str, Any]]:
    """visage.summarise_scan's metrics per system prompt, plus what a table row needs: the grid's range, the
    basin width along each axis of a 2D grid (the cuts through the origin), ASR at the target of an
    interpolation (α = 1)."""
    from tamperlab.landscape.visage import basin_width, summarise_scan

    out = []
    for summary in summarise_scan(rows, tolerance):
        group = [r for r in rows if r["system_prompt"] == summary["system_prompt"]]
        alphas, betas = [r["alpha"] for r in group], [r["beta"] for r in group]
        metrics = {k: summary.get(k) for k in ("system_prompt", "dimensions", "points", "asr_at_origin",
                                                "visage_official_1d", "visage_mean")}
        metrics |= {"alpha_min": min(alphas), "alpha_max": max(alphas), "basin_tolerance": tolerance}
        if summary["dimensions"] == 1:
            segment = summary["segment_alpha"] or [None, None]
            metrics |= {"basin_width": summary["basin_width"], "official_segment_min": segment[0],
                        "official_segment_max": segment[1]}
        else:
            metrics |= {"beta_min": min(betas), "beta_max": max(betas),
                        "basin_width": round(basin_width(*_line(group, "beta", 0.0, "alpha"), tolerance), 6),
                        "basin_width_beta": round(basin_width(*_line(group, "alpha", 0.0, "beta"), tolerance), 6)}
        if kind in INTERPOLATION:
            target = min(group, key=lambda r: abs(r["alpha"] - 1.0) + abs(r["beta"]))
            metrics["asr_at_target"] = target["asr"]
            # VISAGE is defined over random directions, not along a fine-tuning path
            for key in ("visage_official_1d", "visage_mean", "official_segment_min", "official_segment_max"):
                metrics[key] = None
        out.append(metrics)
    return out


def post_attack(refusal: Any, subject: dict[str, str | None], attacks: Sequence[str]) -> dict[str, Any]:
    """From the refusal table: the subject's own refusal rate and, for an unattacked subject, the lowest
    refusal rate over the grids of `attacks` (complete cells) and which cell that was."""
    import pandas as pd

    from tamperlab.attacks.grid import format_lr
    from tamperlab.tables import parse_cell

    mine = refusal[(refusal["model"] == subject["model"]) & (refusal["defence"] == subject["defence"])]
    result: dict[str, Any] = {"subject_refusal_rate": None, "worst_post_attack_refusal_rate": None,
                              "worst_post_attack_cell": None}
    if subject["attack"] is None:
        own = mine[mine["attack"] == "none"]
        attacked = mine[mine["attack"].isin(attacks) & (mine["status"] == "complete")].dropna(subset=["refusal_rate"])
        if len(attacked):
            worst = attacked.sort_values(["refusal_rate", "attack", "lr", "steps"], kind="stable").iloc[0]
            rank = "" if pd.isna(worst["rank"]) else f"_r{int(worst['rank'])}"  # none: full fine-tuning
            result["worst_post_attack_refusal_rate"] = float(worst["refusal_rate"])
            cell = f"lr{format_lr(worst['lr'])}_steps{int(worst['steps'])}{rank}"
            result["worst_post_attack_cell"] = f"{worst['attack']}/{cell}"
    else:
        cell = parse_cell(subject["cell"])
        own = mine[mine["attack"] == subject["attack"]]
        for key in ("lr", "steps", "rank"):
            own = own[own[key].isna()] if cell[key] is None else own[(own[key] - cell[key]).abs() < 1e-12]
    if len(own) == 1 and not pd.isna(own.iloc[0]["refusal_rate"]):
        result["subject_refusal_rate"] = float(own.iloc[0]["refusal_rate"])
    return result


def visage(args: argparse.Namespace) -> None:
    """VISAGE, basin width and ASR at the origin for every scan, subject and system prompt, and the figures."""
    import pandas as pd

    from tamperlab.landscape import figures
    from tamperlab.provenance import Step
    from tamperlab.tables import evaluation_files, refusal_table

    inputs = {f"scan{k}": p for k, p in enumerate(args.scan)}
    inputs |= {f"projections{k}": p for k, p in enumerate(args.projections)}
    inputs |= {f"refusal{k}": p for k, p in enumerate(args.refusal)}
    outputs = {"table": args.out_table, "figures": args.out_figures}
    with Step("visage", _params(args, "out_table", "out_figures"), inputs=inputs, outputs=outputs,
              outputs_are_dirs=("figures",)) as step:
        refusal = refusal_table(evaluation_files(args.refusal, "refusal.json")) if args.refusal else None
        scans, table = [], []
        for path in args.scan:
            rows = read_scan_csv(path)
            if not rows:
                raise UserError(f"{path}: no rows")
            subject, name, kind, target = (rows[0][k] for k in ("subject", "scan", "kind", "target"))
            parts = split_subject(subject)
            scans.append({"subject": subject, "scan": name, "kind": kind, "target": target, "rows": rows})
            attack = post_attack(refusal, parts, args.post_attack) if refusal is not None else {}
            for metrics in scan_metrics(rows, kind, args.basin_tolerance):
                table.append({"subject": subject, **parts, "scan": name, "kind": kind, "target": target or None,
                              **metrics, **attack})
        frame = pd.DataFrame(table, columns=VISAGE_COLUMNS)
        frame = frame.sort_values(["scan", "subject", "system_prompt"], kind="stable")
        frame.to_csv(step.path("table"), index=False, lineterminator="\n")
        projections = {(p["subject"], p["scan"]): p for p in (json.loads(Path(f).read_text())
                                                               for f in args.projections)}
        written = figures.landscape_figures(scans, frame, projections, step.path("figures"),
                                            args.refusal_system_prompt)
        step.results = {"rows": len(frame), "scans": len(scans), "figures": [f.name for f in written]}


# --- argument parsing --------------------------------------------------------------------------------------------


def _subject_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="model/defence, or model/defence/attack/cell")
    p.add_argument("--scan", required=True, help="the scan's name")
    p.add_argument("--model", type=Path, required=True, help="the subject's model directory")
    p.add_argument("--adapter", type=Path, help="a LoRA adapter merged into the subject's weights")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--seed", type=int, required=True, help="random directions' seed (one per tensor from it)")
    p.add_argument("--target", help="interpolation: the fine-tuned end's name (attack/cell), for the tables")
    p.add_argument("--target-model", type=Path, help="interpolation: the fine-tuned end (θ_target)")
    p.add_argument("--target-adapter", type=Path, help="interpolation: its LoRA adapter (merged)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register landscape-scan, landscape-project, landscape-gather and visage on the tamperlab command."""
    from tamperlab.cli import judge_arguments  # imported here: cli imports this module

    p = sub.add_parser("landscape-scan", help="one shard of a safety-landscape scan: ASR at each grid point")
    _subject_arguments(p)
    p.add_argument("--n", type=int, help="points per random axis, over [-extent, extent] (1d, 2d, interpolation_2d)")
    p.add_argument("--extent", type=float)
    p.add_argument("--steps", type=int, help="interpolation: points per unit of the path")
    p.add_argument("--extend", type=int, help="interpolation: steps past both ends")
    p.add_argument("--data", type=Path, help="the split-data directory (with --split)")
    p.add_argument("--split", help="the split whose harmful prompts are evaluated")
    p.add_argument("--dataset", type=Path, help="instead: a prepared data set's JSON lines, in file order")
    p.add_argument("--limit", type=int, help="the first LIMIT harmful prompts only")
    p.add_argument("--system-prompt", action="append", required=True, metavar="none|NAME=TEXT",
                   help="a system prompt to evaluate each point under (repeat: a scan dimension)")
    judge_arguments(p)
    p.add_argument("--anchor-every", type=_anchor_every, required=True,
                   help="derive every k-th point from θ0 (auto: every point below fp32; none: always step)")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=scan)

    p = sub.add_parser("landscape-project", help="coordinates of attacked checkpoints in a 2D scan's plane")
    _subject_arguments(p)
    p.add_argument("--cell", nargs=3, action="append", required=True, metavar=("NAME", "MODEL", "ADAPTER"),
                   help="a checkpoint to project: its name, model directory and LoRA adapter ('-' for none)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=project)

    p = sub.add_parser("landscape-gather", help="gather a scan's shards into its CSV and figure")
    p.add_argument("--subject", required=True)
    p.add_argument("--scan", required=True)
    p.add_argument("--shard", type=Path, nargs="+", action="extend", required=True, help="every shard's CSV")
    p.add_argument("--projections", type=Path, nargs="*", action="extend", default=[],
                   help="landscape-project's JSON (at most one), marked on a 2D figure")
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-figure", type=Path, required=True)
    p.set_defaults(func=gather_scan)

    p = sub.add_parser("visage", help="VISAGE, basin width and ASR at the origin of every scan; figures")
    p.add_argument("--scan", type=Path, nargs="+", action="extend", required=True, help="gathered scan CSVs")
    p.add_argument("--projections", type=Path, nargs="*", action="extend", default=[])
    p.add_argument("--refusal", type=Path, nargs="*", action="extend", default=[],
                   help="the subjects' refusal.json files, or evaluation directories holding them (post-attack "
                        "refusal per subject)")
    p.add_argument("--post-attack", action="append", default=[], metavar="ATTACK",
                   help="an attack whose grid counts for the worst post-attack refusal (harmful-prompt attacks)")
    p.add_argument("--refusal-system-prompt", required=True,
                   help="the system prompt (name, or none) the refusal table was evaluated under")
    p.add_argument("--basin-tolerance", type=float, required=True,
                   help="basin width: the α range where ASR stays within this many points of ASR(0)")
    p.add_argument("--out-table", type=Path, required=True)
    p.add_argument("--out-figures", type=Path, required=True)
    p.set_defaults(func=visage)
