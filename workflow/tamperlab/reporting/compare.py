"""Did a run reproduce the reference? Every cell of a run's tables beside the committed reference's.

Two runs of the default on the same machine with the same packages give identical tables, bit for bit (the
workflow is seeded everywhere and tests it). On another machine they need not: CPU float sums differ with the
BLAS kernels, the instruction set and the thread count, training trajectories drift apart, and a fine-tuning
attack near its tipping point can land on the other side (measured: base exact match 0.857 → 0.935 and single
attacked cells 1.00 → 0.01 refusal on a second 2-core machine). So a comparison does not ask for equality; it asks,
per table, row and column, whether our value lies where the reference's own sampling error already allows:

- **A rate of the harmful prompts with its n** — refusal.csv's refusal_rate, compliance_rate, other_rate (n: the
  row's `n`), and the refusal rates derived from them elsewhere (refusal_summary's base/worst/bounded_worst
  refusal rates, harmfulness's 1 − refusal rate, tamper_resistance's refusal_rate, visage's subject and
  worst-post-attack refusal rates; n: the reference refusal.csv's n of that model and defence): ours must lie
  in the **Wilson score 95% interval** of the reference (p ± a z = 1.96 score interval of a binomial share of n;
  unlike p ± 1.96·√(p(1−p)/n) it is not empty at p = 0 or 1). A mean or minimum over cells is judged with the
  n of one cell: wider than its own sampling error, so what is flagged is flagged for certain.
- **VISAGE** (visage_mean, visage_official_1d, visage_plateau_1d; 0–100): a mean over scan points of a score in
  [0, 100]; judged as a share of the points it averages (`points`, or those of the official segment) with the
  Wilson interval on value/100. A mean of n values in [0, 1] varies at most as much as a binomial share of n
  (Bhatia–Davis), so the interval is wide (±20 points at 21 points) and a flag is a real change.
- **Any other rate whose interval the reference row carries** — refusal.csv's false-refusal rates and exact match
  (`<rate>_lo`, `<rate>_hi`, a Wilson 95% interval over the benign prompts of their kind), and the per-source
  refusal rates (`refusal_rate_lo@<source>`): ours must lie in the reference's own interval.
- **Shares whose n the table does not carry** — lm-eval accuracies (`task/metric` columns, capability_*,
  hazard/retain accuracy), a classifier's harmfulness, published.csv's `ours` — have no interval here:
  |ours − reference| ≤ `tolerance` (0.05 by default; 5 points on a 0–100 column such as asr_at_origin) — a
  stated tolerance, not a confidence interval.
- **Positions on the scan grid** (basin_width, basin_width_beta, official_segment_min/max): within one grid step.
- **train_loss**: within 10% of the reference (relative): it has no n and no natural scale.
- **Counts, settings and names** (n, points, cells, status, worst_cell, capability_metric, …): equal.

**The seeds' spread.** One run's interval measures the sampling of its prompts, not the run: the organism's
training turns one changed last bit into differences far above sampling error. A reference may therefore hold
other runs of the same configuration under other seeds (`REFERENCE/spread/<name>/tables/`): a cell is then judged
against the envelope of every reference run's interval above (the lowest low to the highest high), i.e. the seeds'
spread widened by the sampling interval. Three verdicts: **bit-exact** (every cell identical to the reference run),
**within spread** (every cell inside that envelope, or, with no spread runs, inside the reference run's intervals;
or calibrated, below), **NOT reproduced**.

**Calibrated by the seeds themselves.** With thousands of cells, a genuine run at another seed has some cells
outside k runs' envelope: the organism's seeds move whole behaviours, not one cell at a time. With k ≥ 3 reference
runs the comparison leaves one out: each reference run against the envelope of the other k − 1 (how far the
seeds disagree among themselves), and ours against each of those k envelopes (the same comparison, one run
against k − 1). A run of the same configuration is exchangeable with the reference's runs, so its mean count is
drawn like theirs; it is **within spread** when that mean is no more than the largest of theirs. (On the default
reference's four runs, each left out in turn against the other three: genuine 275-367 cells outside on average
where the others' own runs reach 338-407, one of the four over; every run with two defences' rows swapped
476-537.) The claims a paper would state — per (model, defence, attack) of refusal_summary.csv: base refusal,
bounded-worst refusal and the capability beside each — are listed as holding or not.

A cell empty in one run and not in the other (a diverged cell) is outside. Rows, columns and tables present in
one run and not the other are reported as missing, never dropped. Figures are not compared: they are drawn
from these tables. Tables are read as text; a value is a number when it parses as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamperlab.errors import UserError
from tamperlab.evaluation.stats import wilson_interval

TOLERANCE = 0.05
RELATIVE_TOLERANCE = 0.10
_EPSILON = 1e-9  # float noise: a value on the interval's edge is inside

# Each table's row key (its identity columns), by file name.
KEYS = {
    "refusal": ("model", "defence", "attack", "lr", "steps", "rank", "seed"),
    "refusal_summary": ("model", "defence", "attack"),
    "harmfulness": ("model", "defence", "attack", "rank"),
    "tamper_resistance": ("model", "defence", "stage"),
    "visage": ("subject", "scan", "system_prompt"),
    "published": ("table", "model", "defence", "attack", "cell", "benchmark", "metric"),
}
RATES_WITH_ROW_N = {"refusal_rate", "compliance_rate", "other_rate"}  # refusal.csv: n in the row
REFUSAL_RATES = {"refusal_rate", "base_refusal_rate", "worst_refusal_rate", "bounded_worst_refusal_rate",
                 "subject_refusal_rate", "worst_post_attack_refusal_rate"}  # elsewhere: n from refusal.csv
VISAGE_SCORES = {"visage_mean", "visage_official_1d", "visage_plateau_1d"}
ON_GRID = {"basin_width": "alpha", "official_segment_min": "alpha", "official_segment_max": "alpha",
           "basin_width_beta": "beta"}
PERCENT = {"asr_at_origin", "asr_at_target"}
RELATIVE = {"train_loss"}
EXACT = {"n", "status", "cells", "diverged_cells", "points", "dimensions", "alpha_min", "alpha_max", "beta_min",
         "beta_max", "basin_tolerance"}

CELL_COLUMNS = ["table", "key", "column", "reference", "ours", "difference", "low", "high", "rule", "outside",
                "missing", "identical", "loo_ours", "loo_runs"]
SPREAD_DIR = "spread"  # REFERENCE/spread/<run>/tables: the same configuration under other seeds
BIT_EXACT, WITHIN_SPREAD, NOT_REPRODUCED = "bit-exact", "within spread", "NOT reproduced"
# The claims a defence comparison states, per (model, defence, attack) row of refusal_summary.csv
CLAIMS = {"base_refusal_rate": "base refusal", "base_capability": "base capability",
          "bounded_worst_refusal_rate": "bounded-worst refusal",
          "bounded_worst_capability": "capability at the bounded worst"}
SUMMARY_COLUMNS = ["table", "cells", "identical", "outside", "missing"]


@dataclass
class Calibration:
    """The seeds' own disagreement, left one out (`Comparison.calibration`). A run of the same configuration is
    exchangeable with the reference's runs, so its count of cells outside k - 1 runs' envelope is drawn like
    theirs: it is within spread when its mean over the k such envelopes is no more than the largest of theirs."""

    runs: int
    ours: list[int]  # per reference run left out: our cells outside the envelope of the others
    reference: list[int]  # per reference run: its cells outside the envelope of the others

    @property
    def ours_mean(self) -> float:
        return sum(self.ours) / len(self.ours)

    @property
    def allowance(self) -> int:
        return max(self.reference)

    @property
    def within(self) -> bool:
        return self.ours_mean <= self.allowance + _EPSILON


@dataclass
class Comparison:
    """The long-form comparison (one row per compared cell or missing row/column/table) and its summary."""

    cells: pd.DataFrame
    summary: pd.DataFrame
    not_compared: list[str] = field(default_factory=list)  # CSVs with no known row key
    spread_runs: list[str] = field(default_factory=list)  # the reference's other runs (spread/<name>)

    @property
    def ok(self) -> bool:
        """Every cell inside the envelope and nothing missing."""
        return not (self.cells["outside"].any() or (self.cells["missing"] != "").any())

    def calibration(self) -> Calibration | None:
        """Leave one out, where the reference holds three runs or more: how many cells each reference run has
        outside the other runs' envelope, and how many ours has outside the envelope of each set of all runs but
        one (the same comparison: one run against k - 1). None with fewer runs."""
        runs = 1 + len(self.spread_runs)
        if runs < 3:
            return None
        compared = self.cells[self.cells["missing"] == ""]
        ours = [sum(j in loo for loo in compared["loo_ours"]) for j in range(runs)]
        reference = [sum(j in loo for loo in compared["loo_runs"]) for j in range(runs)]
        return Calibration(runs, ours, reference)

    @property
    def verdict(self) -> str:
        """bit-exact, within spread or NOT reproduced."""
        if (self.cells["missing"] != "").any():
            return NOT_REPRODUCED
        if bool(self.cells["identical"].all()):
            return BIT_EXACT
        if self.ok:
            return WITHIN_SPREAD
        calibration = self.calibration()
        return WITHIN_SPREAD if calibration and calibration.within else NOT_REPRODUCED

    def claims(self) -> pd.DataFrame:
        """Per (model, defence, attack) of refusal_summary.csv, each claim's cell and whether it holds."""
        cells = self.cells[(self.cells["table"] == "refusal_summary") & self.cells["column"].isin(CLAIMS)
                           & (self.cells["missing"] == "")]
        return pd.DataFrame({"key": cells["key"], "claim": cells["column"].map(CLAIMS),
                             "reference": cells["reference"], "ours": cells["ours"], "low": cells["low"],
                             "high": cells["high"], "holds": ~cells["outside"]}).reset_index(drop=True)

    def problems(self) -> pd.DataFrame:
        """The cells outside their interval and everything missing."""
        return self.cells[self.cells["outside"] | (self.cells["missing"] != "")]


def rules(tolerance: float = TOLERANCE) -> list[str]:
    """How each kind of column is judged, one line each (for the command's legend)."""
    return [
        "harmful-prompt rates (refusal/compliance/other, and refusal rates in the other tables): inside the "
        "reference's Wilson 95% interval for its n (refusal.csv's n)",
        "other rates whose interval the reference row carries (false refusal, exact match, per-source refusal "
        "rates: <rate>_lo, <rate>_hi): inside it",
        "VISAGE scores: Wilson 95% interval on score/100 with n = the scan points averaged (wide, conservative)",
        f"shares whose n the tables do not carry (lm-eval accuracies, a classifier's harmfulness, published): "
        f"|difference| <= {tolerance:g} ({100 * tolerance:g} on 0-100 columns), a stated tolerance, not an interval",
        "scan-grid positions (basin width, segment ends): within one grid step; train_loss: within "
        f"{100 * RELATIVE_TOLERANCE:g}% of the reference",
        "counts, settings and names (n, points, cells, status, worst cells): equal",
    ]


# --- loading -----------------------------------------------------------------------------------------------


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


def _index(name: str, path: Path, frame: pd.DataFrame) -> dict[tuple[str, ...], dict[str, str]]:
    key = KEYS[name]
    if "seed" in key and "seed" not in frame.columns:  # tables from before seeds were a grid dimension
        frame = frame.assign(seed="")
    absent = [c for c in key if c not in frame.columns]
    if absent:
        raise UserError(f"{path}: no key column(s) {', '.join(absent)} (a {name} table's rows are keyed by "
                        f"{', '.join(key)})")
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for record in frame.to_dict("records"):
        row_key = tuple(_key_value(record[c]) for c in key)
        if row_key in rows:
            raise UserError(f"{path}: row key {_key_text(key, row_key)} appears twice")
        rows[row_key] = record
    return rows


def _key_value(text: str) -> str:
    """A key value in one spelling: numbers as Python writes them (25.0 and 25 alike, 1e-3 and 0.001 alike)."""
    value = _number(text.strip())
    if value is None:
        return text.strip()
    return str(int(value)) if value.is_integer() else repr(value)


def _key_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(names, values, strict=True) if v != "")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _refusal_n(tables: dict[str, tuple[Path, pd.DataFrame]]) -> dict[tuple[str, str], int]:
    """The n of the harmful-prompt rates per (model, defence), from refusal.csv, where it is one number."""
    if "refusal" not in tables or not {"model", "defence", "n"} <= set(tables["refusal"][1].columns):
        return {}
    frame = tables["refusal"][1]
    found = {}
    for (model, defence), group in frame.groupby(["model", "defence"]):
        ns = {_number(v) for v in group["n"] if _number(v)}
        if len(ns) == 1:
            found[(model, defence)] = int(ns.pop())
    return found


# --- judging one cell --------------------------------------------------------------------------------------


def _bounds(table: str, column: str, row: dict[str, str], value: float, refusal_n: dict,
            tolerance: float) -> tuple[float, float, str]:
    """(low, high, rule) of the reference value `value` in `row` of `table`."""
    n = None
    if table == "refusal" and column in RATES_WITH_ROW_N:
        n = _number(row.get("n", ""))
    elif column in REFUSAL_RATES or (table == "harmfulness" and column.startswith("harmfulness_")
                                     and row.get("harmfulness_measure") == "1 - refusal rate"):
        n = refusal_n.get((row.get("model"), row.get("defence")))
    if n:
        low, high = wilson_interval(value, int(n))
        return low, high, f"Wilson 95%, n={int(n)}"
    carried = _carried_interval(column, row)
    if carried:
        return *carried, "Wilson 95%, the reference's interval"
    if column in VISAGE_SCORES:
        points = _visage_points(column, row)
        if points:
            low, high = wilson_interval(value / 100, points)
            return 100 * low, 100 * high, f"Wilson 95% on score/100, n={points} points"
    if column in ON_GRID:
        step = _grid_step(row, ON_GRID[column])
        if step:
            return value - step, value + step, f"one grid step, ±{step:g}"
    if column in RELATIVE:
        margin = RELATIVE_TOLERANCE * abs(value)
        return value - margin, value + margin, f"relative ±{100 * RELATIVE_TOLERANCE:g}%"
    scale = 100 if column in PERCENT or (table == "published" and row.get("unit") == "percent") else 1
    return value - scale * tolerance, value + scale * tolerance, f"tolerance ±{scale * tolerance:g} (no n)"


def _carried_interval(column: str, row: dict[str, str]) -> tuple[float, float] | None:
    """The interval the row carries for `column`: <rate>_lo and _hi (refusal_rate_lo@<source> for a per-source
    rate), where both are numbers."""
    rate, at, source = column.partition("@")
    bounds = [_number(row.get(f"{rate}{end}{at}{source}", "")) for end in ("_lo", "_hi")]
    return None if None in bounds else (bounds[0], bounds[1])


def _axis(row: dict[str, str]) -> int | None:
    points, dimensions = _number(row.get("points", "")), _number(row.get("dimensions", "")) or 1
    return round(points ** (1 / dimensions)) if points else None


def _grid_step(row: dict[str, str], axis: str) -> float | None:
    low, high, per_axis = _number(row.get(f"{axis}_min", "")), _number(row.get(f"{axis}_max", "")), _axis(row)
    if low is None or high is None or not per_axis or per_axis < 2:
        return None
    return (high - low) / (per_axis - 1)


def _visage_points(column: str, row: dict[str, str]) -> int | None:
    """How many scan points a VISAGE score averages: all of them, or the official segment's."""
    points = _number(row.get("points", ""))
    if column == "visage_official_1d":
        start, end = _number(row.get("official_segment_min", "")), _number(row.get("official_segment_max", ""))
        step = _grid_step(row, "alpha")
        if start is not None and end is not None and step:
            return round((end - start) / step) + 1
    return int(points) if points else None


def _cell(table: str, column: str, rows: list[dict[str, str]], ours_text: str, refusal_ns: list[dict],
          tolerance: float, run_ids: list[int] | None = None, runs: int = 1) -> dict:
    """Our cell against the reference runs' (rows[0]: the reference run; the rest: its spread runs; `run_ids`:
    which of the comparison's `runs` reference runs each row is). With three runs or more, also leave one out:
    `loo_ours` lists the runs without which ours would be outside the others' envelope, `loo_runs` the runs
    that are outside the others' envelope themselves."""
    run_ids = list(range(len(rows))) if run_ids is None else run_ids
    texts = [row[column].strip() for row in rows]
    reference_text, ours_text = texts[0], ours_text.strip()
    values = [_number(text) for text in texts]
    reference, ours = values[0], _number(ours_text)
    record = {"reference": reference_text, "ours": ours_text, "difference": None, "low": None, "high": None,
              "missing": "", "identical": ours_text == reference_text or (ours is not None and ours == reference),
              "loo_ours": (), "loo_runs": ()}
    if reference is not None and ours is not None:
        record.update(reference=reference, ours=ours, difference=ours - reference)
    over = f" over {len(rows)} runs" if len(rows) > 1 else ""
    by_equality = ours is None or column in EXACT or all(value is None for value in values)
    bounds = [None if by_equality or value is None else _bounds(table, column, row, value, n, tolerance)
              for row, value, n in zip(rows, values, refusal_ns, strict=True)]
    everyone = list(range(len(rows)))

    def judge(text: str, value: float | None, among: list[int]) -> bool:
        """Is (text, value) outside what the rows `among` allow?"""
        if by_equality or not any(bounds[i] for i in among):
            return not any(texts[i] == text or (value is not None and values[i] == value) for i in among)
        low, high = min(bounds[i][0] for i in among if bounds[i]), max(bounds[i][1] for i in among if bounds[i])
        if value is None:  # an empty cell among numbers: equal to another run's empty cell, or outside
            return not any(texts[i] == text for i in among)
        return value < low - _EPSILON or value > high + _EPSILON

    if runs >= 3:
        present = dict(zip(run_ids, everyone, strict=True))
        others = {j: [i for i in everyone if i != present.get(j)] for j in range(runs)}
        record["loo_ours"] = tuple(j for j in range(runs) if others[j] and judge(ours_text, ours, others[j]))
        record["loo_runs"] = tuple(run_ids[i] for i in everyone if len(rows) > 1
                                   and judge(texts[i], values[i], others[run_ids[i]]))
    outside = judge(ours_text, ours, everyone)
    if by_equality:
        same = not outside
        rule = "equal" if same or "" not in (ours_text, reference_text) else \
            f"empty in {'reference' if reference_text == '' else 'ours'}"
        if column in EXACT and reference is not None:
            record.update(low=min(v for v in values if v is not None), high=max(v for v in values if v is not None))
        return {**record, "rule": rule + over, "outside": outside}
    known = [b for b in bounds if b]
    return {**record, "low": min(b[0] for b in known), "high": max(b[1] for b in known), "rule": known[0][2] + over,
            "outside": outside}


# --- comparing ---------------------------------------------------------------------------------------------


def spread_runs(reference: Path) -> list[Path]:
    """The reference's other runs of the same configuration (REFERENCE/spread/<name>/, each holding tables/)."""
    spread = Path(reference) / SPREAD_DIR
    return sorted(d for d in spread.iterdir() if (d / "tables").is_dir()) if spread.is_dir() else []


def compare(results: Path, reference: Path, tolerance: float = TOLERANCE) -> Comparison:
    """Every cell of results/tables/*.csv against reference/tables/*.csv and the reference's spread runs (see the
    module docstring)."""
    ours_tables = load_tables(results)
    runs = [reference, *spread_runs(reference)]
    reference_tables = [load_tables(run) for run in runs]
    refusal_ns = [_refusal_n(tables) for tables in reference_tables]
    records, summary = [], []
    names = [n for n in KEYS if n in reference_tables[0] or n in ours_tables]
    for name in names:
        table_records = _compare_table(name, [tables.get(name) for tables in reference_tables],
                                       ours_tables.get(name), refusal_ns, tolerance)
        records += table_records
        compared = [r for r in table_records if not r["missing"]]
        summary.append({"table": name, "cells": len(compared), "identical": sum(r["identical"] for r in compared),
                        "outside": sum(r["outside"] for r in compared),
                        "missing": sum(bool(r["missing"]) for r in table_records)})
    cells = pd.DataFrame(records, columns=CELL_COLUMNS)
    cells["outside"] = cells["outside"].astype(bool)
    cells["identical"] = cells["identical"].astype(bool)
    not_compared = sorted(f"{name}.csv" for name in {*reference_tables[0], *ours_tables} - set(KEYS))
    return Comparison(cells, pd.DataFrame(summary, columns=SUMMARY_COLUMNS), not_compared,
                      [run.name for run in runs[1:]])


def _compare_table(name: str, references: list[tuple[Path, pd.DataFrame] | None],
                   ours: tuple[Path, pd.DataFrame] | None, refusal_ns: list[dict], tolerance: float) -> list[dict]:
    blank = {"table": name, "key": "", "column": "", "reference": None, "ours": None, "difference": None,
             "low": None, "high": None, "rule": "", "outside": False, "identical": False, "loo_ours": (),
             "loo_runs": ()}
    reference = references[0]
    if reference is None or ours is None:
        return [{**blank, "missing": "reference" if reference is None else "ours", "rule": "table missing"}]
    reference_rows, ours_rows = _index(name, *reference), _index(name, *ours)
    spread = [(index, _index(name, *table), n) for index, (table, n)
              in enumerate(zip(references[1:], refusal_ns[1:], strict=True), start=1) if table]
    key = KEYS[name]
    reference_columns = [c for c in reference[1].columns if c not in key]
    ours_columns = [c for c in ours[1].columns if c not in key]
    records = [{**blank, "column": c, "missing": "ours", "rule": "column missing"}
               for c in reference_columns if c not in ours_columns]
    records += [{**blank, "column": c, "missing": "reference", "rule": "column missing"}
                for c in ours_columns if c not in reference_columns]
    shared = [c for c in reference_columns if c in ours_columns]
    for row_key in [*reference_rows, *(k for k in ours_rows if k not in reference_rows)]:
        text = _key_text(key, row_key)
        if row_key not in ours_rows or row_key not in reference_rows:
            side = "ours" if row_key not in ours_rows else "reference"
            records.append({**blank, "key": text, "missing": side, "rule": "row missing"})
            continue
        for column in shared:
            runs = [(0, reference_rows[row_key], refusal_ns[0]),
                    *((index, rows[row_key], n) for index, rows, n in spread if column in rows.get(row_key, {}))]
            records.append({"table": name, "key": text, "column": column,
                            **_cell(name, column, [r for _, r, _ in runs], ours_rows[row_key][column],
                                    [n for _, _, n in runs], tolerance, [i for i, _, _ in runs], len(references))})
    return records
