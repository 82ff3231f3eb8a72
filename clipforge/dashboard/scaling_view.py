"""The scaling page's data: each run's compute and error on one eval metric, the frontier and the fit."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from clipforge.dashboard.evals import is_score, key_parts, metric_of
from clipforge.dashboard.metrics_log import lower_is_better
from clipforge.dashboard.scaling import DEFAULT_BINS_PER_DECADE, ScalingFitError, fit_power_law

# Metrics offered first when the page does not name one.
PREFERRED_METRICS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
CURVE_POINTS = 64


def in_group(row: dict, group: str) -> bool:
    """Whether the run is in folder `group` (a sweep or a plain folder), at any depth."""
    if not group:
        return True
    folder = row.get("folder") or ""
    return folder == group or folder.startswith(group + "/")


def default_metric(metrics: list[str]) -> str | None:
    for name in PREFERRED_METRICS:
        for m in metrics:
            if metric_of(m) == name:
                return m
    return metrics[0] if metrics else None


def error_of(metric: str, value: float) -> float:
    """Lower-is-better metrics are errors already; scores in [0, 1] become 1 - score."""
    return value if lower_is_better(metric_of(metric)) else 1.0 - value


def left_out_reason(metric: str | None, value: float | None, compute: float | None) -> str:
    """Why a run has no point on the chart, in words."""
    missing = []
    if compute is None:
        missing.append("no compute recorded (summary.json has no gmacs and no model estimate)")
    if metric is None:
        missing.append("no eval metric recorded")
    elif value is None:
        parts = key_parts(metric)
        missing.append(f"no {parts['metric']} of {parts['model']} on {parts['dataset']} ({parts['task']}) recorded")
    return "; ".join(missing)


def scaling_payload(rows: list[dict], group: str, metric: str | None, bins_per_decade: int = DEFAULT_BINS_PER_DECADE,
                    target_error: float | None = None, confidence: float = 0.95) -> dict:
    members = [r for r in rows if in_group(r, group)]
    metrics = sorted({k for r in members for k in r.get("evals", {}) if is_score(metric_of(k))})
    metric = metric if metric in metrics else default_metric(metrics)
    points, skipped = [], []
    for r in members:
        value = r.get("evals", {}).get(metric) if metric else None
        compute = r.get("compute")
        if metric is None or value is None or compute is None:
            skipped.append({"id": r["id"], "reason": left_out_reason(metric, value, compute)})
            continue
        err = error_of(metric, value)
        if not (err > 0 and compute > 0):
            skipped.append({"id": r["id"], "reason": f"error {err:g} or compute {compute:g} GMAC is not positive "
                            "(a log-log chart needs both above 0)"})
            continue
        points.append({"id": r["id"], "name": r["name"], "compute": compute, "error": err,
                       "samples_seen": r.get("samples_seen"), "model": r.get("model"), "swept": r.get("swept")})
    out: dict[str, Any] = {"group": group, "metric": metric, "metrics": metrics, "bins_per_decade": bins_per_decade,
           "points": points, "skipped": skipped, "frontier": [], "fit": None, "curve": [], "target": None,
           "fit_error": None, "compute_unit": "GMAC"}
    if len(points) < 2:
        out["fit_error"] = f"{len(points)} run(s) with both a compute estimate and {metric or 'an eval metric'}; " \
                           "a fit needs runs in at least 2 compute bins"
        return out
    compute = np.array([p["compute"] for p in points])
    error = np.array([p["error"] for p in points])
    try:
        fit, front = fit_power_law(compute, error, bins_per_decade, confidence)
    except ScalingFitError as e:
        out["frontier"] = []
        out["fit_error"] = str(e)
        return out
    out["frontier"] = [points[i]["id"] for i in front.indices]
    out["fit"] = fit.to_dict()
    lo_c, hi_c = float(compute.min()), float(compute.max())
    if target_error is not None and target_error > 0:
        try:
            needed = fit.compute_for_error(target_error)
            out["target"] = {"error": target_error, "compute": needed}
            if math.isfinite(needed) and needed > 0:
                lo_c, hi_c = min(lo_c, needed), max(hi_c, needed)
        except ValueError as e:
            out["target"] = {"error": target_error, "compute": None, "message": str(e)}
    grid = np.logspace(math.log10(lo_c) - 0.1, math.log10(hi_c) + 0.1, CURVE_POINTS)
    mid = fit.predict(grid)
    band_lo: np.ndarray | list[None]
    band_hi: np.ndarray | list[None]
    if math.isfinite(fit.se_alpha):
        band_lo, band_hi = fit.band(grid)
    else:
        band_lo = band_hi = [None] * len(grid)
    out["curve"] = [{"compute": float(c), "error": float(m), "lo": _f(lo), "hi": _f(hi)}
                    for c, m, lo, hi in zip(grid, mid, band_lo, band_hi)]
    return out


def _f(v) -> float | None:
    return None if v is None else float(v)
