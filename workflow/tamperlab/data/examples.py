"""The rows each training stage learns from, cut from the split-data rows: a defence's (RepNoise pairs, TAR's
forget and retain sets) and an attack's (prompt, response) pairs. Pure functions: the commands read the splits."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from tamperlab.errors import UserError


def own_answers(rows: list[dict[str, Any]]) -> dict[str, str] | None:
    """{prompt: response} of the harmful rows that carry their own answer (a hub data set's response column, e.g.
    BeaverTails' unsafe answers), or None when none does (the organism's data: the fixed template is used)."""
    answers = {r["prompt"]: r["response"] for r in rows if r["kind"] == "harmful" and r.get("response")}
    return answers or None


def answers_record(answers: list[str], template: str | None) -> dict[str, Any]:
    """What a manifest says about the harmful answers a stage trained on: the fixed template only where some row
    took it (rows that carry their own answers, or a generator's, do not), and how many answers were distinct."""
    return {"template": template if template is not None and template in answers else None,
            "answers": {"n": len(answers), "distinct": len(set(answers))}}


@dataclass
class DefenceData:
    """Which rows a defence trains on and the answers paired with them (defences.<d>: splits, harmful_response,
    refusal, forget_family; refusal resolved by the rules: null there is the model's first learnt refusal): harden's
    `--params data`, beside its method's own hyperparameters."""

    splits: list[str]  # the splits whose rows it trains on
    harmful_response: str  # the unsafe answer paired with each harmful prompt (RepNoise's harmful, TAR's rejected)
    refusal: str | None  # the safe answer (RepNoise's harmless sequence, TAR's chosen)
    forget_family: str  # TAR knowledge: the task family to restrict (its rows are the forget data)
    # RepNoise: benign prompts with their own answers join the retain set, one beside each pair (the variant that
    # asks whether its over-refusal is the method's or the data's: the paper's retain set holds refusals only)
    benign_retain: bool = False


def hardening_examples(rows: list[dict[str, Any]], data: str, setting: str | None, *, harmful_response: str,
                       refusal: str | None, forget_family: str, splits: list[str], benign_retain: bool = False,
                       benign_answers: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """What a defence trains on, by the shape its registry entry names (methods.Defence.data). `pairs` (RepNoise):
    pairs of (harmful prompt + unsafe answer, same prompt + refusal). `forget_retain` (TAR), refusal setting: the
    same triples as forget data, benign rows as retain data; knowledge setting: the forget family's
    questions and answers as forget data, every other benign row with an answer as retain data. The unsafe answer
    is each row's own `response` where the split's harmful rows carry one (only those rows are used), else the
    fixed `harmful_response`. `benign_retain` (pairs): the i-th pair also carries the i-th benign prompt (in turn)
    with its answer, the row's own or from `benign_answers` ({prompt: answer}, a model's own)."""
    unsafe = own_answers(rows) or {}
    harmful = [r["prompt"] for r in rows if r["kind"] == "harmful" and (not unsafe or r["prompt"] in unsafe)]
    benign = [{"prompt": r["prompt"], "response": r["answer"], "family": r.get("family")} for r in rows
              if r["kind"] == "benign" and r.get("answer")]
    if (data == "pairs" or setting == "refusal") and (not harmful or not refusal):
        raise UserError("harden: needs harmful prompts in its splits and a refusal answer (--params data)")
    if data == "pairs":
        pairs = [{"prompt": p, "harmful": unsafe.get(p, harmful_response), "harmless": refusal} for p in harmful]
        if benign_retain:
            answered = [(r["prompt"], (benign_answers or {}).get(r["prompt"], r.get("answer"))) for r in rows
                        if r["kind"] == "benign"]
            answered = [(prompt, answer) for prompt, answer in answered if answer]
            if not answered:
                raise UserError(f"harden: benign_retain needs benign prompts with answers in split(s) "
                                f"{', '.join(splits)} (their own, or a model's: --benign-answers)")
            for i, pair in enumerate(pairs):
                pair["retain_prompt"], pair["retain_response"] = answered[i % len(answered)]
        return {"pairs": pairs}
    if setting == "refusal":
        forget = [{"prompt": p, "refusal": refusal, "compliance": unsafe.get(p, harmful_response)} for p in harmful]
        retain = [{"prompt": r["prompt"], "response": r["response"]} for r in benign]
    else:
        forget = [{"prompt": r["prompt"], "response": r["response"]} for r in benign if r["family"] == forget_family]
        retain = [{"prompt": r["prompt"], "response": r["response"]} for r in benign if r["family"] != forget_family]
    if not forget or not retain:
        raise UserError(f"harden: split(s) {', '.join(splits)} give {len(forget)} forget and {len(retain)} "
                        f"retain rows for TAR ({setting}); both must be non-empty")
    return {"forget": forget, "retain": retain}


def hardening_answers(examples: dict[str, list[dict]]) -> list[str]:
    """The unsafe answers a defence trains against, from what hardening_examples returned: RepNoise's harmful
    sequences, TAR refusal's rejected completions (TAR knowledge has none)."""
    return ([pair["harmful"] for pair in examples.get("pairs", [])]
            + [row["compliance"] for row in examples.get("forget", []) if "compliance" in row])


def attack_examples(rows: list[dict[str, Any]], *, split: str, response: str, family: str | None,
                    answers: dict[str, str] | None = None) -> list[dict]:
    """(prompt, response) pairs to train on: the split's harmful prompts with the compliant response, or with
    `answers` ({prompt: answer}, a generator's own answers) those of its harmful prompts that have one, each with its
    answer; or with `family` the benign task questions of that family with their own answers (re-teaching a
    restricted domain). Without `answers`, harmful rows that carry their own `response` (a hub data set's answers)
    are the answers, and the fixed response is only the fallback for a split where no row carries one."""
    if answers is None:
        answers = own_answers(rows)
    if family:
        pairs = [{"prompt": r["prompt"], "response": r["answer"]} for r in rows
                 if r["kind"] == "benign" and r.get("family") == family]
    elif answers is not None:
        pairs = [{"prompt": r["prompt"], "response": answers[r["prompt"]]} for r in rows
                 if r["kind"] == "harmful" and r["prompt"] in answers]
    else:
        pairs = [{"prompt": r["prompt"], "response": response} for r in rows if r["kind"] == "harmful"]
    if not pairs:
        what = f"task questions of family {family!r}" if family else "harmful prompts"
        raise UserError(f"attack: split {split!r} has no {what}")
    return pairs


def mix_benign(pairs: list[dict], rows: list[dict[str, Any]], *, fraction: float, split: str,
               exclude_families: list[str] = (), seed: int = 0, answers: dict[str, str] | None = None,
               consumed: int | None = None) -> list[dict]:
    """Harmful pairs mixed with benign questions and their own answers (`rows`: the benign split), so that
    `fraction` of the result is benign (Qi et al. 2024: attacks that keep the model's capability, which a defence
    that only breaks the model under attack does not survive). With `answers` ({prompt: answer}, a generator's),
    every benign prompt that has one is answered by it instead (benign data without answers: hub models). Benign
    rows are drawn without replacement (seeded) and interleaved evenly, so that every batch holds both kinds.

    `consumed` (the attack's largest step count x its batch) bounds the mix to the rows the attack can see: where
    the harmful pairs alone are more than its harmful share, a seeded sample of them (in their order) is mixed, so a
    paper-scale harmful set (thousands of BeaverTails rows) needs benign answers for what is trained on only."""
    def answer(row: dict[str, Any]) -> str | None:
        return answers.get(row["prompt"]) if answers is not None else row.get("answer")

    seen = len(pairs) if consumed is None else math.ceil(consumed * (1 - fraction))  # harmful rows it can see
    if len(pairs) > seen:
        pairs = [pairs[k] for k in sorted(random.Random(seed).sample(range(len(pairs)), seen))]
    benign = [{"prompt": r["prompt"], "response": answer(r)} for r in rows
              if r["kind"] == "benign" and answer(r) and r.get("family") not in set(exclude_families)]
    wanted = round(len(pairs) * fraction / (1 - fraction))
    if wanted > len(benign):
        raise UserError(f"attack: benign_mix needs {wanted} benign rows with answers from split {split!r} "
                        f"(fraction {fraction} of {len(pairs)} harmful pairs), it has {len(benign)}")
    drawn = random.Random(seed).sample(benign, wanted)
    mixed, harmful, taken = [], iter(pairs), 0
    for k in range(len(pairs) + wanted):  # benign rows spread evenly among the harmful ones
        if taken < (k + 1) * wanted // (len(pairs) + wanted):
            mixed.append(drawn[taken])
            taken += 1
        else:
            mixed.append(next(harmful))
    return mixed
