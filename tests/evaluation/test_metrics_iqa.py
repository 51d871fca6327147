"""IQA metrics against scipy.stats on hand-made data (ties included), the logistic fit on data drawn from a known
logistic, and the documented behaviour on degenerate input."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
from scipy import stats

from owl2.evaluation.metrics.iqa import (
    fit_logistic,
    initial_guess,
    iqa_scores,
    krcc,
    logistic4,
    plcc,
    plcc_logistic,
    rankdata,
    srcc,
)

# Hand-made: a few exact ties in each variable, one pair tied in both, one discordant swap.
PRED = [3.1, 2.4, 4.0, 2.4, 1.2, 3.9, 3.1, 4.6, 2.0, 3.1]
MOS = [3.0, 2.5, 4.2, 2.0, 1.1, 4.2, 3.0, 4.5, 2.6, 3.3]
CASES = {
    "ties": (PRED, MOS),
    "no_ties": ([0.3, 1.7, 0.9, 2.5, 2.2, 3.1], [10.0, 32.0, 25.0, 40.0, 47.0, 55.0]),
    "negative": ([1, 2, 3, 4, 5, 6, 7], [7.0, 6.5, 6.5, 3.0, 4.0, 1.0, 0.5]),
    "integer_levels": ([1, 1, 2, 2, 3, 3, 3, 4, 5, 5], [1, 2, 2, 2, 3, 4, 3, 5, 4, 5]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_correlations_equal_scipy(name):
    pred, mos = CASES[name]
    assert srcc(pred, mos) == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert plcc(pred, mos) == pytest.approx(stats.pearsonr(pred, mos)[0], abs=1e-12)
    assert krcc(pred, mos) == pytest.approx(stats.kendalltau(pred, mos)[0], abs=1e-12)  # tau-b


def test_correlations_equal_scipy_on_random_data_with_many_ties():
    rng = np.random.default_rng(0)
    for n in (3, 4, 17, 250):
        x = rng.integers(0, 6, n).astype(float)
        y = x + rng.integers(-2, 3, n)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)
        assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)


def test_rankdata_averages_ties_like_scipy():
    assert rankdata(PRED).tolist() == stats.rankdata(PRED).tolist()
    assert rankdata([2, 2, 2]).tolist() == [2.0, 2.0, 2.0]


def test_perfect_and_reversed_order():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert srcc(x, [10, 20, 30, 40, 50]) == 1.0 and krcc(x, [10, 20, 30, 40, 50]) == 1.0
    assert srcc(x, [5, 4, 3, 2, 1]) == -1.0 and krcc(x, [5, 4, 3, 2, 1]) == -1.0


# -------------------------------------------------------------------------------------------------- logistic fit
TRUE = (4.6, 1.3, 0.55, 0.12)


def logistic_data(noise: float, n: int = 120, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0, n)
    return x, logistic4(x, *TRUE) + rng.normal(0.0, noise, n)


def test_logistic4_is_the_iqa_formula():
    b1, b2, b3, b4 = TRUE
    for x in (-3.0, 0.2, 0.55, 0.9, 40.0):
        expected = (b1 - b2) / (1 + math.exp(-(x - b3) / abs(b4))) + b2
        assert float(logistic4(x, *TRUE)) == pytest.approx(expected, rel=1e-12)
    assert float(logistic4(1e6, *TRUE)) == pytest.approx(b1) and float(logistic4(-1e6, *TRUE)) == pytest.approx(b2)
    assert float(logistic4(0.3, b1, b2, b3, -b4)) == float(logistic4(0.3, *TRUE))  # only |b4| matters


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fit_recovers_a_known_logistic(use_scipy):
    x, y = logistic_data(noise=0.0)
    fit = fit_logistic(x, y, use_scipy=use_scipy)
    assert fit.method == ("scipy" if use_scipy else "numpy")
    b1, b2, b3, b4 = fit.params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(TRUE, rel=1e-5)
    assert fit.sse < 1e-12
    assert plcc_logistic(x, y, use_scipy=use_scipy) == pytest.approx(1.0, abs=1e-12)
    # The raw scores are related non-linearly, so the raw PLCC is clearly below 1 and the fit helps.
    assert plcc(x, y) < 0.99


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fit_with_noise_is_close_and_both_optimisers_agree(use_scipy):
    x, y = logistic_data(noise=0.05)
    fit = fit_logistic(x, y, use_scipy=use_scipy)
    b1, b2, b3, b4 = fit.params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(TRUE, rel=0.1)
    other = fit_logistic(x, y, use_scipy=not use_scipy)
    assert fit.sse == pytest.approx(other.sse, rel=1e-8)
    assert plcc_logistic(x, y, use_scipy=use_scipy) == pytest.approx(stats.pearsonr(fit(x), y)[0], abs=1e-9)
    assert plcc_logistic(x, y) > 0.99
    # Never worse than where it started.
    assert fit.sse <= float(((logistic4(x, *initial_guess(x, y)) - y) ** 2).sum())


def test_fit_of_a_falling_relation_starts_on_the_falling_branch():
    x, y = logistic_data(noise=0.02)
    fit = fit_logistic(x, -y)
    assert fit.params[0] < fit.params[1]  # b1 (the upper-x asymptote) below b2
    # The fitted curve maps onto the MOS in either direction, so the PLCC after the fit is positive for both
    # (as IQA papers report it for DMOS scales), while the raw PLCC keeps the sign.
    assert plcc_logistic(x, -y) == pytest.approx(plcc_logistic(x, y), abs=1e-6)
    assert plcc(x, -y) == pytest.approx(-plcc(x, y), abs=1e-12)


def test_numpy_fallback_when_scipy_is_missing(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    x, y = logistic_data(noise=0.05)
    assert fit_logistic(x, y).method == "numpy"
    with pytest.raises(ImportError):
        fit_logistic(x, y, use_scipy=True)


def test_iqa_scores_bundle():
    x, y = logistic_data(noise=0.05, n=40)
    scores = iqa_scores(x, y)
    assert set(scores) == {"srcc", "plcc", "plcc_raw", "krcc", "n"}
    assert scores["n"] == 40
    assert scores["srcc"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert scores["plcc_raw"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert scores["plcc"] == pytest.approx(plcc_logistic(x, y), abs=1e-9)
    assert scores["krcc"] == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)


# ------------------------------------------------------------------------------------------------- degenerate
@pytest.mark.parametrize("metric", [srcc, plcc, krcc, plcc_logistic, iqa_scores, fit_logistic])
def test_degenerate_input_raises_clearly(metric):
    with pytest.raises(ValueError, match="at least 3"):
        metric([1.0, 2.0], [1.0, 3.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric([1.0, math.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, math.inf, 4.0])
    with pytest.raises(ValueError, match="4 predictions but 3 MOS"):
        metric([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("metric", [srcc, plcc, krcc, plcc_logistic])
def test_constant_input_gives_nan(metric):
    assert math.isnan(metric([2.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert math.isnan(metric([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3.0] * 6))


def test_constant_predictions_cannot_be_fitted():
    with pytest.raises(ValueError, match="constant predictions"):
        fit_logistic([2.0] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_too_few_points_for_the_fit_fall_back_to_raw_pearson():
    x, y = [1.0, 2.0, 4.0, 3.0], [1.5, 2.0, 2.2, 4.0]
    assert plcc_logistic(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
