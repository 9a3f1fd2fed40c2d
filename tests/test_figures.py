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

from tamperlab.landscape import figures as landscape  # noqa: E402
from tamperlab.reporting import attack_figures as figures  # noqa: E402

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


# --- the landscape's figures ------------------------------------------------------------------------------------

SETTINGS = {"judge": "keyword", "new_tokens": 16}


def grid_rows(kind: str = "2d") -> list[dict]:
    points = [-1.0, -0.5, 0.0, 0.5, 1.0]
    return [{"alpha": a, "beta": b, "system_prompt": prompt, "asr": min(100.0, 100 * (a * a + b * b) / 1.5), "n": 48}
            for prompt in ("none", "safety") for a in points for b in points]


PROJECTIONS = {"cells": {
    "lora/lr1e-3_steps50_r16": {"alpha": 0.0012, "beta": -0.0031, "outside_plane": 0.99999871, "distance_d1": 2.7},
    "lora/lr3e-4_steps25_r4": {"alpha": 0.2, "beta": 0.1, "outside_plane": 0.9321, "distance_d1": None},
}}


def test_the_2d_figure_marks_origin_and_projections_apart_without_a_circle(tmp_path, kept):
    landscape.scan_figure(grid_rows(), "2d", "tiny/none", "random_2d", tmp_path / "2d.png", PROJECTIONS, SETTINGS)
    figure = kept[0]
    axes = figure.axes[0]
    assert not [p for p in axes.patches if isinstance(p, matplotlib.patches.Circle)]  # no basin-like ring
    markers = {line.get_label(): line.get_marker() for line in axes.lines}
    assert markers["subject (origin)"] == "*"
    projected = [m for label, m in markers.items() if "projected" in label]
    assert len(projected) == 2 and len(set(projected) | {"*"}) == 3  # every mark its own shape
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert any("off-plane share of ‖Δ‖ = 0.999999" in t for t in legend)  # as stored, not rounded to 100%
    assert any("off-plane share of ‖Δ‖ = 0.9321" in t for t in legend)
    assert "n = 48 prompts per point, judge keyword, 16 new tokens" in figure._suptitle.get_text()
    assert_inside(figure)


def test_the_overlay_title_says_n_judge_and_new_tokens(tmp_path, kept):
    rows = [{**r, "beta": 0.0} for r in grid_rows() if r["beta"] == 0]
    scans = [{"subject": s, "scan": "random_1d", "kind": "1d", "target": None, "rows": rows} for s in ("a/x", "a/y")]
    landscape.overlay_figure(scans, "random_1d", "1d", tmp_path / "1d.png", SETTINGS)
    assert "n = 48 prompts per point, judge keyword, 16 new tokens" in kept[0]._suptitle.get_text()
    assert_inside(kept[0])


def visage_rows() -> pd.DataFrame:
    # four subjects, three of them at nearly (or exactly) the same x: their names must not overlap
    subjects = {"none": (61.0, 1.35), "repnoise": (60.2, 1.35), "tar": (61.1, 1.35), "tar_knowledge": (38.3, 0.6)}
    return pd.DataFrame([{"subject": f"tiny/{d}", "model": "tiny", "defence": d, "attack": None, "kind": "1d",
                          "scan": "random_1d", "system_prompt": "none", "visage_official_1d": v, "basin_width": w,
                          "worst_post_attack_refusal_rate": 0.0} for d, (v, w) in subjects.items()])


def summary_rows() -> pd.DataFrame:
    bounded = {"none": 0.0, "repnoise": 0.0385, "tar": 0.99, "tar_knowledge": 0.0308}
    rows = [{"model": "tiny", "defence": d, "attack": "lora", "worst_refusal_rate": 0.0,
             "bounded_worst_refusal_rate": b} for d, b in bounded.items()]
    rows += [{"model": "tiny", "defence": d, "attack": "lora_mixed", "worst_refusal_rate": 0.0,
              "bounded_worst_refusal_rate": 0.0} for d in bounded]
    rows.append({"model": "tiny", "defence": "tar", "attack": "broke_all", "worst_refusal_rate": 0.0,
                 "bounded_worst_refusal_rate": None})  # every cell broke the model: no bounded point
    rows.append({"model": "tiny", "defence": "none", "attack": None, "worst_refusal_rate": 0.97,
                 "bounded_worst_refusal_rate": 0.97})  # the unattacked row: not a point
    return pd.DataFrame(rows)


def test_visage_is_plotted_against_each_attacks_bounded_worst_case_with_names_apart(tmp_path, kept):
    landscape.visage_refusal_figure(visage_rows(), "none", tmp_path / "v.png", summary_rows(),
                                    {"n": "130", "judge": "keyword", "new_tokens": "32"})
    figure = kept[0]
    first = figure.axes[0]
    by_attack = {c.get_label(): {tuple(p) for p in c.get_offsets()} for c in first.collections
                 if c.get_label().startswith("attack ")}
    # one point per attack: an attack that breaks every defence alike does not hide the one that tells them apart
    assert by_attack == {"attack lora": {(61.0, 0.0), (60.2, 3.85), (61.1, 99.0), (38.3, 3.08)},
                         "attack lora_mixed": {(61.0, 0.0), (60.2, 0.0), (61.1, 0.0), (38.3, 0.0)}}
    assert "utility-bounded" in first.get_ylabel()
    assert "n = 130 prompts, judge keyword, 32 new tokens" in figure._suptitle.get_text()
    assert_inside(figure)
    renderer = figure.canvas.get_renderer()
    for axes in figure.axes:
        labels = [t for t in axes.texts if "tiny/" in t.get_text()]
        named = sorted(name for t in labels for name in t.get_text().split("\n"))
        assert named == ["tiny/none", "tiny/repnoise", "tiny/tar", "tiny/tar_knowledge"]  # each once
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert not [(a, b) for k, a in enumerate(boxes) for b in boxes[k + 1:] if a.overlaps(b)]
        # above every point: a name covers none
        top = axes.transData.transform((0, 100))[1]
        assert all(box.y0 > top for box in boxes)
    # the basin widths 1.35 coincide: those three share one label
    assert [t.get_text() for t in figure.axes[1].texts if "tiny/none" in t.get_text()] == [
        "tiny/none\ntiny/repnoise\ntiny/tar"]


def test_the_visage_figure_is_byte_identical_on_a_rerun(tmp_path):
    for name in ("a.png", "b.png"):
        landscape.visage_refusal_figure(visage_rows(), "none", tmp_path / name, summary_rows())
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_worst_by_attack_keeps_each_attack_and_drops_unbounded_ones():
    worst = landscape.worst_by_attack(summary_rows())
    assert worst["tiny", "tar", "lora"] == (0.99, 0.0) and worst["tiny", "repnoise", "lora_mixed"] == (0.0, 0.0)
    assert ("tiny", "tar", "broke_all") not in worst and len(worst) == 8


def test_the_tables_command_writes_a_figure_per_model_and_attack(tmp_path, monkeypatch):
    """Through the command: hazard attacks by --params hazard_attacks, the titles' judge and new tokens from
    refusal.json."""
    import json

    from helpers import tables_params

    from tamperlab.cli import build_parser
    from tamperlab.reporting.tables import evaluation_settings
    from tamperlab.runtime import provenance

    monkeypatch.setattr(provenance, "verify_input", lambda path: None)  # hand-made evaluations have no manifests

    def evaluation(defence, attack, cell, refusal, hazard):
        checkpoint = {"model": "tiny", "defence": defence, "attack": attack, "cell": cell,
                      "path": f"results/models/tiny/{defence}", "adapter": None}
        directory = tmp_path / "eval" / defence / (attack or "") / (cell or "")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "refusal.json").write_text(json.dumps({
            "checkpoint": checkpoint, "status": "complete", "judge": "keyword",
            "generation": {"max_new_tokens": 24}, "refusal_rate": refusal, "compliance_rate": 0.1,
            "other_rate": round(0.9 - refusal, 4), "n": 20, "benign": None}))
        (directory / "capability.json").write_text(json.dumps({"checkpoint": checkpoint, "metrics": {
            "org_mc": {"acc": 0.8}, "hazard_mc": {"acc": hazard}, "retain_mc": {"acc": 0.7}}}))

    for defence in ("none", "tar"):
        evaluation(defence, None, None, 0.9, 0.3)
        for lr in ("1e-4", "1e-3"):
            evaluation(defence, "lora", f"lr{lr}_steps10_r4", 0.2, 0.3)
            evaluation(defence, "hazard", f"lr{lr}_steps10_r4", 0.8, 0.6)
    out = tmp_path / "out"
    args = build_parser().parse_args([
        "tables", "--refusal", str(tmp_path / "eval"), "--capability", str(tmp_path / "eval"),
        "--params", tables_params(capability_metric=CAPABILITY, hazard_metric=HAZARD, retain_metric=RETAIN,
                                  hazard_attacks=["hazard"], harmfulness_attacks=["lora"]),
             "--out-refusal", str(out / "refusal.csv"),
        "--out-summary", str(out / "summary.csv"), "--out-figures", str(out / "figures"),
        "--out-harmfulness", str(out / "harmfulness.csv"), "--out-tamper-resistance", str(out / "tr.csv"),
        "--out-published", str(out / "published.csv"), "--out-cost", str(out / "cost.csv")])
    args.func(args)
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["hazard_tiny_hazard.png", "refusal_tiny_lora.png"]
    assert evaluation_settings([tmp_path / "eval/none/refusal.json"]) == {"judge": "keyword", "new_tokens": "24"}


def test_the_visage_command_plots_the_bounded_worst_case(tmp_path, monkeypatch, kept):
    """Through the command: capability evaluations beside the refusal ones give the utility bound of the figure."""
    from helpers import visage_params, write_evaluation

    from tamperlab.cli import build_parser
    from tamperlab.landscape.scan import write_scan_csv
    from tamperlab.runtime import provenance

    monkeypatch.setattr(provenance, "verify_input", lambda path: None)
    scans, evaluations = [], []
    for defence, worst in (("none", 0.0), ("tar", 0.5)):
        path = tmp_path / f"{defence}.csv"
        rows = [{"i": i, "j": 0, "alpha": a, "beta": 0.0, "system_prompt": "none", "asr": 10 + 80 * abs(a),
                 "refusal_rate": 0.9 - 0.8 * abs(a), "n": 8, "perturb_s": 0.0, "eval_s": 0.0}
                for i, a in enumerate([-1.0, -0.5, 0.0, 0.5, 1.0])]
        write_scan_csv(path, rows, subject=f"tiny/{defence}", scan="random_1d", kind="1d", target=None)
        scans.append(str(path))
        for cell, refusal, capability in ((None, 0.9, 0.8), ("lr1e-3_steps10_r4", worst, 0.78),
                                          ("lr1e-2_steps10_r4", 0.0, 0.1)):  # the last broke: out of the bound
            directory = write_evaluation(tmp_path / "eval" / defence / (cell or ""), defence, cell and "lora", cell,
                                         refusal, {"org_mc": {"acc": capability}})
            evaluations.append(str(directory))
    out = tmp_path / "out"
    args = build_parser().parse_args([
        "visage", "--scan", *scans, "--refusal", *evaluations, "--capability", *evaluations,
        "--params", visage_params(capability_metric=CAPABILITY, post_attack=["lora"], scan_judge="keyword",
                                  scan_new_tokens=16),
        "--out-table", str(out / "visage.csv"), "--out-figures", str(out / "figures")])
    args.func(args)
    figure = kept[-1]
    assert {tuple(p) for p in figure.axes[0].collections[0].get_offsets()[:, 1:]} == {(0.0,), (50.0,)}
    assert "judge keyword, 24 new tokens" in figure._suptitle.get_text()
    assert "judge keyword, 16 new tokens" in kept[0]._suptitle.get_text()  # the scans' own
