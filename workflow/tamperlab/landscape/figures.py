"""The landscape's figures, readable without the CSVs: 1D curves (several subjects overlaid), 2D heatmaps with the
origin and attacked models' projections marked, interpolation curves, and VISAGE against post-attack refusal.

matplotlib's Agg backend and no Software/date metadata: the same rows give byte-identical PNGs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METADATA = {"Software": None}
ASR_LABEL = "ASR (%) = 100 − refusal %"
AXIS = {
    "1d": ("α  (θ + α·d₁, d₁ random, layer-normalised)", None),
    "2d": ("α  (along d₁)", "β  (along d₂)"),
    "interpolation": ("t  (θ + t·(θ_target − θ): 0 = subject, 1 = target)", None),
    "interpolation_2d": ("t  (0 = subject, 1 = target)", "β  (along d₂, random)"),
}
STYLES = ("-", "--", ":", "-.")


def _about(rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any] | None) -> str:
    """The evaluation behind each point, for a title: n prompts, and the judge and new tokens where known."""
    n = "/".join(str(v) for v in sorted({r["n"] for r in rows if r.get("n") is not None})) or "?"
    known = settings or {}
    extra = "".join(f", {text.format(known[key])}" for key, text in (("judge", "judge {}"),
                                                                      ("new_tokens", "{} new tokens"))
                    if known.get(key) is not None)
    return f"n = {n} prompts per point{extra}"


def _save(figure, path: Path) -> Path:
    figure.savefig(path, format="png", dpi=110, metadata=METADATA)
    plt.close(figure)
    return Path(path)


def _prompts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["system_prompt"] for r in rows))


def _curve(rows: Sequence[Mapping[str, Any]], system_prompt: str) -> tuple[list[float], list[float]]:
    group = sorted((r for r in rows if r["system_prompt"] == system_prompt), key=lambda r: r["alpha"])
    return [r["alpha"] for r in group], [r["asr"] for r in group]


def _decorate_1d(axes, kind: str) -> None:
    axes.set_xlabel(AXIS[kind][0])
    axes.set_ylabel(ASR_LABEL)
    axes.set_ylim(-3, 103)
    axes.grid(alpha=0.3)
    axes.axvline(0.0, color="grey", lw=0.8, label="the subject (origin)")
    if kind == "interpolation":
        axes.axvline(1.0, color="crimson", lw=0.8, ls="--", label="the target (t = 1)")


def _legend_below(figure, axes, columns: int) -> None:
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", fontsize=8, frameon=False, ncols=columns)


def scan_figure(rows: Sequence[Mapping[str, Any]], kind: str, subject: str, scan: str, path: Path,
                projections: Mapping[str, Any] | None = None, settings: Mapping[str, Any] | None = None) -> Path:
    """One scan of one subject: ASR curves (one line per system prompt), or a heatmap per system prompt."""
    if kind in ("1d", "interpolation"):
        figure, axes = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
        for k, prompt in enumerate(_prompts(rows)):
            axes.plot(*_curve(rows, prompt), STYLES[k % len(STYLES)], marker="o", ms=3,
                      label=f"system prompt: {prompt}")
        _decorate_1d(axes, kind)
        _legend_below(figure, axes, 2)
        target = rows[0].get("target") if rows else None
        axes.set_title(f"{subject} — {scan} ({kind}{', target ' + target if target else ''})\n"
                       f"{_about(rows, settings)}", fontsize=10)
        return _save(figure, path)
    prompts = _prompts(rows)
    width = max(4.4 * len(prompts) + 1.2, 6.4)
    figure, panels = plt.subplots(1, len(prompts), figsize=(width, 5.6), layout="constrained", squeeze=False)
    image = None
    for axes, prompt in zip(panels[0], prompts, strict=True):
        image = heatmap(axes, [r for r in rows if r["system_prompt"] == prompt], kind, projections)
        axes.set_title(f"system prompt: {prompt}", fontsize=9)
    figure.colorbar(image, ax=panels[0].tolist(), label=ASR_LABEL, shrink=0.9)
    handles, labels = panels[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", fontsize=7, frameon=False)
    target = rows[0].get("target") if rows else None
    figure.suptitle(f"{subject} — {scan} ({kind}{', target ' + target if target else ''})\n"
                    f"{_about(rows, settings)}", fontsize=10)
    return _save(figure, path)


def heatmap(axes, rows: Sequence[Mapping[str, Any]], kind: str, projections: Mapping[str, Any] | None = None):
    """ASR over a 2D grid (rows: α or t, columns: β), contours at 25/50/75 %, the origin and projections marked."""
    alphas = sorted({r["alpha"] for r in rows})
    betas = sorted({r["beta"] for r in rows})
    grid = np.full((len(alphas), len(betas)), np.nan)
    for r in rows:
        grid[alphas.index(r["alpha"]), betas.index(r["beta"])] = r["asr"]
    # x: β (columns), y: α or t (rows), so that an interpolation path runs upwards
    image = axes.pcolormesh(betas, alphas, grid, cmap="RdYlGn_r", vmin=0, vmax=100, shading="nearest")
    if len(alphas) > 1 and len(betas) > 1 and np.nanmax(grid) > np.nanmin(grid):
        lines = axes.contour(betas, alphas, grid, levels=[25, 50, 75], colors="k", linewidths=0.7)
        axes.clabel(lines, fmt="%d%%", fontsize=7)
    # the origin a large white star, each projection a smaller mark of its own shape and colour on top of it: a
    # projection often lands at the origin (random directions are nearly orthogonal to any Δ)
    axes.plot([0], [0], marker="*", ms=16, color="white", mec="k", ls="none", label="subject (origin)", zorder=3)
    if kind == "interpolation_2d":
        axes.plot([0], [1], marker="*", ms=16, color="crimson", mec="k", ls="none", label="target (t = 1)",
                  zorder=3)
    for k, (name, cell) in enumerate(sorted((projections or {}).get("cells", {}).items())):
        marker, colour = ("X", "P", "D", "s")[k % 4], ("navy", "purple", "teal", "black")[k % 4]
        # the share off the plane as stored (a fraction of ‖Δ‖, Δ = θ_cell − θ), not rounded into a percentage
        label = (f"{name} projected: (α, β) = ({cell['alpha']:.2g}, {cell['beta']:.2g});\n"
                 f"off-plane share of ‖Δ‖ = {cell['outside_plane']:.6g}")
        if cell.get("distance_d1"):
            label += f", ‖Δ‖ = {cell['distance_d1']:.3g}·‖d₁‖"
        axes.plot([cell["beta"]], [cell["alpha"]], marker=marker, ms=8, color=colour, mec="white", ls="none",
                  label=label, zorder=4)
    axes.set_xlim(betas[0] - _half(betas), betas[-1] + _half(betas))
    axes.set_ylim(alphas[0] - _half(alphas), alphas[-1] + _half(alphas))
    axes.set_xlabel(AXIS[kind][1])
    axes.set_ylabel(AXIS[kind][0])
    if kind == "2d":
        axes.set_aspect("equal")
    return image


def _half(values: Sequence[float]) -> float:
    return (values[1] - values[0]) / 2 if len(values) > 1 else 0.5


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def overlay_figure(scans: Sequence[Mapping[str, Any]], scan: str, kind: str, path: Path,
                   settings: Mapping[str, Any] | None = None) -> Path:
    """One 1D or interpolation scan across subjects: a panel per system prompt, a line per subject."""
    prompts = list(dict.fromkeys(p for s in scans for p in _prompts(s["rows"])))
    figure, panels = plt.subplots(1, len(prompts), figsize=(max(5.2 * len(prompts), 7.0), 5.0), layout="constrained",
                                  squeeze=False, sharey=True)
    for axes, prompt in zip(panels[0], prompts, strict=True):
        for k, item in enumerate(scans):
            x, y = _curve(item["rows"], prompt)
            if x:
                axes.plot(x, y, STYLES[(k // 10) % len(STYLES)], marker="o", ms=3, color=f"C{k % 10}",
                          label=item["subject"])
        _decorate_1d(axes, kind)
        axes.set_title(f"system prompt: {prompt}", fontsize=9)
    _legend_below(figure, panels[0][0], min(len(scans) + 1 + (kind == "interpolation"), 4))
    targets = sorted({item.get("target") or "" for item in scans} - {""})
    to = f", each subject to its {', '.join(targets)}" if targets else ""
    every_row = [r for item in scans for r in item["rows"]]
    figure.suptitle(f"{scan} ({kind}{to}) across subjects\n{_about(every_row, settings)}", fontsize=10)
    return _save(figure, path)


def worst_by_attack(summary) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(model, defence, attack): (utility-bounded worst refusal rate, plain worst)} from refusal_summary's rows; a
    triple without a bounded cell (every cell of that attack broke the model) is left out."""
    found: dict[tuple[str, str, str], tuple[float, float]] = {}
    for row in summary.dropna(subset=["attack", "bounded_worst_refusal_rate"]).itertuples(index=False):
        found[row.model, row.defence, row.attack] = (float(row.bounded_worst_refusal_rate),
                                                     float(row.worst_refusal_rate))
    return dict(sorted(found.items()))


def name_columns(axes, xs: Sequence[float], names: Sequence[str]) -> list:
    """Each subject's name once, at the top of its x (every point straight below is that subject under some attack).
    Subjects whose labels would touch share one label, centred on them: no two labels overlap. Call after the
    layout is done (figure.canvas.draw()); the labels stay out of the layout."""
    renderer = axes.figure.canvas.get_renderer()

    def label(members: list[tuple[float, str]]):
        x = sum(m[0] for m in members) / len(members)
        text = axes.text(x, 0.985, "\n".join(dict.fromkeys(m[1] for m in members)), ha="center", va="top",
                         fontsize=7, transform=axes.get_xaxis_transform(), linespacing=1.1,
                         bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
        text.set_in_layout(False)
        return text, text.get_window_extent(renderer).expanded(1.04, 1.0)

    placed: list[tuple[list[tuple[float, str]], Any, Any]] = []  # (members, text, box), left to right
    for member in sorted(zip(xs, names, strict=True)):
        members = [member]
        text, box = label(members)
        while placed and box.overlaps(placed[-1][2]):  # too close to the label on its left: merge into it
            text.remove()
            previous, old, _ = placed.pop()
            old.remove()
            members = previous + members
            text, box = label(members)
        placed.append((members, text, box))
    for members, _, _ in placed:
        for x in dict.fromkeys(m[0] for m in members):
            axes.axvline(x, color="grey", lw=0.5, alpha=0.35, zorder=1)
    return [text for _, text, _ in placed]


VISAGE_COLUMNS = (("visage_official_1d", "VISAGE, official 1D (higher = safer basin)"),
                  ("basin_width", "basin width in α (ASR within tolerance of ASR(0))"))
MARKERS = "osD^v"  # one per scan


def visage_refusal_figure(table, refusal_system_prompt: str, path: Path, summary=None,
                          refusal_settings: Mapping[str, Any] | None = None) -> Path:
    """Does a safer neighbourhood predict durability? VISAGE (official 1D) and basin width of each unattacked
    subject against its worst post-attack refusal rate under each attack (colour): the utility-bounded worst
    (refusal_summary's bounded_worst_refusal_rate: among cells that kept capability, so a model broken into nonsense
    does not count as jailbroken), the plain worst case hollow beside it. One point per attack, not the lowest over
    them: an attack that breaks every defence alike would hide the ones that tell them apart. Without a summary:
    the plain worst case over every post-attack cell, one point per subject."""
    frame, ylabel = _visage_points(table, refusal_system_prompt, summary)
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained", sharey=True)
    scans = list(dict.fromkeys(frame["scan"]))
    for axes, (column, label) in zip(panels, VISAGE_COLUMNS, strict=True):
        _visage_panel(axes, frame, column, label, scans, with_plain=summary is not None)
    if scans:  # below the panels, where it covers neither points nor labels
        _legend_below(figure, panels[0], 5)
    panels[0].set_ylabel(ylabel)
    panels[0].set_ylim(-8, 135)  # the subjects' names above 100 %
    panels[0].set_yticks(range(0, 101, 20))
    if frame.empty:
        for axes in panels:
            axes.text(0.5, 0.5, "no unattacked subject with evaluated attack cells", ha="center",
                      transform=axes.transAxes, fontsize=9)
    figure.suptitle(_visage_title(refusal_system_prompt, refusal_settings), fontsize=10)
    figure.canvas.draw()  # the layout first: the names are placed in its final coordinates
    for axes, (column, _) in zip(panels, VISAGE_COLUMNS, strict=True):
        shown = frame.dropna(subset=[column]).drop_duplicates("subject")
        name_columns(axes, list(shown[column]), list(shown["subject"]))
    return _save(figure, path)


def _visage_points(table, refusal_system_prompt: str, summary=None) -> tuple[Any, str]:
    """(points, y label) of the VISAGE figure: the unattacked subjects' 1D rows under the refusal system prompt,
    one per attack with its utility-bounded worst refusal (`_y`) and plain worst (`_plain`) from the summary, or
    one per subject with the plain worst over every cell without one; in drawing order."""
    import pandas as pd

    frame = table[(table["kind"] == "1d") & table["attack"].isna()
                  & (table["system_prompt"] == refusal_system_prompt)]
    if summary is not None:
        worst = worst_by_attack(summary)
        points = [{**row, "_attack": attack, "_y": bounded, "_plain": plain}
                  for row in frame.to_dict("records")
                  for (model, defence, attack), (bounded, plain) in worst.items()
                  if (model, defence) == (row["model"], row["defence"])]
        ylabel = "worst post-attack refusal (%), utility-bounded"
    else:
        points = [{**row, "_attack": "every attack", "_y": row["worst_post_attack_refusal_rate"],
                   "_plain": row["worst_post_attack_refusal_rate"]} for row in frame.to_dict("records")]
        ylabel = "worst post-attack refusal (%), no utility bound"
    frame = pd.DataFrame(points, columns=[*frame.columns, "_attack", "_y", "_plain"]).dropna(subset=["_y"])
    return frame.sort_values(["scan", "_attack", "subject"], kind="stable"), ylabel


def _visage_panel(axes, frame, column: str, label: str, scans: list[str], with_plain: bool) -> None:
    """One panel: `column` against the worst refusal, a marker per scan and a colour per attack (the plain worst
    case hollow beside each point, `with_plain`), x limits with room for the subjects' names."""
    attacks = sorted(dict.fromkeys(frame["_attack"]))
    for k, scan in enumerate(scans):
        for a, attack in enumerate(attacks):
            part = frame[(frame["scan"] == scan) & (frame["_attack"] == attack)]
            axes.scatter(part[column], 100 * part["_y"], marker=MARKERS[k % 5], s=40, color=f"C{a}", zorder=3,
                         label=f"attack {attack}" + (f", scan {scan}" if len(scans) > 1 else ""))
            if with_plain:  # labelled once, last in the legend
                last = (k, a) == (len(scans) - 1, len(attacks) - 1)
                axes.scatter(part[column], 100 * part["_plain"], marker=MARKERS[k % 5], s=30, zorder=2,
                             facecolors="none", edgecolors="grey", label="plain worst (no bound)" if last else None)
    values = frame[column].dropna()
    low, high = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    pad = max(high - low, abs(high) * 0.1, 0.5) * 0.25  # room for the names above the outermost subjects
    axes.set_xlim(low - pad, high + pad)
    axes.set_xlabel(label)
    axes.grid(alpha=0.3)


def _visage_title(refusal_system_prompt: str, refusal_settings: Mapping[str, Any] | None) -> str:
    """The VISAGE figure's title, with the refusal evaluation behind its y axis where known."""
    about = ""
    if refusal_settings:
        known = {k: refusal_settings.get(k, "?") for k in ("n", "judge", "new_tokens")}
        about = f"\nrefusal: n = {known['n']} prompts, judge {known['judge']}, {known['new_tokens']} new tokens"
    return f"VISAGE vs post-attack refusal, by attack (system prompt: {refusal_system_prompt}){about}"


def landscape_figures(scans: Sequence[Mapping[str, Any]], table, projections: Mapping[tuple[str, str], Any],
                      directory: Path, refusal_system_prompt: str, summary=None,
                      refusal_settings: Mapping[str, Any] | None = None,
                      scan_settings: Mapping[str, Any] | None = None) -> list[Path]:
    """Every figure of the visage step: an overlay per 1D/interpolation scan, a heatmap per 2D scan and subject,
    and VISAGE against the (utility-bounded, with refusal_summary's rows in `summary`) post-attack refusal."""
    directory = Path(directory)
    written = []
    by_scan: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for item in scans:
        by_scan.setdefault((item["scan"], item["kind"]), []).append(item)
    for (scan, kind), items in sorted(by_scan.items()):
        items = sorted(items, key=lambda s: s["subject"])
        if kind in ("1d", "interpolation"):
            written.append(overlay_figure(items, scan, kind, directory / f"{slug(scan)}.png", scan_settings))
        else:
            for item in items:
                written.append(scan_figure(item["rows"], kind, item["subject"], scan,
                                           directory / f"{slug(scan)}__{slug(item['subject'])}.png",
                                           projections.get((item["subject"], scan)), scan_settings))
    written.append(visage_refusal_figure(table, refusal_system_prompt, directory / "visage_vs_refusal.png",
                                         summary, refusal_settings))
    return written
