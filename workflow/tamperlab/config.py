"""Config validation against workflow/schemas/config.schema.yaml, defaults filled in, then what the schema cannot
express: references between sections, and the landscape's (its `strongest` cells resolved to the grid's cell).

The Snakefile calls `validate_config` before any job is scheduled; an error names the offending key in one line.
Pure Python, no torch: every Snakemake run imports it. Loading and validation only: what a validated config says
(an attack's grid and cells, a scan's subjects, how a published entry is named) is asked of the domain that owns it
(attacks.grid, landscape.spec, reporting.published), which the checks here use too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tamperlab import methods
from tamperlab.attacks import grid
from tamperlab.attacks.grid import attack_cells, attacked_defences, defence_seeds
from tamperlab.errors import UserError
from tamperlab.landscape.spec import (
    INTERPOLATION,
    NO_SYSTEM_PROMPT,
    TWO_DIRECTIONS,
    point_count,
    scan_shards,
    scan_subjects,
)
from tamperlab.models.alignment import UNALIGNED
from tamperlab.reporting.published import RATE_METRICS, published_benchmarks, published_name

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
COMMIT_PATTERN = "^[0-9a-f]{40}$"  # the schema's pattern for hub `revision:` keys


def _with_defaults(validator_class):
    """A validator that fills each object's missing properties from their schema defaults as it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": fill_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        parts.append(error.message.split("'")[1])
    elif error.validator == "additionalProperties":
        extra = error.message.split("'")[1] if "'" in error.message else "?"
        parts.append(extra)
    return ".".join(parts) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return "missing required key"
    if error.validator == "additionalProperties":
        return "unknown key"
    if error.validator == "type":
        return f"{error.instance!r} is not of type {error.validator_value}"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {error.validator_value}"
    if error.validator == "pattern" and error.validator_value == COMMIT_PATTERN:
        return f"{error.instance!r} is not a 40-hex commit hash: pin the hub revision before a run"
    return error.message


def load_schema(schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """The config schema with the method registry's names and blocks in it: a defence's, an attack's and a judge's
    name must be registered, and each registered defence's hyperparameters are a block of every defence entry."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    defence = schema["properties"]["defences"]["additionalProperties"]["properties"]
    defence["method"]["enum"] = list(methods.names("defence"))
    for entry in methods.defences():
        if entry.block is not None:
            defence[entry.block] = {**entry.schema, "default": {}}
    attack = schema["properties"]["attacks"]["additionalProperties"]["properties"]
    attack["method"]["enum"] = list(methods.names("attack"))
    refusal = schema["properties"]["evaluation"]["properties"]["refusal"]["properties"]
    refusal["judge"]["enum"] = list(methods.names("judge"))
    return schema


def _load_plugins(config: dict[str, Any]) -> None:
    """Import the config's plugins (each registers its methods) before the schema is built from the registry."""
    plugins = config.get("plugins") or []
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):  # else the schema says what is wrong
        try:
            methods.load_plugins(plugins)
        except UserError as error:
            raise UserError(f"config error at {error}") from None


def validate_config(config: dict[str, Any], schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Return a validated copy of `config` with defaults filled in; raise UserError naming the bad key."""
    _load_plugins(config)
    schema = load_schema(schema_path)
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    resolved = copy.deepcopy(config)
    # An overlay removes an entry of the default by naming it with null (`models: {tiny: null}`): a paper config
    # runs the paper's models only.
    for section in ("datasets", "models", "defences", "attacks", "system_prompts"):
        entries = resolved.get(section)
        if isinstance(entries, dict):
            for name in [n for n, v in entries.items() if v is None]:
                del entries[name]
    scans = (resolved.get("landscape") or {}).get("scans")
    if isinstance(scans, dict):
        for name in [n for n, v in scans.items() if v is None]:
            del scans[name]
    errors = list(validator_class(schema).iter_errors(resolved))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        # Within if/then branches the most specific error is the deepest one.
        while error.context:
            error = jsonschema.exceptions.best_match(error.context)
        raise UserError(f"config error at {_key_path(error)}: {_describe(error)}")
    _expand_defence_seeds(resolved)
    _check_references(resolved)
    _resolve_landscape(resolved)
    _check_landscape(resolved)
    _check_published(resolved)
    return resolved


def _expand_defence_seeds(config: dict[str, Any]) -> None:
    """defences.<d>.seeds: one defence per seed in place of <d> (grid.seeded_defence names them), its method's
    seed set, `seed_of` naming <d>; an attack's `defences` and the landscape's subjects that name <d> then name
    each of them. Before any other check, so that everything after sees only the defences that are trained."""
    instances: dict[str, list[str]] = {}
    expanded: dict[str, Any] = {}
    for name, spec in config["defences"].items():
        seeds = spec.pop("seeds", None)
        if not seeds:
            expanded[name] = spec
            continue
        block = methods.get("defence", spec["method"]).block
        if block is None or "seed" not in spec[block] or spec["source"] != "train":
            raise UserError(f"config error at defences.{name}.seeds: only a defence trained here (a method with a "
                            "seed in its block, source train) has a seed")
        instances[name] = [grid.seeded_defence(name, seed) for seed in seeds]
        for seed, instance in zip(seeds, instances[name], strict=True):
            if instance in config["defences"]:
                raise UserError(f"config error at defences.{name}.seeds: {instance!r} is a key of defences already")
            expanded[instance] = {**copy.deepcopy(spec), "seed_of": name}
            expanded[instance][block]["seed"] = seed
    if not instances:
        return
    config["defences"] = expanded
    for spec in config["attacks"].values():
        for key in ("defences", "seeded_defences"):
            if spec.get(key) is not None:
                spec[key] = list(dict.fromkeys(i for d in spec[key] for i in instances.get(d, [d])))
    landscape = config["landscape"]
    landscape["subjects"] = _expand_subjects(landscape["subjects"], instances)
    for spec in landscape["scans"].values():
        if spec["subjects"] is not None:
            spec["subjects"] = _expand_subjects(spec["subjects"], instances)


def _expand_subjects(subjects: list[str], instances: dict[str, list[str]]) -> list[str]:
    """model/<d>[/attack/cell] -> one subject per seed of <d>."""
    expanded = []
    for subject in subjects:
        model, defence, *rest = subject.split("/")
        expanded += ["/".join([model, d, *rest]) for d in instances.get(defence, [defence])]
    return list(dict.fromkeys(expanded))  # a seed named beside its defence: once


def _check_datasets(config: dict[str, Any]) -> None:
    """Data sets: their splits are named in splits and sum to 1; a probe from a file goes to the evaluation split
    whole; a probe rate the utility bound watches names a probe."""
    for name, spec in config["datasets"].items():
        for split in spec.get("splits", {}):
            if split not in config["splits"]:
                raise UserError(f"config error at datasets.{name}.splits.{split}: not a split named in splits")
        if spec["probe"] and spec["source"] != "generated" and spec.get("splits") != {
                config["evaluation"]["refusal"]["split"]: 1.0}:
            raise UserError(f"config error at datasets.{name}.splits: a probe goes to the evaluation split whole "
                            f"({{{config['evaluation']['refusal']['split']}: 1.0}})")
        total = sum(spec.get("splits", {}).values())
        if spec.get("splits") and abs(total - 1.0) > 1e-6:
            raise UserError(f"config error at datasets.{name}.splits: fractions sum to {total:g}, not 1")
    probes = {spec["probe"] for spec in config["datasets"].values() if spec["probe"]}
    for rate in config["evaluation"]["utility"]["false_refusal"]:
        if "@" in rate and rate.split("@", 1)[1] not in probes:
            raise UserError(f"config error at evaluation.utility.false_refusal: {rate!r} names no probe of datasets")


def _check_references(config: dict[str, Any]) -> None:
    """Cross-references the schema cannot express."""
    _check_datasets(config)
    split = config["evaluation"]["refusal"]["split"]
    if split not in config["splits"]:
        raise UserError(f"config error at evaluation.refusal.split: {split!r} is not a split named in splits")
    judge = config["evaluation"]["refusal"]["judge"]
    if methods.get("judge", judge).needs_model and not config["evaluation"]["refusal"].get("classifier"):
        raise UserError(f"config error at evaluation.refusal.classifier: required when judge is {judge!r}")
    prompt = config["evaluation"]["refusal"]["system_prompt"]
    if prompt is not None and prompt not in config["system_prompts"]:
        raise UserError(f"config error at evaluation.refusal.system_prompt: {prompt!r} is not in system_prompts")
    for name, spec in config["defences"].items():
        if "/" in name or name in ("base", UNALIGNED):
            raise UserError(f"config error at defences.{name}: a defence may not be named 'base', "
                            f"'{UNALIGNED}' or contain '/'")
        if spec.get("benign_retain") and methods.get("defence", spec["method"]).data != "pairs":
            raise UserError(f"config error at defences.{name}.benign_retain: only a defence trained on pairs "
                            "(RepNoise) has a retain set of pairs to add benign answers to")
        anchor = spec.get("anchor")
        if anchor is not None and (not methods.get("defence", spec["method"]).anchor or spec["source"] != "train"):
            raise UserError(f"config error at defences.{name}.anchor: only a TAR defence trained here has one "
                            "(a method that takes an anchor)")
        if anchor is not None and anchor not in config["models"]:
            raise UserError(f"config error at defences.{name}.anchor: {anchor!r} is not a key of models")
    for name, spec in config["models"].items():
        if spec.get("align") and spec["source"] == "organism":
            raise UserError(f"config error at models.{name}.align: the organism is refusal-trained as it is built")
        if spec.get("align") and spec["align"]["split"] not in config["splits"]:
            raise UserError(f"config error at models.{name}.align.split: not a split named in splits")
    for name, spec in config["attacks"].items():
        for defence in spec["defences"] or []:
            if defence not in config["defences"]:
                raise UserError(f"config error at attacks.{name}.defences: {defence!r} is not a key of defences")
        for defence in spec["seeded_defences"] or []:
            if defence not in attacked_defences(config, name):
                raise UserError(f"config error at attacks.{name}.seeded_defences: {defence!r} is not a defence "
                                "the attack is run against")
        if spec["seeded_defences"] and spec["one_job"]:
            raise UserError(f"config error at attacks.{name}.seeded_defences: needs one_job false (a job per run)")
    generators = [(f"attacks.{n}.generator", s["generator"]) for n, s in config["attacks"].items()]
    generators += [(f"attacks.{n}.benign_mix.generator", s["benign_mix"]["generator"])
                   for n, s in config["attacks"].items() if s["benign_mix"]]
    generators += [(f"defences.{n}.benign_retain.generator", s["benign_retain"]["generator"])
                   for n, s in config["defences"].items() if s.get("benign_retain")]
    capability, refusal = config["evaluation"]["capability"], config["evaluation"]["refusal"]
    if "answers" in capability["tasks"]:
        generators.append(("evaluation.capability.answers.generator", capability["answers"]["generator"]))
    if refusal["prefill_tokens"]:
        generators.append(("evaluation.refusal.prefill_generator", refusal["prefill_generator"]))
        if refusal["prefill_generator"] is None and not refusal["compliance_marker"]:
            raise UserError("config error at evaluation.refusal.prefill_generator: null prefills compliance_marker's "
                            "text, which is null: name a generator (self, or a key of models)")
    for key, generator in generators:
        if generator is not None and generator != "self" and generator not in config["models"]:
            raise UserError(f"config error at {key}: {generator!r} is neither self nor a key of models")
    for task in ("mmlu_subset", "mmlu_cloze", "mmlu_gold"):
        if task in capability["tasks"] and not capability.get("mmlu"):
            raise UserError(f"config error at evaluation.capability.mmlu: required when tasks include {task}")


# --- published numbers ----------------------------------------------------------------------------------------


def _check_published(config: dict[str, Any]) -> None:
    """A published entry's benchmark names a data set its number is looked up on (results/tables/published.csv):
    for a refusal rate, one whose prompts the refusal evaluation uses; for VISAGE, the landscape's data set. A
    VISAGE entry's system prompt is a key of system_prompts; its defence is not one trained under several seeds
    (those are defences of their own, one per seed). Checked here so a run stops at start-up."""
    def harmful_in(split: str | None) -> list[str]:
        return [name for name, spec in config["datasets"].items()
                if spec.get("kind") == "harmful" and (spec.get("splits") or {}).get(split, 0) > 0]

    evaluated = harmful_in(config["evaluation"]["refusal"]["split"])
    landscape = (config.get("landscape") or {}).get("prompts") or {}
    seeded = defence_seeds(config)
    for i, entry in enumerate(config["published"]):
        where = f"config error at published[{i}] ({published_name(entry)})"
        if entry.get("defence") in seeded:  # ours would be no row at all, silently
            raise UserError(f"{where}: defence {entry['defence']!r} is trained under several seeds (defences."
                            f"{entry['defence']}.seeds): name one of {', '.join(seeded[entry['defence']])}")
        if entry["table"] == "visage":  # the landscape's prompts: a data set's, or a split's harmful ones
            known = [landscape["dataset"]] if landscape.get("dataset") else harmful_in(landscape.get("split"))
            prompt = entry.get("system_prompt")
            if prompt is not None and prompt not in config["system_prompts"]:
                raise UserError(f"{where}: system prompt {prompt!r} is not in system_prompts")
        elif entry["metric"] in RATE_METRICS:
            known = evaluated
        elif published_benchmarks(entry):
            raise UserError(f"{where}: a benchmark applies to refusal rates ({', '.join(RATE_METRICS)}) and VISAGE "
                            "only")
        for benchmark in published_benchmarks(entry):
            if benchmark not in known:
                raise UserError(f"{where}: unknown benchmark {benchmark!r}: not a data set its number is measured "
                                f"on here (those: {', '.join(known) or 'none'})")


# --- the landscape -----------------------------------------------------------------------------------------------


def _landscape_error(key: str, message: str) -> UserError:
    return UserError(f"config error at landscape.{key}: {message}")


def _attack(config: dict[str, Any], reference: str, key: str) -> tuple[str, str]:
    attack, cell = reference.split("/")
    if attack not in config["attacks"]:
        raise _landscape_error(key, f"{reference!r}: no attack {attack!r} in attacks")
    return attack, cell


def _resolve(config: dict[str, Any], reference: str, key: str) -> str:
    """attack/cell with `strongest` read as the grid's cell of the largest lr, steps and rank (so that the
    default's references follow an overlay that changes the grid)."""
    attack, cell = _attack(config, reference, key)
    if cell == "strongest":
        cells = attack_cells(config, attack)
        cell = max(cells, key=lambda c: (cells[c]["lr"], cells[c]["steps"], cells[c]["rank"] or 0))
    return f"{attack}/{cell}"


def _resolve_subject(config: dict[str, Any], subject: str, key: str) -> str:
    model, defence, *cell = subject.split("/")
    if cell:
        return f"{model}/{defence}/{_resolve(config, f'{cell[0]}/{cell[1]}', key)}"
    return subject


def _resolve_landscape(config: dict[str, Any]) -> None:
    """Every `strongest` in the landscape block replaced by the cell it names, once, before anything else."""
    landscape = config["landscape"]
    landscape["subjects"] = [_resolve_subject(config, s, "subjects") for s in landscape["subjects"]]
    for scan, spec in landscape["scans"].items():
        key = f"scans.{scan}"
        if spec["subjects"] is not None:
            spec["subjects"] = [_resolve_subject(config, s, f"{key}.subjects") for s in spec["subjects"]]
        if spec["target"] is not None:
            spec["target"] = _resolve(config, spec["target"], f"{key}.target")
        spec["project"] = [_resolve(config, r, f"{key}.project") for r in spec["project"]]


def _check_cell(config: dict[str, Any], reference: str, key: str, defence: str) -> None:
    """An attacked checkpoint `attack/cell` of `defence`: an attack of the config run against that defence, a cell
    of its grid."""
    attack, cell = _attack(config, reference, key)
    cells = attack_cells(config, attack)
    if cell not in cells:
        raise _landscape_error(key, f"{reference!r}: no cell {cell!r} in the grid of {attack} ({', '.join(cells)})")
    if defence not in attacked_defences(config, attack):
        raise _landscape_error(key, f"{reference!r}: {attack} is not run against defence {defence!r} "
                                    f"(attacks.{attack}.defences)")


def _check_subject(config: dict[str, Any], subject: str, key: str) -> None:
    """model/defence, or model/defence/attack/cell, of the config's models, defences and attack grids."""
    parts = subject.split("/")
    model, defence = parts[:2]
    if model not in config["models"]:
        raise _landscape_error(key, f"{subject!r}: no model {model!r} in models")
    if defence not in config["defences"]:
        raise _landscape_error(key, f"{subject!r}: no defence {defence!r} in defences")
    if len(parts) == 4:
        _check_cell(config, "/".join(parts[2:]), key, defence)


def _check_landscape(config: dict[str, Any]) -> None:
    """What the schema cannot check: references to models, defences, attacks, cells, splits, system prompts; a
    target for interpolation scans only, projections onto 2D scans only, no more shards than points."""
    landscape = config["landscape"]
    prompts = landscape["prompts"]
    if (prompts["split"] is None) == (prompts["dataset"] is None):
        raise _landscape_error("prompts", "give exactly one of split and dataset (set the other to null)")
    if prompts["split"] is not None and prompts["split"] not in config["splits"]:
        raise _landscape_error("prompts.split", f"{prompts['split']!r} is not a split named in splits")
    if prompts["dataset"] is not None and prompts["dataset"] not in config["datasets"]:
        raise _landscape_error("prompts.dataset", f"{prompts['dataset']!r} is not in datasets")
    for name in landscape["subjects"]:
        _check_subject(config, name, "subjects")
    for scan, spec in landscape["scans"].items():
        key = f"scans.{scan}"
        for name in scan_subjects(config, scan):
            _check_subject(config, name, f"{key}.subjects")
            defence = name.split("/")[1]
            if spec["target"] is not None:
                _check_cell(config, spec["target"], f"{key}.target", defence)
            for reference in spec["project"]:
                _check_cell(config, reference, f"{key}.project", defence)
        if (spec["kind"] in INTERPOLATION) != (spec["target"] is not None):
            raise _landscape_error(f"{key}.target", "an interpolation scan needs a target; other kinds take none")
        if spec["project"] and spec["kind"] not in TWO_DIRECTIONS:
            raise _landscape_error(f"{key}.project", f"projections are onto a 2D plane; {spec['kind']} has one axis")
        for prompt in spec["system_prompts"]:
            if prompt is not None and (prompt not in config["system_prompts"] or prompt == NO_SYSTEM_PROMPT):
                raise _landscape_error(f"{key}.system_prompts", f"{prompt!r} is not in system_prompts")
        shards, points = scan_shards(config, scan), point_count(spec["kind"], spec["n"], spec["steps"], spec["extend"])
        if shards > points:
            raise _landscape_error(f"{key}.shards", f"{shards} shards for {points} points")
