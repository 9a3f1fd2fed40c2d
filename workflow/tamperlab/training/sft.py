"""Supervised fine-tuning, the loop the harmful fine-tuning attacks (attacks.finetune) and safety tuning
(models.alignment) share: LoRA or full fine-tuning on (prompt -> response) rows, through the HF Trainer so that the
same code runs under DeepSpeed.

One run trains to the largest of its `steps` and saves a snapshot at every `steps` value. Under a constant learning
rate this is exact: the first n steps of a longer run see the same batches and the same learning rates as a run of
n steps (tests/test_attack.py proves it). Other schedules depend on the horizon, so the workflow gives them one run
per `steps` value. A run checkpoints as it goes and resumes after a kill.

The loop knows no model source: its caller hands it a loader, which it calls once the TrainingArguments exist
(under ZeRO-3 from_pretrained then loads each process's shard only: training.trainer.prepare_sharded_loading).

`batch_size` is the global batch: under a multi-process launch (DeepSpeed ZeRO-3, see tamperlab.runtime.launch) each
process takes an equal share of every batch, in the same data order, so that the run does not depend on how it was
launched. Then every process runs this code; the weight gathers for a save are collective, and only rank 0 writes
files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab.chat import encode_example
from tamperlab.training.packing import training_collator
from tamperlab.training.trainer import (
    CHECKPOINTS,
    mark_diverged,
    prepare_sharded_loading,
    save_trained,
    train_resuming,
    trainable_parameters,
    trainer_arguments,
    went_non_finite,
)


def default_lora_alpha(rank: int) -> float:
    """LoRA's alpha when the config sets none: 2 x rank (Lermen et al.), applied as a run's params are made (a float,
    as a configured alpha is: adapter_config.json records it)."""
    return float(2 * rank)


@dataclass
class SFTParams:
    """One fine-tuning run's settings: an attack's run of its grid, or safety tuning's."""

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

    def __post_init__(self) -> None:
        if self.method == "lora" and self.lora_alpha is None:  # the one place LoRA's alpha gets its default
            self.lora_alpha = default_lora_alpha(self.rank)


def snapshot_name(steps: int) -> str:
    return f"steps{steps}"


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


def finetune(load: Callable[[], tuple[Any, Any]], rows: list[dict[str, Any]], params: SFTParams, out_dir: Path,
             deepspeed: Path | None = None) -> dict[str, Any]:
    """Fine-tune the model `load()` gives (with its tokenizer) on each row's (prompt -> response) and snapshot into
    out_dir/steps<N>/.

    LoRA snapshots are PEFT adapters (applied on the base at evaluation time); full fine-tuning snapshots are
    whole safetensors models. Returns the training record (loss log, status, diverged step).
    """
    from datasets import Dataset
    from transformers import Trainer, set_seed

    set_seed(params.seed)
    checkpoints = out_dir / CHECKPOINTS
    args = trainer_arguments(  # before the model: see prepare_sharded_loading
        checkpoints, max_steps=max(params.steps), lr=params.lr, batch_size=params.batch_size, seed=params.seed,
        scheduler=params.scheduler, warmup=params.warmup_ratio, checkpoint_every=params.checkpoint_every,
        deepspeed=deepspeed,
    )
    prepare_sharded_loading(args)
    model, tokenizer = load()
    model.train()
    set_seed(params.seed)  # sharded loading may draw random numbers; the LoRA init must not depend on the launch
    if params.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=params.rank, lora_alpha=params.lora_alpha, lora_dropout=0.0,
            target_modules=params.target_modules, task_type="CAUSAL_LM",
        ))
    tokenizer.padding_side = "right"
    encoded = [encode_example(tokenizer, r["prompt"], r["response"], None, params.max_length) for r in rows]

    snapshots = _callback_class()(model, tokenizer, out_dir, params.steps)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(encoded),
                      data_collator=training_collator(model, tokenizer),
                      callbacks=[snapshots])
    snapshots.trainer = trainer
    resumed_from = train_resuming(trainer, checkpoints)
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
                mark_diverged(target, diverged)
    trainer.accelerator.wait_for_everyone()  # every file is written before any process goes on
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "resumed_from_step": resumed_from,
        "final_loss": losses[-1]["loss"] if losses else None,
        "trainable_parameters": trainable_parameters(model),
        "examples": len(encoded),
    }
