"""published.csv: the paper's numbers (config `published:`) beside ours, each matched to the row of our tables that
measures the same thing (refusal.csv, tamper_resistance.csv or visage.csv), in the paper's unit."""

from __future__ import annotations

import pandas as pd

from tamperlab.attacks.grid import parse_cell
from tamperlab.errors import UserError
from tamperlab.landscape.spec import NO_SYSTEM_PROMPT
from tamperlab.reporting.published import RATE_METRICS, published_name
from tamperlab.reporting.published import published_benchmarks as benchmarks

PUBLISHED_COLUMNS = ["table", "model", "defence", "attack", "cell", "benchmark", "system_prompt", "metric",
                     "relation", "unit", "paper", "ours", "ours_from", "source"]
# a VISAGE entry's metric: (visage.csv column, scan kind); any other visage.csv column is read as it is
VISAGE_METRICS = {"visage_1d": ("visage_official_1d", "1d"), "visage_2d": ("visage_mean", "2d")}


def published_table(published: list[dict], table: pd.DataFrame, resistance: pd.DataFrame,
                    visage: pd.DataFrame | None = None) -> pd.DataFrame:
    """The paper's numbers (config `published:`) beside ours, in the paper's unit. Ours is the matching row of
    refusal.csv (attack none: unattacked; a cell: that cell; an attack without a cell: its worst cell; attack
    null: the worst cell of every attack), of tamper_resistance.csv (pre-attack, or the attack-suite mean), or
    of visage.csv (the subject's scan of the metric's kind under the entry's system prompt). A `benchmark`
    selects the refusal rate on that source (several: pooled by n); one that the evaluation did not include
    is refused. `asr` is 1 - refusal rate and `harmfulness` the same under our judge; empty where nothing
    here matches."""
    rows = []
    for entry in published:
        ours, source = _ours(entry, table, resistance, visage)
        if ours is not None and entry["unit"] == "percent":
            ours *= 100
        paper = entry["value"]
        rows.append({**{k: entry.get(k) for k in PUBLISHED_COLUMNS}, "benchmark": "+".join(benchmarks(entry)) or None,
                     "paper": paper if not isinstance(paper, list) else f"{paper[0]}-{paper[1]}",
                     "ours": None if ours is None else round(ours, 4), "ours_from": source})
    return pd.DataFrame(rows, columns=PUBLISHED_COLUMNS)


def _rates(entry: dict, rows: pd.DataFrame) -> pd.Series:
    """Each row's refusal rate on the entry's benchmark: the pooled rate without one, else from the per-source
    columns (several sources: weighted by their n)."""
    sources = benchmarks(entry)
    if not sources:
        return rows["refusal_rate"]
    known = sorted(c.split("@", 1)[1] for c in rows.columns if c.startswith("refusal_rate@"))
    unknown = [s for s in sources if s not in known]
    if unknown:
        raise UserError(f"published entry {published_name(entry)}: benchmark {unknown[0]!r} is not a source of the "
                        f"refusal evaluation (its sources: {', '.join(known) or 'none'})")
    refused = sum(rows[f"refusal_rate@{s}"] * rows[f"n@{s}"] for s in sources)
    return refused / sum(rows[f"n@{s}"] for s in sources)


def _ours(entry: dict, table: pd.DataFrame, resistance: pd.DataFrame,
          visage: pd.DataFrame | None = None) -> tuple[float | None, str | None]:
    if entry["table"] == "visage":
        return _ours_visage(entry, visage)
    metric = entry["metric"]
    inverted = metric in ("asr", "harmfulness")
    rows = table[(table["model"] == entry["model"]) & (table["defence"] == entry["defence"])]
    if metric in RATE_METRICS:
        rows, column = rows.assign(_rate=_rates(entry, rows)), "_rate"
    elif benchmarks(entry):
        raise UserError(f"published entry {published_name(entry)}: a benchmark applies to refusal rates "
                        f"({', '.join(RATE_METRICS)}) and VISAGE only")
    else:
        column = metric
    on = f" on {'+'.join(benchmarks(entry))}" if benchmarks(entry) else ""
    if entry["table"] == "tamper_resistance":  # pre-attack, or the mean over the attack suite
        stage = "pre-attack" if entry["attack"] == "none" else "attack mean"
        if metric == "refusal_rate" and not on:
            match = resistance[(resistance["model"] == entry["model"]) & (resistance["defence"] == entry["defence"])
                               & (resistance["stage"] == stage)]
            return (float(match.iloc[0]["refusal_rate"]), f"tamper_resistance {stage}") if len(match) else (None, None)
        if column not in rows.columns:
            return None, None
        values = rows[rows["attack"] == "none"] if stage == "pre-attack" else rows[
            (rows["attack"] != "none") & (rows["status"] == "complete")]
        values = values[column].dropna()
        if values.empty:
            return None, None
        value = float(values.mean())
        return (1 - value if inverted else value), f"tamper_resistance {stage}{on}"
    if column not in rows.columns:
        return None, None
    if entry["attack"] == "none":
        rows, how = rows[rows["attack"] == "none"], "unattacked"
    else:
        rows = rows[(rows["attack"] != "none") & (rows["status"] == "complete")]
        how = "every attack"
        if entry["attack"] is not None:
            rows, how = rows[rows["attack"] == entry["attack"]], entry["attack"]
        if entry.get("cell"):
            cell = parse_cell(entry["cell"])
            same = [all(pd.isna(r[k]) if cell[k] is None else r[k] == cell[k] for k in cell)
                    for _, r in rows.iterrows()]
            rows, how = rows[same], f"{how} {entry['cell']}"
    values = rows[column].dropna()
    if values.empty:
        return None, None
    # several cells: refusal's worst case (the lowest), a capability metric's mean
    value = float(values.min() if column == "_rate" else values.mean())
    return (1 - value if inverted else value), f"refusal.csv {how}{on}"


def _ours_visage(entry: dict, visage: pd.DataFrame | None) -> tuple[float | None, str | None]:
    """A VISAGE entry from visage.csv: the subject (model/defence, or an attacked cell), the metric's column and
    scan kind, the entry's system prompt (null: no system prompt); several scans: the first by name. As a
    fraction of 100, so the caller's unit applies."""
    if visage is None or entry["attack"] is None or (entry["attack"] != "none" and not entry.get("cell")):
        return None, None
    column, kind = VISAGE_METRICS.get(entry["metric"], (entry["metric"], None))
    if column not in visage.columns:
        return None, None
    subject = f"{entry['model']}/{entry['defence']}"
    if entry["attack"] != "none":
        subject += f"/{entry['attack']}/{entry['cell']}"
    prompt = entry.get("system_prompt") or NO_SYSTEM_PROMPT
    rows = visage[(visage["subject"] == subject) & (visage["system_prompt"] == prompt)]
    if kind is not None:
        rows = rows[rows["kind"] == kind]
    rows = rows.dropna(subset=[column]).sort_values("scan", kind="stable")
    if rows.empty:
        return None, None
    row = rows.iloc[0]
    return float(row[column]) / 100, f"visage.csv {row['scan']} {prompt} {column}"
