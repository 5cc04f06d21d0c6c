"""Config sections as dataclasses, and the single-value checks they share.

`structured` types a plain dict (a section of a composed config, a checkpoint's, a test's) through its
dataclass; the checks below refuse one value each. Every failure is a ConfigError naming the key, the bad
value and what is allowed. Kept at the bottom of the package so that each section's dataclass can check
itself beside its component (data, routers, losses) without importing `testbed.config`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from enum import Enum
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from testbed.errors import ConfigError


def plain(config: Any) -> Any:
    """A config dataclass as plain dicts, lists and scalars (Enum members as their string value): for
    summary.json, checkpoint hyperparameters and YAML, which must not depend on testbed's classes."""

    def factory(items: list[tuple[str, Any]]) -> dict:
        return {key: value.value if isinstance(value, Enum) else value for key, value in items}

    return dataclasses.asdict(config, dict_factory=factory)


def lookup(node: Any, dotted: str) -> Any:
    """The raw value at `dotted` in a nested dict (None when absent)."""
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def type_name(annotation: Any) -> str:
    """What a field of this type allows, in words ("an integer", "one of ['a', 'b']")."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return f"one of {[member.value for member in annotation]}"
    names = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def field_type(schema: type, dotted: str) -> Any:
    """The annotated type of a (nested) dataclass field, or None."""
    for part in dotted.split("."):
        hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
        if part not in hints:
            return None
        schema = hints[part]
    return schema


def structured(section: str, schema: type, node: Any, fields_of: str | None = None) -> Any:
    """Merge `node` into the dataclass `schema`: unknown keys, values of the wrong type (a string for a
    bool, int or float field) and values outside an Enum field's options fail with the key, the value and
    what is allowed (`fields_of` names the schema in the unknown-key message)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node if node is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        full_key = getattr(err, "full_key", None) or ""
        key = f"{section}.{full_key}" if full_key else section
        value = getattr(err, "value", None)
        if value is None and full_key:
            value = lookup(node, full_key)
        expected = field_type(schema, full_key) if full_key else None
        if expected is None:
            parent = field_type(schema, full_key.rpartition(".")[0]) if "." in full_key else schema
            is_schema = dataclasses.is_dataclass(parent)
            fields = sorted(f.name for f in dataclasses.fields(parent)) if is_schema else []
            owner = fields_of if parent is schema and fields_of else f"the fields of {parent.__name__}"
            allowed = f"{owner}: {fields}"
        else:
            allowed = type_name(expected)
        raise ConfigError(key, value, allowed) from None


def refuse_non_finite(node: Any, key: str = "") -> None:
    """No option takes NaN or infinity: the first one found anywhere in the config is refused by name
    (a NaN slips through every `<` and `>` check, and an infinite rate or weight diverges later)."""
    if isinstance(node, dict):
        for name, value in node.items():
            refuse_non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            refuse_non_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(key, node, "a finite number (no option takes NaN or infinity)")


def strict_bool(key: str, value: Any) -> bool:
    """Exactly true or false (not a string such as "yes", which OmegaConf would read as true)."""
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def positive(key: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "a positive integer")


def integer(key: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an integer in [low, high] (booleans and strings are not integers)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ConfigError(key, value, allowed)
    return value


def in_range(
    key: str, value: float, low: float, high: float | None, low_open: bool = False, high_open: bool = False
) -> None:
    """`value` in [low, high] (or the open ends asked for); no upper bound when `high` is None."""
    bad = value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        allowed = (
            f"a number in {lo}{low}, {high}{hi}"
            if high is not None
            else (f"a number {'>' if low_open else '>='} {low}")
        )
        raise ConfigError(key, value, allowed)
