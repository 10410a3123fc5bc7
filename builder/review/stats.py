"""Agreement statistics on confusion tables: raw agreement, Cohen's kappa, seeded bootstrap intervals.

Items are the unit of resampling (a pair, with all the verdicts given on it), each carrying its
counts in a flat confusion table, so one bootstrap resample is a weighted sum of item tables::

    counts = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]])     # 2x2 tables, flattened, per item
    estimate(counts, kappa, resamples=2000, seed=0)                    # Estimate(n=3, value=..., ci=(..., ...))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
MIN_RESAMPLES = 100


def _square(tables: np.ndarray) -> np.ndarray:
    m = int(round(np.sqrt(tables.shape[-1])))
    return tables.reshape(*tables.shape[:-1], m, m)


def agreement(tables: np.ndarray) -> np.ndarray:
    """Share of the diagonal, per flattened square table (rows: one rater, columns: the other); nan when empty."""
    t = _square(np.asarray(tables, dtype=float))
    n = t.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(t, axis1=-2, axis2=-1) / n


def kappa(tables: np.ndarray) -> np.ndarray:
    """Cohen's kappa (p_o - p_e) / (1 - p_e), per flattened square table; nan where p_e = 1 (one category only)."""
    t = _square(np.asarray(tables, dtype=float))
    n = t.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.trace(t, axis1=-2, axis2=-1) / n
        p_e = (t.sum(axis=-1) * t.sum(axis=-2)).sum(axis=-1) / n**2
        out = (p_o - p_e) / (1 - p_e)
    return np.where(np.isclose(p_e, 1.0), np.nan, out)


def share_first(tables: np.ndarray) -> np.ndarray:
    """Share of the first of two counts (e.g. picks of A among picks of A or B); nan when both are 0."""
    t = np.asarray(tables, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return t[..., 0] / t.sum(axis=-1)


@dataclass(frozen=True)
class Estimate:
    n: int  # observations in the table (verdicts, answers), not items
    value: float | None
    ci: tuple[float, float] | None  # percentile bootstrap interval at LEVEL, None when undefined

    def to_dict(self) -> dict:
        return {"n": self.n, "value": _round(self.value), "ci": [_round(x) for x in self.ci] if self.ci else None}


def bootstrap(counts: np.ndarray, statistic, *, resamples: int, seed: int, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile interval of ``statistic`` over resamples of the items (rows of ``counts``), drawn with ``seed``.

    A resample draws len(counts) items with replacement: the multinomial weights of the items times their
    tables give the resampled table. Resamples where the statistic is undefined (nan) are left out.
    """
    counts = np.asarray(counts, dtype=float)
    if len(counts) == 0:
        return None
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(counts), np.full(len(counts), 1 / len(counts)), size=resamples)
    values = statistic(weights @ counts)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    tail = (1 - level) / 2
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def estimate(counts: np.ndarray, statistic, *, resamples: int, seed: int) -> Estimate:
    """The statistic on all items' summed table, with its bootstrap interval."""
    counts = np.asarray(counts, dtype=float).reshape(len(counts), -1) if len(counts) else np.zeros((0, 1))
    total = counts.sum(axis=0)
    value = float(statistic(total[None, :])[0]) if len(counts) else float("nan")
    observations = int(total.sum())
    if np.isnan(value):
        return Estimate(observations, None, None)
    return Estimate(observations, value, bootstrap(counts, statistic, resamples=resamples, seed=seed))


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)
