"""`harden`: the run around TAR's loop. Load the model (and the anchor and frozen start model it needs), stream the
data, train Random Mapping first where asked, run the outer steps (loop.py) with their log and checkpoints, and
save the hardened model.

Departures from the authors' code that live here: any HF causal LM (no FSDP-v1 internals); the pad token is never
EOS; plain AdamW with linear warmup stands in for schedule-free AdamW. The representation anchor is a setting of its
own (`anchor_dir`; default the model `harden` starts from, copied before any Random Mapping): the code anchors to
the original Instruct model (retain_model_name) while it starts the bio run from the Random-Mapped checkpoint, so
either pass that Instruct model as the anchor or run Random Mapping here.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tamperlab.errors import UserError
from tamperlab.hardening.tar.checkpoint import rng_states, run_key, set_rng_states
from tamperlab.hardening.tar.data import TARData, make_data
from tamperlab.hardening.tar.loop import random_mapping_safeguard, tar_outer_step
from tamperlab.hardening.tar.params import Adversary, TARParams, sample_adversary
from tamperlab.hardening.tar.placement import ONE_PROCESS, OneProcess
from tamperlab.runtime.logs import Progress
from tamperlab.training.trainer import CHECKPOINTS, mark_diverged, trainable_parameters

if TYPE_CHECKING:
    import torch
    from torch import nn

TAR_LOG = "tar_log.jsonl"
PHASES = ("inner_s", "tr_s", "restore_s", "retain_s", "step_s")  # each outer step's wall times: kept in memory,
# averaged into the manifest, never in tar_log.jsonl (its bytes repeat from run to run, so a replay can compare them)
log = logging.getLogger("tamperlab.hardening.tar")  # one logger for the package


class Models(NamedTuple):
    model: nn.Module  # the model being hardened, in train mode
    tokenizer: Any
    anchor: nn.Module | None  # the retain loss's representation anchor, if one is given
    frozen: nn.Module | None  # the start model (DPO's π_ref, the default anchor), where one is used


@dataclass
class OuterState:
    """What the outer loop carries from step to step besides the weights and the data streams (all checkpointed)."""

    optimizer: torch.optim.Optimizer
    warmup: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random  # the adversary sampler
    random_mapping_log: list[dict[str, float]]
    history: list[dict[str, Any]]  # tar_log.jsonl's lines so far, with their phase wall times
    first: int = 1  # the first outer step this process runs (after a resume: the checkpoint's step + 1)


def harden(model_dir: Path, forget: list[dict[str, str]], retain: list[dict[str, str]], params: TARParams,
           out_dir: Path, device: str | None = None, deepspeed: Path | None = None,
           anchor_dir: Path | None = None, where: OneProcess = ONE_PROCESS) -> dict[str, Any]:
    """Run TAR on the model in model_dir and save it (safetensors, with its tokenizer) into out_dir, beside
    tar_log.jsonl (per outer step: adversaries and losses; the phase wall times go to the record).

    anchor_dir: the retain loss's representation anchor, a model of the same architecture and vocabulary (the
    authors anchor the bio run, which starts from a Random-Mapped checkpoint, to the original Instruct model);
    None: the start model as loaded, before any Random Mapping.

    Rows are described in `data.make_data`. In the knowledge setting with random_mapping_steps > 0, Random Mapping
    runs first. A non-finite loss stops training: out_dir then holds a DIVERGED marker instead of a model.
    Every checkpoint_every outer steps the whole state (weights, optimizer, warmup, adversary sampler, data
    streams, global RNGs, logs) goes to out_dir/checkpoints; a rerun into the same out_dir continues from the
    latest one, bit for bit as if never stopped. Returns the training record (status, steps, final losses, mean
    phase timings). `where`: one process (the default) or sharding.FSDP2's shards (use sharding.harden).
    """
    import torch

    if deepspeed is not None:  # TAR's snapshot/restore loop holds its own copy of the parameters (of their shards)
        raise UserError("TAR does not run under DeepSpeed ZeRO; shard it with --fsdp (FSDP2, launched by torchrun)")
    params.check()
    checkpoints = out_dir / CHECKPOINTS
    run = run_key(params, model_dir, anchor_dir, where.describe())
    resume = where.load_checkpoint(checkpoints, run)
    torch.manual_seed(params.seed)
    models = load_models(model_dir, device, anchor_dir, params, where)
    data = make_data(models.tokenizer, forget, retain, params, next(models.model.parameters()).device)
    outer = start_outer_loop(models.model, data, params, where, random_mapping=resume is None)
    if resume is not None:
        resume_from(resume, models.model, data, outer, where)
        log.info("TAR: resuming after outer step %d/%d from %s", resume["step"], params.outer_steps, checkpoints)
    resume = None  # its tensors are copied in; let them go
    diverged = outer_loop(models, data, outer, params, where, checkpoints, run)
    save_outputs(models, outer.history, diverged, out_dir, where)
    rows = {"forget": len(forget), "retain": len(retain)}
    return record(outer, diverged, models.model, rows, anchor_dir, params, where)


def load_models(model_dir: Path, device: str | None, anchor_dir: Path | None, params: TARParams,
                where: OneProcess) -> Models:
    """The model to harden and its tokenizer, the anchor if one is given, and the frozen start model where it is used;
    the frozen ones in eval mode without gradients."""
    # The start model: DPO's π_ref, and the anchor unless one is given (a second 8B copy only where it is used).
    needs_frozen = params.setting == "refusal" or (anchor_dir is None and params.retain_representations)
    model, tokenizer, anchor, frozen = where.prepare(model_dir, device, anchor_dir, needs_frozen)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"{model_dir}: TAR needs a pad token distinct from EOS")
    if anchor is not None:
        anchor.eval().requires_grad_(False)
        shape = ("vocab_size", "hidden_size", "num_hidden_layers")
        if any(getattr(anchor.config, k) != getattr(model.config, k) for k in shape):
            raise UserError(f"TAR anchor {anchor_dir}: its {', '.join(shape)} differ from {model_dir}'s")
    if frozen is not None:
        frozen.eval().requires_grad_(False)
    return Models(model, tokenizer, anchor, frozen)


def start_outer_loop(model: nn.Module, data: TARData, params: TARParams, where: OneProcess,
                     random_mapping: bool) -> OuterState:
    """Random Mapping first, where the knowledge setting asks for it and `random_mapping` (not on a resume: the
    checkpoint's weights have it); then the outer AdamW, its linear warmup and the adversary sampler."""
    import torch

    random_mapping_log: list[dict[str, float]] = []
    if params.setting == "knowledge" and params.random_mapping_steps > 0 and random_mapping:
        random_mapping_log = random_mapping_safeguard(model, data.forget, data.adversary_retain,
                                                      params.random_mapping_steps, params.random_mapping_lr,
                                                      params.seed, where)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.outer_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, params.warmup_steps)))
    return OuterState(optimizer, warmup, random.Random(params.seed), random_mapping_log, [])


def checkpoint_state(run: str, step: int, model: nn.Module, data: TARData, outer: OuterState,
                     where: OneProcess) -> dict[str, Any]:
    """Everything the next outer step reads, after outer step `step`, under this run's key."""
    return {"run": run, "step": step, "model": where.model_state(model),
            "optimizer": where.optimizer_state(outer.optimizer),
            "scheduler": outer.warmup.state_dict(), "adversary_rng": outer.rng.getstate(),
            "streams": {f.name: getattr(data, f.name).state_dict() for f in fields(data)}, "rng": rng_states(),
            "log": outer.history, "random_mapping_log": outer.random_mapping_log}


def resume_from(state: dict[str, Any], model: nn.Module, data: TARData, outer: OuterState,
                where: OneProcess) -> None:
    """Put back everything the next outer step reads, as it was after the checkpoint's step."""
    where.load_model_state(model, state["model"])
    where.load_optimizer_state(outer.optimizer, state["optimizer"])
    outer.warmup.load_state_dict(state["scheduler"])
    outer.rng.setstate(state["adversary_rng"])
    for name, stream_state in state["streams"].items():
        getattr(data, name).load_state_dict(stream_state)
    set_rng_states(state["rng"])
    outer.history, outer.random_mapping_log = state["log"], state["random_mapping_log"]
    outer.first = state["step"] + 1


def outer_loop(models: Models, data: TARData, outer: OuterState, params: TARParams, where: OneProcess,
               checkpoints: Path, run: str) -> int | None:
    """Outer steps outer.first … outer_steps, each logged, with a checkpoint every checkpoint_every steps. Returns
    the step whose loss was non-finite (training stops there), or None."""
    progress = Progress(log, "TAR outer step", params.outer_steps, start=outer.first - 1)
    for step in range(outer.first, params.outer_steps + 1):
        adversaries = [sample_adversary(outer.rng, params) for _ in range(params.adversaries_per_step)]
        lr = outer.optimizer.param_groups[0]["lr"]
        stats = tar_outer_step(models.model, models.frozen, outer.optimizer, adversaries, data, params,
                               models.anchor, where)
        if stats["finite"]:  # a skipped outer step does not advance the warmup
            outer.warmup.step()
        outer.history.append(log_line(step, lr, adversaries, stats))
        progress.update(step, progress_line(outer.history[-1]), force=True)  # every step: they are minutes apart
        if not stats["finite"]:
            return step
        if step % params.checkpoint_every == 0 and step < params.outer_steps:
            where.save_checkpoint(checkpoints, step, checkpoint_state(run, step, models.model, data, outer, where))
    return None


def log_line(step: int, lr: float, adversaries: list[Adversary], stats: dict[str, Any]) -> dict[str, Any]:
    """One outer step of the history: its adversaries, losses and phase wall times (those not in the file)."""
    tr = stats["tr_losses"]
    return {
        "step": step, "outer_lr": lr, "adversaries": [asdict(a) for a in adversaries],
        "retain_loss": stats["retain_loss"], "tr_loss": sum(tr) / len(tr) if tr else None,
        "tr_weighted_sum": sum(stats["tr_weighted"]), "adversary_loss": stats["adversary_losses"][-1],
        **{k: stats[k] for k in PHASES},
    }


def progress_line(h: dict[str, Any]) -> str:
    """An outer step's line in the job's log, from its line in tar_log.jsonl."""
    tr_loss = "none" if h["tr_loss"] is None else f"{h['tr_loss']:.4g}"
    return (f"retain_loss {h['retain_loss']:.4g}, tr_loss {tr_loss}, tr_weighted_sum {h['tr_weighted_sum']:.4g}, "
            f"adversary_loss {h['adversary_loss']:.4g}, outer_lr {h['outer_lr']:.3g}, step {h['step_s']:.1f}s")


def save_outputs(models: Models, history: list[dict[str, Any]], diverged: int | None, out_dir: Path,
                 where: OneProcess) -> None:
    """tar_log.jsonl and the model (or a DIVERGED marker); the checkpoints go once every process is done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if where.writer:
        lines = ({k: v for k, v in h.items() if k not in PHASES} for h in history)
        (out_dir / TAR_LOG).write_text("".join(json.dumps(line) + "\n" for line in lines))
    if diverged is None:
        where.save_model(models.model, models.tokenizer, out_dir)
    elif where.writer:
        mark_diverged(out_dir, diverged)
    where.barrier()  # no process reads a checkpoint any more
    if where.writer:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)  # the output is the model, not how it got there


def record(outer: OuterState, diverged: int | None, model: nn.Module, rows: dict[str, int], anchor_dir: Path | None,
           params: TARParams, where: OneProcess) -> dict[str, Any]:
    """The training record: status, steps, final losses, mean phase timings, settings."""
    history, first = outer.history, outer.first
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "steps": len(history),
        "final": history[-1] if history else None,
        "mean_phase_s": {k: sum(h[k] for h in history) / len(history) for k in PHASES} if history else None,
        "resumed_from_step": first - 1 if first > 1 else None,
        "random_mapping": outer.random_mapping_log[-1] if outer.random_mapping_log else None,
        "trainable_parameters": trainable_parameters(model),
        "rows": rows,
        "anchor": str(anchor_dir) if anchor_dir is not None else None,
        "params": params.record(),
        **where.describe(),
    }
