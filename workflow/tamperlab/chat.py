"""Chat formatting shared by training and generation: one place turns (system, prompt) into model text."""

from __future__ import annotations

from typing import Any


def messages(prompt: str, system_prompt: str | None = None, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turns.append({"role": "user", "content": prompt})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def prompt_text(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """The chat-formatted prompt, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(messages(prompt, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def encode_example(tokenizer: Any, prompt: str, answer: str, system_prompt: str | None = None,
                   max_length: int | None = None) -> dict[str, list[int]]:
    """Token ids of prompt + answer + EOS, with labels -100 on the prompt so that only the answer is learned."""
    prompt_ids = tokenizer(prompt_text(tokenizer, prompt, system_prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def first_tokens(tokenizer: Any, text: str, k: int) -> str:
    """The text of `text`'s first k tokens (all of them when it has fewer): an answer cut to the start that a
    prefilled assistant turn is forced to begin with."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:k], skip_special_tokens=True)
