"""Input, parameter and target functions of the landscape rules (workflow/rules/landscape.smk): every scan's
subjects, checkpoints and CLI flags. The landscape block is checked, and its `strongest` cells resolved to the
grid's cell, by tamperlab.config.validate_config before any of this runs.
"""

from types import SimpleNamespace

from tamperlab import methods
from tamperlab.landscape.spec import GRID_KEYS, NO_SYSTEM_PROMPT, TWO_DIRECTIONS, scan_shards, scan_subjects
from tamperlab.reporting.utility import ALIGNED

LANDSCAPE = config["landscape"]


def _cell(model, defence, reference):
    """An attacked checkpoint `attack/cell` of (model, defence): the job output that holds it, and the model
    directory and adapter a scan loads (LoRA: the defended model plus the snapshot; full: the snapshot).
    """
    attack, cell = reference.split("/")
    spec, run = config["attacks"][attack], attack_cells(attack)[cell]
    prefix = f"results/attacks/{model}/{defence}/{attack}"
    job = prefix if spec["one_job"] else f"{prefix}/{run['run']}"
    snapshot = f"{prefix}/{run['run']}/steps{run['steps']}"
    base = checkpoint_dir(SimpleNamespace(model=model, defence=defence))
    if methods.get("attack", spec["method"]).adapter:
        return {"inputs": [base, job], "model": base, "adapter": snapshot}
    return {"inputs": [job], "model": snapshot, "adapter": None}


def _subject(subject):
    """{subject, model, defence, inputs, model_dir, adapter} of a subject."""
    parts = subject.split("/")
    model, defence = parts[:2]
    found = {"subject": subject, "model": model, "defence": defence}
    if len(parts) == 4:
        cell = _cell(model, defence, "/".join(parts[2:]))
        return {
            **found,
            "inputs": cell["inputs"],
            "model_dir": cell["model"],
            "adapter": cell["adapter"],
        }
    base = checkpoint_dir(SimpleNamespace(model=model, defence=defence))
    return {**found, "inputs": [base], "model_dir": base, "adapter": None}


def _wildcard_subject(wildcards):
    parts = [wildcards.model, wildcards.defence]
    if "attack" in wildcards.keys():
        parts += [wildcards.attack, wildcards.cell]
    subject = "/".join(parts)
    if subject not in scan_subjects(config, wildcards.scan):
        raise ValueError(
            f"landscape: {subject} is not a subject of scan {wildcards.scan}"
        )
    return _subject(subject)


def landscape_dir(subject):
    return f"results/landscape/{subject}"


def _target(wildcards, subject):
    reference = LANDSCAPE["scans"][wildcards.scan]["target"]
    if reference is None:
        return None
    return _cell(subject["model"], subject["defence"], reference)


def landscape_inputs(wildcards):
    """The subject's checkpoint(s), an interpolation's target, and the prompts."""
    subject = _wildcard_subject(wildcards)
    target = _target(wildcards, subject)
    prompts = LANDSCAPE["prompts"]
    data = (
        "results/data/splits"
        if prompts["split"] is not None
        else f"results/data/{prompts['dataset']}.jsonl"
    )
    return {
        "subject": subject["inputs"],
        "target": target["inputs"] if target else [],
        "data": data,
        "judge": judge_input(),
    }


def _subject_flags(wildcards):
    """The subject's names and weights (and an interpolation's target), where its model is loaded."""
    subject = _wildcard_subject(wildcards)
    target = _target(wildcards, subject)
    return {
        "subject": subject["subject"],
        "scan": wildcards.scan,
        "model": subject["model_dir"],
        "adapter": subject["adapter"],
        "target": LANDSCAPE["scans"][wildcards.scan]["target"],
        "target_model": target["model"] if target else None,
        "target_adapter": target["adapter"] if target else None,
        # across the job's GPUs when it holds several
        "max_memory": launch.inference_max_memory(model_resource("gpu", wildcards)),
    }


def _directions(scan):
    """landscape-project's --params (tamperlab.landscape.spec.Directions): the scan's kind and directions' seed."""
    return {"kind": LANDSCAPE["scans"][scan]["kind"], "seed": LANDSCAPE["seed"]}


def scan_params(scan):
    """landscape-scan's --params (tamperlab.landscape.spec.ScanParams): the directions, the grid keys of its kind,
    the prompts, the system prompts (none or NAME=TEXT), the judge (evaluation.refusal's) and generation."""
    spec = LANDSCAPE["scans"][scan]
    prompts = LANDSCAPE["prompts"]
    names = [
        NO_SYSTEM_PROMPT if name is None else f"{name}={config['system_prompts'][name]}"
        for name in spec["system_prompts"]
    ]
    return {
        **_directions(scan),
        **{k: spec[k] for k in GRID_KEYS[spec["kind"]]},
        **{k: prompts[k] for k in ("split", "limit", "max_new_tokens", "batch_size")},
        "system_prompt": names,
        **judge_settings(),
        "compliance_marker": config["evaluation"]["refusal"]["compliance_marker"],
        "anchor_every": LANDSCAPE["anchor_every"],
    }


def landscape_scan_args(wildcards):
    """Every setting of one shard, explicit: the subject and the prompts' file as flags, the scan's settings as
    --params."""
    prompts = LANDSCAPE["prompts"]
    return cli_flags(
        {
            **_subject_flags(wildcards),
            "data": "results/data/splits" if prompts["split"] is not None else None,
            "dataset": (
                f"results/data/{prompts['dataset']}.jsonl"
                if prompts["dataset"]
                else None
            ),
            "params": scan_params(wildcards.scan),
        }
    )


def landscape_project_inputs(wildcards):
    subject = _wildcard_subject(wildcards)
    target = _target(wildcards, subject)
    cells = [
        _cell(subject["model"], subject["defence"], reference)
        for reference in LANDSCAPE["scans"][wildcards.scan]["project"]
    ]
    return {
        "subject": subject["inputs"],
        "target": target["inputs"] if target else [],
        "cells": sorted({path for cell in cells for path in cell["inputs"]}),
    }


def landscape_project_args(wildcards):
    subject = _wildcard_subject(wildcards)
    cells = []
    for reference in LANDSCAPE["scans"][wildcards.scan]["project"]:
        cell = _cell(subject["model"], subject["defence"], reference)
        cells.append(f"--cell {reference} {cell['model']} {cell['adapter'] or '-'}")
    flags = {**_subject_flags(wildcards), "params": _directions(wildcards.scan)}
    return " ".join([cli_flags(flags), *cells])


def _projects(scan):
    spec = LANDSCAPE["scans"][scan]
    return bool(spec["project"]) and spec["kind"] in TWO_DIRECTIONS


def landscape_gather_inputs(wildcards):
    subject = _wildcard_subject(wildcards)
    n = scan_shards(config, wildcards.scan)
    where = landscape_dir(subject["subject"])
    return {
        "shards": [f"{where}/shards/{wildcards.scan}/{k}of{n}.csv" for k in range(n)],
        "projections": (
            [f"{where}/{wildcards.scan}_projections.json"]
            if _projects(wildcards.scan)
            else []
        ),
    }


def landscape_scans():
    """Every gathered scan CSV and every projection file: the visage step's inputs."""
    scans, projections = [], []
    for scan in LANDSCAPE["scans"]:
        for subject in scan_subjects(config, scan):
            scans.append(f"{landscape_dir(subject)}/{scan}.csv")
            if _projects(scan):
                projections.append(f"{landscape_dir(subject)}/{scan}_projections.json")
    return {"scans": scans, "projections": projections}


def visage_targets():
    """The landscape target of the default run: the VISAGE table, when there is anything to scan."""
    return ["results/tables/visage.csv"] if landscape_scans()["scans"] else []


def _post_attack_attacks():
    return [name for name, spec in config["attacks"].items() if not spec["family"]]


def visage_evaluations():
    """The refusal evaluations that the VISAGE table reads: each scanned subject's own, its model's aligned one
    without a defence, and the grids of the harmful-prompt attacks on its model and defence (its worst post-attack
    refusal); not the whole table's.
    """
    subjects = {s for scan in LANDSCAPE["scans"] for s in scan_subjects(config, scan)}
    wanted = set()
    for subject in subjects:
        model, defence, *cell = subject.split("/")
        prefix = f"results/eval/{model}/{defence}"
        wanted.add(f"{prefix}/refusal.json")
        # the yardstick of the utility bound: the aligned model without a defence (tamperlab.reporting.utility)
        wanted.add(f"results/eval/{model}/{ALIGNED}/refusal.json")
        for attack in [*_post_attack_attacks(), *cell[:1]]:
            wanted.add(f"{prefix}/{attack}")
    return [
        path
        for path in evaluations("refusal.json")
        if path in wanted or path.rsplit("/", 1)[0] in wanted
    ]


def visage_capabilities():
    """The same evaluations' capability (an attack's evaluation directory holds both): the figure's utility bound."""
    paths = [p.rsplit("/", 1) for p in visage_evaluations()]
    return [
        f"{head}/capability.json" if name == "refusal.json" else f"{head}/{name}"
        for head, name in paths
    ]


def visage_params():
    """The step's settings as one --params (reporting.settings.VisageParams): the basin's tolerance, the attacks whose
    cells count as post-attack refusal (those on harmful prompts, not a benign family), the refusal table's system
    prompt, the utility bound as the tables' (the figure's worst case), and the scans' judge and new tokens."""
    evaluation = config["evaluation"]
    return cli_flags(
        {
            "params": {
                "basin_tolerance": LANDSCAPE["basin_tolerance"],
                "post_attack": _post_attack_attacks(),
                "refusal_system_prompt": evaluation["refusal"]["system_prompt"] or "none",
                "capability_metric": evaluation["capability"]["metric"],
                "utility": evaluation["utility"],
                "scan_judge": evaluation["refusal"]["judge"],
                "scan_new_tokens": LANDSCAPE["prompts"]["max_new_tokens"],
            }
        }
    )


# The landscape rules' wildcards: a subject (model/defence, and attack/cell for an attacked one), a scan, a shard.
LANDSCAPE_CONSTRAINTS = {
    "model": names_regex(config["models"]),
    "defence": names_regex(config["defences"]),
    "scan": names_regex(LANDSCAPE["scans"]),
}
CELL_CONSTRAINTS = {
    "attack": names_regex(config["attacks"]),
    "cell": names_regex(
        [cell for attack in config["attacks"] for cell in attack_cells(attack)]
    ),
}
SHARD_CONSTRAINTS = {"shard": r"\d+", "shards": r"\d+"}
