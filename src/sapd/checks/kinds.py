"""The kinds of value the application's own settings accept, built on :mod:`sapd.models.setting_rules`:
image sizes, epoch milestones, Lightning's batch limits and device lists, an inference device."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import ListConfig

from sapd.models.setting_rules import Rule, is_int


def sizes(low: int = 1) -> Rule:
    """An integer >= low, or a list of them (a size drawn per image: scale jitter)."""

    def test(v: Any) -> bool:
        values = list(v) if isinstance(v, (list, tuple, ListConfig)) else [v]
        return bool(values) and all(is_int(x) and x >= low for x in values)

    return Rule(f"an integer >= {low} or a non-empty list of them", test)


def milestones() -> Rule:
    def test(v: Any) -> bool:
        values = list(v) if isinstance(v, (list, tuple, ListConfig)) else None
        return values is not None and all(is_int(x) and x >= 0 for x in values)

    return Rule("a list of epoch indices (integers >= 0)", test)


def batches(zero: bool) -> Rule:
    """Lightning's ``limit_*_batches``: a count of batches, or a fraction of the epoch."""
    low = 0 if zero else 1

    def test(v: Any) -> bool:
        if is_int(v):
            return v >= low
        return isinstance(v, float) and math.isfinite(v) and (v >= 0.0 if zero else v > 0.0) and v <= 1.0

    frac = "[0, 1]" if zero else "(0, 1]"
    return Rule(f"an integer >= {low} (batches) or a fraction in {frac} of the epoch", test, "all")


def devices() -> Rule:
    def test(v: Any) -> bool:
        if is_int(v):
            return v >= 1 or v == -1
        if isinstance(v, str):
            return v == "auto" or all(p.strip().isdigit() for p in v.split(",") if p.strip()) and v.strip() != ""
        if isinstance(v, (list, tuple, ListConfig)):
            return bool(v) and all(is_int(x) and x >= 0 for x in v)
        return False

    return Rule("an integer >= 1, -1 (all), 'auto' or a list of device indices", test)


def device() -> Rule:
    def test(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        name, _, index = v.partition(":")
        return name in ("auto", "cpu", "cuda", "mps") and (not index or (name == "cuda" and index.isdigit()))

    return Rule("auto, cpu, cuda, cuda:N or mps", test)
