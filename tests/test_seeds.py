"""Seeds as a grid dimension (attacks.<a>.seeds): one seed keeps the names and paths a grid always had, several
give every cell and run an _s<seed> suffix, and each seed is its own attack run with its own --seed. The tables'
side (a row per seed, the mean and sd per cell) is in test_tables.py."""

from __future__ import annotations

import json
import shlex

import pytest
from helpers import snakemake, tables_params, write_evaluation

from tamperlab.attacks.grid import cell_name, cells, parse_cell, run_name, runs

GRID = ([3e-4, 1e-3], [25, 50], [4, 16])


@pytest.mark.parametrize("seeds", [None, [0], [7]])
def test_one_seed_keeps_the_names_the_grid_always_had(seeds):
    named = cells(*GRID, "constant", seeds)
    assert list(named) == list(cells(*GRID, "constant"))
    assert "lr1e-3_steps50_r16" in named and named["lr1e-3_steps50_r16"]["run"] == "lr1e-3_r16"
    assert list(runs(*GRID, "constant", seeds)) == ["lr3e-4_r4", "lr3e-4_r16", "lr1e-3_r4", "lr1e-3_r16"]
    assert {spec["seed"] for spec in named.values()} == {(seeds or [None])[0]}


@pytest.mark.parametrize("scheduler", ["constant", "cosine"])
def test_several_seeds_name_every_cell_and_run_once_per_seed_and_round_trip(scheduler):
    named = cells(*GRID, scheduler, [0, 1, 2])
    assert len(named) == 3 * len(cells(*GRID, scheduler))
    for cell, spec in named.items():
        assert cell == cell_name(spec["lr"], spec["steps"], spec["rank"], spec["seed"])
        assert cell.endswith(f"_s{spec['seed']}") and spec["run"].endswith(f"_s{spec['seed']}")
        assert parse_cell(cell) == {"lr": pytest.approx(spec["lr"]), "steps": spec["steps"], "rank": spec["rank"],
                                    "seed": spec["seed"]}
    grid_runs = runs(*GRID, scheduler, [0, 1, 2])
    assert len(grid_runs) == 3 * len(runs(*GRID, scheduler))
    if scheduler == "constant":  # one run per (lr, rank, seed) snapshots both steps values
        assert grid_runs["lr1e-3_r16_s2"] == {"lr": 1e-3, "rank": 16, "seed": 2, "steps": [25, 50]}
    # full fine-tuning: no rank, the seed still last
    assert cell_name(1e-4, 20, None, 1) == "lr1e-4_steps20_s1" and run_name(1e-4, None, 1) == "lr1e-4_s1"
    assert parse_cell("lr1e-4_steps20_s1") == {"lr": 1e-4, "steps": 20, "rank": None, "seed": 1}


def _one_cell_dry_run(tmp_path, defences: str, lora: str) -> list[str]:
    """The commands of `snakemake -n -p` on the default with these defences and `lora` attack (YAML flow
    mappings), no other attack and no landscape."""
    (tmp_path / "overlay.yaml").write_text(
        f"defences: {defences}\n"
        "attacks:\n"
        "  hazard: null\n"
        "  lora_mixed: null\n"
        f"  lora: {lora}\n"
        "landscape: {subjects: [], scans: {random_1d: null, random_2d: null, finetune: null}}\n")
    result = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "overlay.yaml"))
    return [line.split("Shell command: ", 1)[1] for line in (result.stdout + result.stderr).splitlines()
            if "Shell command: tamperlab " in line]


def test_dry_run_schedules_one_attack_run_per_seed_with_its_own_seed(tmp_path):
    """seeds [0, 1] on one attack of one cell (a job per run): two attack jobs, --seed 0 and --seed 1, into
    their own _s<seed> directories, each evaluated; the tables write refusal_seeds.csv."""
    commands = _one_cell_dry_run(tmp_path, "{repnoise: null, tar: null, tar_knowledge: null}",
                                 "{one_job: false, seeds: [0, 1], grid: {lr: [1.0e-3], steps: [25], rank: [16]}}")
    attacks = sorted(c for c in commands if c.startswith("tamperlab --numerics portable attack "))
    assert len(attacks) == 2
    for seed, command in enumerate(attacks):
        params = json.loads(shlex.split(command.split(" --params ", 1)[1])[0])
        assert params["seed"] == seed and "seeds" not in params  # the run's own seed
        assert f"--out results/attacks/tiny/none/lora/lr1e-3_r16_s{seed} " in command
    evaluations = sorted(c for c in commands if c.startswith("tamperlab --numerics portable evaluate-run "))
    assert [f"--cell-snapshot lr1e-3_steps25_r16_s{seed}=steps25" in c for seed, c in enumerate(evaluations)] == [
        True, True]
    (tables,) = [c for c in commands if c.startswith("tamperlab --numerics portable tables ")]
    assert "--out-seeds results/tables/refusal_seeds.csv" in tables


def test_attack_trains_one_seed_and_attack_grid_one_run_per_seed(tmp_path, monkeypatch):
    """`attack` refuses several --seed in one line; `attack-grid` plans each run under its own seed."""
    from tamperlab.cli import build_parser
    from tamperlab.commands import attack
    from tamperlab.errors import UserError
    from tamperlab.runtime import provenance

    params = {"method": "lora", "grid": {"lr": [1e-3], "steps": [5], "rank": [4]}, "split": "attack",
              "response": "Sure", "family": None, "benign_mix": None, "batch_size": 2, "lora_alpha": None,
              "target_modules": ["q_proj"], "scheduler": "constant", "warmup_ratio": 0, "max_length": 32,
              "checkpoint_every": 5, "seed": 0, "seeds": [0, 1]}
    common = ["--model", str(tmp_path), "--data", str(tmp_path), "--params", json.dumps(params),
              "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match="one seed"):
        attack.attack(build_parser().parse_args(["attack", *common]))

    def plan(name, params, **kwargs):  # the step's recorded plan; trains nothing
        raise KeyboardInterrupt({run: spec["seed"] for run, spec in params["runs"].items()})

    monkeypatch.setattr(provenance, "Step", plan)
    with pytest.raises(KeyboardInterrupt) as stopped:
        attack.attack_grid(build_parser().parse_args(["attack-grid", *common]))
    assert stopped.value.args[0] == {"lr1e-3_r4_s0": 0, "lr1e-3_r4_s1": 1}


def test_compare_keys_refusal_rows_by_seed_and_reads_tables_from_before_seeds(tmp_path):
    import pandas as pd

    from tamperlab.reporting.compare import compare

    def run(name, rows):
        (tmp_path / name / "tables").mkdir(parents=True)
        pd.DataFrame(rows).to_csv(tmp_path / name / "tables" / "refusal.csv", index=False)
        return tmp_path / name

    cell = {"model": "tiny", "defence": "none", "attack": "lora", "lr": 1e-3, "steps": 50, "rank": 16, "n": 100}
    seeded = run("seeded", [{**cell, "seed": s, "refusal_rate": 0.5} for s in (0, 1, 2)])
    comparison = compare(seeded, seeded)  # three rows of one cell, one per seed: no duplicate key
    assert comparison.ok and comparison.summary.iloc[0]["cells"] == 3 * 2  # n and refusal_rate of each seed
    before = run("before", [{**cell, "refusal_rate": 0.5}])  # no seed column: one seed
    assert compare(run("one_seed", [{**cell, "seed": None, "refusal_rate": 0.5}]), before).ok


# --- defence seeds (defences.<d>.seeds) ---------------------------------------------------------------------------

def _default_with(**defence_overrides) -> dict:
    import yaml
    from helpers import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for name, override in defence_overrides.items():
        config["defences"][name] = {**config["defences"][name], **override}
    return config


def test_a_defence_with_seeds_becomes_one_defence_per_seed_everywhere_it_was_named():
    from tamperlab.attacks.grid import defence_seeds
    from tamperlab.config import validate_config

    config = _default_with(repnoise={"seeds": [0, 3, 1]})
    config["attacks"]["lora_mixed"]["defences"] = ["none", "repnoise", "repnoise_s3"]  # a seed beside it: once
    resolved = validate_config(config)
    instances = ["repnoise_s0", "repnoise_s3", "repnoise_s1"]
    assert list(resolved["defences"]) == ["none", *instances, "tar", "tar_knowledge"]  # in place, seeds' order
    assert defence_seeds(resolved) == {"repnoise": instances}
    assert [resolved["defences"][d]["repnoise"]["seed"] for d in instances] == [0, 3, 1]
    assert {resolved["defences"][d]["repnoise"]["lr"] for d in instances} == {1e-4}  # the rest as configured
    assert resolved["attacks"]["lora_mixed"]["defences"] == ["none", *instances]
    assert resolved["attacks"]["lora"]["defences"] is None  # every defence, so every seed's
    subjects = resolved["landscape"]["subjects"]
    assert [s for s in subjects if "repnoise" in s] == [f"tiny/{d}" for d in instances]
    assert defence_seeds(validate_config(_default_with())) == {}  # no seeds: the config as it was


@pytest.mark.parametrize(("overrides", "message"), [
    ({"none": {"seeds": [0, 1]}}, "defences.none.seeds: only a defence trained here"),
    ({"repnoise": {"seeds": [0]}}, r"defences.repnoise.seeds: \[0\] is too short"),  # one seed: the method's seed
    ({"repnoise": {"seeds": [1, 1]}}, r"defences.repnoise.seeds: \[1, 1\] has non-unique elements"),
    ({"tar": {"seeds": [0, 1]}, "repnoise": {"method": "tar"}}, None),
])
def test_defence_seeds_that_cannot_work_are_one_error_naming_the_key(overrides, message):
    from tamperlab.config import validate_config
    from tamperlab.errors import UserError

    config = _default_with(**overrides)
    if message is None:  # a seed's name taken by another defence
        config["defences"]["tar_s1"] = {"method": "tar"}
        message = "defences.tar.seeds: 'tar_s1' is a key of defences already"
    with pytest.raises(UserError, match=message):
        validate_config(config)


def test_dry_run_hardens_each_defence_seed_under_its_seed_and_tables_take_their_means(tmp_path):
    commands = _one_cell_dry_run(tmp_path, "{tar: null, tar_knowledge: null, repnoise: {seeds: [0, 1]}}",
                                 "{grid: {lr: [1.0e-3], steps: [25], rank: [16]}}")
    hardens = sorted(c for c in commands if c.startswith("tamperlab --numerics portable harden "))
    assert len(hardens) == 2
    for seed, command in enumerate(hardens):
        assert f'"seed": {seed}' in command and f"--out results/models/tiny/repnoise_s{seed} " in command
    attacks = [c for c in commands if c.startswith("tamperlab --numerics portable attack")]
    assert sorted(c.split("--out ")[1].split()[0] for c in attacks) == [
        f"results/attacks/tiny/{d}/lora" for d in ("none", "repnoise_s0", "repnoise_s1")]
    (tables,) = [c for c in commands if c.startswith("tamperlab --numerics portable tables ")]
    assert '"defence_seeds": {"repnoise": ["repnoise_s0", "repnoise_s1"]}' in tables
    assert "--out-defence-seeds results/tables/defence_seeds.csv" in tables
    assert "--out-seeds" not in tables  # one attack seed


def test_seeded_defences_are_attacked_by_every_seed_and_the_others_by_the_first_only(tmp_path):
    commands = _one_cell_dry_run(tmp_path, "{tar: null, tar_knowledge: null, repnoise: {seeds: [0, 1]}}",
                                 "{one_job: false, seeds: [0, 1, 2], seeded_defences: [none, repnoise_s0],"
                                 " grid: {lr: [1.0e-3], steps: [25], rank: [16]}}")
    attacks = [c for c in commands if c.startswith("tamperlab --numerics portable attack")]
    assert sorted(c.split("--out ")[1].split()[0] for c in attacks) == sorted(
        [f"results/attacks/tiny/{d}/lora/lr1e-3_r16_s{s}" for d in ("none", "repnoise_s0") for s in (0, 1, 2)]
        + ["results/attacks/tiny/repnoise_s1/lora/lr1e-3_r16_s0"])
    evaluations = [c for c in commands if c.startswith("tamperlab --numerics portable evaluate-run")]
    assert len(evaluations) == 7


@pytest.mark.parametrize("lora, message", [
    ("{seeds: [0, 1], seeded_defences: [tar]}", "attacks.lora.seeded_defences: 'tar' is not a defence the attack"),
    ("{seeds: [0, 1], seeded_defences: [none], one_job: true}", "seeded_defences: needs one_job false"),
])
def test_seeded_defences_that_cannot_work_are_one_error_naming_the_key(lora, message):
    import yaml

    from tamperlab.config import validate_config
    from tamperlab.errors import UserError

    config = _default_with()
    config["attacks"]["lora"].update(yaml.safe_load(lora), defences=["none", "repnoise"])
    with pytest.raises(UserError, match=message):
        validate_config(config)


def test_the_defence_seed_table_gives_each_worst_case_as_mean_and_sd_over_the_defences_seeds():
    import pandas as pd

    from tamperlab.reporting.tables import DEFENCE_SEED_COLUMNS, defence_seed_table

    def row(defence, attack, worst, bounded, cell):
        return {"model": "tiny", "defence": defence, "attack": attack, "base_refusal_rate": 1.0,
                "base_capability": 0.5, "worst_refusal_rate": worst, "worst_capability": 0.1,
                "bounded_worst_refusal_rate": bounded, "bounded_worst_capability": None if bounded is None else 0.48,
                "bounded_worst_cell": cell}

    summary = pd.DataFrame([
        row("none", "lora", 0.0, 0.0, "lr1e-3_steps50_r16"),
        row("repnoise_s0", "lora", 0.1, 0.5, "lr1e-3_steps25_r16"),
        row("repnoise_s1", "lora", 0.3, 0.7, "lr3e-4_steps50_r4"),
        row("repnoise_s2", "lora", 0.2, None, None),  # no cell kept capability
        row("repnoise_s0", "hazard", 0.9, 0.9, "lr1e-3_steps25_r16"),
    ])
    table = defence_seed_table(summary, {"repnoise": ["repnoise_s0", "repnoise_s1", "repnoise_s2"]})
    assert list(table.columns) == DEFENCE_SEED_COLUMNS
    assert list(zip(table["attack"], table["seeds"], table["bounded_seeds"], strict=True)) == [
        ("hazard", 1, 1), ("lora", 3, 2)]
    lora = table.set_index("attack").loc["lora"]
    assert lora["defence"] == "repnoise" and lora["defences"] == "repnoise_s0;repnoise_s1;repnoise_s2"
    assert lora["worst_refusal_rate"] == pytest.approx(0.2) and lora["worst_refusal_rate_sd"] == pytest.approx(0.1)
    assert lora["bounded_worst_refusal_rate"] == pytest.approx(0.6)  # over the two seeds that have one
    assert lora["bounded_worst_refusal_rate_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert lora["bounded_worst_cells"] == "repnoise_s0:lr1e-3_steps25_r16;repnoise_s1:lr3e-4_steps50_r4"
    assert pd.isna(table.set_index("attack").loc["hazard", "worst_refusal_rate_sd"])  # one seed: no sd


def test_the_tables_command_writes_defence_seeds_csv_from_the_evaluations(tmp_path, monkeypatch, capsys):

    import pandas as pd

    from tamperlab.cli import build_parser, main
    from tamperlab.runtime import provenance

    monkeypatch.setattr(provenance, "verify_input", lambda path: None)  # hand-made evaluations have no manifests
    write_evaluation(tmp_path / "eval" / "none", "none", None, None, 0.9, {"org_mc": {"acc": 0.8}})  # the yardstick
    for defence, worst in (("repnoise_s0", 0.2), ("repnoise_s1", 0.6)):
        for attack, cell, refusal in ((None, None, 1.0), ("lora", "lr1e-3_steps25_r16", worst)):
            write_evaluation(tmp_path / "eval" / defence / (cell or ""), defence, attack, cell, refusal,
                             {"org_mc": {"acc": 0.8}})
    out = tmp_path / "out"
    flags = ["tables", "--refusal", str(tmp_path / "eval"), "--capability", str(tmp_path / "eval"),
             "--params", tables_params(defence_seeds={"repnoise": ["repnoise_s0", "repnoise_s1"]}),
             "--out-refusal", str(out / "refusal.csv"), "--out-summary", str(out / "summary.csv"),
             "--out-figures", str(out / "figures"), "--out-harmfulness", str(out / "harmfulness.csv"),
             "--out-tamper-resistance", str(out / "tr.csv"), "--out-published", str(out / "published.csv"),
             "--out-cost", str(out / "cost.csv")]
    with pytest.raises(SystemExit) as refused:  # the table without its output: refused before anything is written
        main(flags)
    assert refused.value.code == 2
    assert "--params defence_seeds and --out-defence-seeds go together" in capsys.readouterr().err
    assert not out.exists()
    args = build_parser().parse_args([*flags, "--out-defence-seeds", str(out / "defence_seeds.csv")])
    args.func(args)
    (row,) = pd.read_csv(out / "defence_seeds.csv").to_dict("records")
    assert (row["defence"], row["attack"], row["seeds"]) == ("repnoise", "lora", 2)
    assert row["bounded_worst_refusal_rate"] == pytest.approx(0.4)
    assert row["bounded_worst_refusal_rate_sd"] == pytest.approx(0.2828, abs=1e-4)


def test_a_published_number_names_one_training_of_a_defence_trained_under_several_seeds():
    from tamperlab.config import validate_config
    from tamperlab.errors import UserError

    entry = {"table": "refusal", "model": "tiny", "attack": "lora", "cell": None, "metric": "asr", "value": 90.0,
             "relation": "=", "unit": "percent", "source": "a paper, Table 1"}
    config = {**_default_with(repnoise={"seeds": [0, 1]}), "published": [{**entry, "defence": "repnoise_s1"}]}
    validate_config(config)
    with pytest.raises(UserError, match=r"^config error at published\[0\] .*defence 'repnoise' is trained under "
                                        r"several seeds .*: name one of repnoise_s0, repnoise_s1$"):
        validate_config({**config, "published": [{**entry, "defence": "repnoise"}]})
