"""Command of workflow/rules/tables.smk: gather every evaluation into results/tables and the refusal figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab.commands.common import json_object, params
from tamperlab.errors import UserError


def tables(args: argparse.Namespace) -> None:
    import pandas as pd

    from tamperlab.reporting.attack_figures import refusal_figures
    from tamperlab.reporting.published_table import published_table
    from tamperlab.reporting.settings import TablesParams
    from tamperlab.reporting.tables import (
        defence_seed_table,
        evaluation_files,
        evaluation_settings,
        harmfulness_table,
        mean_over_seeds,
        refusal_table,
        seed_table,
        summary_table,
        tamper_resistance_table,
    )
    from tamperlab.reporting.utility import cost_table, with_usability
    from tamperlab.runtime.params import from_params
    from tamperlab.runtime.provenance import Step

    inputs = {f"refusal{i}": Path(p) for i, p in enumerate(args.refusal)}
    inputs |= {f"capability{i}": Path(p) for i, p in enumerate(args.capability)}
    inputs |= {"visage": args.visage} if args.visage else {}
    outputs = {"refusal_csv": args.out_refusal, "summary_csv": args.out_summary, "figures": args.out_figures,
               "harmfulness_csv": args.out_harmfulness, "tamper_resistance_csv": args.out_tamper_resistance,
               "published_csv": args.out_published, "cost_csv": args.out_cost,
               **({"seeds_csv": args.out_seeds} if args.out_seeds else {}),
               **({"defence_seeds_csv": args.out_defence_seeds} if args.out_defence_seeds else {})}
    settings = from_params(TablesParams, args.params)
    if bool(settings.defence_seeds) != bool(args.out_defence_seeds):
        raise UserError("--params defence_seeds and --out-defence-seeds go together")
    metric, bound = settings.capability_metric, settings.utility
    with Step("tables", params(args), inputs=inputs, outputs=outputs, outputs_are_dirs=("figures",)) as step:
        summaries = evaluation_files(args.refusal, "refusal.json")
        table = refusal_table(summaries, evaluation_files(args.capability, "capability.json"))
        # one row per cell (means over seeds) for the per-cell tables and figures; one seed: the table itself
        cells = with_usability(mean_over_seeds(table), metric, bound)
        table = with_usability(table, metric, bound)
        resistance = tamper_resistance_table(cells, settings.hazard_metric, settings.retain_metric)
        visage = pd.read_csv(args.visage) if args.visage else None
        summary = summary_table(table, metric, bound)
        seeds = settings.defence_seeds
        written = {
            "refusal_csv": table,
            "summary_csv": summary,
            "harmfulness_csv": harmfulness_table(cells, settings.harmfulness_attacks, metric),
            "tamper_resistance_csv": resistance,
            "published_csv": published_table(settings.published, cells, resistance, visage),
            "cost_csv": cost_table(table, metric, bound),
            **({"seeds_csv": seed_table(table)} if args.out_seeds else {}),
            **({"defence_seeds_csv": defence_seed_table(summary, seeds)} if seeds else {}),
        }
        for name, frame in written.items():
            frame.to_csv(step.path(name), index=False, lineterminator="\n")
        figures = refusal_figures(cells, step.path("figures"), metric, settings.hazard_metric,
                                  settings.retain_metric, settings.hazard_attacks, evaluation_settings(summaries))
        step.results = {"rows": len(table), "figures": [f.name for f in figures]}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tables", help="gather evaluations into results/tables")
    p.add_argument("--refusal", type=Path, nargs="+", required=True,
                   help="refusal.json files, or evaluate-run directories holding them")
    p.add_argument("--capability", type=Path, nargs="*", default=[],
                   help="capability.json files, or evaluate-run directories holding them")
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help="the step's settings (reporting.settings.TablesParams): capability_metric and utility (the "
                        "utility bound), hazard_metric, retain_metric, harmfulness_attacks, hazard_attacks, "
                        "published (a paper's numbers), defence_seeds ({defence: its seeds' defences})")
    p.add_argument("--visage", type=Path, default=None,
                   help="visage.csv, where published VISAGE numbers are looked up")
    p.add_argument("--out-refusal", type=Path, required=True)
    p.add_argument("--out-summary", type=Path, required=True)
    p.add_argument("--out-figures", type=Path, required=True, help="directory for the figures")
    p.add_argument("--out-harmfulness", type=Path, required=True)
    p.add_argument("--out-tamper-resistance", type=Path, required=True)
    p.add_argument("--out-published", type=Path, required=True, help="the paper's numbers beside ours")
    p.add_argument("--out-cost", type=Path, required=True,
                   help="defence_cost.csv: each defended model's capability and false refusal against the aligned "
                        "model's")
    p.add_argument("--out-seeds", type=Path, help="each cell's mean and sd over its seeds (grids of several seeds)")
    p.add_argument("--out-defence-seeds", type=Path, help="each worst case's mean and sd over a defence's seeds")
    p.set_defaults(func=tables)
