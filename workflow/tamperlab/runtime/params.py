"""A step's hyperparameters, the one route they take: the rule puts its resolved config block on the command line as
one JSON object (`--params '{...}'`), and the command turns it into the one dataclass of that stage or method. An
unknown or missing key is one line naming it; the defaults were resolved before (the schema, and the dataclass's own
where it derives one), so the copied line computes the same thing. A step whose settings are two dataclasses
(evaluate-run: refusal and capability; harden: its rows and its method's hyperparameters) takes them the same way, one
`--params` whose keys name the blocks (from_blocks): one flag to read and copy, each block the dataclass it is alone."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from tamperlab.errors import UserError

T = TypeVar("T")


def from_params(cls: type[T], values: dict[str, Any], key: str = "--params") -> T:
    """`cls` (a dataclass) from a JSON object. An integer where a float is declared becomes a float, as a number
    read from the command line was (YAML and JSON write 1 and 1.0 apart)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    _check_keys(values, fields, required, key)
    floats = _float_fields(cls)
    return cls(**{k: float(v) if k in floats and type(v) is int else v for k, v in values.items()})


def from_blocks(classes: dict[str, type], values: dict[str, Any], key: str = "--params") -> dict[str, Any]:
    """{block: its dataclass} from a JSON object with one key per block, each read by from_params (an unknown or
    missing key inside one is named with its block: `--params refusal: unknown key 'x'`)."""
    _check_keys(values, classes, list(classes), key)
    return {name: from_params(cls, values[name], f"{key} {name}") for name, cls in classes.items()}


def _check_keys(values: Any, known: Any, required: list[str], key: str) -> None:
    """One line naming the first unknown key, or the first missing one, of a JSON object."""
    if not isinstance(values, dict):
        raise UserError(f"{key}: expected a JSON object, got {values!r}")
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    missing = [name for name in required if name not in values]
    if missing:
        raise UserError(f"{key}: missing key {missing[0]!r}")


def _float_fields(cls: type) -> set[str]:
    """The fields declared float, alone or in a union (float | None): the annotations resolved, not their text."""
    hints = typing.get_type_hints(cls)
    unions = (typing.Union, types.UnionType)
    return {name for name, hint in hints.items()
            if hint is float or (typing.get_origin(hint) in unions and float in typing.get_args(hint))}
