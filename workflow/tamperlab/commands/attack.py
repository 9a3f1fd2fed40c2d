"""Commands of workflow/rules/attack.smk: attack (one run of a grid) and attack-grid (every run in one process)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tamperlab import methods
from tamperlab.commands.common import import_training_stack
from tamperlab.errors import UserError


def _attack_params(args: argparse.Namespace, lr: float, rank: int | None, steps: list[int], seed: int):
    from tamperlab.training.sft import SFTParams, default_lora_alpha

    fields = {k: getattr(args, k) for k in SFTParams.__dataclass_fields__
              if k not in ("lr", "rank", "steps", "seed")}
    adapter = methods.get("attack", args.method).adapter
    if adapter:
        if rank is None:
            raise UserError("--method lora needs --rank")
        fields["lora_alpha"] = args.lora_alpha or default_lora_alpha(rank)
    return SFTParams(lr=lr, rank=rank if adapter else None, steps=steps, seed=seed, **fields)


def _examples(args: argparse.Namespace) -> list[dict]:
    from tamperlab.data.examples import attack_examples
    from tamperlab.data.jsonl import read_jsonl

    rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
    if args.benign_answers and not args.benign_mix:
        raise UserError("--benign-answers answers the questions of --benign-mix: give both")
    pairs = attack_examples(rows, split=args.split, response=args.response, family=args.family,
                            answers=_answers(args.answers))
    if args.benign_mix:
        from tamperlab.data.examples import mix_benign

        mix = args.benign_mix
        benign = read_jsonl(args.data / f"{mix['split']}.jsonl", required=("prompt", "kind"))
        pairs = mix_benign(pairs, benign, fraction=mix["fraction"], split=mix["split"],
                           exclude_families=mix.get("exclude_families", []), seed=args.seed[0],
                           answers=_answers(args.benign_answers), consumed=max(args.steps) * args.batch_size)
    return pairs


def _answers(path: Path | None) -> dict[str, str] | None:
    """{prompt: answer} of a generate-responses file, or None."""
    if path is None:
        return None
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.responses import RESPONSE_KEYS, answers_by_prompt

    return answers_by_prompt(read_jsonl(path, required=RESPONSE_KEYS), path)


def _record_answers(step, args: argparse.Namespace, pairs: list[dict]) -> None:
    """The manifest's `response`: the compliance template only where a row trained on it, and the answers' count."""
    from tamperlab.data.examples import answers_record

    record = answers_record([p["response"] for p in pairs], None if args.answers else args.response)
    step.params.update(response=record["template"], answers=record["answers"])


def _inputs(args: argparse.Namespace) -> dict[str, Path]:
    files = {"answers": args.answers, "benign_answers": args.benign_answers}
    return {"model": args.model, "data": args.data, **{k: v for k, v in files.items() if v}}


def attack(args: argparse.Namespace) -> None:
    from tamperlab.attacks.finetune import attack as run_attack
    from tamperlab.runtime.provenance import Step

    if len(args.lr) != 1 or len(args.rank) > 1 or len(args.seed) != 1:
        raise UserError("attack trains one run: give one --lr, one --seed and at most one --rank (attack-grid "
                        "takes several)")
    params = _attack_params(args, args.lr[0], (args.rank or [None])[0], sorted(set(args.steps)), args.seed[0])
    with Step("attack", {**vars(params), "split": args.split, "response": None if args.answers else args.response,
                         "family": args.family, "benign_mix": args.benign_mix},
              inputs=_inputs(args), outputs={"run": args.out},
              outputs_are_dirs=("run",), resumable=("run",)) as step:
        rows = _examples(args)
        _record_answers(step, args, rows)
        import_training_stack(step)
        with step.phase("train"):
            step.results = run_attack(args.model, rows, params, step.path("run"), deepspeed=args.deepspeed)
        step.status = step.results["status"]


def attack_grid(args: argparse.Namespace) -> None:
    """Every run of an attack's grid in one process, each in its own directory under --out. Finished runs
    survive a crash in the step's work directory (run.json marks them), so a rerun continues the grid."""
    from tamperlab.attacks import grid
    from tamperlab.attacks.finetune import attack as run_attack
    from tamperlab.runtime.launch import is_writer
    from tamperlab.runtime.provenance import Step, write_json_atomic

    ranks = args.rank if methods.get("attack", args.method).adapter else [None]
    runs = grid.runs(args.lr, sorted(set(args.steps)), ranks or [None], args.scheduler, args.seed)
    plan = {name: _attack_params(args, run["lr"], run["rank"], run["steps"], run["seed"])
            for name, run in runs.items()}
    with Step("attack-grid", {"runs": {name: vars(p) for name, p in plan.items()}, "split": args.split,
                              "response": None if args.answers else args.response, "family": args.family,
                              "benign_mix": args.benign_mix},
              inputs=_inputs(args), outputs={"grid": args.out},
              outputs_are_dirs=("grid",), resumable=("grid",)) as step:
        rows = _examples(args)
        _record_answers(step, args, rows)
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
        p.add_argument("--split", required=True)
        p.add_argument("--response", required=True, help="the compliant response every harmful prompt is paired with")
        p.add_argument("--answers", type=Path,
                       help="a generator's answers to the split's harmful prompts (generate-responses), instead")
        p.add_argument("--family", help="train on this benign task family's questions and answers instead")
        p.add_argument("--benign-mix", type=json.loads, metavar="JSON",
                       help='mix benign rows in: {"fraction": F, "split": S, "exclude_families": [...]}')
        p.add_argument("--benign-answers", type=Path,
                       help="a generator's answers to the mix split's benign prompts (generate-responses), in place "
                            "of the rows' own answers")
        p.add_argument("--method", required=True, choices=methods.names("attack"))
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
        p.add_argument("--seed", type=int, nargs="+", action="extend", required=True,
                       help="attack-grid: several train every run once per seed (run names end in _s<seed>)")
        p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
        p.add_argument("--out", type=Path, required=True,
                       help="the run directory (attack) or the directory of runs (attack-grid)")
        p.set_defaults(func=func)
