"""What a scan's settings name, in one place for the package, the config checks (tamperlab.config) and the rules
(workflow/rules/landscape_common.smk): the kinds of scan, the grid settings each uses, its number of points; a
scan's subjects and shards in a validated config.

Pure Python, no torch: the Snakefile imports it through the config checks.
"""

from __future__ import annotations

from typing import Any

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
