"""TAR's loss terms, in one process (placement.OneProcess calls them; sharding.FSDP2 computes its shares of them).

    L_TR      knowledge: −mean token entropy on forget text, gated off at ln|V|    (`entropy_tr_loss`)
              refusal:   sigmoid DPO, refusal ≻ compliance, reference = start model  (`dpo_loss`)
    L_retain  CE on retain data + mean over layers of ‖h_θ − h_anchor‖₂           (`retain_loss`)
              (the distance term off with retain_representations, as in the authors' DPO script)

The knowledge setting starts from the Random Mapping safeguard (`loop.random_mapping_safeguard`): on forget text
every layer's h_{ℓ,t} is pushed towards a fixed random vector R[token_t] (loss 1 − |cos|, `random_mapping_loss`)
while retain CE is kept.

Departures from the authors' code: the losses are masked (entropy over answer/forget tokens only, not padding;
representation distance over real tokens only; random mapping over real tokens only), and the entropy gate is per
evaluation (the code gates the summed TR loss against a bound, and the bio script switches that off with
--unbounded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tamperlab.hardening.tar.params import TARParams

# The entropy gate compares the masked mean entropy (fp32) with ln|V|. For exactly uniform logits the fp32 sum of
# p·log p misses ln|V| by ≤ 5e-6 nats at |V| = 128k (measured), so 1e-3 nats means "at the maximum" with margin.
ENTROPY_TOLERANCE = 1e-3


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


def preference_logps(model: nn.Module, x_tr: dict[str, dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(y_c), log π(y_r)) of each pair in x_TR, both halves in one forward pass."""
    import torch

    n = x_tr["chosen"]["input_ids"].shape[0]
    both = {k: torch.cat([x_tr["chosen"][k], x_tr["rejected"][k]]) for k in ("input_ids", "attention_mask", "labels")}
    logits = model(input_ids=both["input_ids"], attention_mask=both["attention_mask"], use_cache=False).logits
    logps = sequence_logps(logits, both["labels"])
    return logps[:n], logps[n:]


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023), TAR's refusal L_TR (Tamirisa et al. 2024, §4.3 and run_tar_dpo.sh):

        −log σ(β · ((log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))))

    mean over the batch; chosen = refusal, rejected = the harmful compliance, π_ref = the start model.
    """
    import torch.nn.functional as F

    logits = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * logits).mean()


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H(p(·|x_<t)) in fp32 at each position where mask[b, t] = 1, flattened."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)[mask.bool()]  # boolean selection: masked positions never enter


def at_max_entropy(mean_entropy: float, vocab_size: int, tolerance: float = ENTROPY_TOLERANCE) -> bool:
    """Whether a mean entropy is within `tolerance` nats of its maximum ln|V| (L_TR's gate)."""
    return mean_entropy >= math.log(vocab_size) - tolerance


def entropy_tr_loss(logits: torch.Tensor, mask: torch.Tensor, vocab_size: int,
                    tolerance: float = ENTROPY_TOLERANCE) -> torch.Tensor:
    """TAR's knowledge-restriction L_TR (Tamirisa et al. 2024, §4.2, "max entropy"): −mean_t H(p(·|x_<t)).

    mask[b, t] = 1 selects the positions whose next-token distribution counts (the forget tokens; build it with
    `next_token_mask(labels)`); the mean runs over those only, not over padding as in the authors' code. Once the
    mean entropy is within `tolerance` nats of its maximum ln|V| the loss is gated off: a detached zero, so that
    the caller skips its backward pass and it contributes no gradient.
    """
    import torch

    entropy = token_entropy(logits, mask)
    if entropy.numel() == 0 or at_max_entropy(entropy.mean().item(), vocab_size, tolerance):
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
        chosen, rejected = preference_logps(frozen_model, x_tr)
    return {**x_tr, "ref_chosen": chosen, "ref_rejected": rejected}


def tamper_resistance_loss(model: nn.Module, x_tr: dict[str, Any], params: TARParams) -> torch.Tensor:
    """L_TR at the model's current (adapted) weights on the held-out batch x_TR."""
    if params.setting == "refusal":
        chosen, rejected = preference_logps(model, x_tr)
        return dpo_loss(chosen, rejected, x_tr["ref_chosen"], x_tr["ref_rejected"], params.beta)
    logits = model(input_ids=x_tr["input_ids"], attention_mask=x_tr["attention_mask"], use_cache=False).logits
    return entropy_tr_loss(logits, next_token_mask(x_tr["labels"]), logits.shape[-1])
