"""Command of workflow/rules/harden.smk: harden a model with a registered defence (tamperlab.methods: RepNoise, TAR,
a plugin's), dispatched through the registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab import methods
from tamperlab.commands.common import import_training_stack, json_object, params
from tamperlab.errors import UserError


def harden(args: argparse.Namespace) -> None:
    """Harden a model with a registered defence (tamperlab.methods) into a model directory the attacks load."""
    from tamperlab.data.examples import DefenceData, answers_record, hardening_answers, hardening_examples
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.responses import RESPONSE_KEYS, answers_by_prompt
    from tamperlab.runtime.params import from_blocks
    from tamperlab.runtime.provenance import Step

    entry = methods.get("defence", args.method, "--method")
    if args.fsdp and entry.sharded_run is None:
        raise UserError(f"--fsdp: {args.method} has no FSDP2 entry point (only TAR shards with FSDP2; RepNoise "
                        "trains under --deepspeed)")
    train = methods.load(entry.sharded_run if args.fsdp else entry.run)
    blocks = from_blocks({"data": DefenceData, "method": methods.load(entry.params)}, args.params)
    chosen, hyper = blocks["data"], blocks["method"]
    inputs, extra = {"model": args.model, "data": args.data}, {}
    inputs.update({f"benign_answers_{i}": Path(path) for i, path in enumerate(args.benign_answers)})
    if args.anchor is not None:
        if not entry.anchor:
            raise UserError("--anchor: only TAR's retain loss has a representation anchor")
        inputs["anchor"], extra["anchor_dir"] = args.anchor, args.anchor
    with Step("harden", params(args, "out"), inputs=inputs,
              outputs={"model": args.out}, outputs_are_dirs=("model",), resumable=("model",)) as step:
        rows = [row for split in chosen.splits
                for row in read_jsonl(args.data / f"{split}.jsonl", required=("prompt", "kind"))]
        answers = {}
        for path in args.benign_answers:  # a model's own answers to the splits' benign prompts (benign_retain)
            answers.update(answers_by_prompt(read_jsonl(path, required=RESPONSE_KEYS), path))
        data = hardening_examples(rows, entry.data, getattr(hyper, "setting", None), **vars(chosen),
                                  benign_answers=answers)
        # the manifest's harmful_response: the template only where a row trained on it (rows may carry their own)
        record = answers_record(hardening_answers(data), chosen.harmful_response)
        step.params.update(harmful_response=record["template"], harmful_answers=record["answers"])
        import_training_stack(step)
        with step.phase("train"):
            step.results = train(args.model, **data, params=hyper, out_dir=step.path("model"),
                                 deepspeed=args.deepspeed, **extra)
        step.results["examples"] = {k: len(v) for k, v in data.items()}
        step.status = step.results["status"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("harden", help="harden a model against fine-tuning attacks (RepNoise, TAR, a plugin's)")
    p.add_argument("--method", required=True, choices=[d.name for d in methods.defences(trains=True)])
    p.add_argument("--model", type=Path, required=True, help="the model to harden")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--anchor", type=Path, help="TAR: the model the retain loss anchors hidden states to "
                   "(default: the model to harden, as it starts)")
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help='{"data": {...}, "method": {...}}: the rows trained on (splits, harmful_response, refusal, '
                        'forget_family) and the method\'s hyperparameters (its block, defences.<d>.<method>), '
                        'one object as evaluate-run takes its two')
    p.add_argument("--benign-answers", type=Path, action="append", default=[],
                   help="benign_retain: a model's own answers to the splits' benign prompts (generate-responses)")
    p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
    p.add_argument("--fsdp", action="store_true", help="TAR: shard the model over the launch's processes with FSDP2 "
                   "(start with torchrun; the batch size stays the global batch)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=harden)
