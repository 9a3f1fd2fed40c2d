"""Benchmark: the organism's build time and the share of wall time spent in per-job start-up.

Runs the default workflow (rule all) in a fresh temporary directory (or reads the manifests of an existing run with
--workdir), then reports per job: interpreter start + imports (`startup_s`), model loads (the `load` phase)
and total wall time, from each step's manifest.

    python benchmarks/startup.py            # fresh run of the default config (about 3 minutes on 2 cores)
    python benchmarks/startup.py --workdir . --no-run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="run (or read) here instead of a temporary directory")
    parser.add_argument("--no-run", action="store_true", help="only read the manifests under --workdir")
    parser.add_argument("--configfile", type=Path, help="an overlay config, as for snakemake")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tamperlab-bench-"))
    total_s = None
    if not args.no_run:
        bin_dir = Path(sys.executable).parent
        # The target first: --config and --configfile take every word that follows them.
        command = [str(bin_dir / "snakemake"), "all", "-s", str(REPO / "Snakefile"),
                   "-d", str(workdir), "--config", f"cache_dir={REPO / '.cache' / 'tamperlab'}"]
        if args.configfile:
            command += ["--configfile", str(args.configfile.resolve())]
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True)
        total_s = time.perf_counter() - start

    rows = []
    for path in sorted((workdir / "results").rglob("*manifest.json")):
        manifest = json.loads(path.read_text())
        timing = manifest["timing"]
        load = timing["phases_s"].get("load", 0.0)
        rows.append((manifest["step"], path.relative_to(workdir), timing["startup_s"], load, timing["wall_s"]))

    print(f"{'step':18} {'startup s':>10} {'load s':>8} {'wall s':>8}  manifest")
    for step, where, startup, load, wall in rows:
        print(f"{step:18} {startup:10.2f} {load:8.2f} {wall:8.2f}  {where}")
    jobs_wall = sum(r[4] for r in rows)
    overhead = sum(r[2] + r[3] for r in rows)
    build = next((r[4] for r in rows if r[0] == "build-organism"), None)
    print()
    by_step: dict[str, list[float]] = {}
    for step, *_, wall in rows:
        by_step.setdefault(step, []).append(wall)
    for step, walls in by_step.items():
        print(f"{step:20} {len(walls):3d} jobs, {sum(walls):7.1f} s")
    # lm-eval imports itself and loads the model inside its call: count that whole phase as an upper bound.
    lm_eval = sum(json.loads(p.read_text())["timing"]["phases_s"].get("lm_eval", 0.0)
                  for p in (workdir / "results").rglob("*manifest.json"))
    for step, label in (("harden", "defences (harden jobs)"), ("landscape-scan", "landscape scans")):
        walls = [r[4] for r in rows if r[0] == step]
        if walls:
            print(f"{label}: {len(walls)} jobs, {sum(walls):.1f} s summed")
    grid = [r for r in rows if r[0] in ("attack", "attack-grid", "evaluate-run")]
    if grid:
        grid_wall = sum(r[4] for r in grid)
        print(f"attack grid alone (attack + evaluate-run jobs, {len(grid)} jobs): {grid_wall:.1f} s, start-up "
              f"{100 * sum(r[2] + r[3] for r in grid) / grid_wall:.1f}%")
    if build is not None:
        print(f"organism build (build-organism job, wall): {build:.1f} s")
    print(f"jobs: {len(rows)}, summed job wall time {jobs_wall:.1f} s, of which start-up (imports + model loads) "
          f"{overhead:.1f} s = {100 * overhead / jobs_wall:.1f}%")
    if lm_eval:
        print(f"upper bound, counting every lm-eval call entirely as start-up: "
              f"{100 * (overhead + lm_eval) / jobs_wall:.1f}%")
    if total_s is not None:
        print(f"whole `snakemake` (rule all: tables, figures, landscape), fresh directory: {total_s:.1f} s "
              f"(Snakemake's own scheduling is the rest)")


if __name__ == "__main__":
    main()
