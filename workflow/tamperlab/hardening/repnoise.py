"""RepNoise — Representation Noising (Rosati et al., NeurIPS 2024), as the authors' code computes it.

A batch holds B pairs that share a prompt: a harmful sequence (prompt + unsafe answer) and a harmless one (prompt +
refusal), right-padded to one length T. The answer region is where their token ids differ. The loss is

    L = CE_s + β·MMD − α·ln H

    CE_s  retain: masked next-token cross-entropy on the harmless sequence
    H     bounded ascent: (CE_out + Σ_ℓ CE_ℓ) / (L+1) + 1 on the harmful sequence, CE_ℓ the logit lens of each of
          the L+1 hidden states; −α·ln H has gradient −α/H·∇H, so the ascent slows as H grows
    MMD   noise: per decoder layer, the MLP output on the harmful answer tokens against N(0, I) samples, mean over
          layers

with α = 1, β = 0.001. Each term is one function below; `repnoise_loss` runs the two forward passes and combines
them; `harden` trains with the HF Trainer (so that the same code runs under DeepSpeed) and saves the model.

Under a multi-process launch (DeepSpeed ZeRO-3, runtime.launch) `batch_size` stays the global batch, split evenly
over the processes in the single-process data order. The loss is then the mean over processes of each one's loss on
its share (plain data parallelism). The cross-entropy terms then equal the single-process ones when every pair's
answer has as many tokens; MMD and its bandwidth are per-process statistics of per-process noise, so that term (and
through it the weights, at β's scale) differs from a single-process run.

Departures from the authors' code, all fixes that Qi et al. (2024) list or that PEFT/DeepSpeed need: the pad token is
not EOS and token id 0 is not treated as padding; the mask is restricted to each sequence's own tokens (the raw
"ids differ" mask also covers one sequence's padding where the other is longer); the prediction of the first answer
token is kept (the authors zero the logits where the mask is 0, which makes that prediction uniform); the noise comes
from a seeded generator; hooks are removed after every pass; modules are found by walking the model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamperlab.chat import encode_example
from tamperlab.errors import UserError
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
    from torch import nn

ALPHA, BETA = 1.0, 0.001
BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)  # h·{1/4, 1/2, 1, 2, 4}
TRAIN_LOG = "train_log.jsonl"
TERMS = ("retain_ce", "mmd", "bounded_harmful_ce")  # logged beside the Trainer's "loss" (the total)


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


# ---------------------------------------------------------------------------------------------------------------------
# Pairs: harmful and harmless sequences with the same prompt, padded together


def encode_pair(tokenizer: Any, prompt: str, harmful: str, harmless: str, max_length: int,
                system_prompt: str | None = None) -> dict[str, list[int]]:
    """Unpadded token ids of prompt + harmful answer and prompt + harmless answer (chat template, EOS appended)."""
    harmful_ids = encode_example(tokenizer, prompt, harmful, system_prompt, max_length)["input_ids"]
    harmless_ids = encode_example(tokenizer, prompt, harmless, system_prompt, max_length)["input_ids"]
    if harmful_ids == harmless_ids:  # nothing differs within max_length: the pair would have an empty answer region
        raise UserError(f"RepNoise pair with prompt {prompt[:60]!r}: harmful and harmless sequences are identical "
                        f"within max_length={max_length} tokens (answers equal, or the prompt fills max_length)")
    return {"harmful_input_ids": harmful_ids, "harmless_input_ids": harmless_ids}


def collate_pairs(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad both sequences of every pair to one length T and mark the answer region.

    m[b,t] = 1 where the harmful and harmless token ids differ. The prompts are identical, so m covers the answers;
    `harmful_mask` and `harmless_mask` are m restricted to that sequence's own (non-pad) tokens.
    """
    import torch

    length = max(len(ids) for row in rows for ids in (row["harmful_input_ids"], row["harmless_input_ids"]))

    def pad(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row[key])] = torch.tensor(row[key])
            attention[b, :len(row[key])] = 1
        return ids, attention

    harmful_ids, harmful_attention = pad("harmful_input_ids")
    harmless_ids, harmless_attention = pad("harmless_input_ids")
    differ = harmful_ids != harmless_ids
    return {
        "harmful_input_ids": harmful_ids, "harmful_attention_mask": harmful_attention,
        "harmless_input_ids": harmless_ids, "harmless_attention_mask": harmless_attention,
        "harmful_mask": differ & harmful_attention.bool(), "harmless_mask": differ & harmless_attention.bool(),
    }


def encode_pairs(tokenizer: Any, prompts: list[str], harmful_responses: list[str], harmless_responses: list[str],
                 max_length: int, system_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """One padded batch of pairs (see `collate_pairs`), padded with the tokenizer's pad token, never EOS."""
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError("RepNoise needs a pad token distinct from EOS")
    rows = [encode_pair(tokenizer, p, h, s, max_length, system_prompt)
            for p, h, s in zip(prompts, harmful_responses, harmless_responses, strict=True)]
    return collate_pairs(rows, tokenizer.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------------
# Finding the modules the loss reads, on any decoder-only model (plain, PEFT-wrapped)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks: the first ModuleList whose every entry has an `mlp` (model.model.layers in Llama)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(m, "mlp") for m in module):
            return list(module)
    raise ValueError(f"{type(model).__name__}: no decoder layers with an `mlp` found")


def readout(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(final norm, LM head): what turns a hidden state into logits, i.e. the logit lens."""
    decoder = model.get_decoder()  # PEFT forwards this to the wrapped model
    if not hasattr(decoder, "norm"):
        raise ValueError(f"{type(decoder).__name__}: no final `norm` for the logit lens")
    return decoder.norm, model.get_output_embeddings()


@contextmanager
def captured_mlp_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects each decoder layer's MLP output (before the residual add), in layer order, while inside the block.

    The hooks are removed on leaving, also when the forward raises: a leftover hook would keep capturing (and
    holding memory) in every later forward, the attack's included.
    """
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)  # MoE MLPs also return router logits

    handles = [layer.mlp.register_forward_hook(keep) for layer in decoder_layers(model)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------------------------------
# The loss terms


def masked_next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t from the logits at t−1, over the tokens with mask[b,t] = 1.

    The paper's masked CE (used for CE_s and CE_out): averaged over selected tokens, not over sequences.
    """
    import torch.nn.functional as F

    selected = mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][selected].float(), input_ids[:, 1:][selected])


def retain_loss(harmless_logits: torch.Tensor, harmless_ids: torch.Tensor, harmless_mask: torch.Tensor) -> torch.Tensor:
    """CE_s: masked next-token cross-entropy on the harmless answer (keeps refusing and harmless behaviour)."""
    return masked_next_token_ce(harmless_logits, harmless_ids, harmless_mask)


def logit_lens_ce(hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, norm: nn.Module,
                  head: nn.Module) -> torch.Tensor:
    """CE_ℓ: masked next-token CE of hidden state ℓ read out through the final norm and the LM head.

    Equal to masked_next_token_ce(head(norm(hidden)), …); only the selected positions go through the head, which
    saves L+1 full-vocabulary logit tensors.
    """
    import torch.nn.functional as F

    selected = mask[:, 1:].bool()
    logits = head(norm(hidden[:, :-1][selected]))
    return F.cross_entropy(logits.float(), input_ids[:, 1:][selected])


def bounded_harmful_ce(harmful_logits: torch.Tensor, hidden_states: tuple[torch.Tensor, ...],
                       harmful_ids: torch.Tensor, harmful_mask: torch.Tensor, norm: nn.Module,
                       head: nn.Module) -> torch.Tensor:
    """H = (CE_out + Σ_ℓ CE_ℓ) / (L+1) + 1 over the L+1 hidden states (embeddings and every layer's output).

    As in the authors' code, the last hidden state (already normed by the model) goes through the norm again.
    """
    ce_out = masked_next_token_ce(harmful_logits, harmful_ids, harmful_mask)
    ce_layers = [logit_lens_ce(hidden, harmful_ids, harmful_mask, norm, head) for hidden in hidden_states]
    return (ce_out + sum(ce_layers)) / len(hidden_states) + 1


def ascent_term(bounded_ce: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """−α·ln H: gradient ascent on the harmful CE whose gradient −α/H·∇H vanishes as H grows."""
    import torch

    return -alpha * torch.log(bounded_ce)


def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased MMD² between samples x [n, D] and y [m, D] with a sum of Gaussian kernels exp(−‖a−b‖² / (c·h)),
    c ∈ {1/4, 1/2, 1, 2, 4}, h = mean squared distance between distinct samples of x ∪ y (no gradient through h).
    """
    import torch

    z = torch.cat([x, y]).float()
    n = z.shape[0]
    squared = (z * z).sum(1)
    # ‖a‖² + ‖b‖² − 2a·b needs n×n×D less memory than differencing every pair; the diagonal is exactly 0.
    distances = (squared[:, None] + squared[None, :] - 2 * z @ z.T).clamp_min(0)
    distances = distances * (1 - torch.eye(n, device=z.device))
    h = (distances.detach().sum() / (n * n - n)).clamp_min(torch.finfo(z.dtype).tiny)
    kernel = sum(torch.exp(-distances / (c * h)) for c in BANDWIDTH_MULTIPLIERS)
    k_xx, k_yy, k_xy = kernel[:len(x), :len(x)], kernel[len(x):, len(x):], kernel[:len(x), len(x):]
    return k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()


def noise_loss(mlp_outputs: list[torch.Tensor], harmful_mask: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """MMD between each layer's MLP output on the harmful answer tokens and N(0, I), mean over layers.

    Outside the mask both activations and noise are 0; each example is one T·d vector.
    """
    import torch

    per_layer = []
    for output in mlp_outputs:
        mask = harmful_mask.unsqueeze(-1).to(output.dtype)
        noise = torch.randn(output.shape, generator=generator, device=generator.device).to(output.device)
        per_layer.append(mmd((output * mask).flatten(1), (noise * mask).flatten(1)))
    return torch.stack(per_layer).mean()


def total_loss(retain: torch.Tensor, noise: torch.Tensor, bounded_ce: torch.Tensor, alpha: float = ALPHA,
               beta: float = BETA) -> torch.Tensor:
    """L = CE_s + β·MMD − α·ln H."""
    return retain + beta * noise + ascent_term(bounded_ce, alpha)


@dataclass
class RepNoiseLoss:
    total: torch.Tensor
    retain_ce: torch.Tensor
    mmd: torch.Tensor
    bounded_harmful_ce: torch.Tensor  # H


def repnoise_loss(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator,
                  alpha: float = ALPHA, beta: float = BETA, unwrapped: nn.Module | None = None) -> RepNoiseLoss:
    """The RepNoise loss of one batch of pairs (see `collate_pairs`) and its terms.

    `model` is what runs the forward (under the Trainer, possibly a DDP/DeepSpeed wrapper); `unwrapped` is the same
    model without such a wrapper, where the layers, norm and head are looked up (defaults to `model`).
    """
    unwrapped = unwrapped if unwrapped is not None else model
    with captured_mlp_outputs(unwrapped) as mlp_outputs:
        harmful = model(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"],
                        output_hidden_states=True, use_cache=False)
    harmless = model(input_ids=batch["harmless_input_ids"], attention_mask=batch["harmless_attention_mask"],
                     use_cache=False)
    norm, head = readout(unwrapped)

    retain = retain_loss(harmless.logits, batch["harmless_input_ids"], batch["harmless_mask"])
    bounded = bounded_harmful_ce(harmful.logits, harmful.hidden_states, batch["harmful_input_ids"],
                                 batch["harmful_mask"], norm, head)
    noise = noise_loss(mlp_outputs, batch["harmful_mask"], generator)
    return RepNoiseLoss(total_loss(retain, noise, bounded, alpha, beta), retain, noise, bounded)


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


def harden(model_dir: Path, pairs: list[dict[str, str]], params: RepNoiseParams, out_dir: Path,
           device: str | None = None, deepspeed: Path | None = None) -> dict[str, Any]:
    """Train the model in model_dir with the RepNoise loss on pairs ({prompt, harmful, harmless[, system_prompt]})
    and save it (safetensors, with its tokenizer) into out_dir, beside train_log.jsonl (per-step loss terms).

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
    rows = [encode_pair(tokenizer, p["prompt"], p["harmful"], p["harmless"], params.max_length, p.get("system_prompt"))
            for p in pairs]

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
