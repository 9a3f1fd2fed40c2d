"""An attack's settings as its job takes them: the config block attacks.<a>, less what only the workflow reads (which
defences it is run against, who generates its answers, how its grid is split into jobs), as one JSON object on the
command line (`attack --params`) and one dataclass here. Each run of its grid becomes the SFTParams it trains with;
LoRA's alpha is defaulted there (training.sft), nowhere else. Pure Python, no torch: the rules import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tamperlab import methods
from tamperlab.attacks import grid

WORKFLOW_KEYS = ("defences", "seeded_defences", "generator", "one_job")  # read by the rules, not by the job


def job_params(spec: dict[str, Any], run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an attack job takes of a validated config's attack block: the whole grid (attack-grid), or with `run`
    ({lr, rank, seed, steps} of grid.runs) that run's corner of it (attack). A benign mix's answers travel as a
    file (--benign-answers), not in its settings."""
    params = {k: v for k, v in spec.items() if k not in WORKFLOW_KEYS}
    if spec["benign_mix"]:
        params["benign_mix"] = {k: v for k, v in spec["benign_mix"].items() if k != "generator"}
    if run is not None:
        rank = [run["rank"]] if run["rank"] is not None else spec["grid"]["rank"]
        params["grid"] = {"lr": [run["lr"]], "steps": run["steps"], "rank": rank}
        params["seed"] = run["seed"]
        params.pop("seeds", None)
    return params


@dataclass
class AttackSpec:
    method: str  # a registered attack (tamperlab.methods)
    grid: dict[str, list]  # {lr: [...], steps: [...], rank: [...]}
    split: str
    response: str
    family: str | None
    benign_mix: dict[str, Any] | None
    batch_size: int
    lora_alpha: float | None
    target_modules: list[str]
    scheduler: str
    warmup_ratio: float
    max_length: int
    checkpoint_every: int
    seed: int
    seeds: list[int] | None = None

    def __post_init__(self) -> None:
        self.adapter = methods.get("attack", self.method, "--params method").adapter
        self.grid = {**self.grid, "lr": [float(lr) for lr in self.grid["lr"]]}  # as the command line read them

    def runs(self) -> dict[str, dict[str, Any]]:
        """{run: {lr, rank, seed, steps}} of its grid (grid.runs names them)."""
        lrs, steps, ranks, scheduler, seeds = grid.attack_grid(vars(self))
        return grid.runs(lrs, sorted(set(steps)), ranks, scheduler, seeds)

    def run_params(self, run: dict[str, Any]):
        """The SFTParams of one run: rank, alpha and target modules for a LoRA adapter only."""
        from tamperlab.training.sft import SFTParams

        return SFTParams(method=self.method, lr=run["lr"], steps=run["steps"],
                         rank=run["rank"] if self.adapter else None,
                         lora_alpha=self.lora_alpha if self.adapter else None,
                         target_modules=list(self.target_modules) if self.adapter else [],
                         batch_size=self.batch_size, scheduler=self.scheduler, warmup_ratio=self.warmup_ratio,
                         max_length=self.max_length, checkpoint_every=self.checkpoint_every, seed=run["seed"])

    def first_seed(self) -> int:
        """The seed of the benign mix's draw: the grid's first."""
        return (self.seeds or [self.seed])[0]

    def largest_steps(self) -> int:
        return max(self.grid["steps"])
