"""An attack's grid: cells (lr x steps x rank, and seed where there are several) and the training runs that
produce them.

The Snakefile and the CLI both name cells and runs through these functions, so a path the workflow expects is
the path a job writes. Under a constant learning rate one run per (lr, rank) snapshots every `steps` value
exactly (tests/test_attack.py); other schedules depend on the horizon, so they get one run per cell.

The config's checks and the rules read an attack's grid, its cells and the defences it is run against (and the
defences trained under several seeds) from a validated config here too. Pure Python, no torch: every Snakemake run
imports it.

Seeds: a grid of one seed keeps the names it had before seeds were a dimension (lr1e-3_steps50_r16); with several,
every cell and run is one per seed and its name ends in _s<seed> (lr1e-3_steps50_r16_s1).
"""

from __future__ import annotations

import re
from typing import Any

from tamperlab import methods


def format_lr(lr: float) -> str:
    """3e-4 -> '3e-4', 1.5e-3 -> '1.5e-3': short, exact, readable in a path."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _suffix(rank: int | None, seed: int | None) -> str:
    return (f"_r{int(rank)}" if rank is not None else "") + (f"_s{int(seed)}" if seed is not None else "")


def cell_name(lr: float, steps: int, rank: int | None, seed: int | None = None) -> str:
    """The one name of a grid cell, in paths and tables alike: lr1e-3_steps50_r16 (no rank: full fine-tuning;
    a seed only where the grid has several: lr1e-3_steps50_r16_s1)."""
    return f"lr{format_lr(lr)}_steps{int(steps)}{_suffix(rank, seed)}"


def run_name(lr: float, rank: int | None, seed: int | None = None) -> str:
    """A constant-schedule run, which snapshots every steps value of its (lr, rank[, seed]): lr1e-3_r16."""
    return f"lr{format_lr(lr)}{_suffix(rank, seed)}"


def seeded_defence(defence: str, seed: int) -> str:
    """A defence trained under one of several seeds (defences.<d>.seeds): repnoise_s1."""
    return f"{defence}_s{int(seed)}"


def cells(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str,
          seeds: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """{cell: {run, lr, rank, steps, seed}}; ranks is [None] for full fine-tuning; seeds None: seed None (the
    attack's own seed, which the caller knows)."""
    seeds = list(seeds or [None])
    result = {}
    for seed in seeds:
        named = seed if len(seeds) > 1 else None  # one seed: today's names
        for lr in lrs:
            for rank in ranks:
                for n in steps:
                    cell = cell_name(lr, n, rank, named)
                    run = run_name(lr, rank, named) if scheduler == "constant" else cell
                    result[cell] = {"run": run, "lr": lr, "rank": rank, "steps": n, "seed": seed}
    return result


def runs(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str,
         seeds: list[int] | None = None) -> dict[str, dict[str, Any]]:
    """{run: {lr, rank, seed, steps: [sorted steps values it snapshots]}}."""
    result: dict[str, dict[str, Any]] = {}
    for cell in cells(lrs, steps, ranks, scheduler, seeds).values():
        run = result.setdefault(cell["run"], {"lr": cell["lr"], "rank": cell["rank"], "seed": cell["seed"],
                                              "steps": []})
        run["steps"] = sorted({*run["steps"], cell["steps"]})
    return result


def parse_cell(cell: str | None) -> dict[str, float | int | None]:
    """lr/steps/rank/seed from a cell name such as 'lr3e-4_steps50_r8' or 'lr3e-4_steps50_r8_s1' (empty for the
    unattacked model; seed None for a grid of one seed)."""
    values: dict[str, float | int | None] = {"lr": None, "steps": None, "rank": None, "seed": None}
    if cell:
        for key, pattern, kind in (("lr", r"lr([0-9.e+-]+?)(?:_|$)", float), ("steps", r"steps(\d+)", int),
                                   ("rank", r"_r(\d+)", int), ("seed", r"_s(\d+)$", int)):
            match = re.search(pattern, cell)
            values[key] = kind(match.group(1)) if match else None
    return values


# --- a validated config's attacks (and the defences trained under several seeds) ----------------------------


def attack_grid(spec: dict[str, Any]) -> tuple[list[float], list[int], list[int | None], str, list[int]]:
    """(lrs, steps, ranks, scheduler, seeds) of an attack's grid: ranks [None] for full fine-tuning; seeds
    [seed] unless the attack lists several."""
    ranks = spec["grid"]["rank"] if methods.get("attack", spec["method"]).adapter else [None]
    return spec["grid"]["lr"], spec["grid"]["steps"], ranks, spec["scheduler"], spec.get("seeds") or [spec["seed"]]


def attacked_defences(config: dict[str, Any], attack: str) -> list[str]:
    """The defences an attack is run against: attacks.<a>.defences, or (null) every defence."""
    return config["attacks"][attack]["defences"] or list(config["defences"])


def seeds_against(config: dict[str, Any], attack: str, defence: str) -> list[int]:
    """The seeds an attack trains against a defence: every seed of its grid, or, where attacks.<a>.seeded_defences
    names other defences, its first seed only."""
    spec = config["attacks"][attack]
    seeds = attack_grid(spec)[4]
    chosen = spec.get("seeded_defences")
    return seeds if chosen is None or defence in chosen else seeds[:1]


def attack_cells(config: dict[str, Any], attack: str) -> dict[str, dict[str, Any]]:
    """{cell: {run, lr, rank, steps}} of an attack's grid."""
    return cells(*attack_grid(config["attacks"][attack]))


def defence_seeds(config: dict[str, Any]) -> dict[str, list[str]]:
    """{defence: [its seeds' defences]} of a validated config (empty where no defence has seeds)."""
    instances: dict[str, list[str]] = {}
    for name, spec in config["defences"].items():
        if spec.get("seed_of"):
            instances.setdefault(spec["seed_of"], []).append(name)
    return instances
