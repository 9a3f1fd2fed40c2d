"""One cell of a run's tables judged against the reference runs' same cell: the interval each reference run allows
for it (by the kind of its column: see reporting.compare's docstring), the envelope of those intervals, and, with
three reference runs or more, which runs left out would put ours (or a reference run) outside the others' envelope.
"""

from __future__ import annotations

from tamperlab.evaluation.stats import wilson_interval
from tamperlab.reporting.run_tables import number

RELATIVE_TOLERANCE = 0.10
EPSILON = 1e-9  # float noise: a value on the interval's edge is inside

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


def _bounds(table: str, column: str, row: dict[str, str], value: float, refusal_n: dict,
            tolerance: float) -> tuple[float, float, str]:
    """(low, high, rule) of the reference value `value` in `row` of `table`."""
    n = None
    if table == "refusal" and column in RATES_WITH_ROW_N:
        n = number(row.get("n", ""))
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
    bounds = [number(row.get(f"{rate}{end}{at}{source}", "")) for end in ("_lo", "_hi")]
    return None if None in bounds else (bounds[0], bounds[1])


def _axis(row: dict[str, str]) -> int | None:
    points, dimensions = number(row.get("points", "")), number(row.get("dimensions", "")) or 1
    return round(points ** (1 / dimensions)) if points else None


def _grid_step(row: dict[str, str], axis: str) -> float | None:
    low, high, per_axis = number(row.get(f"{axis}_min", "")), number(row.get(f"{axis}_max", "")), _axis(row)
    if low is None or high is None or not per_axis or per_axis < 2:
        return None
    return (high - low) / (per_axis - 1)


def _visage_points(column: str, row: dict[str, str]) -> int | None:
    """How many scan points a VISAGE score averages: all of them, or the official segment's."""
    points = number(row.get("points", ""))
    if column == "visage_official_1d":
        start, end = number(row.get("official_segment_min", "")), number(row.get("official_segment_max", ""))
        step = _grid_step(row, "alpha")
        if start is not None and end is not None and step:
            return round((end - start) / step) + 1
    return int(points) if points else None


def judge_cell(table: str, column: str, rows: list[dict[str, str]], ours_text: str, refusal_ns: list[dict],
          tolerance: float, run_ids: list[int] | None = None, runs: int = 1) -> dict:
    """Our cell against the reference runs' (rows[0]: the reference run; the rest: its spread runs; `run_ids`:
    which of the comparison's `runs` reference runs each row is). With three runs or more, also leave one out:
    `loo_ours` lists the runs without which ours would be outside the others' envelope, `loo_runs` the runs
    that are outside the others' envelope themselves."""
    run_ids = list(range(len(rows))) if run_ids is None else run_ids
    texts = [row[column].strip() for row in rows]
    reference_text, ours_text = texts[0], ours_text.strip()
    values = [number(text) for text in texts]
    reference, ours = values[0], number(ours_text)
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
        return value < low - EPSILON or value > high + EPSILON

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
