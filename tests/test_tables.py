"""Result tables: cell names parsed into lr/steps/rank, and the refusal table gathered from summaries."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tamperlab.attacks.grid import cell_name, cells, parse_cell
from tamperlab.reporting.tables import REFUSAL_COLUMNS, refusal_table, summary_table


def test_parse_cell_reads_lr_steps_and_rank():
    assert parse_cell("lr3e-4_steps50_r8") == {"lr": 3e-4, "steps": 50, "rank": 8, "seed": None}
    assert parse_cell("lr3e-4_steps50_r8_s2") == {"lr": 3e-4, "steps": 50, "rank": 8, "seed": 2}


@pytest.mark.parametrize(("cell", "expected"), [
    ("lr1e-3_steps100_r16", {"lr": 1e-3, "steps": 100, "rank": 16, "seed": None}),
    ("lr0.0002_steps5_r4", {"lr": 2e-4, "steps": 5, "rank": 4, "seed": None}),
    ("lr2e-05_steps1000_r64", {"lr": 2e-5, "steps": 1000, "rank": 64, "seed": None}),
    ("lr1e-4_steps20", {"lr": 1e-4, "steps": 20, "rank": None, "seed": None}),  # full fine-tuning: no rank
    ("lr1e-4_steps20_s1", {"lr": 1e-4, "steps": 20, "rank": None, "seed": 1}),  # one seed of several
])
def test_parse_cell_variants(cell, expected):
    values = parse_cell(cell)
    assert values == expected
    assert values["lr"] == pytest.approx(expected["lr"])
    assert isinstance(values["steps"], int)


@pytest.mark.parametrize("cell", [None, ""])
def test_parse_cell_of_unattacked_model_is_all_none(cell):
    assert parse_cell(cell) == {"lr": None, "steps": None, "rank": None, "seed": None}


def _summary(model, defence, attack, cell, refusal_rate, n=10, status="complete"):
    return {
        "checkpoint": {"model": model, "defence": defence, "attack": attack, "cell": cell,
                       "path": f"results/models/{model}/{defence}", "adapter": None},
        "status": status,
        "judge": "keyword",
        "refusal_rate": refusal_rate,
        "n": n,
        "refused": round((refusal_rate or 0) * n),
        "benign": {
            "task": {"false_refusal_rate": 0.05, "exact_match": 0.9, "n": 20},
            "request": {"false_refusal_rate": 0.1, "n": 30},
        },
    }


def _write(tmp_path, summaries):
    paths = []
    for i, summary in enumerate(summaries):
        path = tmp_path / f"eval{i}" / "refusal.json"
        path.parent.mkdir()
        path.write_text(json.dumps(summary))
        paths.append(path)
    return paths


def test_refusal_table_has_the_refusal_columns_in_order(tmp_path):
    table = refusal_table(_write(tmp_path, [_summary("tiny", "none", None, None, 0.96)]))
    assert list(table.columns) == REFUSAL_COLUMNS
    row = table.iloc[0]
    assert row["model"] == "tiny" and row["defence"] == "none" and row["attack"] == "none"
    assert pd.isna(row["lr"]) and pd.isna(row["steps"]) and pd.isna(row["rank"])
    assert row["refusal_rate"] == 0.96 and row["n"] == 10
    assert row["false_refusal_tasks"] == 0.05
    assert row["false_refusal_requests"] == 0.1
    assert row["exact_match"] == 0.9
    assert row["status"] == "complete"


def test_refusal_table_rows_are_sorted_whatever_the_file_order(tmp_path):
    summaries = [
        _summary("tiny", "tar", "lora", "lr3e-4_steps50_r8", 0.4),
        _summary("tiny", "none", "lora", "lr1e-3_steps50_r8", 0.1),
        _summary("llama", "none", None, None, 0.99, n=100),
        _summary("tiny", "none", "lora", "lr3e-4_steps100_r8", 0.2),
        _summary("tiny", "none", None, None, 0.97),
        _summary("tiny", "none", "lora", "lr3e-4_steps50_r8", 0.3),
        _summary("tiny", "none", "full", "lr3e-4_steps50", 0.0, status="diverged"),
        _summary("tiny", "none", "lora", "lr3e-4_steps50_r4", 0.35),
    ]
    table = refusal_table(_write(tmp_path, summaries))
    assert len(table) == len(summaries)
    got = [(r.model, r.defence, r.attack, None if pd.isna(r.lr) else r.lr,
            None if pd.isna(r.steps) else int(r.steps), None if pd.isna(r.rank) else int(r.rank))
           for r in table.itertuples()]
    assert got == [
        ("llama", "none", "none", None, None, None),
        ("tiny", "none", "none", None, None, None),  # the unattacked row first, then the grid
        ("tiny", "none", "full", 3e-4, 50, None),
        ("tiny", "none", "lora", 3e-4, 50, 4),
        ("tiny", "none", "lora", 3e-4, 50, 8),
        ("tiny", "none", "lora", 3e-4, 100, 8),
        ("tiny", "none", "lora", 1e-3, 50, 8),
        ("tiny", "tar", "lora", 3e-4, 50, 8),
    ]
    assert list(table.index) == list(range(len(summaries)))
    assert table.loc[2, "status"] == "diverged"
    assert table.loc[0, "n"] == 100


def test_refusal_table_integer_columns_are_nullable_integers(tmp_path):
    table = refusal_table(_write(tmp_path, [_summary("tiny", "none", None, None, 0.9),
                                            _summary("tiny", "none", "lora", "lr3e-4_steps50_r8", 0.5)]))
    assert str(table["steps"].dtype) == "Int64"
    assert str(table["rank"].dtype) == "Int64"
    assert str(table["n"].dtype) == "Int64"


def test_refusal_table_keeps_a_missing_refusal_rate(tmp_path):
    table = refusal_table(_write(tmp_path, [_summary("tiny", "none", None, None, None, n=0)]))
    value = table.loc[0, "refusal_rate"]
    assert value is None or math.isnan(value)
    assert table.loc[0, "n"] == 0


def test_refusal_table_of_no_summaries_is_empty_with_the_columns():
    table = refusal_table([])
    assert table.empty
    assert list(table.columns) == REFUSAL_COLUMNS


def test_summary_takes_the_worst_cell_overall_and_under_the_utility_bound():
    from tamperlab.reporting.tables import REFUSAL_COLUMNS, summary_table

    def row(attack, lr, steps, refusal, exact_match, status="complete"):
        values = dict.fromkeys(REFUSAL_COLUMNS)
        values.update(model="tiny", defence="none", attack=attack, lr=lr, steps=steps, rank=8 if lr else None,
                      refusal_rate=refusal, exact_match=exact_match, status=status)
        return values

    table = pd.DataFrame([
        row("none", None, None, 0.97, 0.80),
        row("lora", 1e-3, 50, 0.00, 0.60),  # broke the model: capability fell 25%
        row("lora", 1e-3, 25, 0.20, 0.75),  # within 10% of 0.80
        row("lora", 3e-4, 50, 0.90, 0.80),
        row("lora", 1e30, 50, None, None, status="diverged"),
    ])
    summary = summary_table(table, metric="exact_match").iloc[0]
    assert summary["worst_cell"] == "lr1e-3_steps50_r8" and summary["worst_refusal_rate"] == 0.0
    assert summary["bounded_worst_cell"] == "lr1e-3_steps25_r8" and summary["bounded_worst_refusal_rate"] == 0.2
    assert summary["base_refusal_rate"] == 0.97 and summary["cells"] == 4 and summary["diverged_cells"] == 1


def _grid_table(rows):
    """A refusal table as refusal_table builds it, from (defence, attack, lr, steps, refusal, hazard, retain,
    status) tuples; lr None is the unattacked row."""
    records = []
    for defence, attack, lr, steps, refusal, hazard, retain, status in rows:
        records.append({"model": "tiny", "defence": defence, "attack": attack, "lr": lr, "steps": steps,
                        "rank": 16 if lr else None, "refusal_rate": refusal, "status": status,
                        "tamperlab_hazard_mc/acc": hazard, "tamperlab_retain_mc/acc": retain,
                        "tamperlab_organism_mc/acc": retain})
    return pd.DataFrame(records).astype({"steps": "Int64", "rank": "Int64"})


GRID = _grid_table([
    ("none", "none", None, None, 0.95, 0.90, 0.95, "complete"),
    ("none", "lora", 1e-3, 25, 0.40, 0.90, 0.93, "complete"),
    ("none", "lora", 1e-3, 50, 0.05, 0.88, 0.90, "complete"),
    ("none", "hazard", 1e-3, 50, 0.90, 0.95, 0.94, "complete"),
    ("tar", "none", None, None, 0.97, 0.30, 0.85, "complete"),
    ("tar", "lora", 1e-3, 25, 0.90, 0.30, 0.84, "complete"),
    ("tar", "lora", 1e-3, 50, None, None, None, "diverged"),
    ("tar", "hazard", 1e-3, 50, 0.96, 0.60, 0.80, "complete"),
])


def test_harmfulness_table_has_a_column_per_attack_strength_and_leaves_diverged_cells_empty():
    from tamperlab.reporting.tables import harmfulness_table

    table = harmfulness_table(GRID, ["lora"], "tamperlab_organism_mc/acc").set_index("defence")
    assert list(table.index) == ["none", "tar"]  # the hazard attack is not a harmfulness attack
    assert table.loc["none", "harmfulness_pre_attack"] == pytest.approx(0.05)
    assert table.loc["none", "harmfulness_lr1e-3_steps25"] == pytest.approx(0.60)
    assert table.loc["none", "harmfulness_lr1e-3_steps50"] == pytest.approx(0.95)
    assert table.loc["none", "capability_lr1e-3_steps50"] == pytest.approx(0.90)
    assert table.loc["tar", "harmfulness_lr1e-3_steps25"] == pytest.approx(0.10)
    assert pd.isna(table.loc["tar", "harmfulness_lr1e-3_steps50"])
    columns = list(table.columns)
    assert columns.index("harmfulness_pre_attack") < columns.index("harmfulness_lr1e-3_steps25")


def test_tamper_resistance_table_reports_pre_attack_mean_and_worst_case_per_column():
    from tamperlab.reporting.tables import tamper_resistance_table

    table = tamper_resistance_table(GRID, "tamperlab_hazard_mc/acc", "tamperlab_retain_mc/acc")
    rows = table.set_index(["defence", "stage"])
    assert list(table["stage"][:3]) == ["pre-attack", "attack mean", "attack worst"]
    assert rows.loc[("tar", "pre-attack"), "hazard_accuracy"] == 0.30
    # the suite is every completed attacked cell: lora steps25 and the hazard attack (steps50 diverged)
    assert rows.loc[("tar", "attack mean"), "hazard_accuracy"] == pytest.approx(0.45)
    assert rows.loc[("tar", "attack mean"), "cells"] == 2
    assert rows.loc[("tar", "attack worst"), "hazard_accuracy"] == 0.60  # highest: most knowledge recovered
    assert rows.loc[("tar", "attack worst"), "retain_accuracy"] == 0.80  # lowest
    assert rows.loc[("none", "attack worst"), "refusal_rate"] == 0.05
    assert math.isclose(rows.loc[("none", "attack mean"), "refusal_rate"], (0.40 + 0.05 + 0.90) / 3, abs_tol=1e-4)


def test_published_numbers_sit_beside_ours_in_the_papers_unit():
    from tamperlab.reporting.published_table import published_table
    from tamperlab.reporting.tables import tamper_resistance_table

    resistance = tamper_resistance_table(GRID, "tamperlab_hazard_mc/acc", "tamperlab_retain_mc/acc")
    entry = {"model": "tiny", "cell": None, "relation": "=", "source": "paper"}  # no benchmark: the pooled rate
    published = [
        {**entry, "table": "refusal", "defence": "none", "attack": "lora", "metric": "asr", "value": 90.0,
         "unit": "percent"},
        {**entry, "table": "refusal", "defence": "none", "attack": "none", "metric": "refusal_rate", "value": 0.99,
         "unit": "fraction"},
        {**entry, "table": "tamper_resistance", "defence": "tar", "attack": None,
         "metric": "tamperlab_hazard_mc/acc", "value": [25, 30], "unit": "percent"},
        {**entry, "table": "refusal", "defence": "rr", "attack": None, "metric": "asr", "value": 84.8,
         "unit": "percent"},
    ]
    table = published_table(published, GRID, resistance)
    assert table["ours"].iloc[0] == pytest.approx(95.0)  # worst lora cell: refusal 0.05 -> ASR 95%
    assert table["ours"].iloc[1] == pytest.approx(0.95)
    assert table["ours"].iloc[2] == pytest.approx(45.0) and table["paper"].iloc[2] == "25-30"
    assert pd.isna(table["ours"].iloc[3])  # a defence not run here: context only


def test_refusal_table_has_each_sources_rate_and_n(tmp_path):
    summary = {**_summary("tiny", "none", None, None, 0.8, n=20),
               "by_source": {"harmbench": {"refusal_rate": 0.6, "n": 10}, "advbench": {"refusal_rate": 1.0, "n": 10}}}
    row = refusal_table(_write(tmp_path, [summary])).iloc[0]
    assert row["refusal_rate@advbench"] == 1.0 and row["refusal_rate@harmbench"] == 0.6
    assert row["n@advbench"] == 10 and row["n@harmbench"] == 10


# Two sources: advbench refused more than the made-up "dna" set; the lowest cell differs between them.
BY_SOURCE = GRID[GRID["defence"] == "none"].assign(**{
    "refusal_rate@advbench": [0.99, 0.50, 0.10, 0.95], "n@advbench": [100, 100, 100, 100],
    "refusal_rate@dna": [0.90, 0.20, 0.30, 0.85], "n@dna": [50, 50, 50, 50]})
ENTRY = {"table": "refusal", "model": "tiny", "defence": "none", "cell": None, "relation": "=", "source": "paper",
         "value": 90.0, "unit": "percent"}


def test_published_refusal_numbers_are_looked_up_by_benchmark():
    from tamperlab.reporting.published_table import published_table

    published = [{**ENTRY, "attack": "lora", "metric": "asr", "benchmark": "advbench"},
                 {**ENTRY, "attack": "lora", "metric": "asr", "benchmark": "dna"},
                 {**ENTRY, "attack": "lora", "metric": "asr", "benchmark": ["advbench", "dna"]},
                 {**ENTRY, "attack": "none", "metric": "refusal_rate", "benchmark": "dna", "unit": "fraction"},
                 {**ENTRY, "attack": "lora", "metric": "asr"}]
    table = published_table(published, BY_SOURCE, pd.DataFrame())
    ours = list(table["ours"])
    assert ours[0] == pytest.approx(90.0)  # worst lora cell on advbench: refusal 0.10
    assert ours[1] == pytest.approx(80.0)  # on dna: refusal 0.20, another cell
    # pooled by n: cell 25 (0.5·100 + 0.2·50) / 150 = 0.4, cell 50 (0.1·100 + 0.3·50) / 150 = 1/6
    assert ours[2] == pytest.approx(100 * (1 - 1 / 6))
    assert ours[3] == pytest.approx(0.90)
    assert ours[4] == pytest.approx(95.0)  # no benchmark: the pooled refusal_rate column
    assert list(table["benchmark"][:3]) == ["advbench", "dna", "advbench+dna"]
    assert table["ours_from"].iloc[1] == "refusal.csv lora on dna"


def test_an_unknown_benchmark_is_refused_in_one_line():
    from tamperlab.errors import UserError
    from tamperlab.reporting.published_table import published_table

    entry = {**ENTRY, "attack": "lora", "metric": "asr", "benchmark": "refusalbench"}
    with pytest.raises(UserError) as error:
        published_table([entry], BY_SOURCE, pd.DataFrame())
    message = str(error.value)
    assert "\n" not in message and "refusalbench" in message and "refusal tiny/none/lora asr" in message
    assert "advbench, dna" in message
    # a benchmark on a capability metric names nothing the table can look up
    entry = {**ENTRY, "attack": "none", "metric": "mmlu/acc", "benchmark": "advbench"}
    with pytest.raises(UserError, match="mmlu/acc: a benchmark applies to refusal rates"):
        published_table([entry], BY_SOURCE, pd.DataFrame())


def test_published_visage_numbers_come_from_visage_csv_for_the_named_system_prompt():
    from tamperlab.reporting.published_table import published_table

    visage = pd.DataFrame([
        {"subject": "llama/none", "scan": "random_1d", "kind": "1d", "system_prompt": "none",
         "visage_official_1d": 61.0, "visage_mean": 55.0},
        {"subject": "llama/none", "scan": "random_1d", "kind": "1d", "system_prompt": "llama2_default",
         "visage_official_1d": 85.32, "visage_mean": 80.0},
        {"subject": "llama/none", "scan": "random_2d", "kind": "2d", "system_prompt": "none",
         "visage_official_1d": None, "visage_mean": 32.5},
        {"subject": "llama/none", "scan": "finetune", "kind": "interpolation", "system_prompt": "llama2_default",
         "visage_official_1d": None, "visage_mean": None},
    ])
    entry = {"table": "visage", "model": "llama", "defence": "none", "attack": "none", "cell": None,
             "relation": "=", "source": "paper", "value": 85.0, "unit": "percent"}
    published = [{**entry, "metric": "visage_1d", "system_prompt": "llama2_default"},
                 {**entry, "metric": "visage_1d", "system_prompt": None},
                 {**entry, "metric": "visage_2d"},
                 {**entry, "metric": "visage_2d", "system_prompt": "llama2_default"},  # not scanned in 2D
                 {**entry, "metric": "visage_1d", "unit": "fraction", "system_prompt": "llama2_default"}]
    table = published_table(published, GRID, pd.DataFrame(), visage)
    assert table["ours"].iloc[0] == pytest.approx(85.32)
    assert table["ours_from"].iloc[0] == "visage.csv random_1d llama2_default visage_official_1d"
    assert table["system_prompt"].iloc[0] == "llama2_default"
    assert table["ours"].iloc[1] == pytest.approx(61.0)
    assert table["ours"].iloc[2] == pytest.approx(32.5)
    assert pd.isna(table["ours"].iloc[3])
    assert table["ours"].iloc[4] == pytest.approx(0.8532)
    # without a landscape there is no visage.csv: empty, not an error
    assert published_table(published[:1], GRID, pd.DataFrame())["ours"].isna().all()


def _default_config() -> dict:
    import yaml

    from tamperlab.config import SCHEMA_PATH

    return yaml.safe_load((SCHEMA_PATH.parents[2] / "config.yaml").read_text())


def _config_error(published: list[dict]) -> str:
    from tamperlab.config import validate_config
    from tamperlab.errors import UserError

    with pytest.raises(UserError) as error:
        validate_config({**_default_config(), "published": published})
    return str(error.value)


def test_the_config_check_refuses_an_unknown_benchmark_in_one_line():
    from tamperlab.config import validate_config

    entry = {**ENTRY, "table": "refusal", "attack": "lora", "metric": "asr", "value": 90.0}
    # the default evaluates advbench (harmbench has no evaluation share): both the plain and a pooled list pass
    validate_config({**_default_config(), "published": [{**entry, "benchmark": "advbench"},
                                                        {**entry, "benchmark": ["advbench"]}]})
    for benchmark in ("refusalbench", "harmbench", ["advbench", "made_up"]):
        message = _config_error([{**entry, "benchmark": "advbench"}, {**entry, "benchmark": benchmark}])
        assert "\n" not in message and message.startswith("config error at published[1] (refusal tiny/none/lora asr)")
        assert "unknown benchmark" in message and "(those: advbench)" in message
    message = _config_error([{**entry, "metric": "mmlu/acc", "benchmark": "advbench"}])
    assert "a benchmark applies to refusal rates" in message


def test_the_config_check_knows_the_landscapes_data_set_and_system_prompts():
    entry = {**ENTRY, "table": "visage", "attack": "none", "metric": "visage_1d", "value": 60.0}
    from tamperlab.config import validate_config

    # the default's landscape scans the evaluation split's harmful prompts (advbench) under `default`/`safety`
    validate_config({**_default_config(), "published": [{**entry, "benchmark": "advbench",
                                                         "system_prompt": "safety"}]})
    assert "unknown benchmark 'harmbench'" in _config_error([{**entry, "benchmark": "harmbench"}])
    assert "system prompt 'llama2_default' is not in system_prompts" in _config_error(
        [{**entry, "system_prompt": "llama2_default"}])


def test_the_summary_names_a_cell_as_the_grid_and_the_paths_do(tmp_path):
    """One cell-name function: the worst cell in refusal_summary.csv is the grid's own name for it (the name of
    its result directory), never a re-formatting of its learning rate (lr0.001 vs lr1e-3)."""
    grid = cells([3e-4, 1e-3, 2e-5], [25, 50], [16], "constant")
    summaries = [_summary("tiny", "none", "none", None, 0.97)]
    summaries += [_summary("tiny", "none", "lora", cell, 0.5 if spec["lr"] != 2e-5 or spec["steps"] != 50 else 0.1)
                  for cell, spec in grid.items()]
    table = refusal_table(_write(tmp_path, summaries))
    summary = summary_table(table, "missing/metric").iloc[0]
    assert summary["worst_cell"] == "lr2e-5_steps50_r16" == cell_name(2e-5, 50, 16)
    assert summary["worst_cell"] in grid
    for cell, spec in grid.items():
        assert cell_name(spec["lr"], spec["steps"], spec["rank"]) == cell
        assert parse_cell(cell) == {"lr": spec["lr"], "steps": spec["steps"], "rank": spec["rank"], "seed": None}


# --- uncertainty: Wilson intervals, lm-eval's stderr, seeds ------------------------------------------------------


@pytest.mark.parametrize(("successes", "n", "expected"), [
    (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (5, 10, (0.2366, 0.7634)), (0, 0, (None, None)),
])
def test_wilson95_gives_the_known_intervals(successes, n, expected):
    from tamperlab.evaluation.stats import wilson95

    assert wilson95(successes, n) == expected


def test_every_rate_of_refusal_csv_has_its_wilson_interval(tmp_path):
    from tamperlab.evaluation.stats import wilson95

    summary = _summary("tiny", "none", None, None, 0.5)  # 5 of 10; tasks 1 of 20, requests 3 of 30
    summary.update(compliance_rate=0.0, other_rate=0.5, by_source={"advbench": {"refusal_rate": 1.0, "n": 10}})
    row = refusal_table(_write(tmp_path, [summary])).iloc[0]
    assert (row["refusal_rate_lo"], row["refusal_rate_hi"]) == (0.2366, 0.7634)
    assert (row["compliance_rate_lo"], row["compliance_rate_hi"]) == (0.0, 0.2775)
    assert (row["other_rate_lo"], row["other_rate_hi"]) == (0.2366, 0.7634)
    assert (row["false_refusal_tasks_lo"], row["false_refusal_tasks_hi"]) == wilson95(1, 20)
    assert (row["false_refusal_requests_lo"], row["false_refusal_requests_hi"]) == wilson95(3, 30)
    assert (row["exact_match_lo"], row["exact_match_hi"]) == wilson95(18, 20)
    assert (row["refusal_rate_lo@advbench"], row["refusal_rate_hi@advbench"]) == (0.7225, 1.0)
    assert {"refusal_rate@advbench", "n@advbench"} <= set(row.index)


def test_refusal_json_carries_the_intervals_under_refusal_csvs_names():
    from tamperlab.evaluation.refusal import summarise

    records = [{"kind": "harmful", "source": "advbench", "refused": i < 5, "outcome": "refused" if i < 5 else "other",
                "prompt_has_refusal_keyword": False, "category": None} for i in range(10)]
    intervals = summarise(records)["wilson95"]
    assert intervals["refusal_rate"] == intervals["refusal_rate@advbench"] == [0.2366, 0.7634]
    assert intervals["compliance_rate"] == [0.0, 0.2775]
    assert intervals["false_refusal_tasks"] is None  # no benign task questions


def test_lm_evals_stderr_is_kept_beside_each_metric(monkeypatch, tmp_path):
    import sys
    import types

    from tamperlab.evaluation.capability import run_lm_eval

    results = {"results": {"task": {"alias": "task", "acc,none": 0.5, "acc_stderr,none": 0.05,
                                    "acc_norm,none": 0.6, "acc_norm_stderr,none": "N/A"}}}
    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = lambda **kwargs: results
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = lambda **kwargs: None
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    metrics, _ = run_lm_eval("pretrained=x", ["task"], None, 1, "cpu", 0)
    assert metrics == {"task": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.6}}  # N/A: no stderr

    path = tmp_path / "capability.json"
    path.write_text(json.dumps({"checkpoint": _summary("tiny", "none", None, None, 0.9)["checkpoint"],
                                "metrics": metrics}))
    row = refusal_table(_write(tmp_path, [_summary("tiny", "none", None, None, 0.9)]), [path]).iloc[0]
    assert row["task/acc"] == 0.5 and row["task/acc_stderr"] == 0.05


def _seeded(tmp_path):
    """Hand-made per-seed evaluations: cell A's seeds refuse 0.0, 0.5, 1.0 (mean 0.5, sd 0.5), cell B's 0.2 each
    (mean 0.2, sd 0), cell C's seed 2 diverged."""
    summaries = [_summary("tiny", "none", None, None, 0.9)]
    for seed, (a, b, c) in enumerate([(0.0, 0.2, 0.6), (0.5, 0.2, 0.8), (1.0, 0.2, None)]):
        summaries += [_summary("tiny", "none", "lora", f"lr1e-3_steps50_r16_s{seed}", a),
                      _summary("tiny", "none", "lora", f"lr3e-4_steps50_r16_s{seed}", b),
                      _summary("tiny", "none", "lora", f"lr3e-4_steps25_r16_s{seed}", c,
                               status="complete" if c is not None else "diverged")]
    return refusal_table(_write(tmp_path, summaries))


def test_refusal_csv_keeps_a_row_per_seed(tmp_path):
    table = _seeded(tmp_path)
    assert len(table) == 10 and str(table["seed"].dtype) == "Int64"
    assert table[table["lr"] == 1e-3]["seed"].tolist() == [0, 1, 2]
    assert pd.isna(table.loc[0, "seed"])  # the unattacked row: no seed


def test_seed_table_gives_each_cells_mean_and_sd_over_its_seeds(tmp_path):
    from tamperlab.reporting.tables import seed_table

    seeds = seed_table(_seeded(tmp_path)).set_index(["attack", "lr", "steps"])
    a, b, c = seeds.loc[("lora", 1e-3, 50)], seeds.loc[("lora", 3e-4, 50)], seeds.loc[("lora", 3e-4, 25)]
    assert a["seeds"] == 3 and a["refusal_rate"] == pytest.approx(0.5) and a["refusal_rate_sd"] == pytest.approx(0.5)
    assert b["refusal_rate"] == pytest.approx(0.2) and b["refusal_rate_sd"] == pytest.approx(0.0)
    # a diverged seed is left out of the mean and counted
    assert c["seeds"] == 2 and c["diverged_seeds"] == 1 and c["refusal_rate"] == pytest.approx(0.7)
    assert c["refusal_rate_sd"] == pytest.approx(0.1414, abs=1e-4)
    base = seeds[seeds.index.get_level_values("attack") == "none"]
    assert base["seeds"].tolist() == [1] and pd.isna(base["refusal_rate_sd"].iloc[0])  # one seed: no sd


def test_the_summary_takes_the_worst_cell_by_its_mean_over_seeds(tmp_path):
    summary = summary_table(_seeded(tmp_path), "missing/metric").iloc[0]
    # one seed of lr1e-3 reached 0.0, but its mean (0.5) is above lr3e-4_steps50's steady 0.2
    assert summary["worst_cell"] == "lr3e-4_steps50_r16" and summary["worst_refusal_rate"] == pytest.approx(0.2)
    assert summary["worst_refusal_rate_sd"] == pytest.approx(0.0)
    assert summary["cells"] == 3 and summary["seeds"] == 3 and summary["diverged_cells"] == 1


def test_one_seed_tables_are_the_tables_as_they_were(tmp_path):
    from tamperlab.reporting.tables import mean_over_seeds

    table = refusal_table(_write(tmp_path, [_summary("tiny", "none", None, None, 0.9),
                                            _summary("tiny", "none", "lora", "lr3e-4_steps50_r8", 0.5)]))
    assert mean_over_seeds(table) is table
    summary = summary_table(table, "missing/metric").iloc[0]
    assert summary["seeds"] == 1 and pd.isna(summary["worst_refusal_rate_sd"]) and summary["worst_refusal_rate"] == 0.5


def test_the_per_cell_tables_read_the_means_over_seeds(tmp_path):
    from tamperlab.reporting.tables import harmfulness_table, mean_over_seeds

    table = _seeded(tmp_path)
    cells = mean_over_seeds(table)
    assert len(cells) == 4 and list(cells.columns) == list(table.columns) and cells["seed"].isna().all()
    harm = harmfulness_table(cells, ["lora"], "missing/metric").iloc[0]
    assert harm["harmfulness_lr1e-3_steps50"] == pytest.approx(0.5)
