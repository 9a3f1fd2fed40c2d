"""RepNoise hardening: a model trained with the RepNoise loss (hardening.repnoise_loss) under the HF Trainer, so that
the same code runs under DeepSpeed, and saved.

Under a multi-process launch (DeepSpeed ZeRO-3, runtime.launch) `batch_size` stays the global batch, split evenly
over the processes in the single-process data order. The loss is then the mean over processes of each one's loss on
its share (plain data parallelism). The cross-entropy terms then equal the single-process ones when every pair's
answer has as many tokens; MMD and its bandwidth are per-process statistics of per-process noise, so that term (and
through it the weights, at β's scale) differs from a single-process run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamperlab.errors import UserError
from tamperlab.hardening.repnoise_loss import ALPHA, BETA, TERMS, collate_pairs, encode_pair, repnoise_loss
from tamperlab.training.trainer import (
    CHECKPOINTS,
    mark_diverged,
    prepare_sharded_loading,
    save_trained,
    train_resuming,
    trainer_arguments,
    went_non_finite,
)

if TYPE_CHECKING:
    import torch

TRAIN_LOG = "train_log.jsonl"


@dataclass
class RepNoiseParams:
    """Defaults are the paper's 7B recipe (Adam lr 2e-5, cosine with 10% warmup, 1 epoch, batch 8, length 128)."""

    lr: float = 2e-5
    epochs: float = 1.0
    steps: int | None = None  # when set, train this many optimizer steps instead of `epochs`
    batch_size: int = 8
    alpha: float = ALPHA
    beta: float = BETA
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    max_length: int = 128
    seed: int = 0
    checkpoint_every: int = 500


def noise_generator(seed: int, step: int, rank: int, device: Any) -> torch.Generator:
    """The noise source of one optimizer step: seeded by (seed, step, rank), so a resumed run draws the same noise
    as an uninterrupted one and data-parallel ranks draw different noise."""
    import torch

    return torch.Generator(device=device).manual_seed(hash((seed, step, rank)) % 2**63)  # int tuples hash stably


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _trainer_class():
    from transformers import Trainer

    class RepNoiseTrainer(Trainer):
        """The HF Trainer with the RepNoise loss; logs the terms beside the total; stops at a non-finite loss."""

        def __init__(self, *args, alpha: float, beta: float, noise_seed: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.alpha, self.beta, self.noise_seed = alpha, beta, noise_seed
            self.generator, self.generator_step = None, None
            self.terms: list[dict[str, torch.Tensor]] = []  # micro-batches since the last log
            self.diverged_at: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.generator_step != self.state.global_step:  # micro-batches of one step share one stream
                self.generator_step = self.state.global_step
                self.generator = noise_generator(self.noise_seed, self.state.global_step, self.args.process_index,
                                                 self.args.device)
            loss = repnoise_loss(model, inputs, self.generator, self.alpha, self.beta,
                                 unwrapped=self.accelerator.unwrap_model(model))
            self.terms.append({term: getattr(loss, term).detach() for term in TERMS})  # not the graph
            return (loss.total, loss) if return_outputs else loss.total

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self.terms:
                if self.accelerator.num_processes == 1:
                    for term in TERMS:
                        logs[term] = sum(t[term].item() for t in self.terms) / len(self.terms)
                else:  # every process logs here together (the Trainer gathers the loss): log the mean over all
                    import torch

                    local = torch.stack([torch.stack([t[term] for t in self.terms]).mean() for term in TERMS])
                    logs.update(zip(TERMS, self.accelerator.reduce(local.float(), reduction="mean").tolist(),
                                    strict=True))
                self.terms = []
            super().log(logs, start_time)
            if "loss" in logs and went_non_finite(self.args, logs) and self.diverged_at is None:
                self.diverged_at = self.state.global_step
                self.control.should_training_stop = True

    return RepNoiseTrainer


def _encode(tokenizer, pairs: list[dict[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    return [encode_pair(tokenizer, p["prompt"], p["harmful"], p["harmless"], max_length, p.get("system_prompt"),
                        (p["retain_prompt"], p["retain_response"]) if "retain_prompt" in p else None)
            for p in pairs]


def harden(model_dir: Path, pairs: list[dict[str, str]], params: RepNoiseParams, out_dir: Path,
           device: str | None = None, deepspeed: Path | None = None) -> dict[str, Any]:
    """Train the model in model_dir with the RepNoise loss on pairs ({prompt, harmful, harmless[, system_prompt]
    [, retain_prompt, retain_response]: a benign example whose answer joins the retain term}) and save it
    (safetensors, with its tokenizer) into out_dir, beside train_log.jsonl (per-step loss terms).

    Full-parameter training, as in the paper. Checkpoints go to out_dir/checkpoints and a rerun resumes from the
    last complete one. A non-finite loss stops training: out_dir then holds a DIVERGED marker instead of a model.
    Returns the training record (status, steps, final loss terms).
    """
    from datasets import Dataset
    from transformers import set_seed

    from tamperlab.models.registry import load_model

    set_seed(params.seed)
    checkpoints = out_dir / CHECKPOINTS
    args = trainer_arguments(  # before the model: see training.prepare_sharded_loading
        checkpoints, epochs=params.epochs, max_steps=params.steps or -1, lr=params.lr, batch_size=params.batch_size,
        seed=params.seed, scheduler=params.scheduler, warmup=params.warmup_ratio,
        checkpoint_every=params.checkpoint_every, deepspeed=deepspeed,
    )
    prepare_sharded_loading(args)
    model, tokenizer = load_model(model_dir, device=device, dtype=None)
    model.train()
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError(f"{model_dir}: RepNoise needs a pad token distinct from EOS")
    rows = _encode(tokenizer, pairs, params.max_length)

    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=lambda batch: collate_pairs(batch, tokenizer.pad_token_id),
        alpha=params.alpha, beta=params.beta, noise_seed=params.seed,
    )
    resumed_from = train_resuming(trainer, checkpoints)

    log = [{"step": h["step"], "loss": h["loss"], **{t: h[t] for t in TERMS if t in h}}
           for h in trainer.state.log_history if "loss" in h]
    diverged = trainer.diverged_at
    if trainer.is_world_process_zero():
        (out_dir / TRAIN_LOG).write_text("".join(json.dumps(h) + "\n" for h in log))
        if diverged is not None:
            mark_diverged(out_dir, diverged)
    if diverged is None:
        save_trained(trainer, model, out_dir)  # under ZeRO-3 a collective: every process calls it
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(out_dir)
    if trainer.is_world_process_zero():
        shutil.rmtree(checkpoints, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # every file is written before any process goes on
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "resumed_from_step": resumed_from,
        "steps": trainer.state.global_step,
        "final": log[-1] if log else None,
        "pairs": len(rows),
        "params": asdict(params),
    }
