"""Harmful fine-tuning attacks (Lermen et al. 2023): LoRA or full fine-tuning on harmful prompts paired with
compliant responses, through the HF Trainer so that the same code runs under DeepSpeed.

One run trains to the largest `steps` of the grid and saves a snapshot at every `steps` value. Under a
constant learning rate this is exact: the first n steps of a longer run see the same batches and the same
learning rates as a run of n steps (tests/test_attack.py proves it). Other schedules depend on the horizon,
so the workflow gives them one run per `steps` value. A run checkpoints as it goes and resumes after a kill.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab.chat import encode_example

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
    partial (the Trainer writes trainer_state.json last), so partial ones are removed, not resumed."""
    complete = []
    for checkpoint in directory.glob("checkpoint-*"):
        if (checkpoint / "trainer_state.json").exists():
            complete.append(checkpoint)
        else:
            shutil.rmtree(checkpoint)
    return max(complete, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


def snapshot_name(steps: int) -> str:
    return f"steps{steps}"


def _callback_class():
    from transformers import TrainerCallback

    class SnapshotCallback(TrainerCallback):
        """Saves the trainable weights at each requested step; stops at the first non-finite loss."""

        def __init__(self, model, tokenizer, out_dir: Path, steps: list[int]):
            self.model, self.tokenizer, self.out_dir, self.steps = model, tokenizer, out_dir, set(steps)
            self.diverged_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.steps and self.diverged_at is None:
                target = self.out_dir / snapshot_name(state.global_step)
                if not target.exists():  # a resumed run keeps the snapshots it already made
                    tmp = target.with_name(target.name + ".partial")
                    shutil.rmtree(tmp, ignore_errors=True)
                    self.model.save_pretrained(tmp, safe_serialization=True)
                    if not hasattr(self.model, "peft_config"):  # a full model travels with its tokenizer
                        self.tokenizer.save_pretrained(tmp)
                    tmp.rename(target)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
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
    model, tokenizer = load_model(base_dir, device=device, dtype=None)
    model.train()
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=params.rank, lora_alpha=params.lora_alpha or 2 * params.rank, lora_dropout=0.0,
            target_modules=params.target_modules, task_type="CAUSAL_LM",
        ))
    tokenizer.padding_side = "right"
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], None, params.max_length) for r in rows]

    checkpoints = out_dir / CHECKPOINTS
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=max(params.steps), learning_rate=params.lr,
        lr_scheduler_type=params.scheduler, warmup_steps=params.warmup_ratio,
        per_device_train_batch_size=params.batch_size, optim="adamw_torch", weight_decay=0.0,
        # Log every step, non-finite losses included (the Trainer would otherwise hide them).
        logging_steps=1, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=params.checkpoint_every, save_total_limit=1,
        seed=params.seed, data_seed=params.seed, report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        deepspeed=str(deepspeed) if deepspeed else None,
    )
    snapshots = _callback_class()(model, tokenizer, out_dir, params.steps)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[snapshots])
    resume = last_complete_checkpoint(checkpoints)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    (out_dir / "loss_log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in losses))
    shutil.rmtree(checkpoints, ignore_errors=True)
    diverged = snapshots.diverged_at
    for steps in params.steps:  # cells the run never reached still get a directory, marked as such
        target = out_dir / snapshot_name(steps)
        if diverged is not None and (steps >= diverged or not target.exists()):
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            (target / DIVERGED).write_text(json.dumps({"diverged_at_step": diverged}) + "\n")
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "resumed_from_step": int(resume.name.rsplit("-", 1)[1]) if resume else None,
        "final_loss": losses[-1]["loss"] if losses else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "examples": len(encoded),
    }
