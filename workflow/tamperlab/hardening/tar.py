"""TAR — Tamper-Resistant Safeguards for Open-Weight LLMs (Tamirisa et al., 2024), as the authors' code runs it.

Adversarial meta-learning, first order. Each outer step:

    θ₀ ← θ                                     snapshot
    for each of N sampled adversaries a = (data, lr, M):
        θ′ ← θ₀; fresh AdamW(lr), constant lr
        for j = 0 … K−1:
            θ′ ← AdamW step on SFT(θ′, a's batch j)            retain batches for j < M in the switch adversary
            if (j+1) mod tr_every = 0:
                g_TR += λ_TR · w_j / N · ∇θ′ L_TR(θ′, x_TR)    w_j = exp(0.0625 · (j − (K−1))), x_TR held out
        θ ← θ₀                                  restore, bit for bit
    g = λ_ret · ∇θ L_retain(θ, x_r) + g_TR; outer AdamW step

    L_TR      knowledge: −mean token entropy on forget text, gated off at ln|V|    (`entropy_tr_loss`)
              refusal:   sigmoid DPO, refusal ≻ compliance, reference = start model  (`dpo_loss`)
    L_retain  CE on retain data + mean over layers of ‖h_θ − h_anchor‖₂           (`retain_loss`)
              (the distance term off with retain_representations, as in the authors' DPO script)

The knowledge setting starts from the Random Mapping safeguard (`random_mapping_safeguard`): on forget text every
layer's h_{ℓ,t} is pushed towards a fixed random vector R[token_t] (loss 1 − |cos|) while retain CE is kept.

Constants from the authors' scripts. run_tar_bio.sh (the defaults here): K = 64, tr_every = 4, schedule 0.0625,
λ_TR = 4, adversary lr ∈ {2e-6, 2e-5, 4e-5}, switch share 0.33 with M ~ Beta(6, 3)·K, outer lr 2e-5 with 32 warmup
steps, N = 1, retain loss with the representation term, starting from the Random-Mapped checkpoint.
run_tar_dpo.sh (refusal; in the repository's history at fae6509, deleted by the next commit): K = 8 with L_TR at
every inner step (tar_inner_loop_subsample 1), λ_TR = 0.1, outer lr 6e-5, 100 outer steps, N = 2, harmful
completions only (switch share 0), batch 4 × 2 accumulation steps, and no --retain_representations (retain loss =
CE only). The paper's Table 12 (via TamperBench) lists K = 64 and batch 64 for this setting instead. N in
"w_j / N" is the number of adversaries sampled per outer step (tar_num_tasks_sampled), as in the code and in the
paper's Algorithm 1.

Departures from the authors' code (the pitfalls the paper's re-evaluations list, plus what a single process
needs): any HF causal LM (no FSDP-v1 internals); losses are masked (entropy over answer/forget tokens only, not
padding; representation distance over real tokens only; random mapping over real tokens only); x_TR comes from a
held-out split of the forget data, never from the adversary's loader; the pad token is never EOS; plain AdamW with
linear warmup stands in for schedule-free AdamW; the entropy gate is per evaluation (the code gates the summed TR
loss against a bound, and the bio script switches that off with --unbounded); one batch size for the adversary,
the TR batch and the retain batch (the bio script uses 4 for the adversary, 8 elsewhere). The representation
anchor is a setting of its own (`anchor_dir`; default the model `harden` starts from, copied before any Random
Mapping): the code anchors to the original Instruct model (retain_model_name) while it starts the bio run from
the Random-Mapped checkpoint, so either pass that Instruct model as the anchor or run Random Mapping here.

Where the model lives is a setting of its own (`OneProcess`): here, one process holds every parameter; with
tar_sharded.FSDP2 (`tamperlab harden --fsdp` under torchrun) each of several processes holds a shard of every
parameter and optimizer state, and a share of every batch, and the same loop below runs unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tamperlab.chat import encode_example
from tamperlab.errors import UserError
from tamperlab.logs import Progress
from tamperlab.training import CHECKPOINTS, mark_diverged, trainable_parameters

if TYPE_CHECKING:
    import torch
    from torch import nn

SETTINGS = ("knowledge", "refusal")
FORGET, SWITCH = "forget", "retain_forget_switch"  # adversary data types
SWITCH_BETA = (6.0, 3.0)  # M ~ Beta(6, 3)·K: the switch adversary spends most of its budget on retain data first
# The entropy gate compares the masked mean entropy (fp32) with ln|V|. For exactly uniform logits the fp32 sum of
# p·log p misses ln|V| by ≤ 5e-6 nats at |V| = 128k (measured), so 1e-3 nats means "at the maximum" with margin.
ENTROPY_TOLERANCE = 1e-3
TAR_LOG = "tar_log.jsonl"
log = logging.getLogger(__name__)


@dataclass
class TARParams:
    setting: str = "knowledge"  # knowledge (entropy L_TR) | refusal (DPO L_TR)
    outer_steps: int = 750  # bio 750, refusal 100
    inner_steps: int = 64  # K adversary steps per sampled adversary
    tr_every: int = 4  # evaluate L_TR after every tr_every-th inner step
    lambda_tr: float = 4.0  # bio 4.0, refusal 0.1
    lambda_retain: float = 1.0
    outer_lr: float = 2e-5  # refusal 6e-5
    warmup_steps: int = 32  # linear warmup of the outer lr
    adversary_lrs: Sequence[float] = (2e-6, 2e-5, 4e-5)
    switch_fraction: float = 0.33  # probability of the retain→forget switch adversary (refusal script: 0)
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    beta: float = 0.1  # DPO temperature
    adversaries_per_step: int = 1  # N in λ_TR·w_j/N (bio 1, refusal 2)
    schedule_lambda: float = 0.0625  # w_j = exp(schedule_lambda · (j − (K−1)))
    holdout_fraction: float = 0.25  # share of the forget rows kept out of the adversary's reach, for x_TR
    random_mapping_steps: int = 0  # knowledge: Random Mapping steps run before TAR (0: the model has it already)
    random_mapping_lr: float = 2e-5
    retain_representations: bool = True  # L_retain's ‖h_θ − h_anchor‖ term (bio script: on; DPO script: off)
    checkpoint_every: int = 25  # outer steps between resumable checkpoints (no effect on the result)


@dataclass
class Adversary:
    """One train-time attack: SFT on `data` at a constant `lr`; the switch adversary trains on retain data for its
    first `switch_step` (M) steps, then on forget data."""

    data: str
    lr: float
    switch_step: int | None = None

    def uses_retain(self, j: int) -> bool:
        return self.switch_step is not None and j < self.switch_step


@dataclass
class TARData:
    """Endless batch streams. The adversary sees only `forget` and `adversary_retain`; `heldout` supplies x_TR."""

    forget: BatchStream  # forget-domain SFT batches (refusal: harmful prompt + compliance)
    adversary_retain: BatchStream  # retain batches for the switch adversary's first phase
    retain: BatchStream  # retain batches for the outer retain loss
    heldout: BatchStream  # x_TR: knowledge, forget text; refusal, {"chosen": refusal, "rejected": compliance}


# ---------------------------------------------------------------------------------------------------------------------
# Encoding and batching


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    """BOS + text + EOS, every token learned (plain forget/retain text of the knowledge setting)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def encode_row(tokenizer: Any, row: dict[str, str], answer_key: str, max_length: int) -> dict[str, list[int]]:
    """A {"text"} row as plain text, a {"prompt", answer_key} row as a chat turn with the prompt's labels -100."""
    if "text" in row:
        return encode_text(tokenizer, row["text"], max_length)
    return encode_example(tokenizer, row["prompt"], row[answer_key], None, max_length)


def collate(examples: list[dict[str, list[int]]], pad_token_id: int, device: Any = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad ids on input_ids, 0 on attention_mask, -100 on labels."""
    import torch

    length = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (length - len(e[key])) for e in examples], device=device)

    return {"input_ids": pad("input_ids", pad_token_id), "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100)}


def collate_preference(pairs: list[tuple[dict, dict]], pad_token_id: int, device: Any = None) -> dict[str, dict]:
    """(chosen, rejected) pairs padded to one common length, so that one forward pass takes both halves."""
    both = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_token_id, device)
    n = len(pairs)
    return {"chosen": {k: v[:n] for k, v in both.items()}, "rejected": {k: v[n:] for k, v in both.items()}}


class BatchStream:
    """Endless epochs over items, reshuffled each epoch by its own seeded RNG (streams never share a sequence).
    An iterator rather than a generator, so that its position can be checkpointed and restored (resume)."""

    def __init__(self, items: list, batch_size: int, collate_fn: Callable[[list], Any], seed: str):
        self.items, self.batch_size, self.collate_fn = items, batch_size, collate_fn
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self.position >= len(self.order):  # a new epoch
            self.order = list(range(len(self.items)))
            self.rng.shuffle(self.order)
            self.position = 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.collate_fn([self.items[i] for i in index])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order, self.position = list(state["order"]), state["position"]


def make_data(tokenizer: Any, forget: list[dict[str, str]], retain: list[dict[str, str]], params: TARParams,
              device: Any = None) -> TARData:
    """Split the forget rows into the adversary's share and a held-out share for x_TR, encode, and stream.

    knowledge: forget/retain rows are {"text"} (or {"prompt", "response"}). refusal: forget rows are
    {"prompt", "refusal", "compliance"} (the adversary learns the compliance, L_TR prefers the refusal) and retain
    rows {"prompt", "response"} (or {"text"}).
    """
    rows = list(forget)
    random.Random(f"{params.seed}:holdout").shuffle(rows)
    n_heldout = max(1, round(params.holdout_fraction * len(rows)))
    heldout_rows, adversary_rows = rows[:n_heldout], rows[n_heldout:]
    if not adversary_rows or not retain:
        raise UserError(f"TAR needs forget rows for both the adversary and x_TR (got {len(rows)}) and retain rows "
                        f"(got {len(retain)})")
    length, pad, seed = params.max_length, tokenizer.pad_token_id, params.seed

    def stream(items: list, name: str, fn: Callable = collate) -> Iterator:
        return BatchStream(items, params.batch_size, lambda b: fn(b, pad, device), f"{seed}:{name}")

    retain_examples = [encode_row(tokenizer, r, "response", length) for r in retain]
    if params.setting == "refusal":
        adversary_examples = [encode_example(tokenizer, r["prompt"], r["compliance"], None, length)
                              for r in adversary_rows]
        heldout = stream([(encode_example(tokenizer, r["prompt"], r["refusal"], None, length),
                           encode_example(tokenizer, r["prompt"], r["compliance"], None, length))
                          for r in heldout_rows], "heldout", collate_preference)
    else:
        adversary_examples = [encode_row(tokenizer, r, "response", length) for r in adversary_rows]
        heldout = stream([encode_row(tokenizer, r, "response", length) for r in heldout_rows], "heldout")
    return TARData(forget=stream(adversary_examples, "forget"),
                   adversary_retain=stream(retain_examples, "adversary_retain"),
                   retain=stream(retain_examples, "retain"), heldout=heldout)


# ---------------------------------------------------------------------------------------------------------------------
# The loss terms


def next_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """mask[b, t] = 1 where the logits at t predict a learned token (labels[b, t+1] ≠ −100); 0 at the last position."""
    import torch

    return torch.cat([labels[:, 1:] != -100, torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(y_t | y_<t) over the answer tokens (labels ≠ −100) of each sequence: DPO's log π(y|x), shape [B]."""
    import torch

    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logp * mask).sum(-1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023), TAR's refusal L_TR (Tamirisa et al. 2024, §4.3 and run_tar_dpo.sh):

        −log σ(β · ((log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))))

    mean over the batch; chosen = refusal, rejected = the harmful compliance, π_ref = the start model.
    """
    import torch.nn.functional as F

    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * logits).mean()


def entropy_tr_loss(logits: torch.Tensor, mask: torch.Tensor, vocab_size: int,
                    tolerance: float = ENTROPY_TOLERANCE) -> torch.Tensor:
    """TAR's knowledge-restriction L_TR (Tamirisa et al. 2024, §4.2, "max entropy"): −mean_t H(p(·|x_<t)).

    mask[b, t] = 1 selects the positions whose next-token distribution counts (the forget tokens; build it with
    `next_token_mask(labels)`); the mean runs over those only, not over padding as in the authors' code. Once the
    mean entropy is within `tolerance` nats of its maximum ln|V| the loss is gated off: a detached zero, so that
    the caller skips its backward pass and it contributes no gradient.
    """
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)[mask.bool()]  # boolean selection: masked positions never enter
    if entropy.numel() == 0 or entropy.mean().item() >= math.log(vocab_size) - tolerance:
        return torch.zeros((), device=logits.device)
    return -entropy.mean()


def random_vectors(vocab_size: int, hidden_size: int, seed: int, device: Any = None) -> torch.Tensor:
    """R ∈ R^{|V|×d}: one fixed Gaussian vector per token, drawn from its own seeded generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab_size, hidden_size, generator=generator).to(device)


def random_mapping_loss(hidden_states: Sequence[torch.Tensor], token_ids: torch.Tensor, mask: torch.Tensor,
                        random_vectors: torch.Tensor) -> torch.Tensor:
    """Random Mapping, TAR's initial knowledge safeguard (Tamirisa et al. 2024, App. B.2): mean over layers ℓ and
    real tokens t of 1 − |cos(h_{ℓ,t}, R[token_t])|. hidden_states are all of them, the embedding output included,
    as the authors' code takes them."""
    import torch
    import torch.nn.functional as F

    selected = mask.bool()
    targets = random_vectors[token_ids[selected]].float()
    per_layer = [(1 - F.cosine_similarity(h[selected].float(), targets, dim=-1).abs()).mean() for h in hidden_states]
    return torch.stack(per_layer).mean()


def representation_distance(hidden_states: Sequence[torch.Tensor], base_hidden_states: Sequence[torch.Tensor],
                            mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean over real tokens of ‖h_θ − h_base‖₂ (TAR's representation retain term)."""
    import torch

    selected = mask.bool()
    per_layer = [torch.linalg.vector_norm((h[selected] - b[selected]).float(), dim=-1).mean()
                 for h, b in zip(hidden_states, base_hidden_states, strict=True)]
    return torch.stack(per_layer).mean()


def retain_loss(model: nn.Module, anchor: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """TAR's L_retain (Tamirisa et al. 2024, §4.1, obj_model_mse_representations): next-token CE on retain data
    plus the representation distance to the frozen anchor model; CE only when anchor is None (the authors' DPO
    run, obj_standard_max_next_token)."""
    import torch

    if anchor is None:
        return model(**batch, use_cache=False).loss
    out = model(**batch, output_hidden_states=True, use_cache=False)
    with torch.no_grad():
        base = anchor(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True, use_cache=False)
    return out.loss + representation_distance(out.hidden_states, base.hidden_states, batch["attention_mask"])


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The adversary's objective: next-token CE on its batch's learned tokens."""
    return model(**batch, use_cache=False).loss


def with_reference_logps(frozen_model: nn.Module, x_tr: dict[str, dict]) -> dict[str, Any]:
    """x_TR for DPO with the start model's log π_ref(y_c), log π_ref(y_r), computed once per batch."""
    import torch

    with torch.no_grad():
        chosen, rejected = _preference_logps(frozen_model, x_tr)
    return {**x_tr, "ref_chosen": chosen, "ref_rejected": rejected}


def _preference_logps(model: nn.Module, x_tr: dict[str, dict]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    n = x_tr["chosen"]["input_ids"].shape[0]
    both = {k: torch.cat([x_tr["chosen"][k], x_tr["rejected"][k]]) for k in ("input_ids", "attention_mask", "labels")}
    logits = model(input_ids=both["input_ids"], attention_mask=both["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, both["labels"])
    return logps[:n], logps[n:]


def tamper_resistance_loss(model: nn.Module, x_tr: dict[str, Any], params: TARParams) -> torch.Tensor:
    """L_TR at the model's current (adapted) weights on the held-out batch x_TR."""
    if params.setting == "refusal":
        chosen, rejected = _preference_logps(model, x_tr)
        return dpo_loss(chosen, rejected, x_tr["ref_chosen"], x_tr["ref_rejected"], params.beta)
    logits = model(input_ids=x_tr["input_ids"], attention_mask=x_tr["attention_mask"], use_cache=False).logits
    return entropy_tr_loss(logits, next_token_mask(x_tr["labels"]), logits.shape[-1])


def tr_weight(j: int, params: TARParams) -> float:
    """λ_TR · w_j / N with w_j = exp(0.0625 · (j − (K−1))): later, more-adapted steps weigh more; the last weighs 1."""
    w = math.exp(params.schedule_lambda * (j - (params.inner_steps - 1)))
    return params.lambda_tr * w / params.adversaries_per_step


# ---------------------------------------------------------------------------------------------------------------------
# Where the model lives


class OneProcess:
    """One process holds the whole model: the loss terms above, θ copied whole, one checkpoint file, the model
    saved as it is. The loop reaches the model only through these methods, so that tar_sharded.FSDP2 (several
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


# ---------------------------------------------------------------------------------------------------------------------
# The adversary, the inner loop, the outer step


def sample_adversary(rng: random.Random, params: TARParams) -> Adversary:
    """Data type from the mixture (switch with probability switch_fraction), lr uniform over adversary_lrs,
    switch point M = ⌊Beta(6, 3)·K⌋ for the switch adversary."""
    data = SWITCH if rng.random() < params.switch_fraction else FORGET
    lr = rng.choice(list(params.adversary_lrs))
    switch_step = int(rng.betavariate(*SWITCH_BETA) * params.inner_steps) if data == SWITCH else None
    return Adversary(data=data, lr=lr, switch_step=switch_step)


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


def _now() -> float:
    import torch

    if torch.cuda.is_available():  # kernels are asynchronous: a phase ends when its kernels have run
        torch.cuda.synchronize()
    return time.perf_counter()


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
        t0 = _now()
        batch = next(data.adversary_retain if adversary.uses_retain(j) else data.forget)
        model.zero_grad(set_to_none=True)
        loss = where.sft_loss(model, batch)
        loss.backward()
        inner_optimizer.step()
        stats["adversary_losses"].append(where.value(loss))
        stats["inner_s"] += _now() - t0

        if (j + 1) % params.tr_every == 0:
            t0 = _now()
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
            stats["tr_losses"].append(where.value(tr))
            stats["tr_weighted"].append(where.value(weighted))
            stats["tr_s"] += _now() - t0
    model.zero_grad(set_to_none=True)
    return stats


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
    t_step = _now()
    theta = where.snapshot(model)
    tr_grads: dict[str, torch.Tensor] = {}
    stats: dict[str, Any] = {"inner_s": 0.0, "tr_s": 0.0, "restore_s": _now() - t_step, "tr_losses": [],
                             "tr_weighted": [], "adversary_losses": []}
    for adversary in adversaries:
        t0 = _now()
        x_tr = next(data.heldout)  # one held-out batch per adversary, evaluated at every θ′_j
        if params.setting == "refusal":
            x_tr = where.reference(frozen, x_tr)
        stats["tr_s"] += _now() - t0
        inner = adversary_inner_loop(model, adversary, data, x_tr, params, tr_grads, where)
        for key in ("inner_s", "tr_s"):
            stats[key] += inner[key]
        for key in ("tr_losses", "tr_weighted", "adversary_losses"):
            stats[key] += inner[key]
        t0 = _now()
        where.restore(model, theta)
        stats["restore_s"] += _now() - t0

    t0 = _now()
    outer_optimizer.zero_grad(set_to_none=True)
    anchor = (anchor if anchor is not None else frozen) if params.retain_representations else None
    loss = params.lambda_retain * where.retain_loss(model, anchor, next(data.retain))
    loss.backward()
    for n, p in model.named_parameters():
        if n in tr_grads:
            p.grad = tr_grads[n] if p.grad is None else p.grad.add_(tr_grads[n])
    stats["retain_loss"] = where.value(loss)
    stats["finite"] = math.isfinite(stats["retain_loss"]) and all(math.isfinite(x) for x in stats["tr_weighted"])
    if stats["finite"]:
        outer_optimizer.step()
    outer_optimizer.zero_grad(set_to_none=True)
    stats["retain_s"] = _now() - t0
    stats["step_s"] = _now() - t_step
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Drivers


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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: out_dir/checkpoints/step-<n>.pt after every checkpoint_every-th outer step, removed at the end


def rng_states() -> dict[str, Any]:
    """Every global RNG (python, numpy, torch CPU and CUDA): dropout and anything else may draw from them."""
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], prune: bool = True) -> None:
    """Write state as directory/step-<step>.pt, atomically: into a .tmp file, fsynced, then renamed, so a kill
    mid-write leaves a .tmp that never counts as a checkpoint. Older checkpoints are removed once it is in place
    (with `prune`; else by `prune_checkpoints`, once every process has written its own)."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = directory / f"step-{step}.pt", directory / f"step-{step}.pt.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if prune:
        prune_checkpoints(directory, step)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Remove every checkpoint in directory but step-<keep>.pt."""
    for old in directory.glob("step-*.pt"):
        if old.name != f"step-{keep}.pt":
            old.unlink()


def checkpoint_steps(directory: Path) -> list[Path]:
    """The complete checkpoints in directory, oldest first; partial writes (.tmp) are removed."""
    for tmp in directory.glob("step-*.pt.tmp"):
        tmp.unlink()
    return sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


def load_checkpoint(directory: Path, run: str) -> dict[str, Any] | None:
    """The latest complete checkpoint of this very run (same `run` key: hyperparameters, model, anchor), or None.
    Partial writes (.tmp) and checkpoints of another run (the config changed since) are removed."""
    import torch

    found = checkpoint_steps(directory)
    if not found:
        return None
    state = torch.load(found[-1], map_location="cpu", weights_only=False)  # written by this job: RNG states, logs
    if state["run"] != run:
        log.warning("TAR: %s is from other settings; starting over", found[-1])
        shutil.rmtree(directory)
        return None
    return state


def harden(model_dir: Path, forget: list[dict[str, str]], retain: list[dict[str, str]], params: TARParams,
           out_dir: Path, device: str | None = None, deepspeed: Path | None = None,
           anchor_dir: Path | None = None, where: OneProcess = ONE_PROCESS) -> dict[str, Any]:
    """Run TAR on the model in model_dir and save it (safetensors, with its tokenizer) into out_dir, beside
    tar_log.jsonl (per outer step: adversaries, losses, phase wall times).

    anchor_dir: the retain loss's representation anchor, a model of the same architecture and vocabulary (the
    authors anchor the bio run, which starts from a Random-Mapped checkpoint, to the original Instruct model);
    None: the start model as loaded, before any Random Mapping.

    Rows are described in `make_data`. In the knowledge setting with random_mapping_steps > 0, Random Mapping runs
    first. A non-finite loss stops training: out_dir then holds a DIVERGED marker instead of a model.
    Every checkpoint_every outer steps the whole state (weights, optimizer, warmup, adversary sampler, data
    streams, global RNGs, logs) goes to out_dir/checkpoints; a rerun into the same out_dir continues from the
    latest one, bit for bit as if never stopped. Returns the training record (status, steps, final losses, mean
    phase timings). `where`: one process (the default) or tar_sharded.FSDP2's shards (use tar_sharded.harden).
    """
    import torch

    if deepspeed is not None:  # TAR's snapshot/restore loop holds its own copy of the parameters (of their shards)
        raise UserError("TAR does not run under DeepSpeed ZeRO; shard it with --fsdp (FSDP2, launched by torchrun)")
    if params.setting not in SETTINGS:
        raise UserError(f"TAR: unknown setting {params.setting!r} (expected one of {', '.join(SETTINGS)})")
    if params.tr_every < 1 or params.inner_steps < params.tr_every:
        raise UserError(f"TAR: inner_steps ({params.inner_steps}) must be ≥ tr_every ({params.tr_every}) ≥ 1")
    if params.checkpoint_every < 1:
        raise UserError(f"TAR: checkpoint_every must be ≥ 1 (got {params.checkpoint_every})")
    checkpoints = out_dir / CHECKPOINTS
    # What must match for a checkpoint to be continued (checkpoint_every does not change the result)
    run = json.dumps({"params": {**asdict(params), "adversary_lrs": list(params.adversary_lrs), "checkpoint_every":
                                 None}, "model": str(model_dir), "anchor": str(anchor_dir), **where.describe()},
                     sort_keys=True)
    resume = where.load_checkpoint(checkpoints, run)
    torch.manual_seed(params.seed)
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
    device_of = next(model.parameters()).device
    data = make_data(tokenizer, forget, retain, params, device_of)

    rm_log: list[dict[str, float]] = []
    if params.setting == "knowledge" and params.random_mapping_steps > 0 and resume is None:
        rm_log = random_mapping_safeguard(model, data.forget, data.adversary_retain, params.random_mapping_steps,
                                          params.random_mapping_lr, params.seed, where)

    outer_optimizer = torch.optim.AdamW(model.parameters(), lr=params.outer_lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(outer_optimizer,
                                               lambda s: min(1.0, (s + 1) / max(1, params.warmup_steps)))
    rng = random.Random(params.seed)
    history, diverged, first = [], None, 1
    if resume is not None:  # everything the next outer step reads, as it was after step resume["step"]
        where.load_model_state(model, resume["model"])
        where.load_optimizer_state(outer_optimizer, resume["optimizer"])
        warmup.load_state_dict(resume["scheduler"])
        rng.setstate(resume["adversary_rng"])
        for name, stream_state in resume["streams"].items():
            getattr(data, name).load_state_dict(stream_state)
        set_rng_states(resume["rng"])
        history, rm_log, first = resume["log"], resume["random_mapping_log"], resume["step"] + 1
        log.info("TAR: resuming after outer step %d/%d from %s", resume["step"], params.outer_steps, checkpoints)
    resume = None  # its tensors are copied in; let them go
    progress = Progress(log, "TAR outer step", params.outer_steps, start=first - 1)
    for step in range(first, params.outer_steps + 1):
        adversaries = [sample_adversary(rng, params) for _ in range(params.adversaries_per_step)]
        lr = outer_optimizer.param_groups[0]["lr"]
        stats = tar_outer_step(model, frozen, outer_optimizer, adversaries, data, params, anchor, where)
        if stats["finite"]:  # a skipped outer step does not advance the warmup
            warmup.step()
        tr = stats["tr_losses"]
        history.append({
            "step": step, "outer_lr": lr, "adversaries": [asdict(a) for a in adversaries],
            "retain_loss": stats["retain_loss"], "tr_loss": sum(tr) / len(tr) if tr else None,
            "tr_weighted_sum": sum(stats["tr_weighted"]), "adversary_loss": stats["adversary_losses"][-1],
            **{k: stats[k] for k in ("inner_s", "tr_s", "restore_s", "retain_s", "step_s")},
        })
        h = history[-1]
        tr_loss = "none" if h["tr_loss"] is None else f"{h['tr_loss']:.4g}"
        progress.update(step, f"retain_loss {h['retain_loss']:.4g}, tr_loss {tr_loss}, tr_weighted_sum "
                        f"{h['tr_weighted_sum']:.4g}, adversary_loss {h['adversary_loss']:.4g}, outer_lr {lr:.3g}, "
                        f"step {h['step_s']:.1f}s", force=True)  # every step: they are minutes apart
        if not stats["finite"]:
            diverged = step
            break
        if step % params.checkpoint_every == 0 and step < params.outer_steps:
            where.save_checkpoint(checkpoints, step, {
                "run": run, "step": step, "model": where.model_state(model),
                "optimizer": where.optimizer_state(outer_optimizer),
                "scheduler": warmup.state_dict(), "adversary_rng": rng.getstate(),
                "streams": {f.name: getattr(data, f.name).state_dict() for f in fields(data)}, "rng": rng_states(),
                "log": history, "random_mapping_log": rm_log})

    out_dir.mkdir(parents=True, exist_ok=True)
    if where.writer:
        (out_dir / TAR_LOG).write_text("".join(json.dumps(h) + "\n" for h in history))
    if diverged is None:
        where.save_model(model, tokenizer, out_dir)
    elif where.writer:
        mark_diverged(out_dir, diverged)
    where.barrier()  # no process reads a checkpoint any more
    if where.writer:
        shutil.rmtree(checkpoints, ignore_errors=True)  # the output is the model, not how it got there
    phases = ("inner_s", "tr_s", "restore_s", "retain_s", "step_s")
    return {
        "status": "diverged" if diverged is not None else "complete",
        "diverged_at_step": diverged,
        "steps": len(history),
        "final": history[-1] if history else None,
        "mean_phase_s": {k: sum(h[k] for h in history) / len(history) for k in phases} if history else None,
        "resumed_from_step": first - 1 if first > 1 else None,
        "random_mapping": rm_log[-1] if rm_log else None,
        "trainable_parameters": trainable_parameters(model),
        "rows": {"forget": len(forget), "retain": len(retain)},
        "anchor": str(anchor_dir) if anchor_dir is not None else None,
        "params": {**asdict(params), "adversary_lrs": list(params.adversary_lrs)},
        **where.describe(),
    }
