"""Calibration: ECE, MCE and Brier score against hand-worked and scikit-learn figures; temperature scaling
against a brute-force search and a known miscalibration."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from hmn.evaluation import compute_report
from hmn.evaluation.calibration import apply_temperature, calibration_report, fit_temperature, load_temperatures


def test_hand_worked_ece_mce_brier():
    p = np.array([[0.05], [0.15], [0.95], [0.85]])
    y = np.array([[0], [1], [1], [1]])
    row = calibration_report(p, y, ["x"], n_bins=10)["per_class"][0]
    # one image per bin: gaps 0.05, 0.85, 0.05, 0.15, each weighted 1/4
    assert row["ece"] == pytest.approx((0.05 + 0.85 + 0.05 + 0.15) / 4)
    assert row["mce"] == pytest.approx(0.85)
    assert row["brier"] == pytest.approx((0.05**2 + 0.85**2 + 0.05**2 + 0.15**2) / 4)


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_matches_sklearn_calibration_curve(n_bins):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(500, 2)) ** np.array([1.0, 2.0])
    y = (rng.uniform(size=(500, 2)) < p**0.7).astype(float)
    y[:40, 1] = -1  # unknown labels are left out
    cal = calibration_report(p, y, ["a", "b"], n_bins=n_bins)
    for k in range(2):
        known = y[:, k] >= 0
        pk, yk = p[known, k], y[known, k]
        prob_true, prob_pred = calibration_curve(yk, pk, n_bins=n_bins, strategy="uniform")
        counts, _ = np.histogram(pk, bins=np.linspace(0, 1, n_bins + 1))
        counts = counts[counts > 0]
        expected = float(np.sum(counts / pk.size * np.abs(prob_true - prob_pred)))
        row = cal["per_class"][k]
        assert row["n"] == known.sum()
        assert row["ece"] == pytest.approx(expected, abs=1e-12)
        assert row["mce"] == pytest.approx(np.max(np.abs(prob_true - prob_pred)), abs=1e-12)
        assert row["brier"] == pytest.approx(brier_score_loss(yk, pk), abs=1e-12)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_temperature_matches_a_brute_force_search_and_recovers_a_known_one():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, size=4000)
    y = (rng.uniform(size=z.size) < _sigmoid(z)).astype(float)
    over = _sigmoid(3.0 * z)  # a model whose logits are three times too large
    fitted = fit_temperature(over[:, None], y[:, None])[0]
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 20001))
    losses = [log_loss(y, _sigmoid(np.log(over / (1 - over)) / t), labels=[0, 1]) for t in grid[::20]]
    best = grid[::20][int(np.argmin(losses))]
    assert fitted == pytest.approx(best, rel=0.01)
    assert fitted == pytest.approx(3.0, rel=0.1)
    scaled = apply_temperature(over[:, None], [fitted])
    # the order of the scores, hence the AUC, is unchanged; the calibration improves
    assert roc_auc_score(y, scaled[:, 0]) == pytest.approx(roc_auc_score(y, over))
    before = calibration_report(over[:, None], y[:, None], ["x"])["per_class"][0]["ece"]
    after = calibration_report(scaled, y[:, None], ["x"])["per_class"][0]["ece"]
    assert after < before / 3


def test_temperature_file_round_trip_and_errors(tmp_path):
    from hmn.evaluation import write_report

    rng = np.random.default_rng(2)
    p = rng.uniform(0.01, 0.99, size=(200, 2))
    y = (rng.uniform(size=(200, 2)) < p).astype(float)
    y[:, 1] = 1  # no negative label: no temperature can be fitted
    report = compute_report(p, y, ["a", "b"], n_bootstrap=0)
    paths = write_report(report, p, y, [f"i{i}" for i in range(200)], ["a", "b"], tmp_path)
    t = load_temperatures(paths["metrics_json"], ["b", "a"])
    assert np.isnan(t[0]) and t[1] == report["calibration"]["per_class"][0]["temperature_fitted"]
    assert np.array_equal(apply_temperature(p, [np.nan, np.nan]), p)
    with pytest.raises(ValueError, match="no temperatures for classes \\['c'\\]"):
        load_temperatures(paths["metrics_json"], ["a", "c"])
    with pytest.raises(ValueError, match="must be positive"):
        apply_temperature(p, [1.0, -2.0])
    with pytest.raises(ValueError, match="3 temperatures"):
        apply_temperature(p, [1.0, 1.0, 1.0])


def test_applied_temperature_is_recorded_with_the_ece_before():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, size=(1000, 1))
    y = (rng.uniform(size=z.shape) < _sigmoid(z)).astype(float)
    raw = _sigmoid(2.5 * z)
    scaled = apply_temperature(raw, [2.5])
    report = compute_report(scaled, y, ["x"], n_bootstrap=0, temperatures=[2.5], temperatures_from="val/metrics.json",
                            uncalibrated=raw)
    cal = report["calibration"]
    assert cal["temperature_applied_from"] == "val/metrics.json"
    row = cal["per_class"][0]
    assert row["temperature_applied"] == 2.5
    assert row["ece_before_temperature"] == calibration_report(raw, y, ["x"])["per_class"][0]["ece"]
    assert row["ece"] < row["ece_before_temperature"]
