"""Argument checks with one error format: the name, the value, the rule and the fix.

    check("batch_size", 0, POSITIVE_INT, "pass e.g. batch_size=32")
    -> ValueError: batch_size=0: must be an int >= 1; pass e.g. batch_size=32

A frozen config validates its fields once, in ``__post_init__``, with ``validate``: the
fix it names is the field's default. A leaf module (it imports nothing from tvlib), so
that every module can use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable


@dataclass(frozen=True)
class Rule:
    """A predicate on a value and the words that state it ("must be an int >= 1")."""

    holds: Callable[[Any], bool]
    text: str


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "must be an int >= 1")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "must be an int >= 0")
INT = Rule(_is_int, "must be an int")
OPTIONAL_INT = Rule(lambda v: v is None or _is_int(v), "must be an int or None")
OPTIONAL_POSITIVE_INT = Rule(lambda v: v is None or (_is_int(v) and v >= 1),
                             "must be an int >= 1 or None")
FINITE = Rule(_is_real, "must be a finite number")
POSITIVE = Rule(lambda v: _is_real(v) and v > 0, "must be a finite number > 0")
NON_NEGATIVE = Rule(lambda v: _is_real(v) and v >= 0, "must be a finite number >= 0")
FRACTION = Rule(lambda v: _is_real(v) and 0 < v < 1, "must be a fraction in (0, 1)")
FLAG = Rule(lambda v: isinstance(v, bool), "must be True or False")


def one_of(choices) -> Rule:
    """The value is one of ``choices`` (a string is never taken for a list of letters)."""
    choices = tuple(choices)
    return Rule(lambda v: isinstance(v, type(choices[0])) and v in choices,
                "must be one of " + ", ".join(repr(c) for c in choices))


def distinct(rule: Rule, allow_empty: bool = False) -> Rule:
    """A tuple of values, each one passing ``rule``, none listed twice."""
    def holds(values) -> bool:
        return (isinstance(values, tuple) and (allow_empty or len(values) > 0)
                and all(rule.holds(v) for v in values) and len(set(values)) == len(values))
    return Rule(holds, f"must be a {'' if allow_empty else 'non-empty '}list of distinct "
                       f"values that each {rule.text.removeprefix('must ')}")


def check(name: str, value, rule: Rule, fix: str):
    """``value`` when it passes ``rule``; else a ValueError naming name, value, rule and fix."""
    if not rule.holds(value):
        raise ValueError(f"{name}={value!r}: {rule.text}; {fix}")
    return value


def validate(config, **rules: Rule) -> None:
    """Check fields of a frozen dataclass (from its ``__post_init__``); lists given for
    tuple fields (as notebooks and YAML files give them) are kept as tuples first. The
    fix each error names is the field's default."""
    name = type(config).__name__
    fields = {f.name: f for f in dataclasses.fields(config)}
    for field_name, rule in rules.items():
        value = getattr(config, field_name)
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, field_name, value)
        check(f"{name}.{field_name}", value, rule, f"pass e.g. {field_name}="
              f"{_default_text(fields[field_name])}")


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return "..."
    return repr(list(default) if isinstance(default, tuple) else default)


def check_config(name: str, config, cls: type):
    """``config`` when it is a ``cls``; else an error naming the argument and the fix."""
    if not isinstance(config, cls):
        raise ValueError(f"{name} must be a {cls.__name__}, not {type(config).__name__} "
                         f"({config!r}); pass e.g. {cls.__name__}() with the settings to change")
    return config
