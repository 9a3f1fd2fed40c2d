"""Harmful fine-tuning attacks (Lermen et al. 2023): LoRA or full fine-tuning on harmful prompts paired with
compliant responses, through the supervised fine-tuning loop every stage shares (training.sft: the HF Trainer, the
same code under DeepSpeed, a snapshot at every `steps` value of the grid, resume after a kill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tamperlab.training.sft import SFTParams, finetune


def attack(base_dir: Path, rows: list[dict[str, Any]], params: SFTParams, out_dir: Path,
           device: str | None = None, deepspeed: Path | None = None) -> dict[str, Any]:
    """Fine-tune the model in base_dir on each row's (prompt -> response) and snapshot into out_dir/steps<N>/
    (training.sft.finetune). Returns the training record (loss log, status, diverged step)."""
    from tamperlab.models.registry import load_model

    return finetune(lambda: load_model(base_dir, device=device, dtype=None), rows, params, out_dir,
                    deepspeed=deepspeed)
