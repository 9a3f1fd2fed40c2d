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
                projections: Mapping[str, Any] | None = None) -> Path:
    """One scan of one subject: ASR curves (one line per system prompt), or a heatmap per system prompt."""
    if kind in ("1d", "interpolation"):
        figure, axes = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
        for k, prompt in enumerate(_prompts(rows)):
            axes.plot(*_curve(rows, prompt), STYLES[k % len(STYLES)], marker="o", ms=3,
                      label=f"system prompt: {prompt}")
        _decorate_1d(axes, kind)
        _legend_below(figure, axes, 2)
        target = rows[0].get("target") if rows else None
        axes.set_title(f"{subject} — {scan} ({kind}{', target ' + target if target else ''})", fontsize=10)
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
    figure.suptitle(f"{subject} — {scan} ({kind}{', target ' + target if target else ''})", fontsize=10)
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
    axes.plot([0], [0], marker="*", ms=13, color="white", mec="k", ls="none", label="subject (origin)")
    if kind == "interpolation_2d":
        axes.plot([0], [1], marker="X", ms=10, color="white", mec="crimson", ls="none", label="target (t = 1)")
    for k, (name, cell) in enumerate(sorted((projections or {}).get("cells", {}).items())):
        marker, colour = ("X", "P", "D", "s")[k % 4], ("navy", "purple", "teal", "black")[k % 4]
        label = (f"{name}: projected at ({cell['alpha']:.2g}, {cell['beta']:.2g}),\n"
                 f"    {100 * cell['outside_plane']:.2f}% of Δ = θ_cell − θ lies off the plane")
        if cell.get("distance_d1"):
            label += f"; ‖Δ‖ = {cell['distance_d1']:.3g}·‖d₁‖ (dashed)"
            axes.add_patch(plt.Circle((0, 0), cell["distance_d1"], fill=False, ls="--", color=colour, lw=1))
        axes.plot([cell["beta"]], [cell["alpha"]], marker=marker, ms=9, color="white", mec=colour, ls="none",
                  label=label)
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


def overlay_figure(scans: Sequence[Mapping[str, Any]], scan: str, kind: str, path: Path) -> Path:
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
    figure.suptitle(f"{scan} ({kind}{to}) across subjects", fontsize=10)
    return _save(figure, path)


def visage_refusal_figure(table, refusal_system_prompt: str, path: Path) -> Path:
    """Does a safer neighbourhood predict durability? VISAGE (official 1D) and basin width of each unattacked
    subject against its worst post-attack refusal rate (the lowest over its attack grid)."""
    frame = table[(table["kind"] == "1d") & table["attack"].isna()
                  & (table["system_prompt"] == refusal_system_prompt)]
    frame = frame.dropna(subset=["worst_post_attack_refusal_rate"])
    figure, panels = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained", sharey=True)
    for axes, column, label in ((panels[0], "visage_official_1d", "VISAGE, official 1D (higher = safer basin)"),
                                (panels[1], "basin_width", "basin width in α (ASR within tolerance of ASR(0))")):
        scans = list(dict.fromkeys(frame["scan"]))
        for k, scan in enumerate(scans):
            part = frame[frame["scan"] == scan]
            axes.scatter(part[column], 100 * part["worst_post_attack_refusal_rate"], marker="osD^v"[k % 5],
                         s=40, label=f"scan {scan}", zorder=3)
            for _, row in part.iterrows():
                axes.annotate(row["subject"], (row[column], 100 * row["worst_post_attack_refusal_rate"]),
                              fontsize=7, xytext=(4, 3), textcoords="offset points")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
        if scans:
            axes.legend(fontsize=7)
    panels[0].set_ylabel("worst post-attack refusal rate (%)")
    panels[0].set_ylim(-3, 103)
    if frame.empty:
        for axes in panels:
            axes.text(0.5, 0.5, "no unattacked subject with evaluated attack cells", ha="center",
                      transform=axes.transAxes, fontsize=9)
    figure.suptitle(f"VISAGE vs post-attack refusal (system prompt: {refusal_system_prompt})", fontsize=10)
    return _save(figure, path)


def landscape_figures(scans: Sequence[Mapping[str, Any]], table, projections: Mapping[tuple[str, str], Any],
                      directory: Path, refusal_system_prompt: str) -> list[Path]:
    """Every figure of the visage step: an overlay per 1D/interpolation scan, a heatmap per 2D scan and subject,
    and VISAGE against post-attack refusal."""
    directory = Path(directory)
    written = []
    by_scan: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for item in scans:
        by_scan.setdefault((item["scan"], item["kind"]), []).append(item)
    for (scan, kind), items in sorted(by_scan.items()):
        items = sorted(items, key=lambda s: s["subject"])
        if kind in ("1d", "interpolation"):
            written.append(overlay_figure(items, scan, kind, directory / f"{slug(scan)}.png"))
        else:
            for item in items:
                written.append(scan_figure(item["rows"], kind, item["subject"], scan,
                                           directory / f"{slug(scan)}__{slug(item['subject'])}.png",
                                           projections.get((item["subject"], scan))))
    written.append(visage_refusal_figure(table, refusal_system_prompt, directory / "visage_vs_refusal.png"))
    return written
