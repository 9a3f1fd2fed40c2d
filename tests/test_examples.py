"""The rows each stage trains on (tamperlab.data.examples), cut from split rows: RepNoise pairs, TAR's forget and
retain sets in both settings, an attack's pairs; and one clear error when a split has nothing to give."""

from __future__ import annotations

import json

import pytest

from tamperlab.data.examples import answers_record, attack_examples, hardening_answers, hardening_examples
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
    data = hardening_examples(ROWS, "pairs", None, **COMMON)
    assert data == {"pairs": [{"prompt": "harm one", "harmful": "Sure, step 1", "harmless": "I cannot"},
                              {"prompt": "harm two", "harmful": "Sure, step 1", "harmless": "I cannot"}]}


def test_tar_refusal_forgets_compliance_and_retains_answered_benign_rows():
    data = hardening_examples(ROWS, "forget_retain", "refusal", **COMMON)
    assert data["forget"][0] == {"prompt": "harm one", "refusal": "I cannot", "compliance": "Sure, step 1"}
    assert len(data["forget"]) == 2
    assert [r["prompt"] for r in data["retain"]] == ["capital of Zed?", "stabiliser of X?"]


def test_tar_knowledge_forgets_the_family_and_retains_the_others():
    data = hardening_examples(ROWS, "forget_retain", "knowledge", **COMMON)
    assert data["forget"] == [{"prompt": "stabiliser of X?", "response": "Y"}]
    assert data["retain"] == [{"prompt": "capital of Zed?", "response": "Zedton"}]


def test_a_defence_without_its_data_is_one_clear_error():
    with pytest.raises(UserError, match="needs harmful prompts"):
        hardening_examples(ROWS[2:], "pairs", None, **COMMON)
    with pytest.raises(UserError, match="needs harmful prompts"):
        hardening_examples(ROWS, "forget_retain", "refusal", **{**COMMON, "refusal": None})
    with pytest.raises(UserError, match=r"split\(s\) defence give 0 forget and 1 retain"):
        hardening_examples([r for r in ROWS if r.get("family") != "hazard"], "forget_retain", "knowledge", **COMMON)


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
    pairs = hardening_examples(MIXED, "pairs", None, **COMMON)["pairs"]
    assert pairs == [{"prompt": r["prompt"], "harmful": r["response"], "harmless": "I cannot"} for r in OWN]
    forget = hardening_examples(MIXED, "forget_retain", "refusal", **COMMON)["forget"]
    assert [f["compliance"] for f in forget] == [r["response"] for r in OWN]


def test_the_template_stays_the_fallback_where_no_row_carries_a_response():
    assert {p["response"] for p in attack_examples(ROWS, split="attack", response="T", family=None)} == {"T"}
    assert {p["harmful"] for p in hardening_examples(ROWS, "pairs", None, **COMMON)["pairs"]} == {"Sure, step 1"}


# --- benign mixing (Qi et al. 2024's capability-preserving attacks) -------------------------------------------


def _benign_rows(n: int, family: str = "capital") -> list[dict]:
    return [{"prompt": f"benign {family} {k}", "kind": "benign", "answer": f"answer {k}", "family": family}
            for k in range(n)]


def test_benign_mix_gives_the_fraction_spread_evenly_and_keeps_every_harmful_pair_in_order():
    from tamperlab.data.examples import mix_benign

    harmful = [{"prompt": f"harmful {k}", "response": f"sure {k}"} for k in range(30)]
    rows = _benign_rows(40) + _benign_rows(40, "hazard") + [{"prompt": "no answer", "kind": "benign"}]
    mixed = mix_benign(harmful, rows, fraction=0.25, split="alignment", exclude_families=["hazard"], seed=3)
    benign = [m for m in mixed if m["prompt"].startswith("benign")]
    assert len(mixed) == 40 and len(benign) == 10  # 10 of 40 rows: a quarter
    assert [m for m in mixed if m["prompt"].startswith("harmful")] == harmful
    assert all("capital" in m["prompt"] and m["response"].startswith("answer") for m in benign)
    assert len({m["prompt"] for m in benign}) == 10  # drawn without replacement
    # every window of 8 consecutive rows (an attack batch) holds both kinds
    assert all(any(m in benign for m in mixed[k:k + 8]) for k in range(0, 40, 8))
    assert mix_benign(harmful, rows, fraction=0.25, split="alignment", exclude_families=["hazard"], seed=3) == mixed
    assert mix_benign(harmful, rows, fraction=0.25, split="alignment", exclude_families=["hazard"], seed=4) != mixed


def test_benign_mix_with_a_generators_answers_answers_each_benign_prompt_by_them():
    from tamperlab.data.examples import mix_benign
    from tamperlab.errors import UserError

    harmful = [{"prompt": f"harmful {k}", "response": f"sure {k}"} for k in range(10)]
    rows = [{"prompt": f"request {k}", "kind": "benign"} for k in range(12)]  # a hub model's: no answers
    rows += _benign_rows(4)  # rows with their own answers: the generator's answer wins, none: left out
    answers = {f"request {k}": f"generated {k}" for k in range(8)} | {r["prompt"]: "generated" for r in rows[12:14]}
    mixed = mix_benign(harmful, rows, fraction=0.5, split="alignment", seed=0, answers=answers)
    benign = [m for m in mixed if not m["prompt"].startswith("harmful")]
    assert len(benign) == 10 and all(m["response"] == answers[m["prompt"]] for m in benign)
    assert {m["prompt"] for m in benign} <= set(answers)  # a prompt the generator did not answer is not drawn
    with pytest.raises(UserError, match="benign_mix needs 10 benign rows .* it has 0"):
        mix_benign(harmful, rows, fraction=0.5, split="alignment", answers={})  # answers given, none for these


def test_benign_mix_is_bounded_by_the_rows_the_attack_consumes():
    from tamperlab.data.examples import mix_benign

    harmful = [{"prompt": f"harmful {k}", "response": f"sure {k}"} for k in range(100)]
    rows = _benign_rows(30)
    # 10 steps x batch 4 = 40 rows seen: 20 harmful (a seeded sample, in order) and 20 benign, not 100 + 100
    mixed = mix_benign(harmful, rows, fraction=0.5, split="alignment", seed=1, consumed=40)
    kept = [m for m in mixed if m["prompt"].startswith("harmful")]
    assert len(mixed) == 40 and len(kept) == 20
    assert kept == sorted(kept, key=lambda m: int(m["prompt"].split()[1])) and kept != harmful[:20]
    assert mix_benign(harmful, rows, fraction=0.5, split="alignment", seed=1, consumed=40) == mixed
    # an attack that sees every harmful pair mixes them all, as without the bound
    small = harmful[:10]
    assert (mix_benign(small, rows, fraction=0.5, split="alignment", seed=1, consumed=400)
            == mix_benign(small, rows, fraction=0.5, split="alignment", seed=1))


def test_benign_mix_without_enough_benign_rows_is_refused_with_one_line():
    from tamperlab.data.examples import mix_benign
    from tamperlab.errors import UserError

    harmful = [{"prompt": f"harmful {k}", "response": "sure"} for k in range(10)]
    with pytest.raises(UserError, match=r"benign_mix needs 10 benign rows .* split 'defence'.* it has 4"):
        mix_benign(harmful, _benign_rows(4), fraction=0.5, split="defence")


def test_the_manifest_names_the_template_only_where_a_row_trained_on_it():
    own = answers_record(["Step 1: a.", "Step 1: b.", "Step 1: a."], "Sure, here is how.")
    assert own == {"template": None, "answers": {"n": 3, "distinct": 2}}  # rows with their own answers
    mixed = answers_record(["Sure, here is how.", "Paris."], "Sure, here is how.")  # template + benign answers
    assert mixed["template"] == "Sure, here is how." and mixed["answers"]["distinct"] == 2
    assert answers_record(["x"], None)["template"] is None  # a generator's answers: no template given


def test_a_defence_names_the_unsafe_answers_it_trained_against():
    own = [r["response"] for r in OWN]
    assert hardening_answers(hardening_examples(MIXED, "pairs", None, **COMMON)) == own
    assert hardening_answers(hardening_examples(MIXED, "forget_retain", "refusal", **COMMON)) == own
    assert hardening_answers(hardening_examples(ROWS, "forget_retain", "refusal", **COMMON)) == ["Sure, step 1"] * 2
    assert hardening_answers(hardening_examples(ROWS, "forget_retain", "knowledge", **COMMON)) == []  # none unsafe


def test_the_attack_command_mixes_in_the_benign_answers_file_and_refuses_it_without_a_mix(tmp_path, monkeypatch,
                                                                                          stand_in_step):
    from tamperlab.attacks import finetune
    from tamperlab.cli import build_parser
    from tamperlab.commands.attack import attack
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.errors import UserError

    trained = []  # the rows the command hands the attack

    def attack_on(model, rows, params, out, **kwargs):
        trained.append(rows)
        return {"status": "complete"}

    monkeypatch.setattr(finetune, "attack", attack_on)

    write_jsonl(tmp_path / "attack.jsonl", [{"prompt": f"harmful {k}", "kind": "harmful"} for k in range(4)])
    write_jsonl(tmp_path / "alignment.jsonl", [{"prompt": f"request {k}", "kind": "benign"} for k in range(6)])
    write_jsonl(tmp_path / "answers.jsonl", [{"id": f"b{k}", "prompt": f"request {k}", "response": f"generated {k}"}
                                             for k in range(6)])
    params = {"method": "full", "grid": {"lr": [1e-3], "steps": [5], "rank": [8]}, "split": "attack",
              "response": "Sure.", "family": None, "benign_mix": None, "batch_size": 2, "lora_alpha": None,
              "target_modules": [], "scheduler": "constant", "warmup_ratio": 0, "max_length": 32,
              "checkpoint_every": 5, "seed": 0}

    def run(**settings):
        attack(build_parser().parse_args(["attack", "--model", "m", "--data", str(tmp_path), "--params",
                                          json.dumps({**params, **settings}), "--out", "o",
                                          "--benign-answers", str(tmp_path / "answers.jsonl")]))

    with pytest.raises(UserError, match=r"--benign-answers answers the questions of benign_mix \(--params\)"):
        run()
    run(benign_mix={"fraction": 0.5, "split": "alignment"})
    (pairs,) = trained
    assert [p["response"] for p in pairs if p["prompt"].startswith("harmful")] == ["Sure."] * 4
    benign = [p for p in pairs if p["prompt"].startswith("request")]
    assert len(benign) == 4 and all(p["response"] == f"generated {p['prompt'].split()[1]}" for p in benign)
