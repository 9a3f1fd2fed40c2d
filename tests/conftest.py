"""Fixtures and hooks shared across the test modules: one run of the smoke workflow that every workflow-level module
reads (building the organism and its grid once per test session, not once per module), the unit tests' tiny models
and tokenizers (each built from the requesting module's texts), a stand-in for a command's provenance Step, and how
pytest-xdist groups the modules. No test imports from here: the plain helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import (
    SMOKE,
    SMOKE_TARGETS,
    defence_split,
    harmful_prompts,
    make_tokenizer,
    save_base_model,
    snakemake,
    tiny_llama,
    write_splits,
)

from tamperlab.runtime import numerics

# The test session computes as the workflow's jobs do: portable numerics, pinned before anything imports torch
# (a command called in-process, cli.main, finds them in force).
numerics.pin(numerics.DEFAULT)

# Under pytest-xdist (`-n 2`, docs/tests.md) two workers share the two cores, so nothing may run torch on two threads:
# torch's threads collapse when another process takes a core they counted on (measured: the default organism's
# 2-thread build beside the smoke run, 4 min alone, ran over 18). Each worker's torch takes one thread, and its
# Snakemake runs build the organism with one (`--set-threads`); every other job on a test model takes one already.
XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# What must share an xdist worker, so that no session or module fixture is built twice: the modules that read the
# session's smoke run go together; every other module is a group of its own; a long test that shares no fixture
# with its module runs apart. (xdist's own `loadgroup` marks do not reach the scheduler under pytest 9.)
SMOKE_MODULES = ("test_workflow.py", "test_landscape_workflow.py", "test_report.py", "test_slurm.py", "test_replay.py")
APART = ("test_workflow.py::test_default_config_organism_meets_its_targets",)
# The longest groups start first (measured: smoke run + SLURM ≈ 9 min, the default organism 4.3, SmolLM2 4.7).
LONG_FIRST = ("smoke_run", *APART, "test_real_model.py", "test_deepspeed.py", "test_attack.py")


def xdist_group(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    if nodeid.split("/")[-1] in APART:
        return nodeid
    return "smoke_run" if module.split("/")[-1] in SMOKE_MODULES else module


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class FixtureGroups(LoadScopeScheduling):  # whole groups, in collection order (the longest first, below)
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False
    return FixtureGroups(config, log)


def start_rank(nodeid: str) -> int:
    group = xdist_group(nodeid).split("/")[-1]
    return LONG_FIRST.index(group) if group in LONG_FIRST else len(LONG_FIRST)


def pytest_collection_modifyitems(config, items):
    """The groups above must hold: a test that reads the smoke run outside them would build it a second time."""
    for item in items:
        if "smoke_run" in item.fixturenames and xdist_group(item.nodeid) != "smoke_run":
            raise pytest.UsageError(f"{item.nodeid} reads the smoke run: add its module to SMOKE_MODULES in "
                                    "tests/conftest.py (and keep it out of APART)")
    items.sort(key=lambda item: start_rank(item.nodeid))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One clean run of the smoke config (tests/configs/smoke.yaml): every defence, attack, evaluation and
    landscape scan, up to the refusal tables and the VISAGE table. Read it; copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--configfile", str(SMOKE), targets=SMOKE_TARGETS, timeout=2700)
    return workdir


# --- the unit tests' tiny models, as fixtures --------------------------------------------------------------------
# Module-scoped, each built from what the requesting module names (its corpus, its answers, its rows): a module's
# assertions depend on its own texts, and a tokenizer or model in memory is mutable, so no two modules share one.


@pytest.fixture(scope="module")
def tokenizer(request):
    """The module's tokenizer: the organism's BPE trained on the module's TOKENIZER_CORPUS, with a vocabulary of its
    TOKENIZER_VOCAB_SIZE (300 where it names none)."""
    module = request.module
    return make_tokenizer(module.TOKENIZER_CORPUS, vocab_size=getattr(module, "TOKENIZER_VOCAB_SIZE", 300))


@pytest.fixture(scope="module")
def attack_base(request, tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, split dir), both written through Step so that they carry manifests like the workflow's own
    outputs: a tiny random-init Llama whose tokenizer knows 24 harmful prompts and the module's attack RESPONSE, and
    a split with those prompts to attack on (`attack`) and one to evaluate (`evaluation`)."""
    root = tmp_path_factory.mktemp("attack")
    prompts = harmful_prompts(24)
    tokenizer = make_tokenizer(prompts + [request.module.RESPONSE])
    model = tiny_llama(tokenizer)
    rows = [{"id": f"h{i}", "prompt": p, "kind": "harmful", "source": "test"} for i, p in enumerate(prompts)]
    splits = {"attack": rows, "evaluation": [{**rows[0], "id": "e0"}]}
    return (save_base_model(root / "base", model, tokenizer, manifest=True),
            write_splits(root / "splits", splits))


@pytest.fixture(scope="module")
def defence_base(request, tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, split dir), both with manifests: a tiny random-init Llama (LlamaConfig overrides: the module's
    BASE_LLAMA, if any) whose tokenizer also knows the module's COMPLIANCE and REFUSAL answers, and the defence split
    of defence_split(12): harmful prompts and benign task questions (a hazard family and a capital family)."""
    module = request.module
    root = tmp_path_factory.mktemp("defence")
    rows, tokenizer = defence_split(12, (module.COMPLIANCE, module.REFUSAL))
    model = tiny_llama(tokenizer, **getattr(module, "BASE_LLAMA", {}))
    return (save_base_model(root / "base", model, tokenizer, manifest=True),
            write_splits(root / "splits", {"defence": rows}))


@pytest.fixture(scope="module")
def tar_model(request, tmp_path_factory):
    """(saved model dir, tokenizer, model) for TAR: a random-init 2-layer Llama, hidden 32, over a tokenizer of every
    text of the module's TAR ROWS ({setting: (forget rows, retain rows)}). A wider init than the default makes the
    next-token distributions peaked, so the entropy gate stays open."""
    rows = [row for forget, retain in request.module.ROWS.values() for row in forget + retain]
    tokenizer = make_tokenizer([text for row in rows for text in row.values()])
    model = tiny_llama(tokenizer, initializer_range=0.2)
    return save_base_model(tmp_path_factory.mktemp("tar") / "base", model, tokenizer), tokenizer, model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~15x faster on one thread than on two contended ones (2 shared cores here). A module asks for
    it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a command's body without its step's files -------------------------------------------------------------------


class StandInStep:
    """provenance.Step's interface without its bookkeeping: the body runs; nothing is hashed, verified or
    recorded, and each output's path is the one given."""

    def __init__(self, name: str, params: dict, inputs: dict | None = None, outputs: dict | None = None, **_):
        self.name, self.params, self.outputs = name, dict(params), {k: Path(v) for k, v in (outputs or {}).items()}
        self.results, self.status = None, "complete"

    def path(self, key: str) -> Path:
        return self.outputs[key]

    def phase(self, name: str):
        from contextlib import nullcontext

        return nullcontext()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


@pytest.fixture
def stand_in_step(monkeypatch):
    """provenance.Step replaced by StandInStep for this test: a command's public function runs its body (what it
    reads, what it hands the domain) without manifests or verified inputs."""
    from tamperlab.runtime import provenance

    monkeypatch.setattr(provenance, "Step", StandInStep)
