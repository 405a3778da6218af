"""Train, evaluate and predict with a bundle from Python, each call returning its results.

For research pipelines that call a bundle from a program rather than the command line. Each function builds
the bundle's workflow with ``monai.bundle.create_workflow`` (the same configs and overrides as
``python -m monai.bundle run``), runs it, finalizes it (releasing the models folder's lock) even when it fails,
and returns what the run produced, read from the objects that produced it::

    import hmn.api

    report = hmn.api.evaluate("bundles/convnext_tiny", datalist="data/datalist.json", bundle_root="runs/site1")
    report["macro"]["auc"], report["per_class"][0]["auc"]       # as runs/eval/metrics.json holds them

    rows = hmn.api.predict("bundles/convnext_tiny", input="new_images/", bundle_root="runs/site1")
    rows[0]["image"], rows[0]["Effusion"]                       # as the predictions CSV holds them

A call writes what the same command would write (checkpoints and ``runs/`` for training, the report folder for
evaluation, the predictions CSV for inference) and nothing else; pass ``datalist`` (training, evaluation) so
that the demo data set is not written as the default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["evaluate", "predict", "train"]

logger = logging.getLogger(__name__)


def _config_files(bundle: str | os.PathLike, *names: str) -> list[str]:
    """The config files `names` of `bundle` (a bundle folder, or its ``configs/`` folder)."""
    folder = Path(bundle)
    if (folder / "configs").is_dir():
        folder = folder / "configs"
    files = [folder / f"{n}.json" for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle} is not a bundle folder: {', '.join(missing)} not found (give the folder "
                                "that holds configs/train.json, configs/evaluate.json and configs/inference.json)")
    return [str(f) for f in files]


def _run(files: list[str], workflow_type: str, overrides: dict[str, Any]) -> Any:
    """Builds, checks, runs and finalizes the workflow; returns it (finalized)."""
    from monai.bundle import create_workflow

    # bundle_root defaults to the bundle folder (what the configs name relative to), as on the command line
    overrides.setdefault("bundle_root", str(Path(files[0]).parent.parent))
    workflow = create_workflow(config_file=files if len(files) > 1 else files[0], workflow_type=workflow_type,
                               **overrides)
    try:
        workflow.run()
    finally:
        workflow.finalize()
    return workflow


def _find(items: Any, cls: type) -> Any:
    for item in items or []:
        if isinstance(item, cls):
            return item
    return None


def train(bundle: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Trains `bundle` (its ``configs/train.json``) with `overrides` (config ids, as ``--key value`` on the command
    line: ``datalist``, ``bundle_root``, ``max_epochs``, ``image_size``, ...).

    Returns:
        ``{"model": path of model.pt or None, "final_model": path of model_final.pt, "run_record": path of
        run.json, "best_metric": the best validation macro ROC AUC (float, or None without a validation),
        "best_epoch": its epoch, "epochs": epochs trained, "history": [{"epoch", "elapsed_s", "train_loss",
        "val_auc", ...} per epoch, numbers as floats], "test_report": the test split's report (the dict
        ``runs/eval/metrics.json`` holds) or None when not evaluated}``.

    Raises:
        FileNotFoundError: `bundle` has no ``configs/train.json``.
        hmn.workflows.TrainingStopped: Ctrl-C or SIGTERM stopped the training gracefully (a ``SystemExit`` with
            status 130 or 143; its ``checkpoint`` and ``command`` say what is saved and how to continue: call this
            again with ``resume=True``).
        Whatever the run raises (the bundle's own errors name the file or setting at fault).
    """
    from hmn.handlers import EvaluationReportHandler

    workflow = _run(_config_files(bundle, "train"), "train", dict(overrides))
    parser = workflow.parser
    trainer, evaluator = parser.get_parsed_content("train#trainer"), parser.get_parsed_content("validate#evaluator")
    run = parser.get_parsed_content("train#run")
    ckpt_dir = parser.get_parsed_content("ckpt_dir")
    history_file = os.path.join(parser.get_parsed_content("output_dir"), "history.csv")
    report = None
    if run.evaluated:
        handler = _find(parser.get_parsed_content("test#evaluator#val_handlers"), EvaluationReportHandler)
        report = None if handler is None else handler.report
    model = os.path.join(ckpt_dir, "model.pt")
    best = getattr(evaluator.state, "best_metric", None)
    return {
        "model": model if os.path.isfile(model) else None,
        "final_model": run.final_model_path,
        "run_record": os.path.join(ckpt_dir, "run.json"),
        "best_metric": None if best is None or best == -1 else float(best),
        "best_epoch": getattr(evaluator.state, "best_metric_epoch", None),
        "epochs": int(trainer.state.epoch),
        "history": _read_history(history_file),
        "test_report": report,
    }


def _read_history(path: str) -> list[dict[str, Any]]:
    import csv

    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for k, v in row.items():
            try:
                parsed[k] = int(v) if k == "epoch" else float(v)
            except (TypeError, ValueError):
                parsed[k] = v
        out.append(parsed)
    return out


def evaluate(bundle: str | os.PathLike, **overrides: Any) -> dict[str, Any]:
    """Evaluates the bundle's ``models/model.pt`` (under ``bundle_root``) on a split of a datalist
    (``configs/train.json`` + ``configs/evaluate.json``) with `overrides` (``datalist``, ``eval_split``,
    ``bundle_root``, ``thresholds``, ``n_bootstrap``, ...).

    Returns:
        The report: the dict ``<eval_dir>/metrics.json`` holds (``macro``, ``micro``, ``per_class`` with ROC AUC,
        bootstrap intervals and thresholds, ``settings``, ...), also written there with the predictions and plots.

    Raises:
        FileNotFoundError: `bundle` has no ``configs/evaluate.json``, or the model file is missing.
        RuntimeError: the evaluation wrote no report (no image could be evaluated).
        Whatever the run raises (the bundle's own errors name the file or setting at fault).
    """
    from hmn.handlers import EvaluationReportHandler

    workflow = _run(_config_files(bundle, "train", "evaluate"), "eval", dict(overrides))
    handler = _find(workflow.parser.get_parsed_content("validate#handlers"), EvaluationReportHandler)
    if handler is None or handler.report is None:
        raise RuntimeError(f"the evaluation of {bundle} wrote no report: no image could be evaluated (see the log)")
    return handler.report


def predict(bundle: str | os.PathLike, input: str | os.PathLike, **overrides: Any) -> list[dict[str, Any]]:
    """Predicts the findings of every image under `input` (a file, folder or datalist, as ``--input``) with the
    bundle's ``models/model.pt`` (``configs/inference.json``) and `overrides` (``bundle_root``,
    ``output_file``, ``heatmaps``, ...).

    Returns:
        The rows of the predictions CSV (``output_file``), in its order: ``{"image": path, "error": "" or why the
        image was left out, "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID": the DICOM UIDs ("" for
        other files), <class name>: probability (float, None for an error row), ...}``.

    Raises:
        FileNotFoundError: `bundle` has no ``configs/inference.json``, or the model file is missing.
        Whatever the run raises (the bundle's own errors name the file or setting at fault).
    """
    from hmn.inference import class_columns, read_prediction_rows

    workflow = _run(_config_files(bundle, "inference"), "infer", {**overrides, "input": os.fspath(input)})
    output_file = workflow.parser.get_parsed_content("output_file")
    if not os.path.isfile(output_file):
        return []
    header, rows = read_prediction_rows(output_file)
    out = []
    for row in rows:
        record: dict[str, Any] = dict(zip(header or [], row))
        for name in class_columns(header or []):
            record[name] = float(record[name]) if record[name] != "" else None
        out.append(record)
    return out
