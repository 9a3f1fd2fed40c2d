"""Seeds as a grid dimension (attacks.<a>.seeds): one seed keeps the names and paths a grid always had, several
give every cell and run an _s<seed> suffix, and each seed is its own attack run with its own --seed. The tables'
side (a row per seed, the mean and sd per cell) is in test_tables.py."""

from __future__ import annotations

import pytest
from conftest import snakemake

from tamperlab.attacks.grid import cell_name, cells, parse_cell, run_name, runs

GRID = ([3e-4, 1e-3], [25, 50], [4, 16])


@pytest.mark.parametrize("seeds", [None, [0], [7]])
def test_one_seed_keeps_the_names_the_grid_always_had(seeds):
    named = cells(*GRID, "constant", seeds)
    assert list(named) == list(cells(*GRID, "constant"))
    assert "lr1e-3_steps50_r16" in named and named["lr1e-3_steps50_r16"]["run"] == "lr1e-3_r16"
    assert list(runs(*GRID, "constant", seeds)) == ["lr3e-4_r4", "lr3e-4_r16", "lr1e-3_r4", "lr1e-3_r16"]
    assert {spec["seed"] for spec in named.values()} == {(seeds or [None])[0]}


@pytest.mark.parametrize("scheduler", ["constant", "cosine"])
def test_several_seeds_name_every_cell_and_run_once_per_seed_and_round_trip(scheduler):
    named = cells(*GRID, scheduler, [0, 1, 2])
    assert len(named) == 3 * len(cells(*GRID, scheduler))
    for cell, spec in named.items():
        assert cell == cell_name(spec["lr"], spec["steps"], spec["rank"], spec["seed"])
        assert cell.endswith(f"_s{spec['seed']}") and spec["run"].endswith(f"_s{spec['seed']}")
        assert parse_cell(cell) == {"lr": pytest.approx(spec["lr"]), "steps": spec["steps"], "rank": spec["rank"],
                                    "seed": spec["seed"]}
    grid_runs = runs(*GRID, scheduler, [0, 1, 2])
    assert len(grid_runs) == 3 * len(runs(*GRID, scheduler))
    if scheduler == "constant":  # one run per (lr, rank, seed) snapshots both steps values
        assert grid_runs["lr1e-3_r16_s2"] == {"lr": 1e-3, "rank": 16, "seed": 2, "steps": [25, 50]}
    # full fine-tuning: no rank, the seed still last
    assert cell_name(1e-4, 20, None, 1) == "lr1e-4_steps20_s1" and run_name(1e-4, None, 1) == "lr1e-4_s1"
    assert parse_cell("lr1e-4_steps20_s1") == {"lr": 1e-4, "steps": 20, "rank": None, "seed": 1}


def _commands(result) -> list[str]:
    return [line.split("Shell command: ", 1)[1] for line in (result.stdout + result.stderr).splitlines()
            if "Shell command: tamperlab " in line]


def test_dry_run_schedules_one_attack_run_per_seed_with_its_own_seed(tmp_path):
    """seeds [0, 1] on one attack of one cell (a job per run): two attack jobs, --seed 0 and --seed 1, into
    their own _s<seed> directories, each evaluated; the tables write refusal_seeds.csv."""
    (tmp_path / "seeds.yaml").write_text(
        "defences: {repnoise: null, tar: null, tar_knowledge: null}\n"
        "attacks:\n"
        "  hazard: null\n"
        "  lora_mixed: null\n"
        "  lora: {one_job: false, seeds: [0, 1], grid: {lr: [1.0e-3], steps: [25], rank: [16]}}\n"
        "landscape: {subjects: [], scans: {random_1d: null, random_2d: null, finetune: null}}\n")
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "seeds.yaml"))
    commands = _commands(result)
    attacks = sorted(c for c in commands if c.startswith("tamperlab attack "))
    assert len(attacks) == 2
    for seed, command in enumerate(attacks):
        assert f" --seed {seed} " in command and command.count("--seed") == 1
        assert f"--out results/attacks/tiny/none/lora/lr1e-3_r16_s{seed} " in command
    evaluations = sorted(c for c in commands if c.startswith("tamperlab evaluate-run "))
    assert [f"--cell-snapshot lr1e-3_steps25_r16_s{seed}=steps25" in c for seed, c in enumerate(evaluations)] == [
        True, True]
    (tables,) = [c for c in commands if c.startswith("tamperlab tables ")]
    assert "--out-seeds results/tables/refusal_seeds.csv" in tables


def test_attack_trains_one_seed_and_attack_grid_one_run_per_seed(tmp_path, monkeypatch):
    """`attack` refuses several --seed in one line; `attack-grid` plans each run under its own seed."""
    from tamperlab import provenance
    from tamperlab.cli import build_parser
    from tamperlab.commands import attack
    from tamperlab.errors import UserError

    common = ["--model", str(tmp_path), "--data", str(tmp_path), "--split", "attack", "--response", "Sure",
              "--method", "lora", "--lr", "1e-3", "--steps", "5", "--rank", "4", "--batch-size", "2",
              "--scheduler", "constant", "--warmup-ratio", "0", "--max-length", "32", "--checkpoint-every", "5",
              "--seed", "0", "--seed", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match="one --seed"):
        attack.attack(build_parser().parse_args(["attack", *common]))

    def plan(name, params, **kwargs):  # the step's recorded plan; trains nothing
        raise KeyboardInterrupt({run: spec["seed"] for run, spec in params["runs"].items()})

    monkeypatch.setattr(provenance, "Step", plan)
    with pytest.raises(KeyboardInterrupt) as stopped:
        attack.attack_grid(build_parser().parse_args(["attack-grid", *common]))
    assert stopped.value.args[0] == {"lr1e-3_r4_s0": 0, "lr1e-3_r4_s1": 1}


def test_compare_keys_refusal_rows_by_seed_and_reads_tables_from_before_seeds(tmp_path):
    import pandas as pd

    from tamperlab.compare import compare

    def run(name, rows):
        (tmp_path / name / "tables").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(tmp_path / name / "tables" / "refusal.csv", index=False)
        return tmp_path / name

    cell = {"model": "tiny", "defence": "none", "attack": "lora", "lr": 1e-3, "steps": 50, "rank": 16, "n": 100}
    seeded = run("seeded", [{**cell, "seed": s, "refusal_rate": 0.5} for s in (0, 1, 2)])
    comparison = compare(seeded, seeded)  # three rows of one cell, one per seed: no duplicate key
    assert comparison.ok and comparison.summary.iloc[0]["cells"] == 3 * 2  # n and refusal_rate of each seed
    before = run("before", [{**cell, "refusal_rate": 0.5}])  # no seed column: one seed
    assert compare(run("one_seed", [{**cell, "seed": None, "refusal_rate": 0.5}]), before).ok
