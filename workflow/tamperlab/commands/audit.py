"""`tamperlab replay PATH`: audit one step by running it again; `tamperlab numerics`: which CPU kernels run here."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tamperlab.errors import UserError
from tamperlab.runtime import numerics, replay

REPLAY_DESCRIPTION = """\
Replay the step that wrote PATH (a model directory, an adapter run, an evaluation file, a landscape scan, a
table): read its manifest, check that every input it read still has the bytes it recorded (a changed input is
refused), say whether this machine's packages and CPU numerics differ from the manifest's, run the recorded command
again in a scratch directory (inputs linked in, the originals never written), and report each output file as
identical, differs, missing or extra; a table that differs is also judged as `tamperlab compare` judges it.

exit status: 0 every output file identical; 1 some file differs (or the command failed); 2 refused (no manifest,
a changed or missing input)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="audit one step: run it again from its manifest and compare the bytes",
                       description=REPLAY_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, metavar="PATH", help="an output of a tamperlab step (or a file inside one)")
    p.add_argument("--scratch", type=Path, metavar="DIR",
                   help="run here and keep it (default: a temporary directory, removed afterwards)")
    p.set_defaults(func=run_replay)
    n = sub.add_parser("numerics", help="the CPU numerics in force here and their kernel fingerprint",
                       description="Print the CPU numerics this process runs under (tamperlab --numerics), ATen's "
                                   "kernel capability, the threads and the kernel fingerprint, and whether it is "
                                   "the portable fingerprint the references were made with.")
    n.add_argument("--json", action="store_true", help="print it as one JSON object")
    n.set_defaults(func=run_numerics)


def run_numerics(args: argparse.Namespace) -> None:
    described = numerics.describe_now()
    if args.json:
        print(json.dumps(described))
        return
    for key, value in described.items():
        print(f"{key}: {value}")
    known = numerics.PORTABLE_FINGERPRINTS.get(described["threads"])
    if described["mode"] == "portable" and known:
        same = described["fingerprint"] == known
        print(f"portable fingerprint on {described['threads']} thread(s): {known} "
              + ("(the same: this CPU computes the references' bits)" if same else "(DIFFERENT: this CPU computes "
                 "other bits under portable numerics; please report its model and flags)"))


def run_replay(args: argparse.Namespace) -> int:
    plan = replay.plan(args.path)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="tamperlab-replay-"))
    manifest = plan.manifest
    print(f"replay: {plan.output} (step {manifest['step']}, revision {manifest.get('git_revision')})")
    print(f"  command: {shlex.join(plan.argv)}" + (f"  [OMP_NUM_THREADS={plan.threads}]" if plan.threads else ""))
    print(f"  inputs: {len(manifest.get('inputs', {}))} verified against the sha256 the step recorded")
    for note in replay.differences(plan, replay.numerics_here(plan)):
        print(f"  {note}")
    try:
        replay.stage(plan, scratch)
        started = time.perf_counter()
        finished = replay.run(plan, scratch)
        print(f"  ran in {time.perf_counter() - started:.1f} s in {scratch}")
        if finished.returncode:
            tail = (scratch / "replay.log").read_text().strip().splitlines()[-5:]
            print(f"the replayed command failed (exit {finished.returncode}):\n  " + "\n  ".join(tail))
            return 1
        rows = replay.outcome(plan, scratch)
        for name, state in rows:
            print(f"  {state:9s} {name}")
        differing = [name for name, state in rows if state != "identical"]
        _judge_tables(plan, scratch, differing)
        identical = len(rows) - len(differing)
        verdict = "bit-exact" if not differing else "differs"
        print(f"{verdict}: {identical} of {len(rows)} output files identical to the step's record")
        return 0 if not differing else 1
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _judge_tables(plan: replay.Plan, scratch: Path, differing: list[str]) -> None:
    """A table that differs is judged as compare judges a run: its folder's tables against the recorded ones."""
    tables = sorted({Path(name).parent for name in differing if name.endswith(".csv")
                     and Path(name).parent.name == "tables"})
    from tamperlab.reporting.compare import compare

    for folder in tables:
        try:
            comparison = compare(scratch / folder.parent, plan.workdir / folder.parent)
        except UserError as error:
            print(f"  {folder}: not compared ({error})", file=sys.stderr)
            continue
        print(f"  {folder}: {comparison.verdict} (tamperlab compare)")
