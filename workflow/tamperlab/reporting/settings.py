"""The report steps' settings as their jobs take them: the tables step's and the VISAGE step's, one JSON object on
the command line each (`--params`), resolved by the rules (workflow/rules/tables_common.smk,
landscape_common.smk) from the config; every key is given. Both carry the utility bound, so that the summary and
the landscape's figure judge a checkpoint by the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tamperlab.reporting.utility import UtilityBound
from tamperlab.runtime.params import from_params


@dataclass(kw_only=True)
class _Bounded:
    capability_metric: str | None  # task/metric of the utility bound (evaluation.capability.metric)
    utility: UtilityBound | dict[str, Any] = field(default_factory=UtilityBound)  # evaluation.utility

    def __post_init__(self) -> None:
        if isinstance(self.utility, dict):
            self.utility = from_params(UtilityBound, self.utility, "--params utility")


@dataclass(kw_only=True)
class TablesParams(_Bounded):
    """The tables step: which metrics and attacks make which table, the papers' numbers, defence seeds."""

    hazard_metric: str  # hazard-domain accuracy in the tamper-resistance table
    retain_metric: str  # retain accuracy there
    harmfulness_attacks: list[str]  # the attacks on harmful prompts: the harmfulness table's columns
    hazard_attacks: list[str]  # the attacks that re-teach a restricted domain (a family): their figure
    published: list[dict[str, Any]]  # a paper config's published numbers
    defence_seeds: dict[str, list[str]]  # {defence: the names of its seeds' defences}


@dataclass(kw_only=True)
class VisageParams(_Bounded):
    """The VISAGE step: its table's basin tolerance, and what its figures read beside the scans."""

    basin_tolerance: float  # percentage points of ASR above the origin's that still count as the basin
    post_attack: list[str]  # the attacks whose cells count as post-attack refusal (harmful-prompt ones)
    refusal_system_prompt: str  # the scans' system prompt whose ASR the figures set against post-attack refusal
    scan_judge: str | None  # the scans' judge, for the figures' titles
    scan_new_tokens: int | None  # the scans' new tokens per answer, for the titles
