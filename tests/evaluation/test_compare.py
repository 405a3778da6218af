"""Model comparison: DeLong's test against a hand-worked case, a brute-force transcription of the 1988
paper and the exact Mann-Whitney variance; the paired bootstrap against a slow sklearn reference; file
matching; the files and the command line."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from hmn.__main__ import main as hmn_main
from hmn.evaluation import (
    COMPARISON_COLUMNS,
    compare_predictions,
    compute_report,
    delong_test,
    paired_bootstrap,
    read_predictions,
    write_report,
)


# ----------------------------------------------------------------------------------------------
# DeLong


def test_delong_hand_worked_three_positives_four_negatives_with_ties():
    # model A: positives 0.9 0.6 0.4, negatives 0.6 0.3 0.2 0.1 (a positive ties a negative at 0.6)
    # model B: positives 0.8 0.5 0.3, negatives 0.7 0.4 0.3 0.2 (a positive ties a negative at 0.3)
    y = [1, 1, 1, 0, 0, 0, 0]
    a = [0.9, 0.6, 0.4, 0.6, 0.3, 0.2, 0.1]
    b = [0.8, 0.5, 0.3, 0.7, 0.4, 0.3, 0.2]
    # placement values worked by hand, psi = 1 / 0.5 / 0:
    # A: V10 = 4/4, 3.5/4, 3/4 = 1, 0.875, 0.75;   V01 = 1.5/3, 3/3, 3/3, 3/3 = 0.5, 1, 1, 1
    # B: V10 = 4/4, 3/4, 1.5/4 = 1, 0.75, 0.375;   V01 = 1/3, 2/3, 2.5/3, 3/3
    # AUC A = 2.625 / 3 = 0.875 = 21/24; AUC B = 2.125 / 3 = 17/24
    # S10 (divisor m - 1 = 2): deviations A 1/8, 0, -1/8; B 7/24, 1/24, -8/24
    #   s10_aa = (1/64 + 1/64) / 2 = 1/64
    #   s10_bb = (49 + 1 + 64) / 576 / 2 = 57/576
    #   s10_ab = (1/8 * 7/24 + 0 + 1/8 * 8/24) / 2 = 15/192 / 2 = 5/128
    # S01 (divisor n - 1 = 3): deviations A -9/24, 3/24, 3/24, 3/24; B -9/24, -1/24, 3/24, 7/24
    #   s01_aa = (81 + 9 + 9 + 9) / 576 / 3 = 1/16
    #   s01_bb = (81 + 1 + 9 + 49) / 576 / 3 = 140/1728
    #   s01_ab = (81 - 3 + 9 + 21) / 576 / 3 = 1/16
    # var A = 1/64/3 + 1/16/4 = 1/48; var B = 57/1728 + 140/6912 = 368/6912; cov = 5/384 + 1/64 = 11/384
    # var(B - A) = 144/6912 + 368/6912 - 2 * 198/6912 = 116/6912 = 29/1728
    var_a, var_b, cov = 1 / 48, 368 / 6912, 11 / 384
    var_diff = 29 / 1728
    assert var_a + var_b - 2 * cov == pytest.approx(var_diff, abs=1e-15)
    diff = 17 / 24 - 21 / 24  # -1/6
    se = math.sqrt(var_diff)  # 0.12954693...
    z = diff / se  # -1.28653504...
    p = math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p = 0.19825640...
    assert se == pytest.approx(0.1295469312929, abs=1e-12)
    assert z == pytest.approx(-1.286535041805, abs=1e-11)
    assert p == pytest.approx(0.198256397443, abs=1e-11)

    r = delong_test(y, a, b)
    assert r.auc_a == pytest.approx(0.875, abs=1e-15) and r.auc_b == pytest.approx(17 / 24, abs=1e-15)
    assert r.n_positive == 3 and r.n_negative == 4
    assert r.difference == pytest.approx(diff, abs=1e-15)
    assert r.var_a == pytest.approx(var_a, abs=1e-15)
    assert r.var_b == pytest.approx(var_b, abs=1e-15)
    assert r.covariance == pytest.approx(cov, abs=1e-15)
    assert r.se == pytest.approx(se, abs=1e-14)
    assert r.z == pytest.approx(z, abs=1e-12)
    assert r.p_value == pytest.approx(p, abs=1e-12)
    half = 1.959963984540054 * se  # the 97.5% normal quantile
    assert r.ci == pytest.approx((diff - half, diff + half), abs=1e-12)
    assert r.reason is None
    # swapping the models flips the sign and keeps the p-value
    s = delong_test(y, b, a)
    assert s.difference == pytest.approx(-diff) and s.p_value == pytest.approx(p) and s.var_a == pytest.approx(var_b)


def _delong_brute_force(y, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988) transcribed literally: O(m n) kernel, sums and divisors."""
    y = np.asarray(y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    m, n = len(pos), len(neg)
    out = []
    for s in (a, b):
        v10 = [0.0] * m
        v01 = [0.0] * n
        for i, pi in enumerate(pos):
            for j, nj in enumerate(neg):
                psi = 1.0 if s[pi] > s[nj] else (0.5 if s[pi] == s[nj] else 0.0)
                v10[i] += psi / n
                v01[j] += psi / m
        out.append((sum(v10) / m, v10, v01))
    (auc_a, v10a, v01a), (auc_b, v10b, v01b) = out

    def cov(u, v, mean_u, mean_v):
        return sum((ui - mean_u) * (vi - mean_v) for ui, vi in zip(u, v)) / (len(u) - 1)

    s10 = [[cov(u, v, mu, mv) for v, mv in ((v10a, auc_a), (v10b, auc_b))] for u, mu in ((v10a, auc_a), (v10b, auc_b))]
    s01 = [[cov(u, v, mu, mv) for v, mv in ((v01a, auc_a), (v01b, auc_b))] for u, mu in ((v01a, auc_a), (v01b, auc_b))]
    S = [[s10[r][c] / m + s01[r][c] / n for c in range(2)] for r in range(2)]
    var = S[0][0] + S[1][1] - 2 * S[0][1]  # L S L' with L = (-1, 1)
    return auc_a, auc_b, S, var


@pytest.mark.parametrize("seed,n,prevalence", [(0, 40, 0.3), (1, 25, 0.5), (2, 70, 0.15), (3, 12, 0.5)])
def test_delong_matches_brute_force_and_sklearn(seed, n, prevalence):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2], y[2:4] = 1, 0
    # one decimal: many ties, within and across models and classes
    a = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 1)
    b = np.round(np.clip(0.2 * y + rng.random(n) * 0.8, 0, 1), 1)
    assert len(np.unique(a)) < n and len(np.unique(b)) < n
    auc_a, auc_b, S, var = _delong_brute_force(y, a, b)
    r = delong_test(y, a, b)
    assert r.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-14) == pytest.approx(auc_a, abs=1e-14)
    assert r.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-14) == pytest.approx(auc_b, abs=1e-14)
    assert r.var_a == pytest.approx(S[0][0], rel=1e-12)
    assert r.var_b == pytest.approx(S[1][1], rel=1e-12)
    assert r.covariance == pytest.approx(S[0][1], rel=1e-12)
    assert r.se == pytest.approx(math.sqrt(var), rel=1e-10)
    z = (auc_b - auc_a) / math.sqrt(var)
    assert r.z == pytest.approx(z, rel=1e-10)
    assert r.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-10)
    # boolean labels and lists give the same result
    assert delong_test(y.astype(bool), list(a), list(b)) == r


def test_delong_variance_of_one_auc_is_the_mann_whitney_variance():
    # Var(AUC) of the Mann-Whitney statistic, pairs (i, j): Var = [A(1-A) + (n-1)(P(X>Y1, X>Y2) - A^2)
    # + (m-1)(P(X1>Y, X2>Y) - A^2)] / (m n). With negatives Y ~ Exp(1) and positives X ~ Exp(rate l):
    # A = P(X>Y) = 1/(1+l); P(X>Y1, X>Y2) = E[(1-e^-X)^2] = 1 - 2l/(l+1) + l/(l+2); P(X1>Y, X2>Y) =
    # E[e^{-2lY}] = 1/(1+2l). The mean of DeLong's estimate over many samples must approach it, as must
    # the spread of the AUCs themselves. Under no difference (both normal), Var = (m+n+1)/(12 m n).
    m, n, lam, reps = 30, 40, 0.4, 2000
    A = 1 / (1 + lam)
    exact_exp = (A * (1 - A) + (n - 1) * (1 - 2 * lam / (lam + 1) + lam / (lam + 2) - A * A)
                 + (m - 1) * (1 / (1 + 2 * lam) - A * A)) / (m * n)
    exact_null = (m + n + 1) / (12 * m * n)
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(m), np.zeros(n)]
    for exact, draw in (
        (exact_exp, lambda: np.r_[rng.exponential(1 / lam, m), rng.exponential(1.0, n)]),
        (exact_null, lambda: rng.normal(size=m + n)),
    ):
        aucs, variances = [], []
        for _ in range(reps):
            s = draw()
            r = delong_test(y, s, s)
            aucs.append(r.auc_a)
            variances.append(r.var_a)
            assert r.var_b == r.var_a == r.covariance
        assert np.mean(variances) == pytest.approx(exact, rel=0.06)
        assert np.var(aucs, ddof=1) == pytest.approx(exact, rel=0.10)


def test_delong_identical_rankings_give_p_one():
    rng = np.random.default_rng(0)
    y = (rng.random(50) < 0.4).astype(int)
    s = rng.random(50) + 0.3 * y
    for other in (s.copy(), np.log(s) * 3 + 1):  # the same scores, and a monotone transform of them
        r = delong_test(y, s, other)
        assert r.difference == 0.0 and r.se == 0.0
        assert r.z is None and r.p_value == 1.0 and r.ci == (0.0, 0.0)
        assert "zero variance" in r.reason


def test_delong_undefined_cases():
    s = [0.1, 0.5, 0.7, 0.2]
    for y, reason in (([0, 0, 0, 0], "no positive labels"), ([1, 1, 1, 1], "no negative labels")):
        r = delong_test(y, s, s[::-1])
        assert r.auc_a is None and r.auc_b is None and r.difference is None and r.p_value is None
        assert r.reason == reason
    one = delong_test([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.95], [0.9, 0.1, 0.2, 0.3])
    assert one.auc_a == pytest.approx(2 / 3) and one.auc_b == 1.0 and one.difference == pytest.approx(1 / 3)
    assert one.se is None and one.p_value is None and one.ci is None and "at least 2 positives" in one.reason
    # A perfect, B all tied: both placement vectors constant, so zero variance with a difference of -0.5
    flat = delong_test([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5])
    assert flat.difference == -0.5 and flat.se == 0.0
    assert flat.z is None and flat.p_value is None and flat.ci is None and "normal approximation" in flat.reason
    assert flat.to_dict()["ci"] is None and json.dumps(flat.to_dict())


@pytest.mark.parametrize("args,message", [
    (([1, 0, 2], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]), "only 0 and 1"),
    (([1, 0, 1], [0.1, 0.2], [0.1, 0.2, 0.3]), "one score per label"),
    (([1, 0, 1], [0.1, np.nan, 0.3], [0.1, 0.2, 0.3]), "finite"),
    (([[1, 0]], [0.1, 0.2], [0.1, 0.2]), "one-dimensional"),
])
def test_delong_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        delong_test(*args)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        delong_test([1, 0], [0.1, 0.2], [0.1, 0.2], ci=95)


# ----------------------------------------------------------------------------------------------
# paired bootstrap


def _two_models(n=60, k=2, seed=0, unknown=True):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.4).astype(float)
    labels[:2], labels[2:4] = 1, 0
    a = np.round(0.8 * labels + rng.normal(size=(n, k)), 1)  # rounded: ties
    b = np.round(1.3 * labels + rng.normal(size=(n, k)), 1)
    if unknown:
        labels[5, 0] = np.nan
        labels[9, 1] = -1
    return labels, a, b


def test_paired_bootstrap_matches_slow_sklearn_reference():
    labels, a, b = _two_models(n=50)
    n_boot, seed, ci = 300, 7, 0.9
    res = paired_bootstrap(labels, a, b, n_bootstrap=n_boot, seed=seed, ci=ci)

    rng = np.random.default_rng(seed)  # the documented draws: one rng.integers(0, n, size=n) per resample
    n = len(labels)
    ref = np.full((n_boot, 2), np.nan)
    for r in range(n_boot):
        idx = rng.integers(0, n, size=n)
        for c in range(2):
            lab = labels[idx, c]
            known = np.isfinite(lab) & (lab >= 0)
            y = lab[known]
            if 0 < y.sum() < len(y):
                ref[r, c] = roc_auc_score(y, b[idx, c][known]) - roc_auc_score(y, a[idx, c][known])
    np.testing.assert_allclose(res.samples, ref, rtol=0, atol=1e-12)
    for c in range(2):
        known = labels[:, c] >= 0
        observed = roc_auc_score(labels[known, c], b[known, c]) - roc_auc_score(labels[known, c], a[known, c])
        assert res.difference[c] == pytest.approx(observed, abs=1e-12)
        d = ref[:, c][np.isfinite(ref[:, c])]
        assert res.used[c] == len(d)
        assert res.ci[c] == pytest.approx(list(np.percentile(d, [5, 95])), abs=1e-12)
        tail = min((d <= 1e-12).sum(), (d >= -1e-12).sum())
        assert res.p_value[c] == pytest.approx(min(1.0, 2 * (1 + tail) / (len(d) + 1)))
    macro = ref.mean(axis=1)
    assert res.macro_classes == [0, 1]
    assert res.macro_used == np.isfinite(macro).sum()
    assert res.macro_ci == pytest.approx(list(np.percentile(macro[np.isfinite(macro)], [5, 95])), abs=1e-12)
    assert res.macro_difference == pytest.approx(res.difference.mean())


def test_paired_bootstrap_is_deterministic_and_clear_when_b_is_better():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.5).astype(float)
    a = y * 0.3 + rng.normal(size=200)  # weak
    b = y * 3.0 + rng.normal(size=200)  # strong
    one = paired_bootstrap(y, a, b, n_bootstrap=500, seed=11)
    two = paired_bootstrap(y, a, b, n_bootstrap=500, seed=11)
    other = paired_bootstrap(y, a, b, n_bootstrap=500, seed=12)
    np.testing.assert_array_equal(one.samples, two.samples)
    assert one.ci == two.ci and one.p_value == two.p_value
    assert one.ci != other.ci
    low, high = one.ci[0]
    assert low <= one.difference[0] <= high and low > 0
    assert one.p_value[0] == pytest.approx(2 / 501)  # no resample with d* <= 0: the smallest attainable p
    assert one.used[0] == 500
    # the same model twice: every resampled difference is exactly 0
    same = paired_bootstrap(y, a, a, n_bootstrap=200, seed=0)
    assert same.ci[0] == [0.0, 0.0] and same.p_value[0] == 1.0 and same.difference[0] == 0.0
    # and B worse than A mirrors the interval
    swapped = paired_bootstrap(y, b, a, n_bootstrap=500, seed=11)
    np.testing.assert_allclose(swapped.samples, -one.samples, atol=1e-15)


def test_paired_bootstrap_undefined_class_and_no_resamples():
    labels, a, b = _two_models(n=30, k=3, unknown=False)
    labels[:, 2] = 0  # no positives
    res = paired_bootstrap(labels, a, b, n_bootstrap=50, seed=0)
    assert np.isnan(res.difference[2]) and res.used[2] == 0 and res.ci[2] is None and res.p_value[2] is None
    assert res.macro_classes == [0, 1] and res.macro_used > 0
    none = paired_bootstrap(labels, a, b, n_bootstrap=0)
    assert none.samples.shape == (0, 3) and none.ci == [None] * 3 and none.macro_ci is None
    assert none.macro_difference == pytest.approx(np.mean(res.difference[:2]))
    with pytest.raises(ValueError, match="n_bootstrap=-1"):
        paired_bootstrap(labels, a, b, n_bootstrap=-1)
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(labels, a[:, :2], b)
    bad = labels.copy()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match="0 or 1"):
        paired_bootstrap(bad, a, b)


# ----------------------------------------------------------------------------------------------
# predictions.csv files


def _write_predictions(path, images, classes, probs, labels, metadata=False):
    """A predictions.csv in the report's format, written by hand (metadata columns optional)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        meta = ["age", "sex", "view"] if metadata else []
        w.writerow(["image", *meta, *[f"{c}_{s}" for c in classes for s in ("prob", "label")]])
        for i, image in enumerate(images):
            row = [image, *(["61", "F", "PA"] if metadata else [])]
            for c in range(len(classes)):
                lab = labels[i][c]
                row += [repr(float(probs[i][c])), "" if lab is None or not lab >= 0 else str(int(lab))]
            w.writerow(row)
    return str(path)


def _pair_of_files(tmp_path, n=40, seed=0):
    """A: 40 images, classes Effusion, Mass, Nodule; B: 36 of A's images (shuffled) plus 3 of its own,
    classes Mass, Effusion, Hernia (columns in another order), with metadata columns."""
    rng = np.random.default_rng(seed)
    images = [f"/data/img_{i:03d}.png" for i in range(n)]
    lab = (rng.random((n, 3)) < 0.45).astype(float)
    lab[:2], lab[2:4] = 1, 0
    pa = np.round(0.6 * lab + rng.random((n, 3)), 2)
    pb = np.round(1.5 * lab + rng.random((n, 3)), 2)
    lab[6, 0] = np.nan  # Effusion unknown for img_006 in both
    path_a = _write_predictions(tmp_path / "A" / "predictions.csv", images, ["Effusion", "Mass", "Nodule"], pa, lab)
    keep = rng.permutation(np.arange(4, n))  # B lacks img_000..img_003
    b_images = [images[i] for i in keep] + ["/data/extra_1.png", "/data/extra_2.png", "/data/extra_3.png"]
    b_lab = np.r_[lab[keep][:, [1, 0]], np.zeros((3, 2))]
    b_lab = np.c_[b_lab, np.zeros(len(b_images))]  # Hernia, all negative
    b_lab[keep.tolist().index(8), 1] = np.nan  # B does not know img_008's Effusion label; A does
    b_prob = np.c_[np.r_[pb[keep][:, [1, 0]], rng.random((3, 2))], rng.random(len(b_images))]
    path_b = _write_predictions(tmp_path / "B" / "predictions.csv", b_images, ["Mass", "Effusion", "Hernia"],
                                b_prob, b_lab, metadata=True)
    return path_a, path_b, images, lab, pa, pb


def test_compare_matches_images_and_classes(tmp_path):
    path_a, path_b, images, lab, pa, pb = _pair_of_files(tmp_path)
    result = compare_predictions(path_a, path_b, n_bootstrap=200, seed=4, min_positives=1)
    assert result["a"]["n_images"] == 40 and result["b"]["n_images"] == 39
    assert result["n_shared_images"] == 36
    assert result["n_images_only_in_a"] == 4 and result["n_images_only_in_b"] == 3
    assert result["classes"] == ["Effusion", "Mass"]  # A's order
    assert result["classes_only_in_a"] == ["Nodule"] and result["classes_only_in_b"] == ["Hernia"]
    assert result["labels_known_only_in_b"] == {}
    shared = np.arange(4, 40)  # the images in both, A's rows
    for row, c in zip(result["per_class"], (0, 1)):
        known = shared[np.isfinite(lab[shared, c])]
        y = lab[known, c]
        assert row["n"] == len(known) and row["positives"] == y.sum() and row["negatives"] == len(y) - y.sum()
        assert row["auc_a"] == pytest.approx(roc_auc_score(y, pa[known, c]), abs=1e-14)
        assert row["auc_b"] == pytest.approx(roc_auc_score(y, pb[known, c]), abs=1e-14)
        d = delong_test(y, pa[known, c], pb[known, c])
        assert row["difference"] == d.difference and row["delong_p"] == d.p_value and row["delong_ci"] == list(d.ci)
        assert row["bootstrap_used"] == 200 and row["bootstrap_ci"][0] <= row["difference"] <= row["bootstrap_ci"][1]
    assert result["per_class"][0]["n"] == 35  # img_006's Effusion label is unknown
    macro = result["macro"]
    assert macro["classes"] == ["Effusion", "Mass"] and macro["excluded"] == {}
    assert macro["difference"] == pytest.approx(np.mean([r["difference"] for r in result["per_class"]]))
    assert macro["auc_a"] == pytest.approx(np.mean([r["auc_a"] for r in result["per_class"]]))
    assert macro["delong_p"] is None and macro["delong_ci"] is None and macro["delong_se"] is None
    assert macro["bootstrap_ci"] is not None and macro["bootstrap_used"] == 200
    json.dumps(result, allow_nan=False)
    # the bootstrap is the documented one on the shared images in A's order
    boot = paired_bootstrap(lab[shared][:, :2], pa[shared][:, :2], pb[shared][:, :2], n_bootstrap=200, seed=4)
    assert [r["bootstrap_ci"] for r in result["per_class"]] == boot.ci and macro["bootstrap_ci"] == boot.macro_ci

    only = compare_predictions(path_a, os.path.dirname(path_b), classes=["Mass"], n_bootstrap=0)
    assert only["classes"] == ["Mass"] and only["per_class"][0]["bootstrap_ci"] is None
    with pytest.raises(ValueError, match=r"B/predictions.csv has no class \['Nodule'\]"):
        compare_predictions(path_a, path_b, classes=["Mass", "Nodule"])


def test_labels_only_b_knows_are_counted_not_used(tmp_path):
    path_a, path_b, images, lab, pa, pb = _pair_of_files(tmp_path)
    # swap the roles: B's file (which lacks img_008's Effusion label) becomes A
    result = compare_predictions(path_b, path_a, n_bootstrap=0)
    assert result["classes"] == ["Mass", "Effusion"]
    assert result["labels_known_only_in_b"] == {"Effusion": 1}
    assert result["per_class"][1]["n"] == 34  # img_006 unknown in both, img_008 unknown in A (here: path_b)


def test_duplicate_images_and_label_disagreement_are_errors(tmp_path):
    path_a, _, images, lab, pa, pb = _pair_of_files(tmp_path)
    dup = _write_predictions(tmp_path / "dup" / "predictions.csv", images[:5] + [images[2]], ["Mass"],
                             pa[:6, :1], lab[:6, 1:2])
    with pytest.raises(ValueError, match=r"dup/predictions.csv: image '/data/img_002.png' is listed twice"):
        compare_predictions(path_a, dup)
    other = lab.copy()
    other[17, 1] = 1 - other[17, 1]
    bad = _write_predictions(tmp_path / "bad" / "predictions.csv", images, ["Effusion", "Mass"], pb[:, :2],
                             other[:, :2])
    with pytest.raises(ValueError, match=r"label of image '/data/img_017.png', class 'Mass'"):
        compare_predictions(path_a, bad)
    strangers = _write_predictions(tmp_path / "s" / "predictions.csv", ["x.png", "y.png"], ["Mass"],
                                   [[0.1], [0.2]], [[1], [0]])
    with pytest.raises(ValueError, match="no image is in both"):
        compare_predictions(path_a, strangers)
    other_classes = _write_predictions(tmp_path / "o" / "predictions.csv", images, ["Hernia"], pa[:, :1], lab[:, :1])
    with pytest.raises(ValueError, match="no class in common"):
        compare_predictions(path_a, other_classes)


def test_read_predictions_reads_the_reports_file_and_refuses_broken_ones(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((12, 2)) < 0.5).astype(float)
    labels[3, 1] = np.nan
    probs = rng.random((12, 2))
    ids = [f"im{i}.png" for i in range(12)]
    report = compute_report(probs, labels, ["a_b", "c"], n_bootstrap=0)
    metadata = {im: {"age": 40 + i, "sex": "F", "view": "PA"} for i, im in enumerate(ids)}
    write_report(report, probs, labels, ids, ["a_b", "c"], tmp_path / "r", metadata=metadata)
    with open(tmp_path / "r" / "predictions.csv") as f:
        assert f.readline().startswith("image,age,sex,view,a_b_prob,")  # the report's metadata columns
    table = read_predictions(tmp_path / "r")
    assert table.images == ids and table.class_names == ["a_b", "c"]
    np.testing.assert_array_equal(table.probs, probs)
    np.testing.assert_array_equal(table.labels, labels)

    def write(text):
        p = tmp_path / "x.csv"
        p.write_text(text)
        return p

    with pytest.raises(ValueError, match="no 'image' column"):
        read_predictions(write("path,a_prob,a_label\nx,0.1,1\n"))
    with pytest.raises(ValueError, match="inference CSV has no labels"):
        read_predictions(write("image,error,a\nx,,0.1\n"))
    with pytest.raises(ValueError, match="line 3: 2 fields"):
        read_predictions(write("image,a_prob,a_label\nx,0.1,1\ny,0.2\n"))
    with pytest.raises(ValueError, match=r"image 'y', column 'a_prob': '' is not a finite number"):
        read_predictions(write("image,a_prob,a_label\nx,0.1,1\ny,,0\n"))
    with pytest.raises(ValueError, match=r"image 'y', column 'a_label': label '2'"):
        read_predictions(write("image,a_prob,a_label\nx,0.1,1\ny,0.3,2\n"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_predictions(tmp_path / "missing.csv")
    t = read_predictions(write("image,age,sex,view,a_prob,a_label,b_prob\nx,50,M,AP,0.1,1,0.4\ny,7,F,PA,0.3,-1,0.2\n"))
    assert t.class_names == ["a"] and np.isnan(t.labels[1, 0]) and t.labels[0, 0] == 1


# ----------------------------------------------------------------------------------------------
# files and command line


def test_cli_end_to_end(tmp_path, capsys):
    path_a, path_b, *_ = _pair_of_files(tmp_path)
    out = tmp_path / "cmp"
    rc = hmn_main(["compare", path_a, path_b, "--out", str(out), "--n-bootstrap", "150", "--seed", "3", "--min-positives", "1",
                   "--ci", "0.9", "--classes", "Mass,Effusion"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["comparison.csv", "comparison.json", "comparison.png"]
    for name in os.listdir(out):
        assert f"wrote {out / name}" in printed
    assert "90% CI" in printed and "macro" in printed and "36 images in both" in printed
    assert "only in A: ['Nodule']; only in B: ['Hernia']" in printed

    with open(out / "comparison.json") as f:
        saved = json.load(f)
    expected = compare_predictions(path_a, path_b, classes=["Mass", "Effusion"], n_bootstrap=150, seed=3, ci=0.9,
                                   min_positives=1)
    assert saved == json.loads(json.dumps(expected))
    assert saved["settings"]["ci"] == 0.9 and saved["settings"]["difference"] == "auc_b - auc_a"
    mass = saved["per_class"][0]
    assert mass["class"] == "Mass"
    assert f"{mass['auc_a']:.4f}" in printed and f"{mass['difference']:+.4f}" in printed

    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COMPARISON_COLUMNS
    assert [r[0] for r in rows[1:]] == ["Mass", "Effusion", "macro"]
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    assert float(table["Mass"]["difference"]) == mass["difference"]  # full precision
    assert [float(table["Mass"]["delong_ci_low"]), float(table["Mass"]["delong_ci_high"])] == mass["delong_ci"]
    assert [float(table["Mass"]["bootstrap_ci_low"]), float(table["Mass"]["bootstrap_ci_high"])] == mass["bootstrap_ci"]
    assert int(table["Mass"]["bootstrap_used"]) == 150 and float(table["Mass"]["delong_p"]) == mass["delong_p"]
    assert table["macro"]["delong_p"] == table["macro"]["delong_ci_low"] == table["macro"]["delong_se"] == ""
    assert float(table["macro"]["bootstrap_p"]) == saved["macro"]["bootstrap_p"]
    with open(out / "comparison.csv", "rb") as f:
        assert b"\r" not in f.read()
    with open(out / "comparison.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary file left


def test_cli_errors_and_undefined_class(tmp_path, capsys):
    path_a, *_ = _pair_of_files(tmp_path)
    assert hmn_main(["compare", path_a, str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "o")]) == 1
    assert "nowhere.csv: no such file" in capsys.readouterr().err
    # a class without positives among the shared images: reported, not averaged, and plotted as undefined
    images = [f"i{i}" for i in range(8)]
    lab = [[0, 0], [0, 0], [0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 0]]
    a = _write_predictions(tmp_path / "u" / "a.csv", images, ["x", "y"], np.linspace(0, 1, 16).reshape(8, 2), lab)
    b = _write_predictions(tmp_path / "u" / "b.csv", images, ["x", "y"], np.linspace(1, 0, 16).reshape(8, 2), lab)
    assert hmn_main(["compare", a, b, "--out", str(tmp_path / "u" / "out"), "--n-bootstrap", "20",
                     "--min-positives", "1"]) == 0
    with open(tmp_path / "u" / "out" / "comparison.json") as f:
        saved = json.load(f)
    assert saved["per_class"][1]["auc_a"] is None and saved["per_class"][1]["reason"] == "no positive labels"
    assert saved["macro"]["classes"] == ["x"] and saved["macro"]["excluded"] == {"y": "no positive labels"}
    assert saved["per_class"][0]["difference"] == -1.0  # B reverses A's perfect ranking


# ----------------------------------------------------------------------------------------------
# patients as the unit; few positives


def _correlated_models(n, seed, prevalence=0.4):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    return y, y + rng.normal(size=n), 1.2 * y + rng.normal(size=n)


def test_clustered_delong_is_delong_with_one_image_per_patient_and_counts_copies_once():
    """Obuchowski's variance equals DeLong's when every patient has one image; copying every image 3 times within
    its patient leaves it unchanged (the copies add no information), while DeLong's, taking the copies as
    independent, shrinks by sqrt(3)."""
    y, a, b = _correlated_models(60, seed=1)
    plain = delong_test(y, a, b)
    clustered = delong_test(y, a, b, patient_ids=[f"p{i}" for i in range(60)])
    for k in ("se", "var_a", "var_b", "covariance", "p_value"):
        assert getattr(clustered, k) == pytest.approx(getattr(plain, k), rel=1e-12)
    y3, a3, b3 = np.repeat(y, 3), np.repeat(a, 3), np.repeat(b, 3)
    ids3 = np.repeat(np.arange(60), 3)
    copies = delong_test(y3, a3, b3, patient_ids=ids3)
    naive = delong_test(y3, a3, b3)
    assert copies.difference == pytest.approx(plain.difference, abs=1e-15)
    assert copies.se == pytest.approx(plain.se, rel=1e-12)
    assert copies.var_a == pytest.approx(plain.var_a, rel=1e-12) and copies.covariance == pytest.approx(plain.covariance, rel=1e-12)
    assert naive.se == pytest.approx(plain.se / np.sqrt(3), rel=0.05)


def test_clustered_delong_matches_obuchowskis_formula_by_pairs():
    """Obuchowski (1997) written out with explicit pair loops over a small clustered set, patients of 1-3
    images with both labels mixed, against the vectorized midrank version."""
    rng = np.random.default_rng(5)
    ids = np.repeat(np.arange(12), rng.integers(1, 4, size=12))
    n = ids.size
    y = rng.random(n) < 0.45
    y[:2], y[-2:] = True, False
    a = np.round(y + rng.normal(size=n), 1)  # rounded: ties
    b = np.round(0.5 * y + rng.normal(size=n), 1)

    def var_by_pairs(s):
        X, Y = np.flatnonzero(y), np.flatnonzero(~y)
        M, N = X.size, Y.size
        psi = lambda u, v: 1.0 if u > v else 0.5 if u == v else 0.0
        theta = sum(psi(s[i], s[j]) for i in X for j in Y) / (M * N)
        vx = {i: sum(psi(s[i], s[j]) for j in Y) / N for i in X}
        vy = {j: sum(psi(s[i], s[j]) for i in X) / M for j in Y}
        pats = np.unique(ids)
        m_i = {p: sum(1 for i in X if ids[i] == p) for p in pats}
        n_i = {p: sum(1 for j in Y if ids[j] == p) for p in pats}
        Vx = {p: sum(vx[i] for i in X if ids[i] == p) for p in pats}
        Vy = {p: sum(vy[j] for j in Y if ids[j] == p) for p in pats}
        I10 = sum(1 for p in pats if m_i[p]); I01 = sum(1 for p in pats if n_i[p]); I = len(pats)
        S10 = I10 / ((I10 - 1) * M) * sum((Vx[p] - m_i[p] * theta) ** 2 for p in pats)
        S01 = I01 / ((I01 - 1) * N) * sum((Vy[p] - n_i[p] * theta) ** 2 for p in pats)
        S11 = I / (I - 1) * sum((Vx[p] - m_i[p] * theta) * (Vy[p] - n_i[p] * theta) for p in pats)
        return S10 / M + S01 / N + 2 * S11 / (M * N)

    r = delong_test(y, a, b, patient_ids=ids)
    assert r.var_a == pytest.approx(var_by_pairs(a), rel=1e-12)
    assert r.var_b == pytest.approx(var_by_pairs(b), rel=1e-12)
    # the difference's variance: the same formula over the score difference's placement values
    assert r.se ** 2 == pytest.approx(r.var_a + r.var_b - 2 * r.covariance, rel=1e-9)


def test_compare_reads_patient_ids_and_withholds_p_values_for_few_positives(tmp_path):
    rng = np.random.default_rng(2)
    n = 240
    images = [f"/d/{i}.png" for i in range(n)]
    patients = [f"P{i // 4}" for i in range(n)]  # 60 patients of 4 images
    lab = np.zeros((n, 2))
    lab[:, 0] = np.repeat(np.arange(60) % 2 == 0, 4)  # 30 positive patients, 30 negative
    lab[:8, 1] = 1  # 8 positive images in 2 patients
    pa, pb = lab + rng.normal(size=(n, 2)), lab + rng.normal(size=(n, 2))

    def write(path, probs):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "patient_id", "A_prob", "A_label", "B_prob", "B_label"])
            for i in range(n):
                w.writerow([images[i], patients[i], repr(float(probs[i, 0])), int(lab[i, 0]), repr(float(probs[i, 1])), int(lab[i, 1])])
        return str(path)

    a, b = write(tmp_path / "a.csv", pa), write(tmp_path / "b.csv", pb)
    res = compare_predictions(a, b, n_bootstrap=200, seed=0)
    assert res["settings"]["ci_unit"] == "patient" and res["settings"]["n_patients"] == 60
    want = delong_test(lab[:, 0] == 1, pa[:, 0], pb[:, 0], patient_ids=patients)
    assert res["per_class"][0]["delong_p"] == want.p_value and res["per_class"][0]["bootstrap_p"] is not None
    few = res["per_class"][1]
    assert few["positive_units"] == 2 and few["delong_p"] is None and few["bootstrap_p"] is None
    assert few["bootstrap_ci"] is None and few["difference"] is not None and "fewer than 20" in few["reason"]
    assert res["macro"]["classes"] == ["A"] and "B" in res["macro"]["excluded"]
    # the same resamples by hand: patients drawn, every image of each
    boot = paired_bootstrap(lab[:, :1], pa[:, :1], pb[:, :1], n_bootstrap=200, seed=0, patient_ids=patients)
    assert res["per_class"][0]["bootstrap_ci"] == boot.ci[0]
