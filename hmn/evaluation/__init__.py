"""Evaluation of multi-label classifiers: per-class ROC AUC and average precision with bootstrap
confidence intervals, operating thresholds, and the report files a paper needs.

* :func:`compute_report` -> a JSON-ready dict of per-class, macro and micro metrics.
* :func:`macro_auc` -> the report's macro ROC AUC alone (the bundles' validation key metric uses it).
* :func:`select_thresholds`, :func:`fit_operating_thresholds` -> thresholds picked on one split (validation) for
  another; training records them in ``models/thresholds.json``.
* Intervals resample patients when patient ids are given (:func:`patient_units`); a finding with fewer than
  :data:`DEFAULT_MIN_POSITIVES` positive or negative patients gets no interval or p-value.
* :func:`operating_points` -> sensitivity at fixed specificity and the reverse, per finding.
* :mod:`hmn.evaluation.calibration` -> expected calibration error, reliability diagrams, temperature scaling.
* :mod:`hmn.evaluation.subgroups` -> metrics by sex, age band and view, with the largest gap per finding.
* :func:`write_report` -> ``metrics.json``, ``metrics.csv``, ``predictions.csv``, ``roc.png``; the
  exact contents of each file are described in :mod:`hmn.evaluation.report`.
* :func:`compare_predictions` -> two models' per-class AUCs on the same images: DeLong's test
  (:func:`delong_test`) and a paired bootstrap (:func:`paired_bootstrap`); :func:`write_comparison` writes
  ``comparison.json``, ``comparison.csv``, ``comparison.png`` (``python -m hmn compare``).

The bundles' ``evaluate.json`` uses them through :class:`hmn.handlers.EvaluationReportHandler`.
"""

from __future__ import annotations

from .calibration import apply_temperature, fit_temperature, load_temperatures
from .compare import (
    COMPARISON_COLUMNS,
    DeLongResult,
    PairedBootstrapResult,
    compare_predictions,
    delong_test,
    paired_bootstrap,
    read_predictions,
    write_comparison,
)
from .metrics import (
    DEFAULT_MIN_POSITIVES,
    THRESHOLD_METHODS,
    fit_operating_thresholds,
    load_operating_thresholds,
    load_thresholds,
    macro_auc,
    model_thresholds,
    operating_points,
    patient_units,
    select_thresholds,
    weighted_auc_ap,
)
from .report import METRICS_COLUMNS, REPORT_FILES, atomic_write, compute_report, plot_roc, write_report

__all__ = [
    "COMPARISON_COLUMNS",
    "DEFAULT_MIN_POSITIVES",
    "DeLongResult",
    "METRICS_COLUMNS",
    "PairedBootstrapResult",
    "REPORT_FILES",
    "THRESHOLD_METHODS",
    "apply_temperature",
    "atomic_write",
    "compare_predictions",
    "compute_report",
    "delong_test",
    "fit_operating_thresholds",
    "fit_temperature",
    "load_operating_thresholds",
    "load_temperatures",
    "load_thresholds",
    "macro_auc",
    "model_thresholds",
    "operating_points",
    "paired_bootstrap",
    "patient_units",
    "plot_roc",
    "read_predictions",
    "select_thresholds",
    "weighted_auc_ap",
    "write_comparison",
    "write_report",
]
