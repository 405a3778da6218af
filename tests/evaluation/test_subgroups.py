"""Subgroup metrics and operating points against independent computations (scikit-learn, brute force)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from hmn.evaluation import compute_report, operating_points, write_report
from hmn.evaluation.subgroups import groups_from_metadata

CLASSES = ["Effusion", "Nodule"]


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(n, 2)) < [0.3, 0.15]).astype(float)
    probs = np.clip(0.35 * labels + rng.uniform(size=(n, 2)) * 0.7, 0, 1).round(2)  # rounded: ties
    labels[:10, 1] = -1
    images = [f"/data/img{i}.png" for i in range(n)]
    sex = rng.choice(["M", "F"], size=n)
    age = rng.uniform(5, 95, size=n).round()
    view = rng.choice(["PA", "AP", "LATERAL"], size=n)
    metadata = {im: {"sex": str(s), "age": float(a), "view": str(v)} for im, s, a, v in zip(images, sex, age, view)}
    del metadata[images[5]]  # an image without metadata is in no group
    return probs, labels, images, metadata, sex, age, view


def _band(a):
    return "0-19" if a < 20 else "20-39" if a < 40 else "40-59" if a < 60 else "60-79" if a < 80 else "80+"


def test_subgroup_metrics_match_sklearn_on_each_subset():
    probs, labels, images, metadata, sex, age, view = _data()
    groups = groups_from_metadata(images, metadata)
    report = compute_report(probs, labels, CLASSES, n_bootstrap=50, seed=1, groups=groups, thresholds="youden",
                            min_positives=1)
    sub = report["subgroups"]
    assert sub["attributes"] == ["sex", "age_band", "view"]
    expected_groups = {
        "sex": [str(s) for s in sex], "age_band": [_band(a) for a in age], "view": [str(v) for v in view]}
    for attribute, per_image in expected_groups.items():
        per_image[5] = None
        names = sorted({g for g in per_image if g is not None})
        for g in names:
            idx = np.array([x == g for x in per_image])
            for k, c in enumerate(CLASSES):
                row = next(r for r in sub["rows"] if (r["attribute"], r["group"], r["class"]) == (attribute, g, c))
                known = idx & (labels[:, k] >= 0)
                y, s = labels[known, k], probs[known, k]
                assert row["n"] == known.sum() and row["positives"] == y.sum()
                if 0 < y.sum() < y.size:
                    assert row["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
                    assert row["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
                    lo, hi = row["auc_ci"]
                    assert lo <= row["auc"] <= hi or row["auc"] == pytest.approx(lo) or row["auc"] == pytest.approx(hi)
                else:
                    assert row["auc"] is None
                t = report["per_class"][k]["threshold"]  # the whole set's threshold, applied in the group
                pred = s >= t
                if y.sum():
                    assert row["sensitivity"] == pytest.approx((pred & (y == 1)).sum() / (y == 1).sum())
                assert row["specificity"] == pytest.approx((~pred & (y == 0)).sum() / (y == 0).sum())
        for k, c in enumerate(CLASSES):
            gap = next(x for x in sub["gaps"] if (x["attribute"], x["class"]) == (attribute, c))
            aucs = {r["group"]: r["auc"] for r in sub["rows"]
                    if r["attribute"] == attribute and r["class"] == c and r["auc"] is not None}
            assert gap["auc_gap"] == pytest.approx(max(aucs.values()) - min(aucs.values()))
            assert aucs[gap["highest_group"]] == max(aucs.values()) and aucs[gap["lowest_group"]] == min(aucs.values())
    # the age bands are ordered by age, not alphabetically
    assert [g for g in dict.fromkeys(r["group"] for r in sub["rows"] if r["attribute"] == "age_band")] == \
        ["0-19", "20-39", "40-59", "60-79", "80+"]


def test_subgroup_files_and_metadata_columns(tmp_path):
    probs, labels, images, metadata, *_ = _data(n=120)
    report = compute_report(probs, labels, CLASSES, n_bootstrap=20, groups=groups_from_metadata(images, metadata))
    paths = write_report(report, probs, labels, images, CLASSES, tmp_path, metadata=metadata)
    for key in ("subgroups_csv", "subgroup_gaps_csv", "subgroups_png", "reliability_png"):
        assert key in paths
    with open(paths["subgroups_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    saved = json.load(open(paths["metrics_json"]))
    assert len(rows) == len(saved["subgroups"]["rows"])
    first = saved["subgroups"]["rows"][0]
    assert (rows[0]["attribute"], rows[0]["group"], rows[0]["class"]) == (first["attribute"], first["group"], first["class"])
    assert float(rows[0]["auc"]) == first["auc"]
    with open(paths["predictions_csv"], newline="") as f:
        pred = list(csv.reader(f))
    assert pred[0][:4] == ["image", "age", "sex", "view"]
    assert pred[1][1:4] == [repr(metadata[images[0]]["age"]), metadata[images[0]]["sex"], metadata[images[0]]["view"]]
    assert pred[6][1:4] == ["", "", ""]  # images[5] has no metadata
    with open(tmp_path / "subgroups.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_no_metadata_no_subgroups(tmp_path):
    probs, labels, images, *_ = _data(n=60)
    assert groups_from_metadata(images, {}) == {}
    report = compute_report(probs, labels, CLASSES, n_bootstrap=0, groups={})
    assert "subgroups" not in report
    paths = write_report(report, probs, labels, images, CLASSES, tmp_path)
    assert "subgroups_csv" not in paths
    assert open(paths["predictions_csv"]).readline().startswith("image,Effusion_prob")


def _brute_force(y, s, target, value):
    best = None
    for t in sorted(set(s.tolist()) | {np.inf}, reverse=True):
        pred = s >= t
        sens = (pred & y).sum() / y.sum()
        spec = (~pred & ~y).sum() / (~y).sum()
        meets, other = (spec >= value, sens) if target == "specificity" else (sens >= value, spec)
        if meets and (best is None or other > best[1]):
            best = (t, other, sens, spec)
    return best


def test_operating_points_match_a_brute_force_search():
    probs, labels, *_ = _data(n=250, seed=4)
    rows = operating_points(probs, labels, CLASSES, specificities=(0.8, 0.9, 0.95), sensitivities=(0.85, 1.0))
    assert len(rows) == 2 * 5
    for r in rows:
        k = CLASSES.index(r["class"])
        known = labels[:, k] >= 0
        y, s = labels[known, k] == 1, probs[known, k]
        t, _, sens, spec = _brute_force(y, s, r["target"], r["target_value"])
        assert r["sensitivity"] == pytest.approx(sens) and r["specificity"] == pytest.approx(spec)
        if np.isfinite(t):
            assert r["threshold"] == t
        else:  # above the highest score: nothing is called positive
            assert r["threshold"] > s.max() and r["sensitivity"] == 0.0


def test_operating_points_undefined_and_bad_targets():
    p = np.array([[0.2], [0.7]])
    rows = operating_points(p, np.array([[1], [1]]), ["x"], specificities=(0.9,), sensitivities=())
    assert rows == [{"class": "x", "target": "specificity", "target_value": 0.9, "threshold": None,
                     "sensitivity": None, "specificity": None}]
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        operating_points(p, np.array([[1], [0]]), ["x"], specificities=(90,))


def test_subgroups_legend_names_every_group_even_without_an_auc_for_the_first_finding():
    """The 0-19 band had no AUC for the first finding: its colour was drawn but missing from the legend."""
    from hmn.evaluation.subgroups import _subgroups_figure

    rows = []
    for g, aucs in (("0-19", [None, 0.7]), ("20-39", [0.8, 0.6]), ("40-59", [0.75, 0.65])):
        for c, auc in zip(("A", "B"), aucs):
            rows.append({"attribute": "age_band", "group": g, "class": c, "auc": auc,
                         "auc_ci": None if auc is None else [auc - 0.1, auc + 0.1]})
    fig = _subgroups_figure({"attributes": ["age_band"], "rows": rows}, ["A", "B"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["0-19", "20-39", "40-59"]
    # the legend lies below the panel, outside the area where the intervals are drawn
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y1 <= ax.get_window_extent().y0


def test_gaps_compare_only_groups_with_enough_positive_patients():
    """A group with 3 positives gets its AUC but takes no part in the attribute's largest gap."""
    from hmn.evaluation.subgroups import subgroup_report

    rng = np.random.default_rng(4)
    n = 300
    sex = np.array(["F"] * 150 + ["M"] * 120 + ["O"] * 30)
    labels = (rng.random((n, 1)) < 0.4).astype(float)
    labels[270:, 0] = 0
    labels[270:273, 0] = 1  # group O: 3 positives
    probs = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(size=(n, 1)))))
    out = subgroup_report(probs, labels, ["A"], {"sex": list(sex)}, [0.5], n_bootstrap=50, min_positives=20)
    rows = {r["group"]: r for r in out["rows"]}
    assert rows["O"]["auc"] is not None and rows["O"]["auc_ci"] is None and "fewer than 20" in rows["O"]["reason"]
    gap = out["gaps"][0]
    assert gap["groups_compared"] == ["F", "M"]
    assert gap["auc_gap"] == pytest.approx(abs(rows["F"]["auc"] - rows["M"]["auc"]), abs=1e-15)
