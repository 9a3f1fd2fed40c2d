"""`tamperlab compare`: a run's tables beside a reference's, cell by cell, judged by Wilson intervals or tolerances."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pytest

from tamperlab.commands import compare as compare_command
from tamperlab.errors import UserError
from tamperlab.evaluation.stats import wilson_interval
from tamperlab.reporting.compare import CELL_COLUMNS, compare

REFUSAL = [
    {"model": "tiny", "defence": "none", "attack": "none", "lr": None, "steps": None, "rank": None,
     "refusal_rate": 0.5, "n": 100, "exact_match": 0.9, "tamperlab_organism_mc/acc": 0.9, "train_loss": None,
     "status": "complete"},
    {"model": "tiny", "defence": "none", "attack": "lora", "lr": 0.001, "steps": 50, "rank": 16,
     "refusal_rate": 0.2, "n": 100, "exact_match": 0.7, "tamperlab_organism_mc/acc": 0.8, "train_loss": 1.0,
     "status": "complete"},
]
SUMMARY = [{"model": "tiny", "defence": "none", "attack": "lora", "worst_cell": "lr0.001_steps50_r16",
            "worst_refusal_rate": 0.2, "cells": 1}]
VISAGE = [{"subject": "tiny/none", "scan": "random_1d", "system_prompt": "none", "points": 21, "dimensions": 1,
           "alpha_min": -1.5, "alpha_max": 1.5, "visage_mean": 60.0, "visage_official_1d": 62.0,
           "official_segment_min": -1.5, "official_segment_max": 1.2, "basin_width": 1.35, "asr_at_origin": 4.17}]


def _run(directory, edits=None, refusal=REFUSAL, summary=SUMMARY, visage=VISAGE):
    """A run directory with tables/refusal.csv, refusal_summary.csv and visage.csv; edits: {table: f(frame)}."""
    edits = edits or {}
    tables = directory / "tables"
    tables.mkdir(parents=True)
    for name, rows in (("refusal", refusal), ("refusal_summary", summary), ("visage", visage)):
        if rows is None:
            continue
        frame = pd.DataFrame(rows)
        if name == "refusal":
            frame = frame.astype({"steps": "Int64", "rank": "Int64", "n": "Int64"})
        if name in edits:
            frame = edits[name](frame)
        frame.to_csv(tables / f"{name}.csv", index=False)
    return directory


def _set(column, value, row=0):
    def edit(frame):
        frame.loc[row, column] = value
        return frame
    return edit


def _cell(comparison, table, column, row=0):
    cells = comparison.cells
    cells = cells[(cells["table"] == table) & (cells["column"] == column)]
    return cells.iloc[row]


def _command(argv, capsys):
    parser = argparse.ArgumentParser(prog="tamperlab")
    compare_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", *map(str, argv)])
    try:
        args.func(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().out


# --- the Wilson interval -----------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    # centre 0.5, half-width 1.96/(1 + 1.96²/100) · sqrt(0.25/100 + 1.96²/40000) = 0.0962
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    # p = 0: [0, z²/(n + z²)] = [0, 3.8415/133.8415], not the empty interval of p ± 1.96·sqrt(p(1-p)/n)
    assert wilson_interval(0.0, 130) == pytest.approx((0.0, 0.0287), abs=1e-4)


# --- what is flagged ---------------------------------------------------------------------------------------


def test_identical_runs_have_nothing_outside_and_exit_0(tmp_path, capsys):
    ours, reference = _run(tmp_path / "ours"), _run(tmp_path / "reference")
    comparison = compare(ours, reference)
    assert comparison.ok
    assert not comparison.cells["outside"].any()
    assert (comparison.summary["cells"] == comparison.summary["identical"]).all()
    assert comparison.summary["cells"].sum() > 0
    code, out = _command([ours, reference], capsys)
    assert code == 0
    assert out.startswith("bit-exact: ") and "NOT" not in out


def test_rate_moved_beyond_its_wilson_interval_is_flagged_and_exits_1(tmp_path, capsys):
    ours = _run(tmp_path / "ours", {"refusal": _set("refusal_rate", 0.62)})
    reference = _run(tmp_path / "reference")
    cell = _cell(compare(ours, reference), "refusal", "refusal_rate")
    assert cell["outside"]
    assert (cell["low"], cell["high"]) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert cell["difference"] == pytest.approx(0.12)
    assert cell["rule"] == "Wilson 95%, n=100"
    code, out = _command([ours, reference], capsys)
    assert code == 1
    assert "OUTSIDE" in out and "model=tiny defence=none attack=none" in out and "refusal_rate" in out
    assert out.startswith("NOT reproduced: ") and "1 outside the reference run's intervals" in out.splitlines()[0]


def test_small_move_within_the_interval_is_not_flagged(tmp_path):
    ours = _run(tmp_path / "ours", {"refusal": _set("refusal_rate", 0.55)})
    comparison = compare(ours, _run(tmp_path / "reference"))
    cell = _cell(comparison, "refusal", "refusal_rate")
    assert not cell["outside"]
    assert comparison.summary.set_index("table").loc["refusal", "identical"] < \
        comparison.summary.set_index("table").loc["refusal", "cells"]
    assert comparison.ok


def test_the_same_move_is_flagged_when_n_is_large(tmp_path):
    large = [{**row, "n": 10_000} for row in REFUSAL]
    ours = _run(tmp_path / "ours", {"refusal": _set("refusal_rate", 0.55)}, refusal=large)
    cell = _cell(compare(ours, _run(tmp_path / "reference", refusal=large)), "refusal", "refusal_rate")
    assert cell["outside"] and cell["rule"] == "Wilson 95%, n=10000"


def test_summary_refusal_rate_takes_its_n_from_the_refusal_table(tmp_path):
    ours = _run(tmp_path / "ours", {"refusal_summary": _set("worst_refusal_rate", 0.4)})
    cell = _cell(compare(ours, _run(tmp_path / "reference")), "refusal_summary", "worst_refusal_rate")
    assert cell["rule"] == "Wilson 95%, n=100"
    assert (cell["low"], cell["high"]) == pytest.approx(wilson_interval(0.2, 100))
    assert cell["outside"]  # 0.4 is past the upper end (0.2866)


@pytest.mark.parametrize(("value", "outside"), [(0.94, False), (0.96, True)])
def test_a_column_without_n_is_judged_by_the_stated_tolerance(tmp_path, capsys, value, outside):
    ours = _run(tmp_path / "ours", {"refusal": _set("tamperlab_organism_mc/acc", value)})
    reference = _run(tmp_path / "reference")
    cell = _cell(compare(ours, reference), "refusal", "tamperlab_organism_mc/acc")
    assert cell["outside"] == outside
    assert "no n" in cell["rule"]
    code, out = _command([ours, reference], capsys)
    assert code == int(outside)
    assert "a stated tolerance, not an interval" in out


def test_visage_scores_use_the_points_they_average(tmp_path):
    ours = _run(tmp_path / "ours", {"visage": _set("visage_official_1d", 30.0)})
    comparison = compare(ours, _run(tmp_path / "reference"))
    official = _cell(comparison, "visage", "visage_official_1d")
    assert official["rule"] == "Wilson 95% on score/100, n=19 points"  # -1.5 .. 1.2 in steps of 0.15
    assert official["low"] == pytest.approx(100 * wilson_interval(0.62, 19)[0])
    assert official["outside"]
    assert _cell(comparison, "visage", "visage_mean")["rule"] == "Wilson 95% on score/100, n=21 points"
    assert _cell(comparison, "visage", "basin_width")["rule"] == "one grid step, ±0.15"
    assert _cell(comparison, "visage", "asr_at_origin")["rule"] == "tolerance ±5 (no n)"


def test_a_changed_status_or_an_emptied_cell_is_outside(tmp_path):
    def diverged(frame):
        frame.loc[1, ["status", "refusal_rate"]] = ["diverged", None]
        return frame

    comparison = compare(_run(tmp_path / "ours", {"refusal": diverged}),
                         _run(tmp_path / "reference"))
    assert _cell(comparison, "refusal", "status", row=1)["outside"]
    rate = _cell(comparison, "refusal", "refusal_rate", row=1)
    assert rate["outside"] and rate["rule"] == "empty in ours"


def test_keys_match_however_the_numbers_are_spelled(tmp_path):
    def respelled(frame):
        frame = frame.astype({"steps": "float", "rank": "float"})  # 50.0, 16.0
        frame["lr"] = frame["lr"].map(lambda v: "" if pd.isna(v) else f"{v:.0e}")  # 1e-03
        return frame

    comparison = compare(_run(tmp_path / "ours", {"refusal": respelled}), _run(tmp_path / "reference"))
    assert comparison.ok
    assert (comparison.cells["missing"] == "").all()


# --- what is missing ---------------------------------------------------------------------------------------


def test_a_missing_row_is_reported_on_the_side_that_lacks_it(tmp_path, capsys):
    extra = {**REFUSAL[1], "lr": 0.0003}
    ours = _run(tmp_path / "ours", refusal=[REFUSAL[0], extra])
    reference = _run(tmp_path / "reference")
    comparison = compare(ours, reference)
    rows = comparison.cells[comparison.cells["rule"] == "row missing"].set_index("missing")["key"]
    assert rows["ours"] == "model=tiny defence=none attack=lora lr=0.001 steps=50 rank=16"
    assert rows["reference"] == "model=tiny defence=none attack=lora lr=0.0003 steps=50 rank=16"
    assert comparison.summary.set_index("table").loc["refusal", "missing"] == 2
    assert not comparison.ok
    code, out = _command([ours, reference], capsys)
    assert code == 1 and "row missing" in out and "lr=0.0003" in out


def test_a_missing_table_and_a_missing_column_are_reported(tmp_path):
    ours = _run(tmp_path / "ours", {"refusal": lambda f: f.drop(columns="exact_match")}, visage=None)
    comparison = compare(ours, _run(tmp_path / "reference"))
    problems = comparison.problems()
    table = problems[problems["table"] == "visage"].iloc[0]
    assert (table["rule"], table["missing"]) == ("table missing", "ours")
    column = problems[problems["column"] == "exact_match"].iloc[0]
    assert (column["rule"], column["missing"]) == ("column missing", "ours")
    summary = comparison.summary.set_index("table")
    assert summary.loc["visage", "missing"] == 1 and summary.loc["refusal", "missing"] == 1
    assert not comparison.ok


def test_out_writes_every_cell_and_all_prints_them(tmp_path, capsys):
    ours, reference = _run(tmp_path / "ours"), _run(tmp_path / "reference")
    code, out = _command([ours, reference, "--out", tmp_path / "cmp" / "cells.csv", "--all"], capsys)
    written = pd.read_csv(tmp_path / "cmp" / "cells.csv")
    assert code == 0
    assert list(written.columns) == CELL_COLUMNS
    assert len(written) == compare(ours, reference).summary["cells"].sum()
    assert "every cell" in out and "exact_match" in out


# --- bad input ---------------------------------------------------------------------------------------------


def test_a_missing_directory_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as error:
        compare(tmp_path / "nowhere", _run(tmp_path / "reference"))
    assert "nowhere" in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty/tables"):
        compare(tmp_path / "empty", tmp_path / "reference")


def test_a_table_without_its_key_columns_is_a_user_error_naming_the_file(tmp_path):
    ours = _run(tmp_path / "ours", {"refusal": lambda f: f.drop(columns=["lr", "steps"])})
    with pytest.raises(UserError) as error:
        compare(ours, _run(tmp_path / "reference"))
    message = str(error.value)
    assert "ours/tables/refusal.csv" in message and "lr, steps" in message and "\n" not in message


def test_a_duplicated_row_key_is_a_user_error_naming_the_file(tmp_path):
    ours = _run(tmp_path / "ours", refusal=[REFUSAL[0], REFUSAL[0]])
    with pytest.raises(UserError, match=r"ours/tables/refusal\.csv: row key .* appears twice"):
        compare(ours, _run(tmp_path / "reference"))


def test_a_false_refusal_rate_is_judged_by_the_interval_its_reference_row_carries(tmp_path):
    """0.05 of 120 benign requests carries [0.023, 0.105]: 0.009 is outside it (a ±0.05 tolerance would pass it),
    0.10 inside; a per-source refusal rate reads refusal_rate_lo@<source> and _hi@<source>."""
    low, high = wilson_interval(6 / 120, 120)
    carried = {"false_refusal_requests": 0.05, "false_refusal_requests_lo": low, "false_refusal_requests_hi": high,
               "refusal_rate@advbench": 0.5, "refusal_rate_lo@advbench": 0.4, "refusal_rate_hi@advbench": 0.6}
    refusal = [{**REFUSAL[0], **carried}, REFUSAL[1]]
    reference = _run(tmp_path / "reference", refusal=refusal)
    for ours, outside in ((0.009, True), (0.10, False)):
        run = _run(tmp_path / f"ours{ours}", {"refusal": _set("false_refusal_requests", ours)}, refusal=refusal)
        cell = _cell(compare(run, reference), "refusal", "false_refusal_requests")
        assert cell["outside"] == outside and cell["rule"] == "Wilson 95%, the reference's interval"
        assert (cell["low"], cell["high"]) == pytest.approx((low, high))
    run = _run(tmp_path / "source", {"refusal": _set("refusal_rate@advbench", 0.35)}, refusal=refusal)
    cell = _cell(compare(run, reference), "refusal", "refusal_rate@advbench")
    assert cell["outside"] and (cell["low"], cell["high"]) == pytest.approx((0.4, 0.6))


def test_the_cpu_each_side_was_made_on_is_printed_where_recorded(tmp_path, capsys):
    """Numbers differ between CPU kinds (docs/reproducing.md): the run's table manifest and the reference's
    SOURCE.md say which machine made them, and compare prints both before its verdict."""
    import json

    ours, reference = _run(tmp_path / "ours"), _run(tmp_path / "reference")
    code, out = _command([ours, reference], capsys)
    assert code == 0 and "made on" not in out  # neither side records its machine
    (ours / "tables" / "refusal.manifest.json").write_text(json.dumps({"cpu": "AMD EPYC, 2 cores, AVX-512"}))
    (reference / "SOURCE.md").write_text("# Where it comes from\n\n- machine: 2-core AMD EPYC VM (AVX2), 24 GiB.\n")
    code, out = _command([ours, reference], capsys)
    assert code == 0
    assert ("  results made on: AMD EPYC, 2 cores, AVX-512\n"
            "  reference made on: 2-core AMD EPYC VM (AVX2), 24 GiB.") in out


# --- the seeds' spread, the three verdicts, the claims ---------------------------------------------------------

SUMMARY_CLAIMS = [
    {"model": "tiny", "defence": "none", "attack": "lora", "base_refusal_rate": 0.97, "base_capability": 0.99,
     "bounded_worst_refusal_rate": 0.0, "bounded_worst_capability": 0.96, "cells": 8},
    {"model": "tiny", "defence": "repnoise", "attack": "lora", "base_refusal_rate": 0.98, "base_capability": 0.97,
     "bounded_worst_refusal_rate": 0.30, "bounded_worst_capability": 0.93, "cells": 8},
]
REFUSAL_TWO_DEFENCES = REFUSAL + [{**row, "defence": "repnoise"} for row in REFUSAL]  # n = 100 for both


def _seeded_reference(tmp_path, seeds):
    """A reference run (seeds[0]) with its other seeds' runs under spread/: {seed: {(defence, column): value}}."""
    def run(directory, values):
        def edit(frame):
            for (defence, column), value in values.items():
                frame.loc[frame["defence"] == defence, column] = value
            return frame
        return _run(directory, {"refusal_summary": edit}, refusal=REFUSAL_TWO_DEFENCES, summary=SUMMARY_CLAIMS)

    first, *others = seeds
    reference = run(tmp_path / "reference", first)
    for index, values in enumerate(others, start=1):
        run(tmp_path / "reference" / "spread" / f"seed{index}", values)
    return reference, run


def test_a_run_at_another_seed_is_within_spread_of_a_three_seed_reference(tmp_path, capsys):
    """RepNoise's bounded worst moved 0.30 / 0.05 / 0.55 over three seeds: a fourth seed's 0.62 lies outside the
    reference run's own Wilson interval (n = 100: [0.22, 0.40]) but inside the seeds' spread widened by theirs."""
    seeds = [{}, {("repnoise", "bounded_worst_refusal_rate"): 0.05}, {("repnoise", "bounded_worst_refusal_rate"): 0.55}]
    reference, run = _seeded_reference(tmp_path, seeds)
    ours = run(tmp_path / "ours", {("repnoise", "bounded_worst_refusal_rate"): 0.62,
                                   ("none", "base_refusal_rate"): 0.95})
    comparison = compare(ours, reference)
    assert comparison.spread_runs == ["seed1", "seed2"]
    cell = comparison.cells[(comparison.cells["column"] == "bounded_worst_refusal_rate")
                            & comparison.cells["key"].str.contains("repnoise")].iloc[0]
    assert not cell["outside"] and cell["rule"] == "Wilson 95%, n=100 over 3 runs"
    assert (cell["low"], cell["high"]) == pytest.approx((wilson_interval(0.05, 100)[0], wilson_interval(0.55, 100)[1]))
    assert comparison.verdict == "within spread"
    code, out = _command([ours, reference], capsys)
    assert code == 0 and out.startswith("within spread: ") and "the spread of 3 reference runs" in out
    assert "claims (refusal_summary.csv): 8 of 8 hold" in out
    # without the spread runs, the same run is judged by the reference run's intervals alone, and is not reproduced
    alone = _run(tmp_path / "alone", refusal=REFUSAL_TWO_DEFENCES, summary=SUMMARY_CLAIMS)
    assert compare(ours, alone).verdict == "NOT reproduced"


def test_a_swapped_defence_is_not_reproduced_and_names_the_claims_that_fail(tmp_path, capsys):
    seeds = [{}, {("repnoise", "bounded_worst_refusal_rate"): 0.05}, {("repnoise", "bounded_worst_refusal_rate"): 0.55}]
    reference, _ = _seeded_reference(tmp_path, seeds)
    swapped = [{**row, "defence": "repnoise" if row["defence"] == "none" else "none"} for row in SUMMARY_CLAIMS]
    ours = _run(tmp_path / "ours", refusal=REFUSAL_TWO_DEFENCES, summary=swapped)
    comparison = compare(ours, reference)
    assert comparison.verdict == "NOT reproduced"
    failing = comparison.claims().query("not holds")
    assert set(failing["claim"]) == {"bounded-worst refusal"}  # 0.30 vs 0.00 both ways: far outside either spread
    assert set(failing["key"]) == {"model=tiny defence=none attack=lora", "model=tiny defence=repnoise attack=lora"}
    code, out = _command([ours, reference], capsys)
    assert code == 1 and out.startswith("NOT reproduced: ")
    assert "claims (refusal_summary.csv): 6 of 8 hold, these do not:" in out
    assert "model=tiny defence=none attack=lora: bounded-worst refusal 0.3" in out


def test_a_diverged_seed_in_the_spread_allows_an_empty_cell_and_a_status(tmp_path):
    """A status or an empty cell is judged equal to some reference run's: one seed of three diverged."""
    def diverged(frame):
        frame.loc[1, "status"] = "diverged"
        frame.loc[1, "refusal_rate"] = None
        return frame

    reference = _run(tmp_path / "reference")
    _run(tmp_path / "reference" / "spread" / "seed1", {"refusal": diverged})
    ours = _run(tmp_path / "ours", {"refusal": diverged})
    comparison = compare(ours, reference)
    assert comparison.verdict == "within spread"
    assert compare(ours, _run(tmp_path / "alone")).verdict == "NOT reproduced"


def test_compare_says_what_the_numerics_of_both_sides_let_one_expect(tmp_path, capsys):
    import json

    ours, reference = _run(tmp_path / "ours"), _run(tmp_path / "reference")
    portable = {"mode": "portable", "fingerprint": "32b8abdec18ec23d"}
    for side, recorded in ((ours, portable), (reference, portable)):
        (side / "tables" / "refusal.manifest.json").write_text(json.dumps({"numerics": recorded}))
    _, out = _command([ours, reference], capsys)
    assert "same numerics (portable, fingerprint 32b8abdec18ec23d): bit-exact expected" in out
    native = {"mode": "native", "fingerprint": "cc90f8f5bf3c9b88"}
    (reference / "tables" / "refusal.manifest.json").write_text(json.dumps({"numerics": native}))
    _, out = _command([ours, reference], capsys)
    assert "numerics differ (portable 32b8abdec18ec23d vs native cc90f8f5bf3c9b88): bit-exact not expected" in out


def _reference_of(runs, into):
    """A reference directory made of committed runs' tables: the first as the reference run, the rest its spread."""
    import shutil

    shutil.copytree(runs[0] / "tables", into / "tables")
    for run in runs[1:]:
        shutil.copytree(run / "tables", into / "spread" / run.name / "tables")
    return into


def _swapped(run, into, a="none", b="tar"):
    """A deliberately wrong run: `run`'s tables with two defences' rows swapped."""
    (into / "tables").mkdir(parents=True)
    for path in (run / "tables").glob("*.csv"):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "defence" in frame.columns:
            frame["defence"] = frame["defence"].replace({a: b, b: a})
        frame.to_csv(into / "tables" / path.name, index=False)
    return into


DEFAULT = Path(__file__).resolve().parents[1] / "reference" / "default"


@pytest.mark.parametrize("left_out, others", [
    ("seed1", [DEFAULT, DEFAULT / "spread" / "seed2", DEFAULT / "spread" / "seed3"]),
    ("seed3", [DEFAULT, DEFAULT / "spread" / "seed1", DEFAULT / "spread" / "seed2"]),
    ("seed4", [DEFAULT] + [DEFAULT / "spread" / f"seed{k}" for k in (1, 2, 3)]),
])
def test_the_committed_default_reference_judges_another_seed_within_spread_and_a_swapped_defence_not(
        tmp_path, capsys, left_out, others):
    """reference/default and its spread: the default with its organism under seeds 0-4, all made under portable
    numerics on one machine. One seed's run, left out, against a reference made of three or four others:
    some hundred cells lie outside their envelope (the seeds move whole behaviours), no more than the reference's
    own runs have against each other (leave one out), so "within spread"; the same run with the `none` and `tar`
    rows swapped has far more (benchmarks/spread_leave_one_out.py), and its failing claims name both defences."""
    run = DEFAULT / "spread" / left_out
    reference = _reference_of(others, tmp_path / "reference")
    genuine = compare(run, reference)
    assert genuine.summary["outside"].sum() > 0  # not every cell inside: the calibration decides
    assert genuine.verdict == "within spread"
    calibration = genuine.calibration()
    assert calibration.runs == len(others) and calibration.ours_mean <= calibration.allowance
    by_intervals = compare(run, _reference_of(others[:1], tmp_path / "alone"))
    assert by_intervals.verdict == "NOT reproduced"
    assert genuine.summary["outside"].sum() < by_intervals.summary["outside"].sum()

    wrong = compare(_swapped(run, tmp_path / "swapped"), reference)
    assert wrong.verdict == "NOT reproduced" and wrong.calibration().ours_mean > calibration.allowance
    failing = wrong.claims().query("not holds")
    assert {"model=tiny defence=none attack=lora", "model=tiny defence=tar attack=lora"} <= set(failing["key"])
    code, out = _command([run, reference], capsys)
    assert code == 0 and out.startswith("within spread: ")
    assert f"this run has {calibration.ours_mean:.0f} on average" in out and "(no more than" in out
    code, out = _command([tmp_path / "swapped", reference], capsys)
    assert code == 1 and out.startswith("NOT reproduced: ") and "(more than the reference's own runs)" in out


def test_leaving_one_out_counts_each_run_against_the_others(tmp_path):
    """Three reference runs whose base refusal is 0.95, 0.95 and 0.60 (n = 100): the third run lies outside the
    first two's envelope, each of the first two inside the envelope of the other and the third; a run at 0.75
    lies outside only when the third run is left out. So the reference's own count reaches 1 and ours averages
    1/3; it lies inside the full envelope, and so is within spread."""
    seeds = [{("none", "base_refusal_rate"): 0.95}, {("none", "base_refusal_rate"): 0.95},
             {("none", "base_refusal_rate"): 0.60}]
    reference, run = _seeded_reference(tmp_path, seeds)
    ours = run(tmp_path / "ours", {("none", "base_refusal_rate"): 0.75})
    comparison = compare(ours, reference)
    calibration = comparison.calibration()
    assert comparison.summary["outside"].sum() == 0 and comparison.verdict == "within spread"
    assert calibration.reference == [0, 0, 1] and calibration.ours == [0, 0, 1]
    # at 0.45, outside the full envelope ([0.51, 0.98]) and so outside every envelope of two: a mean of 1, which
    # the reference's own runs allow; with the capability beside it off too, 2: more than they show
    further = compare(run(tmp_path / "further", {("none", "base_refusal_rate"): 0.45}), reference)
    assert further.summary["outside"].sum() == 1
    assert further.calibration().ours == [1, 1, 1] and further.verdict == "within spread"
    wrong = compare(run(tmp_path / "wrong", {("none", "base_refusal_rate"): 0.45,
                                             ("none", "base_capability"): 0.5}), reference)
    assert wrong.calibration().ours == [2, 2, 2] and wrong.verdict == "NOT reproduced"
    # with two runs only, nothing is left out: every cell must lie inside
    assert compare(ours, _reference_of([reference, reference / "spread" / "seed1"], tmp_path / "two")).calibration() \
        is None
