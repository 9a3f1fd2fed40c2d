"""Config validation: the repository's config.yaml is valid, defaults are filled in, and every error is one
line naming the offending key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tamperlab.config import validate_config
from tamperlab.errors import UserError

CONFIG_PATH = Path(__file__).resolve().parents[1] / "config.yaml"


@pytest.fixture(scope="module")
def repo_config():
    return yaml.safe_load(CONFIG_PATH.read_text())


@pytest.fixture
def config(repo_config):
    return copy.deepcopy(repo_config)


def _set_landscape(config, where: str, value) -> None:
    """config["landscape"][a][b]... = value for where = "a.b..."."""
    *parents, name = where.split(".")
    section = config["landscape"]
    for parent in parents:
        section = section[parent]
    section[name] = value


def _error(config) -> str:
    with pytest.raises(UserError) as error:
        validate_config(config)
    message = str(error.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    assert message.startswith("config error at ")
    return message


def test_repository_config_is_valid_and_defaults_are_filled(config):
    resolved = validate_config(config)
    organism = resolved["models"]["tiny"]["organism"]
    assert organism["hidden_size"] == 128
    assert organism["vocab_size"] == 2000
    assert len(organism["refusals"]) >= 1
    refusal = resolved["evaluation"]["refusal"]
    assert refusal["max_new_tokens"] == 32
    assert refusal["judge"] == "keyword"
    assert refusal["classifier"] is None
    assert resolved["datasets"]["advbench"]["field"] == "prompt"
    assert resolved["datasets"]["benign"]["params"]["eval_requests"] == 120
    assert resolved["models"]["tiny"]["chat_template"] is None
    assert resolved["models"]["tiny"]["trust_remote_code"] is False


def test_validate_config_returns_a_copy_and_leaves_its_argument_alone(config, repo_config):
    resolved = validate_config(config)
    assert config == repo_config
    assert "hidden_size" not in config["models"]["tiny"]["organism"]
    assert resolved is not config


def test_config_values_given_override_defaults(config):
    config["models"]["tiny"]["organism"]["hidden_size"] = 64
    config["evaluation"]["refusal"]["max_new_tokens"] = 8
    resolved = validate_config(config)
    assert resolved["models"]["tiny"]["organism"]["hidden_size"] == 64
    assert resolved["models"]["tiny"]["organism"]["num_hidden_layers"] == 4
    assert resolved["evaluation"]["refusal"]["max_new_tokens"] == 8
    assert resolved["evaluation"]["refusal"]["batch_size"] == 64


def test_minimal_config_gets_top_level_defaults(config):
    minimal = {"datasets": config["datasets"], "models": config["models"]}
    resolved = validate_config(minimal)
    assert resolved["seed"] == 0
    assert resolved["splits"] == ["alignment", "attack", "defence", "evaluation"]
    assert list(resolved["defences"]) == ["none"] and resolved["defences"]["none"]["method"] == "none"
    assert resolved["evaluation"]["refusal"]["split"] == "evaluation"
    assert resolved["system_prompts"] == {}


def test_wrong_type_names_the_key(config):
    config["models"]["tiny"]["organism"]["hidden_size"] = "big"
    message = _error(config)
    assert "models.tiny.organism.hidden_size" in message
    assert "'big'" in message and "integer" in message


def test_unknown_top_level_key_is_named(config):
    config["sed"] = 1
    message = _error(config)
    assert "sed" in message and "unknown key" in message


def test_unknown_nested_key_is_named_with_its_path(config):
    config["datasets"]["advbench"]["shaa256"] = config["datasets"]["advbench"]["sha256"]
    message = _error(config)
    assert "datasets.advbench.shaa256" in message
    assert "unknown key" in message


def test_missing_required_field_names_dataset_and_field(config):
    del config["datasets"]["advbench"]["sha256"]
    message = _error(config)
    assert "datasets.advbench" in message and "sha256" in message
    assert "missing" in message


def test_split_fractions_not_summing_to_one_are_refused(config):
    config["datasets"]["advbench"]["splits"] = {"alignment": 0.5, "attack": 0.15, "defence": 0.1,
                                                "evaluation": 0.2}
    message = _error(config)
    assert "datasets.advbench.splits" in message
    assert "0.95" in message


def test_split_fraction_for_an_unknown_split_is_refused(config):
    config["datasets"]["harmbench"]["splits"] = {"alignment": 0.7, "atack": 0.15, "defence": 0.15}
    message = _error(config)
    assert "datasets.harmbench.splits.atack" in message


def test_system_prompt_naming_an_unknown_prompt_is_refused(config):
    config["evaluation"]["refusal"]["system_prompt"] = "friendly"
    message = _error(config)
    assert "evaluation.refusal.system_prompt" in message
    assert "'friendly'" in message


def test_system_prompt_naming_a_known_prompt_is_accepted(config):
    config["evaluation"]["refusal"]["system_prompt"] = "safety"
    assert validate_config(config)["evaluation"]["refusal"]["system_prompt"] == "safety"


def test_classifier_judge_without_classifier_is_refused(config):
    config["evaluation"]["refusal"]["judge"] = "classifier"
    message = _error(config)
    assert "evaluation.refusal.classifier" in message


def test_enum_and_pattern_errors_name_the_key(config):
    bad_format = copy.deepcopy(config)
    bad_format["datasets"]["advbench"]["format"] = "xml"
    assert "datasets.advbench.format" in _error(bad_format)
    bad_hash = copy.deepcopy(config)
    bad_hash["datasets"]["harmbench"]["wheel_sha256"] = "abc"
    assert "datasets.harmbench.wheel_sha256" in _error(bad_hash)


def test_defence_named_base_is_refused(config):
    config["defences"] = {"base": {"method": "none"}}
    assert "defences.base" in _error(config)


def test_an_attack_runs_against_every_defence_unless_it_names_its_targets(config):
    from tamperlab.attacks.grid import attacked_defences

    resolved = validate_config(config)
    assert attacked_defences(resolved, "lora") == list(resolved["defences"])  # null: every defence
    config["attacks"]["hazard"]["defences"] = ["none", "tar_knowledge"]
    assert attacked_defences(validate_config(config), "hazard") == ["none", "tar_knowledge"]


@pytest.mark.parametrize(("targets", "text"), [
    (["none", "tar_bio"], "attacks.hazard.defences: 'tar_bio' is not a key of defences"),
    ([], "attacks.hazard.defences: [] should be non-empty"),
    (["tar", "tar"], "attacks.hazard.defences: ['tar', 'tar'] has non-unique elements"),
])
def test_an_attack_naming_a_defence_that_is_not_configured_is_refused(config, targets, text):
    config["attacks"]["hazard"]["defences"] = targets
    assert text in _error(config)


@pytest.mark.parametrize(("where", "value"), [("subjects", ["tiny/none/lora_tar/strongest"]),
                                               ("scans.finetune.target", "lora_tar/strongest"),
                                               ("scans.random_2d.project", ["lora_tar/strongest"])])
def test_a_landscape_reference_to_an_attack_not_run_against_its_defence_is_refused(config, where, value):
    config["attacks"]["lora_tar"] = {**config["attacks"]["lora"], "defences": ["tar"]}
    _set_landscape(config, where, value)  # a reference to lora_tar on tiny/none
    message = _error(config)
    assert message.startswith(f"config error at landscape.{where}: ") and (
        "lora_tar is not run against defence 'none' (attacks.lora_tar.defences)" in message), message
    config["attacks"]["lora_tar"]["defences"] = ["none", "tar"]
    validate_config(config)


# --- the landscape's references (resolved and checked here, before any job) ---------------------------------------


def test_landscape_strongest_is_resolved_to_the_grid_cell_of_the_largest_lr_steps_and_rank(config):
    landscape = validate_config(config)["landscape"]
    assert "tiny/none/lora/lr1e-3_steps50_r16" in landscape["subjects"]
    assert landscape["scans"]["finetune"]["target"] == "lora/lr1e-3_steps50_r16"
    assert landscape["scans"]["random_2d"]["project"] == ["lora/lr1e-3_steps50_r16"]
    assert config["landscape"]["scans"]["finetune"]["target"] == "lora/strongest"  # the argument is left alone


@pytest.mark.parametrize(("where", "value", "text"), [
    ("subjects", ["tiny/nope"], "no defence 'nope' in defences"),
    ("subjects", ["big/none"], "no model 'big' in models"),
    ("scans.random_2d.project", ["lora/lr9e-9_steps1_r1"], "no cell 'lr9e-9_steps1_r1' in the grid of lora"),
    ("scans.finetune.target", "qlora/strongest", "no attack 'qlora' in attacks"),
    ("scans.finetune.target", None, "an interpolation scan needs a target"),
    ("scans.random_1d.project", ["lora/strongest"], "projections are onto a 2D plane; 1d has one axis"),
    ("scans.random_1d.system_prompts", ["friendly"], "'friendly' is not in system_prompts"),
    ("scans.random_2d.shards", 100, "100 shards for 81 points"),
    ("prompts.split", "train", "'train' is not a split named in splits"),
    ("prompts.dataset", "advbench", "give exactly one of split and dataset"),
])
def test_a_bad_landscape_reference_is_one_line_naming_the_key(config, where, value, text):
    _set_landscape(config, where, value)
    key = "landscape.prompts" if where == "prompts.dataset" else f"landscape.{where}"  # the pair, not one of it
    message = _error(config)
    assert message.startswith(f"config error at {key}: ") and text in message, message


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("where", ["models", "datasets", "defences", "classifier"])
@pytest.mark.parametrize("revision", ["main", "PLACEHOLDER-pin-a-40-hex-commit", "<pin>", COMMIT[:-1], COMMIT.upper()])
def test_a_hub_revision_that_is_not_a_commit_stops_at_start_up_naming_the_key(config, where, revision):
    """A placeholder or branch name is refused before any job runs (not when the job reaches the hub)."""
    hub = {"source": "hf", "id": "org/name", "revision": revision}
    if where == "models":
        config["models"]["hubmodel"], key = hub, "models.hubmodel.revision"
    elif where == "datasets":
        config["datasets"]["hubdata"] = {**hub, "kind": "harmful", "splits": {"evaluation": 1.0}}
        key = "datasets.hubdata.revision"
    elif where == "defences":
        config["defences"]["release"], key = {**hub, "method": "repnoise"}, "defences.release.revision"
    else:
        config.setdefault("evaluation", {}).setdefault("refusal", {}).update(
            judge="classifier", classifier={"model": "org/judge", "revision": revision, "refusal_label": "SAFE"})
        key = "evaluation.refusal.classifier.revision"
    message = _error(config)
    assert message.startswith(f"config error at {key}: ") and "40-hex commit" in message, message
    assert repr(revision) in message


def test_a_hub_revision_that_is_a_commit_is_accepted(config):
    config["models"]["hubmodel"] = {"source": "hf", "id": "org/name", "revision": COMMIT}
    config.setdefault("evaluation", {}).setdefault("refusal", {}).update(
        # a local directory
        judge="classifier", classifier={"model": "./judge", "revision": None, "refusal_label": "SAFE"})
    resolved = validate_config(config)
    assert resolved["models"]["hubmodel"]["revision"] == COMMIT


def test_a_tar_anchor_names_a_model_and_defaults_to_none(config):
    config["defences"]["tar_anchored"] = {"method": "tar", "anchor": "tiny"}
    resolved = validate_config(config)
    assert resolved["defences"]["tar_anchored"]["anchor"] == "tiny"
    assert resolved["defences"]["none"]["anchor"] is None
    config["defences"]["tar_anchored"]["anchor"] = "nosuchmodel"
    assert _error(config).startswith("config error at defences.tar_anchored.anchor: 'nosuchmodel'")
    config["defences"]["tar_anchored"] = {"method": "repnoise", "anchor": "tiny"}
    assert _error(config).startswith("config error at defences.tar_anchored.anchor: only a TAR")


def test_a_benign_mix_generator_is_self_or_a_model(config):
    config["attacks"]["lora_mixed"]["benign_mix"]["generator"] = "self"
    validate_config(copy.deepcopy(config))
    config["attacks"]["lora_mixed"]["benign_mix"]["generator"] = "gpt5"
    assert _error(config) == ("config error at attacks.lora_mixed.benign_mix.generator: 'gpt5' is neither self nor "
                              "a key of models")
