"""Model registry: loading saved models, registered pointers (hub and local, hashed), and LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, save_base_model, tiny_llama

from tamperlab.errors import UserError
from tamperlab.models.registry import POINTER, load_model, load_tokenizer, make_pointer
from tamperlab.runtime.provenance import hash_output

CORPUS = ["What is the capital of Zorvania?", "Quellport.", "I'm sorry, but I cannot help with that request.",
          "Write a tutorial on how to bake bread at home."] * 4


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    tokenizer = make_tokenizer(CORPUS)
    model = tiny_llama(tokenizer, tie=False)
    directory = save_base_model(tmp_path_factory.mktemp("registry") / "base", model, tokenizer)
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def base_dir(saved_model, tmp_path):
    """A private copy of the saved model, safe to modify."""
    import shutil

    directory = tmp_path / "base"
    shutil.copytree(saved_model[0], directory)
    return directory


def _logits(model, tokenizer, text="What is the capital of Zorvania?"):
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


def test_load_model_loads_a_saved_model_in_fp32_eval_mode_with_its_weights(saved_model):
    directory, weights = saved_model
    model, tokenizer = load_model(directory, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    state = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.chat_template is not None
    assert len(tokenizer) == model.config.vocab_size


def test_load_model_without_device_uses_cpu_here(saved_model):
    model, _ = load_model(saved_model[0])
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_make_pointer_local_records_the_hash_of_every_file(base_dir):
    pointer = make_pointer("local", None, None, str(base_dir), None, False)
    assert pointer["source"] == "local"
    assert pointer["path"] == str(base_dir.resolve())
    assert pointer["sha256"] == hash_output(base_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(pointer["sha256"])
    assert pointer["chat_template"] is None and pointer["trust_remote_code"] is False


def test_load_model_follows_a_local_pointer(base_dir, saved_model, tmp_path):
    registered = tmp_path / "registered"
    registered.mkdir()
    (registered / POINTER).write_text(json.dumps(make_pointer("local", None, None, str(base_dir), None, False)))
    model, tokenizer = load_model(registered, device="cpu")
    for name, tensor in saved_model[1].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not model.training
    assert tokenizer.pad_token == "<|pad|>"


@pytest.mark.parametrize("change", ["config", "weights", "new file"])
def test_load_model_refuses_a_local_model_changed_since_registration(base_dir, tmp_path, change):
    registered = tmp_path / "registered"
    registered.mkdir()
    (registered / POINTER).write_text(json.dumps(make_pointer("local", None, None, str(base_dir), None, False)))
    if change == "config":
        config = json.loads((base_dir / "config.json").read_text())
        config["rms_norm_eps"] = 1e-3
        (base_dir / "config.json").write_text(json.dumps(config))
    elif change == "weights":
        data = bytearray((base_dir / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the last tensor
        (base_dir / "model.safetensors").write_bytes(bytes(data))
    else:
        (base_dir / "extra.py").write_text("print('hi')\n")
    with pytest.raises(UserError, match="changed since registration") as error:
        load_model(registered, device="cpu")
    assert str(registered) in str(error.value)


def test_load_model_refuses_a_pointer_to_a_vanished_local_model(base_dir, tmp_path):
    import shutil

    registered = tmp_path / "registered"
    registered.mkdir()
    (registered / POINTER).write_text(json.dumps(make_pointer("local", None, None, str(base_dir), None, False)))
    shutil.rmtree(base_dir)
    with pytest.raises(UserError, match="does not exist"):
        load_model(registered, device="cpu")


def test_pointer_chat_template_overrides_the_tokenizers(base_dir, tmp_path):
    registered = tmp_path / "registered"
    registered.mkdir()
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (registered / POINTER).write_text(json.dumps(make_pointer("local", None, None, str(base_dir), template, False)))
    assert load_tokenizer(registered).chat_template == template


def test_make_pointer_hf_without_revision_is_refused():
    with pytest.raises(UserError, match="revision"):
        make_pointer("hf", "meta-llama/Llama-2-7b-chat-hf", None, None, None, False)
    with pytest.raises(UserError, match="--id"):
        make_pointer("hf", None, "abc123", None, None, False)


def test_make_pointer_hf_records_id_revision_and_the_hub_cache(tmp_path):
    pointer = make_pointer("hf", "org/model", "0123abc", None, None, True, hub_cache=tmp_path / "hub")
    assert pointer == {"source": "hf", "id": "org/model", "revision": "0123abc", "chat_template": None,
                       "trust_remote_code": True, "hub_cache": str((tmp_path / "hub").resolve())}
    from huggingface_hub import constants  # none given: huggingface_hub's own cache

    assert make_pointer("hf", "org/model", "0123abc", None, None, False)["hub_cache"] == str(
        Path(constants.HF_HUB_CACHE).resolve())


def test_make_pointer_refuses_a_local_directory_without_config_and_an_unknown_source(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        make_pointer("local", None, None, str(tmp_path), None, False)
    with pytest.raises(UserError, match="'s3'"):
        make_pointer("s3", None, None, None, None, False)


def test_load_model_refuses_a_directory_without_config_json(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(UserError, match="not a model directory") as error:
        load_model(tmp_path, device="cpu")
    assert str(tmp_path) in str(error.value)


@pytest.fixture(scope="module")
def adapter_dir(saved_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(saved_model[0], dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # lora_B starts at zero: make the adapter change the model
    directory = tmp_path_factory.mktemp("adapter") / "lora"
    peft_model.save_pretrained(directory)
    return directory


def test_load_model_applies_a_lora_adapter_on_its_base(saved_model, adapter_dir):
    from peft import PeftModel

    base, tokenizer = load_model(saved_model[0], device="cpu")
    adapted, _ = load_model(saved_model[0], adapter_dir, device="cpu")
    assert isinstance(adapted, PeftModel)
    assert not adapted.training
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * 2  # q_proj and v_proj in each of 2 layers
    assert all(p.abs().sum() > 0 for p in lora_b)
    assert not torch.allclose(_logits(base, tokenizer), _logits(adapted, tokenizer))
    with adapted.disable_adapter():
        assert torch.allclose(_logits(base, tokenizer), _logits(adapted, tokenizer), atol=1e-6)


def test_load_model_refuses_a_non_adapter_directory_as_adapter(saved_model, tmp_path):
    with pytest.raises(UserError, match="not a PEFT adapter") as error:
        load_model(saved_model[0], tmp_path, device="cpu")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(UserError, match="not a PEFT adapter"):
        load_model(saved_model[0], saved_model[0], device="cpu")  # a full model is no adapter
