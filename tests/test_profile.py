"""`tamperlab install-profile`: the cluster profile where `snakemake --profile slurm` finds it by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tamperlab.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCE = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())


@pytest.fixture
def config_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


def install(capsys, *argv: str) -> tuple[int, str]:
    try:
        main(["install-profile", *argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_profile_lands_in_the_user_config_dir_with_partition_and_account(config_home, capsys):
    code, out = install(capsys, "--partition", "gpu-a100", "--account", "proj42")
    installed = config_home / "snakemake" / "slurm" / "config.yaml"
    assert code == 0 and str(installed.parent) in out
    settings = yaml.safe_load(installed.read_text())
    assert settings["default-resources"] == {**SOURCE["default-resources"],
                                             "slurm_partition": "gpu-a100", "slurm_account": "proj42"}
    assert {k: v for k, v in settings.items() if k != "default-resources"} == \
        {k: v for k, v in SOURCE.items() if k != "default-resources"}


def test_without_partition_and_account_the_placeholders_stay_commented(config_home, capsys):
    code, out = install(capsys)
    assert code == 0 and "partition and account unset" in out
    installed = (config_home / "snakemake" / "slurm" / "config.yaml").read_text()
    assert installed == (REPO / "profiles" / "slurm" / "config.yaml").read_text()


def test_snakemake_resolves_profile_slurm_to_the_installed_one(config_home, tmp_path, capsys):
    env = {**os.environ, "SLURM_CONF": "/dev/null", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [str(BIN / "snakemake"), "results/data/advbench.jsonl", "--profile", "slurm", "-n", "-s",
               str(REPO / "Snakefile"), "-d", str(tmp_path / "work"), "--executor", "local", "--cores", "1"]
    before = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert before.returncode != 0 and "no profile.yaml (or config.yaml) found" in before.stderr

    assert install(capsys, "--partition", "gpu-a100", "--account", "proj42")[0] == 0
    after = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = after.stdout + after.stderr
    assert after.returncode == 0, output[-3000:]
    assert "slurm_partition=gpu-a100, slurm_account=proj42" in output  # the dry run's resources: from the profile


def test_an_installed_profile_is_kept_unless_force(config_home, capsys):
    assert install(capsys, "--partition", "first")[0] == 0
    installed = config_home / "snakemake" / "slurm" / "config.yaml"
    code, out = install(capsys, "--partition", "second")
    assert code == 2 and "holds a profile already; --force replaces it" in out
    assert yaml.safe_load(installed.read_text())["default-resources"]["slurm_partition"] == "first"
    assert install(capsys, "--partition", "second", "--force")[0] == 0
    assert yaml.safe_load(installed.read_text())["default-resources"]["slurm_partition"] == "second"


@pytest.mark.parametrize("argv, message", [
    (("--dest", "FILE"), "exists and is not a directory"),
    (("--dest", "FILE/slurm"), "cannot write the profile to"),
    (("--partition", "gpu # evil"), "not a SLURM name"),
])
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("not a folder")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    code, out = install(capsys, *argv)
    assert code == 2 and message in out and out.startswith("tamperlab install-profile: error:")
    assert len(out.strip().splitlines()) == 1


def test_a_dest_elsewhere_gets_the_profile(tmp_path, capsys):
    dest = tmp_path / "site" / "snakemake" / "slurm"
    code, out = install(capsys, "--dest", str(dest), "--account", "proj42")
    assert code == 0 and f"--profile {dest}" in out
    assert yaml.safe_load((dest / "config.yaml").read_text())["default-resources"]["slurm_account"] == "proj42"
