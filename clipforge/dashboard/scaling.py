"""Scaling-law fit of a sweep: error E against compute C, E = beta * C**alpha.

Following Cherti et al. ("Reproducible scaling laws for contrastive language-image learning"),
runs are grouped into log-spaced compute bins and only the lowest error of each bin is fitted:
runs with poor hyperparameters sit above the compute-optimal frontier and would bias the exponent.
The fit is ordinary least squares of log10 E = log10 beta + alpha * log10 C on those bin minima.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS_PER_DECADE = 4


class ScalingFitError(ValueError):
    """The points cannot support a fit (too few, non-positive values)."""


@dataclass(frozen=True)
class Frontier:
    """Indices (into the input arrays) of the lowest-error run of each occupied compute bin, by compute."""

    indices: list[int]
    bins: list[int]


@dataclass(frozen=True)
class PowerLawFit:
    """E = beta * C**alpha, fitted in log10 space, with the statistics needed for a confidence band."""

    alpha: float
    log10_beta: float
    se_alpha: float  # NaN when there are only two points (no residual degrees of freedom)
    se_log10_beta: float
    n: int
    residual_std: float  # of log10 E around the line
    x_mean: float  # mean of log10 C over the fitted points
    sxx: float  # sum of squared deviations of log10 C
    t_quantile: float  # two-sided Student-t quantile for `confidence`
    confidence: float
    r2: float

    @property
    def beta(self) -> float:
        return 10.0 ** self.log10_beta

    @property
    def se_beta(self) -> float:
        # Delta method: d(10**b)/db = ln(10) * 10**b.
        return math.log(10.0) * self.beta * self.se_log10_beta

    def alpha_interval(self) -> tuple[float, float]:
        half = self.t_quantile * self.se_alpha
        return self.alpha - half, self.alpha + half

    def predict(self, compute) -> np.ndarray:
        return 10.0 ** (self.log10_beta + self.alpha * np.log10(np.asarray(compute, dtype=float)))

    def band(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper confidence limits of the fitted (mean) error at each compute value."""
        x = np.log10(np.asarray(compute, dtype=float))
        centre = self.log10_beta + self.alpha * x
        half = self.t_quantile * self.residual_std * np.sqrt(1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        return 10.0 ** (centre - half), 10.0 ** (centre + half)

    def compute_for_error(self, target: float) -> float:
        """The compute at which the fitted law reaches error `target` (the inverse of `predict`)."""
        if not target > 0:
            raise ValueError(f"target error must be positive, got {target}")
        if self.alpha == 0:
            raise ValueError("the fitted exponent is 0: error does not change with compute")
        return 10.0 ** ((math.log10(target) - self.log10_beta) / self.alpha)

    def to_dict(self) -> dict:
        lo, hi = self.alpha_interval()
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "log10_beta": self.log10_beta,
            "se_alpha": _finite_or_none(self.se_alpha),
            "se_beta": _finite_or_none(self.se_beta),
            "se_log10_beta": _finite_or_none(self.se_log10_beta),
            "alpha_interval": [_finite_or_none(lo), _finite_or_none(hi)],
            "confidence": self.confidence,
            "n": self.n,
            "r2": _finite_or_none(self.r2),
            "residual_std": _finite_or_none(self.residual_std),
        }


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _positive_arrays(compute, error) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(compute, dtype=float)
    e = np.asarray(error, dtype=float)
    if c.shape != e.shape or c.ndim != 1:
        raise ScalingFitError(f"compute and error must be 1-D and equally long, got {c.shape} and {e.shape}")
    bad = ~(np.isfinite(c) & np.isfinite(e) & (c > 0) & (e > 0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ScalingFitError(
            f"point #{first} (compute={c[first]}, error={e[first]}): compute and error must be finite and > 0 "
            "for a log-log fit"
        )
    return c, e


def compute_bin(compute, bins_per_decade: int = DEFAULT_BINS_PER_DECADE) -> np.ndarray:
    """Bin number of each compute value: bins are [10**(k/b), 10**((k+1)/b)) for b bins per decade."""
    if bins_per_decade < 1:
        raise ValueError(f"bins_per_decade must be >= 1, got {bins_per_decade}")
    # The small offset keeps values that are powers of ten (up to rounding) inside their own bin.
    return np.floor(np.log10(np.asarray(compute, dtype=float)) * bins_per_decade + 1e-9).astype(int)


def frontier(compute, error, bins_per_decade: int = DEFAULT_BINS_PER_DECADE) -> Frontier:
    """The compute-optimal frontier: the lowest-error point of each compute bin, ordered by compute."""
    c, e = _positive_arrays(compute, error)
    bins = compute_bin(c, bins_per_decade)
    best: dict[int, int] = {}
    for i, b in enumerate(bins.tolist()):
        if b not in best or e[i] < e[best[b]]:
            best[b] = i
    order = sorted(best)
    return Frontier(indices=[best[b] for b in order], bins=order)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast on the side of the mean; use the symmetry on the other.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(x: float, dof: float) -> float:
    tail = 0.5 * _regularized_beta(dof / 2.0, 0.5, dof / (dof + x * x))
    return 1.0 - tail if x >= 0 else tail


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value: P(|T| <= q) = confidence for `dof` degrees of freedom."""
    p = 0.5 + confidence / 2.0
    lo, hi = 0.0, 2.0
    while student_t_cdf(hi, dof) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):  # bisection: the CDF is monotone, and 200 halvings reach float precision
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def fit_line(log_c: np.ndarray, log_e: np.ndarray, confidence: float = 0.95) -> PowerLawFit:
    """Least squares of log10 E on log10 C, with standard errors when there are residual degrees of freedom."""
    n = len(log_c)
    if n < 2:
        raise ScalingFitError(f"a power-law fit needs at least 2 compute bins with results, got {n}")
    x_mean = float(log_c.mean())
    sxx = float(((log_c - x_mean) ** 2).sum())
    if sxx <= 0:
        raise ScalingFitError("all fitted points have the same compute: the exponent is undetermined")
    alpha = float(((log_c - x_mean) * (log_e - log_e.mean())).sum() / sxx)
    intercept = float(log_e.mean() - alpha * x_mean)
    residuals = log_e - (intercept + alpha * log_c)
    dof = n - 2
    ss_res = float((residuals ** 2).sum())
    ss_tot = float(((log_e - log_e.mean()) ** 2).sum())
    if dof > 0:
        s = math.sqrt(ss_res / dof)
        se_alpha = s / math.sqrt(sxx)
        se_intercept = s * math.sqrt(1.0 / n + x_mean ** 2 / sxx)
        tq = t_quantile(confidence, dof)
    else:
        s = se_alpha = se_intercept = tq = math.nan
    return PowerLawFit(
        alpha=alpha, log10_beta=intercept, se_alpha=se_alpha, se_log10_beta=se_intercept, n=n, residual_std=s,
        x_mean=x_mean, sxx=sxx, t_quantile=tq, confidence=confidence,
        r2=1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
    )


def fit_power_law(compute, error, bins_per_decade: int = DEFAULT_BINS_PER_DECADE,
                  confidence: float = 0.95) -> tuple[PowerLawFit, Frontier]:
    """Fit E = beta * C**alpha on the per-compute-bin minimum error; returns the fit and the frontier it used."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    c, e = _positive_arrays(compute, error)
    front = frontier(c, e, bins_per_decade)
    idx = np.asarray(front.indices)
    return fit_line(np.log10(c[idx]), np.log10(e[idx]), confidence), front
