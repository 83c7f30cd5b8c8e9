"""Paired-seed statistics for :mod:`sapd.report.comparison` (docs/statistics.md).

Two settings trained with the same seed see the same data order and, where their models are built
in the same order, start from the same weights, so the per-seed difference removes the noise the two
runs share. For ``n`` such differences ``d``: their mean, sample standard deviation ``s``, the 95 %
t-interval ``mean ± t(0.975, n-1) s / sqrt(n)``, and the number of paired seeds a given effect needs.

The t quantiles come from Student's t distribution function for integer degrees of freedom in closed
form (Abramowitz & Stegun 26.7.3-4), inverted by bisection: exact to the bisection's tolerance, with
no SciPy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05  # two-sided
POWER = 0.80
EFFECT = 1.0  # AP points
MAX_SEEDS = 10_000


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with ``dof`` (>= 1, integer) degrees of freedom."""
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"degrees of freedom must be a positive integer, got {dof}")
    dof = int(dof)
    theta = math.atan2(t, math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        inner = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        inner = s * total
    return 0.5 + 0.5 * inner  # inner is P(|T| < t) with the sign of t


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, dof)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def seeds_needed(sd: float, effect: float = EFFECT, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Paired seeds for a two-sided paired t-test at ``alpha`` to detect ``effect`` with ``power`` when
    the differences spread by ``sd``: the smallest n >= 2 with n >= ((t(1-alpha/2, n-1) + t(power, n-1)) sd /
    effect)^2, found by increasing n (the t form of the normal-approximation formula; it differs from the
    noncentral-t power by under one seed for n >= 3). None when ``sd`` is unknown."""
    if sd is None or math.isnan(sd) or effect <= 0:
        return None
    ratio = (sd / effect) ** 2
    for n in range(2, MAX_SEEDS):
        dof = n - 1
        if n >= (t_quantile(1 - alpha / 2, dof) + t_quantile(power, dof)) ** 2 * ratio:
            return n
    return MAX_SEEDS


@dataclass
class Paired:
    """Per-seed differences (B - A) and their summary."""

    seeds: list
    diffs: list[float]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs) if self.diffs else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.diffs) if self.n > 1 else math.nan

    def interval(self, level: float = 1 - ALPHA) -> tuple[float, float]:
        """The t-interval of the mean difference (NaN with fewer than 2 differences)."""
        if self.n < 2:
            return math.nan, math.nan
        half = t_quantile(0.5 + level / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return self.mean - half, self.mean + half

    def seeds_needed(self, effect: float = EFFECT) -> int | None:
        return seeds_needed(self.sd, effect)


def pair(a: dict, b: dict) -> Paired:
    """``b[s] - a[s]`` for every seed ``s`` in both (``{seed: value}``), in seed order."""
    seeds = sorted(set(a) & set(b), key=lambda s: (s is None, s))
    return Paired(seeds=seeds, diffs=[b[s] - a[s] for s in seeds])


def format_signed(values: Sequence[float], seeds: Sequence) -> str:
    return ", ".join(f"{v:+.1f} (s{s})" for v, s in zip(values, seeds))
