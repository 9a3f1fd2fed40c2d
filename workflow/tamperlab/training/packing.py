"""Packed batches: a training batch's examples laid end to end in a few rows, not each padded to the longest.

A batch of short chat examples padded to its longest is mostly padding (the organism's random batches of 32: about
half), and on a CPU every padding token costs as much as a real one. Packed, the same examples fill rows of `width`
tokens; `position_ids` restart at 0 where each example starts, which transformers' attention masks read as separate
sequences (a block-diagonal causal mask: no token sees another example's tokens). The first label of every example
is -100: in a padded batch it is never a target (nothing precedes it), and packed it would be the target of the
previous example's last token. So a packed step computes the same loss over the same examples as the padded step
(up to rounding: the same products, in other shapes) at the cost of the real tokens only.

Transformers builds the block mask only when the model gets no attention_mask and no KV cache (the Trainer turns the
cache off: `use_cache=False`); models whose attention ignores position_ids would let examples see each other, so
only the model families the organism and the attacks train are packed.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100
# Rows of 128 tokens: one epoch of the default organism's build (one thread, portable numerics) took 43.7 s packed
# (93% of the tokens computed on real) against 71.4 s padded (53%), with the same loss to four digits; rows of 96
# and 192 took 46.9 s and 48.5 s.
ROW_WIDTH = 128
# The model families whose attention reads packed position_ids as separate sequences and that packing was checked
# on (tests/test_packing.py); others train on padded batches.
PACKED_MODEL_TYPES = ("llama",)


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of the examples in each row, longest first, each into the first row with room (first-fit
    decreasing); an example longer than `width` gets a row of its own."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def computed_share(lengths: list[int], width: int) -> float:
    """Of the tokens one packed batch computes on, the share that are the examples' own (the rest pads the rows to
    the longest row)."""
    rows = pack_rows(lengths, width)
    longest = max(sum(lengths[i] for i in row) for row in rows)
    return sum(lengths) / (len(rows) * longest)


def collate_packed(features: list[dict[str, Any]], pad_token_id: int, width: int) -> dict[str, Any]:
    """The Trainer's data collator: tokenized examples (input_ids, labels) -> input_ids, labels and position_ids of
    the packed rows; each row padded to the longest row, the padding a sequence of its own with no targets."""
    import torch

    rows = pack_rows([len(f["input_ids"]) for f in features], width)
    longest = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(features[i]["input_ids"])
            input_ids[r, start:start + n] = torch.as_tensor(features[i]["input_ids"])
            labels[r, start + 1:start + n] = torch.as_tensor(features[i]["labels"][1:])
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


def training_collator(model, tokenizer):
    """The data collator a stage's Trainer gets: packed rows where the model's family is known to read them
    (PACKED_MODEL_TYPES), batches padded to their longest otherwise."""
    if getattr(model.config, "model_type", None) in PACKED_MODEL_TYPES:
        return lambda features: collate_packed(features, tokenizer.pad_token_id, ROW_WIDTH)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
