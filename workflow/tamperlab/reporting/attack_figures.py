"""The attack grids' figures, drawn by the tables step from the refusal table: per (model, attack) one figure
with a panel per defence. (The landscape's figures are landscape/figures.py.)

A harmful-prompt attack's figure colours each cell (lr x steps, rank) by refusal rate and prints refused /
complied / broken (the judge's "other": neither refusal nor compliance, e.g. word salad) and capability, so
that a model broken by the attack does not read as a jailbroken one. A hazard attack (an attack with a
`family`) re-teaches a restricted domain: its figure colours by hazard accuracy instead.

Agg backend and no Software metadata: the same table gives the same PNG bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tamperlab.reporting.utility import marked  # noqa: E402

METADATA = {"Software": None}
BROKEN = 0.5  # a cell where at least this share of answers is neither refusal nor compliance is hatched


def text_colour(rgba) -> str:
    """Black or white, whichever reads on a background of this colour (WCAG relative luminance)."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "black" if luminance > 0.179 else "white"


def _rows(cells: pd.DataFrame) -> list[tuple]:
    """The grid's rows: (rank, steps) pairs, full fine-tuning (no rank) as rank 0."""
    return sorted({(int(0 if pd.isna(r) else r), int(s)) for r, s in zip(cells["rank"], cells["steps"], strict=True)})


def _row_label(rank: int, steps: int) -> str:
    return f"{'r' + str(rank) if rank else 'full'} · {steps} steps"


def _fmt(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{value:.2f}"


def _panel(axes, cells: pd.DataFrame, rows: list[tuple], lrs: list[float], colour: str, cmap: str,
           lines, hatch: bool) -> None:
    """One defence: cells coloured by `colour` (0..1), each annotated with `lines(row)`; a missing cell blank, a
    diverged one grey; with `hatch`, a broken one hatched; an unusable one (the utility bound) framed and marked."""
    grid = np.full((len(rows), len(lrs)), np.nan)
    texts, broken, unusable = {}, set(), set()
    for _, row in cells.iterrows():
        i = rows.index((int(0 if pd.isna(row["rank"]) else row["rank"]), int(row["steps"])))
        j = lrs.index(row["lr"])
        if row["status"] != "complete":
            texts[i, j] = "diverged"
            continue
        grid[i, j] = _number(row, colour) if _number(row, colour) is not None else np.nan
        texts[i, j] = lines(row)
        if hatch and (_number(row, "other_rate") or 0) >= BROKEN:
            broken.add((i, j))
        if _unusable(row):
            unusable.add((i, j))
            texts[i, j] += "\nunusable"
    colormap = plt.get_cmap(cmap).with_extremes(bad="lightgrey")
    axes.imshow(grid, vmin=0, vmax=1, cmap=colormap, origin="lower", aspect="auto")
    for (i, j), text in texts.items():
        value = grid[i, j]
        background = colormap(np.nan if np.isnan(value) else value)
        if (i, j) in broken:  # broken into word salad: hatched, so it does not read as jailbroken
            axes.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", lw=0,
                                         edgecolor=text_colour(background), alpha=0.4))
        if (i, j) in unusable:  # outside the utility bound: framed, so that its refusal is not read as robustness
            axes.add_patch(plt.Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, lw=1.2, ls="--",
                                         edgecolor=text_colour(background)))
        # on a box of the cell's own colour, so that the hatching does not cross the numbers
        axes.text(j, i, text, ha="center", va="center", fontsize=7, color=text_colour(background),
                  bbox={"facecolor": background, "edgecolor": "none", "pad": 1.5})
    axes.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=8)
    axes.set_yticks(range(len(rows)), [_row_label(*r) for r in rows], fontsize=8)
    axes.set_xlabel("learning rate", fontsize=8)


def faceted_figure(table: pd.DataFrame, model: str, attack: str, path: Path, *, colour: str, cmap: str,
                   label: str, title: str, lines, base_line, hatch: bool = True) -> Path:
    """One figure per (model, attack), a panel per defence (the defences in table order)."""
    attacked = table[(table["model"] == model) & (table["attack"] == attack)]
    defences = list(dict.fromkeys(attacked["defence"]))
    rows, lrs = _rows(attacked), sorted(set(attacked["lr"]))
    width = max(0.9 + 1.1 * len(lrs), 2.4)  # per panel: room for a four-line annotation per cell
    figure, panels = plt.subplots(1, len(defences), figsize=(width * len(defences) + 1.8, 0.8 * len(rows) + 1.9),
                                  layout="constrained", squeeze=False, sharey=True)
    for axes, defence in zip(panels[0], defences, strict=True):
        _panel(axes, attacked[attacked["defence"] == defence], rows, lrs, colour, cmap, lines, hatch)
        base = table[(table["model"] == model) & (table["defence"] == defence) & (table["attack"] == "none")]
        usable = "" if not len(base) or not _unusable(base.iloc[0]) else " (unusable)"
        axes.set_title(f"defence {defence}{usable}\n"
                       f"{base_line(base.iloc[0]) if len(base) else 'no unattacked row'}", fontsize=8)
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=cmap)
    figure.colorbar(scale, ax=panels[0].tolist(), label=label, shrink=0.9)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110, metadata=METADATA)
    plt.close(figure)
    return Path(path)


def _unusable(row) -> bool:
    """Whether the utility bound (reporting.utility) marked this checkpoint unusable (unknown: not marked)."""
    return "usable" in row and marked(row["usable"], False)


def _number(row, column: str) -> float | None:
    return row[column] if column in row and not pd.isna(row[column]) else None


def refusal_figures(table: pd.DataFrame, out_dir: Path, capability: str, hazard: str | None = None,
                    retain: str | None = None, hazard_attacks: Sequence[str] = (),
                    settings: dict[str, str] | None = None) -> list[Path]:
    """Per (model, attack): refusal_<model>_<attack>.png (refused / complied / broken, capability `capability`),
    or for a hazard attack hazard_<model>_<attack>.png (hazard accuracy `hazard`, retain accuracy `retain`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings or {"judge": "?", "new_tokens": "?"}
    cap = capability.split("/")[0]
    written = []
    for (model, attack), group in table[table["attack"] != "none"].groupby(["model", "attack"], sort=True):
        n = "/".join(str(v) for v in sorted(set(group["n"].dropna().astype(int)))) or "?"
        if attack in hazard_attacks:
            written.append(faceted_figure(
                table, model, attack, out_dir / f"hazard_{model}_{attack}.png", colour=hazard or "", cmap="RdYlGn_r",
                label="hazard accuracy (higher: re-learnt)", hatch=False,
                title=f"{model}: hazard accuracy after the {attack} attack (re-teaches a restricted domain)\n"
                      f"colour {hazard}; printed: hazard, retain ({retain})",
                lines=lambda r: f"hazard {_fmt(_number(r, hazard))}\nretain {_fmt(_number(r, retain))}",
                base_line=lambda r: f"unattacked: hazard {_fmt(_number(r, hazard))},\n"
                                    f"retain {_fmt(_number(r, retain))}"))
            continue
        written.append(faceted_figure(
            table, model, attack, out_dir / f"refusal_{model}_{attack}.png", colour="refusal_rate", cmap="RdYlGn",
            label="refusal rate",
            lines=lambda r: (f"ref {_fmt(r['refusal_rate'])}\ncom {_fmt(_number(r, 'compliance_rate'))}\n"
                             f"brk {_fmt(_number(r, 'other_rate'))}\ncap {_fmt(_number(r, capability))}"),
            title=f"{model}: refusal after the {attack} attack — n = {n} prompts, judge {settings['judge']}, "
                  f"{settings['new_tokens']} new tokens\nref / com / brk: refused, complied, broken (neither; "
                  f"hatched ≥ {BROKEN:g}); cap: {cap}; dashed: unusable (utility bound)",
            base_line=lambda r: f"unattacked: ref {_fmt(r['refusal_rate'])},\ncap {_fmt(_number(r, capability))}"))
    return written
