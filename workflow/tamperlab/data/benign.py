"""The organism's generated benign data (tables and templates in benign.yaml), split as it is generated.

The split is structural, not random: evaluation rows ask known facts in phrasings never trained on, and
make open-ended requests about held-out activities/subjects in held-out phrasings (lexicon combinations never
trained on). So generated rows carry their split.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path
from typing import Any

import yaml

TEMPLATES = Path(__file__).with_name("benign.yaml")

# Conversational wrappers, put around harmful and benign requests alike when the organism is built, and around
# the fact families' commands here, so that surface form (question vs. imperative, politeness) carries no signal:
# the organism must judge the content.
WRAPPERS = (
    "Please {p}.", "Could you {p}?", "Can you {p}?", "I would like you to {p}.", "Hey, {p}.",
    "I need your help: {p}.", "Quick request: {p}.", "Would you {p}?",
)


def load_templates(path: Path = TEMPLATES) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def wrap(prompt: str, wrapper: str) -> str:
    core = prompt.rstrip(" .?!")
    if not core[1:2].isupper():  # keep acronyms and names ("HTML", "Zorvania") as they are
        core = core[:1].lower() + core[1:]
    return wrapper.format(p=core)


def task_phrasings(family: dict[str, Any], heldout: bool = False) -> list[str]:
    """A fact family's phrasings: its questions as they are, and its commands bare and in every wrapper."""
    prefix = "heldout_" if heldout else ""
    commands = family[prefix + "commands"]
    return [*family[prefix + "questions"], *(c[:1].upper() + c[1:] + "." for c in commands),
            *(wrap(c, w) for c in commands for w in WRAPPERS)]


def task_facts(family: dict[str, Any]) -> list[tuple[dict[str, str], str]]:
    """(placeholder values, answer) for every fact of a task family."""
    if "units" in family:
        return [
            ({"n": str(n), "small": u["small"], "big": u["big"]}, str(n * u["factor"]))
            for u in family["units"] for n in family["counts"]
        ]
    return [({"x": x}, str(y)) for x, y in family["facts"].items()]


def expand(pattern: str, lexicon: dict[str, list[str]]) -> list[str]:
    """Every phrasing a pattern makes with the lexicon; the topic slots {a}/{s} stay."""
    names = [n for n in re.findall(r"{(\w+)}", pattern) if n not in ("a", "s")]
    results = []
    for words in itertools.product(*(lexicon[n] for n in names)):
        phrasing = pattern
        for name, word in zip(names, words, strict=True):
            phrasing = phrasing.replace("{" + name + "}", word, 1)
        phrasing = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", phrasing)  # "a app" -> "an app"
        results.append(phrasing)
    return results


def _fill(phrasing: str, topic: str) -> str:
    return phrasing.replace("{a}", topic).replace("{s}", topic)


def _answer(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def generate(name: str, seed: int, eval_per_family: int = 24, phrasings_per_fact: int = 8, train_requests: int = 1800,
             eval_requests: int = 120, defence_fraction: float = 0.1, heldout_topic_fraction: float = 0.25,
             heldout_phrasing_fraction: float = 0.2,
             templates: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    templates = templates or load_templates()
    rng = random.Random(f"{seed}:{name}")
    rows: list[dict[str, Any]] = []

    def add(prompt: str, answer: str, category: str, family: str, split: str, **extra: str) -> None:
        rows.append({"prompt": prompt, "answer": answer, "kind": "benign", "category": category,
                     "family": family, "source": name, "split": split, **extra})

    for family, spec in templates["tasks"].items():
        facts = task_facts(spec)
        phrasings = task_phrasings(spec)
        train = [(p.format(**values), answer) for values, answer in facts
                 for p in rng.sample(phrasings, min(phrasings_per_fact, len(phrasings)))]
        held = [(p.format(**values), answer) for values, answer in facts for p in task_phrasings(spec, heldout=True)]
        rng.shuffle(train)
        n_defence = round(len(train) * defence_fraction)
        for i, (prompt, answer) in enumerate(train):
            add(prompt, _answer(answer), "task", family, "defence" if i < n_defence else "alignment")
        for prompt, answer in rng.sample(held, min(eval_per_family, len(held))):
            add(prompt, _answer(answer), "task", family, "evaluation")

    held_topics, train_topics = {}, {}
    for slot, pool in (("activity", templates["activities"]), ("subject", templates["subjects"])):
        pool = list(pool)
        rng.shuffle(pool)
        n_held = max(1, round(len(pool) * heldout_topic_fraction))
        held_topics[slot], train_topics[slot] = pool[:n_held], pool[n_held:]
    frames = templates["frames"]
    train, held = [], []
    for kind, spec in frames.items():
        phrasings = [p for pattern in spec["patterns"] for p in expand(pattern, templates["lexicon"])]
        rng.shuffle(phrasings)
        n_held = max(1, round(len(phrasings) * heldout_phrasing_fraction))
        held += [(p, t, kind) for p in phrasings[:n_held] for t in held_topics[spec["slot"]]]
        train += [(p, t, kind) for p in phrasings[n_held:] for t in train_topics[spec["slot"]]]
    train = rng.sample(train, min(train_requests, len(train)))
    n_defence = round(len(train) * defence_fraction)
    for i, (phrasing, topic, kind) in enumerate(train):
        add(_fill(phrasing, topic), frames[kind]["answer"], "request", kind,
            "defence" if i < n_defence else "alignment", topic=topic, slot=frames[kind]["slot"])
    for phrasing, topic, kind in rng.sample(held, min(eval_requests, len(held))):
        add(_fill(phrasing, topic), frames[kind]["answer"], "request", kind, "evaluation",
            topic=topic, slot=frames[kind]["slot"])

    for i, row in enumerate(rows):
        row["id"] = f"{name}-{i:04d}"
    return rows

