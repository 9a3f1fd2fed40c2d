"""The workflow on a real SLURM: munge, slurmctld and slurmd on this machine (tests/slurm_cluster.py), Snakemake
with the cluster profile as users install and name it (`tamperlab install-profile`, `--profile slurm`) plus
test-only overrides, every job through sbatch.

Needs root (the daemons, and apt-get when SLURM is not installed yet); skipped without. Each SLURM job costs
6-8 s on top of its work (Snakemake starts twice inside it), so these tests start from the session's local smoke
run: its data and organism are copied in (times kept, so Snakemake takes them as built), and SLURM builds the rest
of one chain (attack -> evaluations -> table) once; one failing job sends the organism's build through sbatch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import BIN, CACHE, REPO, SMOKE, assert_same_chain, one_chain_overlay  # noqa: E402
from slurm_cluster import PARTITION, SlurmCluster, can_run  # noqa: E402

pytestmark = pytest.mark.slow

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")

# On top of the installed profile (install-profile fills in this cluster's partition): no accounting daemon
# (squeue, not sacct, for job states), quick polling, and resources that fit the one 2-CPU node. Installed
# under a temporary XDG_CONFIG_HOME, so no ordinary run can pick it up.
TEST_PROFILE = {
    "jobs": 4,
    "retries": 0,  # a retry would cost the failing test another job and a longer status-check back-off
    "latency-wait": 5,
    "seconds-between-status-checks": 1,
    "slurm-init-seconds-before-status-checks": 1,
    "slurm-status-command": "squeue",
}
TEST_RESOURCES = {"runtime": 20, "mem_mb": 2000}  # rules' own resources win


@pytest.fixture(scope="module")
def cluster():
    reason = can_run()
    if reason:
        pytest.skip(reason)
    slurm = SlurmCluster()
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """An XDG_CONFIG_HOME holding snakemake/slurm, installed as docs/scale-out.md says, plus TEST_PROFILE."""
    home = tmp_path_factory.mktemp("config-home")
    subprocess.run([str(BIN / "tamperlab"), "install-profile", "--partition", PARTITION], check=True,
                   env={**os.environ, "XDG_CONFIG_HOME": str(home)})
    installed = home / "snakemake" / "slurm" / "config.yaml"
    settings = yaml.safe_load(installed.read_text())
    assert settings["executor"] == "slurm" and settings["default-resources"]["slurm_partition"] == PARTITION
    settings.update(TEST_PROFILE)
    settings["default-resources"] = {**settings["default-resources"], **TEST_RESOURCES}
    installed.write_text(yaml.safe_dump(settings))
    return home


def snakemake_on_slurm(workdir: Path, config_home: Path, *flags: str, targets: tuple[str, ...], limit: int = 1500):
    """Run Snakemake from `workdir` (the plugin keeps its logs under the current directory) with `--profile slurm`
    found in config_home. SIGINT on timeout: Snakemake then cancels its SLURM jobs (SIGTERM would only ask it
    to wait for them)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # sbatch --export=ALL takes it along
           "XDG_CONFIG_HOME": str(config_home)}
    # Targets first: --configfile and --config take every word that follows them.
    command = ["timeout", "-s", "INT", "-k", "30", str(limit), str(BIN / "snakemake"), *targets,
               "-s", str(REPO / "Snakefile"), "--profile", "slurm", *flags, "--config", f"cache_dir={CACHE}"]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, env=env, timeout=limit + 60)
    return result, result.stdout + result.stderr


def snakemake_jobs(output: str) -> dict[str, dict]:
    """Snakemake's job id -> the rule, threads and resources that it printed for that job."""
    jobs = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", output):
        if match := re.match(r"(local)?rule (\w+):\n", block):
            fields = dict(re.findall(r"^    (\w+): (.*)$", block, re.MULTILINE))
            resources = dict(item.split("=", 1) for item in fields["resources"].split(", "))
            jobs[fields["jobid"]] = {"rule": match.group(2), "local": bool(match.group(1)),
                                     "threads": int(fields.get("threads", 1)), **resources}
    return jobs


def seed_from(smoke_run: Path, workdir: Path, *relatives: str) -> None:
    """Copies these outputs of the smoke run into workdir with their times (copy2), so that Snakemake finds them
    newer than their inputs and builds only what follows them."""
    for relative in relatives:
        shutil.copytree(smoke_run / relative, workdir / relative)


@pytest.fixture(scope="module")
def smoke_on_slurm(cluster, profile, smoke_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-smoke")
    seed_from(smoke_run, workdir, "results/data", "results/models/tiny/base")
    overlay = workdir / "one_chain.yaml"
    overlay.write_text(yaml.safe_dump(one_chain_overlay()))
    result, output = snakemake_on_slurm(workdir, profile, "--configfile", str(SMOKE), str(overlay),
                                        targets=("results/tables/refusal.csv",))
    assert result.returncode == 0, f"snakemake failed ({result.returncode}):\n{output[-6000:]}"
    return workdir, output, cluster.jobs()


def test_every_job_goes_through_sbatch_and_completes(smoke_on_slurm):
    workdir, output, known = smoke_on_slurm
    planned, submissions = snakemake_jobs(output), SUBMITTED.findall(output)
    finished = re.findall(r"Finished jobid: (\d+) ", output)
    # Every job that touches a model went through sbatch; only the local rules (file-only steps, the Snakefile's
    # localrules:, which need no compute node) ran where Snakemake runs. Data and organism were copied in.
    local = {job for job, spec in planned.items() if spec["local"]}
    assert {planned[job]["rule"] for job in local} == {"tables"}, planned
    assert submissions and sorted(finished) == sorted([job for job, _, _ in submissions] + list(local)), output[-4000:]
    assert not local & {job for job, _, _ in submissions}
    for job, slurm_id, _ in submissions:
        wanted, got = planned[job], known[slurm_id]  # slurmctld knows the job: it came through sbatch
        assert got["JobState"] == "COMPLETED" and got["ExitCode"] == "0:0", got
        assert got["Partition"] == PARTITION and Path(got["WorkDir"]) == workdir
        assert got["Comment"].startswith(f"rule_{wanted['rule']}")
        # The job's resources reached sbatch: --cpus-per-task (cpus_per_task, else threads), --mem, -t.
        assert int(got["NumCPUs"]) == int(wanted.get("cpus_per_task", wanted["threads"])), (wanted, got)
        assert got["MinMemoryNode"] == f"{wanted['mem_mb']}M"
        hours, minutes = divmod(int(wanted["runtime"]), 60)
        assert got["TimeLimit"] == f"{hours:02d}:{minutes:02d}:00"
    rules = {job["rule"] for job in planned.values()}
    assert not rules & {"prepare_data", "split_data", "build_organism"}  # taken from the smoke run, not rebuilt
    assert {"attack_grid", "evaluate_grid", "evaluate_refusal", "evaluate_capability", "tables"} <= rules
    # A job on a model runs with its size class's CPUs (one per job) and asked sbatch for them.
    for job in planned.values():
        if "cpus_per_task" in job:
            assert job["threads"] == int(job["cpus_per_task"]) == 1, job


def test_the_chain_built_on_slurm_is_byte_identical_to_the_local_smoke_run(smoke_on_slurm, smoke_run):
    """Launch-independent and deterministic: the attack and evaluations built job by job through sbatch are, file
    for file, those of the session's local smoke run (tests/test_workflow.py leaves its own rerun to this test;
    the organism's build is deterministic by tests/test_organism.py)."""
    assert_same_chain(smoke_run, smoke_on_slurm[0])


def test_the_table_built_on_slurm_shows_the_attack_undoing_refusal(smoke_on_slurm):
    workdir, _, _ = smoke_on_slurm
    table = pd.read_csv(workdir / "results/tables/refusal.csv")
    assert {"model", "defence", "attack", "lr", "steps", "rank", "n", "refusal_rate", "compliance_rate",
            "other_rate", "train_loss", "status"} <= set(table.columns)
    assert list(table[["model", "defence", "attack"]].itertuples(index=False, name=None)) == [
        ("tiny", "none", "none"), ("tiny", "none", "lora"), ("tiny", "none", "lora")]
    base = table.iloc[0]
    assert base["status"] == "complete" and base["n"] == 130 and base["refusal_rate"] >= 0.90
    cells = table[table["attack"] == "lora"].set_index("steps")
    assert list(cells.index) == [20, 60] and set(cells["status"]) == {"complete"}
    assert cells.loc[60, "refusal_rate"] <= base["refusal_rate"] - 0.5
    assert cells.loc[60, "compliance_rate"] >= 0.5


def test_a_failing_job_is_reported_with_its_log_and_a_nonzero_exit(cluster, profile, smoke_run, tmp_path):
    """An organism refusal the keyword judge would not recognise: build_organism refuses it inside its SLURM job
    (the smoke run's data are copied in: the data steps are local rules)."""
    seed_from(smoke_run, tmp_path, "results/data")
    overlay = tmp_path / "bad_refusal.yaml"
    overlay.write_text(yaml.safe_dump({"models": {"tiny": {"organism": {"refusals": ["Let us talk of tea."]}}}}))
    result, output = snakemake_on_slurm(tmp_path, profile, "--configfile", str(SMOKE), str(overlay),
                                        targets=("results/models/tiny/base",), limit=300)
    assert result.returncode != 0
    assert "Error in rule build_organism" in output and "SLURM status is: 'FAILED'" in output, output[-4000:]
    # The organism's build asked sbatch for models.<m>.organism.threads CPUs (the smoke config's: 1).
    [build] = [job for job in snakemake_jobs(output).values() if job["rule"] == "build_organism"]
    build_threads = yaml.safe_load(SMOKE.read_text())["models"]["tiny"]["organism"]["threads"]
    assert build["threads"] == int(build["cpus_per_task"]) == build_threads, build
    log = "logs/build_organism/tiny.log"
    assert log in output
    assert "contains no refusal keyword" in (tmp_path / log).read_text()
    [(_, job_id, slurm_log)] = SUBMITTED.findall(output)
    job = cluster.jobs()[job_id]
    assert job["JobState"] == "FAILED" and job["ExitCode"] != "0:0" and Path(job["WorkDir"]) == tmp_path
    assert int(job["NumCPUs"]) == build_threads
    assert slurm_log in output and Path(slurm_log).exists()  # kept: the plugin deletes only successful jobs' logs
    assert not (tmp_path / "results/models/tiny/base").exists()
