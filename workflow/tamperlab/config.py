"""Config validation against workflow/schemas/config.schema.yaml, defaults filled in.

The Snakefile calls `validate_config` before any job is scheduled; an error names the offending key in one line.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tamperlab.errors import UserError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


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
    return error.message


def validate_config(config: dict[str, Any], schema_path: Path = SCHEMA_PATH) -> dict[str, Any]:
    """Return a validated copy of `config` with defaults filled in; raise UserError naming the bad key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
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
    _check_references(resolved)
    return resolved


def _check_references(config: dict[str, Any]) -> None:
    """Cross-references the schema cannot express."""
    for name, spec in config["datasets"].items():
        for split in spec.get("splits", {}):
            if split not in config["splits"]:
                raise UserError(f"config error at datasets.{name}.splits.{split}: not a split named in splits")
        total = sum(spec.get("splits", {}).values())
        if spec.get("splits") and abs(total - 1.0) > 1e-6:
            raise UserError(f"config error at datasets.{name}.splits: fractions sum to {total:g}, not 1")
    split = config["evaluation"]["refusal"]["split"]
    if split not in config["splits"]:
        raise UserError(f"config error at evaluation.refusal.split: {split!r} is not a split named in splits")
    if config["evaluation"]["refusal"]["judge"] == "classifier" and not config["evaluation"]["refusal"].get(
        "classifier"
    ):
        raise UserError("config error at evaluation.refusal.classifier: required when judge is 'classifier'")
    prompt = config["evaluation"]["refusal"]["system_prompt"]
    if prompt is not None and prompt not in config["system_prompts"]:
        raise UserError(f"config error at evaluation.refusal.system_prompt: {prompt!r} is not in system_prompts")
    for name in config["defences"]:
        if "/" in name or name == "base":
            raise UserError(f"config error at defences.{name}: a defence may not be named 'base' or contain '/'")
