"""Harmful fine-tuning attacks (Lermen et al. 2023): LoRA or full fine-tuning on harmful prompts paired with
compliant responses, through the HF Trainer so that the same code runs under DeepSpeed.

One run trains to the largest `steps` of the grid and saves a snapshot at every `steps` value. Under a
constant learning rate this is exact: the first n steps of a longer run see the same batches and the same
learning rates as a run of n steps (tests/test_attack.py proves it). Other schedules depend on the horizon,
so the workflow gives them one run per `steps` value. A run checkpoints as it goes and resumes after a kill.

`batch_size` is the global batch: under a multi-process launch (DeepSpeed ZeRO-3, see tamperlab.launch) each process
takes an equal share of every batch, in the same data order, so that the run does not depend on how it was launched.
Then every process runs this code; the weight gathers for a save are collective, and only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab.chat import encode_example
from tamperlab.errors import UserError
from tamperlab.launch import is_writer, read_zero3_config, world_size

CHECKPOINTS = "checkpoints"
DIVERGED = "DIVERGED"  # marker file in a cell whose training loss became non-finite


@dataclass
class AttackParams:
    method: str  # lora | full
    lr: float
    steps: list[int]  # snapshot at each; trains to the largest
    rank: int | None
    lora_alpha: float | None
    target_modules: list[str]
    batch_size: int
    scheduler: str  # constant | linear | cosine
    warmup_ratio: float
    max_length: int
    checkpoint_every: int
    seed: int


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The newest Trainer checkpoint that was completely written; a kill while one was being saved leaves it
    partial (the Trainer writes trainer_state.json last), so partial ones are removed (by rank 0), not resumed."""
    complete = []
    for checkpoint in directory.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.json").exists():
            complete.append(checkpoint)
        elif is_writer():
            shutil.rmtree(checkpoint)
    return max(complete, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


def snapshot_name(steps: int) -> str:
    return f"steps{steps}"


def per_device_batch(batch_size: int, processes: int) -> int:
    """Each process's share of the global batch (the Trainer's per_device_train_batch_size)."""
    if batch_size % processes:
        raise UserError(f"batch_size {batch_size} does not split evenly over {processes} processes")
    return batch_size // processes


def deepspeed_config(path: Path | None) -> str | None:
    """The Trainer's `deepspeed` argument, checked first: a config that would save shards fails before training."""
    if path is None:
        return None
    read_zero3_config(path)
    return str(path)


def prepare_sharded_loading(args) -> None:
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


def save_trained(trainer, model, directory: Path) -> None:
    """model.save_pretrained(directory): a PEFT model's adapter, else the whole model (safetensors).

    Under ZeRO-3 every process holds a shard of each weight, so every process must call this: the gather is a
    collective, then rank 0 writes the same files a single process would. A PEFT model gathers only its adapter.
    """
    if not trainer.is_deepspeed_enabled:
        model.save_pretrained(directory, safe_serialization=True)
        return
    if hasattr(model, "peft_config"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            if trainer.is_world_process_zero():
                model.save_pretrained(directory, safe_serialization=True)
    else:
        state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed)  # 16-bit weights, whole only on rank 0
        if trainer.is_world_process_zero():
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


def went_non_finite(args, logs: dict[str, float]) -> bool:
    """Whether the step just logged diverged: its loss is not finite; under DeepSpeed also its gradient norm.

    A single process applies non-finite gradients and the next loss is non-finite. DeepSpeed skips such a step
    instead (fp32 and bf16 alike), so without this check the run would go on frozen and end "complete" (under fp16
    a skip is the loss scaler's routine, not divergence). The step found differs by one between the two.
    """
    values = [logs.get("loss")]
    if args.deepspeed and not args.fp16:
        values.append(logs.get("grad_norm"))
    return any(v is not None and not math.isfinite(v) for v in values)


def trainable_parameters(model) -> int:
    """How many weights training changes (under ZeRO-3 a parameter's local tensor is a shard; ds_numel is whole)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def _callback_class():
    from transformers import TrainerCallback

    class SnapshotCallback(TrainerCallback):
        """Saves the trainable weights at each requested step; stops at the first non-finite step (went_non_finite).

        Runs in every process (the Trainer logs the loss averaged over processes, so all stop together); `trainer`
        is set once the Trainer exists.
        """

        def __init__(self, model, tokenizer, out_dir: Path, steps: list[int]):
            self.model, self.tokenizer, self.out_dir, self.steps = model, tokenizer, out_dir, set(steps)
            self.trainer = None
            self.diverged_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.steps and self.diverged_at is None:
                target = self.out_dir / snapshot_name(state.global_step)
                # A resumed run keeps the snapshots it already made. Every process sees the same answer: rank 0
                # renames only after the gather below, which needs every process to have got past this test.
                if not target.exists():
                    tmp = target.with_name(target.name + ".partial")
                    writer = state.is_world_process_zero
                    if writer:
                        shutil.rmtree(tmp, ignore_errors=True)
                    save_trained(self.trainer, self.model, tmp)
                    if writer:
                        if not hasattr(self.model, "peft_config"):  # a full model travels with its tokenizer
                            self.tokenizer.save_pretrained(tmp)
                        tmp.rename(target)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if went_non_finite(args, logs or {}):
                self.diverged_at = state.global_step
                control.should_training_stop = True
            return control

    return SnapshotCallback


def attack(base_dir: Path, rows: list[dict[str, Any]], params: AttackParams, out_dir: Path,
           device: str | None = None, deepspeed: Path | None = None) -> dict[str, Any]:
    """Fine-tune the model in base_dir on each row's (prompt -> response) and snapshot into out_dir/steps<N>/.

    LoRA snapshots are PEFT adapters (applied on the base at evaluation time); full fine-tuning snapshots are
    whole safetensors models. Returns the training record (loss log, status, diverged step).
    """
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from tamperlab.models.registry import load_model

    set_seed(params.seed)
    checkpoints = out_dir / CHECKPOINTS
    args = TrainingArguments(  # before the model: see prepare_sharded_loading
        output_dir=str(checkpoints), max_steps=max(params.steps), learning_rate=params.lr,
        lr_scheduler_type=params.scheduler, warmup_steps=params.warmup_ratio,
        per_device_train_batch_size=per_device_batch(params.batch_size, world_size()), optim="adamw_torch",
        weight_decay=0.0,
        # Log every step, non-finite losses included (the Trainer would otherwise hide them).
        logging_steps=1, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=params.checkpoint_every, save_total_limit=1,
        seed=params.seed, data_seed=params.seed, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(deepspeed),
    )
    prepare_sharded_loading(args)
    model, tokenizer = load_model(base_dir, device=device, dtype=None)
    model.train()
    set_seed(params.seed)  # sharded loading may draw random numbers; the LoRA init must not depend on the launch
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=params.rank, lora_alpha=params.lora_alpha or 2 * params.rank, lora_dropout=0.0,
            target_modules=params.target_modules, task_type="CAUSAL_LM",
        ))
    tokenizer.padding_side = "right"
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], None, params.max_length) for r in rows]

    snapshots = _callback_class()(model, tokenizer, out_dir, params.steps)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[snapshots])
    snapshots.trainer = trainer
    resume = last_complete_checkpoint(checkpoints)
    trainer.accelerator.wait_for_everyone()  # rank 0 removed partial checkpoints before anyone resumes
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    diverged = snapshots.diverged_at
    if trainer.is_world_process_zero():
        (out_dir / "loss_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in losses))
        shutil.rmtree(checkpoints, ignore_errors=True)
        for steps in params.steps:  # cells the run never reached still get a directory, marked as such
            target = out_dir / snapshot_name(steps)
            if diverged is not None and (steps >= diverged or not target.exists()):
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                (target / DIVERGED).write_text(json.dumps({"diverged_at_step": diverged}) + "\n")
    trainer.accelerator.wait_for_everyone()  # every file is written before any process goes on
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "trainable_parameters": trainable_parameters(model),
        "examples": len(encoded),
    }
