"""Input, parameter and target functions of the landscape rules (workflow/rules/landscape.smk): subjects and
cell references resolved and checked against the config before any job, every scan's CLI flags.
"""

from types import SimpleNamespace

LANDSCAPE = config["landscape"]
TWO_DIRECTIONS = ("2d", "interpolation_2d")
INTERPOLATION = ("interpolation", "interpolation_2d")


def _landscape_error(key, message):
    sys.exit(f"tamperlab: config error at landscape.{key}: {message}")


def landscape_subjects(scan):
    spec = LANDSCAPE["scans"][scan]
    return spec["subjects"] if spec["subjects"] is not None else LANDSCAPE["subjects"]


def landscape_points(spec):
    path = spec["steps"] + 2 * spec["extend"] + 1
    return {
        "1d": spec["n"],
        "2d": spec["n"] ** 2,
        "interpolation": path,
        "interpolation_2d": path * spec["n"],
    }[spec["kind"]]


def landscape_shards(scan):
    spec = LANDSCAPE["scans"][scan]
    return spec["shards"] or LANDSCAPE["shards"]


def _resolve(reference, key):
    """attack/cell with `strongest` read as the grid's cell of the largest lr, steps and rank (so that the
    default's references follow an overlay that changes the grid)."""
    attack, cell = reference.split("/")
    if attack not in config["attacks"]:
        _landscape_error(key, f"{reference!r}: no attack {attack!r} in attacks")
    if cell == "strongest":
        cells = attack_cells(attack)
        cell = max(
            cells,
            key=lambda c: (cells[c]["lr"], cells[c]["steps"], cells[c]["rank"] or 0),
        )
    return f"{attack}/{cell}"


def _resolve_subject(subject, key):
    model, defence, *cell = subject.split("/")
    if cell:
        return f"{model}/{defence}/{_resolve(f'{cell[0]}/{cell[1]}', key)}"
    return subject


def _resolve_references():
    """Every `strongest` in the landscape block replaced by the cell it names, once, before anything else."""
    LANDSCAPE["subjects"] = [
        _resolve_subject(s, "subjects") for s in LANDSCAPE["subjects"]
    ]
    for scan, spec in LANDSCAPE["scans"].items():
        key = f"scans.{scan}"
        if spec["subjects"] is not None:
            spec["subjects"] = [
                _resolve_subject(s, f"{key}.subjects") for s in spec["subjects"]
            ]
        if spec["target"] is not None:
            spec["target"] = _resolve(spec["target"], f"{key}.target")
        spec["project"] = [_resolve(r, f"{key}.project") for r in spec["project"]]


def _cell(model, defence, reference, key):
    """An attacked checkpoint `attack/cell` of (model, defence): the job output that holds it, and the model
    directory and adapter a scan loads (LoRA: the defended model plus the snapshot; full: the snapshot).
    """
    attack, cell = reference.split("/")
    if attack not in config["attacks"]:
        _landscape_error(key, f"{reference!r}: no attack {attack!r} in attacks")
    cells = attack_cells(attack)
    if cell not in cells:
        _landscape_error(
            key,
            f"{reference!r}: no cell {cell!r} in the grid of {attack} ({', '.join(cells)})",
        )
    spec, run = config["attacks"][attack], cells[cell]
    prefix = f"results/attacks/{model}/{defence}/{attack}"
    job = prefix if spec["one_job"] else f"{prefix}/{run['run']}"
    snapshot = f"{prefix}/{run['run']}/steps{run['steps']}"
    base = checkpoint_dir(SimpleNamespace(model=model, defence=defence))
    if spec["method"] == "lora":
        return {"inputs": [base, job], "model": base, "adapter": snapshot}
    return {"inputs": [job], "model": snapshot, "adapter": None}


def _subject(subject, key="subjects"):
    """{subject, model, defence, path (under results/landscape), inputs, model_dir, adapter} of a subject."""
    parts = subject.split("/")
    model, defence = parts[:2]
    if model not in config["models"]:
        _landscape_error(key, f"{subject!r}: no model {model!r} in models")
    if defence not in config["defences"]:
        _landscape_error(key, f"{subject!r}: no defence {defence!r} in defences")
    found = {"subject": subject, "model": model, "defence": defence}
    if len(parts) == 4:
        cell = _cell(model, defence, "/".join(parts[2:]), key)
        return {
            **found,
            "inputs": cell["inputs"],
            "model_dir": cell["model"],
            "adapter": cell["adapter"],
        }
    base = checkpoint_dir(SimpleNamespace(model=model, defence=defence))
    return {**found, "inputs": [base], "model_dir": base, "adapter": None}


def _check_landscape():
    """What the schema cannot check: references to models, defences, attacks, cells, splits, system prompts."""
    prompts = LANDSCAPE["prompts"]
    if (prompts["split"] is None) == (prompts["dataset"] is None):
        _landscape_error(
            "prompts", "give exactly one of split and dataset (set the other to null)"
        )
    if prompts["split"] is not None and prompts["split"] not in config["splits"]:
        _landscape_error(
            "prompts.split", f"{prompts['split']!r} is not a split named in splits"
        )
    if prompts["dataset"] is not None and prompts["dataset"] not in config["datasets"]:
        _landscape_error(
            "prompts.dataset", f"{prompts['dataset']!r} is not in datasets"
        )
    for name in LANDSCAPE["subjects"]:
        _subject(name)
    for scan, spec in LANDSCAPE["scans"].items():
        key = f"scans.{scan}"
        for name in landscape_subjects(scan):
            subject = _subject(name, f"{key}.subjects")
            if spec["target"] is not None:
                _cell(
                    subject["model"],
                    subject["defence"],
                    spec["target"],
                    f"{key}.target",
                )
            for reference in spec["project"]:
                _cell(subject["model"], subject["defence"], reference, f"{key}.project")
        if (spec["kind"] in INTERPOLATION) != (spec["target"] is not None):
            _landscape_error(
                f"{key}.target",
                "an interpolation scan needs a target; other kinds take none",
            )
        if spec["project"] and spec["kind"] not in TWO_DIRECTIONS:
            _landscape_error(
                f"{key}.project",
                f"projections are onto a 2D plane; {spec['kind']} has one axis",
            )
        for prompt in spec["system_prompts"]:
            if prompt is not None and (
                prompt not in config["system_prompts"] or prompt == "none"
            ):
                _landscape_error(
                    f"{key}.system_prompts", f"{prompt!r} is not in system_prompts"
                )
        if landscape_shards(scan) > landscape_points(spec):
            _landscape_error(
                f"{key}.shards",
                f"{landscape_shards(scan)} shards for {landscape_points(spec)} points",
            )


_resolve_references()
_check_landscape()


def _wildcard_subject(wildcards):
    parts = [wildcards.model, wildcards.defence]
    if "attack" in wildcards.keys():
        parts += [wildcards.attack, wildcards.cell]
    subject = "/".join(parts)
    if subject not in landscape_subjects(wildcards.scan):
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
    return _cell(subject["model"], subject["defence"], reference, "target")


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
    }


def _subject_flags(wildcards):
    subject = _wildcard_subject(wildcards)
    spec = LANDSCAPE["scans"][wildcards.scan]
    target = _target(wildcards, subject)
    return {
        "subject": subject["subject"],
        "scan": wildcards.scan,
        "model": subject["model_dir"],
        "adapter": subject["adapter"],
        "kind": spec["kind"],
        "seed": LANDSCAPE["seed"],
        "target": spec["target"],
        "target_model": target["model"] if target else None,
        "target_adapter": target["adapter"] if target else None,
    }


def landscape_grid(spec):
    """The grid settings a scan's kind uses: n and extent for random axes, steps and extend for a path."""
    keys = {
        "1d": ("n", "extent"),
        "2d": ("n", "extent"),
        "interpolation": ("steps", "extend"),
        "interpolation_2d": ("steps", "extend", "n", "extent"),
    }[spec["kind"]]
    return {k: spec[k] for k in keys}


def landscape_scan_args(wildcards):
    """Every setting of one shard, explicit: subject, grid, prompts, system prompts, judge, generation."""
    spec = LANDSCAPE["scans"][wildcards.scan]
    prompts = LANDSCAPE["prompts"]
    refusal = config["evaluation"]["refusal"]
    classifier = refusal["classifier"] or {}
    names = [
        "none" if name is None else f"{name}={config['system_prompts'][name]}"
        for name in spec["system_prompts"]
    ]
    anchor = LANDSCAPE["anchor_every"]
    return cli_flags(
        {
            **_subject_flags(wildcards),
            **landscape_grid(spec),
            "data": "results/data/splits" if prompts["split"] is not None else None,
            "split": prompts["split"],
            "dataset": (
                f"results/data/{prompts['dataset']}.jsonl"
                if prompts["dataset"]
                else None
            ),
            "limit": prompts["limit"],
            "system_prompt": names,
            "judge": refusal["judge"],
            "classifier_model": classifier.get("model"),
            "classifier_revision": classifier.get("revision"),
            "refusal_label": classifier.get("refusal_label"),
            "max_new_tokens": prompts["max_new_tokens"],
            "batch_size": prompts["batch_size"],
            "compliance_marker": refusal["compliance_marker"],
            "anchor_every": "none" if anchor is None else anchor,
        }
    )


def landscape_project_inputs(wildcards):
    subject = _wildcard_subject(wildcards)
    target = _target(wildcards, subject)
    cells = [
        _cell(subject["model"], subject["defence"], reference, "project")
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
        cell = _cell(subject["model"], subject["defence"], reference, "project")
        cells.append(f"--cell {reference} {cell['model']} {cell['adapter'] or '-'}")
    return " ".join([cli_flags(_subject_flags(wildcards)), *cells])


def _projects(scan):
    spec = LANDSCAPE["scans"][scan]
    return bool(spec["project"]) and spec["kind"] in TWO_DIRECTIONS


def landscape_gather_inputs(wildcards):
    subject = _wildcard_subject(wildcards)
    n = landscape_shards(wildcards.scan)
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
        for subject in landscape_subjects(scan):
            scans.append(f"{landscape_dir(subject)}/{scan}.csv")
            if _projects(scan):
                projections.append(f"{landscape_dir(subject)}/{scan}_projections.json")
    return {"scans": scans, "projections": projections}


def visage_targets():
    """The landscape target of the default run: the VISAGE table, when there is anything to scan."""
    return ["results/tables/visage.csv"] if landscape_scans()["scans"] else []


def _all_cells():
    return [cell for attack in config["attacks"] for cell in attack_cells(attack)]


LANDSCAPE_CONSTRAINTS = {
    "model": names_regex(config["models"]),
    "defence": names_regex(config["defences"]),
    "scan": names_regex(LANDSCAPE["scans"]),
}


def _post_attack_attacks():
    return [name for name, spec in config["attacks"].items() if not spec["family"]]


def visage_evaluations():
    """The refusal evaluations that the VISAGE table reads: each scanned subject's own, and the grids of the
    harmful-prompt attacks on its model and defence (its worst post-attack refusal); not the whole table's.
    """
    subjects = {s for scan in LANDSCAPE["scans"] for s in landscape_subjects(scan)}
    wanted = set()
    for subject in subjects:
        model, defence, *cell = subject.split("/")
        prefix = f"results/eval/{model}/{defence}"
        wanted.add(f"{prefix}/refusal.json")
        for attack in [*_post_attack_attacks(), *cell[:1]]:
            wanted.add(f"{prefix}/{attack}")
    return [
        path
        for path in evaluations("refusal.json")
        if path in wanted or path.rsplit("/", 1)[0] in wanted
    ]


def visage_post_attack_args():
    """The attacks whose cells count as post-attack refusal: those on harmful prompts (not a benign family)."""
    return cli_flags({"post_attack": _post_attack_attacks()})
