"""The Python API (hmn.api) and MONAI's create_workflow on the bundles: results returned, not only written."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "convnext_tiny"
SIZE = 64


def _same(a, b) -> bool:
    """Equal as JSON values, NaN equal to NaN (a class without positives has no AUC)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def model_copy(trained, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("runs"))
    return root


def test_evaluate_returns_the_report_metrics_json_holds(model_copy, demo_datalist):
    import hmn.api

    report = hmn.api.evaluate(BUNDLE, datalist=demo_datalist, bundle_root=str(model_copy), n_bootstrap=50,
                              num_workers=0)
    written = json.loads((model_copy / "runs" / "eval" / "metrics.json").read_text())
    assert _same(json.loads(json.dumps(report)), written)
    test_images = json.loads(Path(demo_datalist).read_text())["test"]
    assert report["n_images"] == len(test_images)
    assert [c["class"] for c in report["per_class"]] == json.loads(Path(demo_datalist).read_text())["class_names"]
    assert not (model_copy / "models" / ".hmn.lock").exists()


def test_predict_returns_the_rows_of_the_predictions_csv(model_copy, demo_datalist):
    import hmn.api

    from hmn.data import load_datalist

    images = [e["image"] for e in load_datalist(demo_datalist)["test"][:6]]
    folder = model_copy / "new_images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / Path(path).name)
    out = model_copy / "out" / "predictions.csv"
    rows = hmn.api.predict(BUNDLE, input=str(folder), bundle_root=str(model_copy), output_file=str(out), num_workers=0)
    with open(out, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(rows) == len(written) == len(images)
    classes = json.loads((model_copy / "models" / "run.json").read_text())["settings"]["class_names"]
    for row, line in zip(rows, written):
        assert row["image"] == line["image"] and row["error"] == ""
        assert [row[c] for c in classes] == [float(line[c]) for c in classes]
        assert all(0.0 <= row[c] <= 1.0 for c in classes)


def test_train_returns_the_run_and_its_test_report(demo_datalist, tmp_path):
    import hmn.api

    from hmn.data import load_datalist

    data = load_datalist(demo_datalist)
    small = {"class_names": data["class_names"], "training": data["training"][:8], "validation": data["validation"][:6],
             "test": data["test"][:4]}
    datalist = tmp_path / "small.json"
    datalist.write_text(json.dumps(small))
    result = hmn.api.train(BUNDLE, datalist=str(datalist), bundle_root=str(tmp_path / "run"), max_epochs=2,
                           image_size=SIZE, batch_size=4, num_workers=0, cache="none")
    with open(tmp_path / "run" / "runs" / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert result["epochs"] == 2 and [r["epoch"] for r in result["history"]] == [1, 2] == [int(r["epoch"]) for r in history]
    aucs = [float(r["val_auc"]) for r in history]
    assert result["best_metric"] == pytest.approx(max(aucs), abs=1e-6)
    assert result["best_epoch"] == 1 + aucs.index(max(aucs))
    assert Path(result["model"]).is_file() and Path(result["final_model"]).is_file() and Path(result["run_record"]).is_file()
    written = json.loads((tmp_path / "run" / "runs" / "eval" / "metrics.json").read_text())
    assert result["test_report"] is not None and _same(json.loads(json.dumps(result["test_report"])), written)
    assert written["n_images"] == len(small["test"])


@pytest.mark.parametrize("workflow_type, files", [("eval", ["train", "evaluate"]), ("infer", ["inference"])])
def test_create_workflow_of_the_eval_and_infer_types_passes_check_properties(workflow_type, files, model_copy,
                                                                              demo_datalist):
    from monai.bundle import create_workflow

    config = [str(BUNDLE / "configs" / f"{f}.json") for f in files]
    workflow = create_workflow(config_file=config if len(config) > 1 else config[0], workflow_type=workflow_type,
                               bundle_root=str(model_copy), datalist=demo_datalist, input=demo_datalist)
    assert workflow.check_properties() in (None, [])
    assert workflow.evaluator is not None and len(workflow.dataset) > 0
