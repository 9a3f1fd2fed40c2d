"""Loading any checkpoint the workflow makes or registers, the same way for every size.

A model directory is either a saved HF model (the organism, a hardened model) or a pointer written by
`register-model` to a hub id at a pinned revision or a local directory with recorded file hashes (no copy).
A LoRA adapter is applied on top of its base at load time; no merged copy is written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError
from tamperlab.provenance import hash_output

POINTER = "pointer.json"


def make_pointer(source: str, model_id: str | None, revision: str | None, path: str | None,
                 chat_template: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """The content of a registered model's pointer.json; a local model's files are hashed now."""
    pointer: dict[str, Any] = {"source": source, "chat_template": chat_template,
                               "trust_remote_code": trust_remote_code}
    if source == "hf":
        if not model_id or not revision:
            raise UserError("register-model: a hub model needs --id and a pinned --revision")
        pointer.update(id=model_id, revision=revision)
    elif source == "local":
        directory = Path(path or "")
        if not (directory / "config.json").is_file():
            raise UserError(f"register-model: {directory} is not a saved HF model (no config.json)")
        pointer.update(path=str(directory.resolve()), sha256=hash_output(directory))
    else:
        raise UserError(f"register-model: unknown source {source!r}")
    return pointer


def resolve(model_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(what to pass to from_pretrained, its kwargs, the pointer or {}) for a model directory."""
    pointer_file = model_dir / POINTER
    if not pointer_file.exists():
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a model directory (no config.json or {POINTER})")
        return str(model_dir), {}, {}
    pointer = json.loads(pointer_file.read_text())
    kwargs = {"trust_remote_code": bool(pointer.get("trust_remote_code"))}
    if pointer["source"] == "hf":
        return pointer["id"], {**kwargs, "revision": pointer["revision"]}, pointer
    local = Path(pointer["path"])
    if not local.is_dir():
        raise UserError(f"{model_dir}: registered local model {local} does not exist")
    if hash_output(local) != pointer["sha256"]:
        raise UserError(f"{model_dir}: files of registered local model {local} changed since registration")
    return str(local), kwargs, pointer


def default_dtype():
    import torch

    # bf16 on CPU is ~40x slower here than fp32 (shared/notes/machine.md).
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    name, kwargs, pointer = resolve(Path(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if pointer.get("chat_template"):
        tokenizer.chat_template = pointer["chat_template"]
    if tokenizer.chat_template is None:
        raise UserError(f"{model_dir}: tokenizer has no chat template (set models.<name>.chat_template)")
    return with_pad_token(tokenizer, model_dir)


def with_pad_token(tokenizer, model_dir: Path):
    """The pad strategy, one for every stage: a tokenizer without a pad token (Llama-2's) or whose pad is its EOS
    (SmolLM2's) pads with its unknown token. Padding is always masked (attention mask 0, label -100), so any token
    id serves, but it must not be EOS: the defences' masks and losses tell a sequence's end from its padding by id.
    A tokenizer with neither a distinct pad nor an unknown token is refused (the vocabulary is never resized)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    if tokenizer.unk_token is None or tokenizer.unk_token_id == tokenizer.eos_token_id:
        raise UserError(f"{model_dir}: tokenizer has no pad token distinct from EOS and no unknown token to pad with")
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_model(model_dir: Path, adapter: Path | None = None, device: str | None = None, dtype=None):
    """(model in eval mode, tokenizer) for a model directory, with an optional PEFT adapter applied."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    name, kwargs, _ = resolve(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or default_dtype(), use_safetensors=True,
                                                 **kwargs)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: not a PEFT adapter (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer
