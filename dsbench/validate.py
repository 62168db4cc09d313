"""One-line checks of spec values: each raises SpecError naming the key, the bad value and
what is allowed. Shared by the spec (dsbench/spec.py) and the check policy (dsbench/policy.py).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from dsbench.errors import SpecError


def reject_unknown(where: str, table: dict, allowed) -> None:
    for key in table:
        if key not in allowed:
            prefix = f"{where}." if where != "spec" else ""
            raise SpecError(f"{prefix}{key}: unknown key; allowed: {', '.join(allowed)}")


def as_table(key: str, value) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{key}: expected a table ([{key}]), got {value!r}")
    return value


def check_str(key: str, value) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{key}: expected a string, got {value!r}")
    return value


def check_choice(key: str, value, allowed: tuple, error: type[ValueError] = SpecError) -> str:
    """value if it is one of allowed, else `error` naming the key, the value and the choices."""
    if value not in allowed:
        raise error(f"{key}: {value!r} is not allowed; allowed: {', '.join(allowed)}")
    return value


INT_MAX = 2**63 - 1  # what the results tables (parquet int64) can hold: a spec accepts no more


def check_int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise SpecError(f"{key}: expected {what}, got {value!r}")
    if value > INT_MAX:
        raise SpecError(f"{key}: {value} is more than the results tables hold; allowed: up to 2**63 − 1")
    return value


def check_float(key: str, value, minimum: float | None = None, max_exclusive: float | None = None) -> float:
    bounds = "> 0" if minimum is None else f"≥ {minimum:g}"
    bounds += f" and < {max_exclusive:g}" if max_exclusive is not None else ""
    is_number = not isinstance(value, bool) and isinstance(value, (int, float))
    if (
        not is_number
        or not math.isfinite(value)
        or (minimum is None and value <= 0)
        or (minimum is not None and value < minimum)
        or (max_exclusive is not None and value >= max_exclusive)
    ):
        raise SpecError(f"{key}: expected a number {bounds} (finite), got {value!r}")
    return float(value)


def check_value(key: str, value, annotation, metadata) -> object:
    """Check one value against a dataclass field's annotation and bounds."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return check_value(key, value, next(a for a in args if a is not type(None)), metadata)
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        return check_int(key, value, minimum=metadata.get("min", 1))
    if annotation is float:
        return check_float(key, value, metadata.get("min"), metadata.get("max_exclusive"))
    if annotation is str:
        if "choices" in metadata:  # a str field with a fixed set of values (field metadata)
            return check_choice(key, value, tuple(metadata["choices"]))
        return check_str(key, value)
    if annotation is dict:  # a table of scalars passed on as they are (e.g. [executor] sbatch)
        table = as_table(key, value)
        for name, item in table.items():
            if not isinstance(item, (str, int, float, bool)):
                raise SpecError(f"{key}.{name}: expected a string, number or true/false, got {item!r}")
        return dict(table)
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise SpecError(f"{key}: expected a non-empty list, got []")
        for item in items:  # as the axes do: a repeated value would be one cell, silently
            if items.count(item) > 1:
                raise SpecError(f"{key}: {item!r} is listed twice; list each value once")
        return tuple(check_value(f"{key}", item, args[0], metadata) for item in items)
    raise TypeError(f"no checker for {annotation!r}")  # a programming error, not a user one


def check_section(section: str, table: dict, cls) -> object:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    reject_unknown(section, table, tuple(fields))
    values = {k: check_value(f"{section}.{k}", v, hints[k], fields[k].metadata) for k, v in table.items()}
    return cls(**values)
