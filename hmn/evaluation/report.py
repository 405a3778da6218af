"""Evaluation report files: ``metrics.json``, ``metrics.csv``, ``predictions.csv`` and ``roc.png``.

:func:`write_report` writes the four files below into one folder, each atomically (a temporary file in
the same folder, then ``os.replace``), so a reader never sees half a file. CSV files are UTF-8,
comma-separated, with a header row, ``\\n`` line endings and fields quoted only when needed
(Python's ``csv`` module). Numbers are written at full precision (Python's ``repr`` of a float); an
undefined value is an empty field in CSV and ``null`` in JSON. Image paths are the only
per-image identifiers written.

``metrics.json``
    The dict returned by :func:`hmn.evaluation.compute_report`:

    * ``settings``: ``threshold_method`` (``"youden"``: Youden's J picked on the evaluated data,
      ``"fixed"``, or ``"given"``: supplied per class), ``fixed_threshold``, ``thresholds_from`` (the
      metrics.json the thresholds came from, or null), ``positive_rule`` (``"prob >= threshold"``),
      ``n_bootstrap``, ``ci`` (e.g. 0.95), ``seed``, ``ci_method``, ``unknown_labels``.
    * ``n_images``; ``class_names``.
    * ``per_class``: one object per class, in ``class_names`` order: ``class``, ``n`` (images with a
      known label for the class), ``positives``, ``negatives``, ``auc`` (ROC AUC), ``auc_ci``
      (``[low, high]``), ``average_precision``, ``ap_ci``, ``bootstrap_used`` (resamples in which the
      class had both label values), ``threshold``, ``sensitivity``, ``specificity``, ``ppv``, ``npv``,
      ``tp``, ``fp``, ``tn``, ``fn`` (counts at the threshold), ``reason`` (why ``auc`` is null, e.g.
      ``"no positive labels"``; null otherwise).
    * ``macro``: means over the classes with both label values (``classes``; the others are listed in
      ``excluded`` as ``{class: reason}``) of ``auc``, ``average_precision``, ``sensitivity``,
      ``specificity``, ``ppv``, ``npv`` (each over the classes where it is defined); ``auc_ci``,
      ``ap_ci`` and ``bootstrap_used`` from resamples where all those classes had both label values;
      ``n`` and ``positives`` as for ``micro``.
    * ``micro``: every known (image, class) label pooled: ``n`` (known labels), ``positives``,
      ``auc``, ``auc_ci``, ``average_precision``, ``ap_ci``, ``bootstrap_used``, and
      ``sensitivity``/``specificity``/``ppv``/``npv`` from the confusion counts summed over the classes
      that have a threshold; ``reason`` as for a class.
    * ``skipped_images`` (only when the evaluation handler left images out): ``[{"image", "error"}]``.

``metrics.csv``
    Columns ``class, n, positives, auc, auc_ci_low, auc_ci_high, average_precision, ap_ci_low,
    ap_ci_high, threshold, sensitivity, specificity, ppv, npv``. One row per class in ``class_names``
    order, then a row ``macro`` and a row ``micro`` (their ``threshold`` is empty; their ``n`` and
    ``positives`` count known (image, class) labels). Values as in ``metrics.json``; the CI columns
    are the bounds of the ``ci`` level interval.

``predictions.csv``
    One row per image, in the order evaluated. Columns ``image`` (the source path), then for each
    class, in ``class_names`` order, ``<class>_prob`` (the predicted probability) and ``<class>_label``
    (``1``, ``0``, or empty when the label is unknown).

``roc.png``
    ROC curves (false positive rate against sensitivity) of every class with a defined AUC and of the
    micro average (dashed black), the chance diagonal dotted; the legend gives each curve's AUC
    (with its interval when computed). Drawn with matplotlib's Agg canvas (no display needed, and
    pyplot's global state is left alone).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from hmn.durable import atomic_write

from .metrics import _as_arrays, _masks

__all__ = ["METRICS_COLUMNS", "REPORT_FILES", "write_report", "plot_roc", "atomic_write"]

logger = logging.getLogger(__name__)

METRICS_COLUMNS = (
    "class", "n", "positives", "auc", "auc_ci_low", "auc_ci_high", "average_precision", "ap_ci_low",
    "ap_ci_high", "threshold", "sensitivity", "specificity", "ppv", "npv",
)
REPORT_FILES = {"metrics_json": "metrics.json", "metrics_csv": "metrics.csv",
                "predictions_csv": "predictions.csv", "roc_png": "roc.png"}


def _num(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    x = float(x)
    return repr(x) if np.isfinite(x) else ""


def _ci(entry: Mapping[str, Any], key: str) -> tuple[str, str]:
    v = entry.get(key)
    return ("", "") if not v else (_num(v[0]), _num(v[1]))


def _metrics_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    named = [(e["class"], e) for e in report["per_class"]] + [("macro", report["macro"]), ("micro", report["micro"])]
    for name, e in named:
        rows.append([
            name, _num(e.get("n")), _num(e.get("positives")), _num(e.get("auc")), *_ci(e, "auc_ci"),
            _num(e.get("average_precision")), *_ci(e, "ap_ci"), _num(e.get("threshold")),
            _num(e.get("sensitivity")), _num(e.get("specificity")), _num(e.get("ppv")), _num(e.get("npv")),
        ])
    return rows


def _roc_figure(report: Mapping[str, Any], probs: Any, labels: Any, class_names: Sequence[str]) -> Any:
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p, lab = _as_arrays(probs, labels, class_names)
    valid, pos = _masks(lab)
    fig = Figure(figsize=(6.5, 6.5), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="0.6", linewidth=1)
    level = report.get("settings", {}).get("ci")
    cmap = colormaps["tab10" if len(class_names) <= 10 else "tab20"]

    def legend(name: str, e: Mapping[str, Any]) -> str:
        ci = e.get("auc_ci")
        text = f"{name} (AUC {e['auc']:.3f}"
        if ci:
            text += f", {round(100 * level) if level else ''}% CI {ci[0]:.3f}-{ci[1]:.3f}"
        return text + ")"

    for c, e in enumerate(report["per_class"]):
        if e.get("auc") is None:
            continue
        v = valid[:, c]
        fpr, tpr, _ = roc_curve(pos[v, c], p[v, c])
        ax.plot(fpr, tpr, linewidth=1.2, color=cmap(c % cmap.N), label=legend(str(class_names[c]), e))
    micro = report.get("micro", {})
    if micro.get("auc") is not None:
        fpr, tpr, _ = roc_curve(pos[valid], p[valid])
        ax.plot(fpr, tpr, linestyle="--", color="black", linewidth=1.8, label=legend("micro average", micro))
    ax.set(xlim=(0, 1), ylim=(0, 1.005), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", aspect="equal")
    macro = report.get("macro", {})
    title = "ROC curves"
    if macro.get("auc") is not None:
        title += f" (macro AUC {macro['auc']:.3f})"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=6.5, framealpha=0.85)
    fig.tight_layout()
    return fig


def plot_roc(
    report: Mapping[str, Any], probs: Any, labels: Any, class_names: Sequence[str], path: str | os.PathLike
) -> str:
    """Draws the ROC curve of each class with a defined AUC, plus the micro average, into a PNG at `path`
    (written atomically); the legend gives each curve's AUC and interval. Returns the path."""
    fig = _roc_figure(report, probs, labels, class_names)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def write_report(
    report: Mapping[str, Any],
    probs: Any,
    labels: Any,
    image_ids: Sequence[str],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
) -> dict[str, str]:
    """Writes ``metrics.json``, ``metrics.csv``, ``predictions.csv`` and ``roc.png`` (see the module docstring).

    Args:
        report: the dict from :func:`hmn.evaluation.compute_report` on the same `probs` and `labels`.
        probs: ``N x K`` predicted probabilities.
        labels: ``N x K`` labels (0/1; < 0 or NaN unknown).
        image_ids: ``N`` image paths (or other non-identifying ids), the first column of predictions.csv.
        class_names: the ``K`` class names.
        out_dir: the folder (created if missing).

    Returns:
        ``{"metrics_json", "metrics_csv", "predictions_csv", "roc_png"}`` -> the paths written.
    """
    class_names = [str(c) for c in class_names]
    p, lab = _as_arrays(probs, labels, class_names)
    if len(image_ids) != p.shape[0]:
        raise ValueError(f"{len(image_ids)} image_ids for {p.shape[0]} rows of probs")
    if [e["class"] for e in report["per_class"]] != class_names:
        raise ValueError(
            f"the report's classes {[e['class'] for e in report['per_class']]} differ from class_names {class_names}"
        )
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: os.path.join(out_dir, name) for key, name in REPORT_FILES.items()}

    text = json.dumps(report, indent=2, allow_nan=False)
    atomic_write(paths["metrics_json"], lambda f: f.write(text + "\n"))

    def metrics_csv(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(METRICS_COLUMNS)
        w.writerows(_metrics_rows(report))

    atomic_write(paths["metrics_csv"], metrics_csv)

    valid, pos = _masks(lab)

    def predictions_csv(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image"] + [f"{c}_{s}" for c in class_names for s in ("prob", "label")])
        for i, image in enumerate(image_ids):
            row = [str(image)]
            for c in range(len(class_names)):
                row += [_num(p[i, c]), ("1" if pos[i, c] else "0") if valid[i, c] else ""]
            w.writerow(row)

    atomic_write(paths["predictions_csv"], predictions_csv)
    plot_roc(report, p, lab, class_names, paths["roc_png"])
    logger.info("evaluation report written to %s", out_dir)
    return paths
