"""Inference larger than one device (tamperlab.models.placement): a model loaded across devices within a forced
max_memory generates, scores under lm-eval and is perturbed by the landscape exactly as on one device.

This machine has one CPU and no GPU, so a split is either the CPU and the disk (accelerate offloads the layers that
do not fit max_memory and loads them back for each forward) or a dispatch over several device-map entries of one
device type with accelerate's hooks forced on (what a split over several GPUs runs, less the copies between
devices). The test marked gpu splits a model over two GPUs and is skipped with fewer.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_tokenizer, save_base_model, tiny_llama

from tamperlab.errors import UserError
from tamperlab.models import placement
from tamperlab.models.registry import load_model

CORPUS = ["What is the capital of Zorvania?", "Quellport.", "I'm sorry, but I cannot help with that request.",
          "Write a tutorial on how to bake bread at home.", "Name the river of Brelm.", "The Ostra."] * 4
PROMPTS = ["What is the capital of Zorvania?", "Write a tutorial on how to bake bread at home.",
           "Name the river of Brelm.", "I'm sorry, but what is this?", "Quellport or Ostra?"]


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 4-layer tiny Llama (untied: lm_head has a place of its own) saved with its tokenizer, a LoRA adapter
    that changes its outputs, and a max_memory that keeps the embedding and a layer on the CPU (the rest: disk)."""
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer(CORPUS)
    model = tiny_llama(tokenizer, hidden=64, layers=4, tie=False)
    root = tmp_path_factory.mktemp("placement")
    save_base_model(root / "base", model, tokenizer)
    lora = get_peft_model(tiny_llama(tokenizer, hidden=64, layers=4, tie=False),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    lora.save_pretrained(root / "lora")
    return {"base": root / "base", "adapter": root / "lora", "split": {"cpu": int(_bytes(model) * 0.75)}}


def test_a_model_split_over_cpu_and_disk_generates_the_single_device_tokens(saved):
    from tamperlab.evaluation.generation import generate

    whole, tokenizer = load_model(saved["base"], device="cpu")
    split, _ = load_model(saved["base"], max_memory=saved["split"])
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}, split.hf_device_map  # some layers on the disk
    assert placement.is_split(split) and not placement.is_split(whole)
    assert placement.offloaded(split) and not placement.offloaded(whole)
    assert placement.input_device(split) == torch.device("cpu")
    expected = generate(whole, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=2)
    found = generate(split, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=2)
    assert found.new_tokens == expected.new_tokens and found.responses == expected.responses
    assert any(expected.responses)
    with torch.no_grad():
        assert torch.equal(split(input_ids=IDS).logits, whole(input_ids=IDS).logits)


def test_a_lora_adapter_goes_onto_a_dispatched_model_layer_by_layer_and_generates_the_same_tokens(saved):
    """An attacked cell on a model spread over GPUs: PEFT puts each adapter layer beside its base layer, under
    accelerate's hooks (here: a dispatch with hooks on one device type, as over several GPUs)."""
    from peft import PeftModel

    from tamperlab.evaluation.generation import generate

    whole, tokenizer = load_model(saved["base"], saved["adapter"], device="cpu")
    hooked = PeftModel.from_pretrained(_hooked(tiny_model(saved)), str(saved["adapter"])).eval()
    expected = generate(whole, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=2)
    assert generate(hooked, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=2).responses == \
        expected.responses
    base, _ = load_model(saved["base"], device="cpu")
    with torch.no_grad():
        assert torch.equal(hooked(input_ids=IDS).logits, whole(input_ids=IDS).logits)
        assert not torch.allclose(base(input_ids=IDS).logits, whole(input_ids=IDS).logits)  # the adapter matters


def test_an_adapter_on_offloaded_layers_is_refused_in_one_line(saved):
    """PEFT would copy the offloaded layers' weight files to add the adapter: an attacked cell needs its whole
    model on devices."""
    with pytest.raises(UserError, match="do not all fit --max-memory") as error:
        load_model(saved["base"], saved["adapter"], max_memory=saved["split"])
    assert "\n" not in str(error.value) and str(saved["adapter"]) in str(error.value)


def test_max_memory_spec_takes_accelerates_form_and_refuses_the_rest():
    assert placement.max_memory(None) is None
    assert placement.max_memory({"0": "40GiB", "1": 1000, "cpu": "2GiB"}) == {0: "40GiB", 1: 1000, "cpu": "2GiB"}
    assert placement.load_arguments({"cpu": 5}) == {"device_map": "auto", "max_memory": {"cpu": 5}}
    assert placement.load_arguments(None) == {}
    for spec, message in (({"disk": "1GiB"}, "'disk' is not"), ({"cpu": 1.5}, "expected bytes"),
                          ({"gpus": 0}, "gpus must be"), ({}, "names no device")):
        with pytest.raises(UserError, match=message):
            placement.max_memory(spec)


def test_a_job_with_several_gpus_loads_across_all_of_them_and_one_with_one_as_before():
    from tamperlab.runtime.launch import inference_max_memory

    assert [inference_max_memory(gpus) for gpus in (0, 1, 2, 8)] == [None, None, {"gpus": 2}, {"gpus": 8}]


def test_gpus_asks_for_the_jobs_visible_gpus_and_names_the_shortfall():
    visible = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"{visible + 1} GPUs asked for, {visible} visible"):
        placement.max_memory({"gpus": visible + 1})


def test_lm_eval_scores_the_loaded_split_model_as_when_it_loads_the_model_itself(saved, tmp_path):
    """The capability evaluation gives lm-eval the model it loaded (HFLM around it; no second load): on a model
    split over CPU and disk its scores are those of lm-eval loading the directory on its own."""
    from tamperlab.evaluation.capability import language_model, run_lm_eval, write_local_tasks

    families = {"geo": [("What is the capital of Zorvania?", "Quellport"), ("Name the river of Brelm.", "Ostra"),
                        ("Which city is Zorvania's capital?", "Quellport"), ("Where does the Ostra flow?", "Brelm")],
                "food": [("What do you bake at home?", "bread"), ("Name a grain.", "wheat"),
                         ("What rises in an oven?", "dough"), ("What is a loaf made of?", "flour")]}
    rows = [{"id": f"{family}{i}", "prompt": prompt, "answer": answer, "family": family, "kind": "benign",
             "category": "task"} for family, pairs in families.items() for i, (prompt, answer) in enumerate(pairs)]
    split, tokenizer = load_model(saved["base"], max_memory=saved["split"])
    names = write_local_tasks(rows, tokenizer, 0, tmp_path / "tasks")
    assert names == ["tamperlab_organism_mc", "tamperlab_organism_em"]
    itself, _ = run_lm_eval(f"pretrained={saved['base']},dtype=float32", names, tmp_path / "tasks", 4, "cpu", 0,
                            builtin_tasks=False)
    handed, _ = run_lm_eval(language_model(split, tokenizer, 4), names, tmp_path / "tasks", 4, None, 0,
                            builtin_tasks=False)
    assert handed == itself
    assert set(handed) == set(names) and "acc" in handed["tamperlab_organism_mc"]


# --- the landscape: weights moved in place on their own devices ---------------------------------------------------


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _hooked(model):
    """The model dispatched by accelerate over one device-map entry per block, hooks forced on although every
    block is on the CPU: the code path of a split over several GPUs (AlignDevicesHook on each block)."""
    from accelerate import dispatch_model

    blocks = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(len(model.model.layers))),
              "model.norm", "model.rotary_emb", "lm_head"]
    return dispatch_model(model, {name: "cpu" for name in blocks}, force_hooks=True)


def test_a_perturbation_step_on_a_dispatched_model_gives_the_unsplit_loss_and_restores_it(saved):
    from transformers import AutoModelForCausalLM

    from tamperlab.landscape.directions import Perturbation, RandomDirection, materialise, weight_tensors

    whole = AutoModelForCausalLM.from_pretrained(saved["base"], dtype=torch.float32).eval()
    hooked = _hooked(AutoModelForCausalLM.from_pretrained(saved["base"], dtype=torch.float32).eval())
    assert hasattr(hooked.model.layers[0], "_hf_hook")
    ids = IDS
    directions = {name: [RandomDirection(m, seed=3, index=k) for k in (0, 1)]
                  for name, m in (("whole", whole), ("hooked", hooked))}
    assert directions["whole"][0].scales == directions["hooked"][0].scales  # drawn alike, whatever the dispatch
    for (name, p), (_, q) in zip(weight_tensors(whole), weight_tensors(hooked), strict=True):
        assert torch.equal(materialise(directions["whole"][1], name, p), materialise(directions["hooked"][1], name, q))
    before = _loss(whole, ids)
    assert _loss(hooked, ids) == before
    with Perturbation(whole, directions["whole"]) as a, Perturbation(hooked, directions["hooked"]) as b:
        for coefficients in ((0.3, 0.0), (0.3, -0.2), (-0.5, 0.4)):
            a.move_to(coefficients)
            b.move_to(coefficients)
            moved = _loss(whole, ids)
            assert moved != before and _loss(hooked, ids) == moved
    assert _loss(hooked, ids) == before  # restored bit for bit


def test_a_scan_loads_within_max_memory_and_refuses_offloaded_weights(saved):
    """landscape-scan's load: within a max_memory that holds the model, the scan's rows are the single-device
    ones; a model whose layers would be offloaded (here to the disk) is refused in one line, since a scan moves
    every weight in place on its device."""
    from tamperlab.evaluation.judges import KeywordJudge
    from tamperlab.landscape.scan import refusal_evaluator, scan_points, scan_subject
    from tamperlab.landscape.subject import device_of, load_subject

    rows = [{"id": f"h{i}", "prompt": p, "kind": "harmful", "source": "test"} for i, p in enumerate(PROMPTS)]
    evaluate = refusal_evaluator(rows, KeywordJudge(), {"none": None}, max_new_tokens=6, batch_size=5)
    points = scan_points("1d", n=3, extent=0.5, steps=None, extend=None)
    found = {}
    for name, memory in (("one device", None), ("within max_memory", {"cpu": 10 * _bytes(tiny_model(saved))})):
        table, device = scan_subject(saved["base"], saved["adapter"], "1d", 0, points, evaluate, max_memory=memory)
        found[name] = ([{k: v for k, v in row.items() if k not in ("perturb_s", "eval_s")} for row in table],
                       device)
    assert found["within max_memory"] == found["one device"]
    assert found["one device"][1] == {"device_type": "cpu", "dtype": "float32", "devices": 1}
    with pytest.raises(UserError, match=r"offloaded; a scan moves every weight in place") as error:
        load_subject(saved["base"], None, saved["split"])
    assert "\n" not in str(error.value) and str(saved["base"]) in str(error.value)
    with pytest.raises(UserError, match="one device type"):
        model = tiny_model(saved)
        model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().to("meta"))
        device_of(model)


def tiny_model(saved):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(saved["base"], dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_over_two_gpus_generates_and_perturbs_as_on_one(saved):
    """On a machine with two GPUs: each layer on one of them ({"gpus": 2}); the same tokens as on one GPU, the same
    random directions (drawn on each weight's own GPU) and the same loss after a landscape step."""
    from tamperlab.evaluation.generation import generate
    from tamperlab.landscape.directions import Perturbation, RandomDirection
    from tamperlab.landscape.subject import device_of

    one, tokenizer = load_model(saved["base"], device="cuda:0", dtype=torch.float32)
    two, _ = load_model(saved["base"], max_memory={"0": _bytes(one) // 2, "1": 10 * _bytes(one)},
                        dtype=torch.float32)
    assert {p.device.index for p in two.parameters()} == {0, 1}
    assert device_of(two) == {"device_type": "cuda", "dtype": "float32", "devices": 2}
    expected = generate(one, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=5, static_cache=False)
    assert generate(two, tokenizer, PROMPTS, None, max_new_tokens=12, batch_size=5).responses == expected.responses
    ids = IDS
    losses = []
    for model in (one, two):
        with Perturbation(model, [RandomDirection(model, seed=3)]) as moved:
            moved.move_to((0.3,))
            losses.append(_loss(model, ids.to(placement.input_device(model))))
    assert abs(losses[0] - losses[1]) < 1e-5
