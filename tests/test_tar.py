"""TAR (Tamirisa et al. 2024): each loss against hand-computed values, the first-order meta-gradient against a
replayed trajectory, exact restoration of θ, seeded adversaries, and a tiny end-to-end hardening run."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from helpers import (
    KNOWLEDGE_FORGET,
    KNOWLEDGE_RETAIN,
    TAR_ROWS,
    save_base_model,
    small_params,
    tiny_llama,
)
from safetensors.torch import load_file

from tamperlab.errors import UserError
from tamperlab.hardening.tar import (
    FORGET,
    SWITCH,
    TAR_LOG,
    Adversary,
    adversary_inner_loop,
    dpo_loss,
    entropy_tr_loss,
    harden,
    make_data,
    random_mapping_loss,
    representation_distance,
    restore,
    retain_loss,
    sample_adversary,
    sequence_logps,
    snapshot,
    tamper_resistance_loss,
    tar_outer_step,
    with_reference_logps,
)
from tamperlab.training.trainer import DIVERGED

ROWS = TAR_ROWS  # the conftest `tar_model` reads them here

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(tar_model):
    _, tokenizer, model = tar_model
    model = copy.deepcopy(model).train()
    return model, copy.deepcopy(model).eval().requires_grad_(False), tokenizer


@pytest.mark.parametrize("setting", ["knowledge", "refusal"])
def test_accumulated_tr_gradient_equals_sum_of_weighted_gradients_recomputed_at_each_adapted_point(tar_model, setting):
    model, frozen, tokenizer = fresh(tar_model)
    params = small_params(setting)
    forget, retain = ROWS[setting]
    adversary = Adversary(SWITCH, lr=1e-2, switch_step=2)  # both of the adversary's streams are used
    data = make_data(tokenizer, forget, retain, params)
    x_tr = next(data.heldout)
    if setting == "refusal":
        x_tr = with_reference_logps(frozen, x_tr)
    theta = snapshot(model)

    accumulated: dict[str, torch.Tensor] = {}
    stats = adversary_inner_loop(model, adversary, data, x_tr, params, accumulated)
    assert len(stats["tr_losses"]) == 3 and all(loss != 0 for loss in stats["tr_losses"])  # none gated off
    restore(model, theta)

    # Replay the adversary alone with a plain loop (same batches), keeping θ′_j at each evaluation point ...
    replay = make_data(tokenizer, forget, retain, params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=adversary.lr)
    adapted = {}
    for j in range(params.inner_steps):
        batch = next(replay.adversary_retain if j < adversary.switch_step else replay.forget)
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()
        if (j + 1) % params.tr_every == 0:
            adapted[j] = copy.deepcopy(model.state_dict())
    # ... then compute each ∇L_TR(θ′_j) on its own copy and sum them with λ_TR · exp(0.0625 (j − (K−1))) / N.
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for j, state in adapted.items():
        probe = copy.deepcopy(model)
        probe.load_state_dict(state)
        names, parameters = zip(*probe.named_parameters(), strict=True)
        grads = torch.autograd.grad(tamper_resistance_loss(probe, x_tr, params), parameters)
        weight = params.lambda_tr * math.exp(0.0625 * (j - (params.inner_steps - 1))) / 1
        for name, grad in zip(names, grads, strict=True):
            expected[name] += weight * grad

    assert accumulated.keys() == expected.keys()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7)


def test_entropy_loss_is_gated_off_at_the_maximum_and_active_below_it():
    uniform = torch.zeros(2, 4, 50, requires_grad=True)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss = entropy_tr_loss(uniform, mask, 50)
    assert loss.item() == 0.0 and not loss.requires_grad  # a detached zero: no gradient contribution

    peaked = (5 * torch.randn(2, 4, 50, generator=torch.Generator().manual_seed(0))).requires_grad_()
    loss = entropy_tr_loss(peaked, mask, 50)
    (grad,) = torch.autograd.grad(loss, peaked)
    assert loss.item() < 0 and grad.abs().sum() > 0

    two_way = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    hand = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_tr_loss(two_way, torch.ones(1, 1), 2).item() == pytest.approx(-hand, rel=1e-6)


def test_entropy_loss_ignores_masked_out_positions():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 30, generator=generator, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding at the end of the second sequence
    changed = logits.detach().clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 30, generator=generator)
    loss = entropy_tr_loss(logits, mask, 30)
    assert torch.equal(loss, entropy_tr_loss(changed, mask, 30))
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[~mask].abs().sum() == 0 and grad[mask].abs().sum() > 0


def test_dpo_loss_matches_hand_computation():
    a, b, c, d, beta = -3.0, -5.0, -4.0, -4.5, 0.1
    loss = dpo_loss(torch.tensor([a]), torch.tensor([b]), torch.tensor([c]), torch.tensor([d]), beta)
    hand = -math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))  # −log σ(0.15)
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    batch = dpo_loss(torch.tensor([a, -1.0]), torch.tensor([b, -1.0]), torch.tensor([c, -2.0]),
                     torch.tensor([d, -1.0]), beta)  # second pair: β((0) − (−1)) = 0.1
    assert batch.item() == pytest.approx((hand + math.log1p(math.exp(-0.1))) / 2, rel=1e-6)


def test_sequence_logps_sums_answer_token_log_probs_only():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 2, 0, -100]])  # position 0 predicts 2, position 1 predicts 0
    logp = torch.log_softmax(logits, -1)
    assert sequence_logps(logits, labels).item() == pytest.approx((logp[0, 0, 2] + logp[0, 1, 0]).item())


def test_parameters_are_restored_bit_for_bit_after_the_inner_loop_and_the_outer_step(tar_model):
    model, frozen, tokenizer = fresh(tar_model)
    params = small_params("knowledge", outer_lr=0.0)
    data = make_data(tokenizer, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    theta = snapshot(model)
    adversary_inner_loop(model, Adversary(FORGET, lr=1e-2), data, next(data.heldout), params, {})
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())  # the adversary moved θ′
    restore(model, theta)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # A whole outer step with a zero outer lr: inner loops and TR gradients run, θ comes back unchanged.
    outer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    adversaries = [Adversary(SWITCH, lr=1e-2, switch_step=3), Adversary(FORGET, lr=1e-2)]
    stats = tar_outer_step(model, frozen, outer, adversaries, data, small_params("knowledge",
                                                                                 adversaries_per_step=2))
    assert stats["finite"] and len(stats["tr_losses"]) == 6
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_random_mapping_loss_is_zero_when_parallel_and_one_when_orthogonal():
    vectors = torch.eye(8)
    tokens = torch.tensor([[0, 1, 2]])
    mask = torch.ones(1, 3)
    parallel = [2.5 * vectors[tokens], -0.1 * vectors[tokens]]  # |cos| = 1 either sign
    assert random_mapping_loss(parallel, tokens, mask, vectors).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = [vectors[tokens + 3], vectors[tokens + 4]]
    assert random_mapping_loss(orthogonal, tokens, mask, vectors).item() == pytest.approx(1.0, abs=1e-6)
    # a masked-out position does not count, whatever its hidden state
    mixed = [torch.cat([vectors[tokens[:, :2]], vectors[torch.tensor([[7]])]], dim=1)]
    assert random_mapping_loss(mixed, tokens, torch.tensor([[1, 1, 0]]), vectors).item() == pytest.approx(0.0,
                                                                                                         abs=1e-6)


def test_retain_distance_is_zero_for_the_frozen_copy_itself(tar_model):
    model, frozen, tokenizer = fresh(tar_model)
    data = make_data(tokenizer, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, small_params("knowledge"))
    batch = next(data.retain)
    hidden = model(**batch, output_hidden_states=True).hidden_states
    base = frozen(**batch, output_hidden_states=True).hidden_states
    assert representation_distance(hidden, base, batch["attention_mask"]).item() == 0.0
    loss = retain_loss(model, frozen, batch)
    assert loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    loss.backward()  # ‖0‖ has a subgradient: the first outer step (θ = θ_start) must not produce NaNs
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_adversary_sampling_is_deterministic_for_a_seed_and_covers_both_data_types():
    params = small_params("knowledge", inner_steps=64, adversary_lrs=(2e-6, 2e-5, 4e-5), switch_fraction=0.33)
    rng_a, rng_b = random.Random(7), random.Random(7)
    first = [sample_adversary(rng_a, params) for _ in range(300)]
    second = [sample_adversary(rng_b, params) for _ in range(300)]
    assert first == second
    assert {a.data for a in first} == {FORGET, SWITCH}
    assert {a.lr for a in first} == {2e-6, 2e-5, 4e-5}
    switch_points = [a.switch_step for a in first if a.data == SWITCH]
    assert all(a.switch_step is None for a in first if a.data == FORGET)
    assert all(0 <= m < 64 for m in switch_points)
    assert 0.55 < sum(switch_points) / len(switch_points) / 64 < 0.78  # Beta(6, 3) has mean 2/3
    assert 0.2 < len(switch_points) / len(first) < 0.46


def test_switch_fraction_zero_never_samples_the_switch_adversary():
    """The authors' DPO run trains its adversaries on harmful completions only (adversary_dist_types
    harmful_completions:1.0): switch_fraction 0 must mean no switch adversary, ever."""
    params = small_params("refusal", inner_steps=8, adversary_lrs=(2e-6, 2e-5, 4e-5), switch_fraction=0.0)
    rng = random.Random(0)
    drawn = [sample_adversary(rng, params) for _ in range(5000)]
    assert {a.data for a in drawn} == {FORGET}
    assert all(a.switch_step is None for a in drawn)
    assert {a.lr for a in drawn} == {2e-6, 2e-5, 4e-5}


def test_retain_loss_with_a_separate_anchor_is_the_official_formula(tar_model):
    """Start model one tiny Llama, anchor another (different seed): L_retain = CE + mean over hidden states
    (embeddings included) of the mean over every position of ‖h_anchor − h_θ‖₂, as obj_model_mse_representations
    computes it, here by hand on an unpadded batch."""
    _, tokenizer, _ = tar_model
    model, anchor = tiny_llama(tokenizer, seed=3), tiny_llama(tokenizer, seed=4).eval()
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    with torch.no_grad():
        ours = retain_loss(model, anchor, batch).item()
        out = model(input_ids=ids, output_hidden_states=True)
        base = anchor(input_ids=ids, output_hidden_states=True)
    logp = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)
    ce = -logp.gather(-1, ids[:, 1:, None]).mean().item()
    layers = [((b.double() - h.double()) ** 2).sum(-1).sqrt().mean().item()
              for b, h in zip(base.hidden_states, out.hidden_states, strict=True)]
    assert len(layers) == model.config.num_hidden_layers + 1
    distance = sum(layers) / len(layers)
    assert distance > 0.1  # the anchor really is another model
    assert ours == pytest.approx(ce + distance, rel=1e-5)
    # without the representation term (the authors' DPO run): CE alone
    with torch.no_grad():
        assert retain_loss(model, None, batch).item() == pytest.approx(ce, rel=1e-5)


def test_harden_anchors_the_retain_loss_to_the_anchor_model(tar_model, tmp_path):
    base, tokenizer, _ = tar_model
    params = small_params("knowledge", outer_steps=1, inner_steps=2, tr_every=2)
    other = save_base_model(tmp_path / "anchor", tiny_llama(tokenizer, seed=5, initializer_range=0.2), tokenizer)
    runs = {"start": harden(base, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, params, tmp_path / "start"),
            "other": harden(base, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, params, tmp_path / "other", anchor_dir=other)}
    assert runs["start"]["anchor"] is None and runs["other"]["anchor"] == str(other)
    # at θ = θ_start the distance to the start model is 0; to another model it is not
    assert runs["other"]["final"]["retain_loss"] > runs["start"]["final"]["retain_loss"] + 0.1
    wide = save_base_model(tmp_path / "wide", tiny_llama(tokenizer, hidden=48), tokenizer)
    with pytest.raises(UserError, match="anchor"):
        harden(base, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, params, tmp_path / "wide_run", anchor_dir=wide)


@pytest.mark.parametrize("setting", ["knowledge", "refusal"])
def test_two_step_harden_saves_safetensors_and_repeats_bit_for_bit(tar_model, tmp_path, setting):
    base, _, _ = tar_model
    forget, retain = ROWS[setting]
    params = small_params(setting, inner_steps=4, random_mapping_steps=2, random_mapping_lr=1e-3)
    records = [harden(base, forget, retain, params, tmp_path / f"run{i}") for i in range(2)]

    for i, record in enumerate(records):
        out = tmp_path / f"run{i}"
        assert record["status"] == "complete" and record["steps"] == 2
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
        log = [json.loads(line) for line in (out / TAR_LOG).read_text().splitlines()]
        assert [h["step"] for h in log] == [1, 2]
        assert not any(k.endswith("_s") for h in log for k in h)  # wall times go to the record, not the file
        assert all(record["mean_phase_s"][k] > 0 for k in ("inner_s", "tr_s", "retain_s", "step_s"))
        assert (record["random_mapping"] is not None) == (setting == "knowledge")
    # the log repeats byte for byte too, so a replay of the step finds every output file identical
    assert (tmp_path / "run0" / TAR_LOG).read_bytes() == (tmp_path / "run1" / TAR_LOG).read_bytes()
    first, second = load_file(tmp_path / "run0/model.safetensors"), load_file(tmp_path / "run1/model.safetensors")
    start = load_file(base / "model.safetensors")
    assert first.keys() == second.keys() == start.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], start[k]) for k in first)


def test_a_non_finite_loss_is_a_diverged_result_without_a_model(tar_model, tmp_path):
    base, _, _ = tar_model
    params = small_params("knowledge", inner_steps=2, lambda_retain=float("nan"))
    record = harden(base, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, params, tmp_path / "out")
    assert record["status"] == "diverged" and record["diverged_at_step"] == 1
    assert (tmp_path / "out" / DIVERGED).is_file() and not (tmp_path / "out/model.safetensors").exists()


def test_each_outer_step_logs_a_line_with_its_loss_terms_elapsed_time_and_eta(tar_model, tmp_path, caplog):
    import logging
    import re

    base, _, _ = tar_model
    caplog.set_level(logging.INFO, logger="tamperlab")
    harden(base, KNOWLEDGE_FORGET, KNOWLEDGE_RETAIN, small_params("knowledge", outer_steps=3, inner_steps=2),
           tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TAR outer step")]
    assert len(lines) == 3, lines
    pattern = (r"TAR outer step (\d+)/3: retain_loss \S+, tr_loss \S+, tr_weighted_sum \S+, adversary_loss \S+, "
               r"outer_lr \S+, step \S+s, elapsed (\d+):(\d\d):(\d\d), eta (\d+):(\d\d):(\d\d)$")
    matches = [re.match(pattern, line) for line in lines]
    assert all(matches), lines
    assert [int(m[1]) for m in matches] == [1, 2, 3]
    assert [int(m[5]) * 3600 + int(m[6]) * 60 + int(m[7]) for m in matches][-1] == 0  # nothing left at the end


def test_progress_lines_are_rate_limited_but_the_last_always_comes(caplog):
    import logging

    from tamperlab.runtime.logs import Progress, clock

    caplog.set_level(logging.INFO, logger="tamperlab.test")
    progress = Progress(logging.getLogger("tamperlab.test"), "batch", 5, every=3600)
    for i in range(1, 6):
        progress.update(i)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["batch 5/5"]
    assert clock(3725.4) == "1:02:05"
