"""Fixtures shared across the test modules: the Snakemake runner, and one run of the smoke workflow that every
workflow-level module reads (building the organism and its grid once per test session, not once per module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "configs" / "smoke.yaml"
# Downloaded wheels are shared between runs (they are verified by sha256 every time).
CACHE = REPO / ".cache" / "tamperlab"
BIN = Path(sys.executable).parent
SMOKE_TARGETS = ("results/tables/refusal.csv", "results/tables/visage.csv")


def snakemake(workdir: Path, *flags: str, targets: tuple[str, ...] = (), check: bool = True, timeout: int = 1800):
    """`snakemake TARGETS -s Snakefile -d WORKDIR FLAGS` with this environment's tamperlab on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # Targets first: --configfile and --config take every word that follows them.
    command = [str(BIN / "snakemake"), *targets, "-s", str(REPO / "Snakefile"), "-d", str(workdir), *flags,
               "--config", f"cache_dir={CACHE}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One clean run of the smoke config (tests/configs/smoke.yaml): every defence, attack, evaluation and
    landscape scan, up to the refusal tables and the VISAGE table. Read it; copy it before changing anything."""
    workdir = tmp_path_factory.mktemp("smoke")
    snakemake(workdir, "--configfile", str(SMOKE), targets=SMOKE_TARGETS)
    return workdir
