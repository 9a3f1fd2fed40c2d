"""The method registry (tamperlab.methods): a defence added as a plugin alone (a module, its schema block, one
`register` call, named in the config's `plugins:`), with no edit to any project file, runs through the real workflow
(harden -> attack -> evaluate -> tables); bad input is one line naming its key."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import BIN, REPO, SMOKE, defence_params, one_chain_overlay, snakemake, snakemake_env

from tamperlab import methods
from tamperlab.config import validate_config
from tamperlab.errors import UserError
from tamperlab.runtime.params import from_params

# A toy defence: scales one weight matrix of the model (a module of its own, outside the package; torch is imported
# inside the entry point, so that importing the plugin stays as light as the config's validation needs).
TOY_DEFENCE = '''
from dataclasses import dataclass

from tamperlab import methods


@dataclass
class ScaleParams:
    factor: float = 0.5
    seed: int = 0


def harden(model_dir, pairs, params, out_dir, deepspeed=None):
    import torch

    from tamperlab.models.registry import load_model

    model, tokenizer = load_model(model_dir, dtype=None)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(params.factor)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"status": "complete", "scaled": "model.layers.0.mlp.down_proj.weight", "pairs": len(pairs)}


methods.register(methods.Defence(
    "scale", run="toy_defence:harden", params="toy_defence:ScaleParams", block="scale", data="pairs",
    schema={"type": "object", "additionalProperties": False,
            "properties": {"factor": {"type": "number", "exclusiveMinimum": 0, "default": 0.5},
                           "seed": {"type": "integer", "default": 0}}}))
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch) -> Path:
    """toy_defence.py on the path of this process and of every process it starts."""
    directory = tmp_path / "plugins"
    directory.mkdir()
    (directory / "toy_defence.py").write_text(TOY_DEFENCE)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])))
    return directory


def default_config(plugins: list[str] = (), **defences) -> dict:
    """The default config, with these defences beside its own."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    return {**config, "plugins": list(plugins), "defences": {**config["defences"], **defences}}


def test_the_builtin_methods_are_registered():
    assert methods.names("defence")[:3] == ("none", "repnoise", "tar")
    assert methods.names("attack") == ("lora", "full")
    assert methods.get("attack", "lora").adapter and not methods.get("attack", "full").adapter
    assert not methods.get("defence", "none").trains
    assert methods.load(methods.get("defence", "repnoise").params).__name__ == "RepNoiseParams"


def test_an_unknown_defence_method_is_one_line_naming_its_key():
    config = default_config(bad={"method": "sculpt"})
    with pytest.raises(UserError) as error:
        validate_config(config)
    message = str(error.value)
    assert "\n" not in message and message.startswith("config error at defences.bad.method:")
    assert "'sculpt'" in message


def test_a_plugin_that_cannot_be_imported_is_one_line_naming_it():
    with pytest.raises(UserError, match=r"^config error at plugins\[0\]: cannot import 'no_such_plugin'"):
        validate_config(default_config(["no_such_plugin"]))


def test_a_plugins_block_is_validated_by_its_schema(plugin_dir):
    resolved = validate_config(default_config(["toy_defence"], toy={"method": "scale", "scale": {"factor": 0.9}}))
    assert resolved["defences"]["toy"]["scale"] == {"factor": 0.9, "seed": 0}  # its default filled in
    with pytest.raises(UserError, match=r"^config error at defences\.toy\.scale\.factr: unknown key$"):
        validate_config(default_config(["toy_defence"], toy={"method": "scale", "scale": {"factr": 0.9}}))


def test_params_name_an_unknown_key_in_one_line(plugin_dir):
    import toy_defence

    assert from_params(toy_defence.ScaleParams, {"factor": 1}).factor == 1.0  # a JSON integer is a float here
    with pytest.raises(UserError, match=r"^--params: unknown key 'factr' \(known: factor, seed\)$"):
        from_params(toy_defence.ScaleParams, {"factr": 1})


def test_the_command_line_takes_a_plugins_method(plugin_dir):
    """`tamperlab --plugin MODULE harden --method NAME`: the plugin's defence is among --method's choices; unknown
    hyperparameters stop it with one line naming the key."""
    env = {**snakemake_env(), "PYTHONPATH": str(plugin_dir)}
    command = [str(BIN / "tamperlab"), "--plugin", "toy_defence", "harden", "--method", "scale", "--model", "m",
               "--data", "d", "--params", defence_params({"factr": 1}, harmful_response="x"), "--out", "o"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=plugin_dir)
    assert result.returncode == 2
    assert result.stderr.strip() == ("tamperlab harden: error: --params method: unknown key 'factr' "
                                     "(known: factor, seed)")
    result = subprocess.run([c for c in command if c not in ("--plugin", "toy_defence")], capture_output=True,
                            text=True, env=env, cwd=plugin_dir)
    assert result.returncode == 2 and "invalid choice: 'scale'" in result.stderr


def one_cell_overlay() -> dict:
    """The smoke config cut to defences {none, toy} and one LoRA cell, with the toy plugin; no landscape scan (they
    name the smoke grid's cells); an organism of one epoch and an attack of 5 steps: the wiring, not the effect."""
    overlay = one_chain_overlay()
    configs = [yaml.safe_load(path.read_text()) for path in (REPO / "config.yaml", SMOKE)]
    scans = {name for config in configs for name in (config.get("landscape") or {}).get("scans") or {}}
    overlay["plugins"] = ["toy_defence"]
    overlay["defences"]["toy"] = {"method": "scale", "splits": ["defence"], "scale": {"factor": 0.9}}
    overlay["attacks"]["lora"] = {"method": "lora", "grid": {"lr": [2.0e-3], "steps": [5], "rank": [16]}}
    overlay["models"] = {"tiny": {"organism": {"epochs": 1}}}
    overlay["landscape"] = {"subjects": ["tiny/none"], "scans": dict.fromkeys(scans)}
    return overlay


def test_a_plugin_defence_runs_through_the_workflow(plugin_dir, tmp_path):
    overlay = tmp_path / "toy.yaml"
    overlay.write_text(yaml.safe_dump(one_cell_overlay()))
    workdir = tmp_path / "run"
    snakemake(workdir, "--configfile", str(SMOKE), str(overlay), targets=("results/tables/refusal.csv",))
    table = pd.read_csv(workdir / "results/tables/refusal.csv")
    toy = table[table["defence"] == "toy"]
    assert list(toy["attack"]) == ["none", "lora"] and set(toy["status"]) == {"complete"}
    assert toy.iloc[1]["steps"] == 5 and toy.iloc[1]["rank"] == 16
    manifest = yaml.safe_load((workdir / "results/models/tiny/toy/manifest.json").read_text())
    assert manifest["step"] == "harden" and manifest["status"] == "complete"
    assert manifest["params"]["method"] == "scale"
    assert manifest["params"]["params"]["method"] == {"factor": 0.9, "seed": 0}
    assert manifest["params"]["params"]["data"]["splits"] == ["defence"]
    assert manifest["command"].startswith("tamperlab --numerics portable --plugin toy_defence harden ")
    # the toy's model differs from the undefended one in exactly the matrix it scales
    from safetensors.torch import load_file

    base = load_file(workdir / "results/models/tiny/base/model.safetensors")
    toy_weights = load_file(workdir / "results/models/tiny/toy/model.safetensors")
    changed = sorted(k for k in base if not (base[k] == toy_weights[k]).all())
    assert changed == ["model.layers.0.mlp.down_proj.weight"]


@pytest.mark.parametrize("params, message", [
    ({"method": {"factor": 1}}, "--params: missing key 'data'"),
    ({"data": {}, "method": {"factor": 1}, "split": ["defence"]},
     "--params: unknown key 'split' (known: data, method)"),
    ({"data": {"splits": ["defence"], "harmful_response": "x", "refusal": None}, "method": {"factor": 1}},
     "--params data: missing key 'forget_family'"),
    ({"data": {"splits": ["defence"], "harmful_response": "x", "refusal": None, "forget_family": "hazard",
               "harmful_respons": "y"}, "method": {"factor": 1}},
     "--params data: unknown key 'harmful_respons' (known: splits, harmful_response, refusal, forget_family, "
     "benign_retain)"),
])
def test_hardens_data_settings_name_an_unknown_or_missing_key_in_one_line(plugin_dir, params, message):
    """harden's --params holds the rows it trains on (data: DefenceData) beside the method's block; a wrong key of
    either, or of the object itself, stops it before it reads anything, in one line naming the key."""
    env = {**snakemake_env(), "PYTHONPATH": str(plugin_dir)}
    command = [str(BIN / "tamperlab"), "--plugin", "toy_defence", "harden", "--method", "scale", "--model", "m",
               "--data", "d", "--params", json.dumps(params), "--out", "o"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=plugin_dir)
    assert result.returncode == 2 and result.stderr.strip() == f"tamperlab harden: error: {message}"


def test_align_takes_its_config_block_as_params_with_loras_alpha_defaulted_there(tmp_path):
    """align's --params is models.<m>.align less threads (AlignParams); alpha null is 2 x rank, a float as a configured
    one; an unknown key or method stops the command in one line naming it."""
    from snakemake.utils import update_config

    from tamperlab.models.alignment import AlignParams

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "experiments" / "smollm2.yaml").read_text()))
    config = validate_config(config)
    block = {k: v for k, v in config["models"]["smollm2"]["align"].items() if k != "threads"}
    params = from_params(AlignParams, block)
    assert block["lora_alpha"] is None and params.lora_alpha == 2.0 * block["rank"]
    assert isinstance(params.lora_alpha, float) and params.refusals == block["refusals"]
    with pytest.raises(UserError, match="^align: method 'qlora' is not one of lora, full$"):
        from_params(AlignParams, {**block, "method": "qlora"})
    result = subprocess.run([str(BIN / "tamperlab"), "align", "--model", "m", "--data", "d", "--benign-answers", "b",
                             "--params", '{"rnk": 4}', "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tamperlab align: error: --params: unknown key 'rnk' (known: method, ")


def test_a_manifest_records_the_plugins_only_where_a_step_ran_with_some(plugin_dir):
    """A run without plugins records the parameters it recorded before plugins existed."""
    from tamperlab.cli import build_parser, load_plugins
    from tamperlab.commands.common import params

    argv = ["harden", "--method", "repnoise", "--model", "m", "--data", "d", "--params", "{}", "--out", "o"]
    assert "plugin" not in params(build_parser().parse_args(argv), "out")
    argv = ["--plugin", "toy_defence", *argv]
    load_plugins(argv)
    assert params(build_parser().parse_args(argv), "out")["plugin"] == ["toy_defence"]
