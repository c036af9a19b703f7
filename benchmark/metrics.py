"""Continual-learning metrics over accuracy matrices, pinned to ``docs/metrics.md``.

Inputs (scores 0-100): ``R`` is (T+1) x T, ``R[t][i]`` = downstream task i+1 after stage t (row 0 = base model);
``G`` is (T+1) x M, ``G[t][j]`` = general benchmark j after stage t; ``floor[j]`` = measured floor f_j of
benchmark j and ``task_floors[i-1]`` = measured floor f_i of downstream task i (the best answer-blind score on
the test split, :mod:`tasks.floors`).
Every metric returns a :class:`MetricValue`; an undefined metric has ``value=None`` and a reason, never 0.
Indices in the docstrings are 1-based for tasks (as in docs/metrics.md); column i-1 of ``R`` holds task i.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MetricValue:
    """A metric result: ``value`` is None exactly when the metric is undefined, and ``reason`` then says why."""

    value: float | None
    reason: str | None = None


def _ok(x: float) -> MetricValue:
    return MetricValue(float(x), None)


def _undef(reason: str) -> MetricValue:
    return MetricValue(None, reason)


def _matrix(x: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)  # None cells become NaN, i.e. "not measured"
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be a rectangular numeric matrix: {e}") from None
    if np.isinf(a).any():
        raise ValueError(f"{name} contains infinite values; scores must be in 0-100 (NaN marks a missing cell)")
    return a


def _as_R(R: Any) -> np.ndarray:
    a = _matrix(R, "R")
    if a.ndim != 2 or a.shape[1] < 1 or a.shape[0] != a.shape[1] + 1:
        raise ValueError(f"R must be (T+1) x T with T >= 1 (row 0 = base model); got shape {a.shape}")
    return a


def _as_G(G: Any) -> np.ndarray:
    a = _matrix(G if G is not None else [], "G")
    if a.size == 0:  # M = 0: no general benchmarks; general metrics become undefined, not an error
        return np.zeros((a.shape[0] if a.ndim == 2 else 0, 0))
    if a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"G must be (T+1) x M with T >= 1 (row 0 = base model); got shape {a.shape}")
    return a


def _floats(values: Any, missing: float) -> np.ndarray:
    """1-D float array of ``values``, None entries replaced by ``missing``."""
    raw = np.asarray(values if values is not None else [], dtype=object).reshape(-1)
    return np.array([missing if v is None else v for v in raw], dtype=float)


def _as_floor(floor: Any, m: int) -> np.ndarray:
    """Floors f_j of the M general benchmarks; None (floor unknown: an lm-eval built-in task) counts as 0."""
    f = _floats(floor, 0.0)
    if f.shape[0] != m:
        raise ValueError(f"floor must have one entry per general benchmark (M = {m}); got {f.shape[0]}")
    if not np.all((f >= 0) & (f <= 100)):  # NaN fails too
        raise ValueError(f"floors must be in [0, 100]; got {f.tolist()}")
    return f


def _missing(a: np.ndarray, rows: Any, cols: Any, name: str) -> str | None:
    """Reason string if any used cell a[rows, cols] is NaN (a missing measurement), else None."""
    sub = np.full(a.shape, False)
    sub[rows, cols] = True
    bad = np.argwhere(sub & np.isnan(a))
    if len(bad) == 0:
        return None
    cells = ", ".join(f"{name}[{t}][{i}]" for t, i in bad[:3].tolist()) + (" ..." if len(bad) > 3 else "")
    return f"missing (NaN) cell(s) {cells}"


# -- downstream metrics (R) -------------------------------------------------------------------------------
def final_avg(R: Any) -> MetricValue:
    """final_avg = (1/T) sum_i R[T][i]."""
    a = _as_R(R)
    T = a.shape[1]
    return _undef(r) if (r := _missing(a, T, slice(None), "R")) else _ok(a[T].mean())


def avg_incremental(R: Any) -> MetricValue:
    """avg_incremental = (1/T) sum_{t=1..T} (1/t) sum_{i<=t} R[t][i]  (iCaRL)."""
    a = _as_R(R)
    T = a.shape[1]
    rows, cols = np.tril_indices(T)  # (t-1, i-1) for i <= t
    if r := _missing(a, rows + 1, cols, "R"):
        return _undef(r)
    return _ok(np.mean([a[t, :t].mean() for t in range(1, T + 1)]))


def plasticity(R: Any) -> MetricValue:
    """plasticity = (1/T) sum_i R[i][i]  (score right after learning each task)."""
    a = _as_R(R)
    k = np.arange(a.shape[1])
    return _undef(r) if (r := _missing(a, k + 1, k, "R")) else _ok(a[k + 1, k].mean())


def plasticity_floor_margin(R: Any, task_floors: Sequence[float | None] | None = None) -> MetricValue:
    """plasticity_floor_margin = min_i (R[i][i] - f_i), f_i = measured floor of task i.

    How far the least-learned task sits above its floor right after learning it: a task at or below its floor
    (margin <= 0) was not learned beyond answer-blind guessing, whatever the mean plasticity says.
    """
    a = _as_R(R)
    T = a.shape[1]
    if task_floors is None:
        return _undef("no task floors")
    f = _floats(task_floors, math.nan)  # None = not recorded (records before schema 1.5)
    if f.shape[0] != T:
        raise ValueError(f"task_floors must have one floor per task (T = {T}); got {f.shape[0]}")
    if np.isnan(f).all():
        return _undef("no task floors recorded (records before schema 1.5 have none)")
    if np.isnan(f).any():
        return _undef(f"missing floor for task(s) {(np.flatnonzero(np.isnan(f)) + 1).tolist()}")
    if not np.all((f >= 0) & (f <= 100)):
        raise ValueError(f"task floors must be in [0, 100]; got {f.tolist()}")
    k = np.arange(T)
    return _undef(r) if (r := _missing(a, k + 1, k, "R")) else _ok(np.min(a[k + 1, k] - f))


def bwt(R: Any) -> MetricValue:
    """bwt = (1/(T-1)) sum_{i<T} (R[T][i] - R[i][i])  (GEM; divided by T-1; negative = forgetting)."""
    a = _as_R(R)
    T = a.shape[1]
    if T == 1:
        return _undef("undefined for T = 1: no task is followed by a later stage")
    k = np.arange(T - 1)  # tasks 1..T-1 -> columns 0..T-2
    if (r := _missing(a, k + 1, k, "R")) or (r := _missing(a, T, k, "R")):
        return _undef(r)
    return _ok(np.mean(a[T, k] - a[k + 1, k]))


def forgetting(R: Any) -> MetricValue:
    """forgetting = (1/(T-1)) sum_{j<T} (max_{l in j..T-1} R[l][j] - R[T][j])  (Chaudhry et al. 2018).

    The max runs only over stages at or after learning task j (docs/metrics.md), so a high zero-shot score before
    training on task j never counts. Not clamped: a task that ends above all its earlier scores gives f_j < 0.
    """
    a = _as_R(R)
    T = a.shape[1]
    if T == 1:
        return _undef("undefined for T = 1: no task is followed by a later stage")
    jj, ll = np.triu_indices(T - 1)  # pairs (j-1, l-1) with j <= l <= T-1: cell R[l][j-1]
    if (r := _missing(a, ll + 1, jj, "R")) or (r := _missing(a, T, np.arange(T - 1), "R")):
        return _undef(r)
    return _ok(np.mean([a[j:T, j - 1].max() - a[T, j - 1] for j in range(1, T)]))


def fwt(R: Any) -> MetricValue:
    """fwt = (1/(T-1)) sum_{i=2..T} (R[i-1][i] - R[0][i])  (baseline = base model row 0, not random init)."""
    a = _as_R(R)
    T = a.shape[1]
    if T == 1:
        return _undef("undefined for T = 1: no task is preceded by a training stage")
    k = np.arange(1, T)  # task i = k+1 sits in column k; stage i-1 = row k
    if (r := _missing(a, k, k, "R")) or (r := _missing(a, 0, k, "R")):
        return _undef(r)
    return _ok(np.mean(a[k, k] - a[0, k]))


def intransigence(R: Any, reference: Sequence[float | None] | None = None) -> MetricValue:
    """intransigence = (1/T) sum_k (a*_k - R[k][k]), a*_k = joint-training reference score on task k (Chaudhry)."""
    a = _as_R(R)
    T = a.shape[1]
    if reference is None:
        return _undef("needs a joint/multi-task reference score per task; none given")
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if ref.shape[0] != T:
        raise ValueError(f"reference must have one score per task (T = {T}); got {ref.shape[0]}")
    k = np.arange(T)
    if np.isnan(ref).any():
        return _undef(f"missing (NaN) reference score for task(s) {(np.flatnonzero(np.isnan(ref)) + 1).tolist()}")
    return _undef(r) if (r := _missing(a, k + 1, k, "R")) else _ok(np.mean(ref - a[k + 1, k]))


# -- general-knowledge metrics (G) ------------------------------------------------------------------------
def _normalise(g: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Open LLM Leaderboard: max(0, (G - f_j) / (100 - f_j)) * 100 per benchmark (NaN stays NaN)."""
    return np.maximum(0.0, (g - f) / (100.0 - f)) * 100.0


def _rows_mean(G: Any, rows: list[int] | None, floor: Any = None) -> tuple[np.ndarray | None, str | None]:
    """Per-row means of G (floor-normalised if ``floor`` is given) over the requested rows, or (None, reason)."""
    g = _as_G(G)
    if g.shape[1] == 0:
        return None, "no general benchmarks (M = 0)"
    if floor is not None:
        f = _as_floor(floor, g.shape[1])
        if (top := np.flatnonzero(f == 100)).size:  # a measured floor can be 100 (one answer everywhere)
            return None, f"floor of general benchmark(s) {(top + 1).tolist()} is 100: nothing to normalise by"
        g = _normalise(g, f)
    rows = list(range(g.shape[0])) if rows is None else [r % g.shape[0] for r in rows]  # -1 = row T
    if r := _missing(g, rows, slice(None), "G"):
        return None, r
    return g.mean(axis=1), None


def general_base(G: Any) -> MetricValue:
    """general_base = (1/M) sum_j G[0][j]."""
    m, r = _rows_mean(G, [0])
    return _undef(r) if m is None else _ok(m[0])


def general_final(G: Any) -> MetricValue:
    """general_final = (1/M) sum_j G[T][j]."""
    m, r = _rows_mean(G, [-1])
    return _undef(r) if m is None else _ok(m[-1])


def general_delta(G: Any) -> MetricValue:
    """general_delta = general_final - general_base  (TRACE's general-ability delta; negative = forgetting)."""
    m, r = _rows_mean(G, [0, -1])
    return _undef(r) if m is None else _ok(m[-1] - m[0])


def general_delta_norm(G: Any, floor: Sequence[float | None]) -> MetricValue:
    """general_delta_norm = mean_j (N[T][j] - N[0][j]), N = max(0, (G - f_j)/(100 - f_j)) * 100."""
    # mean of per-benchmark deltas equals the delta of per-row means, since every benchmark has weight 1/M
    m, r = _rows_mean(G, [0, -1], floor)
    return _undef(r) if m is None else _ok(m[-1] - m[0])


def _ratio(m: np.ndarray | None, r: str | None, what: str) -> MetricValue:
    if m is None:
        return _undef(r or "")
    if m[0] == 0:
        return _undef(f"{what} is 0, so the ratio final / base is undefined")
    return _ok(m[-1] / m[0])


def general_retention(G: Any) -> MetricValue:
    """general_retention = general_final / general_base  (1.0 = nothing forgotten)."""
    return _ratio(*_rows_mean(G, [0, -1]), "general_base")


def general_retention_norm(G: Any, floor: Sequence[float | None]) -> MetricValue:
    """general_retention_norm = mean_j N[T][j] / mean_j N[0][j], N as in general_delta_norm."""
    return _ratio(*_rows_mean(G, [0, -1], floor), "normalised general_base (base at or below floor everywhere)")


def general_worst_delta(G: Any) -> MetricValue:
    """general_worst_delta = min_{t=1..T} (mean_j G[t][j] - general_base).

    Convention: t runs over the trained stages 1..T only; including t = 0 would clamp the value at <= 0 and hide
    a sequence that never dips below the base model (the value may then be positive).
    """
    m, r = _rows_mean(G, None)
    return _undef(r) if m is None else _ok(np.min(m[1:] - m[0]))


# name -> (function, higher_is_better, one-line definition); the leaderboard shows the definitions as-is
METRICS: dict[str, tuple[Callable[..., MetricValue], bool, str]] = {
    "final_avg": (final_avg, True, "(1/T) sum_i R[T][i]: mean score on all tasks after the last stage"),
    "avg_incremental": (avg_incremental, True, "(1/T) sum_t (1/t) sum_{i<=t} R[t][i]: iCaRL average incremental"),
    "plasticity": (plasticity, True, "(1/T) sum_i R[i][i]: score right after learning each task"),
    "plasticity_floor_margin": (plasticity_floor_margin, True,
                                "min_i (R[i][i] - f_i): how far the least-learned task sits above its floor"),
    "bwt": (bwt, True, "(1/(T-1)) sum_{i<T} (R[T][i] - R[i][i]): GEM backward transfer; negative = forgetting"),
    "forgetting": (forgetting, False, "(1/(T-1)) sum_{j<T} (max_{l=j..T-1} R[l][j] - R[T][j]): Chaudhry forgetting"),
    "fwt": (fwt, True, "(1/(T-1)) sum_{i=2..T} (R[i-1][i] - R[0][i]): forward transfer vs. the base model"),
    "intransigence": (intransigence, False, "(1/T) sum_k (a*_k - R[k][k]): gap to a joint-training reference"),
    "general_base": (general_base, True, "(1/M) sum_j G[0][j]: base model's general score"),
    "general_final": (general_final, True, "(1/M) sum_j G[T][j]: general score after the whole sequence"),
    "general_delta": (general_delta, True, "general_final - general_base: TRACE general-ability delta"),
    "general_delta_norm": (general_delta_norm, True, "mean_j delta of max(0,(G-f_j)/(100-f_j))*100: floor-normalised"),
    "general_retention": (general_retention, True, "general_final / general_base: 1.0 = nothing forgotten"),
    "general_retention_norm": (general_retention_norm, True, "general_retention on floor-normalised scores"),
    "general_worst_delta": (general_worst_delta, True, "min_{t=1..T} (mean_j G[t][j] - general_base): worst stage"),
}


def compute_all(
    R: Any, G: Any, floor: Sequence[float | None], reference: Sequence[float] | None = None,
    task_floors: Sequence[float | None] | None = None,
) -> dict[str, MetricValue]:
    """Every metric in :data:`METRICS` (same order); validates that R and G describe the same T stages.

    ``floor``: one floor per general benchmark (None counts as 0); ``task_floors``: one per downstream task
    (None: ``plasticity_floor_margin`` is undefined).
    """
    a, g = _as_R(R), _as_G(G)
    if g.shape[1] > 0 and g.shape[0] != a.shape[0]:
        raise ValueError(f"G must have T+1 = {a.shape[0]} rows like R; got {g.shape[0]}")
    _as_floor(floor, g.shape[1])
    inputs = {"R": a, "G": g, "floor": floor, "reference": reference, "task_floors": task_floors}
    # each function takes the subset of inputs it names, so METRICS stays the single list of metrics
    return {
        name: fn(**{p: inputs[p] for p in inspect.signature(fn).parameters})
        for name, (fn, _, _) in METRICS.items()
    }


# -- aggregation over seeds and the trade-off view --------------------------------------------------------
def _defined(x: float | None) -> bool:
    return x is not None and not math.isnan(x)


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """mean and sample std (ddof=1) over the defined values; std is None for n < 2, mean None for n = 0."""
    v = np.array([x for x in values if _defined(x)], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=1)) if len(v) >= 2 else None,
        "n": int(len(v)),
    }


Point = tuple[float | None, float | None]


def _known(x: Any) -> bool:
    """A number that is not None or NaN (table cells may also hold pandas' missing value)."""
    try:
        return x is not None and not math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def _margin(a: Any, b: Any) -> float | None:
    """The noise of one axis for a pair: the larger std that is defined; None when neither row has one."""
    stds = [float(x) for x in (a, b) if _known(x)]
    return max(stds) if stds else None


def dominates(b: Point, a: Point, b_std: Point = (None, None), a_std: Point = (None, None)) -> bool:
    """True when ``b`` beats ``a`` beyond seed noise on the trade-off (both coordinates higher-is-better).

    On an axis with a noise margin m (:func:`_margin`), b must be higher by more than m; on an axis without one
    (both rows n < 2), b must be >= a; and b must be higher on at least one axis -- with no margin at all this
    is the plain Pareto rule (>= on both, > on one), so single-seed rows compare as before.
    """
    if not all(_known(x) for x in (*a, *b)):
        return False
    diffs = [float(b[i]) - float(a[i]) for i in range(2)]
    margins = [_margin(b_std[i], a_std[i]) for i in range(2)]
    return (all(d > m if m is not None else d >= 0 for d, m in zip(diffs, margins))
            and any(d > 0 for d in diffs))


def noisy_pareto_front(points: Sequence[Point], stds: Sequence[Point]) -> tuple[list[bool], list[tuple[int, int]]]:
    """Which points no other point :func:`dominates`, and the pairs (i, k) "within noise": i is >= k on both
    means and > on one (it would dominate k without noise) but not by more than the noise on both axes.

    A point with an undefined coordinate is never on the front and dominates nothing.
    """
    n = len(points)
    front = [all(_known(x) for x in points[i]) and not any(
        dominates(points[k], points[i], stds[k], stds[i]) for k in range(n) if k != i) for i in range(n)]
    within = [(i, k) for i in range(n) for k in range(n)
              if i != k and dominates(points[i], points[k]) and not dominates(points[i], points[k], stds[i], stds[k])]
    return front, within


