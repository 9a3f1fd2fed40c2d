"""Loading any checkpoint the workflow makes or registers, the same way for every size.

A model directory is either a saved HF model (the organism, a hardened model) or a pointer written by
`register-model` to a hub id at a pinned revision or a local directory with recorded file hashes (no copy).
A LoRA adapter is applied on top of its base at load time; no merged copy is written to disk.

A hub model is fetched once: `register-model` (a local rule, on a machine that reaches the hub) downloads its
snapshot at the pinned revision into a shared hub cache (huggingface_hub's layout,
models--<org>--<name>/snapshots/<revision>/) and records the cache in the pointer. Every other step runs with the
hub offline (cli.py) and loads the snapshot from that cache (`local_files_only`); a missing or incomplete snapshot
stops it with one line naming the model and the step that fetches it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError
from tamperlab.runtime.provenance import hash_output

POINTER = "pointer.json"
# What a hub snapshot holds: config, tokenizer and safetensors weights (not a repository's .bin copies, nor the
# `consolidated.safetensors` of Mistral's own format); a model's code only where it is trusted.
HUB_FILES = ("*.json", "*.model", "*.tiktoken", "*.txt", "model*.safetensors")
HUB_CODE = ("*.py",)


def make_pointer(source: str, model_id: str | None, revision: str | None, path: str | None,
                 chat_template: str | None, trust_remote_code: bool,
                 hub_cache: str | Path | None = None) -> dict[str, Any]:
    """The content of a registered model's pointer.json; a local model's files are hashed now, a hub model's
    snapshot is looked for in `hub_cache` (absolute; None: huggingface_hub's default cache, HF_HUB_CACHE)."""
    pointer: dict[str, Any] = {"source": source, "chat_template": chat_template,
                               "trust_remote_code": trust_remote_code}
    if source == "hf":
        if not model_id or not revision:
            raise UserError("register-model: a hub model needs --id and a pinned --revision")
        pointer.update(id=model_id, revision=revision, hub_cache=str(Path(hub_cache or _default_hub_cache())
                                                                        .resolve()))
    elif source == "local":
        directory = Path(path or "")
        if not (directory / "config.json").is_file():
            raise UserError(f"register-model: {directory} is not a saved HF model (no config.json)")
        pointer.update(path=str(directory.resolve()), sha256=hash_output(directory))
    else:
        raise UserError(f"register-model: unknown source {source!r}")
    return pointer


def _default_hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def hub_snapshot(pointer: dict[str, Any], *, local_files_only: bool, where: str) -> Path:
    """The directory of a hub pointer's snapshot: fetched into its cache (register-model), or, with
    local_files_only, found there (every other step; huggingface_hub checks it is complete when the fetch left
    the repository's file list). `where` names the model in errors."""
    from huggingface_hub import snapshot_download

    model = f"{pointer['id']} at {pointer['revision']}"
    patterns = list(HUB_FILES) + (list(HUB_CODE) if pointer.get("trust_remote_code") else [])
    try:
        snapshot = Path(snapshot_download(pointer["id"], revision=pointer["revision"], cache_dir=pointer["hub_cache"],
                                          allow_patterns=patterns, local_files_only=local_files_only))
    except Exception as error:  # network, gated, unknown revision, missing or partial snapshot: one line each
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
        if local_files_only:
            raise UserError(f"{where}: the snapshot of {model} is not in the hub cache {pointer['hub_cache']} "
                            f"({reason}); fetch it once, where the hub is reachable, with the rule that registered "
                            f"it: snakemake -f {where}") from None
        raise UserError(f"{where}: could not fetch {model} into {pointer['hub_cache']} ({reason})") from None
    if not (snapshot / "config.json").is_file():
        raise UserError(f"{where}: the snapshot of {model} ({snapshot}) has no config.json")
    return snapshot


def resolve(model_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(what to pass to from_pretrained, its kwargs, the pointer or {}) for a model directory. A hub model is its
    snapshot directory in the hub cache, found without the hub."""
    pointer_file = model_dir / POINTER
    if not pointer_file.exists():
        if not (model_dir / "config.json").is_file():
            raise UserError(f"{model_dir}: not a model directory (no config.json or {POINTER})")
        return str(model_dir), {}, {}
    pointer = json.loads(pointer_file.read_text())
    kwargs = {"trust_remote_code": bool(pointer.get("trust_remote_code"))}
    if pointer["source"] == "hf":
        if "hub_cache" not in pointer:
            raise UserError(f"{model_dir}: registered before hub snapshots were fetched at registration; "
                            f"register it again: snakemake -f {model_dir}")
        snapshot = hub_snapshot(pointer, local_files_only=True, where=str(model_dir))
        return str(snapshot), {**kwargs, "local_files_only": True}, pointer
    local = Path(pointer["path"])
    if not local.is_dir():
        raise UserError(f"{model_dir}: registered local model {local} does not exist")
    if hash_output(local) != pointer["sha256"]:
        raise UserError(f"{model_dir}: files of registered local model {local} changed since registration")
    return str(local), kwargs, pointer


def default_dtype():
    import torch

    # bf16 on CPU is ~40x slower here than fp32 (measured on the 2-core development machines).
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


def load_model(model_dir: Path, adapter: Path | None = None, device: str | None = None, dtype=None,
               max_memory: dict[str, Any] | None = None, merge: bool = False):
    """(model in eval mode, tokenizer) for a model directory, with an optional PEFT adapter applied.

    On one device (`device`, default CUDA when there is one), or, with `max_memory` (a --max-memory object,
    models/placement.py), across the devices it names: each layer's weights on its device.
    merge: fold the adapter into the base weights (W + s·BA), for inference: one matmul per adapted layer instead
    of three and no PEFT wrapper per call (on the organism, a LoRA cell's evaluation spent most of its forward time
    in them); equal to the unmerged model up to float rounding."""
    import torch
    from transformers import AutoModelForCausalLM

    from tamperlab.models import placement

    model_dir = Path(model_dir)
    if device is not None and max_memory is not None:
        raise ValueError("load_model: give a device or max_memory, not both")
    name, kwargs, _ = resolve(model_dir)
    tokenizer = load_tokenizer(model_dir)
    memory = placement.max_memory(max_memory)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or default_dtype(), use_safetensors=True,
                                                 **kwargs, **placement.load_arguments(memory))
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: not a PEFT adapter (no adapter_config.json)")
        if placement.offloaded(model):  # PEFT would rewrite the offloaded weights' files to add the adapter's
            raise UserError(f"{adapter}: an adapter on {model_dir}, whose layers do not all fit --max-memory "
                            f"{max_memory}: give the job more GPUs or GPU memory")
        # across devices: each adapter layer is created on its base layer's device
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    if memory is not None:
        placement.log_spread(model)
        return model.eval(), tokenizer
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def loader(model_dir: Path, adapter: Path | None = None, max_memory: dict[str, Any] | None = None):
    """load_model(...) made on the first call and kept, its adapter merged: the evaluations of one checkpoint
    (refusal, then lm-eval) share one load of it."""
    loaded: list[tuple[Any, Any]] = []

    def load() -> tuple[Any, Any]:
        if not loaded:
            loaded.append(load_model(model_dir, adapter, max_memory=max_memory, merge=True))
        return loaded[0]

    return load
