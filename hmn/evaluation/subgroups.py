"""Subgroup performance: per-finding ROC AUC and average precision, with bootstrap intervals, within each
sex, age band and view position, and the largest gap between the groups of each attribute.

These are the breakdowns chest X-ray fairness studies report (e.g. Seyyed-Kalantari et al., "Underdiagnosis
bias of artificial intelligence algorithms applied to chest radiographs in under-served patient
populations", Nature Medicine 2021). Within a group the report's own definitions apply
(:func:`hmn.evaluation.compute_report`: unknown labels excluded per finding, percentile bootstrap over the
group's patients when the images carry patient ids (over its images otherwise), the same seed, no interval
for a finding with fewer than ``min_positives`` positive or negative patients in the group), and the sensitivity and specificity are taken at the operating threshold
chosen for the whole evaluated set, so that a gap between groups is a gap at the threshold a reader would
use. A group's AUC is undefined when it lacks a positive or a negative label for the finding.

The groups come from the datalist's metadata (:data:`hmn.data.vocabulary.METADATA_KEYS`): ``sex``,
``age`` in :data:`hmn.data.vocabulary.AGE_BANDS`, and ``view``. Images without a value for an attribute are
left out of that attribute's groups.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hmn.data.vocabulary import AGE_BANDS, age_band

from .metrics import DEFAULT_MIN_POSITIVES, _metrics_report

__all__ = ["SUBGROUP_ATTRIBUTES", "groups_from_metadata", "plot_subgroups", "subgroup_report"]

SUBGROUP_ATTRIBUTES = ("sex", "age_band", "view")


def groups_from_metadata(images: Sequence[str], metadata: Mapping[str, Mapping[str, Any]] | None) -> dict[str, list]:
    """Per attribute of :data:`SUBGROUP_ATTRIBUTES`, each image's group (None when unknown).

    Args:
        images: the evaluated images' paths, in report order.
        metadata: ``{image path: {"age", "sex", "view"}}`` (:func:`hmn.data.datalist_metadata`).

    Returns:
        ``{"sex": [...], "age_band": [...], "view": [...]}``; attributes no image has are left out.
    """
    metadata = metadata or {}
    rows = [metadata.get(str(i)) or {} for i in images]
    out = {
        "sex": [r.get("sex") for r in rows],
        "age_band": [age_band(r.get("age")) for r in rows],
        "view": [r.get("view") for r in rows],
    }
    return {k: v for k, v in out.items() if any(x is not None for x in v)}


def _order(attribute: str, names: set[str]) -> list[str]:
    if attribute == "age_band":
        return [b for b, _, _ in AGE_BANDS if b in names]
    return sorted(names)


def subgroup_report(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    groups: Mapping[str, Sequence[Any]],
    thresholds: Sequence[float | None],
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    patient_ids: Sequence[Any] | None = None,
    min_positives: int | None = None,
    threshold_source: str | None = None,
) -> dict[str, Any]:
    """Metrics per group of each attribute, and the largest AUC gap per finding.

    Args:
        probs, labels: ``N x K`` as for :func:`hmn.evaluation.compute_report`.
        class_names: the ``K`` names.
        groups: ``{attribute: N group values}`` (None: unknown), e.g. from :func:`groups_from_metadata`.
        thresholds: the ``K`` operating thresholds of the whole set (None: no threshold).
        n_bootstrap, ci, seed: the bootstrap of each group, as in the whole report.
        patient_ids: ``N`` patient ids (None: images are the resampling unit), as in the whole report.
        min_positives: as in the whole report (None: its default).
        threshold_source: where `thresholds` came from, copied into each row (``threshold_source``).

    Returns:
        ``{"attributes": [...], "rows": [{"attribute", "group", "class", "n", "positives", "auc", "auc_ci",
        "average_precision", "ap_ci", "sensitivity", "specificity", "threshold", "threshold_source", "reason"}], "gaps": [{"attribute",
        "class", "auc_gap", "highest_group", "highest_auc", "lowest_group", "lowest_auc", "groups_compared"}]}``.
        ``auc_gap`` is null when fewer than two groups have a defined AUC with at least `min_positives` positive
        and negative patients (images without patient ids); only those groups are compared.
    """
    p = np.asarray(probs, dtype=np.float64)
    ids = None if patient_ids is None else list(patient_ids)
    if ids is not None and len(ids) != p.shape[0]:
        raise ValueError(f"{len(ids)} patient ids for {p.shape[0]} images")
    min_positives = DEFAULT_MIN_POSITIVES if min_positives is None else int(min_positives)
    lab = np.asarray(labels, dtype=np.float64)
    thr = np.array([np.nan if t is None else float(t) for t in thresholds])
    rows: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    for attribute, values in groups.items():
        values = list(values)
        if len(values) != p.shape[0]:
            raise ValueError(f"{len(values)} {attribute!r} values for {p.shape[0]} images")
        names = _order(attribute, {str(v) for v in values if v is not None})
        per_group: dict[str, dict[str, Any]] = {}
        for g in names:
            idx = np.array([v is not None and str(v) == g for v in values])
            rep = _metrics_report(p[idx], lab[idx], class_names, thresholds=thr, n_bootstrap=n_bootstrap, ci=ci,
                                  seed=seed, patient_ids=None if ids is None else [ids[i] for i in np.flatnonzero(idx)],
                                  min_positives=min_positives, quiet=True)[0]
            per_group[g] = rep
            for e in rep["per_class"]:
                rows.append({
                    "attribute": attribute, "group": g, "class": e["class"], "n": e["n"], "positives": e["positives"],
                    "auc": e["auc"], "auc_ci": e["auc_ci"], "average_precision": e["average_precision"],
                    "ap_ci": e["ap_ci"], "sensitivity": e["sensitivity"], "specificity": e["specificity"],
                    "threshold": e["threshold"], "threshold_source": threshold_source,
                    "reason": None if e["reason"] is None else e["reason"].replace(", left out of the macro means", ""),
                })
        for k, name in enumerate(class_names):
            # only groups with enough positive and negative patients for an interval: a gap between groups of a few
            # positives is noise (the same minimum as the report's, min_positives)
            defined = [(g, r["per_class"][k]["auc"]) for g, r in per_group.items()
                       if r["per_class"][k]["auc"] is not None and r["per_class"][k]["reason"] is None]
            gap: dict[str, Any] = {"attribute": attribute, "class": str(name), "auc_gap": None, "highest_group": None,
                                   "highest_auc": None, "lowest_group": None, "lowest_auc": None,
                                   "groups_compared": [g for g, _ in defined]}
            if len(defined) >= 2:
                hi = max(defined, key=lambda x: x[1])
                lo = min(defined, key=lambda x: x[1])
                gap.update(auc_gap=hi[1] - lo[1], highest_group=hi[0], highest_auc=hi[1], lowest_group=lo[0],
                           lowest_auc=lo[1])
            gaps.append(gap)
    return {"attributes": list(groups), "rows": rows, "gaps": gaps}


def _subgroups_figure(subgroups: Mapping[str, Any], class_names: Sequence[str]) -> Any:
    """The forest plot of :func:`plot_subgroups` as a matplotlib ``Figure`` (Agg canvas)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    attributes = list(subgroups["attributes"])
    k = len(class_names)
    fig = Figure(figsize=(3.6 * max(1, len(attributes)), 1.6 + 0.42 * k), dpi=120)
    renderer = FigureCanvasAgg(fig).get_renderer()
    cmap = colormaps["tab10"]
    for a, attribute in enumerate(attributes):
        ax = fig.add_subplot(1, max(1, len(attributes)), a + 1)
        rows = [r for r in subgroups["rows"] if r["attribute"] == attribute]
        # the groups with an AUC for at least one finding: the others are drawn nowhere, so they get neither a
        # colour nor a legend entry (subgroups.csv gives their reason)
        group_names = list(dict.fromkeys(r["group"] for r in rows if r["auc"] is not None))
        step = 0.7 / max(1, len(group_names))
        for gi, g in enumerate(group_names):
            for r in rows:
                if r["group"] != g or r["auc"] is None:
                    continue
                y = k - 1 - list(class_names).index(r["class"]) + 0.35 - gi * step
                ci = r["auc_ci"]
                if ci:
                    ax.plot(ci, [y, y], color=cmap(gi % 10), linewidth=1)
                ax.plot([r["auc"]], [y], marker="o", markersize=3, color=cmap(gi % 10))
        ax.axvline(0.5, color="0.6", linestyle=":", linewidth=1)
        ax.set_yticks(range(k))
        ax.set_yticklabels(list(class_names)[::-1] if a == 0 else [], fontsize=7)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(-0.6, k - 0.2)
        ax.set_xlabel("ROC AUC", fontsize=8)
        ax.set_title(attribute.replace("_", " "), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        if group_names:
            # one entry per group drawn in this panel, whichever findings it has an AUC for, hung below the x axis's
            # tick labels and title (measured, in inches, whatever the panel's height) so that it covers no interval
            # and no text; tight_layout then makes room for it inside the figure
            below = (ax.bbox.y0 - ax.xaxis.get_tightbbox(renderer).y0) / fig.dpi + 0.06
            handles = [Line2D([], [], color=cmap(gi % 10), marker="o", markersize=3, linewidth=1, label=str(g))
                       for gi, g in enumerate(group_names)]
            ax.legend(handles=handles, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      bbox_transform=ax.transAxes + ScaledTranslation(0.0, -below, fig.dpi_scale_trans),
                      ncol=min(3, len(handles)), framealpha=0.85, borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_subgroups(subgroups: Mapping[str, Any], class_names: Sequence[str], path: str | os.PathLike) -> str:
    """A forest plot per attribute: each finding's AUC in each group with its interval (one colour per
    group; each group drawn has one entry in the legend, which sits below the panel's x axis; a group without an
    AUC for any finding is drawn nowhere and left out of the legend), written atomically as a PNG at `path`;
    returns the path. The figure itself comes from ``_subgroups_figure(subgroups, class_names)``."""
    from hmn.durable import atomic_write

    fig = _subgroups_figure(subgroups, class_names)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)
