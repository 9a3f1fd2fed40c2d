"""Packed batches (tamperlab.training.packing): rows that hold every example once, labels that never cross from one
example to the next, and a forward pass that computes, per example, what the padded batch computes."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tamperlab.training.packing import IGNORE, collate_packed, computed_share, pack_rows, training_collator

PAD = 0


def examples(lengths: list[int], prompt: int = 3) -> list[dict[str, list[int]]]:
    """Examples of the given lengths, distinct tokens, the first `prompt` tokens masked as a chat prompt is."""
    generator = torch.Generator().manual_seed(sum(lengths))
    out = []
    for n in lengths:
        ids = torch.randint(1, 200, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_rows_hold_every_example_once_and_respect_the_width():
    lengths = [50, 90, 20, 130, 40, 38, 10]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert [3] in rows  # longer than a row: alone
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows if row != [3])
    assert len(rows) == 3  # first-fit decreasing: [130] [90, 38] [50, 40, 20, 10]


def test_the_computed_share_counts_rows_padded_to_the_longest():
    assert computed_share([2, 8], 128) == 1.0  # one row
    assert computed_share([100, 60], 128) == 160 / 200  # two rows, the shorter padded to 100


def test_a_packed_batch_restarts_positions_and_never_targets_across_examples():
    batch = collate_packed(examples([5, 4, 6]), PAD, width=10)
    # first fit, longest first: [6, 4] then [5], padded to the longest row (10)
    assert batch["input_ids"].shape == (2, 10)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # the padding: a sequence of its own
    assert batch["labels"][1, 5:].eq(IGNORE).all() and batch["input_ids"][1, 5:].eq(PAD).all()
    assert all(batch["labels"][r, s] == IGNORE for r, s in [(0, 0), (0, 6), (1, 0)])  # each example's first token
    assert batch["labels"][0, 9] != IGNORE  # its answer tokens stay targets


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(config).eval()


def padded(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    longest = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), longest), PAD)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(f["input_ids"]), 1, torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_a_packed_forward_computes_each_example_as_the_padded_batch_does():
    model = tiny_llama()
    features = examples([12, 30, 7, 25, 18, 9])
    with torch.no_grad():
        reference = model(**padded(features))
        batch = collate_packed(features, PAD, width=64)
        packed = model(**batch)
    assert packed.loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    # The same logits per example, read from where the packing put it: no example saw another.
    for row, members in enumerate(pack_rows([len(f["input_ids"]) for f in features], 64)):
        start = 0
        for i in members:
            n = len(features[i]["input_ids"])
            torch.testing.assert_close(packed.logits[row, start:start + n], reference.logits[i, :n],
                                       rtol=1e-4, atol=1e-5)
            start += n


def test_without_restarted_positions_examples_would_see_each_other():
    """The check above can fail: the same rows read as one sequence each give other logits."""
    model = tiny_llama()
    features = examples([12, 30])
    batch = collate_packed(features, PAD, width=64)
    with torch.no_grad():
        separate = model(**batch).logits
        joined = model(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    assert not torch.allclose(separate[0, 30:42], joined[0, 30:42], atol=1e-3)


def test_only_the_families_known_to_read_packed_rows_are_packed():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1},
                                                                                    unk_token="<pad>")),
                                        pad_token="<pad>")
    llama = training_collator(tiny_llama(), tokenizer)
    gpt2 = training_collator(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)), tokenizer)
    features = examples([5, 4])
    assert "position_ids" in llama(features)
    padded_batch = gpt2(features)
    assert "position_ids" not in padded_batch and padded_batch["input_ids"].shape == (2, 5)
