"""TAR's training loop: Algorithm 1 of Tamirisa et al. (2024), adversarial meta-learning, first order, as the
authors' code runs it. Each outer step (`tar_outer_step`):

    θ₀ ← θ                                     snapshot
    for each of N sampled adversaries a = (data, lr, M):
        θ′ ← θ₀; fresh AdamW(lr), constant lr
        for j = 0 … K−1:
            θ′ ← AdamW step on SFT(θ′, a's batch j)            retain batches for j < M in the switch adversary
            if (j+1) mod tr_every = 0:
                g_TR += λ_TR · w_j / N · ∇θ′ L_TR(θ′, x_TR)    w_j = exp(0.0625 · (j − (K−1))), x_TR held out
        θ ← θ₀                                  restore, bit for bit
    g = λ_ret · ∇θ L_retain(θ, x_r) + g_TR; outer AdamW step

L_TR and L_retain are in losses.py; the inner loop is `adversary_inner_loop`, the last line `outer_update`. Every
term reaches the model through `where` (placement.OneProcess, or sharding.FSDP2's shards). Before the first outer
step the knowledge setting may train the Random Mapping safeguard (`random_mapping_safeguard`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from tamperlab.hardening.tar.losses import random_vectors
from tamperlab.hardening.tar.placement import ONE_PROCESS, OneProcess
from tamperlab.runtime.logs import Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tamperlab.hardening.tar.data import TARData
    from tamperlab.hardening.tar.params import Adversary, TARParams

log = logging.getLogger("tamperlab.hardening.tar")  # one logger for the package


def clock() -> float:
    """Seconds, for the phase timings in the log."""
    import torch

    if torch.cuda.is_available():  # kernels are asynchronous: a phase ends when its kernels have run
        torch.cuda.synchronize()
    return time.perf_counter()


def tr_weight(j: int, params: TARParams) -> float:
    """λ_TR · w_j / N with w_j = exp(0.0625 · (j − (K−1))): later, more-adapted steps weigh more; the last weighs 1."""
    w = math.exp(params.schedule_lambda * (j - (params.inner_steps - 1)))
    return params.lambda_tr * w / params.adversaries_per_step


def adversary_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                   where: OneProcess) -> float:
    """θ′ ← AdamW step on the adversary's SFT loss; returns that loss."""
    model.zero_grad(set_to_none=True)
    loss = where.sft_loss(model, batch)
    loss.backward()
    optimizer.step()
    return where.value(loss)


def accumulate_tr_gradient(model: nn.Module, x_tr: dict[str, Any], j: int, params: TARParams,
                           tr_grads: dict[str, torch.Tensor], where: OneProcess) -> tuple[float, float]:
    """g_TR += λ_TR·w_j/N·∇L_TR(θ′_j) (first order: nothing flows back through the trajectory); returns L_TR and
    its weighted value."""
    model.zero_grad(set_to_none=True)
    tr = where.tr_loss(model, x_tr, params)
    weighted = tr_weight(j, params) * tr
    if weighted.requires_grad:  # a gated-off L_TR is a detached zero: nothing to backpropagate
        weighted.backward()
        for n, p in model.named_parameters():
            if p.grad is not None and n in tr_grads:
                tr_grads[n].add_(p.grad)
            elif p.grad is not None:
                tr_grads[n] = p.grad  # taken over: the model lets go of it just below
        model.zero_grad(set_to_none=True)
    return where.value(tr), where.value(weighted)


def adversary_inner_loop(model: nn.Module, adversary: Adversary, data: TARData, x_tr: dict[str, Any],
                         params: TARParams, tr_grads: dict[str, torch.Tensor],
                         where: OneProcess = ONE_PROCESS) -> dict[str, Any]:
    """K adversary SFT steps from the current weights; after every tr_every-th step, λ_TR·w_j/N·∇L_TR(θ′_j) is added
    into tr_grads (first order: nothing flows back through the trajectory). Leaves the model at θ′_K."""
    import torch

    # Fresh AdamW over all parameters at a constant lr; torch's default weight decay (0.01), as the authors' code.
    inner_optimizer = torch.optim.AdamW(model.parameters(), lr=adversary.lr)
    stats: dict[str, Any] = {"inner_s": 0.0, "tr_s": 0.0, "adversary_losses": [], "tr_losses": [], "tr_weighted": []}
    for j in range(params.inner_steps):
        t0 = clock()
        batch = next(data.adversary_retain if adversary.uses_retain(j) else data.forget)
        stats["adversary_losses"].append(adversary_step(model, inner_optimizer, batch, where))
        stats["inner_s"] += clock() - t0
        if (j + 1) % params.tr_every == 0:
            t0 = clock()
            tr, weighted = accumulate_tr_gradient(model, x_tr, j, params, tr_grads, where)
            stats["tr_losses"].append(tr)
            stats["tr_weighted"].append(weighted)
            stats["tr_s"] += clock() - t0
    model.zero_grad(set_to_none=True)
    return stats


def run_adversary(model: nn.Module, frozen: nn.Module | None, adversary: Adversary, theta: dict[str, torch.Tensor],
                  data: TARData, params: TARParams, tr_grads: dict[str, torch.Tensor], where: OneProcess,
                  stats: dict[str, Any]) -> None:
    """One adversary's turn: draw its x_TR, run its inner loop from θ, then restore θ. Adds to stats."""
    t0 = clock()
    x_tr = next(data.heldout)  # one held-out batch per adversary, evaluated at every θ′_j
    if params.setting == "refusal":
        x_tr = where.reference(frozen, x_tr)
    stats["tr_s"] += clock() - t0
    inner = adversary_inner_loop(model, adversary, data, x_tr, params, tr_grads, where)
    for key in ("inner_s", "tr_s", "tr_losses", "tr_weighted", "adversary_losses"):
        stats[key] += inner[key]
    t0 = clock()
    where.restore(model, theta)
    stats["restore_s"] += clock() - t0


def outer_update(model: nn.Module, retain_anchor: nn.Module | None, outer_optimizer: torch.optim.Optimizer,
                 data: TARData, params: TARParams, tr_grads: dict[str, torch.Tensor], where: OneProcess,
                 stats: dict[str, Any]) -> None:
    """g = λ_ret·∇L_retain(θ, x_r) + g_TR and one outer optimizer step, skipped if a loss is non-finite."""
    outer_optimizer.zero_grad(set_to_none=True)
    loss = params.lambda_retain * where.retain_loss(model, retain_anchor, next(data.retain))
    loss.backward()
    for n, p in model.named_parameters():
        if n in tr_grads:
            p.grad = tr_grads[n] if p.grad is None else p.grad.add_(tr_grads[n])
    stats["retain_loss"] = where.value(loss)
    stats["finite"] = math.isfinite(stats["retain_loss"]) and all(math.isfinite(x) for x in stats["tr_weighted"])
    if stats["finite"]:
        outer_optimizer.step()
    outer_optimizer.zero_grad(set_to_none=True)


def tar_outer_step(model: nn.Module, frozen: nn.Module | None, outer_optimizer: torch.optim.Optimizer,
                   adversaries: Sequence[Adversary], data: TARData, params: TARParams,
                   anchor: nn.Module | None = None, where: OneProcess = ONE_PROCESS) -> dict[str, Any]:
    """One TAR outer step (Algorithm 1): inner loops from θ for each adversary, then the retain gradient at θ plus
    the accumulated TR gradients, then one outer optimizer step. The step is skipped if a loss is non-finite.
    frozen is the start model (DPO's π_ref); anchor the retain loss's representation anchor (None: frozen).

    Returns the losses and each phase's wall time: inner_s (adversary SFT steps), tr_s (x_TR reference log-probs
    and L_TR forward/backward/accumulation), restore_s (snapshot and restores), retain_s (retain loss, adding the
    TR gradients, outer step), step_s (all of it).
    """
    t_step = clock()
    theta = where.snapshot(model)
    tr_grads: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {"inner_s": 0.0, "tr_s": 0.0, "restore_s": clock() - t_step, "tr_losses": [],
                             "tr_weighted": [], "adversary_losses": []}
    for adversary in adversaries:
        run_adversary(model, frozen, adversary, theta, data, params, tr_grads, where, stats)
    t0 = clock()
    retain_anchor = (anchor if anchor is not None else frozen) if params.retain_representations else None
    outer_update(model, retain_anchor, outer_optimizer, data, params, tr_grads, where, stats)
    stats["retain_s"] = clock() - t0
    stats["step_s"] = clock() - t_step
    return stats


def random_mapping_safeguard(model: nn.Module, forget_batches: Iterator[dict], retain_batches: Iterator[dict],
                             steps: int, lr: float, seed: int,
                             where: OneProcess = ONE_PROCESS) -> list[dict[str, float]]:
    """Train the Random Mapping safeguard in place: each step, CE on a retain batch + random_mapping_loss on a forget
    batch (all hidden states, real tokens), AdamW at a constant lr. Returns the per-step losses."""
    import torch

    vectors = random_vectors(model.config.vocab_size, model.config.hidden_size, seed,
                             next(model.parameters()).device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history, progress = [], Progress(log, "TAR random mapping step", steps)
    for step in range(steps):
        retain, forget = next(retain_batches), next(forget_batches)
        optimizer.zero_grad(set_to_none=True)
        lm, rm = where.random_mapping_losses(model, retain, forget, vectors)
        (lm + rm).backward()
        optimizer.step()
        history.append({"step": step + 1, "retain_ce": where.value(lm), "random_mapping": where.value(rm)})
        progress.update(step + 1, f"retain_ce {history[-1]['retain_ce']:.4g}, "
                        f"random_mapping {history[-1]['random_mapping']:.4g}")
    optimizer.zero_grad(set_to_none=True)
    return history
