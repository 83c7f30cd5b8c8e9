"""What a setting accepts: the kinds of value (:func:`integer`, :func:`number`, :func:`flag`, :func:`one_of`,
:func:`text`), each a :class:`Rule` with the one-line text that names it.

A model's settings declare their rule in their dataclass field's metadata (``rule``):
:func:`check_fields` refuses a value outside it when the object is built, and the commands' table of
every setting (:data:`sapd.checks.SETTINGS`) reads the same rules with :func:`field_rules`, so each
range is written once. The rules of the application's own settings (sizes, devices, ...) build on
these in :mod:`sapd.checks.kinds`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a setting accepts: ``test(value)`` for a non-null value, described by ``text``; ``null``
    says what null means (None: null is refused)."""

    text: str
    test: Callable[[Any], bool]
    null: str | None = None

    def describe(self) -> str:
        return f"{self.text} (or null: {self.null})" if self.null else self.text

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.null is not None
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False

    def refusal(self, key: str, value: Any) -> str:
        """The one line that refuses ``value`` for the setting ``key``."""
        return f"{key} must be {self.describe()}; got {value!r}"


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def fmt(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {fmt(high)}"
    return ""


def _within(v: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return not (high is not None and (v >= high if high_open else v > high))


def integer(
    low: int | None = None, high: int | None = None, *, null: str | None = None, also: Mapping[Any, str] | None = None
) -> Rule:
    """An integer in [low, high]; ``also``: other values allowed, with their meaning (``{-1: "no limit"}``)."""
    also = dict(also or {})
    text = " ".join(p for p in ("an integer", _bounds(low, high, False, False)) if p)
    if also:
        text += "".join(f" or {v!r} ({why})" if isinstance(v, str) else f" or {v} ({why})" for v, why in also.items())
    return Rule(text, lambda v: (is_int(v) and _within(v, low, high, False, False)) or v in also, null)


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    null: str | None = None,
) -> Rule:
    """A finite number (an integer is one too) in the given range."""
    text = " ".join(p for p in ("a finite number", _bounds(low, high, low_open, high_open)) if p)
    return Rule(text, lambda v: is_number(v) and _within(float(v), low, high, low_open, high_open), null)


def flag(null: str | None = None) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), null)


def one_of(*choices: Any, null: str | None = None) -> Rule:
    text = "one of " + ", ".join(str(c) for c in choices)
    return Rule(text, lambda v: not isinstance(v, bool) and v in choices, null)


def text(null: str | None = None) -> Rule:
    return Rule("a non-empty text", lambda v: isinstance(v, str) and v.strip() != "", null)


def field_rules(cls: type) -> dict[str, Rule]:
    """The rule of each field of the dataclass ``cls`` that declares one (metadata ``rule``), in declaration order."""
    return {f.name: f.metadata["rule"] for f in fields(cls) if "rule" in f.metadata}


def check_fields(obj: Any, node: str) -> None:
    """Raises ValueError naming the first field of the dataclass ``obj`` whose value its rule refuses,
    as the setting ``node.<field>`` (the config node the object is built from)."""
    for name, rule in field_rules(type(obj)).items():
        value = getattr(obj, name)
        if not rule.allows(value):
            raise ValueError(rule.refusal(f"{node}.{name}", value))
