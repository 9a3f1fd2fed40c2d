"""A step's hyperparameters, the one route they take: the rule puts its resolved config block on the command line as
one JSON object (`--params '{...}'`), and the command turns it into the one dataclass of that stage or method. An
unknown or missing key is one line naming it; the defaults were resolved before (the schema, and the dataclass's own
where it derives one), so the copied line computes the same thing."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from tamperlab.errors import UserError

T = TypeVar("T")
FLOAT_TYPES = (float, "float", "float | None")


def from_params(cls: type[T], values: dict[str, Any], key: str = "--params") -> T:
    """`cls` (a dataclass) from a JSON object. An integer where a float is declared becomes a float, as a number
    read from the command line was (YAML and JSON write 1 and 1.0 apart)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise UserError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{key}: missing key {missing[0]!r}")
    return cls(**{k: _coerced(fields[k], v) for k, v in values.items()})


def _coerced(field: dataclasses.Field, value: Any) -> Any:
    if field.type in FLOAT_TYPES and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
