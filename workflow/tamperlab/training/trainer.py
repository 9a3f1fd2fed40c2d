"""What attacks, alignment and hardening share: Trainer arguments, checkpoints and resume, divergence, DeepSpeed
config, saving.

Each stage trains through the HF Trainer so that the same code runs in one process and under DeepSpeed ZeRO-3
(tamperlab.runtime.launch). The rules for doing that well (how a run resumes after a kill, when a run has diverged,
how a sharded model is saved) live here once, so that the stages are peers over one module and a fix reaches them all.

`batch_size` is always the global batch: under a multi-process launch each process takes an equal share of every
batch, in the same data order, so that a run does not depend on how it was launched.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from tamperlab.errors import UserError
from tamperlab.runtime.launch import is_writer, read_zero3_config, world_size

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

CHECKPOINTS = "checkpoints"  # the Trainer's checkpoints, inside a run's output directory
DIVERGED = "DIVERGED"  # marker file in an output directory whose training loss became non-finite


# ---------------------------------------------------------------------------------------------------------------------
# Trainer arguments


def trainer_arguments(output_dir: Path, *, lr: float, batch_size: int, seed: int, scheduler: str, warmup: float,
                      checkpoint_every: int, deepspeed: Path | None = None, max_steps: int = -1,
                      epochs: float | None = None) -> TrainingArguments:
    """The TrainingArguments of every stage: AdamW without weight decay, a log line every step (non-finite losses
    included: the Trainer would otherwise hide them), one checkpoint kept, seeded data order, on the GPU if any.

    `warmup` is the Trainer's warmup_steps (a number of steps, or a fraction < 1 of them). Training runs `max_steps`
    optimizer steps, or (max_steps = -1) `epochs` epochs; without `epochs`, the Trainer's default. Build this before
    loading the model (see prepare_sharded_loading).
    """
    import torch
    from transformers import TrainingArguments

    length = {} if epochs is None else {"num_train_epochs": epochs}
    return TrainingArguments(
        output_dir=str(output_dir), **length, max_steps=max_steps, learning_rate=lr, lr_scheduler_type=scheduler,
        warmup_steps=warmup, per_device_train_batch_size=per_device_batch(batch_size, world_size()),
        optim="adamw_torch", weight_decay=0.0,
        logging_steps=1, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=checkpoint_every, save_total_limit=1,
        seed=seed, data_seed=seed, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(deepspeed),
    )


def per_device_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global batch (the Trainer's per_device_train_batch_size)."""
    if batch_size % processes:
        raise UserError(f"batch_size {batch_size} does not split evenly over {processes} processes")
    return batch_size // processes


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed


def deepspeed_config(path: Path | None) -> str | None:
    """The Trainer's `deepspeed` argument, checked first: a config that would save shards fails before training."""
    if path is None:
        return None
    read_zero3_config(path)
    return str(path)


def prepare_sharded_loading(args: TrainingArguments) -> None:
    """With a ZeRO-3 config in the TrainingArguments, from_pretrained loads each process's shard only (zero.Init).
    zero.Init counts the processes through deepspeed.comm, which the Trainer would start only later: start it now
    (on the process group the TrainingArguments set up), or it counts one and rejects the global batch."""
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed()
        atexit.unregister(_end_process_group)  # once, however many runs this process trains (attack-grid)
        atexit.register(_end_process_group)


def _end_process_group() -> None:
    """Leave the process group at exit (a process that exits inside it was seen to abort, rarely). No barrier here:
    a process that failed must exit, not wait for the others; finished runs already met at their last barrier."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest Trainer checkpoint that was completely written; a kill while one was being saved leaves it
    partial (the Trainer writes trainer_state.json last), so partial ones are removed (by rank 0), not resumed."""
    complete = []
    for checkpoint in directory.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.json").exists():
            complete.append(checkpoint)
        elif is_writer():
            shutil.rmtree(checkpoint)
    return max(complete, key=_checkpoint_step, default=None)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def train_resuming(trainer: Trainer, checkpoints: Path) -> int | None:
    """trainer.train(), resumed from the last complete checkpoint in `checkpoints` if there is one (a rerun after a
    kill). Returns the step it resumed from, or None for a fresh start."""
    resume = last_complete_checkpoint(checkpoints)
    trainer.accelerator.wait_for_everyone()  # rank 0 removed partial checkpoints before anyone resumes
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return _checkpoint_step(resume) if resume else None


# ---------------------------------------------------------------------------------------------------------------------
# Divergence: a non-finite loss is a result (status: diverged), not a silent number


def went_non_finite(args: TrainingArguments, logs: dict[str, float]) -> bool:
    """Whether the step just logged diverged: its loss is not finite; under DeepSpeed also its gradient norm.

    A single process applies non-finite gradients and the next loss is non-finite. DeepSpeed skips such a step
    instead (fp32 and bf16 alike), so without this check the run would go on frozen and end "complete" (under fp16
    a skip is the loss scaler's routine, not divergence). The step found differs by one between the two.
    """
    values = [logs.get("loss")]
    if args.deepspeed and not args.fp16:
        values.append(logs.get("grad_norm"))
    return any(v is not None and not math.isfinite(v) for v in values)


def mark_diverged(directory: Path, step: int) -> None:
    """Write the DIVERGED marker into `directory` (in place of a model), recording the step that went non-finite."""
    (directory / DIVERGED).write_text(json.dumps({"diverged_at_step": step}) + "\n")


def diverged(path: Path) -> bool:
    """Whether the checkpoint directory `path` carries the DIVERGED marker (its training went non-finite)."""
    return (path / DIVERGED).exists()


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_trained(trainer: Trainer, model, directory: Path) -> None:
    """model.save_pretrained(directory): a PEFT model's adapter, else the whole model (safetensors).

    Under ZeRO-3 every process holds a shard of each weight, so every process must call this: the gather is a
    collective, then rank 0 writes the same files a single process would. A PEFT model gathers only its adapter.
    """
    if not trainer.is_deepspeed_enabled:
        model.save_pretrained(directory, safe_serialization=True)
        _sort_adapter_config(directory)
        return
    if hasattr(model, "peft_config"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            if trainer.is_world_process_zero():
                model.save_pretrained(directory, safe_serialization=True)
                _sort_adapter_config(directory)
    else:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)  # 16-bit weights, whole only on rank 0
        if trainer.is_world_process_zero():
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


def _sort_adapter_config(directory: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in the set's order, which Python's string hashing changes
    from process to process: sorted, the same adapter gives the same adapter_config.json bytes (tamperlab replay)."""
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))


def trainable_parameters(model) -> int:
    """How many weights training changes (under ZeRO-3 a parameter's local tensor is a shard; ds_numel is whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
