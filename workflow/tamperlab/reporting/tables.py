"""Result tables: one row per evaluated checkpoint, gathered from the evaluations' summaries."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tamperlab.attacks.grid import cell_name, parse_cell
from tamperlab.evaluation.stats import wilson95
from tamperlab.reporting.utility import UtilityBound, marked, with_usability

# The rates of refusal.csv, each a share of a count of prompts: each has a Wilson 95% interval (<rate>_lo, _hi).
RATES = ["refusal_rate", "compliance_rate", "other_rate", "false_refusal_tasks", "false_refusal_requests",
         "exact_match"]
CELL = ["model", "defence", "attack", "lr", "steps", "rank"]  # a cell; refusal.csv has a row per cell and seed
REFUSAL_COLUMNS = [
    *CELL, "seed", *(f"{r}{end}" for r in RATES[:3] for end in ("", "_lo", "_hi")), "n",
    *(f"{r}{end}" for r in RATES[3:] for end in ("", "_lo", "_hi")), "train_loss", "status",
]
SUMMARY_COLUMNS = [
    "model", "defence", "attack", "capability_metric", "base_refusal_rate", "base_capability",
    "defence_usable", "defence_unusable_because",
    "worst_cell", "worst_refusal_rate", "worst_refusal_rate_sd", "worst_capability",
    "bounded_worst_cell", "bounded_worst_refusal_rate", "bounded_worst_refusal_rate_sd", "bounded_worst_capability",
    "cells", "usable_cells", "seeds", "diverged_cells",
]


def evaluation_files(paths: list[Path], name: str) -> list[Path]:
    """The evaluation files among `paths`: a file itself, or each snapshot's `name` inside an evaluation
    directory (one run's, or a whole grid's)."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.rglob(name)) if path.is_dir() else [path]
    return files


def evaluation_settings(paths: Sequence[Path]) -> dict[str, str]:
    """{judge, new_tokens} of refusal.json files, for the figures' titles (several different values: joined by
    '/')."""
    judges, tokens = {}, {}
    for path in paths:
        summary = json.loads(Path(path).read_text())
        judges[str(summary.get("judge"))] = None
        tokens[str((summary.get("generation") or {}).get("max_new_tokens"))] = None
    return {"judge": "/".join(judges) or "?", "new_tokens": "/".join(tokens) or "?"}


def train_loss(checkpoint: dict) -> float | None:
    """The attack's training loss at the step this cell was snapshotted (from the run's loss log)."""
    snapshot = Path(checkpoint["adapter"] or checkpoint["path"])
    log = snapshot.parent / "loss_log.jsonl"
    if not checkpoint["attack"] or not log.exists():
        return None
    steps = parse_cell(checkpoint["cell"])["steps"]
    losses = {e["step"]: e["loss"] for e in map(json.loads, log.read_text().splitlines())}
    return round(losses[steps], 4) if steps in losses else None


def _key(checkpoint: dict) -> tuple:
    return checkpoint["model"], checkpoint["defence"], checkpoint["attack"], checkpoint["cell"]


def capability_columns(capabilities: list[Path]) -> dict[tuple, dict[str, float]]:
    """{checkpoint: {"task/metric": value}} from capability.json files."""
    columns = {}
    for path in capabilities:
        result = json.loads(Path(path).read_text())
        metrics = result["metrics"] or {}
        columns[_key(result["checkpoint"])] = {
            f"{task}/{metric}": value for task, values in sorted(metrics.items()) for metric, value in values.items()
        }
    return columns


def source_columns(by_source: dict) -> dict[str, float]:
    """refusal.json's per-source rates as columns: refusal_rate@<source> and n@<source> (published.csv's
    benchmarks are looked up there), and the rate's Wilson interval (refusal_rate_lo@<source>, _hi@)."""
    columns = {}
    for source, values in sorted(by_source.items()):
        columns[f"refusal_rate@{source}"], columns[f"n@{source}"] = values["refusal_rate"], values["n"]
        columns.update(_interval(f"refusal_rate{{}}@{source}", values["refusal_rate"], values["n"]))
    return columns


def probe_columns(probes: dict) -> dict[str, float]:
    """refusal.json's probes as columns, each rate with its Wilson interval and n: a harmful probe's
    refusal_rate@NAME and compliance_rate@NAME, a benign probe's false_refusal@NAME (false_refusal_lo@NAME ...)."""
    columns = {}
    for name, values in sorted(probes.items()):
        rates = ({"refusal_rate": "refusal_rate", "compliance_rate": "compliance_rate"} if values["kind"] == "harmful"
                 else {"false_refusal_rate": "false_refusal"})
        for rate, column in rates.items():
            columns[f"{column}@{name}"] = values[rate]
            columns.update(_interval(f"{column}{{}}@{name}", values[rate], values["n"]))
        columns[f"n@{name}"] = values["n"]
    return columns


def harmful_probes(table: pd.DataFrame) -> list[str]:
    """The harmful probes of refusal.csv (their refusal_rate@NAME beside compliance_rate@NAME; a source of the
    main prompts has no compliance column of its own)."""
    return sorted(c.split("@", 1)[1] for c in table.columns if c.startswith("compliance_rate@"))


def _interval(name: str, rate: float | None, n: int | None) -> dict[str, float | None]:
    """{name with _lo, name with _hi}: the Wilson 95% interval of a rate of n ('{}' in name marks where the
    suffix goes). The rates are rounded to 4 places, so rate x n gives back the count for any n under 5000."""
    bounds = wilson95(round(rate * n), n) if rate is not None and n else (None, None)
    return {name.format("_lo"): bounds[0], name.format("_hi"): bounds[1]}


def refusal_table(summaries: list[Path], capabilities: list[Path] = ()) -> pd.DataFrame:
    """One row per checkpoint: refusal evaluation, capability metrics (one column per task/metric), the refusal
    rate and n of each source of prompts (refusal_rate@<source>, n@<source>), status."""
    capability = capability_columns(list(capabilities))
    rows = []
    for path in summaries:
        summary = json.loads(Path(path).read_text())
        checkpoint = summary["checkpoint"]
        benign = summary["benign"] or {"task": {}, "request": {}}
        rows.append({
            "model": checkpoint["model"],
            "defence": checkpoint["defence"],
            "attack": checkpoint["attack"] or "none",
            **parse_cell(checkpoint["cell"]),
            "refusal_rate": summary["refusal_rate"],
            "compliance_rate": summary.get("compliance_rate"),
            "other_rate": summary.get("other_rate"),
            "n": summary["n"],
            "false_refusal_tasks": benign["task"].get("false_refusal_rate"),
            "false_refusal_requests": benign["request"].get("false_refusal_rate"),
            "exact_match": benign["task"].get("exact_match"),
            **{k: v for rate in RATES[:3] for k, v in _interval(f"{rate}{{}}", summary.get(rate),
                                                                  summary["n"]).items()},
            **_interval("false_refusal_tasks{}", benign["task"].get("false_refusal_rate"), benign["task"].get("n")),
            **_interval("false_refusal_requests{}", benign["request"].get("false_refusal_rate"),
                        benign["request"].get("n")),
            **_interval("exact_match{}", benign["task"].get("exact_match"), benign["task"].get("n")),
            "train_loss": train_loss(checkpoint),
            "status": summary["status"],
            **capability.get(_key(checkpoint), {}),
            **source_columns(summary.get("by_source") or {}),
            **probe_columns(summary.get("probes") or {}),
        })
    metric_columns = sorted({c for row in rows for c in row} - set(REFUSAL_COLUMNS))
    columns = REFUSAL_COLUMNS[:-2] + metric_columns + REFUSAL_COLUMNS[-2:]
    table = pd.DataFrame(rows, columns=columns)
    table = table.astype({"steps": "Int64", "rank": "Int64", "seed": "Int64", "n": "Int64"})
    table["_attacked"] = table["attack"] != "none"  # the unattacked row first, then the grid
    order = ["model", "defence", "_attacked", "attack", "lr", "steps", "rank", "seed"]
    table = table.sort_values(order, na_position="first", kind="stable").drop(columns="_attacked")
    return table.reset_index(drop=True)


def seed_table(table: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Per cell over its seeds (refusal_seeds.csv): how many completed (`seeds`) and diverged, status (complete
    where any seed did), and the mean and sample sd of each of `columns` over the completed seeds (default: the
    rates and the capability metrics; sd empty for one seed). A cell of one seed is its own mean."""
    if columns is None:
        columns = [c for c in table.columns if c in RATES or ("/" in c and not c.endswith("_stderr"))]
    rows = []
    for key, group in table.groupby(CELL, sort=False, dropna=False):
        done = group[group["status"] == "complete"]
        row = {**dict(zip(CELL, key, strict=True)), "seeds": len(done),
               "diverged_seeds": int((group["status"] == "diverged").sum()),
               "status": "complete" if len(done) else group["status"].iloc[0]}
        for column in columns:
            values = pd.to_numeric(done[column], errors="coerce") if column in done else pd.Series(dtype=float)
            row[column], row[f"{column}_sd"] = values.mean(), values.std()
        rows.append(row)
    names = [*CELL, "seeds", "diverged_seeds", "status", *(f"{c}{e}" for c in columns for e in ("", "_sd"))]
    return pd.DataFrame(rows, columns=names).astype({"steps": "Int64", "rank": "Int64"})


def mean_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """refusal.csv's rows, one per cell: each number the mean over the cell's completed seeds, seed empty (the
    per-cell tables and figures read this where a grid has several seeds)."""
    if "seed" not in table or table["seed"].isna().all():
        return table
    numbers = [c for c in table.columns if c not in (*CELL, "seed") and pd.api.types.is_numeric_dtype(table[c])]
    means = seed_table(table, numbers)
    return means.assign(seed=pd.NA).reindex(columns=table.columns).astype({"seed": "Int64"})


def summary_table(table: pd.DataFrame, metric: str, bound: UtilityBound | None = None) -> pd.DataFrame:
    """Per (model, defence, attack): the plain worst case (lowest refusal over the grid) and the worst case under
    the utility bound (reporting.utility: among the cells still usable against the aligned model — capability
    `metric` within 10% of its, false refusal within 10 points), and none where the defended model itself is not
    usable. With several seeds a cell's numbers are its means over the seeds that completed (the worst cell's sd
    beside it); a cell none of whose seeds completed counts as neither. defence_usable: whether the defended model,
    unattacked, is usable. diverged_cells counts diverged runs (cell x seed)."""
    bound = bound or UtilityBound()
    rows = []
    probes = harmful_probes(table)  # the same cells, asked other prompts
    columns = ["refusal_rate", *[c for c in [metric, *bound.false_refusal] if c in table],
               *(f"refusal_rate@{name}" for name in probes)]
    means = with_usability(seed_table(table, columns), metric, bound)
    means["_capability"] = means[metric] if metric in means else float("nan")
    base = means[means["attack"] == "none"].set_index(["model", "defence"])
    attacked = means[means["attack"] != "none"]
    for (model, defence, attack), cells in attacked.groupby(["model", "defence", "attack"], sort=True):
        reference = base.loc[(model, defence)] if (model, defence) in base.index else None
        finished = cells[cells["status"] == "complete"]
        runs = table[(table["model"] == model) & (table["defence"] == defence) & (table["attack"] == attack)]
        seeds = runs["seed"].nunique() if "seed" in runs else 0
        row = {"model": model, "defence": defence, "attack": attack, "capability_metric": metric,
               "cells": len(cells), "usable_cells": int(finished["usable"].fillna(False).sum()),
               "seeds": max(seeds, 1), "diverged_cells": int((runs["status"] == "diverged").sum())}
        if reference is not None:
            row.update(base_refusal_rate=reference["refusal_rate"], base_capability=reference["_capability"],
                       defence_usable=reference["usable"], defence_unusable_because=reference["unusable_because"])
        # a defence unusable before any attack has no robustness to claim: no bounded worst case
        usable = reference is not None and marked(reference["usable"], True)
        bounded = finished[finished["usable"].fillna(False).astype(bool)] if usable else finished.iloc[0:0]
        for prefix, pool in (("worst", finished), ("bounded_worst", bounded)):
            if len(pool):
                worst = pool.sort_values(["refusal_rate", "lr", "steps", "rank"], kind="stable").iloc[0]
                row.update({f"{prefix}_cell": _cell_name(worst), f"{prefix}_refusal_rate": worst["refusal_rate"],
                            f"{prefix}_refusal_rate_sd": worst["refusal_rate_sd"],
                            f"{prefix}_capability": worst["_capability"]})
        for name in probes:  # each probe's own worst cell among the same usable cells
            rate = f"refusal_rate@{name}"
            if reference is not None:
                row[f"base_refusal_rate@{name}"] = reference[rate]
            if len(bounded) and bounded[rate].notna().any():
                worst = bounded.sort_values([rate, "lr", "steps", "rank"], kind="stable").iloc[0]
                row.update({f"bounded_worst_refusal_rate@{name}": worst[rate],
                            f"bounded_worst_refusal_rate_sd@{name}": worst[f"{rate}_sd"]})
        rows.append(row)
    extra = [f"{c}@{name}" for name in probes
             for c in ("base_refusal_rate", "bounded_worst_refusal_rate", "bounded_worst_refusal_rate_sd")]
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS + extra)


DEFENCE_SEED_METRICS = ["base_refusal_rate", "base_capability", "worst_refusal_rate", "worst_capability",
                         "bounded_worst_refusal_rate", "bounded_worst_capability"]
DEFENCE_SEED_COLUMNS = ["model", "defence", "attack", "defences", "seeds", "bounded_seeds",
                        *(f"{m}{end}" for m in DEFENCE_SEED_METRICS for end in ("", "_sd")),
                        "bounded_worst_cells"]


def defence_seed_table(summary: pd.DataFrame, seeds: dict[str, list[str]]) -> pd.DataFrame:
    """Per (model, defence trained under several seeds, attack): refusal_summary.csv's worst cases as the mean and
    sample sd over the defence's seeds (`defences`: its seeds' names; `seeds`: how many have a row, `bounded_seeds`:
    how many have a cell within the utility bound), and each seed's bounded worst cell. A defence's robustness claim
    reads this: one training run of a defence is an anecdote, like one attack seed."""
    rows = []
    for defence, instances in seeds.items():
        runs = summary[summary["defence"].isin(instances)]
        for (model, attack), group in runs.groupby(["model", "attack"], sort=True):
            row = {"model": model, "defence": defence, "attack": attack, "defences": ";".join(instances),
                   "seeds": len(group), "bounded_seeds": int(group["bounded_worst_refusal_rate"].notna().sum()),
                   "bounded_worst_cells": ";".join(f"{d}:{c}" for d, c in zip(group["defence"],
                                                                               group["bounded_worst_cell"],
                                                                               strict=True) if isinstance(c, str))}
            for metric in DEFENCE_SEED_METRICS:
                values = pd.to_numeric(group[metric], errors="coerce")
                row[metric], row[f"{metric}_sd"] = values.mean(), values.std()
            rows.append(row)
    return pd.DataFrame(rows, columns=DEFENCE_SEED_COLUMNS)


def harmfulness_table(table: pd.DataFrame, attacks: list[str], metric: str) -> pd.DataFrame:
    """RepNoise's main table: per (model, defence, attack, rank) a row, per attack strength (lr, steps) a
    column of post-attack harmfulness, then the same for capability `metric`; "pre-attack" first.

    Harmfulness here is 1 - refusal rate under the configured judge (for the organism, the keyword judge);
    the paper's is a harmfulness classifier's mean P(unsafe). A diverged cell is empty."""
    capability = table[metric] if metric in table else pd.Series(float("nan"), index=table.index)
    table = table.assign(harmfulness=1 - table["refusal_rate"], _capability=capability)
    base = table[table["attack"] == "none"].set_index(["model", "defence"])
    attacked = table[table["attack"].isin(attacks)].copy()
    attacked["strength"] = [cell_name(lr, n, None) for lr, n in zip(attacked["lr"], attacked["steps"], strict=True)]
    attacked["rank"] = attacked["rank"].astype("Int64")
    strengths = list(dict.fromkeys(attacked.sort_values(["lr", "steps"], kind="stable")["strength"]))
    rows = []
    for (model, defence, attack, rank), cells in attacked.groupby(["model", "defence", "attack", "rank"],
                                                                  sort=True, dropna=False):
        by_strength = cells.set_index("strength")
        row = {"model": model, "defence": defence, "attack": attack, "rank": rank,
               "harmfulness_measure": "1 - refusal rate", "capability_metric": metric}
        for column, source in (("harmfulness", "harmfulness"), ("capability", "_capability")):
            row[f"{column}_pre_attack"] = base[source].get((model, defence))
            for strength in strengths:
                ok = strength in by_strength.index and by_strength.loc[strength, "status"] == "complete"
                row[f"{column}_{strength}"] = by_strength.loc[strength, source] if ok else None
        rows.append(row)
    return pd.DataFrame(rows)


def tamper_resistance_table(table: pd.DataFrame, hazard: str, retain: str) -> pd.DataFrame:
    """TAR's main table: per (model, defence) the pre-attack values, the mean over the attack suite (every
    completed cell of every attack) and the worst case, for hazard-domain accuracy (chance 0.25; worst =
    highest), retain accuracy (worst = lowest) and refusal rate (worst = lowest). Each column's worst case is
    its own cell."""
    columns = {"hazard_accuracy": hazard, "retain_accuracy": retain, "refusal_rate": "refusal_rate"}
    worst_is_max = {"hazard_accuracy": True, "retain_accuracy": False, "refusal_rate": False}
    values = pd.DataFrame({name: table[source] if source in table else float("nan")
                           for name, source in columns.items()})
    values[["model", "defence", "attack", "status"]] = table[["model", "defence", "attack", "status"]]
    rows = []
    for (model, defence), group in values.groupby(["model", "defence"], sort=True):
        before = group[group["attack"] == "none"]
        suite = group[(group["attack"] != "none") & (group["status"] == "complete")]
        stages = {"pre-attack": before[list(columns)].mean(), "attack mean": suite[list(columns)].mean(),
                  "attack worst": pd.Series({c: suite[c].max() if worst_is_max[c] else suite[c].min()
                                             for c in columns})}
        for stage, numbers in stages.items():
            rows.append({"model": model, "defence": defence, "stage": stage, **numbers.round(4).to_dict(),
                         "cells": len(before) if stage == "pre-attack" else len(suite)})
    return pd.DataFrame(rows, columns=["model", "defence", "stage", *columns, "cells"])


def _cell_name(row) -> str:
    return cell_name(row["lr"], row["steps"], None if pd.isna(row["rank"]) else row["rank"])
