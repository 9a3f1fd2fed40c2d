"""Harmless requests in harmful-sounding words (families in lookalike.yaml), split by family as they are generated.

The evaluation split holds whole families never trained on (an over-refusal probe: see evaluation.refusal); the
other families go to the alignment split, where safety tuning may answer them (a model's own answers, like the
benign set's), so that refusal is learnt from the harm and not from the word.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import yaml

from tamperlab.errors import UserError

TEMPLATES = Path(__file__).with_name("lookalike.yaml")


def family_prompts(spec: dict[str, Any]) -> list[str]:
    return [pattern.format(x=x) for pattern, x in itertools.product(spec["patterns"], spec["objects"])]


def generate(name: str, seed: int, per_family: int = 10, heldout_fraction: float = 0.5,
             templates: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Up to `per_family` prompts of each family (a seeded sample); a seeded `heldout_fraction` of the families
    (at least one) to the evaluation split, the rest to the alignment split."""
    if not 0 < heldout_fraction <= 1:
        raise UserError(f"datasets.{name}: params.heldout_fraction must be in (0, 1], got {heldout_fraction}")
    families = (templates or yaml.safe_load(TEMPLATES.read_text()))["families"]
    rng = random.Random(f"{seed}:{name}")
    order = sorted(families)
    rng.shuffle(order)
    held = set(order[:max(1, round(len(order) * heldout_fraction))])
    rows = []
    for family in sorted(families):
        prompts = family_prompts(families[family])
        for prompt in rng.sample(prompts, min(per_family, len(prompts))):
            rows.append({"id": f"{name}-{len(rows):04d}", "prompt": prompt, "kind": "benign", "category": "lookalike",
                         "family": family, "source": name,
                         "split": "evaluation" if family in held else "alignment"})
    return rows
