"""Per-class and averaged metrics of a multi-label classifier, with percentile bootstrap confidence intervals
that resample patients.

:func:`hmn.evaluation.compute_report` turns predicted probabilities and 0/1 labels (``N x K``: images x classes) into
a JSON-ready dict (the layout is described in :mod:`hmn.evaluation.report`); :func:`select_thresholds`
and :func:`fit_operating_thresholds` pick operating thresholds on one split (validation) to be applied on
another (test).

Conventions (the statistical design a paper needs):

* **The patient is the unit of uncertainty.** Given ``patient_ids``, the bootstrap draws patients with
  replacement and takes every image of each drawn patient (the cluster bootstrap; Field & Welsh, "Bootstrapping
  clustered data", JRSS B 69(3), 2007): a patient's several images are correlated, and resampling them as
  if independent gives intervals too narrow (a simulation in ``benchmarks/bench_ci_coverage.py``). Without
  patient ids every image is its own unit, and the report says so (``settings.ci_unit``). An image whose
  patient id is empty is a unit of its own.
* **Thresholds are never fitted on the reported data by default.** ``thresholds="fixed"`` (0.5) unless
  thresholds fitted elsewhere are given (the validation split's, recorded by training in
  ``models/thresholds.json``); ``"youden"`` fits them on the evaluated data only when asked, and the
  report then marks every number at those thresholds (``thresholds_fitted_on_evaluated_data``).
* **Few positives are not evidence.** A finding with fewer than ``min_positives`` positive (or negative)
  units gets its point estimates but no interval, and is left out of the macro means (named in
  ``macro.excluded``); the minimum comes from a simulation of the null (``benchmarks/bench_min_positives.py``).
* A label entry below 0 or NaN is *unknown* and excluded for that class only (e.g. CheXpert's uncertain
  labels under an "ignore" policy). Known labels must be exactly 0 or 1.
* An image counts as positive for a class at threshold ``t`` when ``prob >= t``.
* Youden's J threshold: the predicted score ``t`` (one of the class's own scores) that maximizes
  ``sensitivity + specificity - 1`` with the rule above; among ties the highest such score. The
  "everything negative" point is never chosen, so a threshold always labels at least one image positive.
* Bootstrap: units (patients, or images) are resampled with replacement ``n_bootstrap`` times with
  ``numpy.random.default_rng(seed)``; a class's statistic is computed in each resample where that class
  has both a positive and a negative known label (the other resamples are skipped and the number used
  is reported), and the interval is the ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles (numpy's
  linear interpolation) of those values. The macro average of a resample is used only when every
  class in the macro average has both label values in it. Sensitivity, specificity, PPV and NPV get
  intervals at their (fixed, not refitted) thresholds from the same resamples.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

__all__ = ["DEFAULT_MIN_POSITIVES", "THRESHOLD_METHODS", "fit_operating_thresholds",
           "load_operating_thresholds", "load_thresholds", "macro_auc", "model_thresholds", "operating_points", "patient_units",
           "select_thresholds", "weighted_auc_ap"]

logger = logging.getLogger(__name__)

THRESHOLD_METHODS = ("fixed", "youden")

# Below this many positive (or negative) units a finding gets no interval or p-value and stays out of the macro
# means. Two equally good models on 300 images (benchmarks/bench_min_positives.py, 1,000 null data sets per count,
# BENCHMARKS.md): the paired bootstrap calls their difference significant at the 5% level in 83% of data sets with
# 1 positive, 45% with 2, 10% with 5, 7.9% with 10, 7.5% with 15 and 6.6% with 20 (DeLong 8.3%, 6.9%, 6.4%); 20 is
# the fewest at which both tests stay within 7% (1.4 times the nominal rate).
DEFAULT_MIN_POSITIVES = 20

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
    where it is defined); the one definition behind :func:`macro_auc` and :func:`hmn.evaluation.compute_report`."""
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
    aucs = class_aucs(probs, labels)
    return (float(np.mean(list(aucs.values()))) if aucs else None), sorted(aucs)


def class_aucs(probs: Any, labels: Any) -> dict[int, float]:
    """Each class's ROC AUC over its known labels, for the classes :func:`macro_auc` averages (at least one
    positive and one negative known label): ``{class index: AUC}``. Same arguments and errors as :func:`macro_auc`."""
    p, lab = _as_arrays(probs, labels)
    valid, pos = _masks(lab)
    return {int(k): float(v) for k, v in _defined_class_aucs(p, valid, pos).items()}


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
        probs, labels: ``N x K``, as for :func:`hmn.evaluation.compute_report`.
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


def fit_operating_thresholds(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    specificities: Sequence[float] = (0.90, 0.95),
    sensitivities: Sequence[float] = (0.90, 0.95),
) -> dict[str, Any]:
    """Every threshold the report uses, fitted on these data (the validation split) for use on other data.

    Args:
        probs, labels: ``N x K``, as for :func:`hmn.evaluation.compute_report`.
        class_names: the ``K`` names.
        specificities, sensitivities: the operating-point targets (:func:`operating_points`).

    Returns:
        ``{"class_names", "per_class": [{"class", "threshold"}], "operating_points": [{"class", "target",
        "target_value", "threshold", "sensitivity", "specificity"}]}``: Youden's J threshold per finding
        (null without both label values) and the operating points' thresholds, with the rates they reached on
        these data. :func:`load_thresholds` and :func:`load_operating_thresholds` read it back (as they
        read a ``metrics.json``).
    """
    names = [str(c) for c in class_names]
    thr = select_thresholds(probs, labels, "youden")
    return {
        "class_names": names,
        "per_class": [{"class": c, "threshold": _float(t)} for c, t in zip(names, thr)],
        "operating_points": operating_points(probs, labels, names, specificities, sensitivities),
    }


def load_operating_thresholds(path: str | os.PathLike, class_names: Sequence[str]) -> dict[tuple[str, str, float], float]:
    """The operating points' thresholds recorded in a ``metrics.json`` or ``thresholds.json``:
    ``{(class, target, target_value): threshold}`` for the classes in `class_names` (an empty dict when the
    file has no ``operating_points`` section). ValueError naming the file when it cannot be read."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            out = _record_operating(json.load(f), class_names)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a metrics.json or thresholds.json with operating points "
                         f"({type(e).__name__}: {e})") from None
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


def model_thresholds(ckpt_dir: str | os.PathLike, thresholds: Any = "validation") -> Any:
    """The bundles' ``thresholds`` setting resolved for :func:`hmn.evaluation.compute_report`.

    Args:
        ckpt_dir: the model's folder (``models/``), where training records ``thresholds.json`` beside ``model.pt``
            (:class:`hmn.handlers.ValidationThresholds`: fitted on the validation split).
        thresholds: ``"validation"`` (that file; a fixed 0.5, with a warning saying so, when the model has
            none), ``"fixed"``, ``"youden"`` (fitted on the evaluated data: optimistic, marked in the report), or
            the path of a ``metrics.json`` / ``thresholds.json`` fitted on other data.

    Returns:
        What :func:`hmn.evaluation.compute_report` takes as ``thresholds``.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a value that is none of the above.
    """
    value = os.fspath(thresholds) if isinstance(thresholds, os.PathLike) else thresholds
    if value == "validation":
        path = os.path.join(os.fspath(ckpt_dir), "thresholds.json")
        if os.path.isfile(path):
            return path
        logger.warning("no %s (the validation split's thresholds are recorded by training since this version): "
                       "the report uses a fixed threshold; give --thresholds with a metrics.json evaluated on the "
                       "validation split (--eval_split validation --thresholds youden) for fitted ones", path)
        return "fixed"
    if value in THRESHOLD_METHODS:
        return value
    if isinstance(value, str):
        if os.path.isfile(value):
            return value
        raise FileNotFoundError(f"thresholds={value!r}: no such file; accepted: 'validation', 'fixed', 'youden', or "
                                "the path of a metrics.json or thresholds.json")
    raise ValueError(f"thresholds={value!r}; accepted: 'validation', 'fixed', 'youden', or a metrics.json path")


def _record_operating(record: Mapping[str, Any], class_names: Sequence[str]) -> dict[tuple[str, str, float], float]:
    out = {}
    for r in record.get("operating_points") or []:
        if r.get("class") in class_names and r.get("threshold") is not None:
            out[(str(r["class"]), str(r["target"]), float(r["target_value"]))] = float(r["threshold"])
    return out


def _resolve_thresholds(
    thresholds: Any, fixed_threshold: float, p: np.ndarray, lab: np.ndarray, class_names: Sequence[str]
) -> tuple[np.ndarray, str, str | None, dict[tuple[str, str, float], float]]:
    """(K thresholds, method name for the report, source file or None, operating points' thresholds given)."""
    k = p.shape[1]
    accepted = (
        "accepted: 'fixed', 'youden' (fitted on the evaluated data), an array of one threshold per class, a "
        "{class: threshold} mapping, a thresholds record ({'per_class': [...], 'operating_points': [...]}), or the "
        "path of a metrics.json or thresholds.json with per-class thresholds"
    )
    if isinstance(thresholds, (str, os.PathLike)):
        if thresholds == "youden":
            return select_thresholds(p, lab, "youden"), "youden", None, {}
        if thresholds == "fixed":
            return np.full(k, float(fixed_threshold)), "fixed", None, {}
        if os.path.isfile(thresholds):
            path = os.fspath(thresholds)
            return load_thresholds(path, class_names), "given", path, load_operating_thresholds(path, class_names)
        raise ValueError(f"unknown threshold method {thresholds!r} (and no such file); {accepted}")
    if isinstance(thresholds, Mapping) and "per_class" in thresholds:
        recorded = {str(e["class"]): e.get("threshold") for e in thresholds["per_class"]}
        missing = [c for c in class_names if c not in recorded]
        if missing:
            raise ValueError(f"the thresholds record {thresholds.get('path') or ''} has no thresholds for classes "
                             f"{missing}; it has {sorted(recorded)}")
        arr = np.array([np.nan if recorded[c] is None else float(recorded[c]) for c in class_names])
        return arr, "given", thresholds.get("path"), _record_operating(thresholds, class_names)
    if isinstance(thresholds, Mapping):
        missing = [c for c in class_names if c not in thresholds]
        if missing:
            raise ValueError(f"thresholds mapping has no entry for classes {missing}; {accepted}")
        arr = np.array([np.nan if thresholds[c] is None else float(thresholds[c]) for c in class_names])
        return arr, "given", None, {}
    try:
        arr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds={thresholds!r} is not understood; {accepted}") from None
    if arr.shape != (k,):
        raise ValueError(f"thresholds has {arr.size} values for {k} classes {list(class_names)}; {accepted}")
    return arr, "given", None, {}


def threshold_source(method: str, source: str | None, fixed_threshold: float | None = None,
                     origin: str | None = None) -> str:
    """Where a report's thresholds came from, as its files state it (the ``threshold_source`` column): e.g.
    ``"validation split: models/thresholds.json"`` (`origin`, the file's own ``source``), ``"given: FILE"``,
    ``"fixed 0.5"`` or ``"fitted on the evaluated data (optimistic)"``."""
    if method == "youden":
        return "fitted on the evaluated data (optimistic)"
    if method == "fixed":
        return f"fixed {fixed_threshold:g}"
    label = str(origin) if origin else "given"
    return f"{label}: {source}" if source else label


def _given_operating_points(
    p: np.ndarray, lab: np.ndarray, class_names: Sequence[str], given: Mapping[tuple[str, str, float], float],
    specificities: Sequence[float], sensitivities: Sequence[float],
) -> list[dict[str, Any]]:
    """The operating points at thresholds fitted elsewhere: the sensitivity and specificity they reach here."""
    valid, pos = _masks(lab)
    out = []
    for k, name in enumerate(class_names):
        v = valid[:, k]
        y, s = pos[v, k], p[v, k]
        for target, values in (("specificity", specificities), ("sensitivity", sensitivities)):
            for value in values:
                t = given.get((str(name), target, float(value)))
                row = {"class": str(name), "target": target, "target_value": float(value), "threshold": t,
                       "sensitivity": None, "specificity": None}
                if t is not None:
                    rates = _rates(_at_threshold(y, s, t))
                    row.update(sensitivity=rates["sensitivity"], specificity=rates["specificity"])
                out.append(row)
    return out


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


def patient_units(patient_ids: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int, str, int]:
    """The resampling unit of each of `n` images.

    Args:
        patient_ids: one patient id per image (any hashable; None, NaN or an empty string: unknown), or None.
        n: the number of images.

    Returns:
        ``(unit, n_units, ci_unit, n_without_id)``: ``unit[i]`` in ``0 .. n_units - 1`` numbers image ``i``'s
        patient (in order of first appearance); ``ci_unit`` is ``"patient"`` when any image has an id (an
        image without one is then a unit of its own, counted in ``n_without_id``) and ``"image"`` otherwise.

    Raises:
        ValueError: `patient_ids` does not hold `n` values.
    """
    if patient_ids is None:
        return np.arange(n), n, "image", n
    ids = list(patient_ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} patient ids for {n} images; give one per image (empty where unknown)")

    def known(x: Any) -> bool:
        if x is None:
            return False
        if isinstance(x, float) and not np.isfinite(x):
            return False
        return str(x).strip() != ""

    if not any(known(x) for x in ids):
        return np.arange(n), n, "image", n
    numbers: dict[str, int] = {}
    unit = np.empty(n, dtype=np.int64)
    missing = 0
    for i, x in enumerate(ids):
        if known(x):
            unit[i] = numbers.setdefault("id:" + str(x).strip(), len(numbers))
        else:
            missing += 1
            unit[i] = numbers.setdefault(f"image:{i}", len(numbers))
    return unit, len(numbers), "patient", missing


def unit_counts(rng: np.random.Generator, unit: np.ndarray, n_units: int, b: int) -> np.ndarray:
    """``b x len(unit)`` image weights of `b` resamples: `n_units` units drawn with replacement per resample
    (``rng.integers(0, n_units, size=(b, n_units))``), each image weighted by how often its unit was drawn."""
    idx = rng.integers(0, n_units, size=(b, n_units))
    drawn = np.bincount((idx + (np.arange(b) * n_units)[:, None]).ravel(), minlength=b * n_units)
    return drawn.reshape(b, n_units).astype(np.int32)[:, unit]


def _units_per_label(unit: np.ndarray, v: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """Units holding a positive and units holding a negative known label (images when each is its own unit)."""
    return int(np.unique(unit[v][y]).size), int(np.unique(unit[v][~y]).size)


def _bootstrap(
    p: np.ndarray, valid: np.ndarray, pos: np.ndarray, macro_classes: list[int], micro_ok: bool,
    n_bootstrap: int, seed: int, unit: np.ndarray, n_units: int, thresholds: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-resample AUC and AP of each class, of the macro average and of the micro average, and the rates at
    each class's threshold (NaN: skipped)."""
    n, k = p.shape
    out = {
        "auc": np.full((n_bootstrap, k), np.nan),
        "ap": np.full((n_bootstrap, k), np.nan),
        "micro_auc": np.full(n_bootstrap, np.nan),
        "micro_ap": np.full(n_bootstrap, np.nan),
        **{r: np.full((n_bootstrap, k), np.nan) for r in _RATE_NAMES},
    }
    if n_bootstrap == 0 or n == 0:
        out["macro_auc"] = np.full(n_bootstrap, np.nan)
        out["macro_ap"] = np.full(n_bootstrap, np.nan)
        return out
    ranked = {c: _RankedLabels(p[valid[:, c], c], pos[valid[:, c], c], np.flatnonzero(valid[:, c]))
              for c in range(k) if valid[:, c].any()}
    # per class with a threshold: 0/1 indicators of tp, fn, tn, fp per image (columns), for the rates' intervals
    cells = {}
    for c in range(k):
        if np.isfinite(thresholds[c]) and valid[:, c].any():
            called = p[:, c] >= thresholds[c]
            y, v = pos[:, c], valid[:, c]
            # float64 for a BLAS product; the sums of integer counts are exact far beyond any data set's size
            cells[c] = np.stack([v & y & called, v & y & ~called, v & ~y & ~called, v & ~y & called],
                                axis=1).astype(np.float64)
    micro = _RankedLabels(p[valid], pos[valid], np.nonzero(valid)[0]) if micro_ok else None
    per_resample = n + 2 * int(valid.sum())
    block = max(1, min(n_bootstrap, _BLOCK_ELEMENTS // max(per_resample, 1)))
    rng = np.random.default_rng(seed)
    for start in range(0, n_bootstrap, block):
        b = min(block, n_bootstrap - start)
        counts = unit_counts(rng, unit, n_units, b)
        for c, ranked_c in ranked.items():
            out["auc"][start : start + b, c], out["ap"][start : start + b, c] = ranked_c(counts)
        weights = counts.astype(np.float64) if cells else None
        for c, m in cells.items():
            tp, fn, tn, fp = (weights @ m).T
            with np.errstate(divide="ignore", invalid="ignore"):
                for name, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                                       ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
                    out[name][start : start + b, c] = np.where(den > 0, num / den, np.nan)
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


_RATE_NAMES = ("sensitivity", "specificity", "ppv", "npv")


# ----------------------------------------------------------------------------------------------
# the report


def _metrics_report(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    thresholds: str | Sequence[float] | Mapping[str, float] | np.ndarray | os.PathLike = "fixed",
    fixed_threshold: float = 0.5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    patient_ids: Sequence[Any] | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    quiet: bool = False,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, Any]:
    """:func:`hmn.evaluation.report.compute_report` without its operating points, calibration and subgroup
    sections (the arguments and errors are those of that function; `quiet` logs nothing). Returns the report, the
    checked ``N x K`` probabilities and labels, and the operating points' thresholds given with `thresholds`: what
    those sections are computed from. The subgroup section calls it once per group."""
    class_names = [str(c) for c in class_names]
    p, lab = _as_arrays(probs, labels, class_names)
    if not 0 < float(ci) < 1:
        raise ValueError(f"ci={ci!r} must be a confidence level strictly between 0 and 1, e.g. 0.95")
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be >= 0 (0: no confidence intervals)")
    if int(min_positives) < 1:
        raise ValueError(f"min_positives={min_positives!r} must be >= 1")
    if not 0 <= float(fixed_threshold) <= 1:
        raise ValueError(f"fixed_threshold={fixed_threshold!r} must be a probability in [0, 1]")
    n_bootstrap, ci, seed, min_positives = int(n_bootstrap), float(ci), int(seed), int(min_positives)
    valid, pos = _masks(lab)
    n_img, k = p.shape
    unit, n_units, ci_unit, without_id = patient_units(patient_ids, n_img)
    thr, method, source, given_ops = _resolve_thresholds(thresholds, fixed_threshold, p, lab, class_names)
    fitted_here = method == "youden"
    origin = thresholds.get("source") if isinstance(thresholds, Mapping) else None
    if method == "given" and source and origin is None:
        try:
            with open(source) as f:
                origin = json.load(f).get("source")
        except (OSError, ValueError, AttributeError):
            origin = None
    where = threshold_source(method, source, float(fixed_threshold), origin)
    unit_word = "patients" if ci_unit == "patient" else "images"

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
        pos_units, neg_units = _units_per_label(unit, v, y)
        entry: dict[str, Any] = {"class": name, "n": n_c, "positives": pos_c, "negatives": n_c - pos_c,
                                 "positive_units": pos_units, "negative_units": neg_units}
        if reason is None:
            entry["auc"] = aucs[c]
            entry["average_precision"] = float(average_precision_score(y, s))
            if min(pos_units, neg_units) < min_positives:
                reason = (f"{pos_units} positive and {neg_units} negative {unit_word}, fewer than {min_positives}: "
                          "no interval, left out of the macro means")
            else:
                macro_classes.append(c)
        else:
            entry["auc"] = None
            # AP needs positives only, but a report mixing defined and undefined AUC/AP rows confuses; keep both null
            entry["average_precision"] = None
        if reason is not None:
            excluded[name] = reason
        entry["auc_ci"] = entry["ap_ci"] = None
        entry["bootstrap_used"] = 0
        t = _float(thr[c])
        entry["threshold"] = t
        counts = _at_threshold(y, s, np.nan if t is None else t)
        entry.update(_rates(counts))
        entry.update({f"{r}_ci": None for r in _RATE_NAMES})
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
        **{key: mean_of(key) for key in _RATE_NAMES},
        "classes": [class_names[c] for c in macro_classes],
        "excluded": excluded,
    }

    if n_bootstrap:
        boot = _bootstrap(p, valid, pos, macro_classes, micro_reason is None, n_bootstrap, seed, unit, n_units, thr)
        for c in macro_classes:
            used = int(np.isfinite(boot["auc"][:, c]).sum())
            per_class[c].update(
                auc_ci=_interval(boot["auc"][:, c], ci), ap_ci=_interval(boot["ap"][:, c], ci), bootstrap_used=used,
                **{f"{r}_ci": _interval(boot[r][:, c], ci) for r in _RATE_NAMES},
            )
            if used < 0.9 * n_bootstrap and not quiet:
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
    if not quiet:
        if excluded:
            logger.warning("classes left out of the macro average: %s", excluded)
        if n_bootstrap:
            if ci_unit == "patient":
                logger.info("intervals resample patients: %d patients, %d images%s", n_units, n_img,
                            f" ({without_id} images without a patient id, each its own unit)" if without_id else "")
            else:
                logger.warning("no patient ids: the intervals resample the %d images as if independent; with several "
                               "images per patient they are too narrow (give patient ids)", n_img)
        if fitted_here:
            logger.warning("thresholds fitted on the evaluated data (Youden): sensitivity, specificity, PPV, NPV and "
                           "operating points are optimistic; use thresholds fitted on the validation split")

    settings: dict[str, Any] = {
        "threshold_method": method,
        "fixed_threshold": float(fixed_threshold) if method == "fixed" else None,
        "thresholds_from": source,
        "threshold_source": where,
        "thresholds_fitted_on_evaluated_data": fitted_here,
        "positive_rule": "prob >= threshold",
        "n_bootstrap": n_bootstrap,
        "ci": ci,
        "seed": seed,
        "ci_unit": ci_unit,
        "ci_method": f"percentile bootstrap; {unit_word} resampled with replacement"
        + (" (every image of a drawn patient)" if ci_unit == "patient" else " (no patient ids: images as if independent)")
        + "; resamples where a class has only one label value are skipped for that class",
        "images_without_patient_id": without_id if ci_unit == "patient" else n_img,
        "min_positives": min_positives,
        "unknown_labels": "label < 0 or NaN, excluded per class",
    }
    report = {
        "settings": settings,
        "n_images": n_img,
        "n_patients": n_units if ci_unit == "patient" else None,
        "class_names": class_names,
        "per_class": per_class,
        "macro": macro,
        "micro": micro,
    }
    return report, p, lab, given_ops
