"""Directions in weight space and moving a model along them in place (Peng et al. 2024, "safety landscape").

Random direction, as the official code builds it ("layer" normalisation): for every weight tensor θ_t a Gaussian
tensor g_t of the same shape, rescaled to unit Frobenius norm and multiplied by ||θ_t||_F; tensors whose name
contains "norm" get zero; embeddings and lm_head are perturbed (a tied embedding is one tensor, perturbed once).
A second, independent direction (another index, not orthogonalised) spans a 2D landscape.

A random direction is never stored: g_t is regenerated, whenever it is needed, from a generator on the tensor's
device seeded by a stable hash of (seed, direction index, tensor name). What is kept is one float per tensor,
||θ_t|| / ||g_t||, computed once from the unperturbed weights. The values depend on the device type (CPU and
CUDA generators differ) and on the tensor's dtype (g_t is drawn in it, so that the buffer is one tensor's size).

Interpolation direction: θ_finetuned − θ_aligned, unnormalised. It has no seed to regenerate it from, so it holds
the difference of every tensor that changed (fp32, on the model's device unless told otherwise): a full fine-tune
costs a second copy of the model, a merged LoRA fine-tune only its target matrices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

# A direction's tensor for one weight, and the factor to multiply it by: (g_t, ||θ_t||/||g_t||) or (Δθ_t, 1).
Component = tuple[torch.Tensor, float]


class Direction(Protocol):
    def component(self, name: str, param: torch.Tensor) -> Component | None:
        """This direction's tensor for the weight `name` on param's device, or None where it is zero."""


def weight_tensors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every parameter once, under its first name: named_parameters() drops the second name of a tied tensor,
    so a tied embedding/lm_head is perturbed once. Unmerged adapters are refused: the landscape is over the
    full weights, so a LoRA fine-tune must be merged into its base first (merge_and_unload)."""
    params = list(model.named_parameters())
    adapters = [name for name, _ in params if "lora_" in name]
    if adapters:
        raise ValueError(f"{adapters[0]}: merge adapters into the base weights (merge_and_unload) before a scan")
    return params


def is_norm(name: str) -> bool:
    return "norm" in name


def stable_seed(seed: int, index: int, name: str) -> int:
    """A 63-bit generator seed from (seed, direction index, tensor name); sha256, not hash(), which Python
    salts per process."""
    digest = hashlib.sha256(f"{seed}/{index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_like(seed: int, index: int, name: str, like: torch.Tensor) -> torch.Tensor:
    """g_t: standard normal, shape, dtype and device of `like`, the same on every call."""
    generator = torch.Generator(device=like.device).manual_seed(stable_seed(seed, index, name))
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor, dtype=torch.float32))


class RandomDirection:
    """The paper's random direction d with d_t = g_t / ||g_t|| · ||θ_t|| (zero for norm tensors).

    Build it from the model at its unperturbed weights θ0: the norms are taken then, once.
    `index` tells the directions of one seed apart (0 for α, 1 for β)."""

    def __init__(self, model: nn.Module, seed: int, index: int = 0):
        self.seed, self.index = seed, index
        self.scales: dict[str, float] = {}
        with torch.no_grad():
            for name, param in weight_tensors(model):
                if is_norm(name):
                    self.scales[name] = 0.0
                    continue
                g = gaussian_like(seed, index, name, param)
                self.scales[name] = _norm(param) / _norm(g)
                del g  # one tensor-sized buffer at a time

    def component(self, name: str, param: torch.Tensor) -> Component | None:
        scale = self.scales[name]  # KeyError: a tensor the direction was not built for
        if scale == 0.0:
            return None
        return gaussian_like(self.seed, self.index, name, param), scale


class InterpolationDirection:
    """d = θ_finetuned − θ_aligned, tensor by tensor; tensors equal in both models are not stored.

    `model` is the aligned model at its unperturbed weights; `finetuned` a model or state dict with the same
    parameter names (a merged PEFT model, or full fine-tuned weights). `device` is where the differences are
    kept (default: each tensor's own device; "cpu" trades device memory for a host-to-device copy per move)."""

    def __init__(self, model: nn.Module, finetuned: nn.Module | Mapping[str, torch.Tensor],
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32):
        state = finetuned.state_dict() if isinstance(finetuned, nn.Module) else finetuned
        self.names: set[str] = set()
        self.differences: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in weight_tensors(model):
                if name not in state:
                    raise KeyError(f"{name}: not in the fine-tuned weights (merge adapters first?)")
                other = state[name]
                if tuple(other.shape) != tuple(param.shape):
                    raise ValueError(f"{name}: shape {tuple(other.shape)} in the fine-tuned weights, "
                                     f"{tuple(param.shape)} in the aligned model")
                self.names.add(name)
                where = torch.device(device) if device is not None else param.device
                # fp32: the difference of two bf16 numbers is (almost always) exact in fp32, so α = 1 lands on
                # the fine-tuned weights after one rounding.
                difference = other.detach().to(where, dtype) - param.detach().to(where, dtype)
                if difference.any():
                    self.differences[name] = difference

    def component(self, name: str, param: torch.Tensor) -> Component | None:
        if name not in self.names:
            raise KeyError(name)
        difference = self.differences.get(name)
        if difference is None:
            return None
        return difference.to(param.device, non_blocking=True), 1.0


def materialise(direction: Direction, name: str, param: torch.Tensor) -> torch.Tensor:
    """d_t in fp32 (zeros where the direction is zero): for checks and references, not for scans."""
    component = direction.component(name, param)
    if component is None:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    tensor, scale = component
    return tensor.to(torch.float32) * scale


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Pinned host memory makes the restore copy to a GPU asynchronous and fast.
    pin = tensor.device.type == "cuda"
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin).copy_(tensor.detach())


class Perturbation:
    """Moves a model to θ0 + Σ_k c_k d_k in place, and back to θ0 bit for bit.

    A move from coefficients c to c' adds (c'_k − c_k) d_k tensor by tensor on the model's device, regenerating
    one direction tensor at a time: the extra device memory is one tensor-sized buffer, and a unit step of a
    snake walk regenerates a single direction.

    Restoring exactly: floating-point steps do not cancel (θ + a·d − a·d ≠ θ in general), and recomputing
    θ0 + c·d needs θ0 itself. Keeping θ0 on the device doubles device memory, compensated sums need a
    compensation tensor per weight (the same), so θ0 is kept on the host (pinned memory for a GPU model) and
    copied back: exact, and no extra device memory. A CPU model pays a second copy in host memory.

    Incremental moves accumulate rounding. In fp32 that is negligible (~1e-5 of a grid step after a row of a
    21-point grid). In bf16 it is not: a step smaller than half a unit in the last place of a weight is lost
    entirely, and a row adds the same direction step after step, so the losses add up instead of averaging
    out: measured ~0.5 grid steps off at the end of a row (fp16 ~0.07), against ~0.04 for a point derived
    directly from θ0. `anchor` derives a point from θ0 (host-to-device copy, then one add per direction);
    scan.run_scan anchors every point of a half-precision model by default.
    """

    def __init__(self, model: nn.Module, directions: Sequence[Direction]):
        self.directions = list(directions)
        self.params = weight_tensors(model)
        self.snapshot = {name: _host_copy(param) for name, param in self.params}
        self.coefficients: tuple[float, ...] = (0.0,) * len(self.directions)

    def __enter__(self) -> Perturbation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    @torch.no_grad()
    def move_to(self, coefficients: Sequence[float]) -> None:
        """Move from the current coefficients to these, in place."""
        target = tuple(float(c) for c in coefficients)
        if len(target) != len(self.directions):
            raise ValueError(f"{len(target)} coefficients for {len(self.directions)} directions")
        self._add([new - old for new, old in zip(target, self.coefficients, strict=True)])
        self.coefficients = target

    @torch.no_grad()
    def anchor(self, coefficients: Sequence[float]) -> None:
        """Go to these coefficients from θ0 (no accumulated rounding), at the cost of a host-to-device copy."""
        self.restore()
        self.move_to(coefficients)

    @torch.no_grad()
    def restore(self) -> None:
        """Back to θ0, bitwise."""
        for name, param in self.params:
            param.copy_(self.snapshot[name], non_blocking=True)
        for device in {param.device for _, param in self.params if param.is_cuda}:
            torch.cuda.synchronize(device)  # the pinned copies are asynchronous, on every GPU the model is spread over
        self.coefficients = (0.0,) * len(self.directions)

    def _add(self, deltas: Sequence[float]) -> None:
        for name, param in self.params:
            for direction, delta in zip(self.directions, deltas, strict=True):
                if delta == 0.0:
                    continue
                component = direction.component(name, param)
                if component is None:
                    continue
                tensor, scale = component
                # One fused kernel, computed in fp32 for bf16 weights, one rounding per step.
                param.add_(tensor, alpha=delta * scale)
                del tensor, component  # free the buffer before the next tensor's is drawn
