"""Evaluation of multi-label classifiers: per-class ROC AUC and average precision with bootstrap
confidence intervals, operating thresholds, and the report files a paper needs.

* :func:`compute_report` -> a JSON-ready dict of per-class, macro and micro metrics.
* :func:`macro_auc` -> the report's macro ROC AUC alone (the bundles' validation key metric uses it).
* :func:`select_thresholds` -> per-class thresholds picked on one split (e.g. validation) for another.
* :func:`operating_points` -> sensitivity at fixed specificity and the reverse, per finding.
* :mod:`hmn.evaluation.calibration` -> expected calibration error, reliability diagrams, temperature scaling.
* :mod:`hmn.evaluation.subgroups` -> metrics by sex, age band and view, with the largest gap per finding.
* :func:`write_report` -> ``metrics.json``, ``metrics.csv``, ``predictions.csv``, ``roc.png``; the
  exact contents of each file are described in :mod:`hmn.evaluation.report`.

The bundles' ``evaluate.json`` uses them through :class:`hmn.handlers.EvaluationReportHandler`.
"""

from __future__ import annotations

from .calibration import apply_temperature, fit_temperature, load_temperatures
from .metrics import (
    THRESHOLD_METHODS,
    compute_report,
    load_thresholds,
    macro_auc,
    operating_points,
    select_thresholds,
    weighted_auc_ap,
)
from .report import METRICS_COLUMNS, REPORT_FILES, atomic_write, plot_roc, write_report

__all__ = [
    "METRICS_COLUMNS",
    "REPORT_FILES",
    "THRESHOLD_METHODS",
    "apply_temperature",
    "atomic_write",
    "compute_report",
    "fit_temperature",
    "load_temperatures",
    "load_thresholds",
    "macro_auc",
    "operating_points",
    "plot_roc",
    "select_thresholds",
    "weighted_auc_ap",
    "write_report",
]
