"""The RepNoise loss — Representation Noising (Rosati et al., NeurIPS 2024), as the authors' code computes it.

A batch holds B pairs that share a prompt: a harmful sequence (prompt + unsafe answer) and a harmless one (prompt +
refusal), right-padded to one length T. The answer region is where their token ids differ. The loss is

    L = CE_s + β·MMD − α·ln H

    CE_s  retain: masked next-token cross-entropy on the harmless sequence
    H     bounded ascent: (CE_out + Σ_ℓ CE_ℓ) / (L+1) + 1 on the harmful sequence, CE_ℓ the logit lens of each of
          the L+1 hidden states; −α·ln H has gradient −α/H·∇H, so the ascent slows as H grows
    MMD   noise: per decoder layer, the MLP output on the harmful answer tokens against N(0, I) samples, mean over
          layers

with α = 1, β = 0.001. Each term is one function below; `repnoise_loss` runs the two forward passes and combines
them. Training with it: hardening.repnoise.

Departures from the authors' code, all fixes that Qi et al. (2024) list or that PEFT/DeepSpeed need: the pad token is
not EOS and token id 0 is not treated as padding; the mask is restricted to each sequence's own tokens (the raw
"ids differ" mask also covers one sequence's padding where the other is longer); the prediction of the first answer
token is kept (the authors zero the logits where the mask is 0, which makes that prediction uniform); the noise comes
from a seeded generator; hooks are removed after every pass; modules are found by walking the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tamperlab.chat import encode_example
from tamperlab.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

ALPHA, BETA = 1.0, 0.001
BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)  # h·{1/4, 1/2, 1, 2, 4}
TERMS = ("retain_ce", "mmd", "bounded_harmful_ce")  # RepNoiseLoss's terms, logged beside the total


# ---------------------------------------------------------------------------------------------------------------------
# Pairs: harmful and harmless sequences with the same prompt, padded together


def encode_pair(tokenizer: Any, prompt: str, harmful: str, harmless: str, max_length: int,
                system_prompt: str | None = None,
                retain: tuple[str, str] | None = None) -> dict[str, list[int]]:
    """Unpadded token ids of prompt + harmful answer and prompt + harmless answer (chat template, EOS appended);
    with `retain` (a benign prompt and its answer: the benign-retain variant) that example's ids and labels too."""
    harmful_ids = encode_example(tokenizer, prompt, harmful, system_prompt, max_length)["input_ids"]
    harmless_ids = encode_example(tokenizer, prompt, harmless, system_prompt, max_length)["input_ids"]
    if harmful_ids == harmless_ids:  # nothing differs within max_length: the pair would have an empty answer region
        raise UserError(f"RepNoise pair with prompt {prompt[:60]!r}: harmful and harmless sequences are identical "
                        f"within max_length={max_length} tokens (answers equal, or the prompt fills max_length)")
    pair = {"harmful_input_ids": harmful_ids, "harmless_input_ids": harmless_ids}
    if retain is not None:
        example = encode_example(tokenizer, *retain, system_prompt, max_length)
        pair.update(retain_input_ids=example["input_ids"], retain_labels=example["labels"])
    return pair


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
    batch = {
        "harmful_input_ids": harmful_ids, "harmful_attention_mask": harmful_attention,
        "harmless_input_ids": harmless_ids, "harmless_attention_mask": harmless_attention,
        "harmful_mask": differ & harmful_attention.bool(), "harmless_mask": differ & harmless_attention.bool(),
    }
    if "retain_input_ids" in rows[0]:  # benign examples, padded to their own length: their answer is the mask
        width = max(len(row["retain_input_ids"]) for row in rows)
        batch["retain_input_ids"] = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        batch["retain_attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
        batch["retain_mask"] = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, row in enumerate(rows):
            size = len(row["retain_input_ids"])
            batch["retain_input_ids"][b, :size] = torch.tensor(row["retain_input_ids"])
            batch["retain_attention_mask"][b, :size] = 1
            batch["retain_mask"][b, :size] = torch.tensor(row["retain_labels"]) != -100
    return batch


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


def retain_loss(harmless_logits: torch.Tensor, harmless_ids: torch.Tensor, harmless_mask: torch.Tensor,
                retain: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """CE_s: masked next-token cross-entropy on the harmless answer (keeps refusing and harmless behaviour); with
    `retain` (logits, ids, mask of benign examples: the benign-retain variant) over their answer tokens too, one
    mean over all the selected tokens."""
    import torch
    import torch.nn.functional as F

    if retain is None:
        return masked_next_token_ce(harmless_logits, harmless_ids, harmless_mask)
    parts = [(harmless_logits, harmless_ids, harmless_mask), retain]
    selected = [mask[:, 1:].bool() for _, _, mask in parts]
    logits = torch.cat([lg[:, :-1][m].float() for (lg, _, _), m in zip(parts, selected, strict=True)])
    targets = torch.cat([ids[:, 1:][m] for (_, ids, _), m in zip(parts, selected, strict=True)])
    return F.cross_entropy(logits, targets)


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
    benign = None
    if "retain_input_ids" in batch:
        logits = model(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"],
                       use_cache=False).logits
        benign = (logits, batch["retain_input_ids"], batch["retain_mask"])
    norm, head = readout(unwrapped)

    retain = retain_loss(harmless.logits, batch["harmless_input_ids"], batch["harmless_mask"], benign)
    bounded = bounded_harmful_ce(harmful.logits, harmful.hidden_states, batch["harmful_input_ids"],
                                 batch["harmful_mask"], norm, head)
    noise = noise_loss(mlp_outputs, batch["harmful_mask"], generator)
    return RepNoiseLoss(total_loss(retain, noise, bounded, alpha, beta), retain, noise, bounded)
