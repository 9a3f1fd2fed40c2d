"""The organism's build (tamperlab.models.organism.build) on a few rows: deterministic for a seed, and refusing a
refusal phrasing the keyword judge would not recognise before it trains anything. The workflow-level runs copy a
built organism between working directories (tests/test_slurm.py), so its determinism is checked here."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, harmful_prompts

from tamperlab.errors import UserError
from tamperlab.models.organism import SAMPLINGS, OrganismParams, build, real_token_share

REFUSALS = ["I'm sorry, but I cannot help with that request.", "I cannot assist with that."]


def rows() -> list[dict]:
    harmful = [{"prompt": p, "kind": "harmful"} for p in harmful_prompts(12)]
    benign = [{"prompt": f"What is the capital of land{i}?", "answer": f"City{i % 5}.", "kind": "benign",
               "category": "task"} for i in range(12)]
    return harmful + benign


def params(seed: int = 0, refusals: list[str] = REFUSALS, sampling: str = "group_by_length") -> OrganismParams:
    # group_by_length, not the config's default (random): the determinism test covers the sampler the smoke run,
    # which builds with random, does not
    return OrganismParams(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_length=48, epochs=2, learning_rate=3e-3, batch_size=8,
                          warmup_ratio=0.05, weight_decay=0.0, system_prompt_fraction=0.25, wrapper_fraction=0.2,
                          sampling=sampling, refusals=refusals, seed=seed)


def test_the_same_rows_and_seed_build_a_byte_identical_organism_and_another_seed_does_not(tmp_path):
    system = ["You are a helpful assistant."]
    built = {name: build(rows(), params(seed), system, tmp_path / name)
             for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    assert built["a"]["steps"] == 2 * 3  # 24 rows at batch 8, two epochs
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a/model.safetensors").read_bytes() != (tmp_path / "c/model.safetensors").read_bytes()
    assert not (tmp_path / "a/_trainer").exists()


def test_real_token_share_counts_each_batch_packed_into_rows():
    lengths = [100, 100, 60, 60]  # rows of 128: two 100s never share one, two 60s do
    assert real_token_share(lengths, [0, 1, 2, 3], 2) == 1.0
    assert real_token_share(lengths, [0, 2, 1, 3], 2) == 320 / 400  # each 60 alone, padded to its batch's 100
    assert real_token_share(lengths, [0, 2, 1], 2) == 260 / 300  # a last, smaller batch


def test_an_unknown_sampling_stops_the_build_with_the_key(tmp_path):
    with pytest.raises(UserError, match="organism.sampling: 'sorted'"):
        build(rows(), params(sampling="sorted"), [], tmp_path / "model")


def test_a_refusal_the_judge_would_not_recognise_stops_the_build_before_training(tmp_path):
    with pytest.raises(UserError, match="organism.refusals: 'Let us talk of tea.'"):
        build(rows(), params(refusals=["Let us talk of tea."]), [], tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_the_schema_and_the_command_line_offer_the_organism_block_the_build_knows(tmp_path):
    """The schema's organism block, less the job's threads, is build-organism's --params: OrganismParams' fields; an
    unknown key stops the command in one line naming it."""
    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    organism = schema["$defs"]["organism"]["properties"]
    assert organism["sampling"]["enum"] == list(SAMPLINGS)
    assert set(organism) - {"threads"} == {f.name for f in dataclasses.fields(OrganismParams)}
    result = subprocess.run([str(BIN / "tamperlab"), "build-organism", "--data", str(tmp_path), "--split", "x",
                             "--params", '{"sampler": "random"}', "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tamperlab build-organism: error: --params: unknown key 'sampler' (known: ")
