"""Evaluation of multi-label classifiers: per-class ROC AUC and average precision with bootstrap
confidence intervals, operating thresholds, and the report files a paper needs.

* :func:`compute_report` -> a JSON-ready dict of per-class, macro and micro metrics.
* :func:`macro_auc` -> the report's macro ROC AUC alone (the bundles' validation key metric uses it).
* :func:`select_thresholds` -> per-class thresholds picked on one split (e.g. validation) for another.
* :func:`write_report` -> ``metrics.json``, ``metrics.csv``, ``predictions.csv``, ``roc.png``; the
  exact contents of each file are described in :mod:`hmn.evaluation.report`.

The bundles' ``evaluate.json`` uses them through :class:`hmn.handlers.EvaluationReportHandler`.
"""

from __future__ import annotations

from .metrics import THRESHOLD_METHODS, compute_report, load_thresholds, macro_auc, select_thresholds, weighted_auc_ap
from .report import METRICS_COLUMNS, REPORT_FILES, atomic_write, plot_roc, write_report

__all__ = [
    "METRICS_COLUMNS",
    "REPORT_FILES",
    "THRESHOLD_METHODS",
    "atomic_write",
    "compute_report",
    "load_thresholds",
    "macro_auc",
    "plot_roc",
    "select_thresholds",
    "weighted_auc_ap",
    "write_report",
]
