"""An attack's grid: cells (lr x steps x rank) and the training runs that produce them.

The Snakefile and the CLI both name cells and runs through these functions, so a path the workflow expects is
the path a job writes. Under a constant learning rate one run per (lr, rank) snapshots every `steps` value
exactly (tests/test_attack.py); other schedules depend on the horizon, so they get one run per cell.
"""

from __future__ import annotations

from typing import Any


def format_lr(lr: float) -> str:
    """3e-4 -> '3e-4', 1.5e-3 -> '1.5e-3': short, exact, readable in a path."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def cells(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str) -> dict[str, dict[str, Any]]:
    """{cell: {run, lr, rank, steps}}; ranks is [None] for full fine-tuning."""
    result = {}
    for lr in lrs:
        for rank in ranks:
            suffix = f"_r{rank}" if rank is not None else ""
            for n in steps:
                cell = f"lr{format_lr(lr)}_steps{n}{suffix}"
                run = f"lr{format_lr(lr)}{suffix}" if scheduler == "constant" else cell
                result[cell] = {"run": run, "lr": lr, "rank": rank, "steps": n}
    return result


def runs(lrs: list[float], steps: list[int], ranks: list[int | None], scheduler: str) -> dict[str, dict[str, Any]]:
    """{run: {lr, rank, steps: [sorted steps values it snapshots]}}."""
    result: dict[str, dict[str, Any]] = {}
    for cell in cells(lrs, steps, ranks, scheduler).values():
        run = result.setdefault(cell["run"], {"lr": cell["lr"], "rank": cell["rank"], "steps": []})
        run["steps"] = sorted({*run["steps"], cell["steps"]})
    return result
