"""Hub models fetched once: register-model puts a pinned snapshot in the hub cache (huggingface_hub's own
snapshot_download), every other step loads it from there with the hub offline, and a missing snapshot stops a step
with one line.

Nothing here reaches the hub: the cache is laid out as huggingface_hub lays it out
(models--<org>--<name>/snapshots/<revision>/) around a tiny saved model, and register-model runs with
HF_HUB_OFFLINE=1, under which snapshot_download serves a pinned revision from the cache (where the hub is
reachable it downloads the same files into the same place first).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tokenizer, refusal_params, save_base_model, tiny_llama, write_splits

from tamperlab.errors import UserError
from tamperlab.models.registry import POINTER, load_model, make_pointer, resolve

BIN = Path(sys.executable).parent
REPO_ID, REVISION = "tamperlab-test/tiny-chat", "0123456789abcdef0123456789abcdef01234567"
CORPUS = ["What is the capital of Zorvania?", "Quellport.", "I'm sorry, but I cannot help with that request."] * 4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny saved model and its weights."""
    tokenizer = make_tokenizer(CORPUS)
    model = tiny_llama(tokenizer)
    directory = save_base_model(tmp_path_factory.mktemp("hub") / "model", model, tokenizer)
    return directory, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cache(weights, tmp_path):
    """A hub cache holding the model's snapshot at REVISION, as huggingface_hub stores one (blobs, linked)."""
    root = tmp_path / "hub"
    repo = root / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, path in enumerate(sorted(weights[0].iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def tamperlab(*args: str, offline: bool | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    if offline is not None:
        env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    env["HF_HUB_CACHE"] = os.devnull  # nothing is found in the default cache: only the one the pointer names
    return subprocess.run([str(BIN / "tamperlab"), *args], capture_output=True, text=True, env=env, timeout=300)


def register(cache: Path, out: Path) -> subprocess.CompletedProcess:
    return tamperlab("register-model", "--source", "hf", "--id", REPO_ID, "--revision", REVISION,
                     "--hub-cache", str(cache), "--out", str(out), offline=True)


def test_register_model_takes_the_pinned_snapshot_through_snapshot_download_and_records_its_cache(cache, tmp_path):
    result = register(cache, tmp_path / "registered")
    assert result.returncode == 0, result.stderr
    pointer = json.loads((tmp_path / "registered" / POINTER).read_text())
    assert pointer == {"source": "hf", "id": REPO_ID, "revision": REVISION, "hub_cache": str(cache.resolve()),
                       "chat_template": None, "trust_remote_code": False}
    manifest = json.loads((tmp_path / "registered" / "manifest.json").read_text())
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert manifest["results"]["snapshot"] == str(snapshot.resolve())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["results"]["files"])


def test_register_model_without_the_hub_or_the_snapshot_fails_in_one_line(tmp_path):
    result = register(tmp_path / "empty", tmp_path / "registered")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"could not fetch {REPO_ID} at {REVISION}" in result.stderr
    assert not (tmp_path / "registered").exists()


def _evaluate(registered: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    rows = [{"id": f"h{i}", "prompt": p, "kind": "harmful", "source": "test"} for i, p in enumerate(CORPUS[:3])]
    data = tmp_path / "splits"
    if not data.exists():
        write_splits(data, {"evaluation": rows})
    return tamperlab("evaluate-refusal", "--model", str(registered), "--model-name", "tiny", "--defence", "none",
                     "--data", str(data), "--params", refusal_params(),
                     "--out-summary", str(tmp_path / "eval" / "refusal.json"),
                     "--out-responses", str(tmp_path / "eval" / "refusal.jsonl"))


def test_a_compute_step_loads_the_registered_snapshot_with_the_hub_offline(cache, tmp_path):
    """evaluate-refusal (a compute step: the CLI turns the hub off for it) loads the model from the pointer's
    cache alone: the default cache is empty and nothing is fetched."""
    assert register(cache, tmp_path / "registered").returncode == 0
    result = _evaluate(tmp_path / "registered", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "eval" / "refusal.json").read_text())
    assert summary["status"] == "complete" and summary["n"] == 3


def test_a_missing_snapshot_stops_a_compute_step_in_one_line_naming_the_model_and_the_fetch(cache, tmp_path):
    assert register(cache, tmp_path / "registered").returncode == 0
    shutil.rmtree(cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots")
    result = _evaluate(tmp_path / "registered", tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr
    assert f"the snapshot of {REPO_ID} at {REVISION} is not in the hub cache {cache.resolve()}" in line
    assert f"snakemake -f {tmp_path / 'registered'}" in line
    assert not (tmp_path / "eval" / "refusal.json").exists()


def test_load_model_reads_the_snapshot_offline_with_its_weights_and_the_pointers_template(cache, weights, tmp_path,
                                                                                           monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    registered = tmp_path / "registered"
    registered.mkdir()
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (registered / POINTER).write_text(json.dumps(make_pointer("hf", REPO_ID, REVISION, None, template, False,
                                                              hub_cache=cache)))
    name, kwargs, _ = resolve(registered)
    assert Path(name) == cache.resolve() / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / REVISION
    assert kwargs == {"trust_remote_code": False, "local_files_only": True}
    model, tokenizer = load_model(registered, device="cpu")
    for key, tensor in weights[1].items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert tokenizer.chat_template == template


def test_the_hub_cache_is_a_config_key_defaulting_to_huggingface_hubs_own():
    import copy

    import yaml

    from tamperlab.config import validate_config

    default = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    assert validate_config(default)["hub_cache"] is None
    shared = copy.deepcopy(default) | {"hub_cache": "/shared/hub"}
    assert validate_config(shared)["hub_cache"] == "/shared/hub"
    with pytest.raises(UserError, match="hub_cache"):
        validate_config(copy.deepcopy(default) | {"hub_cache": 3})


def test_a_pointer_written_before_snapshots_were_fetched_asks_to_register_again(tmp_path):
    (tmp_path / POINTER).write_text(json.dumps({"source": "hf", "id": REPO_ID, "revision": REVISION,
                                                "chat_template": None, "trust_remote_code": False}))
    with pytest.raises(UserError, match=f"register it again: snakemake -f {tmp_path}"):
        resolve(tmp_path)


def test_a_registered_judge_loads_like_a_model(cache, tmp_path, monkeypatch):
    """The refusal judge's hub model is registered once (rule register_judge) and its directory given to the
    judges, which load it through the same pointer: the snapshot, offline."""
    from huggingface_hub import constants

    from tamperlab.evaluation.judges import judge_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / POINTER).write_text(json.dumps(make_pointer("hf", REPO_ID, REVISION, None, None, False,
                                                            hub_cache=cache)))
    source, kwargs = judge_source(str(tmp_path), None)
    assert source.endswith(f"snapshots/{REVISION}") and kwargs["local_files_only"] is True
    assert judge_source(REPO_ID, REVISION) == (REPO_ID, {"revision": REVISION})  # a hand run's hub id


@pytest.mark.parametrize(("command", "offline"), [("evaluate-refusal", "1"), ("landscape-scan", "1"),
                                                    ("register-model", None), ("fetch-tasks", None)])
def test_the_cli_turns_the_hub_off_for_every_step_but_the_fetches(command, offline, monkeypatch):
    from tamperlab import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "x")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(cli, "build_parser", lambda: _Stub(command))
    cli.main([])
    assert os.environ.get("HF_HUB_OFFLINE") == offline


class _Stub:
    """A parser whose one command does nothing: main() up to the command's call."""

    def __init__(self, command: str):
        self.command = command

    def parse_args(self, argv):
        import argparse

        return argparse.Namespace(command=self.command, numerics="portable", func=lambda args: None)


# --- lm-eval's built-in tasks: their data sets fetched once too ----------------------------------------------------


class _Group:
    """A key of lm-eval's task dict that stands for a group (ConfigurableGroup)."""

    group_name = "mmlu"


class _Task:
    def __init__(self, path: str, name: str | None, docs: int):
        import types

        self.config = types.SimpleNamespace(dataset_path=path, dataset_name=name)
        self.docs = list(range(docs))

    def has_test_docs(self) -> bool:
        return True

    def test_docs(self):
        return self.docs


def test_fetch_tasks_builds_lm_evals_tasks_once_and_records_their_data_sets(tmp_path, monkeypatch):
    """fetch-tasks (a local rule, online) has lm-eval build each task, which downloads its data set into the hub's
    cache; the record names every subtask's data set. lm-eval is replaced here (no hub)."""
    import types

    from tamperlab import cli

    group = _Group()
    built = []

    def get_task_dict(tasks, manager):
        built.append(list(tasks))
        return {group: {"mmlu_anatomy": _Task("cais/mmlu", "anatomy", 135),
                        "mmlu_virology": _Task("cais/mmlu", "virology", 166)},
                "hellaswag": _Task("Rowan/hellaswag", None, 10042)}

    fake = types.ModuleType("lm_eval.tasks")
    fake.TaskManager = lambda **kwargs: None
    fake.get_task_dict = get_task_dict
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", fake)
    out = tmp_path / "lm_eval_tasks.json"
    cli.main(["fetch-tasks", "--tasks", "mmlu", "hellaswag", "--out", str(out)])
    assert built == [["mmlu", "hellaswag"]]
    assert json.loads(out.read_text()) == {
        "hellaswag": {"dataset_path": "Rowan/hellaswag", "dataset_name": None, "documents": 10042},
        "mmlu_anatomy": {"dataset_path": "cais/mmlu", "dataset_name": "anatomy", "documents": 135},
        "mmlu_virology": {"dataset_path": "cais/mmlu", "dataset_name": "virology", "documents": 166}}
    assert json.loads((tmp_path / "lm_eval_tasks.manifest.json").read_text())["results"] == {"tasks": 3}
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["fetch-tasks", "--tasks", "mmlu", "organism", "--out", str(tmp_path / "other.json")])
    assert exit_code.value.code == 2
