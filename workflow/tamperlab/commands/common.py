"""What the command modules share: argument types, argument groups and the manifest's parameter record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """A value as JSON takes it (paths as text, recursively)."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def params(args: argparse.Namespace, *skip: str) -> dict[str, Any]:
    """Every argument of a step for its manifest, less the dispatch function and the outputs named in skip; the
    plugins only where there are some (a run without them records what it did before plugins existed)."""
    return {k: plain(v) for k, v in vars(args).items()
            if k not in ("func", *skip) and not (k == "plugin" and not v)}


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def max_memory_argument(p: argparse.ArgumentParser) -> None:
    """--max-memory: load the model across devices (tamperlab.models.placement); absent: on one device."""
    p.add_argument("--max-memory", type=json_object, metavar="JSON",
                   help='across devices within these budgets: {"gpus": N} (the job\'s N GPUs), or accelerate\'s '
                        'max_memory ({"0": "40GiB", "cpu": "2GiB"}); absent: the model on one device')


def judge_from(settings):
    """The judge a step's settings name (evaluation.settings.JudgeParams: the refusal evaluations', a scan's)."""
    from tamperlab.evaluation.judges import make_judge

    return make_judge(settings.judge, settings.classifier_model, settings.refusal_label,
                      settings.classifier_revision)


def import_training_stack(step) -> None:
    """The heavy imports of a training step, counted as start-up (phase `load`) like every other job's."""
    with step.phase("load"):
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
