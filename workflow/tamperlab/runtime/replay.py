"""Replay one step from its manifest: verify what it read, run its recorded command again in a scratch directory,
and say, output file by output file, whether the bytes came out the same.

The scratch directory mirrors the step's working directory: every entry is linked into place, except the step's
own outputs and the folders on the way to them, which are made anew; the recorded command writes its outputs under
the same relative paths there, never over the originals. (The links reach what a step reads without declaring it:
the tables step reads the attack runs' loss logs beside the evaluations it declares.) The command runs under the
numerics and the thread count its manifest records (a portable result depends on its thread count: runtime.cpu).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError
from tamperlab.runtime import numerics
from tamperlab.runtime.provenance import finished_manifest, hash_output, package_versions


@dataclass
class Plan:
    """What a replay will run: the manifest, the working directory it ran in and the command line."""

    output: Path  # the output whose step is replayed (the directory output that holds a path inside it)
    manifest: dict[str, Any]
    workdir: Path
    argv: list[str]
    threads: int | None

    @property
    def mode(self) -> str:
        return self.argv[self.argv.index("--numerics") + 1]


def plan(path: Path) -> Plan:
    """Read the manifest of the step that wrote `path` and check the inputs it read are still those bytes."""
    output, _, manifest = finished_manifest(path, "output to replay")
    workdir = _workdir(output, manifest)
    for key, recorded in manifest.get("inputs", {}).items():
        source = workdir / recorded["path"]
        if not source.exists():
            raise UserError(f"input {key} ({recorded['path']}): missing, cannot replay")
        if hash_output(source) != recorded["sha256"]:
            raise UserError(f"input {key} ({recorded['path']}): differs from what the step read (sha256): refused")
    argv = shlex.split(manifest["command"])
    if argv[:1] != ["tamperlab"]:
        raise UserError(f"{output}: recorded command {manifest['command'][:60]!r} is not a tamperlab command")
    recorded = manifest.get("numerics") or {"mode": "native"}  # manifests from before numerics were pinned
    if "--numerics" not in argv:
        argv[1:1] = ["--numerics", recorded["mode"]]
    return Plan(output, manifest, workdir, argv, recorded.get("threads") or _threads(manifest.get("device")))


def _workdir(output: Path, manifest: dict[str, Any]) -> Path:
    """The directory the step ran in: `output` with its recorded (relative) path taken off the end."""
    absolute = output.resolve()
    for recorded in manifest.get("outputs", {}).values():
        relative = Path(recorded["path"])
        if relative.is_absolute():
            continue
        if absolute.parts[-len(relative.parts):] == relative.parts:
            return Path(*absolute.parts[:-len(relative.parts)])
    raise UserError(f"{output}: not among the outputs its manifest records; cannot tell where the step ran")


def _threads(device: str | None) -> int | None:
    """The threads of a manifest from before numerics recorded them: its device, "cpu (N threads)"."""
    if device and device.startswith("cpu (") and device.endswith(" threads)"):
        return int(device[5:].split()[0])
    return None


def differences(plan: Plan, here: dict[str, Any]) -> list[str]:
    """What differs between the step's record and this machine, said before running: packages and numerics."""
    notes = []
    recorded = plan.manifest.get("versions", {})
    current = package_versions()
    changed = [f"{name} {recorded.get(name)} -> {current.get(name)}" for name in sorted(set(recorded) | set(current))
               if name != "tamperlab" and recorded.get(name) != current.get(name)]
    if changed:
        notes.append("packages differ from the manifest's: " + ", ".join(changed))
    notes.append(numerics.expectation(here, plan.manifest.get("numerics")))
    return notes


def numerics_here(plan: Plan) -> dict[str, Any]:
    """This machine's numerics under the step's mode and threads (a fresh process: they are pinned at start)."""
    result = subprocess.run([sys.executable, "-m", "tamperlab.cli", "--numerics", plan.mode, "numerics",
                             "--json"], capture_output=True, text=True, env=_environment(plan), check=False)
    if result.returncode:
        raise RuntimeError(f"tamperlab numerics failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


def _environment(plan: Plan) -> dict[str, str]:
    environment = {**os.environ}
    for name in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", numerics.MODE_VARIABLE):
        environment.pop(name, None)  # the command pins its own
    if plan.threads:
        environment.update(OMP_NUM_THREADS=str(plan.threads), MKL_NUM_THREADS=str(plan.threads))
    return environment


def stage(plan: Plan, scratch: Path) -> None:
    """Lay out the scratch directory as the working directory, linked entry by entry, except the step's outputs:
    the folders on the way to an output are made anew, an output itself is left for the command to write."""
    outputs = {Path(o["path"]) for o in plan.manifest["outputs"].values()}
    opened = {parent for output in outputs for parent in output.parents if parent != Path(".")}

    def mirror(relative: Path) -> None:
        (scratch / relative).mkdir(parents=True, exist_ok=True)
        for entry in (plan.workdir / relative).iterdir():
            inner = relative / entry.name
            if inner in outputs or entry.name.startswith(".") and (".tmp-" in entry.name or
                                                                  entry.name.endswith(".partial")):
                continue
            if inner in opened:
                mirror(inner)
            elif not (scratch / inner).exists():
                (scratch / inner).symlink_to(entry.resolve())

    mirror(Path("."))


def run(plan: Plan, scratch: Path) -> subprocess.CompletedProcess:
    """Run the recorded command in the scratch directory (its log beside it, replay.log)."""
    command = [sys.executable, "-m", "tamperlab.cli", *plan.argv[1:]]
    with open(scratch / "replay.log", "w") as log:
        return subprocess.run(command, cwd=scratch, stdout=log, stderr=subprocess.STDOUT, env=_environment(plan),
                              check=False)


def outcome(plan: Plan, scratch: Path) -> list[tuple[str, str]]:
    """(output file, identical | differs | missing | extra) for every file the step recorded or wrote again."""
    rows = []
    for recorded in plan.manifest["outputs"].values():
        again = scratch / recorded["path"]
        expected = recorded["sha256"]
        if isinstance(expected, str):
            state = "missing" if not again.is_file() else "identical" if hash_output(again) == expected else "differs"
            rows.append((recorded["path"], state))
            continue
        actual = hash_output(again) if again.is_dir() else {}
        for name in sorted(set(expected) | set(actual)):
            state = ("missing" if name not in actual else "extra" if name not in expected
                     else "identical" if actual[name] == expected[name] else "differs")
            rows.append((f"{recorded['path']}/{name}", state))
    return rows
