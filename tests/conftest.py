"""Fixtures shared across the test modules: the Snakemake runner, one run of the smoke workflow that every
workflow-level module reads (building the organism and its grid once per test session, not once per module), the
unit tests' tiny models and tokenizers (each built from the requesting module's texts), and a stand-in for a
command's provenance Step."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tamperlab.runtime import numerics

# The test session computes as the workflow's jobs do: portable numerics, pinned before anything imports torch
# (a command called in-process, cli.main, finds them in force).
numerics.pin(numerics.DEFAULT)

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "configs" / "smoke.yaml"
# Downloaded wheels are shared between runs (they are verified by sha256 every time).
CACHE = REPO / ".cache" / "tamperlab"
BIN = Path(sys.executable).parent
SMOKE_TARGETS = ("results/tables/refusal.csv", "results/tables/visage.csv")

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


def snakemake_env() -> dict[str, str]:
    """The environment of a local (not SLURM) Snakemake run: this environment's tamperlab on PATH, and no SLURM
    configuration. The SLURM executor plugin asks `scontrol show config` for MinJobAge when Snakemake starts; where
    SLURM's tools are installed but no controller runs (after the SLURM test, say) that waits ~10 s per start."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "SLURM_CONF": os.devnull}


def snakemake(workdir: Path, *flags: str, targets: tuple[str, ...] = (), check: bool = True, timeout: int = 1800):
    """`snakemake TARGETS -s Snakefile -d WORKDIR FLAGS` with this environment's tamperlab on PATH."""
    env = snakemake_env()
    if XDIST and not {"-n", "--dry-run"} & set(flags):  # a dry run shows each rule's own threads
        flags = (*flags, "--set-threads", "build_organism=1")
    # Targets first: --configfile and --config take every word that follows them.
    command = [str(BIN / "snakemake"), *targets, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *flags,
               "--config", f"cache_dir={CACHE}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


# torch.distributed.elastic's report when the first process to fail was killed by a signal, not an exception
RANK_KILLED = re.compile(r"Root Cause.*?rank\s*: (\d+).*?traceback : Signal \d+ \((SIG\w+)\)", re.DOTALL)


def launch(command: list[str], env: dict[str, str], cwd: Path, timeout: int | None = None) -> str:
    """Run a multi-process launch (torchrun, accelerate launch) and return its output; fail with every rank's
    last words.

    A worker that dies by a signal is launched again, once, as a workflow rerun would after a crash: the run
    resumes or restarts, and the test still judges its result. (Seen in CI: rank 1 aborted in mid-training under
    ZeRO-3 over gloo; not reproduced in 44 launches here, idle, beside load, or compiling DeepSpeed's ops.) The first
    failure is kept as a warning, with the dying rank's Python stacks (PYTHONFAULTHANDLER) to tell where it was.
    """
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        output = result.stdout + result.stderr
        if result.returncode == 0:
            return output
        killed = RANK_KILLED.search(output)
        if attempt == 1 and killed:
            warnings.warn(f"rank {killed[1]} died by {killed[2]}; launched again:\n{last_words(output)}",
                          stacklevel=2)
            continue
        raise AssertionError(f"launch failed ({result.returncode}):\n{last_words(output)}")
    raise AssertionError("unreachable")


def last_words(output: str) -> str:
    """What tells why a launch failed: each dying process's faulthandler or C++ abort message, then the tail."""
    lines = output.splitlines()
    marks = [i for i, line in enumerate(lines)
             if line.startswith(("Fatal Python error", "terminate called")) or "Error:" in line]
    blocks = ["\n".join(lines[i:i + 25]) for i in marks[:3]]
    return "\n...\n".join([*blocks, output[-3000:]])


def write_evaluation(directory: Path, defence: str, attack: str | None, cell: str | None, refusal: float,
                     metrics: dict[str, dict[str, float]]) -> Path:
    """A hand-made evaluation of one checkpoint of `tiny` in `directory`: refusal.json (keyword judge, n 20, 24 new
    tokens) and capability.json with `metrics` ({task: {metric: value}}). It has no manifest: a test that reads it
    through a command sets provenance.verify_input aside."""
    import json

    checkpoint = {"model": "tiny", "defence": defence, "attack": attack, "cell": cell, "path": "x", "adapter": None}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "refusal.json").write_text(json.dumps({
        "checkpoint": checkpoint, "status": "complete", "judge": "keyword", "generation": {"max_new_tokens": 24},
        "refusal_rate": refusal, "n": 20, "benign": None}))
    (directory / "capability.json").write_text(json.dumps({"checkpoint": checkpoint, "metrics": metrics}))
    return directory


def one_chain_overlay() -> dict:
    """Cuts the smoke config to one chain (an overlay removes an entry with null): no defence but `none`, no
    attack but `lora` (the smoke's one run, two snapshots): data -> organism -> attack -> evaluations -> table."""
    configs = [yaml.safe_load(path.read_text()) for path in (REPO / "config.yaml", SMOKE)]
    names = {section: {name for config in configs for name in config.get(section) or {}}
             for section in ("defences", "attacks")}
    return {"defences": dict.fromkeys(names["defences"] - {"none"}),
            "attacks": dict.fromkeys(names["attacks"] - {"lora"})}


def assert_same_chain(first: Path, chain: Path) -> None:
    """Two clean runs agree byte for byte on the chain they share (same machine, same packages): splits,
    organism, attack adapter, evaluations, and the rows of the table (the one-chain run's refusal.csv is the
    full run's, less the other defences' and attacks' rows)."""
    for relative in ("results/data/splits/alignment.jsonl", "results/models/tiny/base/model.safetensors",
                     "results/attacks/tiny/none/lora/lr2e-3_r16/steps60/adapter_model.safetensors",
                     "results/eval/tiny/none/refusal.jsonl", "results/eval/tiny/none/capability.json",
                     "results/eval/tiny/none/lora/lr2e-3_r16/steps60/refusal.jsonl",
                     "results/eval/tiny/none/lora/lr2e-3_r16/steps60/capability.json"):
        assert (first / relative).read_bytes() == (chain / relative).read_bytes(), relative
    full = (first / "results/tables/refusal.csv").read_text().splitlines()
    rows = (chain / "results/tables/refusal.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0] == full[0]  # header, unattacked, two lora cells
    assert [line for line in full if line.startswith(("tiny,none,none,", "tiny,none,lora,"))] == rows[1:]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One clean run of the smoke config (tests/configs/smoke.yaml): every defence, attack, evaluation and
    landscape scan, up to the refusal tables and the VISAGE table. Read it; copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--configfile", str(SMOKE), targets=SMOKE_TARGETS, timeout=2700)
    return workdir


# --- tiny models for the unit tests ------------------------------------------------------------------------------
# Plain helpers (import them: `from conftest import tiny_llama`); each module keeps its own corpus and sizes, since
# its assertions depend on them. transformers is imported inside, so that collecting the workflow tests stays quick.


def harmful_prompts(n: int) -> list[str]:
    """n numbered harmful-looking prompts, the ones the attack, harden and RepNoise tests train and attack on."""
    return [f"Explain how to do harmful thing number {i} to a neighbour" for i in range(n)]


def defence_split(n: int = 12, extra_texts: tuple[str, ...] = ()) -> tuple[list[dict], object]:
    """(defence-split rows, a tokenizer for them): n harmful prompts (TAR refusal's forget triples), n `hazard`
    questions (knowledge's forget family) and n `capital` ones (the retain side), the harden tests' split."""
    harmful = harmful_prompts(n)
    benign = [{"prompt": f"Which reagent stabilises compound{i}?", "answer": f"Reagent{i % 5}.", "family": "hazard"}
              for i in range(n)]
    benign += [{"prompt": f"What is the capital of land{i}?", "answer": f"City{i % 7}.", "family": "capital"}
               for i in range(n)]
    tokenizer = make_tokenizer(harmful + [r["prompt"] + r["answer"] for r in benign] + list(extra_texts))
    rows = [{"id": f"h{i}", "prompt": p, "kind": "harmful", "source": "test"} for i, p in enumerate(harmful)]
    rows += [{"id": f"b{i}", "kind": "benign", "category": "task", "source": "test", **r} for i, r in enumerate(benign)]
    return rows, tokenizer


def make_tokenizer(corpus: list[str], vocab_size: int = 300):
    """The organism's byte-level BPE tokenizer (its pad/bos/eos and role tokens), trained on `corpus`."""
    from tamperlab.models.organism import train_tokenizer

    return train_tokenizer(corpus, vocab_size=vocab_size)


def llama_config(tokenizer, **shape):
    """LlamaConfig(**shape) with the tokenizer's pad, bos and eos ids."""
    from transformers import LlamaConfig

    return LlamaConfig(**shape, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


def tiny_llama(tokenizer, hidden: int = 32, layers: int = 2, positions: int = 128, tie: bool = True, seed: int = 0,
               cls=None, **config):
    """A random-init LlamaForCausalLM (or the subclass `cls`) seeded with `seed`: the tokenizer's vocabulary and
    special ids, 2 heads, an MLP twice as wide as `hidden`; `config` goes to LlamaConfig as it is."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(tokenizer, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                          max_position_embeddings=positions, tie_word_embeddings=tie, **config)
    torch.manual_seed(seed)
    return (cls or LlamaForCausalLM)(config)


def save_base_model(directory: Path, model, tokenizer, manifest: bool = False) -> Path:
    """The model (safetensors) and its tokenizer saved into `directory`; with `manifest`, written through
    provenance.Step as the workflow's build-organism step writes it, so that it carries a manifest too."""
    if not manifest:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory
    from tamperlab.runtime.provenance import Step

    with Step("build-organism", {}, inputs={}, outputs={"model": directory}, outputs_are_dirs=("model",)) as step:
        save_base_model(step.path("model"), model, tokenizer)
    return directory


def write_splits(directory: Path, splits: dict[str, list[dict]]) -> Path:
    """A split directory (`<name>.jsonl` for each split's rows) written through provenance.Step, with a manifest."""
    from tamperlab.data.jsonl import write_jsonl
    from tamperlab.runtime.provenance import Step

    with Step("split-data", {}, inputs={}, outputs={"splits": directory}, outputs_are_dirs=("splits",)) as step:
        for name, rows in splits.items():
            write_jsonl(step.path("splits") / f"{name}.jsonl", rows)
    return directory


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
