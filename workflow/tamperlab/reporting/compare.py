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
reference's five runs, each left out in turn against the other four: genuine 144-284 cells outside on average
where the others' own runs reach 252-341, one of the five over; every run with two defences' rows swapped
351-461.) The claims a paper would state — per (model, defence, attack) of refusal_summary.csv: base refusal,
bounded-worst refusal and the capability beside each — are listed as holding or not.

A cell empty in one run and not in the other (a diverged cell) is outside. Rows, columns and tables present in
one run and not the other are reported as missing, never dropped. Figures are not compared: they are drawn
from these tables. Tables are read as text; a value is a number when it parses as one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tamperlab.reporting.cell_judgement import EPSILON, RELATIVE_TOLERANCE, judge_cell
from tamperlab.reporting.run_tables import KEYS, index_rows, key_text, load_tables, refusal_n

TOLERANCE = 0.05

CELL_COLUMNS = ["table", "key", "column", "reference", "ours", "difference", "low", "high", "rule", "outside",
                "missing", "identical", "loo_ours", "loo_runs"]
SPREAD_DIR = "spread"  # REFERENCE/spread/<run>/tables: the same configuration under other seeds
BIT_EXACT, WITHIN_SPREAD, NOT_REPRODUCED = "bit-exact", "within spread", "NOT reproduced"
# The claims a defence comparison states, per (model, defence, attack) row of refusal_summary.csv
CLAIMS = {"base_refusal_rate": "base refusal", "base_capability": "base capability",
          "defence_usable": "defence usable", "bounded_worst_refusal_rate": "bounded-worst refusal",
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
        return self.ours_mean <= self.allowance + EPSILON


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
    refusal_ns = [refusal_n(tables) for tables in reference_tables]
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
    reference_rows, ours_rows = index_rows(name, *reference), index_rows(name, *ours)
    spread = [(index, index_rows(name, *table), n) for index, (table, n)
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
        text = key_text(key, row_key)
        if row_key not in ours_rows or row_key not in reference_rows:
            side = "ours" if row_key not in ours_rows else "reference"
            records.append({**blank, "key": text, "missing": side, "rule": "row missing"})
            continue
        for column in shared:
            runs = [(0, reference_rows[row_key], refusal_ns[0]),
                    *((index, rows[row_key], n) for index, rows, n in spread if column in rows.get(row_key, {}))]
            records.append({"table": name, "key": text, "column": column,
                            **judge_cell(name, column, [r for _, r, _ in runs], ours_rows[row_key][column],
                                    [n for _, _, n in runs], tolerance, [i for i, _, _ in runs], len(references))})
    return records
