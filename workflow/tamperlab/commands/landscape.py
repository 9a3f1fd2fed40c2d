"""Commands of workflow/rules/landscape.smk: the safety landscape (Peng et al. 2024; the science is in
tamperlab.landscape.{scan,projection,visage}).

    landscape-scan     one shard of a scan's grid points → CSV rows (ASR per point and system prompt, timings)
    landscape-project  attacked checkpoints' coordinates in a 2D scan's (d1, d2) plane → JSON
    landscape-gather   every shard of one scan → <scan>.csv and <scan>.png
    visage             every gathered scan → results/tables/visage.csv and the landscape figures
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from tamperlab.commands.common import json_object, judge_from, max_memory_argument, params
from tamperlab.errors import UserError
from tamperlab.landscape.spec import INTERPOLATION, TWO_DIRECTIONS, Directions, ScanParams
from tamperlab.runtime.params import from_params

# --- checks of the arguments -------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace, cls: type) -> tuple[Any, dict[str, Any]]:
    """(--params as its dataclass, the manifest's parameters: the arguments less the outputs, with the settings'
    keys in place of their JSON, as the flags they replace were recorded), the target checked against its kind."""
    settings = from_params(cls, args.params)
    if settings.kind in INTERPOLATION and args.target_model is None:
        raise UserError(f"a {settings.kind} scan needs --target-model (and --target-adapter for a LoRA fine-tune)")
    if settings.kind not in INTERPOLATION and args.target_model is not None:
        raise UserError(f"--target-model is for interpolation scans, not {settings.kind}")
    return settings, {**params(args, "params", "out"), **asdict(settings)}


def _subject_inputs(args: argparse.Namespace) -> dict[str, Path]:
    """The subject's weights and an interpolation's target, as a manifest's inputs."""
    inputs = {"adapter": args.adapter, "target_model": args.target_model, "target_adapter": args.target_adapter}
    return {k: v for k, v in inputs.items() if v}


# --- the commands ------------------------------------------------------------------------------------------------


def scan(args: argparse.Namespace) -> None:
    """One shard of a scan: move the subject to each of the shard's grid points in place and evaluate refusal
    there under every system prompt; the weights are back at θ0, bit for bit, afterwards."""
    from tamperlab.landscape.scan import (
        refusal_evaluator,
        scan_points,
        scan_subject,
        shard,
        timings,
        write_scan_csv,
    )
    from tamperlab.landscape.subject import harmful_prompts, system_prompts
    from tamperlab.runtime.provenance import Step

    settings, manifest = _settings(args, ScanParams)
    prompts = system_prompts(settings.system_prompt)
    try:
        points = shard(scan_points(settings.kind, n=settings.n, extent=settings.extent, steps=settings.steps,
                                   extend=settings.extend), args.shard, args.shards)
    except ValueError as error:
        raise UserError(str(error)) from None
    if (args.dataset is None) == (args.data is None) or (args.data is None) != (settings.split is None):
        raise UserError("give --data with a split (--params), or --dataset (where the harmful prompts come from)")
    prompts_file = args.dataset or args.data / f"{settings.split}.jsonl"
    inputs = {"model": args.model, **({"dataset": args.dataset} if args.dataset else {"data": args.data})}
    inputs |= _subject_inputs(args)
    manifest = {**{k: v for k, v in manifest.items() if k != "system_prompt"}, "system_prompts": prompts}
    with Step("landscape-scan", manifest, inputs=inputs, outputs={"scan": args.out}) as step:
        rows = harmful_prompts(prompts_file, settings.limit)
        evaluate_point = refusal_evaluator(rows, judge_from(settings), prompts, settings.max_new_tokens,
                                           settings.batch_size, settings.compliance_marker)
        table, device = scan_subject(args.model, args.adapter, settings.kind, settings.seed, points, evaluate_point,
                                     target_dir=args.target_model, target_adapter=args.target_adapter,
                                     anchor_every=settings.anchor_every, max_memory=args.max_memory,
                                     phase=step.phase)
        write_scan_csv(step.path("scan"), table, subject=args.subject, scan=args.scan, kind=settings.kind,
                       target=args.target)
        step.results = {**device, "points": len(points), "rows": len(table), "prompts": len(rows), **timings(table)}


def project(args: argparse.Namespace) -> None:
    """Where attacked checkpoints lie in a 2D scan's plane, for the scan's figure."""
    from tamperlab.landscape.projection import project_cells, summary
    from tamperlab.runtime.provenance import Step

    directions, manifest = _settings(args, Directions)
    if directions.kind not in TWO_DIRECTIONS:
        raise UserError(f"projections are onto a 2D scan's plane; {directions.kind} has one direction")
    cells = [(name, Path(model), None if adapter == "-" else Path(adapter)) for name, model, adapter in args.cell]
    if len({name for name, _, _ in cells}) != len(cells):
        raise UserError("--cell: a name given twice")
    inputs = {"model": args.model, **_subject_inputs(args)}
    for k, (_, model_dir, adapter) in enumerate(cells):
        inputs[f"cell{k}_model"] = model_dir
        inputs |= {f"cell{k}_adapter": adapter} if adapter else {}
    with Step("landscape-project", manifest, inputs=inputs, outputs={"projections": args.out}) as step:
        found = project_cells(args.model, args.adapter, directions.kind, directions.seed, cells,
                              target_dir=args.target_model, target_adapter=args.target_adapter,
                              max_memory=args.max_memory, phase=step.phase)
        result = {"subject": args.subject, "scan": args.scan, "kind": directions.kind, **found}
        step.path("projections").write_text(json.dumps(result, indent=2) + "\n")
        step.results = {"device_type": found["device_type"], "dtype": found["dtype"],
                        "cells": summary(found["cells"])}


def gather(args: argparse.Namespace) -> None:
    """Every shard of one scan → the scan's CSV (rows in grid order) and its figure."""
    from tamperlab.landscape import figures
    from tamperlab.landscape.projection import read_projections
    from tamperlab.landscape.scan import gather_scan, timings, write_scan_csv
    from tamperlab.runtime.provenance import Step

    if len(args.projections) > 1:
        raise UserError("--projections: at most one file (the scan's)")
    args.projections = args.projections[0] if args.projections else None
    inputs = {f"shard{k}": p for k, p in enumerate(args.shard)}
    inputs |= {"projections": args.projections} if args.projections else {}
    outputs = {"csv": args.out_csv, "figure": args.out_figure}
    with Step("landscape-gather", params(args, "out_csv", "out_figure"), inputs=inputs, outputs=outputs) as step:
        rows, scanned = gather_scan(args.shard, args.subject, args.scan)
        projections = None
        if args.projections:
            projections = read_projections(args.projections, args.scan, scanned["device_type"], scanned["dtype"])
        write_scan_csv(step.path("csv"), rows)
        figures.scan_figure(rows, scanned["kind"], args.subject, args.scan, step.path("figure"),
                            projections=projections,
                            settings={"judge": scanned.get("judge"), "new_tokens": scanned.get("max_new_tokens")})
        step.results = {"rows": len(rows), "shards": len(args.shard), "device_type": scanned["device_type"],
                        **timings(rows)}


def visage(args: argparse.Namespace) -> None:
    """VISAGE, basin width and ASR at the origin for every scan, subject and system prompt, and the figures."""
    from tamperlab.landscape import figures
    from tamperlab.landscape.projection import projections_by_scan
    from tamperlab.landscape.scan import read_scans
    from tamperlab.landscape.visage import visage_table
    from tamperlab.reporting.settings import VisageParams
    from tamperlab.reporting.tables import evaluation_files, evaluation_settings, refusal_table, summary_table
    from tamperlab.runtime.provenance import Step

    settings = from_params(VisageParams, args.params)
    inputs = {f"scan{k}": p for k, p in enumerate(args.scan)}
    inputs |= {f"projections{k}": p for k, p in enumerate(args.projections)}
    inputs |= {f"refusal{k}": p for k, p in enumerate(args.refusal)}
    inputs |= {f"capability{k}": p for k, p in enumerate(args.capability)}
    outputs = {"table": args.out_table, "figures": args.out_figures}
    with Step("visage", params(args, "out_table", "out_figures"), inputs=inputs, outputs=outputs,
              outputs_are_dirs=("figures",)) as step:
        summaries = evaluation_files(args.refusal, "refusal.json")
        capabilities = evaluation_files(args.capability, "capability.json")
        refusal = refusal_table(summaries, capabilities) if args.refusal else None
        scans = read_scans(args.scan)
        frame = visage_table(scans, refusal, settings.post_attack, settings.basin_tolerance)
        frame.to_csv(step.path("table"), index=False, lineterminator="\n")
        # the figure's y: refusal_summary's utility-bounded worst case over the post-attack attacks
        summary = None
        if refusal is not None and settings.capability_metric:
            summary = summary_table(refusal[refusal["attack"].isin(["none", *settings.post_attack])],
                                    settings.capability_metric, settings.utility)
        evaluated = evaluation_settings(summaries) if summaries else None
        if evaluated is not None:
            evaluated["n"] = "/".join(str(n) for n in sorted(set(refusal["n"].dropna().astype(int))))
        written = figures.landscape_figures(scans, frame, projections_by_scan(args.projections),
                                            step.path("figures"), settings.refusal_system_prompt, summary, evaluated,
                                            {"judge": settings.scan_judge, "new_tokens": settings.scan_new_tokens})
        step.results = {"rows": len(frame), "scans": len(scans), "figures": [f.name for f in written]}


# --- the parsers -------------------------------------------------------------------------------------------------


def _subject_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="model/defence, or model/defence/attack/cell")
    p.add_argument("--scan", required=True, help="the scan's name")
    p.add_argument("--model", type=Path, required=True, help="the subject's model directory")
    p.add_argument("--adapter", type=Path, help="a LoRA adapter merged into the subject's weights")
    p.add_argument("--target", help="interpolation: the fine-tuned end's name (attack/cell), for the tables")
    p.add_argument("--target-model", type=Path, help="interpolation: the fine-tuned end (θ_target)")
    p.add_argument("--target-adapter", type=Path, help="interpolation: its LoRA adapter (merged)")
    max_memory_argument(p)


def register(sub: argparse._SubParsersAction) -> None:
    """Register landscape-scan, landscape-project, landscape-gather and visage on the tamperlab command."""
    p = sub.add_parser("landscape-scan", help="one shard of a safety-landscape scan: ASR at each grid point")
    _subject_arguments(p)
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help=f"the scan's settings: {', '.join(f.name for f in fields(ScanParams))} (n, extent, steps, "
                        f"extend: those of its kind only; system_prompt: a list of none or NAME=TEXT, a scan "
                        f"dimension; split: null with --dataset)")
    p.add_argument("--data", type=Path, help="the split-data directory (with the split of --params)")
    p.add_argument("--dataset", type=Path, help="instead: a prepared data set's JSON lines, in file order")
    p.add_argument("--shard", type=int, required=True)
    p.add_argument("--shards", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=scan)

    p = sub.add_parser("landscape-project", help="coordinates of attacked checkpoints in a 2D scan's plane")
    _subject_arguments(p)
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help='the scan\'s directions: {"kind": ..., "seed": ...} (the seed of its random directions)')
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
    p.set_defaults(func=gather)

    p = sub.add_parser("visage", help="VISAGE, basin width and ASR at the origin of every scan; figures")
    p.add_argument("--scan", type=Path, nargs="+", action="extend", required=True, help="gathered scan CSVs")
    p.add_argument("--projections", type=Path, nargs="*", action="extend", default=[])
    p.add_argument("--refusal", type=Path, nargs="*", action="extend", default=[],
                   help="the subjects' refusal.json files, or evaluation directories holding them (post-attack "
                        "refusal per subject)")
    p.add_argument("--capability", type=Path, nargs="*", action="extend", default=[],
                   help="the same evaluations' capability.json files or directories (the figure's utility bound)")
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help="the step's settings (reporting.settings.VisageParams): basin_tolerance (the α range where "
                        "ASR stays within this many points of ASR(0)), post_attack (the attacks whose grids count for "
                        "the worst post-attack refusal), refusal_system_prompt (the system prompt, name or none, the "
                        "refusal table was evaluated under), capability_metric and utility (the figure's utility "
                        "bound, as the tables'), scan_judge and scan_new_tokens (the figures' titles)")
    p.add_argument("--out-table", type=Path, required=True)
    p.add_argument("--out-figures", type=Path, required=True)
    p.set_defaults(func=visage)
