"""Analysis: how a reference's seeds judge each other — what `tamperlab compare` can expect of a genuine reproduction.

A reference with a spread (REFERENCE/tables and REFERENCE/spread/<name>/tables) holds k runs of one configuration
under different seeds. Leave one out: each run is compared with a reference made of the other k - 1 (their
envelope), and once more with two defences' rows swapped (a deliberately wrong run). Reported per left-out run:
cells outside the envelope, outside one other run's intervals alone, claims holding, and compare's calibrated
verdict (with k - 1 >= 3: the run's mean count outside each envelope of k - 2 of those runs, against the largest
count of one of them against the others: the allowance) — genuine and swapped.

    python benchmarks/spread_leave_one_out.py reference/default
    python benchmarks/spread_leave_one_out.py reference/default --swap none tar --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))
from tamperlab.reporting.compare import SPREAD_DIR, compare  # noqa: E402


def runs_of(reference: Path) -> dict[str, Path]:
    runs = {"reference": reference}
    runs.update({p.name: p for p in sorted((reference / SPREAD_DIR).glob("*")) if (p / "tables").is_dir()})
    return runs


def reference_from(runs: list[Path], into: Path) -> Path:
    """A reference directory of these runs: the first as the reference run, the others as its spread."""
    into.mkdir(parents=True)
    (into / "tables").symlink_to((runs[0] / "tables").resolve())
    for run in runs[1:]:
        (into / SPREAD_DIR / run.name).mkdir(parents=True)
        (into / SPREAD_DIR / run.name / "tables").symlink_to((run / "tables").resolve())
    return into


def swapped(run: Path, a: str, b: str, into: Path) -> Path:
    (into / "tables").mkdir(parents=True)
    for path in (run / "tables").glob("*.csv"):
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "defence" in frame.columns:
            frame["defence"] = frame["defence"].replace({a: b, b: a})
        frame.to_csv(into / "tables" / path.name, index=False)
    return into


def judge(run: Path, reference: Path) -> dict:
    comparison = compare(run, reference)
    claims = comparison.claims()
    calibration = comparison.calibration()
    return {"outside": int(comparison.summary["outside"].sum()), "claims": len(claims),
            "claims_holding": int(claims["holds"].sum()), "verdict": comparison.verdict,
            "mean_outside_k_minus_1": round(calibration.ours_mean) if calibration else None,
            "allowance": calibration.allowance if calibration else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--swap", nargs=2, default=["none", "tar"], metavar=("A", "B"),
                        help="the defences whose rows the wrong run swaps")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    runs = runs_of(args.reference)
    if len(runs) < 3:
        raise SystemExit(f"{args.reference}: leave-one-out needs at least 3 runs (found {len(runs)})")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, run in runs.items():
            others = [p for n, p in runs.items() if n != name]
            envelope = reference_from(others, Path(scratch) / f"without_{name}")
            alone = reference_from(others[:1], Path(scratch) / f"alone_{name}")
            wrong = swapped(run, *args.swap, Path(scratch) / f"swapped_{name}")
            genuine, swap = judge(run, envelope), judge(wrong, envelope)
            rows.append({"left_out": name, "others": len(others), "outside_envelope": genuine["outside"],
                         "outside_one_run": judge(run, alone)["outside"],
                         "claims_holding": f"{genuine['claims_holding']}/{genuine['claims']}",
                         "allowance": genuine["allowance"], "mean_outside_k_minus_1": genuine["mean_outside_k_minus_1"],
                         "verdict": genuine["verdict"], "swapped_outside": swap["outside"],
                         "swapped_mean_outside_k_minus_1": swap["mean_outside_k_minus_1"],
                         "swapped_claims_holding": f"{swap['claims_holding']}/{swap['claims']}",
                         "swapped_verdict": swap["verdict"]})
    frame = pd.DataFrame(rows)
    print(frame.to_markdown(index=False))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
