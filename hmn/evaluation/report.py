"""Evaluation report files: ``metrics.json``, ``metrics.csv``, ``predictions.csv``, ``roc.png``, the operating
points, calibration and (with metadata) subgroup tables and plots.

:func:`write_report` writes the files below into one folder, each atomically (a temporary file in
the same folder, then ``os.replace``), so a reader never sees half a file. CSV files are UTF-8,
comma-separated, with a header row, ``\\n`` line endings and fields quoted only when needed
(Python's ``csv`` module). Numbers are written at full precision (Python's ``repr`` of a float); an
undefined value is an empty field in CSV and ``null`` in JSON. Image paths are the only
per-image identifiers written.

``metrics.json``
    The dict returned by :func:`hmn.evaluation.compute_report`:

    * ``settings``: ``threshold_method`` (``"fixed"``, ``"given"``: fitted elsewhere, e.g. on the validation
      split, or ``"youden"``: Youden's J fitted on the evaluated data, only when asked for),
      ``fixed_threshold``, ``thresholds_from`` (the metrics.json or thresholds.json the thresholds came from,
      or null), ``threshold_source`` (the same in words, as the CSV files' ``threshold_source`` column),
      ``thresholds_fitted_on_evaluated_data`` (true only for ``"youden"``: every number at a threshold is then
      optimistic), ``operating_points_source``, ``positive_rule`` (``"prob >= threshold"``), ``n_bootstrap``,
      ``ci`` (e.g. 0.95), ``seed``, ``ci_unit`` (``"patient"``: patients resampled, every image of a drawn
      patient taken; ``"image"``: no patient ids, images resampled as if independent), ``ci_method``,
      ``images_without_patient_id``, ``min_positives`` (the fewest positive and negative units a finding needs
      for intervals and the macro means), ``unknown_labels``.
    * ``n_images`` (images evaluated, each once), ``n_patients`` (null without patient ids); ``class_names``.
    * ``per_class``: one object per class, in ``class_names`` order: ``class``, ``n`` (images with a
      known label for the class), ``positives``, ``negatives``, ``positive_units`` and ``negative_units``
      (patients with a positive / negative image; images without patient ids), ``auc`` (ROC AUC), ``auc_ci``
      (``[low, high]``), ``average_precision``, ``ap_ci``, ``bootstrap_used`` (resamples in which the
      class had both label values), ``threshold``, ``sensitivity``, ``specificity``, ``ppv``, ``npv`` and
      their intervals ``sensitivity_ci`` ... ``npv_ci`` (at the same threshold in every resample), ``tp``,
      ``fp``, ``tn``, ``fn`` (counts at the threshold), ``reason`` (why ``auc`` is null, e.g. ``"no positive
      labels"``, or why there is no interval: fewer than ``min_positives`` positive or negative units; null
      otherwise).
    * ``macro``: means over the classes with at least ``min_positives`` positive and negative units
      (``classes``; the others are listed in ``excluded`` as ``{class: reason}``) of ``auc``, ``average_precision``, ``sensitivity``,
      ``specificity``, ``ppv``, ``npv`` (each over the classes where it is defined); ``auc_ci``,
      ``ap_ci`` and ``bootstrap_used`` from resamples where all those classes had both label values;
      ``n`` and ``positives`` as for ``micro``.
    * ``micro``: every known (image, class) label pooled: ``n`` (known labels), ``positives``,
      ``auc``, ``auc_ci``, ``average_precision``, ``ap_ci``, ``bootstrap_used``, and
      ``sensitivity``/``specificity``/``ppv``/``npv`` from the confusion counts summed over the classes
      that have a threshold; ``reason`` as for a class.
    * ``operating_points``: the rows of ``operating_points.csv``.
    * ``calibration``: ``n_bins``, ``temperature_applied_from`` (the metrics.json whose fitted temperatures
      were applied before everything else in this report, or null), ``per_class`` (the rows of
      ``calibration.csv``) and ``macro`` (``ece``, ``brier``: means over the findings with known labels).
    * ``subgroups`` (only when the images had metadata): ``attributes``, ``rows`` (those of
      ``subgroups.csv``, intervals as ``[low, high]``) and ``gaps`` (those of ``subgroup_gaps.csv``).
    * ``findings`` (only for a model evaluated on a datalist with other classes): ``compared``
      (``[{"finding", "model_class", "data_class"}]``), ``model_only`` and ``data_only`` (class names left
      out), ``model_vocabulary`` and ``data_vocabulary``; the report's classes are then the findings.
    * ``source`` (``python -m hmn report`` only): the predictions file the report was computed from.
    * ``skipped_images`` (only when the evaluation handler left images out): ``[{"image", "error"}]``: files
      that could not be read, left out of every number (never replaced by another image).

``metrics.csv``
    Columns ``class, n, positives, auc, auc_ci_low, auc_ci_high, average_precision, ap_ci_low,
    ap_ci_high, threshold, sensitivity, specificity, ppv, npv, sensitivity_ci_low, sensitivity_ci_high,
    specificity_ci_low, specificity_ci_high, threshold_source, ci_unit, reason``. One row per class in ``class_names``
    order, then a row ``macro`` and a row ``micro`` (their ``threshold`` is empty; their ``n`` and
    ``positives`` count known (image, class) labels). Values as in ``metrics.json``; the CI columns
    are the bounds of the ``ci`` level interval.

``predictions.csv``
    One row per image, in the order evaluated. Columns ``image`` (the source path); ``patient_id`` when the
    datalist carries patient ids (as written there: pseudonymize them before sharing the file); when it carries metadata, ``age`` (years), ``sex`` (M, F, O) and ``view`` (PA, AP, LATERAL, ...), empty where
    unknown; then for each class, in ``class_names`` order, ``<class>_prob`` (the predicted probability) and ``<class>_label``
    (``1``, ``0``, or empty when the label is unknown). The probabilities are those evaluated: after
    temperature scaling when one was applied.

``roc.png``
    ROC curves (false positive rate against sensitivity) of every class with a defined AUC and of the
    micro average (dashed black), the chance diagonal dotted; the legend gives each curve's AUC
    (with its interval when computed). Drawn with matplotlib's Agg canvas (no display needed, and
    pyplot's global state is left alone).

``operating_points.csv``
    Columns ``class, target, target_value, threshold, sensitivity, specificity, threshold_source``: per
    finding and target (``target`` = ``specificity``: the threshold that reached a specificity of at least
    ``target_value`` with the highest sensitivity; ``sensitivity``: the reverse), the sensitivity and
    specificity reached on the evaluated data at that threshold. The thresholds come from other data (the
    validation split's ``thresholds.json`` or a given ``metrics.json``); empty where none were given; fitted on
    the evaluated data only with ``thresholds="youden"``, and ``threshold_source`` then says so.

``calibration.csv``
    Columns ``class, n, ece, mce, brier, temperature_applied, temperature_fitted,
    ece_before_temperature``: the expected and maximum calibration error over ``n_bins`` equal-width bins,
    the Brier score, the temperature applied (empty: none), the temperature that minimizes the
    cross-entropy on these data (reuse it on the test split with ``temperature=<this metrics.json>``),
    and the ECE before the applied temperature; then a ``macro`` row (``ece``, ``brier``). See
    :mod:`hmn.evaluation.calibration`.

``reliability.png``
    Reliability diagrams, one panel per finding: observed positive fraction against mean predicted
    probability per bin, with the diagonal and the ECE.

``subgroups.csv`` (with metadata)
    Columns ``attribute, group, class, n, positives, auc, auc_ci_low, auc_ci_high, average_precision,
    ap_ci_low, ap_ci_high, threshold, sensitivity, specificity, threshold_source, reason``: one row per attribute (``sex``,
    ``age_band``, ``view``), group and finding; sensitivity and specificity at the whole set's threshold.
    See :mod:`hmn.evaluation.subgroups`.

``subgroup_gaps.csv`` (with metadata)
    Columns ``attribute, class, auc_gap, highest_group, highest_auc, lowest_group, lowest_auc,
    groups_compared`` (``;``-separated): the largest AUC difference between the groups of an attribute that
    have at least ``min_positives`` positive and negative patients for the finding
    with a defined AUC (empty with fewer than two).

``subgroups.png`` (with metadata)
    A forest plot per attribute: each finding's AUC and interval in each group.
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

from ._tables import _num, _table
from .calibration import calibration_report
from .metrics import (
    DEFAULT_MIN_POSITIVES,
    _as_arrays,
    _given_operating_points,
    _masks,
    _metrics_report,
    operating_points,
)
from .subgroups import subgroup_report

__all__ = ["CALIBRATION_COLUMNS", "METRICS_COLUMNS", "OPERATING_POINTS_COLUMNS", "REPORT_FILES", "SUBGROUPS_COLUMNS",
           "SUBGROUP_FILES", "SUBGROUP_GAPS_COLUMNS", "atomic_write", "compute_report", "plot_roc", "report_main",
           "write_report"]

logger = logging.getLogger(__name__)

METRICS_COLUMNS = (
    "class", "n", "positives", "auc", "auc_ci_low", "auc_ci_high", "average_precision", "ap_ci_low",
    "ap_ci_high", "threshold", "sensitivity", "specificity", "ppv", "npv", "sensitivity_ci_low",
    "sensitivity_ci_high", "specificity_ci_low", "specificity_ci_high", "threshold_source", "ci_unit", "reason",
)
REPORT_FILES = {"metrics_json": "metrics.json", "metrics_csv": "metrics.csv",
                "predictions_csv": "predictions.csv", "roc_png": "roc.png",
                "operating_points_csv": "operating_points.csv", "calibration_csv": "calibration.csv",
                "reliability_png": "reliability.png"}
SUBGROUP_FILES = {"subgroups_csv": "subgroups.csv", "subgroup_gaps_csv": "subgroup_gaps.csv",
                  "subgroups_png": "subgroups.png"}
OPERATING_POINTS_COLUMNS = ("class", "target", "target_value", "threshold", "sensitivity", "specificity",
                            "threshold_source")
CALIBRATION_COLUMNS = ("class", "n", "ece", "mce", "brier", "temperature_applied", "temperature_fitted",
                       "ece_before_temperature")
SUBGROUPS_COLUMNS = ("attribute", "group", "class", "n", "positives", "auc", "auc_ci_low", "auc_ci_high",
                     "average_precision", "ap_ci_low", "ap_ci_high", "threshold", "sensitivity", "specificity",
                     "threshold_source", "reason")
SUBGROUP_GAPS_COLUMNS = ("attribute", "class", "auc_gap", "highest_group", "highest_auc", "lowest_group",
                         "lowest_auc", "groups_compared")
PREDICTION_METADATA_COLUMNS = ("age", "sex", "view")


# ----------------------------------------------------------------------------------------------
# the report: the metrics (metrics.py) with the operating points, calibration and subgroup sections


def compute_report(
    probs: Any,
    labels: Any,
    class_names: Sequence[str],
    thresholds: str | Sequence[float] | Mapping[str, float] | np.ndarray | os.PathLike = "fixed",
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
    patient_ids: Sequence[Any] | None = None,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    _sections: bool = True,
    _quiet: bool = False,
) -> dict[str, Any]:
    """Per-class, macro and micro ROC AUC / average precision with bootstrap intervals over patients, and the
    sensitivity, specificity, PPV and NPV (with intervals) at an operating threshold per class; with the
    operating points, calibration and (given `groups`) subgroup sections.

    Args:
        probs: ``N x K`` predicted probabilities (images x classes).
        labels: ``N x K`` labels, 0 or 1; entries < 0 or NaN are unknown and excluded for that class.
        class_names: the ``K`` class names.
        thresholds: where the operating thresholds come from: ``"fixed"`` (`fixed_threshold` for every class;
            the default, as no thresholds from other data are known here), one threshold per class
            (array-like, NaN for none), a ``{class name: threshold}`` mapping, a thresholds record (the
            contents of such a file, ``{"per_class", "operating_points", "path"}``), the path of a ``metrics.json``
            or ``thresholds.json`` fitted on other data (the validation split: its per-class thresholds and
            its operating points' thresholds are used), or ``"youden"``: Youden's J fitted on these data
            (optimistic: the report then marks every number at those thresholds as fitted on the evaluated data).
        fixed_threshold: the threshold of ``thresholds="fixed"``, in [0, 1].
        n_bootstrap: bootstrap resamples (0: no intervals).
        ci: confidence level of the intervals, in (0, 1).
        seed: seed of the resampling (the same inputs and seed give the same intervals).
        groups: ``{attribute: one group value per image}`` (None: unknown) for the ``subgroups`` section
            (:func:`hmn.evaluation.subgroups.subgroup_report`); None leaves it out.
        calibration_bins: bins of the expected calibration error (:mod:`hmn.evaluation.calibration`).
        temperatures: the ``K`` temperatures already applied to `probs` (recorded in ``calibration``), or None.
        temperatures_from: the file they came from, for the record.
        uncalibrated: the probabilities before `temperatures`, whose ECE is reported beside.
        target_specificities, target_sensitivities: the ``operating_points`` targets (:func:`operating_points`).
        patient_ids: ``N`` patient ids (empty or None where unknown): the bootstrap then resamples patients
            (see :mod:`hmn.evaluation.metrics`). None: images are the unit, and ``settings.ci_unit`` says so.
        min_positives: the fewest positive and negative units (patients, or images without patient ids) a
            finding needs for intervals and for the macro means; >= 1.

    Returns:
        A JSON-ready dict (floats or None, never NaN): ``settings``, ``n_images``, ``n_patients``,
        ``class_names``, ``per_class`` (one dict per class), ``macro`` and ``micro``; see
        :mod:`hmn.evaluation.report`. A class without both a positive and a negative label gets ``auc: None``
        and a ``reason``; one with too few positive or negative units its point estimates, no interval, and a
        ``reason``.

    Raises:
        ValueError: shapes differ, a score is not finite, a known label is not 0 or 1, a setting is out of
            range, or the thresholds are not understood (the accepted forms are named).
    """
    report, p, lab, given_ops = _metrics_report(probs, labels, class_names, thresholds, fixed_threshold, n_bootstrap,
                                                ci, seed, patient_ids, min_positives, quiet=_quiet)
    if _sections:
        settings = report["settings"]
        class_names, where = report["class_names"], settings["threshold_source"]
        if settings["thresholds_fitted_on_evaluated_data"]:
            ops = operating_points(p, lab, class_names, target_specificities, target_sensitivities)
            ops_source = where
        else:
            ops = _given_operating_points(p, lab, class_names, given_ops, target_specificities, target_sensitivities)
            ops_source = where if given_ops else "none (no operating-point thresholds from other data)"
        for r in ops:
            r["threshold_source"] = ops_source
        report["operating_points"] = ops
        settings["operating_points_source"] = ops_source
        report["calibration"] = calibration_report(p, lab, class_names, calibration_bins, applied=temperatures,
                                                   applied_from=temperatures_from, uncalibrated=uncalibrated)
        if groups:
            report["subgroups"] = subgroup_report(p, lab, class_names, groups,
                                                  [e["threshold"] for e in report["per_class"]],
                                                  n_bootstrap=settings["n_bootstrap"], ci=settings["ci"],
                                                  seed=settings["seed"], patient_ids=patient_ids,
                                                  min_positives=settings["min_positives"], threshold_source=where)
    return report


def _ci(entry: Mapping[str, Any], key: str) -> tuple[str, str]:
    v = entry.get(key)
    return ("", "") if not v else (_num(v[0]), _num(v[1]))


def _metrics_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    settings = report.get("settings", {})
    source, unit = settings.get("threshold_source") or "", settings.get("ci_unit") or ""
    named = [(e["class"], e) for e in report["per_class"]] + [("macro", report["macro"]), ("micro", report["micro"])]
    for name, e in named:
        reason = e.get("reason") or ""
        if name == "macro" and e.get("excluded"):
            reason = "left out: " + "; ".join(f"{c} ({why})" for c, why in e["excluded"].items())
        rows.append([
            name, _num(e.get("n")), _num(e.get("positives")), _num(e.get("auc")), *_ci(e, "auc_ci"),
            _num(e.get("average_precision")), *_ci(e, "ap_ci"), _num(e.get("threshold")),
            _num(e.get("sensitivity")), _num(e.get("specificity")), _num(e.get("ppv")), _num(e.get("npv")),
            *_ci(e, "sensitivity_ci"), *_ci(e, "specificity_ci"), source, unit, reason,
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


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else _num(v)


def _write_sections(report: Mapping[str, Any], p: np.ndarray, lab: np.ndarray, class_names: Sequence[str],
                    paths: Mapping[str, str]) -> None:
    if "operating_points" in report:
        _table(paths["operating_points_csv"], OPERATING_POINTS_COLUMNS,
               [[_cell(r[c]) for c in OPERATING_POINTS_COLUMNS] for r in report["operating_points"]])
    if "calibration" in report:
        from .calibration import plot_reliability

        cal = report["calibration"]
        rows = [[_cell(r[c]) for c in CALIBRATION_COLUMNS] for r in cal["per_class"]]
        rows.append(["macro", "", _num(cal["macro"]["ece"]), "", _num(cal["macro"]["brier"]), "", "", ""])
        _table(paths["calibration_csv"], CALIBRATION_COLUMNS, rows)
        plot_reliability(p, lab, class_names, cal, paths["reliability_png"])
    sub = report.get("subgroups")
    if sub:
        from .subgroups import plot_subgroups

        rows = []
        for r in sub["rows"]:
            rows.append([r["attribute"], r["group"], r["class"], _num(r["n"]), _num(r["positives"]), _num(r["auc"]),
                         *_ci(r, "auc_ci"), _num(r["average_precision"]), *_ci(r, "ap_ci"), _num(r["threshold"]),
                         _num(r["sensitivity"]), _num(r["specificity"]), r.get("threshold_source") or "",
                         r.get("reason") or ""])
        _table(paths["subgroups_csv"], SUBGROUPS_COLUMNS, rows)
        _table(paths["subgroup_gaps_csv"], SUBGROUP_GAPS_COLUMNS,
               [[_cell(g[c]) if c != "groups_compared" else ";".join(g[c]) for c in SUBGROUP_GAPS_COLUMNS]
                for g in sub["gaps"]])
        plot_subgroups(sub, class_names, paths["subgroups_png"])


def write_report(
    report: Mapping[str, Any],
    probs: Any,
    labels: Any,
    image_ids: Sequence[str],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
    patient_ids: Sequence[Any] | None = None,
) -> dict[str, str]:
    """Writes the report files (see the module docstring): ``metrics.json``, ``metrics.csv``,
    ``predictions.csv``, ``roc.png``, and those of the report's ``operating_points``, ``calibration`` and
    ``subgroups`` sections where it has them.

    Args:
        report: the dict from :func:`hmn.evaluation.compute_report` on the same `probs` and `labels`.
        probs: ``N x K`` predicted probabilities.
        labels: ``N x K`` labels (0/1; < 0 or NaN unknown).
        image_ids: ``N`` image paths (or other non-identifying ids), the first column of predictions.csv.
        class_names: the ``K`` class names.
        out_dir: the folder (created if missing).
        metadata: ``{image: {"age", "sex", "view"}}`` for the metadata columns of predictions.csv (None or
            empty: no such columns).
        patient_ids: ``N`` patient ids (empty where unknown) for the ``patient_id`` column of predictions.csv
            (None, or none known: no such column).

    Returns:
        :data:`REPORT_FILES` keys (and :data:`SUBGROUP_FILES` keys with subgroups) -> the paths written.
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
    files = dict(REPORT_FILES) if "calibration" in report else {
        k: REPORT_FILES[k] for k in ("metrics_json", "metrics_csv", "predictions_csv", "roc_png")}
    if report.get("subgroups"):
        files.update(SUBGROUP_FILES)
    paths = {key: os.path.join(out_dir, name) for key, name in files.items()}

    text = json.dumps(report, indent=2, allow_nan=False)
    atomic_write(paths["metrics_json"], lambda f: f.write(text + "\n"))

    _table(paths["metrics_csv"], METRICS_COLUMNS, _metrics_rows(report))

    valid, pos = _masks(lab)

    meta_cols = PREDICTION_METADATA_COLUMNS if metadata else ()
    ids = None
    if patient_ids is not None:
        ids = ["" if x is None or (isinstance(x, float) and not np.isfinite(x)) else str(x) for x in patient_ids]
        if len(ids) != p.shape[0]:
            raise ValueError(f"{len(ids)} patient_ids for {p.shape[0]} rows of probs")
        if not any(ids):
            ids = None
    id_cols = ("patient_id",) if ids is not None else ()

    def predictions_csv(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", *id_cols, *meta_cols] + [f"{c}_{s}" for c in class_names for s in ("prob", "label")])
        for i, image in enumerate(image_ids):
            m = metadata.get(str(image), {}) if metadata else {}
            row = [str(image)] + ([ids[i]] if ids is not None else []) + [_num(m[k]) if k == "age" and m.get(k) is not None else str(m.get(k) or "")
                                  for k in meta_cols]
            for c in range(len(class_names)):
                row += [_num(p[i, c]), ("1" if pos[i, c] else "0") if valid[i, c] else ""]
            w.writerow(row)

    atomic_write(paths["predictions_csv"], predictions_csv)
    plot_roc(report, p, lab, class_names, paths["roc_png"])
    _write_sections(report, p, lab, class_names, paths)
    logger.info("evaluation report written to %s", out_dir)
    return paths


# ----------------------------------------------------------------------------------------------
# python -m hmn report


def _report_parser() -> Any:
    import argparse

    from .metrics import DEFAULT_MIN_POSITIVES

    p = argparse.ArgumentParser(
        prog="python -m hmn report",
        description="The evaluation report (metrics.json/csv, predictions.csv, ROC, operating points, calibration, "
        "subgroups) from any model's predictions.csv: columns image, optional patient_id, age, sex, view, and "
        "<class>_prob, <class>_label per class (the format `evaluating` writes). Intervals resample patients when "
        "there is a patient_id column.",
    )
    p.add_argument("predictions", help="the predictions.csv, or the folder holding it")
    p.add_argument("--out", default="report", help="output folder (default: ./report)")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000; 0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    p.add_argument("--thresholds", default="fixed",
                   help="a metrics.json or thresholds.json fitted on other data (the validation split), 'fixed' "
                   "(--fixed-threshold, the default) or 'youden' (fitted on these data: optimistic, marked so)")
    p.add_argument("--fixed-threshold", type=float, default=0.5, help="the threshold of 'fixed' (default 0.5)")
    p.add_argument("--min-positives", type=int, default=DEFAULT_MIN_POSITIVES,
                   help=f"fewest positive and negative patients (images without patient ids) a finding needs for "
                   f"intervals and the macro means (default {DEFAULT_MIN_POSITIVES})")
    p.add_argument("--subgroups", nargs="+", default=None, metavar="ATTRIBUTE",
                   help="subgroup attributes among sex, age_band, view (default: those the file has), or 'none'")
    p.add_argument("--temperature", default=None,
                   help="a validation metrics.json whose fitted per-finding temperatures are applied first")
    return p


def _metadata_columns(path: str, images: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{image: {"age", "sex", "view"}}`` from the file's metadata columns (absent or empty values left out)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, Any]] = {}
    for image, row in zip(images, rows):
        m: dict[str, Any] = {}
        age = (row.get("age") or "").strip()
        if age:
            try:
                m["age"] = float(age)
            except ValueError:
                raise ValueError(f"{path}: image {image!r}: age {age!r} is not a number of years") from None
        for key in ("sex", "view"):
            if (row.get(key) or "").strip():
                m[key] = row[key].strip()
        if m:
            out[image] = m
    return out


def report_main(argv: list[str]) -> int:
    """``python -m hmn report PREDICTIONS --out DIR ...``: the evaluation report of any model's predictions.
    Returns 0, or 1 (the reason on stderr) on bad input."""
    import sys

    from .calibration import apply_temperature, load_temperatures
    from .compare import read_predictions
    from .subgroups import SUBGROUP_ATTRIBUTES, groups_from_metadata

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _report_parser().parse_args(argv)
    try:
        table = read_predictions(args.predictions)
        metadata = _metadata_columns(table.path, table.images)
        groups = groups_from_metadata(table.images, metadata)
        if args.subgroups is not None:
            wanted = [] if args.subgroups == ["none"] else args.subgroups
            unknown = [a for a in wanted if a not in SUBGROUP_ATTRIBUTES]
            if unknown:
                raise ValueError(f"--subgroups {unknown}: accepted {', '.join(SUBGROUP_ATTRIBUTES)} or none")
            groups = {k: v for k, v in groups.items() if k in wanted}
        probs, temps, raw = table.probs, None, None
        if args.temperature:
            temps, raw = load_temperatures(args.temperature, table.class_names), probs
            probs = apply_temperature(probs, temps)
        report = compute_report(probs, table.labels, table.class_names, thresholds=args.thresholds,
                                fixed_threshold=args.fixed_threshold, n_bootstrap=args.n_bootstrap, ci=args.ci,
                                seed=args.seed, groups=groups or None, patient_ids=table.patient_ids,
                                min_positives=args.min_positives, temperatures=temps,
                                temperatures_from=args.temperature, uncalibrated=raw)
        report["source"] = table.path
        paths = write_report(report, probs, table.labels, table.images, table.class_names, args.out,
                             metadata=metadata, patient_ids=table.patient_ids)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    st = report["settings"]
    unit = (f"{report['n_patients']} patients resampled" if st["ci_unit"] == "patient"
            else "no patient_id column: images resampled as independent")
    macro = report["macro"]
    auc = "undefined" if macro["auc"] is None else f"{macro['auc']:.4f}"
    if macro.get("auc_ci"):
        auc += f" ({100 * st['ci']:g}% CI {macro['auc_ci'][0]:.4f}-{macro['auc_ci'][1]:.4f})"
    print(f"{table.path}: {report['n_images']} images, {len(table.class_names)} classes; {unit}")
    print(f"macro ROC AUC {auc} over {len(macro['classes'])} classes; thresholds: {st['threshold_source']}")
    for name, why in macro["excluded"].items():
        print(f"  left out of the macro mean: {name}: {why}")
    for path in paths.values():
        print(f"wrote {path}")
    return 0
