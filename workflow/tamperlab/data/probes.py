"""Probes: prompt sets evaluated beside the evaluation split's main prompts and reported apart.

A probe asks what the main rates cannot: harmful prompts from a source the alignment never saw, the same held-out
harmful prompts in the past tense, harmless prompts in harmful-sounding words. Its rows carry `probe` (a data set's
`probe:` key, or past_tense made here); the main rates, the landscape and the answers a model generates for itself
never include them.
"""

from __future__ import annotations

import random
from typing import Any

from tamperlab.data.rephrase import rephrase

PAST_TENSE = "past_tense"


def is_probe(row: dict[str, Any]) -> bool:
    return bool(row.get("probe"))


def probe_rows(rows: list[dict[str, Any]], harmful: list[dict[str, Any]], limit: int | None, seed: int,
               past_tense: bool) -> list[dict[str, Any]]:
    """The probes' rows of a split: of each probe a seeded sample of `limit` (null: all), in split order; with
    `past_tense`, each of the evaluated `harmful` rows asked again in the past tense (in templates that alignment
    never trains on: data.rephrase)."""
    by_probe: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if is_probe(row):
            by_probe.setdefault(row["probe"], []).append(row)
    chosen = []
    for name, members in sorted(by_probe.items()):
        if limit and limit < len(members):
            keep = {r["id"] for r in random.Random(f"{seed}:{name}").sample(members, limit)}
            members = [r for r in members if r["id"] in keep]
        chosen += members
    if past_tense:
        chosen += [{**row, "id": f"{row['id']}-{PAST_TENSE}", "probe": PAST_TENSE,
                    "prompt": rephrase(row["prompt"], PAST_TENSE, heldout=True)} for row in harmful]
    return chosen
