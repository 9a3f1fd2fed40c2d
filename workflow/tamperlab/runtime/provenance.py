"""Manifests: every step records what it ran on, with what, and what it wrote.

A step's outputs are written to temporary paths and moved into place only when the step succeeds, and the
manifest is written last: an output without a manifest (or whose bytes differ from its manifest) is not
complete, and downstream steps refuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tamperlab.errors import UserError
from tamperlab.runtime import numerics
from tamperlab.runtime.launch import is_writer

MANIFEST_NAME = "manifest.json"
UNHASHED = {MANIFEST_NAME, ".snakemake_timestamp"}  # bookkeeping files, not content
FINISHED = ("complete", "diverged")  # a step's statuses whose outputs others may read (a diverged one says so)
TRACKED_PACKAGES = (
    "tamperlab", "torch", "transformers", "tokenizers", "safetensors", "peft", "accelerate",
    "deepspeed", "lm-eval", "datasets", "numpy", "pandas", "snakemake",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_output(path: Path) -> str | dict[str, str]:
    """sha256 of a file, or {relative path: sha256} for every file of a directory but its manifest."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return {
        str(f.relative_to(path)): sha256_file(f)
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.relative_to(path).as_posix() not in UNHASHED
    }


def manifest_path(output: Path) -> Path:
    """A directory keeps its manifest inside; a file `d/x.ext` has `d/x.manifest.json` beside it."""
    output = Path(output)
    if output.is_dir() or not output.suffix:
        return output / MANIFEST_NAME
    return output.with_name(output.name.split(".")[0] + ".manifest.json")


def read_manifest(output: Path) -> dict[str, Any]:
    path = manifest_path(output)
    if not path.exists():
        raise UserError(f"{output}: no manifest at {path}; it was not produced by a completed tamperlab step")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: manifest is not valid JSON ({error})") from None


def owning_output(path: Path) -> tuple[Path, str]:
    """The output that holds `path` (itself, or a directory output above it) and path's place inside it."""
    for candidate in (path, *path.parents):
        if manifest_path(candidate).exists() and (candidate == path or candidate.is_dir()):
            return candidate, "" if candidate == path else path.relative_to(candidate).as_posix()
    return path, ""


def finished_manifest(path: Path, what: str) -> tuple[Path, str, dict[str, Any]]:
    """(the output that holds `path`, path's place inside it, that output's manifest), where the step that wrote it
    finished (FINISHED); else one error line naming the path, as `what` (an input, an output to replay)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} does not exist")
    owner, inner = owning_output(path)
    manifest = read_manifest(owner)
    if manifest.get("status") not in FINISHED:
        raise UserError(f"{path}: {what} of a step whose status is {manifest.get('status')!r}, not complete")
    return owner, inner, manifest


def verify_input(path: Path) -> dict[str, Any]:
    """Check an input against the manifest of the step that wrote it; returns that manifest.

    An input inside a directory output (one snapshot of an attack run) is checked against that directory's
    manifest, file by file under its place there."""
    path = Path(path)
    owner, inner, manifest = finished_manifest(path, "input")
    recorded = {Path(o["path"]).resolve(): o["sha256"] for o in manifest.get("outputs", {}).values()}
    expected = recorded.get(owner.resolve())
    if expected is None:
        raise UserError(f"{path}: not listed among the outputs of its manifest {manifest_path(owner)}")
    actual = hash_output(path)
    if inner:
        expected = {k[len(inner) + 1:]: v for k, v in expected.items() if k.startswith(inner + "/")}
    if actual != expected:
        if isinstance(actual, dict) and isinstance(expected, dict):
            changed = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
            raise UserError(f"{path}: contents differ from its manifest (changed: {', '.join(changed)})")
        raise UserError(f"{path}: sha256 differs from its manifest (tampered or partially written)")
    return manifest


def process_start_time() -> float:
    """Wall-clock time at which this process started, so that import time is counted as start-up."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """The commit of the tamperlab source tree, with '-dirty' when it has uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model, its cores and its widest vector extension, e.g. "AMD EPYC, 2 cores, AVX-512": another kind can
    pick other BLAS kernels and give other numbers (docs/reproducing.md), so every manifest names it."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux
            return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in cpuinfo.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('model name', platform.machine())}, {os.cpu_count()} cores, {vector}"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


class Step:
    """One workflow step: verifies inputs, hands out temporary output paths, writes the manifest last.

    with Step("evaluate-refusal", params, inputs={"model": d}, outputs={"summary": f}) as step:
        write(step.path("summary"))
    """

    def __init__(self, name: str, params: dict[str, Any], inputs: dict[str, Path],
                 outputs: dict[str, Path], outputs_are_dirs: tuple[str, ...] = (),
                 verify_inputs: tuple[str, ...] | None = None, resumable: tuple[str, ...] = ()):
        self.name = name
        self.params = params
        self.inputs = {k: Path(v) for k, v in inputs.items()}
        self.outputs = {k: Path(v) for k, v in outputs.items()}
        self.dirs = set(outputs_are_dirs)
        # Inputs not produced by tamperlab (e.g. a user's local file hashed by config) skip the check.
        self.verified = set(self.inputs) if verify_inputs is None else set(verify_inputs)
        self.status = "complete"
        self.results: dict[str, Any] = {}
        self.phases: dict[str, float] = {}
        # A resumable output keeps one stable work directory that survives a crash, so a rerun continues it.
        self.resumable = set(resumable)
        self._tmp = {k: v.parent / (f".{v.name}.partial" if k in self.resumable else f".{v.name}.tmp-{os.getpid()}")
                     for k, v in self.outputs.items()}

    def path(self, key: str) -> Path:
        return self._tmp[key]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - start, 4)

    def __enter__(self) -> Step:
        self._started = time.time()
        self._startup = self._started - process_start_time()
        self._upstream = {}
        for key, path in self.inputs.items():
            if key in self.verified:
                verify_input(path)
                # the manifest that vouches for it: its own, or that of the directory output holding it
                self._upstream[key] = str(manifest_path(owning_output(Path(path))[0]))
        for key, tmp in self._tmp.items():
            if key not in self.resumable:
                _remove(tmp)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            if key in self.dirs:
                tmp.mkdir(exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for key, tmp in self._tmp.items():
                if key not in self.resumable:
                    _remove(tmp)
            return
        if not is_writer():  # another process of a multi-process launch (ZeRO-3): rank 0 finishes the step
            return
        for key, tmp in self._tmp.items():
            if not tmp.exists():
                raise RuntimeError(f"step {self.name} did not write its output {key!r}")
        manifest = {
            "step": self.name,
            "status": self.status,
            "command": shlex.join(["tamperlab", *sys.argv[1:]]),
            "params": self.params,
            "seed": self.params.get("seed"),
            "inputs": {
                k: {"path": str(p), "sha256": hash_output(p), "manifest": self._upstream.get(k)}
                for k, p in self.inputs.items()
            },
            "outputs": {k: {"path": str(p), "sha256": hash_output(self._tmp[k])} for k, p in self.outputs.items()},
            "results": self.results,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "host": platform.node(),
            "device": device_name(),
            "cpu": cpu_name(),
            "numerics": numerics.describe(),  # which kernels computed it: equal fingerprints, equal bits
            "python": platform.python_version(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._started)),
            "timing": {
                "startup_s": round(self._startup, 3),  # interpreter start and imports, before the step began
                "phases_s": self.phases,
                "wall_s": round(time.time() - self._started + self._startup, 3),
            },
        }
        for key, tmp in self._tmp.items():
            _remove(self.outputs[key])
            os.replace(tmp, self.outputs[key])
        # Written last: its presence marks the outputs complete.
        write_json_atomic(manifest_path(self.outputs[next(iter(self.outputs))]), manifest)


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
