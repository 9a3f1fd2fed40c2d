"""Batched greedy generation through the tokenizer's chat template, left-padded.

Two speed-ups; without them (the defaults on CPU) generate is called exactly as before:

- Early stop (`stop_substrings`, given by the caller: `early_stop_substrings(judge)`, the keyword judge's
  substrings, None for other judges): under the keyword judge a response that shows a refusal substring is refused
  whatever follows, so a row stops as soon as its decoded new text holds one, while the other rows go on; a batch
  ends when every row has stopped, produced EOS or reached max_new_tokens. Verdicts are those of full-length
  generation: a stopped row's response is the decoded text in which the substring was seen, made of the first
  tokens of its full-length response (so, shorter); rows that never stop are generated as before, token for token.
  XSTest's string match (`early_stop_chars(judge, rows)`) reads only a response's opening, so there a row stops
  once its text is as long as the longest refusal opener: the verdict is already final either way.
- Static KV cache (`static_cache`, default: on CUDA only, for a model on one device):
  `cache_implementation="static"`, under which transformers compiles the decoding step. One cache size and one
  batch size serve all batches (the last batch is filled up with copies of its first prompt) so that the step
  compiles once per call, not once per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tamperlab.chat import prompt_text
from tamperlab.models.placement import input_device, is_split
from tamperlab.runtime.logs import Progress

log = logging.getLogger(__name__)


def early_stop_substrings(judge: Any) -> tuple[str, ...] | None:
    """Substrings after which the judge's verdict is final (refused): the keyword judge's; None for other judges."""
    from tamperlab.data.refusals import REFUSAL_KEYWORDS
    from tamperlab.evaluation.judges import KeywordJudge

    return REFUSAL_KEYWORDS if isinstance(judge, KeywordJudge) else None


def early_stop_chars(judge: Any, rows: Sequence[dict[str, Any]]) -> int | None:
    """Characters after which XSTest's string match (the opener judge) has its verdict, whatever follows: the
    longest refusal opener's. None for other judges, and for rows with an exact answer to match (task questions:
    a cut answer could match where the whole one does not)."""
    from tamperlab.data.refusals import REFUSAL_OPENERS
    from tamperlab.evaluation.judges import OpenerJudge

    if not isinstance(judge, OpenerJudge) or any(r.get("category") == "task" for r in rows):
        return None
    return max(map(len, REFUSAL_OPENERS))


def _defers(device: torch.device) -> bool:
    """Whether the stop check reads the previous step's tokens (see SubstringStop): on CUDA, where reading the
    current step's would make the host wait for the device every step."""
    return device.type == "cuda"


class SubstringStop:
    """A transformers stopping criterion: marks a row finished once its decoded new tokens contain a substring.

    `cut[row]` is the number of new tokens in the text where the substring was found; generate() keeps only those,
    so the response is exactly the text that was checked. Rows that produced EOS are not decoded again (their text
    no longer changes).

    deferred: the tokens are copied to the host without waiting and checked one call later, so that decoding on the
    host overlaps the device's next step; a row then stops one step later, and that extra token is cut off again.
    """

    def __init__(self, tokenizer, substrings: Sequence[str], prompt_width: int, batch_size: int,
                 max_new_tokens: int, eos_ids: Sequence[int], deferred: bool, device: torch.device,
                 min_chars: int | None = None):
        self.tokenizer, self.substrings, self.prompt_width = tokenizer, tuple(substrings), prompt_width
        self.min_chars = min_chars  # a row also stops once its stripped text is this long (early_stop_chars)
        self.eos_ids, self.deferred, self.device = set(eos_ids), deferred, device
        self.cut: dict[int, int] = {}
        self.active = [True] * batch_size  # not yet stopped and no EOS seen
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.pending: tuple[torch.Tensor, Any] | None = None  # (host copy of the new tokens, its copy event)
        if deferred:
            pin = device.type == "cuda"  # two flat buffers, used in turn: a copy lands in one while the other is read
            self.buffers = [torch.empty(batch_size * max_new_tokens, dtype=torch.long, pin_memory=pin)
                            for _ in range(2)]
            self.calls = 0

    def _host_tokens(self, new: torch.Tensor) -> torch.Tensor | None:
        if not self.deferred:
            return new.cpu()
        ready, self.pending = self.pending, None
        buffer = self.buffers[self.calls % 2][:new.numel()].view(new.shape)
        self.calls += 1
        buffer.copy_(new, non_blocking=True)
        event = None
        if new.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.pending = (buffer, event)
        if ready is not None and ready[1] is not None:
            ready[1].synchronize()
        return None if ready is None else ready[0]

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs) -> torch.Tensor:
        tokens = self._host_tokens(input_ids[:, self.prompt_width:])
        rows = [r for r, active in enumerate(self.active) if active]
        if tokens is None or not rows:
            return self.finished
        ids = tokens.tolist()
        texts = self.tokenizer.batch_decode([ids[r] for r in rows], skip_special_tokens=True)
        found = []
        for r, text in zip(rows, texts, strict=True):
            if any(s in text for s in self.substrings) or (
                    self.min_chars is not None and len(text.strip()) >= self.min_chars):
                self.cut[r] = len(ids[r])
                self.active[r] = False
                found.append(r)
            elif not self.eos_ids.isdisjoint(ids[r]):
                self.active[r] = False
        if found:  # a new device tensor only when something changed: no host-to-device copy on most steps
            self.finished = self.finished.clone()
            self.finished[found] = True
        return self.finished


@dataclass
class Generation:
    responses: list[str]
    new_tokens: list[int]  # tokens each response took, its EOS included; an early-stopped one up to the substring
    stopped: list[bool]  # ended by the early stop (its response holds a stop substring)
    steps: int  # decoding steps run, summed over batches (the work done: each step runs every row of its batch)
    early_stop: bool

    def stats(self) -> dict[str, Any]:
        """What a manifest records about the generation."""
        return combined_stats([self])


def combined_stats(generations: Sequence[Generation]) -> dict[str, Any]:
    """What a manifest records about several generations of one evaluation (e.g. harmful and benign rows apart):
    tokens, early-stopped rows and decoding steps summed; early stop on if any used it."""
    return {"generated_tokens": sum(sum(g.new_tokens) for g in generations),
            "stopped_early": sum(sum(g.stopped) for g in generations),
            "decode_steps": sum(g.steps for g in generations), "early_stop": any(g.early_stop for g in generations)}


@dataclass
class BatchOutput:
    new_tokens: torch.Tensor  # (batch, steps) generated ids, on the host; pad after a row's end
    lengths: list[int]  # per row, as Generation.new_tokens
    stopped: list[bool]


def first_eos_lengths(new_tokens: list[list[int]], eos_ids: set[int]) -> list[int]:
    """Per row, the new tokens up to and including the first EOS, or all of them."""
    lengths = []
    for ids in new_tokens:
        end = next((i + 1 for i, t in enumerate(ids) if t in eos_ids), len(ids))
        lengths.append(end)
    return lengths


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate_ids(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 pad_token_id: int, eos_token_id: int | Sequence[int] | None,
                 stop_substrings: Sequence[str] | None = None, static_cache: bool = False,
                 max_cache_len: int | None = None, stop_chars: int | None = None) -> BatchOutput:
    """Greedy generation for one left-padded batch already on the model's device."""
    kwargs: dict[str, Any] = {}
    criterion = None
    if stop_substrings or stop_chars:
        from transformers import StoppingCriteriaList

        criterion = SubstringStop(tokenizer, stop_substrings or (), input_ids.shape[1], input_ids.shape[0],
                                  max_new_tokens, _eos_ids(eos_token_id), _defers(input_ids.device), input_ids.device,
                                  stop_chars)
        kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
    if static_cache:
        kwargs["cache_implementation"] = "static"
        if max_cache_len is not None:
            kwargs["max_cache_len"] = max_cache_len
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
    new_tokens = output[:, input_ids.shape[1]:].cpu()
    lengths = first_eos_lengths(new_tokens.tolist(), set(_eos_ids(eos_token_id)))
    stopped = [False] * len(lengths)
    if criterion is not None:
        for row, cut in criterion.cut.items():
            # A row cut at max_new_tokens ended at its limit anyway: not counted as stopped early.
            lengths[row], stopped[row] = cut, cut < max_new_tokens
            new_tokens[row, cut:] = pad_token_id
    return BatchOutput(new_tokens, lengths, stopped)


def generate(model, tokenizer, prompts: Sequence[str], system_prompt: str | None, max_new_tokens: int,
             batch_size: int, stop_substrings: Sequence[str] | None = None,
             static_cache: bool | None = None, stop_chars: int | None = None,
             prefixes: Sequence[str | None] | None = None) -> Generation:
    """Greedy responses in prompt order, with how many tokens each took. Prompts are batched by length to waste
    little padding; a batch ends as soon as every row in it has ended (EOS, or a stop substring).

    stop_substrings, stop_chars: early stop (see the module docstring); None generates every response in full.
    static_cache: None uses it on CUDA only (where transformers also compiles the decoding step), for a model on
    one device.
    prefixes: per prompt, text the answer is forced to start with (prefilling; None or "": none), appended to the
    chat-formatted prompt. Its response is the prefix followed by what the model generated (its whitespace kept:
    it may join a word of the prefix); the early stop and the token counts see the generated part only.
    """
    forced = list(prefixes) if prefixes is not None else [None] * len(prompts)
    texts = [prompt_text(tokenizer, p, system_prompt) + (f or "") for p, f in zip(prompts, forced, strict=True)]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    tokenizer.padding_side = "left"
    device = input_device(model)  # a model split across devices takes its inputs where its first layer runs
    # not under accelerate's hooks (a split model): compiling the decoding step through them is untested
    static = device.type == "cuda" and not is_split(model) if static_cache is None else static_cache
    # One cache length for every batch: a static cache of a new size would recompile the decoding step.
    max_cache_len = max(lengths, default=0) + max_new_tokens if static else None
    responses: list[str] = [""] * len(texts)
    counts, stopped, steps = [0] * len(texts), [False] * len(texts), 0
    progress = Progress(log, "generation: prompts", len(order))  # a line every 10 s at most
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        # The same batch size for every batch under a static cache: fill the last one up (outputs dropped).
        filler = (batch_size - len(index)) if static and len(order) > batch_size else 0
        batch = tokenizer([texts[i] for i in index + index[:1] * filler], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        out = generate_ids(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                           tokenizer.pad_token_id, tokenizer.eos_token_id, stop_substrings, static, max_cache_len,
                           stop_chars)
        steps += out.new_tokens.shape[1]
        decoded = tokenizer.batch_decode(out.new_tokens[:len(index)], skip_special_tokens=True)
        for row, (i, text) in enumerate(zip(index, decoded, strict=True)):
            response = forced[i] + text.rstrip() if forced[i] else text.strip()
            responses[i], counts[i], stopped[i] = response, out.lengths[row], out.stopped[row]
        progress.update(start + len(index))
    result = Generation(responses, counts, stopped, steps, bool(stop_substrings or stop_chars))
    log.info("generation: %s", result.stats())
    return result


def generate_responses(model, tokenizer, prompts: Sequence[str], system_prompt: str | None,
                       max_new_tokens: int, batch_size: int, stop_substrings: Sequence[str] | None = None,
                       static_cache: bool | None = None) -> list[str]:
    """generate(...).responses."""
    return generate(model, tokenizer, prompts, system_prompt, max_new_tokens, batch_size, stop_substrings,
                    static_cache).responses


def generate_answers(model_dir: Path, rows: list[dict[str, Any]], *, max_new_tokens: int,
                     batch_size: int, max_memory: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Greedy answers (no system prompt: the model's own default) to each row's prompt; the model on one device,
    or across those max_memory names (models/placement.py)."""
    from tamperlab.models.registry import load_model

    model, tokenizer = load_model(model_dir, max_memory=max_memory)
    generation = generate(model, tokenizer, [r["prompt"] for r in rows], None, max_new_tokens, batch_size)
    return [{"id": r["id"], "prompt": r["prompt"], "kind": r["kind"], "source": r["source"], "response": text,
             "generated_tokens": n, "truncated": n >= max_new_tokens}
            for r, text, n in zip(rows, generation.responses, generation.new_tokens, strict=True)]
