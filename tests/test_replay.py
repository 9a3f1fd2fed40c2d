"""`tamperlab replay PATH`: one step of the smoke run, run again from its manifest, gives the same bytes; a changed
input is refused; and every manifest of the run records the portable numerics it ran under."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tamperlab.runtime import numerics
from tamperlab.runtime.provenance import hash_output, owning_output

ATTACK_RUN = "results/attacks/tiny/none/lora/lr2e-3_r16"
EVALUATION = "results/eval/tiny/none/refusal.json"
TABLES = "results/tables/refusal.csv"


def _replay(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tamperlab.cli", "replay", str(path)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("output", [ATTACK_RUN, EVALUATION, TABLES])
def test_a_replayed_step_is_bit_exact(smoke_run, output, tmp_path):
    before = hash_output(smoke_run / output)
    result = _replay(smoke_run / output, tmp_path)  # from elsewhere: the working directory comes from the manifest
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    step_output = owning_output(smoke_run / output)[0]  # an attack run is replayed as its grid's step
    assert lines[0].startswith(f"replay: {step_output} (step ")
    assert "same numerics (portable, fingerprint" in result.stdout and "bit-exact expected" in result.stdout
    assert lines[-1].startswith("bit-exact: ") and "differs" not in result.stdout
    files = [line for line in lines if line.startswith("  identical ")]
    assert files and len(files) == int(lines[-1].split()[1])
    assert hash_output(smoke_run / output) == before  # the original is read, never written


def _copy_of_the_tables_step(smoke_run: Path, tmp_path: Path) -> Path:
    """The tables step's inputs and outputs, copied into a working directory of their own."""
    workdir = tmp_path / "run"
    for part in ("tables", "eval", "figures", "attacks"):  # attacks: the loss logs it reads beside the evaluations
        shutil.copytree(smoke_run / "results" / part, workdir / "results" / part, symlinks=True)
    return workdir


def test_a_changed_output_is_reported_as_differing(smoke_run, tmp_path):
    """Replay compares against the manifest's record: a table rewritten after the step (here by hand) differs,
    and the differing table is judged as compare judges it."""
    workdir = _copy_of_the_tables_step(smoke_run, tmp_path)
    manifest_path = workdir / "results/tables/refusal.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"]["refusal_csv"]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    result = _replay(workdir / TABLES, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "  differs   results/tables/refusal.csv" in result.stdout
    assert "  identical results/tables/refusal_summary.csv" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("differs: ")


def test_a_tampered_input_is_refused_with_one_line(smoke_run, tmp_path):
    workdir = _copy_of_the_tables_step(smoke_run, tmp_path)
    evaluation = workdir / EVALUATION
    evaluation.write_text(evaluation.read_text().replace('"n": ', '"n":  '))  # one byte more
    result = _replay(workdir / TABLES, tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "results/eval/tiny/none/refusal.json" in result.stderr and "differs from what the step read" in result.stderr


def test_every_manifest_of_the_run_records_the_portable_numerics_it_ran_under(smoke_run):
    """The setting reaches every job: each step that computed with torch ran pinned, with the fingerprint this
    project's CPUs compute for its thread count."""
    manifests = [json.loads(p.read_text()) for p in (smoke_run / "results").rglob("*manifest.json")]
    assert len(manifests) > 20
    for manifest in manifests:
        recorded = manifest["numerics"]
        assert recorded["mode"] == "portable", manifest["command"]
        assert manifest["command"].startswith("tamperlab --numerics portable ")
        assert recorded["settings"] == numerics.PORTABLE
        if recorded["fingerprint"] is not None:
            assert recorded["aten_capability"] == "AVX2"
            assert recorded["fingerprint"] == numerics.PORTABLE_FINGERPRINTS[recorded["threads"]], manifest["step"]
