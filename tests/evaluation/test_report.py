"""write_report: the four files, their columns and values, atomic writing, thresholds reused from metrics.json."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from hmn.evaluation import METRICS_COLUMNS, compute_report, write_report
from hmn.evaluation.report import _roc_figure

CLASSES = ["Cardiomegaly", "Effusion", "Hernia"]


def _data():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) < 0.4).astype(float)
    probs = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(size=(40, 3)))))
    labels[5, 0] = -1  # unknown
    labels[7, 1] = np.nan
    labels[:, 2] = 0  # Hernia: no positives
    ids = [f"/data/img_{i:03d}.png" for i in range(40)]
    return probs, labels, ids


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_files_and_contents(tmp_path):
    probs, labels, ids = _data()
    report = compute_report(probs, labels, CLASSES, n_bootstrap=100, seed=2, thresholds="youden", min_positives=1)
    paths = write_report(report, probs, labels, ids, CLASSES, tmp_path / "out")
    assert sorted(paths) == ["calibration_csv", "metrics_csv", "metrics_json", "operating_points_csv",
                             "predictions_csv", "reliability_png", "roc_png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["calibration.csv", "metrics.csv", "metrics.json",
                                                    "operating_points.csv", "predictions.csv", "reliability.png",
                                                    "roc.png"]

    with open(paths["metrics_json"]) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert saved["settings"]["n_bootstrap"] == 100 and saved["settings"]["seed"] == 2
    assert saved["settings"]["ci"] == 0.95 and saved["settings"]["threshold_method"] == "youden"

    rows = _read(paths["metrics_csv"])
    assert tuple(rows[0]) == METRICS_COLUMNS == (
        "class", "n", "positives", "auc", "auc_ci_low", "auc_ci_high", "average_precision", "ap_ci_low",
        "ap_ci_high", "threshold", "sensitivity", "specificity", "ppv", "npv", "sensitivity_ci_low",
        "sensitivity_ci_high", "specificity_ci_low", "specificity_ci_high", "threshold_source", "ci_unit", "reason",
    )
    assert [r[0] for r in rows[1:]] == CLASSES + ["macro", "micro"]
    # every row says where its thresholds came from and what the intervals resampled
    assert {r[-3] for r in rows[1:]} == {"fitted on the evaluated data (optimistic)"} and {r[-2] for r in rows[1:]} == {"image"}
    table = {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}
    card = table["Cardiomegaly"]
    known = labels[:, 0] >= 0
    assert int(card["n"]) == known.sum() == 39
    assert int(card["positives"]) == (labels[known, 0] == 1).sum()
    assert float(card["auc"]) == report["per_class"][0]["auc"]  # full precision
    assert [float(card["auc_ci_low"]), float(card["auc_ci_high"])] == report["per_class"][0]["auc_ci"]
    assert float(card["threshold"]) == report["per_class"][0]["threshold"]
    hernia = table["Hernia"]
    assert hernia["auc"] == hernia["auc_ci_low"] == hernia["threshold"] == hernia["sensitivity"] == ""
    assert hernia["specificity"] == ""  # no threshold without both label values under "youden"
    assert float(table["macro"]["auc"]) == pytest.approx(np.mean([report["per_class"][c]["auc"] for c in (0, 1)]))
    assert table["macro"]["threshold"] == table["micro"]["threshold"] == ""
    assert int(table["micro"]["n"]) == 40 * 3 - 2

    pred = _read(paths["predictions_csv"])
    assert pred[0] == ["image", "Cardiomegaly_prob", "Cardiomegaly_label", "Effusion_prob", "Effusion_label",
                       "Hernia_prob", "Hernia_label"]
    assert [r[0] for r in pred[1:]] == ids
    got = np.array([[float(r[1]), float(r[3]), float(r[5])] for r in pred[1:]])
    np.testing.assert_array_equal(got, probs)  # lossless
    assert pred[1 + 5][2] == "" and pred[1 + 7][4] == ""  # unknown labels are empty
    assert [r[2] for r in pred[1:4]] == [str(int(v)) for v in labels[:3, 0]]

    with open(paths["roc_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(paths["roc_png"]) > 10_000


def test_roc_legend_names_auc(tmp_path):
    probs, labels, _ = _data()
    report = compute_report(probs, labels, CLASSES, n_bootstrap=50, min_positives=1)
    fig = _roc_figure(report, probs, labels, CLASSES)
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert len(texts) == 3  # two classes with an AUC and the micro average; Hernia has none
    assert texts[0].startswith(f"Cardiomegaly (AUC {report['per_class'][0]['auc']:.3f}, 95% CI ")
    assert texts[-1].startswith(f"micro average (AUC {report['micro']['auc']:.3f}")


def test_rewrites_atomically_and_thresholds_carry_over(tmp_path):
    probs, labels, ids = _data()
    val = compute_report(probs, labels, CLASSES, n_bootstrap=0)
    paths = write_report(val, probs, labels, ids, CLASSES, tmp_path)
    again = write_report(val, probs, labels, ids, CLASSES, tmp_path)  # overwrite in place
    assert again == paths
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    # thresholds picked on "validation" applied to other data via the metrics.json path
    rng = np.random.default_rng(1)
    test_probs = rng.random((30, 3))
    test_labels = (rng.random((30, 3)) < 0.5).astype(float)
    test = compute_report(test_probs, test_labels, CLASSES, thresholds=paths["metrics_json"], n_bootstrap=0)
    assert test["settings"]["threshold_method"] == "given"
    assert test["settings"]["thresholds_from"] == paths["metrics_json"]
    assert [e["threshold"] for e in test["per_class"]] == [e["threshold"] for e in val["per_class"]]
    t = val["per_class"][0]["threshold"]
    pred, y = test_probs[:, 0] >= t, test_labels[:, 0] == 1
    assert test["per_class"][0]["sensitivity"] == pytest.approx((pred & y).sum() / y.sum())


def test_mismatched_inputs_are_rejected(tmp_path):
    probs, labels, ids = _data()
    report = compute_report(probs, labels, CLASSES, n_bootstrap=0)
    with pytest.raises(ValueError, match="39 image_ids for 40 rows"):
        write_report(report, probs, labels, ids[:-1], CLASSES, tmp_path)
    with pytest.raises(ValueError, match="differ from class_names"):
        write_report(report, probs, labels, ids, ["A", "B", "C"], tmp_path)


def test_hmn_report_from_any_predictions_csv_resamples_patients(tmp_path, capsys):
    """`python -m hmn report` on a predictions.csv with a patient_id column: the same report as compute_report with
    those patient ids (so patient-level intervals), written to the folder, with where the thresholds came from."""
    from hmn.__main__ import main as hmn_main
    from hmn.evaluation import compute_report, fit_operating_thresholds

    rng = np.random.default_rng(7)
    n = 90
    patients = [f"P{i // 3}" for i in range(n)]
    labels = np.repeat((rng.random((30, 2)) < 0.4).astype(float), 3, axis=0)
    probs = 1 / (1 + np.exp(-(2 * labels - 1 + rng.normal(size=(n, 2)))))
    path = tmp_path / "vendor.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "patient_id", "sex", "Mass_prob", "Mass_label", "Nodule_prob", "Nodule_label"])
        for i in range(n):
            w.writerow([f"/x/{i}.dcm", patients[i], "MF"[i % 2], repr(float(probs[i, 0])), int(labels[i, 0]),
                        repr(float(probs[i, 1])), int(labels[i, 1])])
    val = tmp_path / "thresholds.json"
    val.write_text(json.dumps(fit_operating_thresholds(probs[::-1], labels[::-1], ["Mass", "Nodule"])))
    out = tmp_path / "rep"
    assert hmn_main(["report", str(path), "--out", str(out), "--n-bootstrap", "200", "--seed", "5",
                     "--thresholds", str(val)]) == 0
    printed = capsys.readouterr().out
    assert "30 patients resampled" in printed and f"given: {val}" in printed
    saved = json.loads((out / "metrics.json").read_text())
    want = compute_report(probs, labels, ["Mass", "Nodule"], thresholds=str(val), n_bootstrap=200, seed=5,
                          patient_ids=patients, groups={"sex": ["MF"[i % 2] for i in range(n)]})
    assert saved["settings"]["ci_unit"] == "patient" and saved["n_patients"] == 30
    assert [e["auc_ci"] for e in saved["per_class"]] == [e["auc_ci"] for e in want["per_class"]]
    assert [e["threshold"] for e in saved["per_class"]] == [e["threshold"] for e in want["per_class"]]
    pred = _read(out / "predictions.csv")
    assert pred[0][:2] == ["image", "patient_id"] and [r[1] for r in pred[1:]] == patients
    assert (out / "subgroups.csv").is_file()
    # a file that is not a predictions.csv: exit 1 and the file named
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert hmn_main(["report", str(bad), "--out", str(tmp_path / "x")]) == 1
    assert "bad.csv" in capsys.readouterr().err


def test_image_names_that_are_not_utf8_are_written(tmp_path):
    """A file name the OS gives that is not UTF-8 (Latin-1 'café', PEP 383 surrogates in Python) is written to
    predictions.csv with the undecodable byte as \\xNN, and the file stays valid UTF-8."""
    probs, labels, ids = _data()
    ids = list(ids)
    ids[3] = os.fsdecode(b"/data/caf\xe9.png")
    report = compute_report(probs, labels, CLASSES, n_bootstrap=0)
    paths = write_report(report, probs, labels, ids, CLASSES, tmp_path)
    with open(paths["predictions_csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert len(rows) == len(ids) + 1 and rows[4][0] == "/data/caf\\xe9.png" and rows[5][0] == ids[4]
