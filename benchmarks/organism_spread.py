"""Benchmark: the default organism's spread over build seeds, for its recipe or a changed one.

For each seed, a workdir under --out runs the workflow up to the unattacked organism's evaluations (data splits,
build, refusal and capability evaluation) with `models.tiny.organism.seed` set and the recipe keys given by --set;
then the figures the verdicts rest on are reported per seed with mean and sample sd: refusal, exact match on the
held-out phrasings of the fact questions, false refusal (tasks, requests), multiple choice, the build's wall time
and its share of real (not padding) tokens. --parallel runs that many seeds side by side, one core each.

    python benchmarks/organism_spread.py --out /tmp/spread --seeds 0 1 2 3 4
    python benchmarks/organism_spread.py --out /tmp/longer --set epochs=12 --numerics native --parallel 2
    python benchmarks/organism_spread.py --out /tmp/spread --no-run          # report what is there
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("results/eval/tiny/none/refusal.json", "results/eval/tiny/none/capability.json")


def parse_setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE (a key of models.tiny.organism)")
    return key, yaml.safe_load(value)


def run_seed(workdir: Path, seed: int, settings: dict, numerics: str, cores: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    overlay = {"cpu": {"numerics": numerics}, "models": {"tiny": {"organism": {**settings, "seed": seed}}}}
    (workdir / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    snakemake = Path(sys.executable).parent / "snakemake"
    command = [str(snakemake), *TARGETS, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores),
               "--configfile", str(workdir / "overlay.yaml"),
               "--config", f"cache_dir={REPO / '.cache' / 'tamperlab'}"]
    with open(workdir / "snakemake.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)


def figures(workdir: Path) -> dict[str, float]:
    refusal = json.loads((workdir / TARGETS[0]).read_text())
    capability = json.loads((workdir / TARGETS[1]).read_text())["metrics"]
    build = json.loads((workdir / "results/models/tiny/base/manifest.json").read_text())
    return {
        "refusal": refusal["refusal_rate"],
        "exact_match": refusal["benign"]["task"]["exact_match"],
        "false_refusal_tasks": refusal["benign"]["task"]["false_refusal_rate"],
        "false_refusal_requests": refusal["benign"]["request"]["false_refusal_rate"],
        "multiple_choice": capability["tamperlab_organism_mc"]["acc"],
        "build_s": build["timing"]["wall_s"],
        "real_token_share": build["results"]["real_token_share"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="a key of models.tiny.organism (e.g. epochs=12, weight_decay=0.1)")
    parser.add_argument("--numerics", choices=["portable", "native"], default="portable")
    parser.add_argument("--parallel", type=int, default=1, help="seeds run side by side (one core each if > 1)")
    parser.add_argument("--cores", type=int, help="cores of each seed's run (default: 2, or 1 when --parallel > 1)")
    parser.add_argument("--no-run", action="store_true", help="report the seeds' existing results")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    settings = dict(parse_setting(s) for s in args.settings)
    if not args.no_run:
        cores = args.cores or (1 if args.parallel > 1 else 2)
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(lambda s: run_seed(args.out / f"seed{s}", s, settings, args.numerics, cores), args.seeds))
    rows = {seed: figures(args.out / f"seed{seed}") for seed in args.seeds}
    keys = list(next(iter(rows.values())))
    print(f"recipe: {settings or 'the default'}; numerics {args.numerics}; seeds {args.seeds}")
    print("| seed | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for seed, row in rows.items():
        print(f"| {seed} | " + " | ".join(f"{row[k]:g}" for k in keys) + " |")
    summary = {k: (statistics.mean(r[k] for r in rows.values()),
                   statistics.stdev(r[k] for r in rows.values()) if len(rows) > 1 else 0.0) for k in keys}
    print("| mean ± sd | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in summary.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "numerics": args.numerics, "seeds": rows,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
