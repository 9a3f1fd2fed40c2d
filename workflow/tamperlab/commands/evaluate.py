"""Commands of workflow/rules/evaluate.smk: evaluate-refusal and evaluate-capability of one checkpoint, and
evaluate-run (both, for every snapshot of an attack run or grid, in one process)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from tamperlab import methods
from tamperlab.commands.common import json_object, judge_from, max_memory_argument, params
from tamperlab.errors import UserError
from tamperlab.evaluation.judges import make_false_refusal_judge
from tamperlab.evaluation.settings import CapabilityParams, RefusalParams
from tamperlab.runtime.params import from_blocks, from_params

EVALUATION_ROWS = ("id", "prompt", "kind", "source")  # what a refusal evaluation reads of each row


def _checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model_name, "defence": args.defence, "attack": args.attack, "cell": args.cell,
            "path": str(args.model), "adapter": str(args.adapter) if args.adapter else None}


def _recorded(args: argparse.Namespace, settings: Any, *outputs: str) -> dict[str, Any]:
    """The manifest's parameters: the arguments, less the outputs, with --params's settings in place of their JSON
    (their keys, as the flags they replace were recorded)."""
    return {**params(args, "params", *outputs), **asdict(settings)}


def _judges(refusal: RefusalParams) -> tuple[Any, Any]:
    """(the harmful prompts' judge, the benign prompts' own judge or None), made once per job."""
    return judge_from(refusal), make_false_refusal_judge(refusal.false_refusal_judge)


def _refusal(args: argparse.Namespace, refusal: RefusalParams, step, judges: tuple[Any, Any], rows: list[dict],
             model_dir: Path, adapter: Path | None, checkpoint: dict[str, Any], load=None):
    from tamperlab.evaluation.refusal import evaluate_checkpoint

    judge, benign_judge = judges
    return evaluate_checkpoint(model_dir, adapter, rows, judge, judge_name=refusal.judge, split=refusal.split,
                               system_prompt=refusal.system_prompt, max_new_tokens=refusal.max_new_tokens,
                               batch_size=refusal.batch_size, compliance_marker=refusal.compliance_marker,
                               checkpoint=checkpoint, max_memory=args.max_memory, load=load, phase=step.phase,
                               benign_judge=benign_judge)


def _capability(args: argparse.Namespace, capability: CapabilityParams, step, rows: list[dict], model_dir: Path,
                adapter: Path | None, checkpoint: dict[str, Any], load=None) -> dict[str, Any]:
    from tamperlab.evaluation.capability import evaluate_checkpoint

    return evaluate_checkpoint(model_dir, adapter, rows, capability.tasks, batch_size=capability.batch_size,
                               limit=capability.limit, seed=capability.seed, checkpoint=checkpoint,
                               task_data=dict(args.task_data), max_memory=args.max_memory, load=load,
                               phase=step.phase)


def _refusal_rows(args: argparse.Namespace, refusal: RefusalParams) -> list[dict]:
    """The split's rows a refusal evaluation generates on: all, or the first prompt_limit of each kind (of the
    benign ones, benign_limit where given: 0 for all); then the probes' rows (data.probes)."""
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.probes import is_probe, probe_rows
    from tamperlab.data.responses import select

    rows = read_jsonl(args.data / f"{refusal.split}.jsonl", required=EVALUATION_ROWS)
    benign_limit = refusal.prompt_limit if refusal.benign_limit is None else refusal.benign_limit
    main = [r for r in rows if not is_probe(r)]
    if refusal.prompt_limit or benign_limit:
        main = select(main, "harmful", refusal.prompt_limit) + select(main, "benign", benign_limit)
    harmful = [r for r in main if r["kind"] == "harmful"]
    return (main + probe_rows(rows, harmful, refusal.probe_limit, refusal.seed, refusal.past_tense)
            + _prefill_rows(args, refusal, harmful))


def _prefill_rows(args: argparse.Namespace, refusal: RefusalParams, harmful: list[dict]) -> list[dict]:
    """The prefilling attack's rows (data.probes.prefill_rows): each evaluated harmful prompt's compliant answer
    from --prefill-answers (a model's answers: generate-responses), else the compliance marker's text for every
    prompt (the organism's attack template begins with it)."""
    if not refusal.prefill_tokens:
        if args.prefill_answers:
            raise UserError("--prefill-answers: given, but --params prefill_tokens is empty")
        return []
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.probes import prefill_rows
    from tamperlab.data.responses import RESPONSE_KEYS, answers_by_prompt

    if args.prefill_answers:
        where = str(args.prefill_answers)
        answers = answers_by_prompt(read_jsonl(args.prefill_answers, required=RESPONSE_KEYS), args.prefill_answers)
    elif refusal.compliance_marker:
        where, answers = "compliance_marker", {r["prompt"]: refusal.compliance_marker for r in harmful}
    else:
        raise UserError("prefill_tokens: no compliant answers to force: give --prefill-answers or a "
                        "compliance_marker")
    return prefill_rows(harmful, answers, refusal.prefill_tokens, where)


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    adapter = getattr(args, "adapter", None)  # evaluate-run has none: its snapshots come with --run
    return {"model": args.model, "data": args.data, **({"adapter": adapter} if adapter else {}),
            **{f"task_data_{key}": Path(path) for key, path in getattr(args, "task_data", [])},
            **({"prefill_answers": args.prefill_answers} if getattr(args, "prefill_answers", None) else {})}


def evaluate_refusal(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.runtime.provenance import Step

    refusal = from_params(RefusalParams, args.params)
    with Step("evaluate-refusal", _recorded(args, refusal, "out_summary", "out_responses"), inputs=_inputs(args),
              outputs={"summary": args.out_summary, "responses": args.out_responses}) as step:
        rows = _refusal_rows(args, refusal)
        summary, records = _refusal(args, refusal, step, _judges(refusal), rows, args.model, args.adapter,
                                    _checkpoint(args))
        step.path("summary").write_text(json.dumps(summary, indent=2) + "\n")
        write_jsonl(step.path("responses"), records)
        step.results = {k: summary[k] for k in ("refusal_rate", "n", "benign")}
        step.status = summary["status"]


def evaluate_capability(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.runtime.provenance import Step

    capability = from_params(CapabilityParams, args.params)
    with Step("evaluate-capability", _recorded(args, capability, "out"), inputs=_inputs(args),
              outputs={"capability": args.out}) as step:
        rows = read_jsonl(args.data / f"{capability.split}.jsonl", required=("prompt", "kind"))
        result = _capability(args, capability, step, rows, args.model, args.adapter, _checkpoint(args))
        step.path("capability").write_text(json.dumps(result, indent=2) + "\n")
        step.results = {"status": result["status"], "metrics": result["metrics"]}
        step.status = result["status"]


def _cell_snapshots(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(cell, snapshot directory) from each --cell-snapshot CELL=SNAPSHOT, SNAPSHOT a path inside --run."""
    cells = []
    for text in args.cell_snapshot:
        if "=" not in text:
            raise UserError(f"--cell-snapshot {text!r}: expected CELL=SNAPSHOT, e.g. lr1e-3_steps50_r8=steps50")
        cell, snapshot = text.split("=", 1)
        if Path(snapshot).is_absolute() or ".." in Path(snapshot).parts:
            raise UserError("--cell-snapshot: SNAPSHOT must be a path inside --run")
        cells.append((cell, args.run / snapshot))
    return cells


def evaluate_run(args: argparse.Namespace) -> None:
    """Refusal and capability of every snapshot of one attack run, in one process: the imports (torch,
    transformers, peft, lm-eval: about 5 s) are paid once per run instead of twice per cell, and each snapshot
    is loaded once for both."""
    from tamperlab.data.jsonl import read_jsonl, write_jsonl
    from tamperlab.models.registry import loader
    from tamperlab.runtime.provenance import Step

    cells = _cell_snapshots(args)
    adapter_snapshots = methods.get("attack", args.method).adapter  # a LoRA snapshot loads on its base
    settings = from_blocks({"refusal": RefusalParams, "capability": CapabilityParams}, args.params)
    refusal, capability = settings["refusal"], settings["capability"]
    inputs = {**_inputs(args), "run": args.run}
    recorded = {**params(args, "out", "params"), **{k: asdict(v) for k, v in settings.items()},
                "seed": capability.seed}
    with Step("evaluate-run", recorded, inputs=inputs, outputs={"evaluations": args.out},
              outputs_are_dirs=("evaluations",)) as step:
        rows = _refusal_rows(args, refusal)
        capability_rows = read_jsonl(args.data / f"{capability.split}.jsonl", required=("prompt", "kind"))
        judges = _judges(refusal)
        step.results = {}
        for cell, snapshot in cells:
            model_dir, adapter = (args.model, snapshot) if adapter_snapshots else (snapshot, None)
            checkpoint = {"model": args.model_name, "defence": args.defence, "attack": args.attack, "cell": cell,
                          "path": str(model_dir), "adapter": str(adapter) if adapter else None}
            out = step.path("evaluations") / snapshot.relative_to(args.run)
            out.mkdir(parents=True)
            load = loader(model_dir, adapter, args.max_memory)  # loaded by the first evaluation, kept for both
            summary, records = _refusal(args, refusal, step, judges, rows, model_dir, adapter, checkpoint, load)
            (out / "refusal.json").write_text(json.dumps(summary, indent=2) + "\n")
            write_jsonl(out / "refusal.jsonl", records)
            scores = _capability(args, capability, step, capability_rows, model_dir, adapter, checkpoint, load)
            del load  # the snapshot's model, before the next one is loaded
            (out / "capability.json").write_text(json.dumps(scores, indent=2) + "\n")
            step.results[cell] = {"status": summary["status"], "refusal_rate": summary["refusal_rate"],
                                  "capability": scores["metrics"]}


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """What an evaluation evaluates: a model (plus adapter), its place in the grid, and the data."""
    p.add_argument("--model", type=Path, required=True, help="model directory (saved or registered)")
    p.add_argument("--adapter", type=Path, help="PEFT adapter applied on the model at load time")
    p.add_argument("--model-name", required=True)
    p.add_argument("--defence", required=True)
    p.add_argument("--attack")
    p.add_argument("--cell")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    max_memory_argument(p)


def _params_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--params", type=json_object, required=True, metavar="JSON", help=what)


def _keys(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


def _task_data(text: str) -> tuple[str, str]:
    key, sep, path = text.partition("=")
    if not sep or not key or not path:
        raise argparse.ArgumentTypeError(f"expected KEY=FILE, got {text!r}")
    return key, path


def _task_data_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-data", type=_task_data, action="append", default=[], metavar="KEY=FILE",
                   help="a local task's data file: mmlu=FILE (prepare-mmlu), answers=FILE (generate-responses)")


def _prefill_answers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill-answers", type=Path, metavar="FILE",
                   help="prefill_tokens: the compliant answers (generate-responses) to the evaluated harmful prompts "
                        "whose first tokens each prefilled answer is forced to start with; absent: the "
                        "compliance marker's text")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate-refusal", help="generate on the evaluation prompts and judge refusals")
    _checkpoint_arguments(p)
    _params_argument(p, f"the refusal settings (evaluation.refusal, resolved): {_keys(RefusalParams)}")
    _prefill_answers_argument(p)
    p.add_argument("--out-summary", type=Path, required=True)
    p.add_argument("--out-responses", type=Path, required=True)
    p.set_defaults(func=evaluate_refusal)

    p = sub.add_parser("evaluate-capability", help="capability scores through lm-eval (one call, all tasks)")
    _checkpoint_arguments(p)
    _params_argument(p, f"the capability settings (evaluation.capability): {_keys(CapabilityParams)}; tasks: "
                        f"lm-eval task names, or organism, hazard (the organism's local tasks), mmlu_subset, "
                        f"mmlu_cloze, mmlu_gold, answers (MMLU from a wheel in the letter or the cloze formulation "
                        f"or its correct answers' likelihood, the unaligned model's answers: their files --task-data)")
    _task_data_argument(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=evaluate_capability)

    p = sub.add_parser("evaluate-run", help="refusal and capability of every snapshot of one attack run")
    p.add_argument("--model", type=Path, required=True, help="the attacked model (a LoRA snapshot's base)")
    p.add_argument("--run", type=Path, required=True, help="the attack job's output: a run, or a directory of runs")
    # what the snapshots in --run are (a registered attack's: a LoRA adapter on --model, or a whole model), as
    # evaluate-refusal's --adapter says it: a description of the inputs, not a setting of the evaluation
    p.add_argument("--method", required=True, choices=methods.names("attack"))
    p.add_argument("--cell-snapshot", action="append", required=True, metavar="CELL=SNAPSHOT",
                   help="a grid cell and its snapshot inside --run, e.g. lr1e-3_steps50_r8=lr1e-3_r8/steps50")
    p.add_argument("--model-name", required=True)
    p.add_argument("--defence", required=True)
    p.add_argument("--attack", required=True)
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    max_memory_argument(p)
    # One --params holding both blocks by name, as every step takes its settings in one flag: evaluate-refusal's and
    # evaluate-capability's own JSON, each checked by the same dataclass, the line copied from `snakemake -n -p` whole.
    _params_argument(p, f'{{"refusal": {{...}}, "capability": {{...}}}}: evaluate-refusal\'s settings '
                        f'({_keys(RefusalParams)}) and evaluate-capability\'s ({_keys(CapabilityParams)})')
    _task_data_argument(p)
    _prefill_answers_argument(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=evaluate_run)
