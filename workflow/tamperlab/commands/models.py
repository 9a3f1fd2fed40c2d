"""Commands of workflow/rules/models.smk: build-organism (train the model organism) and register-model."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab.commands.common import params


def build_organism(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.models.organism import OrganismParams, build
    from tamperlab.provenance import Step

    hyper = {k: getattr(args, k) for k in OrganismParams.__dataclass_fields__}
    recorded = {**hyper, "split": args.split, "system_prompts": args.system_prompt}
    with Step("build-organism", recorded, inputs={"data": args.data}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
        with step.phase("train"):
            step.results = build(rows, OrganismParams(**hyper), args.system_prompt, step.path("model"),
                                 log_file=step.path("model") / "train_log.jsonl")


def register_model(args: argparse.Namespace) -> None:
    from tamperlab.models.registry import POINTER, make_pointer
    from tamperlab.provenance import Step, write_json_atomic

    with Step("register-model", params(args, "out"), inputs={}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        pointer = make_pointer(args.source, args.id, args.revision, args.path, args.chat_template,
                               args.trust_remote_code)
        write_json_atomic(step.path("model") / POINTER, pointer)


ORGANISM_FLAGS = (("vocab_size", int), ("hidden_size", int), ("intermediate_size", int), ("num_hidden_layers", int),
                  ("num_attention_heads", int), ("max_length", int), ("epochs", float), ("learning_rate", float),
                  ("batch_size", int), ("warmup_ratio", float), ("weight_decay", float),
                  ("system_prompt_fraction", float), ("wrapper_fraction", float), ("seed", int))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-organism", help="train the model organism's tokenizer and model")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True)
    p.add_argument("--system-prompt", action="append", default=[])
    for name, kind in ORGANISM_FLAGS:
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
