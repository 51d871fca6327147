"""Image quality assessment metrics: SRCC, PLCC (raw and after the 4-parameter logistic fit) and KRCC.

The IQA literature (VQEG Phase II; every NR-IQA paper since) compares predictions with mean opinion scores by rank
correlation (SRCC, KRCC) and by linear correlation after a monotonic logistic mapping of the predictions onto the
MOS scale (PLCC), so that a model is not penalised for a non-linear but monotonic relation. The mapping is

    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2

fitted by least squares (:func:`fit_logistic`). The curve may fall as well as rise, so the PLCC after the fit is
positive for a DMOS-like scale too (only the raw PLCC keeps the sign). :func:`plcc` is the Pearson correlation of
the raw scores, with no mapping.

Conventions for degenerate input (every function):

* different lengths, fewer than :data:`MIN_SAMPLES` (3) pairs, or a NaN / infinite value -> ``ValueError``; two
  points always correlate perfectly, and a NaN would silently poison every statistic;
* constant predictions or constant MOS -> ``nan`` (the correlation is undefined; scipy.stats returns ``nan`` too),
  except :func:`fit_logistic`, which raises ``ValueError`` for constant predictions (there is no curve to fit);
* :func:`plcc_logistic` with fewer than :data:`MIN_LOGISTIC_SAMPLES` (5) pairs skips the fit and returns the raw
  Pearson correlation, because with 4 points the 4 parameters interpolate them and the "correlation" is 1 by
  construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_LOGISTIC_SAMPLES",
    "MIN_SAMPLES",
    "LogisticFit",
    "fit_logistic",
    "initial_guess",
    "iqa_scores",
    "krcc",
    "logistic4",
    "plcc",
    "plcc_logistic",
    "rankdata",
    "srcc",
]

MIN_SAMPLES = 3
MIN_LOGISTIC_SAMPLES = 5


def _pairs(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 copies (see the module docstring for what is rejected)."""
    x = np.asarray(pred, dtype=np.float64).reshape(-1)
    y = np.asarray(mos, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} predictions but {y.size} MOS values")
    if x.size < MIN_SAMPLES:
        raise ValueError(f"correlations need at least {MIN_SAMPLES} samples, got {x.size}")
    bad = int((~np.isfinite(x)).sum() + (~np.isfinite(y)).sum())
    if bad:
        raise ValueError(f"{bad} NaN or infinite values among the predictions and MOS")
    return x, y


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denominator == 0.0:
        return math.nan
    # Rounding can push |r| a hair past 1 for perfectly (anti)correlated input.
    return max(-1.0, min(1.0, float(dx @ dy) / denominator))


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing the average of their ranks (``scipy.stats.rankdata(method="average")``)."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(a, kind="mergesort")
    ordered = a[order]
    # Start index of each run of equal values in sorted order; a run k..m-1 gets rank (k + 1 + m) / 2.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], a.size]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def srcc(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank)."""
    x, y = _pairs(pred, mos)
    return _pearson(rankdata(x), rankdata(y))


def plcc(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> float:
    """Pearson's linear correlation of the raw predictions with the MOS (no mapping)."""
    x, y = _pairs(pred, mos)
    return _pearson(x, y)


def krcc(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> float:
    """Kendall's tau-b (ties in either variable corrected for, as ``scipy.stats.kendalltau``'s default).

    O(n log n): discordant pairs are the inversions of the MOS ranks once the pairs are sorted by prediction (ties
    by MOS), counted with a Fenwick tree, so a 10k-image benchmark takes milliseconds rather than 50M pair tests.
    """
    x, y = _pairs(pred, mos)
    n = x.size
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    total = n * (n - 1) // 2
    ties_x = _tied_pairs(x)
    ties_y = _tied_pairs(np.sort(y))
    # Pairs tied in both: runs of equal (x, y) in the lexsorted order.
    same = np.r_[True, (x[1:] != x[:-1]) | (y[1:] != y[:-1])]
    ties_xy = _run_pairs(np.flatnonzero(same), n)
    y_rank = np.searchsorted(np.unique(y), y) + 1
    discordant = _inversions(y_rank)
    denominator = math.sqrt(float(total - ties_x) * float(total - ties_y))
    if denominator == 0.0:
        return math.nan
    # concordant - discordant = (total - ties_x - ties_y + ties_xy) - 2 * discordant
    return max(-1.0, min(1.0, float(total - ties_x - ties_y + ties_xy - 2 * discordant) / denominator))


def _tied_pairs(ordered: np.ndarray) -> int:
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return _run_pairs(starts, ordered.size)


def _run_pairs(starts: np.ndarray, n: int) -> int:
    lengths = np.diff(np.r_[starts, n]).astype(np.int64)
    return int((lengths * (lengths - 1) // 2).sum())


def _inversions(ranks: np.ndarray) -> int:
    """Pairs i < j with ranks[i] > ranks[j] (strictly; equal ranks are ties, not discordant)."""
    size = int(ranks.max())
    tree = [0] * (size + 1)
    inversions = 0
    for seen, r in enumerate(ranks.tolist()):
        # Seen so far with rank <= r, via the prefix sum; the rest of the seen ones are strictly greater.
        i, at_most = r, 0
        while i > 0:
            at_most += tree[i]
            i -= i & -i
        inversions += seen - at_most
        i = r
        while i <= size:
            tree[i] += 1
            i += i & -i
    return inversions


# ------------------------------------------------------------------------------------------- logistic mapping
def logistic4(x: np.ndarray | float, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``: b1 and b2 are the asymptotes, b3 the midpoint, |b4| the
    width. Evaluated as ``(1 + tanh(z / 2)) / 2``, the same function without overflow for large |z|."""
    z = (np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-300)
    return (b1 - b2) * 0.5 * (1.0 + np.tanh(0.5 * z)) + b2


@dataclass(frozen=True)
class LogisticFit:
    params: tuple[float, float, float, float]
    """(b1, b2, b3, b4) of :func:`logistic4`; only |b4| matters, its sign is whatever the optimiser ended on."""
    method: str
    """``"scipy"`` (curve_fit) or ``"numpy"`` (the built-in Levenberg-Marquardt)."""
    sse: float
    """Sum of squared residuals of the fit."""

    def __call__(self, x: np.ndarray | Sequence[float] | float) -> np.ndarray:
        return logistic4(np.asarray(x, dtype=np.float64), *self.params)


def initial_guess(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """b1 = max(MOS), b2 = min(MOS) (swapped when the predictions fall as the MOS rises, so a DMOS-like scale starts
    on the right branch), b3 = mean(pred), b4 = std(pred) / 4: a curve spanning the MOS range whose slope region
    covers the middle of the predictions, in the predictions' own units (a fixed b4 such as 0.5 is only sensible
    for one score scale)."""
    high, low = float(y.max()), float(y.min())
    if _pearson(x, y) < 0:
        high, low = low, high
    width = float(x.std()) / 4.0
    return high, low, float(x.mean()), width if width > 0 else 1.0


def fit_logistic(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray, *,
                 use_scipy: bool | None = None) -> LogisticFit:
    """Least-squares fit of :func:`logistic4` mapping ``pred`` onto ``mos``, from :func:`initial_guess`.

    ``use_scipy``: None uses ``scipy.optimize.curve_fit`` (Levenberg-Marquardt, ``maxfev=20000``) when scipy is
    importable and the built-in numpy Levenberg-Marquardt otherwise; True / False force one. When curve_fit gives
    up (no convergence) the numpy fit is used. Both minimise the same sum of squares from the same start, so they
    agree to optimiser tolerance; the result is never worse than the initial guess.
    """
    x, y = _pairs(pred, mos)
    if np.ptp(x) == 0:
        raise ValueError("cannot fit a logistic to constant predictions")
    start = initial_guess(x, y)
    if use_scipy is not False:
        try:
            from scipy.optimize import curve_fit
        except ImportError:
            if use_scipy:
                raise
        else:
            fitted = _scipy_fit(curve_fit, x, y, start)
            if fitted is not None:
                return fitted
    params = _levenberg_marquardt(x, y, np.array(start))
    return LogisticFit(params, "numpy", _sse(x, y, params))


def _sse(x: np.ndarray, y: np.ndarray, params: Sequence[float]) -> float:
    residual = logistic4(x, *params) - y
    return float(residual @ residual)


def _scipy_fit(curve_fit: object, x: np.ndarray, y: np.ndarray,
               start: tuple[float, float, float, float]) -> LogisticFit | None:
    import warnings

    try:
        with warnings.catch_warnings():
            # OptimizeWarning "covariance could not be estimated" concerns the error bars, which are not used.
            warnings.simplefilter("ignore")
            params, _ = curve_fit(logistic4, x, y, p0=start, maxfev=20000)  # type: ignore[operator]
    except (RuntimeError, ValueError):
        return None
    params = tuple(float(p) for p in params)
    if not all(math.isfinite(p) for p in params):
        return None
    return LogisticFit(params, "scipy", _sse(x, y, params))  # type: ignore[arg-type]


def _levenberg_marquardt(x: np.ndarray, y: np.ndarray, params: np.ndarray, *, max_iterations: int = 2000,
                         tolerance: float = 1e-14) -> tuple[float, float, float, float]:
    """Marquardt's damped Gauss-Newton with the analytic Jacobian; a step is taken only if it lowers the SSE."""
    damping = 1e-3
    sse = _sse(x, y, params)
    for _ in range(max_iterations):
        b1, b2, b3, b4 = params
        width = max(abs(b4), 1e-300)
        z = (x - b3) / width
        s = 0.5 * (1.0 + np.tanh(0.5 * z))
        slope = (b1 - b2) * s * (1.0 - s)
        jacobian = np.stack([s, 1.0 - s, -slope / width, -slope * z / width * np.sign(b4 or 1.0)], axis=1)
        residual = (b1 - b2) * s + b2 - y
        jtj, jtr = jacobian.T @ jacobian, jacobian.T @ residual
        scale = np.maximum(np.diag(jtj), 1e-12)
        improved = converged = False
        while damping < 1e16:
            try:
                step = np.linalg.solve(jtj + damping * np.diag(scale), -jtr)
            except np.linalg.LinAlgError:
                damping *= 10.0
                continue
            candidate = params + step
            candidate_sse = _sse(x, y, candidate) if abs(candidate[3]) > 0 else math.inf
            if candidate_sse < sse:
                converged = sse - candidate_sse <= tolerance * max(sse, 1e-300)
                params, sse, improved = candidate, candidate_sse, True
                damping = max(damping / 10.0, 1e-12)
                break
            damping *= 10.0
        if not improved or converged:
            break
    return tuple(float(p) for p in params)  # type: ignore[return-value]


def plcc_logistic(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray, *,
                  use_scipy: bool | None = None) -> float:
    """PLCC as IQA papers report it: Pearson's r between ``f(pred)`` and the MOS, ``f`` the fitted
    :func:`logistic4`. ``nan`` for constant input; the raw :func:`plcc` below :data:`MIN_LOGISTIC_SAMPLES`."""
    x, y = _pairs(pred, mos)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    if x.size < MIN_LOGISTIC_SAMPLES:
        return _pearson(x, y)
    return _pearson(fit_logistic(x, y, use_scipy=use_scipy)(x), y)


def iqa_scores(pred: Sequence[float] | np.ndarray, mos: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``srcc``, ``plcc`` (after the logistic fit), ``plcc_raw``, ``krcc`` and ``n`` in one call."""
    x, y = _pairs(pred, mos)
    return {"srcc": srcc(x, y), "plcc": plcc_logistic(x, y), "plcc_raw": plcc(x, y), "krcc": krcc(x, y),
            "n": int(x.size)}
