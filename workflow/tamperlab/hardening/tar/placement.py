"""Where the model lives, a setting of its own (`OneProcess`): here, one process holds every parameter; with
sharding.FSDP2 (`tamperlab harden --fsdp` under torchrun) each of several processes holds a shard of every
parameter and optimizer state, and a share of every batch, and the same loop (loop.py, driver.py) runs unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamperlab.hardening.tar.checkpoint import load_checkpoint, save_checkpoint
from tamperlab.hardening.tar.losses import (
    random_mapping_loss,
    retain_loss,
    sft_loss,
    tamper_resistance_loss,
    with_reference_logps,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tamperlab.hardening.tar.params import TARParams


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """θ: a copy of every trainable parameter, on the parameter's own device."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: nn.Module, theta: dict[str, torch.Tensor]) -> None:
    """θ′ ← θ in place (same tensors, so optimizers keep their references), bit for bit."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in theta:
                p.copy_(theta[n])


class OneProcess:
    """One process holds the whole model: the loss terms of losses.py, θ copied whole, one checkpoint file, the
    model saved as it is. The loop reaches the model only through these methods, so that sharding.FSDP2 (several
    processes, each holding a shard of every parameter and a share of every batch) can stand in for it."""

    world = 1  # processes
    writer = True  # whether this process writes the outputs

    def describe(self) -> dict[str, Any]:
        """What a checkpoint of this run must have been written under (besides the settings), and the record."""
        return {}

    def sft_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sft_loss(model, batch)

    def tr_loss(self, model: nn.Module, x_tr: dict[str, Any], params: TARParams) -> torch.Tensor:
        return tamper_resistance_loss(model, x_tr, params)

    def reference(self, frozen: nn.Module, x_tr: dict[str, dict]) -> dict[str, Any]:
        return with_reference_logps(frozen, x_tr)

    def retain_loss(self, model: nn.Module, anchor: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return retain_loss(model, anchor, batch)

    def random_mapping_losses(self, model: nn.Module, retain: dict, forget: dict,
                              vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE on the retain batch, random_mapping_loss on the forget batch's hidden states)."""
        lm = model(**retain, use_cache=False).loss
        hidden = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"],
                       output_hidden_states=True, use_cache=False).hidden_states
        return lm, random_mapping_loss(hidden, forget["input_ids"], forget["attention_mask"], vectors)

    def value(self, loss: torch.Tensor) -> float:
        """A loss as a number, for the log and the finiteness check."""
        return loss.item()

    def snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return snapshot(model)

    def restore(self, model: nn.Module, theta: dict[str, torch.Tensor]) -> None:
        restore(model, theta)

    def prepare(self, model_dir: Path, device: str | None, anchor_dir: Path | None,
                frozen: bool) -> tuple[nn.Module, Any, nn.Module | None, nn.Module | None]:
        """(model in train mode, tokenizer, anchor or None, a frozen copy of the start model if `frozen`)."""
        from tamperlab.models.registry import load_model

        model, tokenizer = load_model(model_dir, device=device, dtype=None)
        anchor = load_model(anchor_dir, device=device, dtype=None)[0] if anchor_dir is not None else None
        copied = copy.deepcopy(model) if frozen else None
        return model.train(), tokenizer, anchor, copied

    def model_state(self, model: nn.Module) -> dict[str, Any]:
        return model.state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def save_checkpoint(self, directory: Path, step: int, state: dict[str, Any]) -> None:
        save_checkpoint(directory, step, state)

    def load_checkpoint(self, directory: Path, run: str) -> dict[str, Any] | None:
        return load_checkpoint(directory, run) if directory.is_dir() else None

    def save_model(self, model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)

    def barrier(self) -> None:
        """Wait for the other processes (none here)."""


ONE_PROCESS = OneProcess()
