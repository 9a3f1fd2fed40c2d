"""What a scan's settings name, in one place for the package, the config checks (tamperlab.config) and the rules
(workflow/rules/landscape_common.smk): the kinds of scan, the grid settings each uses, its number of points; a
scan's subjects and shards in a validated config; a scan job's settings as it takes them (`landscape-scan
--params`: ScanParams; `landscape-project --params`: Directions).

Pure Python, no torch: the Snakefile imports it through the config checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tamperlab.errors import UserError
from tamperlab.evaluation.settings import JudgeParams

KINDS = ("1d", "2d", "interpolation", "interpolation_2d")
TWO_DIRECTIONS = ("2d", "interpolation_2d")  # a plane (d1, d2): a β axis, and projections onto it
INTERPOLATION = ("interpolation", "interpolation_2d")  # along θ_target − θ: a scan with a target
NO_SYSTEM_PROMPT = "none"  # the name of the system-prompt dimension's "no system prompt" value

# The grid settings each kind uses: n and extent for a random axis, steps and extend for a path.
GRID_KEYS = {
    "1d": ("n", "extent"),
    "2d": ("n", "extent"),
    "interpolation": ("steps", "extend"),
    "interpolation_2d": ("steps", "extend", "n", "extent"),
}


def point_count(kind: str, n: int, steps: int, extend: int) -> int:
    """How many points scan.scan_points walks for these settings (without building the grid)."""
    path = steps + 2 * extend + 1
    return {"1d": n, "2d": n**2, "interpolation": path, "interpolation_2d": path * n}[kind]


def scan_subjects(config: dict[str, Any], scan: str) -> list[str]:
    """A scan's subjects: its own, or (null) landscape.subjects."""
    spec = config["landscape"]["scans"][scan]
    return spec["subjects"] if spec["subjects"] is not None else config["landscape"]["subjects"]


def scan_shards(config: dict[str, Any], scan: str) -> int:
    """A scan's jobs: its own shards, or (null) landscape.shards."""
    return config["landscape"]["scans"][scan]["shards"] or config["landscape"]["shards"]


@dataclass(kw_only=True)
class Directions:
    """How a scan moves its subject: its kind, and the seed its random directions are drawn from (one per tensor)."""

    kind: str
    seed: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"--params kind: {self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(kw_only=True)
class ScanParams(Directions, JudgeParams):
    """A scan's settings (landscape.scans.<s>, its prompts and its judge: evaluation.refusal's): every key given
    (the schema resolved the defaults), but of the grid keys only those of its kind (GRID_KEYS)."""

    split: str | None  # the split whose harmful prompts are evaluated (null: the file given as --dataset)
    limit: int | None  # the first LIMIT harmful prompts only
    system_prompt: list[str]  # none or NAME=TEXT each: a scan dimension
    anchor_every: int | str | None  # derive every k-th point from θ0 (auto: every point below fp32; null: step)
    n: int | None = None  # points per random axis, over [-extent, extent] (1d, 2d, interpolation_2d)
    extent: float | None = None
    steps: int | None = None  # interpolation: points per unit of the path
    extend: int | None = None  # interpolation: steps past both ends

    def __post_init__(self) -> None:
        Directions.__post_init__(self)
        JudgeParams.__post_init__(self)
        for key in ("n", "extent", "steps", "extend"):  # an unused grid key would be misleading
            used, given = key in GRID_KEYS[self.kind], getattr(self, key) is not None
            if used and not given:
                raise UserError(f"--params: a {self.kind} scan needs {key}")
            if given and not used:
                raise UserError(f"--params {key}: not a parameter of a {self.kind} scan")
        anchor = self.anchor_every
        if not (anchor in ("auto", None) or (type(anchor) is int and anchor >= 1)):
            raise UserError(f"--params anchor_every: expected auto, null or an integer ≥ 1, got {anchor!r}")
