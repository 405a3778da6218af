"""compute_report / select_thresholds / weighted_auc_ap against hand-worked cases and brute-force references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hmn.evaluation import compute_report, select_thresholds, weighted_auc_ap


def pair_auc(scores, positive) -> float:
    """AUC as the fraction of (positive, negative) pairs ordered correctly, ties counting one half."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    good = 0.0
    for a in s[y]:
        for b in s[~y]:
            good += 1.0 if a > b else 0.5 if a == b else 0.0
    return good / (y.sum() * (~y).sum())


def brute_youden(scores, positive):
    """(best J, highest threshold reaching it) over every score as a threshold, positive if score >= t."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    best, best_t = -np.inf, None
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        j = (pred & y).sum() / y.sum() - (pred & ~y).sum() / (~y).sum()
        if j > best + 1e-12:
            best, best_t = j, t
    return best, best_t


def synthetic(n, k=3, seed=0, prevalence=0.3, signal=1.0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < prevalence).astype(float)
    probs = 1 / (1 + np.exp(-(signal * (2 * labels - 1) + rng.normal(size=(n, k)))))
    return probs, labels


# ----------------------------------------------------------------------------------------------


def test_hand_worked_single_class():
    # descending: 0.9(+) 0.8(-) 0.7(+) 0.7(-) 0.4(+) 0.2(-)
    probs = np.array([[0.9], [0.8], [0.7], [0.7], [0.4], [0.2]])
    labels = np.array([[1], [0], [1], [0], [1], [0]])
    r = compute_report(probs, labels, ["A"], n_bootstrap=0, thresholds="youden", min_positives=1)
    e = r["per_class"][0]
    # pairs: 0.9 beats 3; 0.7 beats 0.2, ties 0.7, loses to 0.8 -> 1.5; 0.4 beats 0.2 -> 1; total 5.5 of 9
    assert e["auc"] == pytest.approx(5.5 / 9)
    assert e["auc"] == pytest.approx(pair_auc(probs[:, 0], labels[:, 0] == 1))
    # AP: recall steps of 1/3 at thresholds 0.9 (precision 1/1), 0.7 (2/4), 0.4 (3/5)
    assert e["average_precision"] == pytest.approx((1 + 2 / 4 + 3 / 5) / 3)
    assert (e["n"], e["positives"], e["negatives"]) == (6, 3, 3)
    # Youden: t=0.9 -> J=1/3-0; 0.8 -> 1/3-1/3; 0.7 -> 2/3-2/3; 0.4 -> 1-2/3=1/3; 0.2 -> 0. Tie 0.9/0.4: highest
    assert e["threshold"] == 0.9
    assert (e["tp"], e["fp"], e["tn"], e["fn"]) == (1, 0, 3, 2)
    assert e["sensitivity"] == pytest.approx(1 / 3) and e["specificity"] == 1.0
    assert e["ppv"] == 1.0 and e["npv"] == pytest.approx(3 / 5)
    assert e["auc_ci"] is None and e["bootstrap_used"] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auc_ap_and_youden_match_brute_force(seed):
    probs, labels = synthetic(60, k=2, seed=seed)
    probs = np.round(probs, 1)  # many ties
    r = compute_report(probs, labels, ["A", "B"], n_bootstrap=0, thresholds="youden", min_positives=1)
    for c, e in enumerate(r["per_class"]):
        y, s = labels[:, c] == 1, probs[:, c]
        assert e["auc"] == pytest.approx(pair_auc(s, y))
        best, t = brute_youden(s, y)
        assert e["threshold"] == t
        assert e["sensitivity"] - (1 - e["specificity"]) == pytest.approx(best)
        pred = s >= t
        assert e["ppv"] == pytest.approx((pred & y).sum() / pred.sum())
        assert e["npv"] == pytest.approx((~pred & ~y).sum() / (~pred).sum())
    np.testing.assert_array_equal(select_thresholds(probs, labels), [e["threshold"] for e in r["per_class"]])


def test_unknown_labels_are_excluded_per_class():
    probs, labels = synthetic(40, k=2, seed=4)
    labels[::3, 0] = -1
    labels[1::5, 1] = np.nan
    r = compute_report(probs, labels, ["A", "B"], n_bootstrap=0, thresholds="youden", min_positives=1)
    for c, e in enumerate(r["per_class"]):
        known = np.isfinite(labels[:, c]) & (labels[:, c] >= 0)
        assert e["n"] == known.sum() and e["positives"] == (labels[known, c] == 1).sum()
        assert e["auc"] == pytest.approx(pair_auc(probs[known, c], labels[known, c] == 1))
    known = np.isfinite(labels) & (labels >= 0)
    assert r["micro"]["n"] == known.sum()
    assert r["micro"]["auc"] == pytest.approx(pair_auc(probs[known], labels[known] == 1))
    assert r["macro"]["auc"] == pytest.approx(np.mean([e["auc"] for e in r["per_class"]]))


def test_single_valued_class_gets_null_auc_and_is_left_out_of_macro():
    probs, labels = synthetic(30, k=3, seed=5)
    labels[:, 1] = 0  # no positives
    labels[:, 2] = 1  # no negatives
    r = compute_report(probs, labels, ["A", "B", "C"], n_bootstrap=50, thresholds="youden", min_positives=1)
    b, c = r["per_class"][1], r["per_class"][2]
    assert b["auc"] is None and b["reason"] == "no positive labels" and b["threshold"] is None
    assert c["auc"] is None and c["reason"] == "no negative labels"
    assert b["auc_ci"] is None and b["bootstrap_used"] == 0
    assert r["macro"]["classes"] == ["A"]
    assert r["macro"]["excluded"] == {"B": "no positive labels", "C": "no negative labels"}
    assert r["macro"]["auc"] == pytest.approx(r["per_class"][0]["auc"])
    json.dumps(r, allow_nan=False)  # no NaN anywhere: nulls instead


def test_fixed_and_given_thresholds():
    probs, labels = synthetic(50, k=2, seed=6)
    r = compute_report(probs, labels, ["A", "B"], thresholds="fixed", fixed_threshold=0.5, n_bootstrap=0)
    assert r["settings"]["threshold_method"] == "fixed"
    for c, e in enumerate(r["per_class"]):
        y, pred = labels[:, c] == 1, probs[:, c] >= 0.5
        assert e["threshold"] == 0.5
        assert e["sensitivity"] == pytest.approx((pred & y).sum() / y.sum())
        assert e["specificity"] == pytest.approx((~pred & ~y).sum() / (~y).sum())
    # micro rates pool the confusion counts of all classes
    y, pred = labels == 1, probs >= 0.5
    assert r["micro"]["sensitivity"] == pytest.approx((pred & y).sum() / y.sum())
    given = compute_report(probs, labels, ["A", "B"], thresholds=[0.3, np.nan], n_bootstrap=0)
    assert given["settings"]["threshold_method"] == "given"
    assert given["per_class"][0]["threshold"] == 0.3 and given["per_class"][1]["threshold"] is None
    assert given["per_class"][1]["sensitivity"] is None
    mapped = compute_report(probs, labels, ["A", "B"], thresholds={"B": 0.3, "A": 0.3}, n_bootstrap=0)
    assert mapped["per_class"][0] == {**given["per_class"][0]}


def test_bootstrap_matches_a_naive_percentile_bootstrap():
    probs, labels = synthetic(30, k=2, seed=7)
    n_boot, seed = 200, 3
    r = compute_report(probs, labels, ["A", "B"], n_bootstrap=n_boot, ci=0.9, seed=seed, thresholds="youden", min_positives=1)
    # reference: the same resamples (rows drawn by default_rng(seed).integers in one block), AUC by pairs
    idx = np.random.default_rng(seed).integers(0, 30, size=(n_boot, 30))
    per_class = [[], []]
    macro, micro = [], []
    for rows in idx:
        p, y = probs[rows], labels[rows] == 1
        aucs = [pair_auc(p[:, c], y[:, c]) if 0 < y[:, c].sum() < 30 else None for c in range(2)]
        for c in range(2):
            if aucs[c] is not None:
                per_class[c].append(aucs[c])
        if None not in aucs:
            macro.append(np.mean(aucs))
        micro.append(pair_auc(p.ravel(), y.ravel()))
    for c in range(2):
        assert r["per_class"][c]["bootstrap_used"] == len(per_class[c])
        np.testing.assert_allclose(r["per_class"][c]["auc_ci"], np.percentile(per_class[c], [5, 95]), rtol=1e-12)
    np.testing.assert_allclose(r["macro"]["auc_ci"], np.percentile(macro, [5, 95]), rtol=1e-12)
    np.testing.assert_allclose(r["micro"]["auc_ci"], np.percentile(micro, [5, 95]), rtol=1e-12)
    assert r["macro"]["bootstrap_used"] == len(macro)


def test_bootstrap_interval_contains_estimate_shrinks_and_is_deterministic():
    small = compute_report(*synthetic(60, k=1, seed=8), ["A"], n_bootstrap=300, seed=0, min_positives=1)
    large = compute_report(*synthetic(2000, k=1, seed=8), ["A"], n_bootstrap=300, seed=0, min_positives=1)
    for r in (small, large):
        for e in (r["per_class"][0], r["macro"], r["micro"]):
            assert e["auc_ci"][0] <= e["auc"] <= e["auc_ci"][1]
            assert e["ap_ci"][0] <= e["average_precision"] <= e["ap_ci"][1]

    def width(r):
        lo, hi = r["per_class"][0]["auc_ci"]
        return hi - lo

    # the interval narrows roughly like 1/sqrt(n): 2000/60 = 33x the data -> about 1/5.8 the width
    assert width(large) < width(small) / 3
    again = compute_report(*synthetic(60, k=1, seed=8), ["A"], n_bootstrap=300, seed=0, min_positives=1)
    other = compute_report(*synthetic(60, k=1, seed=8), ["A"], n_bootstrap=300, seed=1, min_positives=1)
    assert again == small
    assert other["per_class"][0]["auc_ci"] != small["per_class"][0]["auc_ci"]
    assert small["settings"] | {"seed": 1} == other["settings"]


def test_rare_class_reports_how_many_resamples_were_used():
    n = 20
    probs, labels = synthetic(n, k=1, seed=9)
    labels[:] = 0
    labels[3] = 1  # one positive: a resample misses it with probability (1 - 1/n)^n
    r = compute_report(probs, labels, ["A"], n_bootstrap=1000, thresholds="youden", min_positives=1)
    expected = 1000 * (1 - (1 - 1 / n) ** n)
    assert abs(r["per_class"][0]["bootstrap_used"] - expected) < 60  # about 4 binomial standard deviations


def test_weighted_auc_ap_equals_replicated_data():
    rng = np.random.default_rng(10)
    s = np.round(rng.random(25), 1)
    y = rng.random(25) < 0.4
    w = rng.integers(0, 4, size=(5, 25))
    auc, ap = weighted_auc_ap(s, y, w)
    from sklearn.metrics import average_precision_score

    for b in range(5):
        rs, ry = np.repeat(s, w[b]), np.repeat(y, w[b])
        assert auc[b] == pytest.approx(pair_auc(rs, ry))
        assert ap[b] == pytest.approx(average_precision_score(ry, rs))
    auc, ap = weighted_auc_ap(s, y, np.where(y, 0, 1)[None])  # no positive weight
    assert math.isnan(auc[0]) and math.isnan(ap[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"probs": np.zeros((4, 2)), "labels": np.zeros((4, 3))}, "does not match probs shape"),
        ({"class_names": ["A"]}, "1 class_names"),
        ({"thresholds": "otsu"}, "unknown threshold method 'otsu'"),
        ({"thresholds": [0.5, 0.5, 0.5]}, "3 values for 2 classes"),
        ({"thresholds": {"A": 0.5}}, "no entry for classes ['B']"),
        ({"labels": np.full((4, 2), 0.5)}, "labels must be 0 or 1"),
        ({"probs": np.full((4, 2), np.nan)}, "non-finite"),
        ({"ci": 95}, "ci=95"),
        ({"n_bootstrap": -1}, "n_bootstrap=-1"),
    ],
)
def test_clear_errors(kwargs, message):
    args = {"probs": np.full((4, 2), 0.5), "labels": np.array([[0, 1], [1, 0], [0, 1], [1, 0]]),
            "class_names": ["A", "B"], **kwargs}
    with pytest.raises(ValueError) as e:
        compute_report(**args)
    assert message in str(e.value)
    with pytest.raises(ValueError, match="accepted: 'youden'"):
        select_thresholds(np.zeros((2, 1)), np.zeros((2, 1)), method="f1")


def test_macro_auc_is_the_reports_macro_leaving_out_undefined_classes_and_unknown_labels():
    from sklearn.metrics import roc_auc_score

    from hmn.evaluation import macro_auc

    rng = np.random.default_rng(5)
    probs = rng.random((40, 4))
    labels = (rng.random((40, 4)) < 0.4).astype(float)
    labels[:, 2] = 0.0  # no positive: left out
    labels[::3, 1] = -1.0  # unknown (masked) entries of class 1
    labels[5, 3] = np.nan
    value, classes = macro_auc(probs, labels)
    known1 = labels[:, 1] >= 0
    known3 = np.isfinite(labels[:, 3])
    want = np.mean([roc_auc_score(labels[:, 0], probs[:, 0]),
                    roc_auc_score(labels[known1, 1], probs[known1, 1]),
                    roc_auc_score(labels[known3, 3], probs[known3, 3])])
    assert classes == [0, 1, 3] and value == pytest.approx(want, abs=1e-12)
    report = compute_report(probs, labels, ["a", "b", "c", "d"], n_bootstrap=0, thresholds="youden", min_positives=1)
    assert report["macro"]["auc"] == value
    # counting the unknown entries as negatives (what clamping -1 to 0 did) gives another number
    assert roc_auc_score(labels[:, 1].clip(min=0), probs[:, 1]) != pytest.approx(roc_auc_score(labels[known1, 1], probs[known1, 1]))
    assert macro_auc(probs, np.zeros_like(probs)) == (None, [])


# ----------------------------------------------------------------------------------------------
# the statistical design: patients as the unit, no thresholds from the reported data, few positives


def test_patient_bootstrap_matches_a_naive_cluster_bootstrap():
    """With patient ids, each resample draws patients with replacement and takes all their images: the same
    draws done by hand (default_rng(seed).integers over the patients), AUC and sensitivity by pairs / counts."""
    probs, labels = synthetic(40, k=2, seed=11)
    patients = np.repeat(np.arange(13), 4)[:40]  # 10 patients of 4 images (the last has 4, none short) ...
    patients[36:] = 12  # ... and one of 4
    ids = [f"p{x}" for x in patients]
    n_boot, seed = 150, 4
    r = compute_report(probs, labels, ["A", "B"], n_bootstrap=n_boot, ci=0.9, seed=seed, patient_ids=ids,
                       thresholds=[0.5, 0.4], min_positives=1)
    groups = [np.flatnonzero(patients == g) for g in np.unique(patients)]  # in order of first appearance
    draws = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    aucs, sens = [[], []], [[], []]
    for d in draws:
        rows = np.concatenate([groups[g] for g in d])
        p, y = probs[rows], labels[rows] == 1
        for c, t in ((0, 0.5), (1, 0.4)):
            if 0 < y[:, c].sum() < len(rows):
                aucs[c].append(pair_auc(p[:, c], y[:, c]))
            if y[:, c].sum():
                sens[c].append(((p[:, c] >= t) & y[:, c]).sum() / y[:, c].sum())
    assert r["settings"]["ci_unit"] == "patient" and r["n_patients"] == len(groups) and r["n_images"] == 40
    for c in range(2):
        np.testing.assert_allclose(r["per_class"][c]["auc_ci"], np.percentile(aucs[c], [5, 95]), rtol=1e-12)
        np.testing.assert_allclose(r["per_class"][c]["sensitivity_ci"], np.percentile(sens[c], [5, 95]), rtol=1e-12)


def test_one_image_per_patient_gives_the_image_bootstrap_and_no_ids_say_image():
    probs, labels = synthetic(50, k=2, seed=12)
    plain = compute_report(probs, labels, ["A", "B"], n_bootstrap=200, seed=1, min_positives=1)
    each = compute_report(probs, labels, ["A", "B"], n_bootstrap=200, seed=1, min_positives=1,
                          patient_ids=[str(i) for i in range(50)])
    assert plain["settings"]["ci_unit"] == "image" and plain["n_patients"] is None
    assert each["settings"]["ci_unit"] == "patient" and each["n_patients"] == 50
    for a, b in zip(plain["per_class"], each["per_class"]):
        assert a["auc_ci"] == b["auc_ci"] and a["sensitivity_ci"] == b["sensitivity_ci"]
    # an image without an id is a unit of its own, and counted
    part = compute_report(probs, labels, ["A", "B"], n_bootstrap=10, patient_ids=["x"] * 10 + [""] * 40)
    assert part["n_patients"] == 41 and part["settings"]["images_without_patient_id"] == 40


def test_correlated_images_widen_the_patient_interval():
    """8 near-identical images per patient: the image bootstrap treats them as 8 observations, the patient one as
    one, so its interval is about sqrt(8) wider (an independent expectation of the cluster bootstrap)."""
    rng = np.random.default_rng(0)
    n_pat, per = 60, 8
    y = (rng.random(n_pat) < 0.4).astype(float)
    score = y + rng.normal(size=n_pat)
    probs = (np.repeat(score, per) + 1e-3 * rng.normal(size=n_pat * per))[:, None]
    labels = np.repeat(y, per)[:, None]
    ids = np.repeat(np.arange(n_pat), per)
    by_image = compute_report(probs, labels, ["A"], n_bootstrap=400)["per_class"][0]["auc_ci"]
    by_patient = compute_report(probs, labels, ["A"], n_bootstrap=400, patient_ids=ids)["per_class"][0]["auc_ci"]
    ratio = (by_patient[1] - by_patient[0]) / (by_image[1] - by_image[0])
    assert 2.0 < ratio < 4.0, ratio


def test_default_thresholds_are_fixed_not_fitted_on_the_evaluated_data():
    """A model with no skill: Youden thresholds fitted on the same data show a positive J; the default (fixed 0.5,
    nothing fitted here) shows none beyond chance, and the report says where its thresholds came from."""
    rng = np.random.default_rng(3)
    n, k = 400, 6
    labels = (rng.random((n, k)) < 0.3).astype(float)
    probs = rng.random((n, k))  # independent of the labels
    fitted = compute_report(probs, labels, list("ABCDEF"), n_bootstrap=0, thresholds="youden")
    default = compute_report(probs, labels, list("ABCDEF"), n_bootstrap=0)
    j_fitted = np.mean([e["sensitivity"] + e["specificity"] - 1 for e in fitted["per_class"]])
    j_default = np.mean([e["sensitivity"] + e["specificity"] - 1 for e in default["per_class"]])
    assert j_fitted > 0.05 and abs(j_default) < 0.05
    assert default["settings"]["threshold_method"] == "fixed" and not default["settings"]["thresholds_fitted_on_evaluated_data"]
    assert all(e["threshold"] == 0.5 for e in default["per_class"])
    assert fitted["settings"]["thresholds_fitted_on_evaluated_data"]
    assert "optimistic" in fitted["settings"]["threshold_source"]
    # operating points: none from other data -> no threshold, never fitted here unless asked
    assert all(r["threshold"] is None for r in default["operating_points"])
    assert all("optimistic" in r["threshold_source"] for r in fitted["operating_points"])


def test_validation_thresholds_file_drives_the_test_report(tmp_path):
    """Thresholds fitted on one split (fit_operating_thresholds) and applied to another: the per-class threshold
    is the validation split's Youden threshold, and the operating point reports the rates reached on test."""
    from hmn.evaluation import fit_operating_thresholds

    val_p, val_y = synthetic(300, k=2, seed=20)
    test_p, test_y = synthetic(300, k=2, seed=21)
    record = fit_operating_thresholds(val_p, val_y, ["A", "B"])
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(record))
    r = compute_report(test_p, test_y, ["A", "B"], thresholds=str(path), n_bootstrap=0)
    want = select_thresholds(val_p, val_y)
    assert [e["threshold"] for e in r["per_class"]] == want.tolist()
    assert r["settings"]["threshold_method"] == "given" and not r["settings"]["thresholds_fitted_on_evaluated_data"]
    op = next(x for x in r["operating_points"] if x["class"] == "B" and x["target"] == "specificity"
              and x["target_value"] == 0.9)
    t = next(x for x in record["operating_points"] if x["class"] == "B" and x["target"] == "specificity"
             and x["target_value"] == 0.9)["threshold"]
    neg = test_y[:, 1] == 0
    assert op["threshold"] == t and op["specificity"] == pytest.approx((test_p[neg, 1] < t).mean(), abs=1e-15)


def test_few_positive_patients_get_no_interval_and_leave_the_macro_mean():
    probs, labels = synthetic(200, k=3, seed=9)
    labels[:, 2] = 0
    labels[:4, 2] = 1  # 4 positives, in 2 patients
    ids = np.arange(200)
    ids[:4] = [0, 0, 1, 1]
    r = compute_report(probs, labels, ["A", "B", "C"], n_bootstrap=100, patient_ids=ids, min_positives=10)
    c = r["per_class"][2]
    assert c["auc"] is not None and c["auc_ci"] is None and c["sensitivity_ci"] is None
    assert c["positive_units"] == 2 and c["positives"] == 4
    assert "fewer than 10" in c["reason"] and "2 positive" in c["reason"]
    assert r["macro"]["classes"] == ["A", "B"] and "C" in r["macro"]["excluded"]
    assert r["macro"]["auc"] == pytest.approx(np.mean([r["per_class"][0]["auc"], r["per_class"][1]["auc"]]), abs=1e-15)
