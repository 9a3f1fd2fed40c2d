"""Commands of workflow/rules/attack.smk: attack (one run of a grid) and attack-grid (every run in one process)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tamperlab import methods
from tamperlab.commands.common import import_training_stack, json_object
from tamperlab.errors import UserError


def _spec(args: argparse.Namespace):
    """The attack's settings (--params: its config block), validated by one dataclass."""
    from tamperlab.attacks.spec import AttackSpec
    from tamperlab.runtime.params import from_params

    return from_params(AttackSpec, args.params)


def _entry_point(spec):
    """The attack method's training entry point, as the method registry names it (imported now)."""
    return methods.load(methods.get("attack", spec.method, "--params method").run)


def _examples(args: argparse.Namespace, spec) -> list[dict]:
    from tamperlab.data.examples import attack_examples
    from tamperlab.data.jsonl import read_jsonl

    rows = read_jsonl(args.data / f"{spec.split}.jsonl", required=("prompt", "kind"))
    if args.benign_answers and not spec.benign_mix:
        raise UserError("--benign-answers answers the questions of benign_mix (--params): give both")
    pairs = attack_examples(rows, split=spec.split, response=spec.response, family=spec.family,
                            answers=_answers(args.answers))
    if spec.benign_mix:
        from tamperlab.data.examples import mix_benign

        mix = spec.benign_mix
        benign = read_jsonl(args.data / f"{mix['split']}.jsonl", required=("prompt", "kind"))
        pairs = mix_benign(pairs, benign, fraction=mix["fraction"], split=mix["split"],
                           exclude_families=mix.get("exclude_families", []), seed=spec.first_seed(),
                           answers=_answers(args.benign_answers),
                           consumed=spec.largest_steps() * spec.batch_size)
    return pairs


def _answers(path: Path | None) -> dict[str, str] | None:
    """{prompt: answer} of a generate-responses file, or None."""
    if path is None:
        return None
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.responses import RESPONSE_KEYS, answers_by_prompt

    return answers_by_prompt(read_jsonl(path, required=RESPONSE_KEYS), path)


def _record_answers(step, args: argparse.Namespace, spec, pairs: list[dict]) -> None:
    """The manifest's `response`: the compliance template only where a row trained on it, and the answers' count."""
    from tamperlab.data.examples import answers_record

    record = answers_record([p["response"] for p in pairs], None if args.answers else spec.response)
    step.params.update(response=record["template"], answers=record["answers"])


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    files = {"answers": args.answers, "benign_answers": args.benign_answers}
    return {"model": args.model, "data": args.data, **{k: v for k, v in files.items() if v}}


def _data_record(args: argparse.Namespace, spec) -> dict:
    """What the manifest records of the rows trained on, beside the runs' SFTParams."""
    return {"split": spec.split, "response": None if args.answers else spec.response, "family": spec.family,
            "benign_mix": spec.benign_mix}


def attack(args: argparse.Namespace) -> None:
    from tamperlab.runtime.provenance import Step

    spec = _spec(args)
    run_attack = _entry_point(spec)
    runs = spec.runs()
    if len(runs) != 1:
        raise UserError("attack trains one run: give one lr, one seed and at most one rank in --params (attack-grid "
                        "takes several)")
    params = spec.run_params(next(iter(runs.values())))
    with Step("attack", {**vars(params), **_data_record(args, spec)},
              inputs=_inputs(args), outputs={"run": args.out},
              outputs_are_dirs=("run",), resumable=("run",)) as step:
        rows = _examples(args, spec)
        _record_answers(step, args, spec, rows)
        import_training_stack(step)
        with step.phase("train"):
            step.results = run_attack(args.model, rows, params, step.path("run"), deepspeed=args.deepspeed)
        step.status = step.results["status"]


def attack_grid(args: argparse.Namespace) -> None:
    """Every run of an attack's grid in one process, each in its own directory under --out. Finished runs
    survive a crash in the step's work directory (run.json marks them), so a rerun continues the grid."""
    from tamperlab.runtime.launch import is_writer
    from tamperlab.runtime.provenance import Step, write_json_atomic

    spec = _spec(args)
    run_attack = _entry_point(spec)
    plan = {name: spec.run_params(run) for name, run in spec.runs().items()}
    with Step("attack-grid", {"runs": {name: vars(p) for name, p in plan.items()}, **_data_record(args, spec)},
              inputs=_inputs(args), outputs={"grid": args.out},
              outputs_are_dirs=("grid",), resumable=("grid",)) as step:
        rows = _examples(args, spec)
        _record_answers(step, args, spec, rows)
        import_training_stack(step)
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


def register(sub: argparse._SubParsersAction) -> None:
    for name, func, help_text in (
        ("attack", attack, "fine-tune on harmful prompts: one run (lr, rank), a snapshot at each steps value"),
        ("attack-grid", attack_grid, "every run of an attack's grid (each lr x rank) in one process"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", type=Path, required=True, help="the (defended) model to attack")
        p.add_argument("--data", type=Path, required=True, help="the split-data directory")
        p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                       help="the attack's config block (attacks.<a>: method, grid, split, response, family, "
                            "benign_mix, lora_alpha, batch_size, ...; attack: its run's lr, rank and seed only)")
        p.add_argument("--answers", type=Path,
                       help="a generator's answers to the split's harmful prompts (generate-responses), instead")
        p.add_argument("--benign-answers", type=Path,
                       help="a generator's answers to the mix split's benign prompts (generate-responses), in place "
                            "of the rows' own answers")
        p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
        p.add_argument("--out", type=Path, required=True,
                       help="the run directory (attack) or the directory of runs (attack-grid)")
        p.set_defaults(func=func)
