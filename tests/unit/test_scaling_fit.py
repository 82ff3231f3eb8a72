"""The scaling-law fit: exponent recovery on noisy synthetic sweeps, frontier, band, inverse."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clipforge.dashboard.scaling import ScalingFitError, compute_bin, fit_power_law, frontier, student_t_cdf, t_quantile


def synthetic_sweep(alpha: float, beta: float, seed: int, runs_per_bin: int = 6, decades=(14, 19),
                    bins_per_decade: int = 4):
    """Runs at log-spaced compute budgets; each budget tried with several "hyperparameter settings" whose
    error sits above the law by a random factor (bad settings only ever hurt), plus jitter of the compute
    itself inside the bin."""
    rng = np.random.default_rng(seed)
    compute, error = [], []
    for k in range(decades[0] * bins_per_decade, decades[1] * bins_per_decade):
        for _ in range(runs_per_bin):
            c = 10 ** ((k + rng.uniform(0.2, 0.8)) / bins_per_decade)
            law = beta * c ** alpha
            compute.append(c)
            error.append(law * math.exp(abs(rng.normal(0, 0.08))))
    return np.array(compute), np.array(error)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("alpha", [-0.05, -0.11, -0.3])
def test_recovers_known_exponent_from_noisy_sweep(seed, alpha):
    beta = 0.9 / (1e14 ** alpha)  # error 0.9 at the smallest budget
    compute, error = synthetic_sweep(alpha, beta, seed)
    fit, front = fit_power_law(compute, error)
    assert abs(fit.alpha - alpha) < 0.01, (fit.alpha, alpha)
    assert len(front.indices) == 20  # 5 decades x 4 bins, every bin occupied
    lo, hi = fit.alpha_interval()
    assert lo < fit.alpha < hi
    assert fit.se_alpha > 0 and fit.n == 20


def test_frontier_is_the_minimum_of_each_bin():
    compute, error = synthetic_sweep(-0.1, 5.0, seed=7, runs_per_bin=5)
    front = frontier(compute, error, bins_per_decade=4)
    # Independent grouping: the generator put exactly `runs_per_bin` consecutive runs in each bin.
    groups = compute.reshape(-1, 5), error.reshape(-1, 5)
    expected = [int(g * 5 + np.argmin(errs)) for g, errs in enumerate(groups[1])]
    assert front.indices == expected
    assert [float(error[i]) for i in front.indices] == [float(min(e)) for e in groups[1]]
    # Ordered by compute and one point per bin.
    assert list(compute[front.indices]) == sorted(compute[front.indices])
    assert len(set(front.bins)) == len(front.bins)


def test_bins_follow_decade_edges():
    assert compute_bin([1e16, 1.7e16, 1.8e16, 9.99e16, 1e17], bins_per_decade=4).tolist() == [64, 64, 65, 67, 68]
    assert compute_bin([1e16, 9e16, 1e17], bins_per_decade=1).tolist() == [16, 16, 17]


def test_exact_law_is_recovered_and_inverse_is_right():
    alpha, beta = -0.155, 38.0
    compute = np.logspace(15, 20, 11)
    fit, _ = fit_power_law(compute, beta * compute ** alpha, bins_per_decade=2)
    assert fit.alpha == pytest.approx(alpha, abs=1e-12)
    assert fit.beta == pytest.approx(beta, rel=1e-9)
    for target in (0.5, 0.2, 0.05):
        c = fit.compute_for_error(target)
        assert c == pytest.approx((target / beta) ** (1 / alpha), rel=1e-9)
        assert float(fit.predict(c)) == pytest.approx(target, rel=1e-12)
    # Lower error needs more compute with a negative exponent.
    assert fit.compute_for_error(0.05) > fit.compute_for_error(0.2)


def test_standard_errors_match_the_least_squares_covariance():
    compute, error = synthetic_sweep(-0.2, 200.0, seed=3)
    fit, front = fit_power_law(compute, error)
    x = np.log10(compute[front.indices])
    y = np.log10(error[front.indices])
    design = np.column_stack([np.ones_like(x), x])
    coef, res, *_ = np.linalg.lstsq(design, y, rcond=None)
    sigma2 = float(res[0]) / (len(x) - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    assert fit.log10_beta == pytest.approx(coef[0], rel=1e-9)
    assert fit.alpha == pytest.approx(coef[1], rel=1e-9)
    assert fit.se_log10_beta == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    assert fit.se_alpha == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    # 95% two-sided t quantile with 18 degrees of freedom.
    assert fit.t_quantile == pytest.approx(2.100922, abs=1e-5)


def test_band_contains_the_fit_and_widens_away_from_the_data():
    compute, error = synthetic_sweep(-0.1, 20.0, seed=11)
    fit, _ = fit_power_law(compute, error)
    grid = np.logspace(14, 24, 41)
    lo, hi = fit.band(grid)
    mid = fit.predict(grid)
    assert np.all(lo < mid) and np.all(mid < hi)
    width = np.log10(hi) - np.log10(lo)
    centre = np.argmin(np.abs(np.log10(grid) - fit.x_mean))
    assert width[-1] > 3 * width[centre]  # extrapolating 5 decades past the data is much less certain


def test_two_bins_fit_without_errors_and_bad_input_is_named():
    fit, _ = fit_power_law([1e10, 1e12], [0.5, 0.25], bins_per_decade=1)
    assert fit.alpha == pytest.approx(math.log10(0.5) / 2)
    assert math.isnan(fit.se_alpha) and fit.to_dict()["se_alpha"] is None
    with pytest.raises(ScalingFitError, match="at least 2 compute bins"):
        fit_power_law([1e10, 1.1e10], [0.5, 0.4], bins_per_decade=1)
    with pytest.raises(ScalingFitError, match="point #1"):
        fit_power_law([1e10, 0.0, 1e12], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="positive"):
        fit.compute_for_error(0)


@pytest.mark.parametrize("confidence, dof, expected", [
    (0.95, 1, 12.7062047), (0.95, 3, 3.18244631), (0.90, 10, 1.81246112), (0.99, 30, 2.74999565),
    (0.95, 1000, 1.96233908),
])
def test_student_t_critical_values_match_tables(confidence, dof, expected):
    q = t_quantile(confidence, dof)
    assert q == pytest.approx(expected, rel=1e-7)
    assert student_t_cdf(q, dof) - student_t_cdf(-q, dof) == pytest.approx(confidence, abs=1e-10)
