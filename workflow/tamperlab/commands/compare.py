"""`tamperlab compare RESULTS_DIR REFERENCE_DIR`: a run's tables beside a committed reference run's, cell by cell."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tamperlab.errors import UserError
from tamperlab.reporting.compare import BIT_EXACT, NOT_REPRODUCED, SPREAD_DIR, TOLERANCE, compare, rules
from tamperlab.runtime import numerics

DESCRIPTION = f"""\
Compare RESULTS_DIR/tables/*.csv with REFERENCE_DIR/tables/*.csv (e.g. results reference/default): rows matched by
their key columns, every cell judged against the reference's 95% interval (Wilson, for rates with their n) or a
stated tolerance (where the table carries no n); where the reference holds other runs of its configuration under
other seeds (REFERENCE_DIR/{SPREAD_DIR}/<run>/tables/), against the envelope of all their intervals: the seeds'
spread widened by the sampling interval. The first line is the verdict: {BIT_EXACT} (every cell identical), within
spread (every cell inside; or, with three reference runs or more, no more cells outside than the reference's own
runs have when each is judged against the others: leave one out), or {NOT_REPRODUCED}; then which numerics made
each side, a summary per table, the cells outside or missing, and the claims per (model, defence, attack) that
hold or not.

exit status: 0 bit-exact or within spread; 1 not reproduced (cells outside beyond the seeds' own disagreement, or
a row, column or table missing from either side); 2 bad input (a missing directory, an unreadable table, a table
without its key columns)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="did a run reproduce the reference? (exit 0 yes, 1 no, 2 bad input)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, metavar="RESULTS_DIR", help="a run's directory (holding tables/)")
    p.add_argument("reference", type=Path, metavar="REFERENCE_DIR", help="the reference, e.g. reference/default")
    p.add_argument("--out", type=Path, metavar="CSV", help="write the long-form comparison (every cell) here")
    p.add_argument("--all", action="store_true", help="print every cell, not only those outside or missing")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="absolute tolerance for shares whose n the tables do not carry (default %(default)s; "
                        "x100 on 0-100 columns)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if not args.tolerance >= 0:
        raise UserError(f"--tolerance {args.tolerance}: must be 0 or more")
    comparison = compare(args.results, args.reference, args.tolerance)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".partial")
        comparison.cells.to_csv(partial, index=False)
        os.replace(partial, args.out)
    cells, identical = comparison.summary["cells"].sum(), comparison.summary["identical"].sum()
    outside, missing = comparison.summary["outside"].sum(), comparison.summary["missing"].sum()
    spread = (f"the spread of {1 + len(comparison.spread_runs)} reference runs" if comparison.spread_runs
              else "the reference run's intervals (it holds no other seeds)")
    print(f"{comparison.verdict}: {args.results} against {args.reference} ({identical} of {cells} cells "
          f"identical; {outside} outside {spread}; {missing} missing)")
    calibration = comparison.calibration()
    if calibration and outside and not missing:
        print(f"  the seeds' own disagreement: each reference run has {min(calibration.reference)} to "
              f"{calibration.allowance} cells outside the other {calibration.runs - 1} runs' envelope; this run has "
              f"{calibration.ours_mean:.0f} on average outside each {calibration.runs - 1} of them "
              f"({'no more' if calibration.within else 'more'} than the reference's own runs)")
    for side, made_on in machines(args.results, args.reference).items():
        print(f"  {side} made on: {made_on}")
    print(f"  {numerics.expectation(_numerics(args.results), _numerics(args.reference))}")
    print()
    print(comparison.summary.to_string(index=False))
    if comparison.not_compared:
        print(f"\nnot compared (no row key known): {', '.join(comparison.not_compared)}")
    shown = comparison.cells if args.all else comparison.problems()
    if len(shown):
        print(f"\n{'every cell' if args.all else 'outside or missing'}:")
        print(_listing(shown))
    claims = comparison.claims()
    if len(claims):
        failing = claims[~claims["holds"]]
        print(f"\nclaims (refusal_summary.csv): {int(claims['holds'].sum())} of {len(claims)} hold"
              + (", these do not:" if len(failing) else ""))
        for claim in failing.itertuples():
            print(f"  - {claim.key}: {claim.claim} {claim.ours} (reference {claim.reference}, "
                  f"[{claim.low:.4g}, {claim.high:.4g}])")
    print("\nhow cells are judged:")
    for line in rules(args.tolerance):
        print(f"  - {line}")
    if comparison.spread_runs:
        print(f"  - with the reference's other seeds ({', '.join(comparison.spread_runs)}): inside the envelope "
              "of every reference run's interval")
    if calibration:
        print("  - cells outside are allowed up to the reference's own leave-one-out count: our mean count against "
              "each envelope of all runs but one, no more than the largest count of a reference run against the "
              "others' envelope")
    if comparison.verdict == NOT_REPRODUCED:
        sys.exit(1)


def _numerics(run_directory: Path) -> dict | None:
    """The numerics recorded by a run's tables step (its refusal table's manifest), where recorded."""
    from tamperlab.runtime.provenance import manifest_path, read_manifest

    table = Path(run_directory) / "tables" / "refusal.csv"
    return read_manifest(table).get("numerics") if manifest_path(table).is_file() else None


def machines(results: Path, reference: Path) -> dict[str, str]:
    """Which CPU made each side, where it is recorded: the run's refusal table manifest (`cpu`), the reference's
    SOURCE.md (`- machine:` line). Numbers differ between CPU kinds (docs/reproducing.md)."""
    from tamperlab.runtime.provenance import manifest_path, read_manifest

    found = {}
    table = results / "tables" / "refusal.csv"
    if manifest_path(table).is_file():
        found["results"] = read_manifest(table).get("cpu") or "not recorded"
    source = reference / "SOURCE.md"
    if source.is_file():
        lines = [line for line in source.read_text().splitlines() if line.startswith("- machine:")]
        if lines:
            found["reference"] = lines[0].removeprefix("- machine:").strip()
    return found


def _listing(cells) -> str:
    def number(value) -> str:
        return value if isinstance(value, str) else "" if value is None or value != value else f"{value:.4g}"

    shown = cells.assign(**{c: cells[c].map(number) for c in ("reference", "ours", "difference")},
                         interval=[f"[{lo:.4g}, {hi:.4g}]" if lo == lo and lo is not None else ""
                                   for lo, hi in zip(cells["low"], cells["high"], strict=True)],
                         outside=cells["outside"].map({True: "OUTSIDE", False: ""}))
    columns = ["table", "key", "column", "reference", "ours", "difference", "interval", "rule", "outside", "missing"]
    return shown[columns].to_string(index=False)
