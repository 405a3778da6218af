"""MONAI's ``--tracking mlflow`` on the bundles: the run's settings, per-epoch scalars, per-finding AUCs, the test
metrics and the run's files reach MLflow, and every MLflow run the bundle opens is closed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow", reason="MLflow is an optional extra: pip install -e '.[tracking]'")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--cache", "none"]


def _bundle(run_id: str, configs: list[str], *overrides: str) -> list[str]:
    files = [f"bundles/convnext_tiny/configs/{c}.json" for c in configs]
    config = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]


def _run(cmd: list[str], env: dict) -> None:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-5000:]}"


def test_training_and_evaluation_are_recorded_in_mlflow(demo_datalist, tmp_path):
    from mlflow import MlflowClient

    from hmn.data import load_datalist

    data = load_datalist(demo_datalist)
    small = {"class_names": data["class_names"], "training": data["training"][:8],
             "validation": data["validation"][:8], "test": data["test"][:6]}
    datalist = tmp_path / "small.json"
    datalist.write_text(json.dumps(small))
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"  # a local store, as MONAI's default (<output_dir>/mlruns.db)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    root = tmp_path / "run"
    # min_positives 1: the small test split's findings all enter the macro averages
    track = ["--tracking", "mlflow", "--tracking_uri", store, "--experiment_name", "hmn_test", "--min_positives", "1"]
    _run(_bundle("training", ["train"], "--datalist", str(datalist), "--bundle_root", str(root), "--max_epochs", "2",
                 *SMALL, *track, "--run_name", "train_run"), env)
    _run(_bundle("evaluating", ["train", "evaluate"], "--datalist", str(datalist), "--bundle_root", str(root),
                 "--n_bootstrap", "20", *SMALL, *track, "--run_name", "eval_run"), env)

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("hmn_test")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"train_run", "eval_run"}
    assert all(r.info.status == "FINISHED" for r in runs.values())  # every run the bundle opened is closed

    train = runs["train_run"]
    record = json.loads((root / "models" / "run.json").read_text())["settings"]
    params = train.data.params
    for key in ("image_size", "learning_rate", "batch_size", "backbone", "datalist", "max_epochs"):
        assert key in record, key
        value = record[key]
        assert params[key] == (value if isinstance(value, str) else json.dumps(value)), key

    def history(name):
        return [m.value for m in sorted(client.get_metric_history(train.info.run_id, name), key=lambda m: m.step)]

    rows = [r.split(",") for r in (root / "runs" / "history.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert history("val_auc") == pytest.approx([float(r[header.index("val_auc")]) for r in rows], abs=1e-6)
    assert history("train_loss_epoch") == pytest.approx([float(r[header.index("train_loss")]) for r in rows], rel=1e-5)
    assert len(history("learning_rate")) == 2
    # each finding's validation AUC, averaging to val_auc over the findings that have one
    per_finding = {c: history(f"val_auc/{c}") for c in small["class_names"]}
    defined = [v for v in per_finding.values() if v]
    assert defined and all(len(v) == 2 for v in defined)
    assert sum(v[-1] for v in defined) / len(defined) == pytest.approx(history("val_auc")[-1], abs=1e-6)
    # the end-of-training test report, as runs/eval/metrics.json holds it
    report = json.loads((root / "runs" / "eval" / "metrics.json").read_text())
    assert train.data.metrics["test_macro_auc"] == pytest.approx(report["macro"]["auc"], abs=1e-9)
    for row in report["per_class"]:
        if row["auc"] is not None:
            assert train.data.metrics[f"test_auc/{row['class']}"] == pytest.approx(row["auc"], abs=1e-9)
    artifacts = {a.path for folder in ("models", "runs", "runs/eval")
                 for a in client.list_artifacts(train.info.run_id, folder)}
    assert {"models/model.pt", "models/run.json", "models/thresholds.json", "models/model_final.pt",
            "runs/history.csv", "runs/eval/metrics.json", "runs/eval/predictions.csv"} <= artifacts

    # TensorBoard (runs/) gets the same per-epoch scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (root / "runs").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    expected = {"train_loss_epoch", "learning_rate", "val_auc"} | {f"val_auc/{c}" for c, v in per_finding.items() if v}
    assert expected <= tags, expected - tags

    evaluation = runs["eval_run"]
    eval_report = json.loads((root / "runs" / "eval" / "metrics.json").read_text())  # rewritten by the evaluation
    assert evaluation.data.metrics["eval_macro_auc"] == pytest.approx(eval_report["macro"]["auc"], abs=1e-9)
    assert "eval/metrics.json" in {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval")}


def test_a_run_stopped_by_an_error_is_failed_and_not_continued_by_the_next(tmp_path):
    """MONAI's handler continues the newest unfinished MLflow run of the same name: a run stopped by an error was
    left RUNNING and the next attempt's metrics went into it."""
    from ignite.engine import Engine
    from mlflow import MlflowClient
    from monai.handlers import MLFlowHandler

    from hmn.workflows.tracking import TrackTraining

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"

    def attempt(fail: bool, stop: bool = False) -> None:
        def step(engine, batch):
            if fail and engine.state.iteration == 2:
                raise RuntimeError("disk full")
            if stop and engine.state.iteration == 2:
                engine.terminate(skip_completed=True)  # what a graceful stop (Ctrl-C, SIGTERM) does
            return {"loss": 1.0}

        trainer, validator = Engine(step), Engine(lambda e, b: None)
        TrackTraining(str(tmp_path / "models"), str(tmp_path / "runs"), validator=validator).attach(trainer)
        MLFlowHandler(tracking_uri=store, experiment_name="e", run_name="same", tag_name="loss",
                      output_transform=lambda out: out["loss"], close_on_complete=True).attach(trainer)
        MLFlowHandler(tracking_uri=store, experiment_name="e", run_name="same", iteration_log=False).attach(validator)
        trainer.run(range(3), max_epochs=1)

    with pytest.raises(RuntimeError, match="disk full"):
        attempt(fail=True)
    attempt(fail=False, stop=True)  # issue 28: a graceful stop's run is KILLED, and not continued either
    attempt(fail=False)
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "KILLED", "FINISHED"]
    assert [len(client.get_metric_history(r.info.run_id, "loss")) for r in runs] == [1, 2, 3]
