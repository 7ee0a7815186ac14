"""Paired bootstrap confidence intervals for the study's measures.

The study compares every quantized cell with its model's full-precision cell on the *same* units: the
same task items (accuracy, flips) and the same masked text windows (KL, ELBO). Resampling the units
jointly - one set of resampled indices per unit kind, shared by every setting of a model - keeps that
pairing, so the noise that FP and the cell share (which item is hard, which window is odd) cancels in
their difference, and any contrast between two settings (A's drop minus B's drop) gets its interval
from the same replicates.

    rs = Resampler({"mini_math": 100, "windows": 32}, reps=2000, seed=0)
    reps = rs.mean("windows", kl_values)          # [reps] bootstrap means
    lo, hi = percentile_ci(reps)

Percentile intervals (level 95 % unless told); numpy only, seeded, so a report is reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
REPS = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    value: float
    lo: float
    hi: float
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def sign(self) -> int:
        """+1 when the interval lies above 0, -1 below, 0 when it contains 0."""
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0

    def scaled(self, k: float) -> "Interval":
        lo, hi = sorted((self.lo * k, self.hi * k))
        return Interval(self.value * k, lo, hi, self.level)

    def text(self, digits: int = 1, scale: float = 1.0) -> str:
        """'1.2 [0.4, 2.0]'."""
        v = self.scaled(scale)
        return f"{v.value:.{digits}f} [{v.lo:.{digits}f}, {v.hi:.{digits}f}]"


def percentile_ci(reps: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The (lo, hi) percentile interval of bootstrap replicates (NaN replicates ignored)."""
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def interval(value: float, reps: np.ndarray, level: float = LEVEL) -> Interval:
    lo, hi = percentile_ci(reps, level)
    return Interval(float(value), lo, hi, level)


class Resampler:
    """Shared bootstrap indices per unit kind: `sizes` maps a kind (a task, "windows") to its unit count.
    Every call for one kind uses the same [reps, n] index matrix, which is what pairs the settings."""

    def __init__(self, sizes: Mapping[str, int], reps: int = REPS, seed: int = 0):
        self.reps = int(reps)
        self.sizes = dict(sizes)
        self._idx: dict[str, np.ndarray] = {}
        self._seed = seed

    def indices(self, kind: str) -> np.ndarray:
        if kind not in self._idx:
            n = self.sizes[kind]
            # a generator per kind seeded by (seed, kind): adding a kind never changes another's draws
            rng = np.random.default_rng([self._seed, *kind.encode("utf-8")])
            self._idx[kind] = rng.integers(0, n, size=(self.reps, n)) if n else np.zeros((self.reps, 0), int)
        return self._idx[kind]

    def mean(self, kind: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """[reps] means of `values` (one per unit of `kind`, in unit order) over the resampled units."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[0] != self.sizes[kind]:
            raise ValueError(f"{kind}: {v.shape[0]} values for {self.sizes[kind]} units")
        if v.shape[0] == 0:
            return np.full(self.reps, np.nan)
        return v[self.indices(kind)].mean(axis=1)


def mean_interval(values: Sequence[float], reps: int = REPS, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of `values` with its bootstrap interval (units resampled)."""
    rs = Resampler({"units": len(values)}, reps, seed)
    return interval(float(np.mean(values)) if len(values) else math.nan, rs.mean("units", values), level)


def paired_delta(a: Sequence[float], b: Sequence[float], reps: int = REPS, seed: int = 0,
                 level: float = LEVEL) -> Interval:
    """mean(a) - mean(b) over paired units (a[i] and b[i] measured on the same unit), with its paired
    bootstrap interval: the units are resampled once for both."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return mean_interval(diff, reps, seed, level)


__all__ = ["Interval", "LEVEL", "REPS", "Resampler", "interval", "mean_interval", "paired_delta", "percentile_ci"]
