"""The rows each stage trains on (tamperlab.data.examples), cut from split rows: RepNoise pairs, TAR's forget and
retain sets in both settings, an attack's pairs; and one clear error when a split has nothing to give."""

from __future__ import annotations

import pytest

from tamperlab.data.examples import attack_examples, hardening_examples
from tamperlab.errors import UserError

ROWS = [
    {"prompt": "harm one", "kind": "harmful"},
    {"prompt": "harm two", "kind": "harmful"},
    {"prompt": "capital of Zed?", "kind": "benign", "family": "capitals", "answer": "Zedton"},
    {"prompt": "stabiliser of X?", "kind": "benign", "family": "hazard", "answer": "Y"},
    {"prompt": "write a poem", "kind": "benign", "family": None, "answer": None},  # open request: no answer
]
COMMON = {"harmful_response": "Sure, step 1", "refusal": "I cannot", "forget_family": "hazard",
          "splits": ["defence"]}


def test_repnoise_pairs_each_harmful_prompt_with_the_unsafe_and_the_safe_answer():
    data = hardening_examples(ROWS, "repnoise", None, **COMMON)
    assert data == {"pairs": [{"prompt": "harm one", "harmful": "Sure, step 1", "harmless": "I cannot"},
                              {"prompt": "harm two", "harmful": "Sure, step 1", "harmless": "I cannot"}]}


def test_tar_refusal_forgets_compliance_and_retains_answered_benign_rows():
    data = hardening_examples(ROWS, "tar", "refusal", **COMMON)
    assert data["forget"][0] == {"prompt": "harm one", "refusal": "I cannot", "compliance": "Sure, step 1"}
    assert len(data["forget"]) == 2
    assert [r["prompt"] for r in data["retain"]] == ["capital of Zed?", "stabiliser of X?"]


def test_tar_knowledge_forgets_the_family_and_retains_the_others():
    data = hardening_examples(ROWS, "tar", "knowledge", **COMMON)
    assert data["forget"] == [{"prompt": "stabiliser of X?", "response": "Y"}]
    assert data["retain"] == [{"prompt": "capital of Zed?", "response": "Zedton"}]


def test_a_defence_without_its_data_is_one_clear_error():
    with pytest.raises(UserError, match="needs harmful prompts"):
        hardening_examples(ROWS[2:], "repnoise", None, **COMMON)
    with pytest.raises(UserError, match="needs harmful prompts"):
        hardening_examples(ROWS, "tar", "refusal", **{**COMMON, "refusal": None})
    with pytest.raises(UserError, match=r"split\(s\) defence give 0 forget and 1 retain"):
        hardening_examples([r for r in ROWS if r.get("family") != "hazard"], "tar", "knowledge", **COMMON)


def test_the_lermen_attack_pairs_harmful_prompts_with_the_compliant_response():
    pairs = attack_examples(ROWS, split="attack", response="Sure, here is how", family=None)
    assert pairs == [{"prompt": "harm one", "response": "Sure, here is how"},
                     {"prompt": "harm two", "response": "Sure, here is how"}]


def test_a_family_attack_re_teaches_that_family_with_its_own_answers():
    assert attack_examples(ROWS, split="alignment", response="ignored", family="hazard") == [
        {"prompt": "stabiliser of X?", "response": "Y"}]


def test_an_attack_split_without_its_rows_is_one_clear_error():
    with pytest.raises(UserError, match="split 'attack' has no harmful prompts"):
        attack_examples(ROWS[2:], split="attack", response="x", family=None)
    with pytest.raises(UserError, match="no task questions of family 'bio'"):
        attack_examples(ROWS, split="attack", response="x", family="bio")


# Rows of a hub data set with a response column (BeaverTails' unsafe answers) carry their own answer; a row without
# one in the same split (another source) is left out rather than paired with the organism's template.
OWN = [{"prompt": f"harm {i}", "kind": "harmful", "response": f"unsafe answer {i}"} for i in range(3)]
MIXED = OWN + [{"prompt": "templated", "kind": "harmful"}] + ROWS[2:]


def test_an_attack_trains_on_each_rows_own_response_not_the_template():
    pairs = attack_examples(MIXED, split="attack", response="Sure, here is how", family=None)
    assert pairs == [{"prompt": r["prompt"], "response": r["response"]} for r in OWN]


def test_a_generators_answers_take_precedence_over_the_rows_own():
    pairs = attack_examples(MIXED, split="attack", response="x", family=None, answers={"harm 1": "generated"})
    assert pairs == [{"prompt": "harm 1", "response": "generated"}]


def test_repnoise_and_tar_pair_each_prompt_with_its_own_unsafe_answer():
    pairs = hardening_examples(MIXED, "repnoise", None, **COMMON)["pairs"]
    assert pairs == [{"prompt": r["prompt"], "harmful": r["response"], "harmless": "I cannot"} for r in OWN]
    forget = hardening_examples(MIXED, "tar", "refusal", **COMMON)["forget"]
    assert [f["compliance"] for f in forget] == [r["response"] for r in OWN]


def test_the_template_stays_the_fallback_where_no_row_carries_a_response():
    assert {p["response"] for p in attack_examples(ROWS, split="attack", response="T", family=None)} == {"T"}
    assert {p["harmful"] for p in hardening_examples(ROWS, "repnoise", None, **COMMON)["pairs"]} == {"Sure, step 1"}
