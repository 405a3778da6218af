"""Comparison of two models' ROC AUCs on the same images: DeLong's test and a paired bootstrap.

``python -m hmn compare A/predictions.csv B/predictions.csv [--out DIR]`` reads two ``predictions.csv``
files written by :func:`hmn.evaluation.write_report` (model A, the reference, and model B), keeps the
images both contain and the classes both have, and tests per class whether B's ROC AUC differs from A's:

* :func:`delong_test`: the test of two correlated ROC AUCs of DeLong, DeLong & Clarke-Pearson,
  "Comparing the areas under two or more correlated receiver operating characteristic curves: a
  nonparametric approach", Biometrics 44(3):837-845, 1988. The variance-covariance matrix of the two
  AUCs is estimated from the structural components (placement values) ``V10`` and ``V01``, which are
  computed from midranks as in Sun & Xu, "Fast implementation of DeLong's algorithm for comparing the
  areas under correlated receiver operating characteristic curves", IEEE Signal Processing Letters
  21(11):1389-1393, 2014. Ties count one half (the Mann-Whitney kernel).
* :func:`paired_bootstrap`: patients (or, without patient ids, images) resampled with replacement, both
  models' AUCs computed on the same resampled images, percentile interval and bootstrap p-value of the
  difference (definition below).
* The patient is the unit: when file A (else file B) has a ``patient_id`` column, the bootstrap draws patients
  and DeLong's variance is Obuchowski's for clustered data (Biometrics 53(2):567-578, 1997); without one the
  images are taken as independent and ``settings.ci_unit`` says ``"image"``.
* A class with fewer than ``min_positives`` positive or negative units (default
  :data:`hmn.evaluation.metrics.DEFAULT_MIN_POSITIVES`, chosen by the null simulation in
  ``benchmarks/bench_min_positives.py``) gets its AUCs and difference but no p-value or interval, and is left
  out of the macro mean with its reason.
* :func:`compare_predictions`: the two files matched and both tests run, as a JSON-ready dict.
* :func:`write_comparison`: ``comparison.json``, ``comparison.csv`` and ``comparison.png``.

Conventions:

* The **difference** is always ``auc_b - auc_a``: positive when model B (the second file) ranks the
  positives higher than model A (the first file) does.
* The labels are model A's. Model B's labels must agree wherever both files know a label (a
  disagreement is an error: the files were evaluated against different ground truth); where A's label
  is unknown the image is left out of that class even if B knows it (counted in
  ``labels_known_only_in_b``).
* A label is unknown when its field is empty (or NaN, or below 0); unknown labels are excluded per class.
* DeLong's interval for the difference is the normal approximation ``difference +- z_(1+ci)/2 * se``;
  it is not clipped to [-1, 1]. DeLong's test does not apply to the macro mean (its fields are null).
* Bootstrap resamples: with ``rng = numpy.random.default_rng(seed)``, resample ``r`` for
  ``r = 0 .. n_bootstrap - 1`` is ``rng.integers(0, n, size=n)`` (one call per resample, in that
  order), indices into the shared images in the order of file A. A class's difference is computed in
  each resample where that class has both a positive and a negative known label (others are skipped;
  ``bootstrap_used`` counts the used ones); the macro difference of a resample is the mean over the
  macro classes and is used only when all of them have both label values in it. The interval is the
  ``(1 - ci) / 2`` and ``(1 + ci) / 2`` percentiles (numpy's linear interpolation) of the used values.
* Bootstrap p-value (two-sided, for "no difference"):
  ``p = min(1, 2 * (1 + min(#{d* <= 0}, #{d* >= 0})) / (used + 1))`` over the used resampled
  differences ``d*``: the achieved significance level of the percentile interval (0 lies outside the
  ``1 - alpha`` percentile interval about when ``p < alpha``; Efron & Tibshirani, "An Introduction to
  the Bootstrap", 1993), with the ``+1`` of Davison & Hinkley ("Bootstrap Methods and their
  Application", 1997) so that a finite number of resamples never gives ``p = 0``: the smallest
  attainable value is ``2 / (used + 1)``.

Files written by :func:`write_comparison` (atomically, as :mod:`hmn.evaluation.report` writes its
files: UTF-8, ``\\n`` line endings, Python's ``csv`` module, floats at full precision, an undefined
value an empty CSV field and ``null`` in JSON):

``comparison.json``
    The dict of :func:`compare_predictions`:

    * ``settings``: ``n_bootstrap``, ``ci``, ``seed``, ``difference`` (``"auc_b - auc_a"``),
      ``labels_from`` (``"a"``), ``ci_unit`` (``"patient"`` or ``"image"``), ``n_patients``,
      ``images_without_patient_id``, ``min_positives``, ``delong_method``, ``bootstrap_method``,
      ``bootstrap_p_value``, ``unknown_labels``.
    * ``a`` and ``b``: ``path``, ``n_images``, ``classes`` of each file.
    * ``n_shared_images`` (images in both files, compared), ``n_images_only_in_a``, ``n_images_only_in_b``.
    * ``classes`` (compared, in file A's order), ``classes_only_in_a``, ``classes_only_in_b``,
      ``labels_known_only_in_b`` (``{class: images whose label only B knows}``, non-zero counts only).
    * ``per_class``: one object per compared class: ``class``, ``n`` (shared images with a known label),
      ``positives``, ``negatives``, ``positive_units``, ``negative_units`` (patients, or images without
      patient ids), ``auc_a``, ``auc_b``, ``difference``, ``delong_se``, ``delong_z``,
      ``delong_p``, ``delong_ci`` (``[low, high]``), ``var_a``, ``var_b``, ``covariance`` (DeLong's
      variance-covariance estimate of the two AUCs), ``bootstrap_ci``, ``bootstrap_p``,
      ``bootstrap_used``, ``reason`` (why something is null, e.g. ``"no positive labels"``; null otherwise).
    * ``macro``: ``class`` (``"macro"``), ``classes`` (those averaged: both label values among the shared
      images), ``excluded`` (``{class: reason}``), ``n``, ``positives`` and ``negatives`` summed over the
      averaged classes, ``auc_a``, ``auc_b``, ``difference`` (means over the averaged classes),
      ``delong_*``, ``var_*`` and ``covariance`` null, ``bootstrap_ci``, ``bootstrap_p``,
      ``bootstrap_used``, ``reason``.

``comparison.csv``
    Columns :data:`COMPARISON_COLUMNS`: ``class, n, positives, negatives, auc_a, auc_b, difference,
    delong_se, delong_z, delong_p, delong_ci_low, delong_ci_high, bootstrap_ci_low, bootstrap_ci_high,
    bootstrap_p, bootstrap_used, reason``; one row per compared class, then the row ``macro``. Values as in
    ``comparison.json`` (``difference`` is ``auc_b - auc_a``; the CI columns bound the ``ci`` level interval).

``comparison.png``
    A forest plot: per class, the AUC difference (B - A) with its DeLong interval; the macro difference
    with its bootstrap interval (a diamond); a vertical line at zero. Drawn with matplotlib's Agg canvas.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from hmn.durable import atomic_write

from ._tables import _num, _table
from .metrics import DEFAULT_MIN_POSITIVES, _BLOCK_ELEMENTS, _absent_reason, _interval, _RankedLabels, patient_units

__all__ = [
    "COMPARISON_COLUMNS",
    "COMPARISON_FILES",
    "DeLongResult",
    "PairedBootstrapResult",
    "PredictionTable",
    "compare_main",
    "compare_predictions",
    "delong_test",
    "format_table",
    "paired_bootstrap",
    "plot_comparison",
    "read_predictions",
    "write_comparison",
]

logger = logging.getLogger(__name__)

COMPARISON_COLUMNS = (
    "class", "n", "positives", "negatives", "auc_a", "auc_b", "difference", "delong_se", "delong_z", "delong_p",
    "delong_ci_low", "delong_ci_high", "bootstrap_ci_low", "bootstrap_ci_high", "bootstrap_p", "bootstrap_used",
    "reason",
)
COMPARISON_FILES = {"comparison_json": "comparison.json", "comparison_csv": "comparison.csv",
                    "comparison_png": "comparison.png"}

_PROB, _LABEL = "_prob", "_label"


def _check_level(ci: float) -> float:
    if not 0 < float(ci) < 1:
        raise ValueError(f"ci={ci!r} must be a confidence level strictly between 0 and 1, e.g. 0.95")
    return float(ci)


# ----------------------------------------------------------------------------------------------
# DeLong's test


@dataclass(frozen=True)
class DeLongResult:
    """The outcome of :func:`delong_test`: two correlated ROC AUCs and the test of their difference.

    Attributes:
        auc_a, auc_b: the ROC AUCs (Mann-Whitney statistics, ties one half); None when undefined.
        difference: ``auc_b - auc_a``.
        se: standard error of the difference (DeLong et al. 1988); None when it cannot be estimated.
        z: ``difference / se``; None when ``se`` is 0 or None.
        p_value: two-sided p-value ``2 * (1 - Phi(|z|))``; 1.0 when ``se == 0`` and the difference is 0
            (e.g. identical scores, or scores ranking the images identically); None when undefined.
        ci: ``(low, high)`` normal-approximation interval of the difference at level `ci_level`
            (``(d, d)`` when ``se == 0``); None when undefined.
        ci_level: the interval's confidence level.
        var_a, var_b, covariance: DeLong's estimate ``S = S10 / m + S01 / n`` of the variance-covariance
            matrix of ``(auc_a, auc_b)``.
        n_positive, n_negative: ``m`` and ``n``.
        reason: why a field is None (e.g. ``"no positive labels"``); None when everything is defined.
    """

    auc_a: float | None
    auc_b: float | None
    difference: float | None
    se: float | None
    z: float | None
    p_value: float | None
    ci: tuple[float, float] | None
    ci_level: float
    var_a: float | None
    var_b: float | None
    covariance: float | None
    n_positive: int
    n_negative: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``ci`` as a list)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["ci"] = None if self.ci is None else [self.ci[0], self.ci[1]]
        return out


def _binary_labels(y: Any, name: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one label per image), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    try:
        f = arr.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold 0/1 (or boolean) labels, got dtype {arr.dtype}") from None
    bad = (f != 0) & (f != 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must hold only 0 and 1 (remove unknown labels first), got {arr[i]!r} at index {i}"
        )
    return f == 1


def _scores(s: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(s, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one score per label ({n}), got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite, got {arr[i]} at index {i}")
    return arr


def _placements(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs, ``V10`` (``k x m``) and ``V01`` (``k x n``) of the ``k`` rows of `scores` (Sun & Xu 2014).

    With midranks ``Tz`` over all images, ``Tx`` among the positives and ``Ty`` among the negatives,
    ``V10_i = (Tz_i - Tx_i) / n`` (the negatives a positive outranks, ties one half, as a fraction) and
    ``V01_j = 1 - (Tz_j - Ty_j) / m`` (the positives outranking a negative, ties one half).
    """
    x, yneg = scores[:, y], scores[:, ~y]
    m, n = x.shape[1], yneg.shape[1]
    tz = rankdata(np.concatenate([x, yneg], axis=1), axis=1)
    tx = rankdata(x, axis=1)
    ty = rankdata(yneg, axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    # the Mann-Whitney form: sums of half-integer ranks are exact, so this equals the pair count exactly
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    return auc, v10, v01


def _clustered_covariance(
    y: np.ndarray, auc: np.ndarray, v10: np.ndarray, v01: np.ndarray, unit: np.ndarray
) -> np.ndarray | str:
    """Obuchowski's (1997) ``k x k`` covariance of the AUCs of ``k`` score rows when images cluster in patients
    (``unit``: each image's patient index), or the reason it cannot be estimated.

    Per patient ``i`` with ``m_i`` positive and ``n_i`` negative images, ``V10_i`` and ``V01_i`` sum the placement
    values of its positives and negatives; with ``I10`` / ``I01`` patients holding a positive / negative, ``I``
    patients and ``M`` / ``N`` positive / negative images:
    ``S10 = I10 / ((I10 - 1) M) sum_i (V10_i - m_i auc)(...)'``, ``S01`` likewise over negatives,
    ``S11 = I / (I - 1) sum_i (V10_i - m_i auc)(V01_i - n_i auc)'``, and
    ``Cov = S10 / M + S01 / N + (S11 + S11') / (M N)``. With one image per patient it is DeLong's.
    """
    pos_unit, neg_unit = unit[y], unit[~y]
    n_units = int(unit.max()) + 1
    m, n = v10.shape[1], v01.shape[1]
    k = v10.shape[0]
    m_i = np.bincount(pos_unit, minlength=n_units).astype(np.float64)
    n_i = np.bincount(neg_unit, minlength=n_units).astype(np.float64)
    i10, i01, i_all = int((m_i > 0).sum()), int((n_i > 0).sum()), int(((m_i + n_i) > 0).sum())
    if i10 < 2 or i01 < 2:
        return (f"the clustered DeLong variance needs at least 2 patients with a positive and 2 with a negative "
                f"image (got {i10} and {i01})")
    d10 = np.stack([np.bincount(pos_unit, weights=v10[r], minlength=n_units) for r in range(k)]) - np.outer(auc, m_i)
    d01 = np.stack([np.bincount(neg_unit, weights=v01[r], minlength=n_units) for r in range(k)]) - np.outer(auc, n_i)
    s10 = i10 / ((i10 - 1) * m) * (d10 @ d10.T)
    s01 = i01 / ((i01 - 1) * n) * (d01 @ d01.T)
    s11 = i_all / (i_all - 1) * (d10 @ d01.T)
    return s10 / m + s01 / n + (s11 + s11.T) / (m * n)


def delong_test(y: Any, scores_a: Any, scores_b: Any, ci: float = 0.95, patient_ids: Sequence[Any] | None = None) -> DeLongResult:
    """DeLong's test of two correlated ROC AUCs measured on the same images, clustered by patient when patient
    ids are given.

    DeLong, DeLong & Clarke-Pearson, Biometrics 44(3):837-845, 1988: with ``m`` positives and ``n``
    negatives, the structural components of model r are ``V10(X_i) = (1/n) sum_j psi(X_i, Y_j)`` and
    ``V01(Y_j) = (1/m) sum_i psi(X_i, Y_j)`` (``psi`` = 1, 1/2, 0 as the positive's score is above, equal
    to, below the negative's); ``S10`` and ``S01`` are their ``2 x 2`` sample covariance matrices over
    the positives (divisor ``m - 1``) and negatives (divisor ``n - 1``), ``S = S10 / m + S01 / n``, and
    ``Var(auc_b - auc_a) = S_aa + S_bb - 2 S_ab``. Placement values come from midranks (Sun & Xu, IEEE
    Signal Processing Letters 21(11), 2014), ``O(N log N)``. With `patient_ids` the variance is Obuchowski's
    for clustered data (Obuchowski, "Nonparametric analysis of clustered ROC curve data", Biometrics
    53(2):567-578, 1997): the placement values are summed per patient, so several correlated images of one
    patient count as one observation; with one image per patient it equals DeLong's.

    Args:
        y: ``N`` labels, 0/1 or boolean (unknown labels removed beforehand).
        scores_a, scores_b: ``N`` finite scores of model A and model B for the same images (probabilities or
            logits: only their order matters).
        ci: confidence level of the interval of the difference, in (0, 1).
        patient_ids: ``N`` patient ids (empty where unknown: the image is its own patient), or None.

    Returns:
        A :class:`DeLongResult`; its ``difference`` is ``auc_b - auc_a``. Undefined parts are None with
        a ``reason``: everything without a positive or a negative; ``se``, ``z``, ``p_value`` and ``ci``
        with fewer than 2 positives or 2 negatives (2 patients with each, clustered: the covariances need two
        of each), and ``z`` and ``p_value`` when the variance is 0 but the difference is not (the normal
        approximation does not apply). A zero variance with a zero difference (identical rankings) gives
        ``z = None``, ``p = 1``.

    Raises:
        ValueError: `y` is not one-dimensional 0/1, the scores are not finite or of another length, or
            `patient_ids` is not one per image.
    """
    level = _check_level(ci)
    yb = _binary_labels(y)
    a = _scores(scores_a, yb.size, "scores_a")
    b = _scores(scores_b, yb.size, "scores_b")
    unit, _, ci_unit, _ = patient_units(patient_ids, yb.size)
    m, n = int(yb.sum()), int((~yb).sum())
    reason = _absent_reason(m + n, m)
    empty = dict(difference=None, se=None, z=None, p_value=None, ci=None, ci_level=level, var_a=None,
                 var_b=None, covariance=None, n_positive=m, n_negative=n)
    if reason is not None:
        return DeLongResult(auc_a=None, auc_b=None, reason=reason, **empty)
    auc, v10, v01 = _placements(yb, np.stack([a, b]))
    auc_a, auc_b = float(auc[0]), float(auc[1])
    diff = auc_b - auc_a
    if m < 2 or n < 2:
        empty["difference"] = diff
        return DeLongResult(
            auc_a=auc_a, auc_b=auc_b, reason=f"DeLong's variance needs at least 2 positives and 2 negatives "
            f"(got {m} and {n})", **empty,
        )
    if ci_unit == "patient":
        s = _clustered_covariance(yb, auc, v10, v01, unit)
        if isinstance(s, str):
            empty["difference"] = diff
            return DeLongResult(auc_a=auc_a, auc_b=auc_b, reason=s, **empty)
        # the difference's variance from the differences of the placement values (the formula is linear in
        # them): identical rankings give exactly 0
        var = max(float(_clustered_covariance(yb, auc[1:] - auc[:1], v10[1:] - v10[:1], v01[1:] - v01[:1],
                                              unit)[0, 0]), 0.0)
    else:
        s = np.cov(v10, ddof=1) / m + np.cov(v01, ddof=1) / n
        # the variance of the difference straight from the differences of the placement values: identical
        # rankings give exactly 0 (S_aa + S_bb - 2 S_ab could leave rounding residue of either sign)
        var = float(np.var(v10[1] - v10[0], ddof=1) / m + np.var(v01[1] - v01[0], ddof=1) / n)
    se = math.sqrt(var)
    reason = None
    if se > 0:
        z: float | None = diff / se
        p: float | None = float(2.0 * norm.sf(abs(z)))
        half = float(norm.ppf(0.5 + level / 2.0)) * se
        interval: tuple[float, float] | None = (diff - half, diff + half)
    elif diff == 0:
        z, p, interval = None, 1.0, (diff, diff)
        reason = "zero variance of the difference (the two models rank the images identically)"
    else:
        z, p, interval = None, None, None
        reason = "zero DeLong variance with a non-zero difference: the normal approximation does not apply"
    return DeLongResult(
        auc_a=auc_a, auc_b=auc_b, difference=diff, se=se, z=z, p_value=p, ci=interval, ci_level=level,
        var_a=float(s[0, 0]), var_b=float(s[1, 1]), covariance=float(s[0, 1]), n_positive=m, n_negative=n,
        reason=reason,
    )


# ----------------------------------------------------------------------------------------------
# paired bootstrap


@dataclass(frozen=True)
class PairedBootstrapResult:
    """The outcome of :func:`paired_bootstrap` over ``K`` classes and ``B`` resamples.

    Attributes:
        difference: ``K`` observed differences ``auc_b - auc_a`` (NaN where the AUC is undefined).
        samples: ``B x K`` resampled differences (NaN: the class lacked a label value in that resample).
        ci: ``K`` intervals ``[low, high]`` (None where no resample was used).
        p_value: ``K`` bootstrap p-values (see the module docstring; None where no resample was used).
        used: ``K`` counts of used resamples.
        macro_classes: the classes (indices) averaged: those with both label values.
        macro_difference: mean of `difference` over `macro_classes` (None when there is none).
        macro_samples: ``B`` resampled macro differences (NaN: skipped).
        macro_ci, macro_p_value, macro_used: as for a class.
        n_bootstrap, seed, ci_level: the settings.
    """

    difference: np.ndarray
    samples: np.ndarray
    ci: list[list[float] | None]
    p_value: list[float | None]
    used: np.ndarray
    macro_classes: list[int]
    macro_difference: float | None
    macro_samples: np.ndarray
    macro_ci: list[float] | None
    macro_p_value: float | None
    macro_used: int
    n_bootstrap: int
    seed: int
    ci_level: float


def _bootstrap_p(values: np.ndarray) -> float | None:
    d = values[np.isfinite(values)]
    if d.size == 0:
        return None
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2.0 * (1 + tail) / (d.size + 1)))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be N or N x K (images x classes), got shape {np.shape(x)}")
    return arr


def paired_bootstrap(
    labels: Any, probs_a: Any, probs_b: Any, n_bootstrap: int = 2000, seed: int = 0, ci: float = 0.95,
    patient_ids: Sequence[Any] | None = None, macro_classes: Sequence[int] | None = None,
) -> PairedBootstrapResult:
    """Paired percentile bootstrap of the ROC AUC difference ``auc_b - auc_a`` of two models, per class
    and for the macro mean over classes.

    Each resample draws ``G`` units with replacement (``numpy.random.default_rng(seed)``; resample ``r``
    is ``rng.integers(0, G, size=G)``, one call per resample in order): patients with `patient_ids` (every
    image of a drawn patient is taken; an image without an id is a patient of its own), else the ``N``
    images. Both models' AUCs are computed on the *same* resampled images, so the correlation between the
    models is kept. Resamples are evaluated
    as image-count weights with the sorted-once AUC of :func:`hmn.evaluation.weighted_auc_ap`, identical to
    scikit-learn's ``roc_auc_score`` on the resampled rows. Interval and p-value: see the module docstring
    (Efron & Tibshirani 1993; Davison & Hinkley 1997).

    Args:
        labels: ``N`` or ``N x K`` labels: 1 positive, 0 negative, below 0 or NaN unknown (excluded for
            that class; the image is still drawn, with its other classes).
        probs_a, probs_b: scores of model A and B, the shape of `labels`, finite.
        n_bootstrap: resamples ``B`` (0: no intervals or p-values).
        seed: seed of the resampling; the same inputs and seed give the same result.
        ci: confidence level of the percentile intervals, in (0, 1).
        patient_ids: ``N`` patient ids (the resampling unit), or None (images).
        macro_classes: the classes the macro mean may average (default: every class with both label values);
            those without both label values are left out in any case.

    Returns:
        A :class:`PairedBootstrapResult`.

    Raises:
        ValueError: shapes differ, a score is not finite, a known label is not 0 or 1, ``n_bootstrap < 0``
            or `ci` outside (0, 1).
    """
    level = _check_level(ci)
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be >= 0 (0: no bootstrap)")
    n_bootstrap, seed = int(n_bootstrap), int(seed)
    lab = _as_matrix(labels, "labels")
    pa, pb = _as_matrix(probs_a, "probs_a"), _as_matrix(probs_b, "probs_b")
    if pa.shape != lab.shape or pb.shape != lab.shape:
        raise ValueError(f"labels {lab.shape}, probs_a {pa.shape} and probs_b {pb.shape} must have one shape")
    for name, p in (("probs_a", pa), ("probs_b", pb)):
        if not np.isfinite(p).all():
            i, k = np.argwhere(~np.isfinite(p))[0]
            raise ValueError(f"{name} must be finite, got {p[i, k]} at image {i}, class {k}")
    valid = np.isfinite(lab) & (lab >= 0)
    odd = valid & (lab != 0) & (lab != 1)
    if odd.any():
        i, k = np.argwhere(odd)[0]
        raise ValueError(
            f"labels must be 0 or 1 (negative or NaN for unknown), got {lab[i, k]} at image {i}, class {k}"
        )
    pos = valid & (lab == 1)
    n, k = lab.shape

    ranked = []
    observed = np.full(k, np.nan)
    ones = np.ones((1, n), dtype=np.int32)
    for c in range(k):
        rows = np.flatnonzero(valid[:, c])
        ra = _RankedLabels(pa[rows, c], pos[rows, c], rows)
        rb = _RankedLabels(pb[rows, c], pos[rows, c], rows)
        ranked.append((ra, rb))
        observed[c] = rb(ones)[0][0] - ra(ones)[0][0]
    allowed = set(range(k)) if macro_classes is None else {int(c) for c in macro_classes}
    defined = [c for c in range(k) if np.isfinite(observed[c])]
    macro_classes = [c for c in defined if c in allowed]

    unit, n_units, _, _ = patient_units(patient_ids, n)
    samples = np.full((n_bootstrap, k), np.nan)
    if n_bootstrap and n:
        rng = np.random.default_rng(seed)
        block = max(1, min(n_bootstrap, _BLOCK_ELEMENTS // n))
        for start in range(0, n_bootstrap, block):
            b = min(block, n_bootstrap - start)
            counts = np.empty((b, n), dtype=np.int32)
            for r in range(b):
                counts[r] = np.bincount(rng.integers(0, n_units, size=n_units), minlength=n_units)[unit]
            for c in defined:  # a class without both label values has none in any resample either
                ra, rb = ranked[c]
                samples[start : start + b, c] = rb(counts)[0] - ra(counts)[0]
    used = np.isfinite(samples).sum(axis=0)
    if macro_classes:
        macro_samples = samples[:, macro_classes].mean(axis=1)  # NaN when any class was skipped
        macro_difference: float | None = float(observed[macro_classes].mean())
    else:
        macro_samples = np.full(n_bootstrap, np.nan)
        macro_difference = None
    return PairedBootstrapResult(
        difference=observed,
        samples=samples,
        ci=[_interval(samples[:, c], level) for c in range(k)],
        p_value=[_bootstrap_p(samples[:, c]) for c in range(k)],
        used=used,
        macro_classes=macro_classes,
        macro_difference=macro_difference,
        macro_samples=macro_samples,
        macro_ci=_interval(macro_samples, level),
        macro_p_value=_bootstrap_p(macro_samples),
        macro_used=int(np.isfinite(macro_samples).sum()),
        n_bootstrap=n_bootstrap,
        seed=seed,
        ci_level=level,
    )


# ----------------------------------------------------------------------------------------------
# predictions.csv


@dataclass(frozen=True)
class PredictionTable:
    """The contents of a ``predictions.csv`` (see :mod:`hmn.evaluation.report`).

    Attributes:
        path: the file.
        images: ``N`` values of the ``image`` column, in file order.
        class_names: ``K`` classes: every name with both a ``<name>_prob`` and a ``<name>_label`` column,
            in header order.
        probs: ``N x K`` float64.
        labels: ``N x K`` float64: 1, 0, or NaN (unknown).
        patient_ids: ``N`` values of the ``patient_id`` column ("" where empty), or None without that column.
    """

    path: str
    images: list[str]
    class_names: list[str]
    probs: np.ndarray
    labels: np.ndarray
    patient_ids: list[str] | None = None


def _resolve_csv(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "predictions.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; give a predictions.csv written by the evaluation report "
                                "(or the folder holding it)")
    return path


_LABEL_VALUES = {"1": 1.0, "0": 0.0, "": np.nan, "1.0": 1.0, "0.0": 0.0}


def read_predictions(path: str | os.PathLike) -> PredictionTable:
    """Reads a ``predictions.csv`` written by :func:`hmn.evaluation.write_report`.

    Args:
        path: the CSV, or a folder holding ``predictions.csv``.

    Returns:
        A :class:`PredictionTable`. A ``patient_id`` column is read into ``patient_ids``; columns other than
        ``image``, ``patient_id`` and the ``<class>_prob`` / ``<class>_label`` pairs (e.g. metadata such as
        ``age``, ``sex``, ``view``) are ignored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no ``image`` column, no class column pair, a row with another number of fields than the
            header, an image listed twice, a probability that is empty or not a finite number, or a label
            other than ``1``, ``0`` or empty (a negative number or ``nan`` also reads as unknown). The
            message names the file, and the image and column where there is one.
    """
    path = _resolve_csv(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path} is empty; expected a header 'image,<class>_prob,<class>_label,...'")
    header, body = rows[0], rows[1:]
    if "image" not in header:
        raise ValueError(f"{path} has no 'image' column (columns: {header}); is it a predictions.csv written by "
                         "the evaluation report?")
    cols = set(header)
    classes = [h[: -len(_PROB)] for h in header if h.endswith(_PROB) and h[: -len(_PROB)] + _LABEL in cols]
    if not classes:
        hint = (" (an inference CSV has no labels: compare evaluation outputs)" if "error" in cols else "")
        raise ValueError(f"{path} has no '<class>_prob' and '<class>_label' column pair (columns: {header}){hint}")
    i_img = header.index("image")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)}; "
                             "the file is damaged or not a predictions.csv")
    images = [row[i_img] for row in body]
    seen: dict[str, int] = {}
    for line, image in enumerate(images, start=2):
        if image in seen:
            raise ValueError(f"{path}: image {image!r} is listed twice (lines {seen[image]} and {line}); each image "
                             "must have one row")
        seen[image] = line
    n, k = len(body), len(classes)
    probs = np.empty((n, k))
    labels = np.empty((n, k))
    for c, name in enumerate(classes):
        ip, il = header.index(name + _PROB), header.index(name + _LABEL)
        for r, row in enumerate(body):
            text = row[ip]
            try:
                v = float(text)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise ValueError(f"{path}: image {images[r]!r}, column {name + _PROB!r}: {text!r} is not a finite "
                                 "number")
            probs[r, c] = v
            text = row[il].strip()
            lv = _LABEL_VALUES.get(text)
            if lv is None:
                try:
                    lv = float(text)
                except ValueError:
                    lv = 2.0  # reported below
                if math.isnan(lv) or lv < 0:
                    lv = math.nan
                elif lv not in (0.0, 1.0):
                    raise ValueError(f"{path}: image {images[r]!r}, column {name + _LABEL!r}: label {row[il]!r}; "
                                     "accepted: 1, 0, or empty for unknown")
            labels[r, c] = lv
    ids = [row[header.index("patient_id")].strip() for row in body] if "patient_id" in cols else None
    return PredictionTable(path=path, images=images, class_names=classes, probs=probs, labels=labels, patient_ids=ids)


# ----------------------------------------------------------------------------------------------
# the comparison


def _row(name: str, n: int, positives: int, negatives: int) -> dict[str, Any]:
    return {
        "class": name, "n": n, "positives": positives, "negatives": negatives, "auc_a": None, "auc_b": None,
        "difference": None, "delong_se": None, "delong_z": None, "delong_p": None, "delong_ci": None,
        "var_a": None, "var_b": None, "covariance": None, "bootstrap_ci": None, "bootstrap_p": None,
        "bootstrap_used": 0, "reason": None,
    }


def compare_predictions(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    classes: Sequence[str] | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    ci: float = 0.95,
    min_positives: int = DEFAULT_MIN_POSITIVES,
) -> dict[str, Any]:
    """Compares two models' per-class ROC AUCs on the images both ``predictions.csv`` files contain.

    Images are matched by the exact text of their ``image`` column. Per compared class: both AUCs,
    DeLong's test of the difference (DeLong, DeLong & Clarke-Pearson 1988; :func:`delong_test`) and a
    paired bootstrap (:func:`paired_bootstrap`); for the macro mean over the classes with both label
    values, the mean difference and its bootstrap interval and p-value (DeLong's test does not apply).
    When file A has a ``patient_id`` column the bootstrap resamples patients and DeLong's variance is
    Obuchowski's clustered one (``settings.ci_unit``); a class with fewer than `min_positives` positive or
    negative patients (images without ids) gets its AUCs and difference but no p-value or interval, and is left
    out of the macro mean (named in ``macro.excluded``).

    Args:
        path_a: model A's ``predictions.csv`` (the reference; its labels are used), or its folder.
        path_b: model B's, or its folder. The difference is ``auc_b - auc_a``.
        classes: the classes to compare (each must be in both files); default: every class both files have.
        n_bootstrap: bootstrap resamples (0: no bootstrap).
        seed: seed of the bootstrap.
        ci: confidence level of the intervals, in (0, 1).
        min_positives: the fewest positive and negative units a class needs for p-values and intervals, >= 1.

    Returns:
        The JSON-ready dict described in the module docstring (``comparison.json``).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is not a readable predictions.csv or lists an image twice (see
            :func:`read_predictions`); no image or no class is in both files; a requested class is missing
            from a file; the files' labels disagree for an image and class (the message names both), or so do
            their patient ids; `n_bootstrap`, `ci` or `min_positives` out of range.
    """
    level = _check_level(ci)
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap={n_bootstrap!r} must be >= 0 (0: no bootstrap)")
    if int(min_positives) < 1:
        raise ValueError(f"min_positives={min_positives!r} must be >= 1")
    min_positives = int(min_positives)
    ta, tb = read_predictions(path_a), read_predictions(path_b)
    in_b = {image: r for r, image in enumerate(tb.images)}
    shared_a = [r for r, image in enumerate(ta.images) if image in in_b]
    if not shared_a:
        raise ValueError(
            f"no image is in both {ta.path} ({len(ta.images)} images, e.g. {ta.images[:2]}) and {tb.path} "
            f"({len(tb.images)} images, e.g. {tb.images[:2]}); images are matched by the exact text of the "
            "'image' column"
        )
    shared_b = [in_b[ta.images[r]] for r in shared_a]
    n_shared = len(shared_a)
    if n_shared < len(ta.images) or n_shared < len(tb.images):
        logger.warning("comparing the %d images in both files: %s has %d, %s has %d", n_shared, ta.path,
                       len(ta.images), tb.path, len(tb.images))

    only_a = [c for c in ta.class_names if c not in tb.class_names]
    only_b = [c for c in tb.class_names if c not in ta.class_names]
    if classes is None:
        names = [c for c in ta.class_names if c in tb.class_names]
        if not names:
            raise ValueError(f"the files have no class in common: {ta.path} has {ta.class_names}, "
                             f"{tb.path} has {tb.class_names}")
    else:
        names = [str(c) for c in classes]
        for table in (ta, tb):
            missing = [c for c in names if c not in table.class_names]
            if missing:
                raise ValueError(f"{table.path} has no class {missing}; it has {table.class_names}")
        if len(set(names)) != len(names):
            raise ValueError(f"classes {names} name a class twice")
    if only_a or only_b:
        logger.warning("classes in only one file are not compared: only in A (%s): %s; only in B (%s): %s",
                       ta.path, only_a, tb.path, only_b)

    ia = [ta.class_names.index(c) for c in names]
    ib = [tb.class_names.index(c) for c in names]
    lab = ta.labels[np.ix_(shared_a, ia)]
    lab_b = tb.labels[np.ix_(shared_b, ib)]
    pa = ta.probs[np.ix_(shared_a, ia)]
    pb = tb.probs[np.ix_(shared_b, ib)]
    both = np.isfinite(lab) & np.isfinite(lab_b)
    conflict = both & (lab != lab_b)
    if conflict.any():
        r, c = np.argwhere(conflict)[0]
        raise ValueError(
            f"the files disagree on the label of image {ta.images[shared_a[r]]!r}, class {names[c]!r}: "
            f"{int(lab[r, c])} in {ta.path}, {int(lab_b[r, c])} in {tb.path} ({int(conflict.sum())} disagreements "
            "in all); both models must be evaluated against the same labels"
        )
    only_b_known = (~np.isfinite(lab) & np.isfinite(lab_b)).sum(axis=0)
    labels_only_b = {names[c]: int(only_b_known[c]) for c in range(len(names)) if only_b_known[c]}
    if labels_only_b:
        logger.warning("images whose label only %s knows are left out (the labels are %s's): %s",
                       tb.path, ta.path, labels_only_b)

    ids = None
    if ta.patient_ids is not None:
        ids = [ta.patient_ids[r] for r in shared_a]
        if tb.patient_ids is not None:
            for r, x in zip(shared_b, ids):
                if x and tb.patient_ids[r] and tb.patient_ids[r] != x:
                    raise ValueError(f"the files disagree on the patient of image {tb.images[r]!r}: {x!r} in {ta.path}, "
                                     f"{tb.patient_ids[r]!r} in {tb.path}; both must come from the same datalist")
    elif tb.patient_ids is not None:
        ids = [tb.patient_ids[r] for r in shared_b]
    unit, n_units, ci_unit, without_id = patient_units(ids, n_shared)
    unit_word = "patients" if ci_unit == "patient" else "images"
    if ci_unit == "image":
        logger.warning("no patient_id column: the bootstrap resamples images and DeLong treats them as independent; "
                       "with several images per patient the intervals are too narrow and the p-values too small")

    valid = np.isfinite(lab)
    enough = []
    for c in range(len(names)):
        v = valid[:, c]
        y = lab[v, c] == 1
        if min(np.unique(unit[v][y]).size, np.unique(unit[v][~y]).size) >= min_positives:
            enough.append(c)
    boot = paired_bootstrap(lab, pa, pb, n_bootstrap=n_bootstrap, seed=seed, ci=level, patient_ids=ids,
                            macro_classes=enough)
    per_class = []
    excluded: dict[str, str] = {}
    for c, name in enumerate(names):
        v = valid[:, c]
        y = lab[v, c] == 1
        row = _row(name, int(v.sum()), int(y.sum()), int((~y).sum()))
        row["positive_units"], row["negative_units"] = int(np.unique(unit[v][y]).size), int(np.unique(unit[v][~y]).size)
        d = delong_test(y, pa[v, c], pb[v, c], ci=level, patient_ids=None if ids is None else [ids[i] for i in np.flatnonzero(v)])
        row.update(
            auc_a=d.auc_a, auc_b=d.auc_b, difference=d.difference, delong_se=d.se, delong_z=d.z,
            delong_p=d.p_value, delong_ci=None if d.ci is None else [d.ci[0], d.ci[1]], var_a=d.var_a,
            var_b=d.var_b, covariance=d.covariance, reason=d.reason,
        )
        if d.auc_a is None:
            excluded[name] = str(d.reason)
        elif c not in enough:
            row.update(delong_se=None, delong_z=None, delong_p=None, delong_ci=None, var_a=None, var_b=None,
                       covariance=None)
            row["reason"] = (f"{row['positive_units']} positive and {row['negative_units']} negative {unit_word}, "
                             f"fewer than {min_positives}: no p-value or interval, left out of the macro mean")
            excluded[name] = row["reason"]
        else:
            used = int(boot.used[c])
            row.update(bootstrap_ci=boot.ci[c], bootstrap_p=boot.p_value[c], bootstrap_used=used)
            if n_bootstrap and used < 0.9 * n_bootstrap:
                logger.warning(
                    "class %s: only %d of %d bootstrap resamples had both label values (%d positives, %d negatives); "
                    "its bootstrap interval is unreliable", name, used, n_bootstrap, row["positives"], row["negatives"],
                )
        per_class.append(row)

    averaged = [per_class[c] for c in boot.macro_classes]
    macro = _row("macro", sum(r["n"] for r in averaged), sum(r["positives"] for r in averaged),
                 sum(r["negatives"] for r in averaged))
    macro.update(classes=[r["class"] for r in averaged], excluded=excluded)
    if averaged:
        macro.update(
            auc_a=float(np.mean([r["auc_a"] for r in averaged])),
            auc_b=float(np.mean([r["auc_b"] for r in averaged])),
            difference=float(np.mean([r["difference"] for r in averaged])),
            bootstrap_ci=boot.macro_ci, bootstrap_p=boot.macro_p_value, bootstrap_used=boot.macro_used,
        )
    else:
        macro["reason"] = (f"no compared class has at least {min_positives} positive and negative {unit_word}"
                           if excluded else "no compared class has both a positive and a negative label")
    if excluded:
        logger.warning("classes left out of the macro mean (AUC undefined, or too few positives or negatives): %s",
                       excluded)

    settings = {
        "n_bootstrap": int(n_bootstrap),
        "ci": level,
        "seed": int(seed),
        "difference": "auc_b - auc_a",
        "labels_from": "a",
        "ci_unit": ci_unit,
        "n_patients": n_units if ci_unit == "patient" else None,
        "images_without_patient_id": without_id if ci_unit == "patient" else n_shared,
        "min_positives": min_positives,
        "delong_method": "DeLong, DeLong & Clarke-Pearson (1988) structural components (midranks, Sun & Xu 2014)"
        + ("; clustered by patient (Obuchowski 1997)" if ci_unit == "patient" else "; images as independent")
        + "; two-sided normal p-value; interval difference +- z * se, not clipped",
        "bootstrap_method": f"paired percentile bootstrap: {unit_word} resampled with replacement, resample r = "
        "default_rng(seed).integers(0, units, size=units) drawn in order"
        + (" (every image of a drawn patient)" if ci_unit == "patient" else "")
        + "; both models on the same resampled images; resamples where a class has only one label value are "
        "skipped for that class",
        "bootstrap_p_value": "min(1, 2 * (1 + min(#{d* <= 0}, #{d* >= 0})) / (used + 1))",
        "unknown_labels": "empty label field, excluded per class",
    }
    return {
        "settings": settings,
        "a": {"path": ta.path, "n_images": len(ta.images), "classes": ta.class_names},
        "b": {"path": tb.path, "n_images": len(tb.images), "classes": tb.class_names},
        "n_shared_images": n_shared,
        "n_images_only_in_a": len(ta.images) - n_shared,
        "n_images_only_in_b": len(tb.images) - n_shared,
        "classes": names,
        "classes_only_in_a": only_a,
        "classes_only_in_b": only_b,
        "labels_known_only_in_b": labels_only_b,
        "per_class": per_class,
        "macro": macro,
    }


# ----------------------------------------------------------------------------------------------
# files


def _pair(v: Any) -> tuple[str, str]:
    return ("", "") if not v else (_num(v[0]), _num(v[1]))


def _csv_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in [*result["per_class"], result["macro"]]:
        rows.append([
            e["class"], _num(e["n"]), _num(e["positives"]), _num(e["negatives"]), _num(e["auc_a"]),
            _num(e["auc_b"]), _num(e["difference"]), _num(e["delong_se"]), _num(e["delong_z"]),
            _num(e["delong_p"]), *_pair(e["delong_ci"]), *_pair(e["bootstrap_ci"]), _num(e["bootstrap_p"]),
            _num(e["bootstrap_used"]), e.get("reason") or "",
        ])
    return rows


def _short(path: str, width: int = 70) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def _comparison_figure(result: dict[str, Any]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [*result["per_class"], result["macro"]]
    level = result["settings"]["ci"]
    pct = f"{100 * level:g}%"
    fig = Figure(figsize=(7.5, 1.6 + 0.38 * len(entries)), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axvline(0.0, color="0.4", linewidth=1, linestyle="--")
    ys = np.arange(len(entries))[::-1]
    labels = []
    for y, e in zip(ys, entries):
        is_macro = e is result["macro"]
        labels.append("macro mean" if is_macro else str(e["class"]))
        d = e["difference"]
        if d is None:
            ax.text(0.0, y, "  undefined" + (f" ({e['reason']})" if e.get("reason") else ""), va="center",
                    fontsize=7, color="0.4")
            continue
        interval = e["bootstrap_ci"] if is_macro else e["delong_ci"]
        if interval:
            ax.plot(interval, [y, y], color="black" if is_macro else "C0", linewidth=1.6)
        ax.plot([d], [y], marker="D" if is_macro else "s", color="black" if is_macro else "C0",
                markersize=7 if is_macro else 5)
        p = e["bootstrap_p"] if is_macro else e["delong_p"]
        if p is not None:
            note = "p" + (_fmt_p(p) if p < 1e-4 else f"={_fmt_p(p)}")
            ax.annotate(note, (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_ylim(-0.7, len(entries) - 0.3)
    ax.set_xlabel("ROC AUC difference (B - A)", fontsize=9)
    ax.set_title(f"AUC difference, B - A: {pct} DeLong interval per class, bootstrap interval for the macro mean",
                 fontsize=8.5)
    ax.grid(axis="x", alpha=0.3)
    fig.text(0.01, 0.005, f"A: {_short(result['a']['path'])}\nB: {_short(result['b']['path'])}", fontsize=6,
             va="bottom", color="0.3")
    fig.tight_layout(rect=(0, 0.06, 0.93, 1))
    return fig


def plot_comparison(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Draws the forest plot of :func:`compare_predictions`'s result into a PNG at `path` (written
    atomically): per class the AUC difference (B - A) with its DeLong interval, the macro difference with
    its bootstrap interval, and a line at zero. Returns the path."""
    fig = _comparison_figure(result)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def write_comparison(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes ``comparison.json``, ``comparison.csv`` and ``comparison.png`` (module docstring) into
    `out_dir` (created if missing), each atomically with :func:`hmn.durable.atomic_write`.

    Args:
        result: the dict returned by :func:`compare_predictions`.
        out_dir: the folder.

    Returns:
        ``{"comparison_json", "comparison_csv", "comparison_png"}`` -> the paths written.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: os.path.join(out_dir, name) for key, name in COMPARISON_FILES.items()}
    text = json.dumps(result, indent=2, allow_nan=False)
    atomic_write(paths["comparison_json"], lambda f: f.write(text + "\n"))

    _table(paths["comparison_csv"], COMPARISON_COLUMNS, _csv_rows(result))
    plot_comparison(result, paths["comparison_png"])
    logger.info("model comparison written to %s", out_dir)
    return paths


# ----------------------------------------------------------------------------------------------
# command line


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _fmt_ci(v: Sequence[float] | None) -> str:
    return "-" if not v else f"[{v[0]:+.4f}, {v[1]:+.4f}]"


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table (what ``python -m hmn compare`` prints)."""
    pct = f"{100 * result['settings']['ci']:g}%"
    head = ["class", "n", "pos", "AUC A", "AUC B", "B - A", f"DeLong {pct} CI", "DeLong p",
            f"bootstrap {pct} CI", "boot p"]
    body = []
    for e in [*result["per_class"], result["macro"]]:
        diff = "-" if e["difference"] is None else f"{e['difference']:+.4f}"
        body.append([str(e["class"]), str(e["n"]), str(e["positives"]), _fmt(e["auc_a"]), _fmt(e["auc_b"]), diff,
                     _fmt_ci(e["delong_ci"]), _fmt_p(e["delong_p"]), _fmt_ci(e["bootstrap_ci"]),
                     _fmt_p(e["bootstrap_p"])])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hmn compare",
        description="Compare two models' per-class ROC AUCs on the same images: DeLong's test and a paired "
        "bootstrap of the difference B - A. Writes comparison.json, comparison.csv and comparison.png.",
    )
    p.add_argument("a", help="model A's predictions.csv (the reference; its labels are used), or its folder")
    p.add_argument("b", help="model B's predictions.csv, or its folder")
    p.add_argument("--out", default="comparison", help="output folder (default: ./comparison)")
    p.add_argument("--n-bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--classes", nargs="+", help="classes to compare (space- or comma-separated; default: all shared)")
    p.add_argument("--min-positives", type=int, default=DEFAULT_MIN_POSITIVES,
                   help=f"fewest positive and negative patients (images without a patient_id column) a class needs "
                   f"for p-values and intervals (default {DEFAULT_MIN_POSITIVES})")
    return p


def compare_main(argv: list[str]) -> int:
    """``python -m hmn compare A/predictions.csv B/predictions.csv ...``: writes the comparison files and
    prints the table and where the files went. Returns 0, or 1 (with the reason on stderr) on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    classes = None
    if args.classes:
        classes = [c.strip() for item in args.classes for c in item.split(",") if c.strip()]
    try:
        result = compare_predictions(args.a, args.b, classes=classes, n_bootstrap=args.n_bootstrap, seed=args.seed,
                                     ci=args.ci, min_positives=args.min_positives)
        paths = write_comparison(result, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"A: {result['a']['path']} ({result['a']['n_images']} images)")
    print(f"B: {result['b']['path']} ({result['b']['n_images']} images)")
    st = result["settings"]
    unit = (f"{st['n_patients']} patients resampled (patient_id column)" if st["ci_unit"] == "patient"
            else "images resampled as independent (no patient_id column)")
    print(f"compared: {result['n_shared_images']} images in both, {len(result['classes'])} classes; "
          f"difference = AUC B - AUC A; {st['n_bootstrap']} bootstrap resamples, seed {st['seed']}; {unit}")
    if result["classes_only_in_a"] or result["classes_only_in_b"]:
        print(f"not compared: classes only in A: {result['classes_only_in_a']}; only in B: "
              f"{result['classes_only_in_b']}")
    print()
    print(format_table(result))
    for e in [*result["per_class"], result["macro"]]:
        if e.get("reason"):
            print(f"  {e['class']}: {e['reason']}")
    used = [e["bootstrap_used"] for e in [*result["per_class"], result["macro"]] if e["bootstrap_used"]]
    if used:
        print(f"  bootstrap p-values cannot go below 2 / (resamples used + 1): {2 / (max(used) + 1):.4f} "
              f"for {max(used)}")
    print()
    for key in ("comparison_json", "comparison_csv", "comparison_png"):
        print(f"wrote {paths[key]}")
    return 0
