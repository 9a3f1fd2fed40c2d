"""RepNoise: each loss term against an independent computation, hook hygiene, PEFT, and a short hardening run."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import harmful_prompts, save_base_model, tiny_llama
from safetensors.torch import load_file

from tamperlab.hardening import repnoise
from tamperlab.hardening import repnoise_loss as loss_terms
from tamperlab.hardening.repnoise import RepNoiseParams, harden
from tamperlab.hardening.repnoise_loss import (
    bounded_harmful_ce,
    captured_mlp_outputs,
    decoder_layers,
    encode_pairs,
    mmd,
    noise_loss,
    readout,
    repnoise_loss,
    retain_loss,
    total_loss,
)
from tamperlab.training.trainer import diverged

PROMPTS = harmful_prompts(8)
HARMFUL = [f"Sure, here is how. Step {i}: get what you need and go." for i in range(8)]
HARMLESS = ["I cannot help with that.", "Sorry, I will not do that. It could hurt someone."] * 4
LAYERS = 2


TOKENIZER_CORPUS = PROMPTS + HARMFUL + HARMLESS  # the conftest `tokenizer`'s


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, layers=LAYERS)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return encode_pairs(tokenizer, PROMPTS[:4], HARMFUL[:4], HARMLESS[:4], max_length=128)  # no truncation


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def our_hooks(model) -> list:
    """Forward hooks on any module other than the output-capturing ones transformers installs (and keeps) itself
    on the first output_hidden_states call."""
    return [hook for m in model.modules() for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
            if not getattr(hook, "__module__", "").startswith("transformers.")]


# --- pairs and masks ---------------------------------------------------------------------------------------------


def test_masks_select_exactly_the_differing_answer_tokens_and_no_padding(tokenizer, batch):
    from tamperlab.chat import prompt_text

    length = batch["harmful_input_ids"].shape[1]
    assert batch["harmless_input_ids"].shape[1] == length
    for b in range(4):
        rows = {}
        for side, answer in (("harmful", HARMFUL[b]), ("harmless", HARMLESS[b])):
            prompt = tokenizer(prompt_text(tokenizer, PROMPTS[b]), add_special_tokens=False)["input_ids"]
            rows[side] = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        shared = next(t for t, (a, c) in enumerate(zip(rows["harmful"], rows["harmless"], strict=False)) if a != c)
        assert shared >= len(prompt)  # the prompt never differs, so the mask lies in the answers
        for side, ids in rows.items():
            padded = batch[f"{side}_input_ids"][b]
            assert padded[:len(ids)].tolist() == ids
            assert (padded[len(ids):] == tokenizer.pad_token_id).all()  # padded with pad, not EOS
            assert tokenizer.pad_token_id != tokenizer.eos_token_id
            assert batch[f"{side}_attention_mask"][b].tolist() == [1] * len(ids) + [0] * (length - len(ids))
            other = rows["harmless" if side == "harmful" else "harmful"]
            # The paper's mask: own tokens whose id differs from the other sequence's at that position (or where
            # the other has ended). Answer tokens that happen to coincide position-wise are not in it.
            expected = [t < len(ids) and (t >= len(other) or ids[t] != other[t]) for t in range(length)]
            assert batch[f"{side}_mask"][b].tolist() == expected
            assert expected[shared] and not any(expected[:shared])


def test_a_pair_without_differing_tokens_is_rejected(tokenizer):
    from tamperlab.errors import UserError

    with pytest.raises(UserError, match="identical"):
        encode_pairs(tokenizer, PROMPTS[:1], HARMLESS[:1], HARMLESS[:1], max_length=64)


# --- retain CE ---------------------------------------------------------------------------------------------------


def test_retain_ce_equals_cross_entropy_over_the_selected_next_token_predictions(model, batch):
    ids, mask = batch["harmless_input_ids"], batch["harmless_mask"]
    logits = model(input_ids=ids, attention_mask=batch["harmless_attention_mask"]).logits
    predictions, targets = [], []
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                predictions.append(logits[b, t - 1])
                targets.append(ids[b, t])
    expected = F.cross_entropy(torch.stack(predictions), torch.stack(targets))
    torch.testing.assert_close(retain_loss(logits, ids, mask), expected)


def test_benign_retain_examples_join_the_retain_ce_over_their_answer_tokens(tokenizer, model, batch):
    from tamperlab.chat import encode_example
    from tamperlab.hardening.repnoise_loss import collate_pairs, encode_pair

    benign = [("Write a poem about the sea.", "Waves roll in and out."), ("hi", "Hello there, how can I help?")]
    rows = [encode_pair(tokenizer, PROMPTS[b], HARMFUL[b], HARMLESS[b], 128, retain=benign[b % 2]) for b in range(4)]
    mixed = collate_pairs(rows, tokenizer.pad_token_id)
    for key in batch:  # the pairs' tensors are the paper's, untouched
        assert torch.equal(mixed[key], batch[key])
    for b in range(4):
        example = encode_example(tokenizer, *benign[b % 2])
        size = len(example["input_ids"])
        assert mixed["retain_input_ids"][b, :size].tolist() == example["input_ids"]
        assert mixed["retain_mask"][b].tolist() == [label != -100 for label in example["labels"]] + [False] * (
            mixed["retain_mask"].shape[1] - size)
    # by hand: one mean over every selected next-token prediction, refusal tokens and benign answer tokens alike
    predictions, targets = [], []
    for prefix in ("harmless", "retain"):
        ids, mask = mixed[f"{prefix}_input_ids"], mixed[f"{prefix}_mask"]
        logits = model(input_ids=ids, attention_mask=mixed[f"{prefix}_attention_mask"]).logits
        predictions += [logits[b, t - 1] for b in range(4) for t in range(1, ids.shape[1]) if mask[b, t]]
        targets += [ids[b, t] for b in range(4) for t in range(1, ids.shape[1]) if mask[b, t]]
    expected = F.cross_entropy(torch.stack(predictions), torch.stack(targets))
    loss = repnoise_loss(model, mixed, generator())
    torch.testing.assert_close(loss.retain_ce, expected)
    plain = repnoise_loss(model, batch, generator())
    torch.testing.assert_close(loss.bounded_harmful_ce, plain.bounded_harmful_ce)  # the harmful terms unchanged
    torch.testing.assert_close(loss.mmd, plain.mmd)
    assert not torch.allclose(loss.retain_ce, plain.retain_ce)


# --- bounded ascent ----------------------------------------------------------------------------------------------


def harmful_pass(model, batch):
    return model(input_ids=batch["harmful_input_ids"], attention_mask=batch["harmful_attention_mask"],
                 output_hidden_states=True)


def test_bounded_ce_averages_the_output_ce_and_the_logit_lens_of_all_l_plus_1_hidden_states(model, batch):
    ids, mask = batch["harmful_input_ids"], batch["harmful_mask"]
    out = harmful_pass(model, batch)
    norm, head = readout(model)
    assert norm is model.model.norm and head is model.lm_head
    calls = []

    def counting_norm(x):
        calls.append(x)
        return norm(x)

    bounded = bounded_harmful_ce(out.logits, out.hidden_states, ids, mask, counting_norm, head)
    assert len(calls) == LAYERS + 1 == len(out.hidden_states)

    def full_ce(logits):  # over the whole sequence, then selected: independent of the positions-first shortcut
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        return per_token[mask[:, 1:]].mean()

    lens = [full_ce(model.lm_head(model.model.norm(h))) for h in out.hidden_states]
    torch.testing.assert_close(bounded, (full_ce(out.logits) + sum(lens)) / (LAYERS + 1) + 1)


def test_ascent_gradient_is_minus_alpha_over_h_times_the_gradient_of_h(model, batch):
    alpha = 0.7
    params = [p for p in model.parameters() if p.requires_grad]

    def bounded():
        out = harmful_pass(model, batch)
        return bounded_harmful_ce(out.logits, out.hidden_states, batch["harmful_input_ids"], batch["harmful_mask"],
                                  *readout(model))

    h = bounded()
    grad_h = torch.autograd.grad(h, params)
    grad_term = torch.autograd.grad(loss_terms.ascent_term(bounded(), alpha), params)
    for g_term, g_h in zip(grad_term, grad_h, strict=True):
        torch.testing.assert_close(g_term, -alpha / h.detach() * g_h)
    assert h.item() > 1


# --- MMD noise ---------------------------------------------------------------------------------------------------


def naive_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased MMD² written out pair by pair."""
    z = [*x, *y]
    n = len(z)
    distance = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    h = sum(distance[i][j] for i in range(n) for j in range(n) if i != j) / (n * n - n)

    def k(i: int, j: int) -> float:
        return sum(math.exp(-distance[i][j] / (c * h)) for c in (0.25, 0.5, 1, 2, 4))

    nx, ny = len(x), len(y)
    xx = sum(k(i, j) for i in range(nx) for j in range(nx)) / nx**2
    yy = sum(k(i, j) for i in range(nx, n) for j in range(nx, n)) / ny**2
    xy = sum(k(i, j) for i in range(nx) for j in range(nx, n)) / (nx * ny)
    return xx + yy - 2 * xy


def test_mmd_matches_a_naive_double_loop():
    x = torch.randn(3, 5, generator=generator(1), dtype=torch.float64)
    y = torch.randn(3, 5, generator=generator(2), dtype=torch.float64) + 0.5
    assert mmd(x, y).item() == pytest.approx(naive_mmd(x, y), rel=1e-5)


def test_mmd_of_a_sample_with_itself_is_zero():
    x = torch.randn(8, 40, generator=generator(3))
    assert abs(mmd(x, x).item()) < 1e-5


def test_mmd_grows_with_a_mean_shift():
    x = torch.randn(8, 40, generator=generator(4))
    y = torch.randn(8, 40, generator=generator(5))
    values = [mmd(x, y + shift).item() for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < values[-1]


def test_noise_loss_is_the_mean_over_layers_of_mmd_to_masked_gaussian_noise(model, batch):
    mask = batch["harmful_mask"]
    with captured_mlp_outputs(model) as outputs:
        harmful_pass(model, batch)
    assert len(outputs) == LAYERS
    assert all(o.shape == (*mask.shape, model.config.hidden_size) for o in outputs)
    expected, noise_source = [], generator(7)
    for output in outputs:
        noise = torch.randn(output.shape, generator=noise_source)
        keep = mask.unsqueeze(-1).float()
        expected.append(naive_mmd((output * keep).flatten(1).detach().double(), (noise * keep).flatten(1).double()))
    assert noise_loss(outputs, mask, generator(7)).item() == pytest.approx(sum(expected) / LAYERS, rel=1e-4)
    assert noise_loss(outputs, mask, generator(7)).item() == noise_loss(outputs, mask, generator(7)).item()


def test_captured_mlp_output_is_the_mlp_alone_before_the_residual_add(model, batch):
    layer = decoder_layers(model)[0]
    inputs = []
    handle = layer.mlp.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    try:
        with captured_mlp_outputs(model) as outputs:
            harmful_pass(model, batch)
    finally:
        handle.remove()
    torch.testing.assert_close(outputs[0], layer.mlp(inputs[0]))


# --- hooks, PEFT, total ------------------------------------------------------------------------------------------


def test_no_forward_hook_remains_after_the_loss_even_when_the_forward_raises(tokenizer, batch, monkeypatch):
    model = tiny_llama(tokenizer, layers=LAYERS)
    assert our_hooks(model) == []
    repnoise_loss(model, batch, generator())
    assert our_hooks(model) == []
    assert all(not layer.mlp._forward_hooks for layer in decoder_layers(model))

    def broken(*args, **kwargs):
        raise RuntimeError("forward failed")

    # Fails after layer 0's MLP hook has fired, inside the capture.
    monkeypatch.setattr(decoder_layers(model)[1].self_attn, "forward", broken)
    with pytest.raises(RuntimeError, match="forward failed"):
        repnoise_loss(model, batch, generator())
    assert our_hooks(model) == []
    assert all(not layer.mlp._forward_hooks for layer in decoder_layers(model))


def test_loss_on_a_lora_wrapped_model_equals_the_base_loss_and_trains_only_the_adapter(model, batch):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0))
    base, wrapped = repnoise_loss(model, batch, generator()), repnoise_loss(peft_model, batch, generator())
    # LoRA starts as the identity (B = 0), so every term matches the unwrapped model's.
    for term in ("total", "retain_ce", "mmd", "bounded_harmful_ce"):
        torch.testing.assert_close(getattr(wrapped, term), getattr(base, term))
    wrapped.total.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert our_hooks(peft_model) == []


def test_total_is_retain_plus_beta_mmd_minus_alpha_log_h(model, batch):
    alpha, beta = 0.7, 0.01
    loss = repnoise_loss(model, batch, generator(), alpha=alpha, beta=beta)
    by_hand = loss.retain_ce + beta * loss.mmd - alpha * torch.log(loss.bounded_harmful_ce)
    torch.testing.assert_close(loss.total, by_hand)
    torch.testing.assert_close(total_loss(loss.retain_ce, loss.mmd, loss.bounded_harmful_ce, alpha, beta), by_hand)
    assert loss.mmd.item() > 0 and loss.retain_ce.item() > 0


# --- training ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    return save_base_model(tmp_path_factory.mktemp("repnoise") / "base", tiny_llama(tokenizer, layers=LAYERS),
                           tokenizer)


PAIRS = [{"prompt": p, "harmful": h, "harmless": s} for p, h, s in zip(PROMPTS, HARMFUL, HARMLESS, strict=True)]
PARAMS = RepNoiseParams(lr=1e-3, steps=6, batch_size=4, max_length=64, seed=0, checkpoint_every=3)


def loss_on_all_pairs(directory: Path) -> float:
    from tamperlab.models.registry import load_model

    model, tokenizer = load_model(directory)
    batch = encode_pairs(tokenizer, PROMPTS, HARMFUL, HARMLESS, max_length=64)
    with torch.no_grad():
        return repnoise_loss(model, batch, generator()).total.item()


@pytest.fixture(scope="module")
def hardened(model_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("hardened") / "a"
    return out, harden(model_dir, PAIRS, PARAMS, out)


def test_harden_saves_a_model_that_lowers_the_loss_and_is_deterministic(model_dir, hardened, tmp_path):
    out, first = hardened
    harden(model_dir, PAIRS, PARAMS, tmp_path / "b")
    assert first["status"] == "complete" and first["steps"] == 6 and first["resumed_from_step"] is None
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    base = load_file(model_dir / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert (out / "tokenizer.json").exists() and not (out / "checkpoints").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == list(range(1, 7))
    assert all(h["loss"] == pytest.approx(h["retain_ce"] + 0.001 * h["mmd"] - math.log(h["bounded_harmful_ce"]),
                                          abs=1e-4) for h in log)
    assert loss_on_all_pairs(out) < loss_on_all_pairs(model_dir)


def test_a_run_interrupted_after_a_checkpoint_resumes_to_the_same_weights(model_dir, hardened, tmp_path,
                                                                          monkeypatch):
    original = repnoise.repnoise_loss
    calls = []

    def dies_in_step_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stands in for a kill after checkpoint-3
        return original(*args, **kwargs)

    monkeypatch.setattr(repnoise, "repnoise_loss", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        harden(model_dir, PAIRS, PARAMS, tmp_path / "resumed")
    monkeypatch.setattr(repnoise, "repnoise_loss", original)
    record = harden(model_dir, PAIRS, PARAMS, tmp_path / "resumed")
    assert record["resumed_from_step"] == 3 and record["steps"] == 6
    whole, resumed = load_file(hardened[0] / "model.safetensors"), load_file(tmp_path / "resumed/model.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_non_finite_loss_stops_training_and_is_reported_as_diverged(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loss_terms, "total_loss", lambda retain, *rest: retain * float("nan"))
    record = harden(model_dir, PAIRS, PARAMS, tmp_path / "out")
    assert record["status"] == "diverged" and record["diverged_at_step"] == 1 and record["steps"] == 1
    assert diverged(tmp_path / "out") and not (tmp_path / "out/model.safetensors").exists()
