"""An attack's grid: cells (lr x steps x rank) and the training runs that produce them.

The Snakefile and the CLI both name cells and runs through these functions, so a path the workflow expects is
the path a job writes. Under a constant learning rate one run per (lr, rank) snapshots every `steps` value
exactly (tests/test_attack.py); other schedules depend on the horizon, so they get one run per cell.
"""

from __future__ import annotations

import re
from typing import Any


def format_lr(lr: float) -> str:
    """3e-4 -> '3e-4', 1.5e-3 -> '1.5e-3': short, exact, readable in a path."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def cell_name(lr: float, steps: int, rank: int | None) -> str:
    """The one name of a grid cell, in paths and tables alike: lr1e-3_steps50_r16 (no rank: full fine-tuning)."""
    suffix = f"_r{int(rank)}" if rank is not None else ""
    return f"lr{format_lr(lr)}_steps{int(steps)}{suffix}"


def run_name(lr: float, rank: int | None) -> str:
    """A constant-schedule run, which snapshots every steps value of its (lr, rank): lr1e-3_r16."""
    suffix = f"_r{int(rank)}" if rank is not None else ""
    return f"lr{format_lr(lr)}{suffix}"


def cells(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str) -> dict[str, dict[str, Any]]:
    """{cell: {run, lr, rank, steps}}; ranks is [None] for full fine-tuning."""
    result = {}
    for lr in lrs:
        for rank in ranks:
            for n in steps:
                cell = cell_name(lr, n, rank)
                run = run_name(lr, rank) if scheduler == "constant" else cell
                result[cell] = {"run": run, "lr": lr, "rank": rank, "steps": n}
    return result


def runs(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str) -> dict[str, dict[str, Any]]:
    """{run: {lr, rank, steps: [sorted steps values it snapshots]}}."""
    result: dict[str, dict[str, Any]] = {}
    for cell in cells(lrs, steps, ranks, scheduler).values():
        run = result.setdefault(cell["run"], {"lr": cell["lr"], "rank": cell["rank"], "steps": []})
        run["steps"] = sorted({*run["steps"], cell["steps"]})
    return result


def parse_cell(cell: str | None) -> dict[str, float | int | None]:
    """lr/steps/rank from a cell name such as 'lr3e-4_steps50_r8' (empty for the unattacked model)."""
    values: dict[str, float | int | None] = {"lr": None, "steps": None, "rank": None}
    if cell:
        for key, pattern, kind in (("lr", r"lr([0-9.e+-]+?)(?:_|$)", float), ("steps", r"steps(\d+)", int),
                                   ("rank", r"_r(\d+)", int)):
            match = re.search(pattern, cell)
            values[key] = kind(match.group(1)) if match else None
    return values
