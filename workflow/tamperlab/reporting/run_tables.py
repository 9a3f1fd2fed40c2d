"""A run's result tables as the comparison reads them (reporting.compare): each CSV of RUN/tables/ as text, its
rows keyed by the table's identity columns, and the n of the harmful-prompt rates per model and defence.

Tables are read as text, so that a value is compared as written; a value is a number when it parses as one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from tamperlab.errors import UserError

# Each table's row key (its identity columns), by file name.
KEYS = {
    "refusal": ("model", "defence", "attack", "lr", "steps", "rank", "seed"),
    "refusal_summary": ("model", "defence", "attack"),
    "harmfulness": ("model", "defence", "attack", "rank"),
    "tamper_resistance": ("model", "defence", "stage"),
    "visage": ("subject", "scan", "system_prompt"),
    "published": ("table", "model", "defence", "attack", "cell", "benchmark", "metric"),
}


def load_tables(directory: Path) -> dict[str, tuple[Path, pd.DataFrame]]:
    """{name: (path, table as text)} of directory/tables/*.csv."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    tables = directory / "tables"
    if not tables.is_dir():
        raise UserError(f"{tables}: no such directory (expected the run's tables/*.csv)")
    loaded = {}
    for path in sorted(tables.glob("*.csv")):
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"{path}: not a readable CSV ({reason})") from None
        loaded[path.stem] = (path, frame)
    return loaded


def index_rows(name: str, path: Path, frame: pd.DataFrame) -> dict[tuple[str, ...], dict[str, str]]:
    """{row key: row} of table `name` read from `path`; a key column missing or a key seen twice is an error."""
    key = KEYS[name]
    if "seed" in key and "seed" not in frame.columns:  # tables from before seeds were a grid dimension
        frame = frame.assign(seed="")
    absent = [c for c in key if c not in frame.columns]
    if absent:
        raise UserError(f"{path}: no key column(s) {', '.join(absent)} (a {name} table's rows are keyed by "
                        f"{', '.join(key)})")
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for record in frame.to_dict("records"):
        row_key = tuple(key_value(record[c]) for c in key)
        if row_key in rows:
            raise UserError(f"{path}: row key {key_text(key, row_key)} appears twice")
        rows[row_key] = record
    return rows


def key_value(text: str) -> str:
    """A key value in one spelling: numbers as Python writes them (25.0 and 25 alike, 1e-3 and 0.001 alike)."""
    value = number(text.strip())
    if value is None:
        return text.strip()
    return str(int(value)) if value.is_integer() else repr(value)


def key_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    """A row key as the report writes it: name=value, empty values left out."""
    return " ".join(f"{k}={v}" for k, v in zip(names, values, strict=True) if v != "")


def number(text: str) -> float | None:
    """The number a cell's text spells, or None (not a number, or NaN)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def refusal_n(tables: dict[str, tuple[Path, pd.DataFrame]]) -> dict[tuple[str, str], int]:
    """The n of the harmful-prompt rates per (model, defence), from refusal.csv, where it is one number."""
    if "refusal" not in tables or not {"model", "defence", "n"} <= set(tables["refusal"][1].columns):
        return {}
    frame = tables["refusal"][1]
    found = {}
    for (model, defence), group in frame.groupby(["model", "defence"]):
        ns = {number(v) for v in group["n"] if number(v)}
        if len(ns) == 1:
            found[(model, defence)] = int(ns.pop())
    return found
