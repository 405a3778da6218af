"""Calibration of multi-label probabilities: expected calibration error, reliability diagrams and
temperature scaling.

* Expected calibration error (ECE; Naeini, Cooper & Hauskrecht, AAAI 2015; Guo et al., "On Calibration
  of Modern Neural Networks", ICML 2017), per finding: the known labels are put in ``n_bins`` equal-width
  bins of predicted probability, bin ``b`` holding ``(b/B, (b+1)/B]`` (the first also 0, the convention
  of ``sklearn.calibration.calibration_curve(strategy="uniform")``), and
  ``ECE = sum_b (n_b / n) * |observed positive fraction_b - mean probability_b|``. The maximum
  calibration error (MCE) is the largest of those bin gaps; the Brier score is the mean squared error
  of the probability (``sklearn.metrics.brier_score_loss``).
* Temperature scaling (Guo et al. 2017), one temperature per finding since each finding has its own
  sigmoid: ``p' = sigmoid(logit(p) / T)``, ``T`` minimizing the binary cross-entropy on the data it is
  fitted to (the validation split), searched over ``log T`` in ``[log 0.05, log 20]``. ``T > 1`` softens
  overconfident probabilities. ROC AUC and AP do not change (the order of the scores is kept); ECE,
  Brier score and the thresholds' operating points do.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import _as_arrays, _float, _load_per_class, _masks

__all__ = ["apply_temperature", "calibration_report", "fit_temperature", "load_temperatures", "plot_reliability",
           "reliability_bins"]

_EPS = 1e-12
_T_RANGE = (0.05, 20.0)


def reliability_bins(probs: Any, positive: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of one finding's probabilities (see the module docstring for the bin edges).

    Args:
        probs: ``n`` probabilities in [0, 1].
        positive: ``n`` booleans (the known labels).
        n_bins: number of bins (>= 1).

    Returns:
        ``{"edges": B+1 edges, "count": B, "mean_prob": B, "observed": B}`` (NaN in empty bins).
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins={n_bins!r} must be a positive integer")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(positive, dtype=bool).reshape(-1)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    which = np.searchsorted(edges[1:-1], p, side="left")
    count = np.bincount(which, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(which, weights=p, minlength=n_bins) / count
        observed = np.bincount(which, weights=y.astype(np.float64), minlength=n_bins) / count
    return {"edges": edges, "count": count, "mean_prob": mean_prob, "observed": observed}


def _ece_mce_brier(p: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[float | None, float | None, float | None]:
    if p.size == 0:
        return None, None, None
    b = reliability_bins(p, y, n_bins)
    used = b["count"] > 0
    gaps = np.abs(b["observed"][used] - b["mean_prob"][used])
    ece = float(np.sum(b["count"][used] / p.size * gaps))
    return ece, float(gaps.max()), float(np.mean((p - y) ** 2))


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _bce(z: np.ndarray, y: np.ndarray) -> float:
    # mean of log(1 + exp(-z)) for positives and log(1 + exp(z)) for negatives, computed stably
    signed = np.where(y, -z, z)
    return float(np.mean(np.logaddexp(0.0, signed)))


def fit_temperature(probs: Any, labels: Any) -> np.ndarray:
    """Per-finding temperatures fitted by minimizing the binary cross-entropy (Guo et al. 2017).

    Args:
        probs: ``N x K`` probabilities.
        labels: ``N x K``: 1, 0, or unknown (< 0 or NaN, excluded).

    Returns:
        ``K`` temperatures (float64); NaN for a finding without both a positive and a negative label.
    """
    from scipy.optimize import minimize_scalar

    p, lab = _as_arrays(probs, labels)
    valid, pos = _masks(lab)
    out = np.full(p.shape[1], np.nan)
    lo, hi = np.log(_T_RANGE[0]), np.log(_T_RANGE[1])
    for k in range(p.shape[1]):
        v = valid[:, k]
        y = pos[v, k]
        if y.size == 0 or y.all() or not y.any():
            continue
        z = _logit(p[v, k])
        res = minimize_scalar(lambda log_t: _bce(z / np.exp(log_t), y), bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-6})
        out[k] = float(np.exp(res.x))
    return out


def apply_temperature(probs: Any, temperatures: Any) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` per finding (column); a NaN temperature leaves its column unchanged.

    Args:
        probs: ``N x K`` probabilities.
        temperatures: ``K`` positive temperatures (NaN: none).

    Raises:
        ValueError: wrong length, or a temperature that is not positive.
    """
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(temperatures, dtype=np.float64).reshape(-1)
    if p.ndim != 2 or t.size != p.shape[1]:
        raise ValueError(f"{t.size} temperatures for probabilities of shape {p.shape} (one per finding expected)")
    if (t[np.isfinite(t)] <= 0).any():
        raise ValueError(f"temperatures must be positive, got {t.tolist()}")
    out = p.copy()
    for k in np.flatnonzero(np.isfinite(t)):
        out[:, k] = _sigmoid(_logit(p[:, k]) / t[k])
    return out


def load_temperatures(path: str | os.PathLike, class_names: Sequence[str]) -> np.ndarray:
    """The per-finding temperatures fitted in a ``metrics.json`` (its ``calibration`` section, e.g. the
    validation split's report), in `class_names` order (NaN where it has none).

    Raises:
        ValueError: the file is not such a report, or lacks some of the classes (both named).
    """
    return _load_per_class(path, class_names, lambda data: data["calibration"]["per_class"], "temperature_fitted",
                           "temperatures", "with a calibration section")


def calibration_report(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    n_bins: int = 10,
    applied: Any = None,
    applied_from: str | None = None,
    uncalibrated: Any = None,
) -> dict[str, Any]:
    """ECE, MCE and Brier score per finding, and the temperatures fitted on these data.

    Args:
        probs: ``N x K`` probabilities as evaluated (after any temperature in `applied`).
        labels: ``N x K`` labels (unknown: < 0 or NaN).
        class_names: the ``K`` names.
        n_bins: equal-width bins of the ECE and the reliability diagram.
        applied: ``K`` temperatures that were applied to get `probs` (None: none were).
        applied_from: the file `applied` came from, for the record.
        uncalibrated: the probabilities before `applied`, to report their ECE beside.

    Returns:
        ``{"n_bins", "temperature_applied_from", "per_class": [{"class", "n", "ece", "mce", "brier",
        "temperature_applied", "temperature_fitted", "ece_before_temperature"}], "macro": {"ece", "brier"}}``
        (means over the findings with known labels).
    """
    p, lab = _as_arrays(probs, labels, class_names)
    valid, pos = _masks(lab)
    fitted = fit_temperature(p, lab)
    before = None if uncalibrated is None else np.asarray(uncalibrated, dtype=np.float64)
    rows = []
    for k, name in enumerate(class_names):
        v = valid[:, k]
        ece, mce, brier = _ece_mce_brier(p[v, k], pos[v, k], n_bins)
        row = {"class": str(name), "n": int(v.sum()), "ece": ece, "mce": mce, "brier": brier,
               "temperature_applied": None if applied is None else _float(np.asarray(applied)[k]),
               "temperature_fitted": _float(fitted[k]),
               "ece_before_temperature": None}
        if before is not None:
            row["ece_before_temperature"] = _ece_mce_brier(before[v, k], pos[v, k], n_bins)[0]
        rows.append(row)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"n_bins": int(n_bins), "temperature_applied_from": applied_from, "per_class": rows,
            "macro": {"ece": mean("ece"), "brier": mean("brier")}}


def plot_reliability(
    probs: Any, labels: Any, class_names: Sequence[str], calibration: Mapping[str, Any], path: str | os.PathLike
) -> str:
    """Reliability diagrams, one panel per finding with known labels: observed positive fraction against
    mean predicted probability per bin (marker area by bin size), the diagonal of perfect calibration,
    and the ECE in the panel's title. Written atomically as a PNG at `path`; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hmn.durable import atomic_write

    p, lab = _as_arrays(probs, labels, class_names)
    valid, pos = _masks(lab)
    n_bins = int(calibration["n_bins"])
    shown = [k for k in range(p.shape[1]) if valid[:, k].any()]
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows), dpi=120)
    FigureCanvasAgg(fig)
    for i, k in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        b = reliability_bins(p[valid[:, k], k], pos[valid[:, k], k], n_bins)
        used = b["count"] > 0
        ax.plot([0, 1], [0, 1], linestyle=":", color="0.5", linewidth=1)
        ax.plot(b["mean_prob"][used], b["observed"][used], color="tab:blue", linewidth=1)
        ax.scatter(b["mean_prob"][used], b["observed"][used], s=12 + 120 * b["count"][used] / b["count"].max(),
                   color="tab:blue", alpha=0.7)
        ece = calibration["per_class"][k]["ece"]
        ax.set_title(f"{class_names[k]}\nECE {ece:.3f} (n={int(valid[:, k].sum())})", fontsize=8)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("observed positive fraction", fontsize=7)
        if i >= (rows - 1) * cols:
            ax.set_xlabel("mean predicted probability", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)
