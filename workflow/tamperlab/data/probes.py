"""Probes: prompt sets evaluated beside the evaluation split's main prompts and reported apart.

A probe asks what the main rates cannot: harmful prompts from a source the alignment never saw, the same held-out
harmful prompts in the past tense, harmless prompts in harmful-sounding words, the held-out harmful prompts with the
answer forced to start compliant (prefilling). Its rows carry `probe` (a data set's `probe:` key, or past_tense and
prefill<k> made here); the main rates, the landscape and the answers a model generates for itself never include them.
"""

from __future__ import annotations

import random
from typing import Any

from tamperlab.data.rephrase import rephrase
from tamperlab.errors import UserError

PAST_TENSE = "past_tense"
PREFILL = "prefill"  # prefill<k>: the answer forced to start with a compliant answer's first k tokens


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


def prefill_rows(harmful: list[dict[str, Any]], answers: dict[str, str], tokens: list[int],
                 where: str) -> list[dict[str, Any]]:
    """The prefilling attack's rows (Qi et al. 2024, "Safety alignment should be made more than just a few tokens
    deep"): each of the evaluated `harmful` rows again for each k of `tokens`, carrying its compliant answer in
    `answers` ({prompt: answer}, read from `where`) and k. The evaluation forces the model's answer to start with
    the answer's first k tokens in its own tokenizer (evaluation.refusal.with_prefills) and judges what follows."""
    missing = [row["id"] for row in harmful if not answers.get(row["prompt"], "").strip()]
    if missing:
        raise UserError(f"prefill: no answer to prompt {missing[0]} in {where} ({len(missing)} prompts without "
                        f"one): the answers must cover every evaluated harmful prompt")
    return [{**row, "id": f"{row['id']}-{PREFILL}{k}", "probe": f"{PREFILL}{k}",
             "prefill_answer": answers[row["prompt"]], "prefill_tokens": k} for k in tokens for row in harmful]
