"""Per-class and averaged metrics of a multi-label classifier, with percentile bootstrap confidence intervals.

:func:`compute_report` turns predicted probabilities and 0/1 labels (``N x K``: images x classes) into
a JSON-ready dict (the layout is described in :mod:`hmn.evaluation.report`); :func:`select_thresholds`
picks operating thresholds on one split (e.g. validation) to be applied on another (test).

Conventions:

* A label entry below 0 or NaN is *unknown* and excluded for that class only (e.g. CheXpert's uncertain
  labels under an "ignore" policy). Known labels must be exactly 0 or 1.
* An image counts as positive for a class at threshold ``t`` when ``prob >= t``.
* Youden's J threshold: the predicted score ``t`` (one of the class's own scores) that maximizes
  ``sensitivity + specificity - 1`` with the rule above; among ties the highest such score. The
  "everything negative" point is never chosen, so a threshold always labels at least one image positive.
* Bootstrap: images (rows) are resampled with replacement ``n_bootstrap`` times with
  ``numpy.random.default_rng(seed)``; a class's statistic is computed in each resample where that class
  has both a positive and a negative known label (the other resamples are skipped and the number used
  is reported), and the interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles (numpy's
  linear interpolation) of those values. The macro average of a resample is used only when every
  class in the macro average has both label values in it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["THRESHOLD_METHODS", "compute_report", "load_thresholds", "macro_auc", "operating_points",
           "select_thresholds", "weighted_auc_ap"]

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("youden", "fixed")

# bootstrap work is done in blocks of resamples holding at most this many (resample, label) weights
_BLOCK_ELEMENTS = 2_000_000


# ----------------------------------------------------------------------------------------------
# input checks


def _as_arrays(probs: Any, labels: Any, class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` as float64 ``N x K``, and the boolean masks (valid, positive) from ``labels``; validates both."""
    p = np.asarray(probs, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if lab.ndim == 1:
        lab = lab[:, None]
    if p.ndim != 2:
        raise ValueError(f"probs must be an N x K array (images x classes), got shape {tuple(np.shape(probs))}")
    if lab.shape != p.shape:
        raise ValueError(
            f"labels shape {tuple(np.shape(labels))} does not match probs shape {tuple(np.shape(probs))}; "
            "both must be N x K (images x classes)"
        )
    if class_names is not None and len(class_names) != p.shape[1]:
        raise ValueError(f"{len(class_names)} class_names {list(class_names)} for {p.shape[1]} columns of probs")
    bad = ~np.isfinite(p)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        raise ValueError(
            f"probs contain {int(bad.sum())} non-finite values (first: image {i}, class {k}: {p[i, k]}); "
            "predictions must be finite"
        )
    known = np.isfinite(lab) & (lab >= 0)
    odd = known & (lab != 0) & (lab != 1)
    if odd.any():
        i, k = np.argwhere(odd)[0]
        raise ValueError(
            f"labels must be 0 or 1 (negative or NaN for unknown), got {lab[i, k]} at image {i}, class {k}"
        )
    return p, lab


def _masks(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = np.isfinite(lab) & (lab >= 0)
    return valid, valid & (lab == 1)


def _float(x: Any) -> float | None:
    """A plain float, or None for None/NaN (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return None if not np.isfinite(x) else x


def _absent_reason(n: int, positives: int) -> str | None:
    if n == 0:
        return "no labelled images"
    if positives == 0:
        return "no positive labels"
    if positives == n:
        return "no negative labels"
    return None


def _defined_class_aucs(p: np.ndarray, valid: np.ndarray, pos: np.ndarray) -> dict[int, float]:
    """Per-class ROC AUC over the known labels, for the classes with both label values (the only ones
    where it is defined); the one definition behind :func:`macro_auc` and :func:`compute_report`."""
    out = {}
    for c in range(p.shape[1]):
        v = valid[:, c]
        y = pos[v, c]
        if _absent_reason(int(v.sum()), int(y.sum())) is None:
            out[c] = float(roc_auc_score(y, p[v, c]))
    return out


def macro_auc(probs: Any, labels: Any) -> tuple[float | None, list[int]]:
    """The macro ROC AUC exactly as the evaluation report defines it, for model selection during training.

    Args:
        probs: ``N x K`` scores (probabilities or logits: ROC AUC depends only on their order).
        labels: ``N x K``: 1 positive, 0 negative, below 0 or NaN unknown (masked, e.g. uncertain).

    Returns:
        ``(value, classes)``: the mean of the per-class ROC AUCs over the known labels of each class, and
        the indices of the classes averaged: those with at least one positive and one negative known
        label. Classes without both are left out (their AUC is undefined); ``value`` is None when no
        class is left. Unknown labels are excluded, never counted as negatives.

    Raises:
        ValueError: shapes differ, a score is not finite, or a known label is not 0 or 1.
    """
    p, lab = _as_arrays(probs, labels)
    valid, pos = _masks(lab)
    aucs = _defined_class_aucs(p, valid, pos)
    return (float(np.mean(list(aucs.values()))) if aucs else None), sorted(aucs)


# ----------------------------------------------------------------------------------------------
# thresholds


def _youden_threshold(y: np.ndarray, s: np.ndarray) -> float:
    # integer arithmetic: J = tp/P - fp/N compared as tp*N - fp*P, so exact ties stay ties
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last item of each distinct score, descending
    tp = np.cumsum(y_sorted, dtype=np.int64)[last]
    fp = np.cumsum(~y_sorted, dtype=np.int64)[last]
    j = tp * int((~y).sum()) - fp * int(y.sum())
    return float(s_sorted[last][int(np.argmax(j))])  # the first maximum is the highest threshold


def select_thresholds(probs: Any, labels: Any, method: str = "youden") -> np.ndarray:
    """Operating thresholds per class, picked on these data, to be applied to other data.

    Args:
        probs: ``N x K`` predicted probabilities.
        labels: ``N x K`` 0/1 labels; entries < 0 or NaN are unknown and ignored.
        method: ``"youden"``: the score maximizing Youden's J (sensitivity + specificity - 1), ties to the
            highest score; see the module docstring.

    Returns:
        ``K`` thresholds (float64); NaN for a class without both a positive and a negative label.
    """
    if method != "youden":
        raise ValueError(f"unknown threshold selection method {method!r}; accepted: 'youden'")
    p, lab = _as_arrays(probs, labels)
    valid, pos = _masks(lab)
    out = np.full(p.shape[1], np.nan)
    for k in range(p.shape[1]):
        v = valid[:, k]
        if _absent_reason(int(v.sum()), int(pos[v, k].sum())) is None:
            out[k] = _youden_threshold(pos[v, k], p[v, k])
    return out


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (every distinct score, descending, then one above the highest) with their sensitivity and
    specificity under ``prob >= threshold``."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.r_[0, np.cumsum(y_sorted, dtype=np.int64)[last]]
    fp = np.r_[0, np.cumsum(~y_sorted, dtype=np.int64)[last]]
    thr = np.r_[np.nextafter(s_sorted[0], np.inf), s_sorted[last]]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return thr, tp / n_pos, 1.0 - fp / n_neg


def operating_points(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    specificities: Sequence[float] = (0.90, 0.95),
    sensitivities: Sequence[float] = (0.90, 0.95),
) -> list[dict[str, Any]]:
    """Sensitivity at fixed specificity, and specificity at fixed sensitivity, per finding, on these data.

    For a target specificity ``s`` the threshold is the one (among the finding's distinct scores, and one
    above the highest) with specificity at least ``s`` and the highest sensitivity, the highest such
    threshold on ties; the reverse for a target sensitivity. The thresholds are fitted to the evaluated
    data, so the figures are optimistic for new data in the way a Youden threshold is.

    Args:
        probs, labels: ``N x K``, as for :func:`compute_report`.
        class_names: the ``K`` names.
        specificities, sensitivities: targets in (0, 1].

    Returns:
        one dict per (finding, target): ``class``, ``target`` (``"specificity"`` or ``"sensitivity"``),
        ``target_value``, ``threshold``, ``sensitivity``, ``specificity`` (the values reached); None
        values for a finding without both label values.
    """
    p, lab = _as_arrays(probs, labels, class_names)
    valid, pos = _masks(lab)
    for t in list(specificities) + list(sensitivities):
        if not 0 < float(t) <= 1:
            raise ValueError(f"operating point target {t!r} must be in (0, 1]")
    out = []
    for k, name in enumerate(class_names):
        v = valid[:, k]
        y, s = pos[v, k], p[v, k]
        defined = _absent_reason(int(v.sum()), int(y.sum())) is None
        thr, sens, spec = _roc_points(y, s) if defined else (None, None, None)
        for target, values in (("specificity", specificities), ("sensitivity", sensitivities)):
            for value in values:
                row = {"class": str(name), "target": target, "target_value": float(value), "threshold": None,
                       "sensitivity": None, "specificity": None}
                if defined:
                    meets, other = (spec >= value, sens) if target == "specificity" else (sens >= value, spec)
                    cand = np.flatnonzero(meets)
                    # best other rate; the first (highest threshold) among ties
                    i = int(cand[np.argmax(other[cand])])
                    row.update(threshold=float(thr[i]), sensitivity=float(sens[i]), specificity=float(spec[i]))
                out.append(row)
    return out


def load_thresholds(path: str | os.PathLike, class_names: Sequence[str]) -> np.ndarray:
    """The per-class thresholds recorded in a ``metrics.json`` written by :func:`hmn.evaluation.write_report`
    (e.g. on the validation split), in `class_names` order (NaN where the file has none)."""
    return _load_per_class(path, class_names, lambda data: data["per_class"], "threshold", "thresholds",
                           "written by hmn.evaluation.write_report")


def _load_per_class(
    path: str | os.PathLike, class_names: Sequence[str], section: Callable[[Any], Any], key: str, plural: str, expected: str
) -> np.ndarray:
    """One value per class from a ``metrics.json``: ``section(data)`` is its list of ``{"class", key}`` entries;
    returns the values of `key` in `class_names` order (NaN where null). ValueError naming the file when it
    cannot be read or parsed (a ``metrics.json`` `expected`), or when it lacks some classes (the `plural`
    values are missing for them)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
        recorded = {c["class"]: c.get(key) for c in section(data)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a metrics.json {expected} ({type(e).__name__}: {e})") from None
    missing = [c for c in class_names if c not in recorded]
    if missing:
        raise ValueError(f"{path} has no {plural} for classes {missing}; it has {sorted(recorded)}")
    return np.array([np.nan if recorded[c] is None else float(recorded[c]) for c in class_names])


def _resolve_thresholds(
    thresholds: Any, fixed_threshold: float, p: np.ndarray, lab: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, str, str | None]:
    """(K thresholds, method name for the report, source file or None)."""
    k = p.shape[1]
    accepted = (
        "accepted: 'youden', 'fixed', an array of one threshold per class, a {class: threshold} mapping, "
        "or the path of a metrics.json written by write_report"
    )
    if isinstance(thresholds, (str, os.PathLike)):
        if thresholds == "youden":
            return select_thresholds(p, lab, "youden"), "youden", None
        if thresholds == "fixed":
            return np.full(k, float(fixed_threshold)), "fixed", None
        if os.path.isfile(thresholds):
            return load_thresholds(thresholds, class_names), "given", os.fspath(thresholds)
        raise ValueError(f"unknown threshold method {thresholds!r} (and no such file); {accepted}")
    if isinstance(thresholds, Mapping):
        missing = [c for c in class_names if c not in thresholds]
        if missing:
            raise ValueError(f"thresholds mapping has no entry for classes {missing}; {accepted}")
        return np.array([np.nan if thresholds[c] is None else float(thresholds[c]) for c in class_names]), "given", None
    try:
        arr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds={thresholds!r} is not understood; {accepted}") from None
    if arr.shape != (k,):
        raise ValueError(f"thresholds has {arr.size} values for {k} classes {list(class_names)}; {accepted}")
    return arr, "given", None


def _at_threshold(y: np.ndarray, s: np.ndarray, t: float) -> dict[str, Any]:
    if not np.isfinite(t):
        return {"tp": None, "fp": None, "tn": None, "fn": None}
    pred = s >= t
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "tn": int((~pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
    }


def _rates(c: Mapping[str, Any]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        if c.get(a) is None or c[a] + c[b] == 0:
            return None
        return c[a] / (c[a] + c[b])

    return {
        "sensitivity": ratio("tp", "fn"),
        "specificity": ratio("tn", "fp"),
        "ppv": ratio("tp", "fp"),
        "npv": ratio("tn", "fn"),
    }


# ----------------------------------------------------------------------------------------------
# weighted AUC / AP (the bootstrap's workhorse: one resample = one row of image weights)


class _RankedLabels:
    """One class's scores and labels, pre-sorted so that the AUC and AP of many weightings (bootstrap
    resamples) cost a few gathers and cumulative sums each, without sorting again.

    ``rows[i]`` is the column of the weight matrix that weights item ``i`` (its image).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray, rows: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float64)
        y = np.asarray(positive, dtype=bool)
        pos = np.flatnonzero(y)
        neg = np.flatnonzero(~y)
        pos = pos[np.argsort(-s[pos], kind="stable")]  # positives by descending score
        neg = neg[np.argsort(s[neg], kind="stable")]  # negatives by ascending score
        sp, sn = s[pos], s[neg]
        self.rows_pos, self.rows_neg = rows[pos], rows[neg]
        # per positive: negatives scored strictly below / at or below it; positives scored at or above it
        self.neg_lt = np.searchsorted(sn, sp, side="left")
        self.neg_le = np.searchsorted(sn, sp, side="right")
        self.pos_ge = np.searchsorted(-sp, -sp, side="right")  # count of positives with score >= its score

    def __call__(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """AUC and AP for each row of ``weights`` (``B x columns``); NaN where a row lacks either label."""
        b = weights.shape[0]
        if self.rows_pos.size == 0 or self.rows_neg.size == 0:
            return np.full(b, np.nan), np.full(b, np.nan)
        wp = weights[:, self.rows_pos]
        acc = np.result_type(weights.dtype, np.int64)  # int64 for counts: the products below can pass 2**31
        cum_n = np.zeros((b, self.rows_neg.size + 1), dtype=acc)
        np.cumsum(weights[:, self.rows_neg], axis=1, out=cum_n[:, 1:])
        n_neg = cum_n[:, -1].astype(np.float64)
        below = cum_n[:, self.neg_lt]
        at_or_below = cum_n[:, self.neg_le]
        n_pos = wp.sum(axis=1, dtype=np.float64)
        tp = np.cumsum(wp, axis=1, dtype=acc)[:, self.pos_ge - 1]  # positive weight scored at or above each positive
        fp = n_neg[:, None] - below  # negative weight scored at or above it
        with np.errstate(divide="ignore", invalid="ignore"):
            # a positive outranks the negatives below it and ties with half of those at its score
            auc = (wp * (below + at_or_below)).sum(axis=1, dtype=np.float64) / (2.0 * n_pos * n_neg)
            # average precision: each positive adds its recall step times the precision at its score
            precision = np.where(tp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
            ap = (wp * precision).sum(axis=1) / n_pos
        absent = (n_pos <= 0) | (n_neg <= 0)
        auc[absent] = np.nan
        ap[absent] = np.nan
        return auc, ap


def weighted_auc_ap(scores: Any, positive: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision of `scores` against boolean `positive`, once per row of `weights`.

    A row of ``weights`` (``B x n``, non-negative) is how often each item occurs in a resample, so one
    call evaluates ``B`` bootstrap resamples without copying data. AUC counts ties as one half;
    average precision is scikit-learn's (sum over distinct thresholds, in descending order, of the
    recall increase times the precision). NaN where a row has no positive or no negative weight.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive, dtype=bool).reshape(-1)
    w = np.atleast_2d(np.asarray(weights))
    if w.shape[1] != s.size or y.size != s.size:
        raise ValueError(f"scores ({s.size}), positive ({y.size}) and weights {w.shape} disagree in length")
    return _RankedLabels(s, y, np.arange(s.size))(w)


def _interval(values: np.ndarray, ci: float) -> list[float] | None:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return [float(lo), float(hi)]


def _bootstrap(
    p: np.ndarray, valid: np.ndarray, pos: np.ndarray, macro_classes: list[int], micro_ok: bool,
    n_bootstrap: int, seed: int,
) -> dict[str, np.ndarray]:
    """Per-resample AUC and AP of each class, of the macro average and of the micro average (NaN: skipped)."""
    n, k = p.shape
    out = {
        "auc": np.full((n_bootstrap, k), np.nan),
        "ap": np.full((n_bootstrap, k), np.nan),
        "micro_auc": np.full(n_bootstrap, np.nan),
        "micro_ap": np.full(n_bootstrap, np.nan),
    }
    if n_bootstrap == 0 or n == 0:
        out["macro_auc"] = np.full(n_bootstrap, np.nan)
        out["macro_ap"] = np.full(n_bootstrap, np.nan)
        return out
    ranked = {c: _RankedLabels(p[valid[:, c], c], pos[valid[:, c], c], np.flatnonzero(valid[:, c]))
              for c in range(k) if valid[:, c].any()}
    micro = _RankedLabels(p[valid], pos[valid], np.nonzero(valid)[0]) if micro_ok else None
    per_resample = n + 2 * int(valid.sum())
    block = max(1, min(n_bootstrap, _BLOCK_ELEMENTS // max(per_resample, 1)))
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        # how often each image occurs in each resample (counts fit in int32: at most n)
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n)
        counts = counts.reshape(b, n).astype(np.int32)
        for c, ranked_c in ranked.items():
            out["auc"][start : start + b, c], out["ap"][start : start + b, c] = ranked_c(counts)
        if micro is not None:
            out["micro_auc"][start : start + b], out["micro_ap"][start : start + b] = micro(counts)
    if macro_classes:
        # mean over the macro classes; NaN (skipped) when any of them lacks a label value in the resample
        out["macro_auc"] = out["auc"][:, macro_classes].mean(axis=1)
        out["macro_ap"] = out["ap"][:, macro_classes].mean(axis=1)
    else:
        out["macro_auc"] = np.full(n_bootstrap, np.nan)
        out["macro_ap"] = np.full(n_bootstrap, np.nan)
    return out


# ----------------------------------------------------------------------------------------------
# the report


def compute_report(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    thresholds: str | Sequence[float] | Mapping[str, float] | np.ndarray | os.PathLike = "youden",
    fixed_threshold: float = 0.5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    groups: Mapping[str, Sequence[Any]] | None = None,
    calibration_bins: int = 10,
    temperatures: Any = None,
    temperatures_from: str | None = None,
    uncalibrated: Any = None,
    target_specificities: Sequence[float] = (0.90, 0.95),
    target_sensitivities: Sequence[float] = (0.90, 0.95),
    _sections: bool = True,
    _quiet: bool = False,
) -> dict[str, Any]:
    """Per-class, macro and micro ROC AUC / average precision with bootstrap intervals, and the
    sensitivity, specificity, PPV and NPV at an operating threshold per class; with the operating points,
    calibration and (given `groups`) subgroup sections.

    Args:
        probs: ``N x K`` predicted probabilities (images x classes).
        labels: ``N x K`` labels, 0 or 1; entries < 0 or NaN are unknown and excluded for that class.
        class_names: the ``K`` class names.
        thresholds: ``"youden"`` (Youden's J threshold picked on these data: optimistic, since it is
            fitted to the data it is evaluated on), ``"fixed"`` (`fixed_threshold` for every class), one
            threshold per class (array-like, NaN for none; e.g. from :func:`select_thresholds` on the
            validation split), a ``{class name: threshold}`` mapping, or the path of a ``metrics.json``
            whose thresholds are reused (e.g. the validation report's).
        fixed_threshold: the threshold of ``thresholds="fixed"``.
        n_bootstrap: bootstrap resamples (0: no intervals).
        ci: confidence level of the intervals, in (0, 1).
        seed: seed of the resampling (the same inputs and seed give the same intervals).
        groups: ``{attribute: one group value per image}`` (None: unknown) for the ``subgroups`` section
            (:func:`hmn.evaluation.subgroups.subgroup_report`); None leaves it out.
        calibration_bins: bins of the expected calibration error (:mod:`hmn.evaluation.calibration`).
        temperatures: the ``K`` temperatures already applied to `probs` (recorded in ``calibration``), or None.
        temperatures_from: the file they came from, for the record.
        uncalibrated: the probabilities before `temperatures`, whose ECE is reported beside.
        target_specificities, target_sensitivities: the ``operating_points`` targets
            (:func:`operating_points`).

    Returns:
        A JSON-ready dict (floats or None, never NaN): ``settings``, ``n_images``, ``class_names``,
        ``per_class`` (one dict per class), ``macro`` and ``micro``; see :mod:`hmn.evaluation.report`.
        A class without both a positive and a negative label gets ``auc: None`` and a ``reason``.
    """
    class_names = [str(c) for c in class_names]
    p, lab = _as_arrays(probs, labels, class_names)
    if not 0 < float(ci) < 1:
        raise ValueError(f"ci={ci!r} must be a confidence level strictly between 0 and 1, e.g. 0.95")
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be >= 0 (0: no confidence intervals)")
    n_bootstrap, ci, seed = int(n_bootstrap), float(ci), int(seed)
    valid, pos = _masks(lab)
    n_img, k = p.shape
    thr, method, source = _resolve_thresholds(thresholds, fixed_threshold, p, lab, class_names)

    per_class: list[dict[str, Any]] = []
    macro_classes: list[int] = []
    excluded: dict[str, str] = {}
    micro_counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    aucs = _defined_class_aucs(p, valid, pos)
    for c, name in enumerate(class_names):
        v = valid[:, c]
        y, s = pos[v, c], p[v, c]
        n_c, pos_c = int(v.sum()), int(y.sum())
        reason = _absent_reason(n_c, pos_c)
        entry: dict[str, Any] = {"class": name, "n": n_c, "positives": pos_c, "negatives": n_c - pos_c}
        if reason is None:
            macro_classes.append(c)
            entry["auc"] = aucs[c]
            entry["average_precision"] = float(average_precision_score(y, s))
        else:
            excluded[name] = reason
            entry["auc"] = None
            # AP needs positives only, but a report mixing defined and undefined AUC/AP rows confuses; keep both null
            entry["average_precision"] = None
        entry["auc_ci"] = entry["ap_ci"] = None
        entry["bootstrap_used"] = 0
        t = _float(thr[c])
        entry["threshold"] = t
        counts = _at_threshold(y, s, np.nan if t is None else t)
        entry.update(_rates(counts))
        entry.update(counts)
        if counts["tp"] is not None:
            for key in micro_counts:
                micro_counts[key] += counts[key]
        entry["reason"] = reason
        per_class.append(entry)

    n_valid, n_pos = int(valid.sum()), int(pos.sum())
    micro_reason = _absent_reason(n_valid, n_pos)
    micro: dict[str, Any] = {"n": n_valid, "positives": n_pos, "auc": None, "average_precision": None}
    if micro_reason is None:
        micro["auc"] = float(roc_auc_score(pos[valid], p[valid]))
        micro["average_precision"] = float(average_precision_score(pos[valid], p[valid]))
    micro.update({"auc_ci": None, "ap_ci": None, "bootstrap_used": 0})
    has_threshold = any(e["threshold"] is not None for e in per_class)
    micro.update(_rates(micro_counts) if has_threshold else _rates({"tp": None}))
    micro["reason"] = micro_reason

    def mean_of(key: str) -> float | None:
        vals = [per_class[c][key] for c in macro_classes if per_class[c][key] is not None]
        return float(np.mean(vals)) if vals else None

    macro: dict[str, Any] = {
        "n": n_valid,
        "positives": n_pos,
        "auc": mean_of("auc"),
        "average_precision": mean_of("average_precision"),
        "auc_ci": None,
        "ap_ci": None,
        "bootstrap_used": 0,
        **{key: mean_of(key) for key in ("sensitivity", "specificity", "ppv", "npv")},
        "classes": [class_names[c] for c in macro_classes],
        "excluded": excluded,
    }

    if n_bootstrap:
        boot = _bootstrap(p, valid, pos, macro_classes, micro_reason is None, n_bootstrap, seed)
        for c in macro_classes:
            used = int(np.isfinite(boot["auc"][:, c]).sum())
            per_class[c].update(
                auc_ci=_interval(boot["auc"][:, c], ci), ap_ci=_interval(boot["ap"][:, c], ci), bootstrap_used=used
            )
            if used < 0.9 * n_bootstrap and not _quiet:
                logger.warning(
                    "class %s: only %d of %d bootstrap resamples had both label values (%d positives, %d negatives); "
                    "its interval is unreliable",
                    class_names[c], used, n_bootstrap, per_class[c]["positives"], per_class[c]["negatives"],
                )
        macro.update(
            auc_ci=_interval(boot["macro_auc"], ci),
            ap_ci=_interval(boot["macro_ap"], ci),
            bootstrap_used=int(np.isfinite(boot["macro_auc"]).sum()),
        )
        micro.update(
            auc_ci=_interval(boot["micro_auc"], ci),
            ap_ci=_interval(boot["micro_ap"], ci),
            bootstrap_used=int(np.isfinite(boot["micro_auc"]).sum()),
        )
    if excluded and not _quiet:
        logger.warning("classes left out of the macro average (AUC undefined): %s", excluded)

    settings: dict[str, Any] = {
        "threshold_method": method,
        "fixed_threshold": float(fixed_threshold) if method == "fixed" else None,
        "thresholds_from": source,
        "positive_rule": "prob >= threshold",
        "n_bootstrap": n_bootstrap,
        "ci": ci,
        "seed": seed,
        "ci_method": "percentile bootstrap; images resampled with replacement; resamples where a class has "
        "only one label value are skipped for that class",
        "unknown_labels": "label < 0 or NaN, excluded per class",
    }
    report = {
        "settings": settings,
        "n_images": n_img,
        "class_names": class_names,
        "per_class": per_class,
        "macro": macro,
        "micro": micro,
    }
    if _sections:
        from .calibration import calibration_report
        from .subgroups import subgroup_report

        report["operating_points"] = operating_points(p, lab, class_names, target_specificities, target_sensitivities)
        report["calibration"] = calibration_report(p, lab, class_names, calibration_bins, applied=temperatures,
                                                   applied_from=temperatures_from, uncalibrated=uncalibrated)
        if groups:
            report["subgroups"] = subgroup_report(p, lab, class_names, groups, [e["threshold"] for e in per_class],
                                                  n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    return report
