"""Benchmark: the default workflow's wall time, per stage, on an idle machine and with one core busy.

Runs the default workflow (rule all) in a fresh temporary directory (or reads an existing run with --workdir
--no-run) and reports, from each step's manifest, per stage (step type): jobs, summed job wall time, start-up
(interpreter + imports before the step begins) and model loads; then the whole run's wall time.
--busy keeps one core busy with another process (a pure-Python spin loop) for the whole run: torch's threads
collapse when another process takes a core they counted on, which is why every job's threads come from its rule.

    python benchmarks/default_run.py                       # idle
    python benchmarks/default_run.py --busy                # one core busy
    python benchmarks/default_run.py --json out.json       # also write the figures
    python benchmarks/default_run.py --workdir DIR --no-run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spin() -> None:
    while True:
        pass


def run_workflow(workdir: Path, configfile: Path | None, cores: int) -> float:
    bin_dir = Path(sys.executable).parent
    # The target first: --config and --configfile take every word that follows them.
    command = [str(bin_dir / "snakemake"), "all", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
               "--cores", str(cores), "--config", f"cache_dir={REPO / '.cache' / 'tamperlab'}"]
    if configfile:
        command += ["--configfile", str(configfile.resolve())]
    # SLURM_CONF=/dev/null: the slurm executor plugin's probe otherwise waits ~10 s for a controller at start-up
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_CONF": "/dev/null"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def stages(workdir: Path) -> dict[str, dict[str, float]]:
    """{step: {jobs, wall_s, startup_s, load_s}} summed over the run's manifests."""
    found: dict[str, dict[str, float]] = {}
    for path in sorted((workdir / "results").rglob("*manifest.json")):
        manifest = json.loads(path.read_text())
        timing = manifest.get("timing")
        if not timing:
            continue
        stage = found.setdefault(manifest["step"], {"jobs": 0, "wall_s": 0.0, "startup_s": 0.0, "load_s": 0.0})
        stage["jobs"] += 1
        stage["wall_s"] += timing["wall_s"]
        stage["startup_s"] += timing["startup_s"]
        stage["load_s"] += timing["phases_s"].get("load", 0.0)
    return dict(sorted(found.items(), key=lambda item: -item[1]["wall_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="run (or read) here instead of a temporary directory")
    parser.add_argument("--no-run", action="store_true", help="only read the manifests under --workdir")
    parser.add_argument("--configfile", type=Path, help="an overlay config, as for snakemake")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="snakemake --cores (default: all)")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process meanwhile")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tamperlab-bench-"))
    total_s = None
    if not args.no_run:
        burner = multiprocessing.Process(target=spin, daemon=True) if args.busy else None
        if burner:
            burner.start()
        try:
            total_s = run_workflow(workdir, args.configfile, args.cores)
        finally:
            if burner:
                burner.terminate()

    found = stages(workdir)
    print(f"{'stage':22} {'jobs':>4} {'wall s':>8} {'start-up s':>10} {'load s':>8}")
    for step, s in found.items():
        print(f"{step:22} {s['jobs']:4d} {s['wall_s']:8.1f} {s['startup_s']:10.1f} {s['load_s']:8.1f}")
    jobs_wall = sum(s["wall_s"] for s in found.values())
    overhead = sum(s["startup_s"] + s["load_s"] for s in found.values())
    print(f"{len(found)} stages, {sum(s['jobs'] for s in found.values())} jobs: summed job wall time "
          f"{jobs_wall:.1f} s, of which start-up and model loads {overhead:.1f} s ({100 * overhead / jobs_wall:.0f}%)")
    if total_s is not None:
        print(f"whole run (snakemake all, --cores {args.cores}{', one core busy' if args.busy else ''}): "
              f"{total_s:.1f} s = {total_s / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"busy": args.busy, "cores": args.cores, "total_s": total_s,
                                         "jobs_wall_s": jobs_wall, "stages": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
