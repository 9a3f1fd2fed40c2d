"""The figures, rendered from small hand-made tables: every text (titles, labels, annotations, legends) lies inside
its canvas, the refusal figure has a panel per defence, the hazard figure is coloured by hazard accuracy, and the
same table gives the same PNG bytes."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tamperlab import figures  # noqa: E402
from tamperlab.landscape import figures as landscape  # noqa: E402

CAPABILITY, HAZARD, RETAIN = "org_mc/acc", "hazard_mc/acc", "retain_mc/acc"


@pytest.fixture
def kept(monkeypatch):
    """The figures the functions close, kept open for inspection."""
    found = []
    monkeypatch.setattr(plt, "close", lambda figure=None: found.append(figure))
    yield found
    monkeypatch.undo()
    plt.close("all")


def _texts(figure):
    """Every visible, non-empty text of the figure: its own, each axes' titles, labels, tick labels in view,
    annotations and legends."""
    texts = list(figure.texts) + [t for legend in figure.legends for t in legend.get_texts()]
    if figure._suptitle is not None:
        texts.append(figure._suptitle)
    for axes in figure.axes:
        texts += [axes.title, axes._left_title, axes._right_title, axes.xaxis.label, axes.yaxis.label, *axes.texts]
        for axis, (low, high) in ((axes.xaxis, axes.get_xlim()), (axes.yaxis, axes.get_ylim())):
            low, high = sorted((low, high))
            texts += [t.label1 for t in axis.get_major_ticks() if low - 1e-9 <= t.get_loc() <= high + 1e-9]
        if axes.get_legend():
            texts += [*axes.get_legend().get_texts(), axes.get_legend().get_title()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def assert_inside(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    box = figure.bbox
    texts = _texts(figure)
    assert texts
    for text in texts:
        extent = text.get_window_extent(renderer)
        assert (extent.x0 >= box.x0 - 1 and extent.y0 >= box.y0 - 1 and extent.x1 <= box.x1 + 1
                and extent.y1 <= box.y1 + 1), f"{text.get_text()!r} at {extent} outside {box}"


def refusal_rows() -> pd.DataFrame:
    rows = []
    for d, defence in enumerate(["none", "repnoise", "tar"]):
        rows.append({"model": "tiny", "defence": defence, "attack": "none", "lr": np.nan, "steps": pd.NA,
                     "rank": pd.NA, "refusal_rate": 0.95, "compliance_rate": 0.0, "other_rate": 0.05, "n": 40,
                     CAPABILITY: 0.9, HAZARD: 0.8 - 0.2 * d, RETAIN: 0.9, "status": "complete"})
        for k, (lr, steps, rank) in enumerate([(1e-4, 10, 4), (1e-3, 10, 4), (1e-4, 20, 16), (1e-3, 20, 16)]):
            rows.append({"model": "tiny", "defence": defence, "attack": "lora", "lr": lr, "steps": steps, "rank": rank,
                         "refusal_rate": 0.1 * k, "compliance_rate": 0.05 * k, "other_rate": 0.9 - 0.15 * k, "n": 40,
                         CAPABILITY: 0.5 + 0.1 * k, HAZARD: 0.5, RETAIN: 0.9,
                         "status": "diverged" if (d, k) == (2, 3) else "complete"})
        for k, steps in enumerate([10, 20]):
            rows.append({"model": "tiny", "defence": defence, "attack": "hazard", "lr": 1e-3, "steps": steps,
                         "rank": 16, "refusal_rate": 0.9, "compliance_rate": 0.0, "other_rate": 0.1, "n": 40,
                         CAPABILITY: 0.9, HAZARD: 0.3 + 0.1 * d + 0.05 * k, RETAIN: 0.85, "status": "complete"})
    return pd.DataFrame(rows).astype({"steps": "Int64", "rank": "Int64"})


def render_refusal(tmp_path):
    return figures.refusal_figures(refusal_rows(), tmp_path, CAPABILITY, HAZARD, RETAIN, ["hazard"],
                                   {"judge": "keyword", "new_tokens": "32"})


def test_refusal_figure_has_a_panel_per_defence_and_readable_text(tmp_path, kept):
    written = render_refusal(tmp_path)
    assert [p.name for p in written] == ["hazard_tiny_hazard.png", "refusal_tiny_lora.png"]
    figure = kept[1]
    panels = [a for a in figure.axes if a.images]
    assert [a.get_title().splitlines()[0] for a in panels] == ["defence none", "defence repnoise", "defence tar"]
    title = figure._suptitle.get_text()
    assert "n = 40" in title and "judge keyword" in title and "32 new tokens" in title
    cell = [t.get_text() for t in panels[0].texts]
    assert "ref 0.00\ncom 0.00\nbrk 0.90\ncap 0.50" in cell  # refused, complied, broken and capability per cell
    assert "diverged" in [t.get_text() for t in panels[2].texts]
    assert_inside(figure)


def test_hazard_figure_is_coloured_by_hazard_accuracy(tmp_path, kept):
    render_refusal(tmp_path)
    figure = kept[0]
    panels = [a for a in figure.axes if a.images]
    table = refusal_rows()
    for axes, defence in zip(panels, ["none", "repnoise", "tar"], strict=True):
        expected = table[(table["defence"] == defence) & (table["attack"] == "hazard")].sort_values("steps")[HAZARD]
        assert np.allclose(np.asarray(axes.images[0].get_array()).ravel(), expected.to_numpy(float))
    assert_inside(figure)


def test_text_colour_follows_the_background():
    assert figures.text_colour((0, 0, 0, 1)) == "white" and figures.text_colour((1, 1, 0.8, 1)) == "black"
    assert figures.text_colour(plt.get_cmap("RdYlGn")(0.0)) == "white"  # dark red
    assert figures.text_colour(plt.get_cmap("RdYlGn")(0.5)) == "black"  # pale yellow


def test_the_same_table_gives_the_same_bytes(tmp_path):
    first = [p.read_bytes() for p in render_refusal(tmp_path / "a")]
    assert first == [p.read_bytes() for p in render_refusal(tmp_path / "b")]


def test_the_canvas_check_catches_a_label_outside():
    figure, axes = plt.subplots(figsize=(3, 2))
    axes.set_ylabel("a label far too long for a figure of this size, spilling off its top and bottom")
    with pytest.raises(AssertionError, match="outside"):
        assert_inside(figure)
    plt.close(figure)
