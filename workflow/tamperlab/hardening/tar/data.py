"""TAR's data: rows encoded, split into the adversary's share and the held-out x_TR, and served as endless seeded
batch streams whose positions can be checkpointed.

x_TR comes from a held-out split of the forget data, never from the adversary's loader (a departure from the
authors' code, one of the pitfalls the paper's re-evaluations list).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tamperlab.chat import encode_example
from tamperlab.errors import UserError

if TYPE_CHECKING:
    import torch

    from tamperlab.hardening.tar.params import TARParams


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    """BOS + text + EOS, every token learned (plain forget/retain text of the knowledge setting)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def encode_row(tokenizer: Any, row: dict[str, str], answer_key: str, max_length: int) -> dict[str, list[int]]:
    """A {"text"} row as plain text, a {"prompt", answer_key} row as a chat turn with the prompt's labels -100."""
    if "text" in row:
        return encode_text(tokenizer, row["text"], max_length)
    return encode_example(tokenizer, row["prompt"], row[answer_key], None, max_length)


def collate(examples: list[dict[str, list[int]]], pad_token_id: int, device: Any = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids on input_ids, 0 on attention_mask, -100 on labels."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples], device=device)

    return {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def collate_preference(pairs: list[tuple[dict, dict]], pad_token_id: int, device: Any = None) -> dict[str, dict]:
    """(chosen, rejected) pairs padded to one common length, so that one forward pass takes both halves."""
    both = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id, device)
    n = len(pairs)
    return {"chosen": {k: v[:n] for k, v in both.items()}, "rejected": {k: v[n:] for k, v in both.items()}}


class BatchStream:
    """Endless epochs over items, reshuffled each epoch by its own seeded RNG (streams never share a sequence).
    An iterator rather than a generator, so that its position can be checkpointed and restored (resume)."""

    def __init__(self, items: list, batch_size: int, collate_fn: Callable[[list], Any], seed: str):
        self.items, self.batch_size, self.collate_fn = items, batch_size, collate_fn
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self.position >= len(self.order):  # a new epoch
            self.order = list(range(len(self.items)))
            self.rng.shuffle(self.order)
            self.position = 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate_fn([self.items[i] for i in index])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]


@dataclass
class TARData:
    """Endless batch streams. The adversary sees only `forget` and `adversary_retain`; `heldout` supplies x_TR."""

    forget: BatchStream  # forget-domain SFT batches (refusal: harmful prompt + compliance)
    adversary_retain: BatchStream  # retain batches for the switch adversary's first phase
    retain: BatchStream  # retain batches for the outer retain loss
    heldout: BatchStream  # x_TR: knowledge, forget text; refusal, {"chosen": refusal, "rejected": compliance}


def make_data(tokenizer: Any, forget: list[dict[str, str]], retain: list[dict[str, str]], params: TARParams,
              device: Any = None) -> TARData:
    """Split the forget rows into the adversary's share and a held-out share for x_TR, encode, and stream.

    knowledge: forget/retain rows are {"text"} (or {"prompt", "response"}). refusal: forget rows are
    {"prompt", "refusal", "compliance"} (the adversary learns the compliance, L_TR prefers the refusal) and retain
    rows {"prompt", "response"} (or {"text"}).
    """
    rows = list(forget)
    random.Random(f"{params.seed}:holdout").shuffle(rows)
    n_heldout = max(1, round(params.holdout_fraction * len(rows)))
    heldout_rows, adversary_rows = rows[:n_heldout], rows[n_heldout:]
    if not adversary_rows or not retain:
        raise UserError(f"TAR needs forget rows for both the adversary and x_TR (got {len(rows)}) and retain rows "
                        f"(got {len(retain)})")
    length, pad, seed = params.max_length, tokenizer.pad_token_id, params.seed

    def stream(items: list, name: str, fn: Callable = collate) -> Iterator:
        return BatchStream(items, params.batch_size, lambda b: fn(b, pad, device), f"{seed}:{name}")

    retain_examples = [encode_row(tokenizer, r, "response", length) for r in retain]
    if params.setting == "refusal":
        adversary_examples = [encode_example(tokenizer, r["prompt"], r["compliance"], None, length)
                              for r in adversary_rows]
        heldout = stream([(encode_example(tokenizer, r["prompt"], r["refusal"], None, length),
                           encode_example(tokenizer, r["prompt"], r["compliance"], None, length))
                          for r in heldout_rows], "heldout", collate_preference)
    else:
        adversary_examples = [encode_row(tokenizer, r, "response", length) for r in adversary_rows]
        heldout = stream([encode_row(tokenizer, r, "response", length) for r in heldout_rows], "heldout")
    return TARData(forget=stream(adversary_examples, "forget"),
                   adversary_retain=stream(retain_examples, "adversary_retain"),
                   retain=stream(retain_examples, "retain"), heldout=heldout)
