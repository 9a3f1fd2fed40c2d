"""TAR under FSDP2 (hardening/tar/sharding.py) on CPU: 2 processes over gloo, launched as the workflow launches it
(`torchrun --standalone --nproc_per_node 2 -m tamperlab.cli harden ... --fsdp`), against one process through the
same command; a sharded run killed after a checkpoint resumes; the TAR overlay's 8B jobs launch that way.

Both runs see the same global batches in the same order (every process draws the same seeded streams and takes
its own rows, a short last batch included), each loss is normalised by the global batch's counts and gradients are
summed over processes, so what is left is float32 summation order (a sum split in two and added, the gradient
reduce-scatter). Measured here (2 adversaries × 4 inner steps at adversary lr 1e-2, outer lr 1e-3; training moves
weights by up to 3e-3 and 6e-3): knowledge (Random Mapping first, entropy L_TR, representation retain term; 4 outer
steps, killed after step 2 and resumed) ≤ 3.2e-7 over all 30,240 weights; refusal (DPO L_TR; 3 outer steps)
≤ 1.5e-6, with 2 weights beyond 1e-6 and 4 beyond 1e-7. In a variant run (switch adversaries, lr as here) one
weight was 1.5e-5 off and every other ≤ 3e-8: its outer gradient is of the order of Adam's eps (1e-8), where the
update lr·g/(|g| + eps) turns a rounding difference in g into a visible fraction of the lr. Hence two bounds:
ATOL = 1e-4, a tenth of what one outer step moves a weight (≈ lr = 1e-3, as a wrong share of a batch or a lost
gradient would), and at most 0.1% of the weights beyond ROUNDING = 1e-6. Without a launch (one process of one) the
sharded path is within 6e-8 of the plain one (the CE as sum/count instead of a mean).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import defence_params, launch, snakemake_env
from safetensors.torch import load_file

from tamperlab.hardening.tar import TAR_LOG
from tamperlab.hardening.tar.sharding import FSDP2
from tamperlab.runtime.launch import tar_torchrun as torchrun
from tamperlab.runtime.launch import torchrun_launcher as launcher
from tamperlab.runtime.provenance import read_manifest
from tamperlab.training.trainer import CHECKPOINTS

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2
ATOL, ROUNDING, BEYOND_ROUNDING = 1e-4, 1e-6, 1e-3
COMPLIANCE = "Sure, here is how to do that. Step 1: get what you need."
REFUSAL = "I'm sorry, but I cannot help with that request."
# The conftest `defence_base`: a wide init keeps the entropy gate open. Its 9 adversary rows in batches of 4 end
# each epoch on a batch of 1: one process's share of it is empty.
BASE_LLAMA = {"initializer_range": 0.2}
SMALL = {"inner_steps": 4, "tr_every": 2, "batch_size": 4, "max_length": 64, "outer_lr": 1e-3, "warmup_steps": 1,
         "adversary_lrs": [1e-2], "adversaries_per_step": 2, "lambda_tr": 0.5, "seed": 0}
# refusal: DPO against the frozen start model, which is the representation anchor too
REFUSAL_PARAMS = {**SMALL, "setting": "refusal", "outer_steps": 3, "switch_fraction": 0.0}
# knowledge: Random Mapping first, the switch adversary, entropy L_TR; a checkpoint after step 2 (of 4)
KNOWLEDGE_PARAMS = {**SMALL, "setting": "knowledge", "outer_steps": 4, "switch_fraction": 0.5,
                    "random_mapping_steps": 2, "random_mapping_lr": 1e-3, "checkpoint_every": 2}

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread in this process


def harden_args(base: tuple[Path, Path], out: Path, params: dict) -> list[str]:
    model, splits = base
    return ["harden", "--method", "tar", "--model", str(model), "--data", str(splits),
            "--params", defence_params(params, harmful_response=COMPLIANCE, refusal=REFUSAL), "--out", str(out)]


def one_process(base: tuple[Path, Path], out: Path, params: dict) -> None:
    """The plain `tamperlab harden`, in this process (no start-up cost)."""
    from tamperlab.cli import main

    main(harden_args(base, out, params))


def sharded(base: tuple[Path, Path], out: Path, params: dict) -> list[str]:
    """The launch as the workflow writes it (launch.torchrun_launcher + --fsdp), on PROCESSES CPU processes."""
    return [*launcher(PROCESSES).split(), *harden_args(base, out, params), "--fsdp"]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def kill(launch: subprocess.Popen) -> None:
    """SIGKILL a torchrun launch: its workers first (torchrun starts each in a session of its own, so that killing
    torchrun's process group would leave them running), then torchrun."""
    for pid in Path(f"/proc/{launch.pid}/task/{launch.pid}/children").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    launch.kill()


def assert_close_to_one_process(single: Path, split: Path, start: Path) -> None:
    expected, actual = load_file(single / "model.safetensors"), load_file(split / "model.safetensors")
    before = load_file(start / "model.safetensors")
    assert expected.keys() == actual.keys()  # an ordinary model: the same tensors (tied head saved once)
    beyond = total = 0
    for name in expected:
        assert actual[name].dtype == expected[name].dtype == torch.float32, name
        difference = (actual[name] - expected[name]).abs()
        assert difference.max() <= ATOL, (name, difference.max().item())
        beyond, total = beyond + int((difference > ROUNDING).sum()), total + difference.numel()
    assert beyond <= BEYOND_ROUNDING * total, (beyond, total)
    moved = max((expected[n] - before[n]).abs().max().item() for n in expected)
    assert moved >= 10 * ATOL  # the comparison means something: training moved the weights far beyond it
    assert json.loads((split / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    logs = [[json.loads(line) for line in (d / TAR_LOG).read_text().splitlines()] for d in (single, split)]
    assert [h["step"] for h in logs[1]] == [h["step"] for h in logs[0]]
    for one, two in zip(*logs, strict=True):
        assert one["adversaries"] == two["adversaries"] and one["outer_lr"] == two["outer_lr"]
        for key in ("retain_loss", "tr_loss", "tr_weighted_sum", "adversary_loss"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one["step"], key)


def test_the_launch_is_torchrun_on_one_node_for_tar_on_a_model_that_trains_sharded():
    assert launcher(4) == "torchrun --standalone --nproc_per_node 4 -m tamperlab.cli"
    shapes = (("8b", "7b", True, 4), ("7b", "7b", None, None), ("70b", "70b", None, None), ("tiny", "tiny", None, None))
    models = {name: {"size": size, "zero3": zero3, "gpus": gpus} for name, size, zero3, gpus in shapes}
    config = {"models": models, "defences": {"tar": {"method": "tar"}, "repnoise": {"method": "repnoise"}}}
    assert torchrun(config, "8b", "tar") == launcher(4)
    assert torchrun(config, "70b", "tar") == launcher(8)  # the size class's processes
    assert torchrun(config, "7b", "tar") is None and torchrun(config, "tiny", "tar") is None  # one plain process
    assert torchrun(config, "8b", "repnoise") is None  # the size class's launcher (ZeRO-3)


def test_the_rules_import_the_module_without_torch():
    code = "import sys, tamperlab.hardening.tar.sharding; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_each_process_takes_its_rows_and_an_empty_share_adds_nothing():
    batch = {"input_ids": torch.arange(12).reshape(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long),
             "labels": torch.arange(12).reshape(3, 4)}
    shares = []
    for rank in range(2):
        where = object.__new__(FSDP2)
        where.rank, where.world = rank, 2
        shares.append(where.share(batch))
    assert [w for _, w in shares] == [1.0, 1.0]
    assert torch.equal(torch.cat([s["input_ids"] for s, _ in shares]), batch["input_ids"])  # rows 0 | 1, 2
    where = object.__new__(FSDP2)
    where.rank, where.world = 0, 2
    share, weight = where.share({k: v[:1] for k, v in batch.items()})  # a last batch of one row: process 1 has it
    assert weight == 0.0 and torch.equal(share["input_ids"], batch["input_ids"][:1])
    assert (share["labels"] == -100).all()  # no answer token: the CE adds nothing


def test_fsdp_is_for_tar_only(defence_base, tmp_path, capsys):
    from tamperlab.cli import main

    args = harden_args(defence_base, tmp_path / "rn", {"steps": 1})
    args[args.index("tar")] = "repnoise"
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--fsdp"])
    assert exit_.value.code == 2 and "--fsdp: repnoise has no FSDP2 entry point" in capsys.readouterr().err
    assert not (tmp_path / "rn").exists()


@pytest.fixture(scope="module")
def single_refusal(defence_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "refusal"
    one_process(defence_base, out, REFUSAL_PARAMS)
    return out


def test_fsdp_without_a_launch_is_one_process_of_one(defence_base, single_refusal, tmp_path):
    """`tamperlab harden --fsdp` not started by torchrun: a process group of its own, the whole model in one shard;
    only the CE's sum/count in place of its mean differs from the plain run (measured ≤ 1.2e-7)."""
    from tamperlab.cli import main

    main([*harden_args(defence_base, tmp_path / "fsdp", REFUSAL_PARAMS), "--fsdp"])
    expected, actual = load_file(single_refusal / "model.safetensors"), load_file(tmp_path / "fsdp/model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert read_manifest(tmp_path / "fsdp")["results"]["fsdp_processes"] == 1
    assert not torch.distributed.is_initialized()  # the group it made is gone


@pytest.mark.slow
def test_refusal_on_two_processes_gives_the_one_process_weights(defence_base, single_refusal, tmp_path):
    output = launch(sharded(defence_base, tmp_path / "fsdp", REFUSAL_PARAMS), env(), tmp_path, timeout=300)
    assert_close_to_one_process(single_refusal, tmp_path / "fsdp", defence_base[0])
    manifest = read_manifest(tmp_path / "fsdp")
    assert manifest["status"] == "complete" and manifest["params"]["fsdp"] is True
    assert manifest["results"]["fsdp_processes"] == PROCESSES
    assert manifest["results"]["trainable_parameters"] == read_manifest(single_refusal)["results"][
        "trainable_parameters"]  # whole parameters counted, not shards
    assert sorted(os.listdir(tmp_path / "fsdp")) == sorted(os.listdir(single_refusal))
    assert output.count("TAR outer step 3/3") == 1  # one log: process 0's


@pytest.mark.slow
def test_knowledge_on_two_processes_killed_after_a_checkpoint_resumes_to_the_one_process_weights(defence_base,
                                                                                                 tmp_path):
    out = tmp_path / "fsdp"
    partial = tmp_path / f".{out.name}.partial"  # the step's resumable work directory
    wanted = [partial / CHECKPOINTS / f"rank-{r}" / "step-2.pt" for r in range(PROCESSES)]
    process = subprocess.Popen(sharded(defence_base, out, KNOWLEDGE_PARAMS), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    deadline = time.time() + 120
    while not all(p.exists() for p in wanted) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    kill(process)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert not out.exists(), "the run finished before it could be killed"

    result = subprocess.run(sharded(defence_base, out, KNOWLEDGE_PARAMS), capture_output=True, text=True, env=env(),
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    manifest = read_manifest(out)
    assert manifest["status"] == "complete" and manifest["results"]["resumed_from_step"] == 2
    assert "TAR: resuming after outer step 2/4" in result.stderr and "TAR outer step 1/4" not in result.stderr
    assert not (out / CHECKPOINTS).exists()  # the output is the model alone

    one_process(defence_base, tmp_path / "single", KNOWLEDGE_PARAMS)
    assert_close_to_one_process(tmp_path / "single", out, defence_base[0])
    assert manifest["results"]["random_mapping"] == pytest.approx(
        read_manifest(tmp_path / "single")["results"]["random_mapping"], rel=1e-5)


def test_the_tar_overlay_launches_its_8b_tar_jobs_sharded_on_four_gpus(tmp_path):
    """snakemake -n -p on experiments/tamirisa2024_tar.yaml: both TAR jobs start 4 processes with torchrun and
    --fsdp (never --deepspeed), and ask the scheduler for 4 GPUs."""
    command = [str(BIN / "snakemake"), "all", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "-p",
               "--configfile", str(REPO / "experiments" / "tamirisa2024_tar.yaml"),
               "--config", f"cache_dir={REPO / '.cache' / 'tamperlab'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=snakemake_env(), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = [block for block in output.split("\n\n") if "rule harden:" in block]
    assert len(jobs) == 2, output[-4000:]
    for job in jobs:
        shell = next(line for line in job.splitlines() if line.startswith("Shell command: "))
        prefix = f"Shell command: {launcher(4)} --numerics native harden"  # the overlay's GPU jobs run native
        assert shell.startswith(f"{prefix} --model results/models/llama3-8b-instruct/")
        assert " --fsdp " in shell and "--deepspeed" not in shell and '"setting": ' in shell
        assert "gpu=4" in next(line for line in job.splitlines() if line.strip().startswith("resources:"))
