"""Experiment tracking: what a run puts in MLflow (MONAI's ``--tracking mlflow``) and TensorBoard beyond the
loss and the key metric.

MONAI's ``--tracking mlflow`` appends its ``MLFlowHandler`` to the bundle's ``train#handlers`` and
``validate#handlers``; alone it records the iteration loss, the learning rate, the validation key metric, two
engine attributes as params and the executed config as an artifact. The handlers here complete the record
through those same MLflow runs (nothing happens without ``--tracking``):

* :class:`EpochScalars` (trainer): the epoch's mean training loss and learning rate into the trainer's
  ``state.metrics`` at the end of each epoch, so that MLflow's and TensorBoard's epoch logs carry them;
* :class:`PerFindingAUC` (validator): each finding's validation ROC AUC as ``val_auc/<finding>`` beside the
  macro ``val_auc``, for MLflow, TensorBoard and the console alike (``history.csv`` keeps the macro only);
* :class:`TrackTraining` (trainer): the run's recorded settings (``models/run.json``) as MLflow params when the
  run starts; when it completes, the test split's report (``runs/eval/metrics.json``: macro and micro AUC, each
  finding's AUC, AP, sensitivity and specificity at its threshold) as ``test_*`` metrics, and ``model.pt``,
  ``run.json``, ``thresholds.json``, ``model_final.pt``, ``history.csv``/``.png`` and the report files as
  artifacts;
* :class:`TrackEvaluation` (the evaluator of ``evaluate.json``): the report's metrics and files, then closes the
  MLflow run MONAI's validator handler opened (MONAI leaves it ``RUNNING``).

The MLflow runs are MONAI's (found among the engine's event handlers), so one training is one MLflow run, under
the ``tracking_uri``, ``experiment_name`` and ``run_name`` the user gives MONAI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["EpochScalars", "PerFindingAUC", "TrackEvaluation", "TrackTraining", "close_failed", "flat_params",
           "mlflow_handlers", "mlflow_name", "open_new_run", "report_metrics"]

logger = logging.getLogger(__name__)


def mlflow_handlers(engine: Any) -> list[Any]:
    """The ``monai.handlers.MLFlowHandler`` objects attached to `engine` (none without ``--tracking mlflow``)."""
    try:
        from ignite.engine import Events
        from monai.handlers import MLFlowHandler
    except ImportError:  # mlflow not installed: MONAI's handler cannot have been attached either
        return []
    found: list[Any] = []
    for handler, _, _ in getattr(engine, "_event_handlers", {}).get(Events.STARTED, []):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, MLFlowHandler) and owner not in found:
            found.append(owner)
    return found


def mlflow_name(name: Any) -> str:
    """`name` as a valid MLflow metric name: characters other than letters, digits, ``_-. :/`` become ``_``."""
    return re.sub(r"[^\w.\- :/]", "_", str(name))


def flat_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`settings` as MLflow params: nested mappings flattened with ``.`` (``backbone_options.norm``), lists and
    other values as their JSON text (MLflow keeps params as text, at most 6000 characters each)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:6000]
    return out


def report_metrics(report: Mapping[str, Any], prefix: str = "test_") -> dict[str, float]:
    """The numbers of an evaluation report (``metrics.json``) worth a metric: ``<prefix>macro_auc``,
    ``<prefix>micro_auc``, the macro AP, sensitivity and specificity, and per finding ``<prefix>auc/<finding>``,
    ``<prefix>average_precision/<finding>``, ``<prefix>sensitivity/<finding>``, ``<prefix>specificity/<finding>``.
    Values that are null (undefined for the split) are left out; finding names are made valid MLflow names
    (characters other than letters, digits, ``_-. :/`` become ``_``)."""
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + name] = float(value)

    for scope in ("macro", "micro"):
        section = report.get(scope) or {}
        for key in ("auc", "average_precision", "sensitivity", "specificity"):
            put(f"{scope}_{key}", section.get(key))
    for row in report.get("per_class") or []:
        for key in ("auc", "average_precision", "sensitivity", "specificity"):
            put(f"{key}/{mlflow_name(row.get('class'))}", row.get(key))
    return out


def open_new_run(handlers: Sequence[Any]) -> None:
    """Gives MONAI's MLflow handlers of one workflow (trainer and validator) one new MLflow run, unless they have
    one already. Alone, MONAI's handler continues the newest unfinished run of the same ``run_name`` (or, without
    a name, any unfinished run of the experiment): a run that stopped with an error would get the next run's
    metrics mixed into its own."""
    open_ = [h for h in handlers if h.cur_run is not None]
    if open_:
        run = open_[0].cur_run
    else:
        first = handlers[0]
        first._set_experiment()
        if not first.experiment:
            return  # MONAI's start raises, naming the experiment
        name = first.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        run = first.client.create_run(experiment_id=first.experiment.experiment_id, run_name=name)
    for handler in handlers:
        if handler.cur_run is None:
            handler.cur_run = run


def close_failed(handlers: Sequence[Any], status: str = "FAILED") -> None:
    """Ends the MLflow runs of `handlers` with `status`: ``FAILED`` (a run stopped by an error) or ``KILLED``
    (a graceful stop by Ctrl-C or SIGTERM)."""
    done = set()
    for handler in handlers:
        run = handler.cur_run
        if run is not None and run.info.run_id not in done:
            done.add(run.info.run_id)
            try:
                handler.client.set_terminated(run.info.run_id, status=status)
            except Exception as e:  # noqa: BLE001 - the run's own error is what the user must see
                logger.warning("could not mark MLflow run %s as %s: %s", run.info.run_id, status, e)
        handler.cur_run = None


def _log_metrics(handler: Any, metrics: Mapping[str, float], step: int) -> None:
    import time

    import mlflow

    if not metrics or handler.cur_run is None:
        return
    stamp = int(time.time() * 1000)
    batch = [mlflow.entities.Metric(k, float(v), stamp, int(step)) for k, v in metrics.items()]
    for i in range(0, len(batch), 900):  # MLflow takes at most 1000 metrics per batch
        handler.client.log_batch(run_id=handler.cur_run.info.run_id, metrics=batch[i:i + 900], params=[], tags=[])


def _log_files(handler: Any, paths: Sequence[str], artifact_path: str | None = None) -> list[str]:
    logged = []
    if handler.cur_run is None:
        return logged
    for path in paths:
        if os.path.isfile(path):
            handler.client.log_artifact(handler.cur_run.info.run_id, path, artifact_path)
            logged.append(path)
    return logged


class EpochScalars:
    """Trainer handler: at the end of each epoch, ``state.metrics["train_loss_epoch"]`` (the mean training loss of
    the epoch, from an :class:`hmn.workflows.history.EpochLoss`) and ``state.metrics["learning_rate"]`` (the first
    parameter group's, at the epoch's end). Attach it before the tracking handlers (MLflow, TensorBoard) that log
    the trainer's epoch metrics.

    Args:
        epoch_loss: the trainer's ``EpochLoss``.
    """

    def __init__(self, epoch_loss: Any) -> None:
        self.epoch_loss = epoch_loss

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        mean = self.epoch_loss.mean() if self.epoch_loss is not None else None
        if mean is not None:
            engine.state.metrics["train_loss_epoch"] = float(mean)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            engine.state.metrics["learning_rate"] = float(optimizer.param_groups[0]["lr"])


class PerFindingAUC:
    """Validator handler: each finding's ROC AUC of the epoch, from the key metric
    (:class:`hmn.handlers.MacroROCAUC`, which keeps them), as ``state.metrics["val_auc/<finding>"]``. Findings
    without a positive and a negative label in the split have no AUC and no entry. Attach it before the handlers
    that log the validator's metrics (StatsHandler, TensorBoardStatsHandler, MLflow).

    Args:
        metric: the validator's ``MacroROCAUC``.
        class_names: the network's class names, in output order.
        prefix: the metrics' name before ``/<finding>``.
    """

    def __init__(self, metric: Any, class_names: Sequence[str], prefix: str = "val_auc") -> None:
        self.metric, self.prefix = metric, prefix
        # MLflow accepts letters, digits, "_", "-", ".", " ", ":" and "/" in a metric's name: others become "_"
        self.class_names = [mlflow_name(c) for c in class_names]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        for index, value in sorted((getattr(self.metric, "per_class", None) or {}).items()):
            if index < len(self.class_names):
                engine.state.metrics[f"{self.prefix}/{self.class_names[index]}"] = float(value)


class TrackTraining:
    """Trainer handler: the run's settings, test metrics and files in the MLflow run of MONAI's ``--tracking
    mlflow`` (see the module docstring); nothing without it. Place it in ``train#handlers`` after the handler that
    writes the run record and evaluates the test split when training ends (:class:`hmn.workflows.lifecycle.TrainingRun`),
    and before MONAI's ``MLFlowHandler`` (which ``--tracking`` appends at the end of the list).

    Each start of the trainer gets a new MLflow run, shared with the validator's handler (see
    :func:`open_new_run`); an error that stops the run ends it with the status ``FAILED`` (and is raised on), a
    graceful stop (Ctrl-C, SIGTERM) with ``KILLED``.

    Args:
        ckpt_dir: the models folder (``run.json``, ``model.pt``, ``thresholds.json``, ``model_final.pt``).
        output_dir: the run's folder (``history.csv``, ``history.png``, ``eval/`` with the test report).
        report_dir: the test report's folder (default ``<output_dir>/eval``).
        validator: the validation evaluator, whose MLflow handler records into the same run.
    """

    def __init__(self, ckpt_dir: str, output_dir: str, report_dir: str | None = None, validator: Any = None) -> None:
        self.ckpt_dir, self.output_dir = os.fspath(ckpt_dir), os.fspath(output_dir)
        self.report_dir = os.fspath(report_dir) if report_dir else os.path.join(self.output_dir, "eval")
        self.validator = validator

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)
        engine.add_event_handler(Events.TERMINATE, self.terminated)

    def _handlers(self, engine: Any) -> list[Any]:
        return mlflow_handlers(engine) + (mlflow_handlers(self.validator) if self.validator is not None else [])

    def terminated(self, engine: Any) -> None:
        """A graceful stop (Ctrl-C or SIGTERM: the trainer terminated without its end, ``skip_completed``) ends the
        MLflow run as ``KILLED``; the resumed run gets a new one. Early stopping ends the run normally."""
        if engine.should_terminate == "skip_completed":
            close_failed(self._handlers(engine), status="KILLED")

    def failed(self, engine: Any, e: BaseException) -> None:
        """Ends the MLflow run as ``FAILED``, then raises `e` on (ignite passes an engine's exception to this event's
        handlers instead of raising it)."""
        close_failed(self._handlers(engine))
        raise e

    def started(self, engine: Any) -> None:
        """Opens a new MLflow run for the trainer's and the validator's handlers, and hands the run record's
        settings to MONAI's handler as its ``experiment_param`` (it logs them as params when it starts, right
        after this)."""
        handlers = mlflow_handlers(engine)
        if not handlers:
            return
        open_new_run(self._handlers(engine))
        from hmn.runs import read_run_record

        record = read_run_record(self.ckpt_dir) or {}
        params = flat_params(record.get("settings") or {})
        for handler in handlers:
            known = dict(handler.experiment_param or {})
            handler.experiment_param = {**params, **known}

    def completed(self, engine: Any) -> None:
        """Logs the test report's metrics and the run's files (the report is written by then)."""
        handlers = mlflow_handlers(engine)
        if not handlers:
            return
        report_path = os.path.join(self.report_dir, "metrics.json")
        report = {}
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
        models = [os.path.join(self.ckpt_dir, n) for n in ("model.pt", "run.json", "thresholds.json", "model_final.pt")]
        history = [os.path.join(self.output_dir, n) for n in ("history.csv", "history.png")]
        reports = sorted(os.path.join(self.report_dir, n) for n in os.listdir(self.report_dir)) if os.path.isdir(self.report_dir) else []
        for handler in handlers:
            _log_metrics(handler, report_metrics(report), int(engine.state.epoch))
            _log_files(handler, models, "models")
            _log_files(handler, history, "runs")
            _log_files(handler, reports, "runs/eval")


class TrackEvaluation:
    """Evaluator handler of ``evaluate.json``: when the evaluation completes, the report's metrics (as
    :func:`report_metrics` with the prefix ``eval_``) and files go into the MLflow run of MONAI's ``--tracking
    mlflow``, and that run is closed (MONAI's validator handler leaves it open). Place it after the report handler
    (:class:`hmn.handlers.EvaluationReportHandler`).

    Args:
        report_dir: the report's folder (``eval_dir``).
        prefix: the metrics' prefix.
    """

    def __init__(self, report_dir: str, prefix: str = "eval_") -> None:
        self.report_dir, self.prefix = os.fspath(report_dir), prefix

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.failed)

    def started(self, engine: Any) -> None:
        """A new MLflow run for each evaluation (see :func:`open_new_run`)."""
        handlers = mlflow_handlers(engine)
        if handlers:
            open_new_run(handlers)

    def failed(self, engine: Any, e: BaseException) -> None:
        """Ends the MLflow run as ``FAILED``, then raises `e` on."""
        close_failed(mlflow_handlers(engine))
        raise e

    def __call__(self, engine: Any) -> None:
        handlers = mlflow_handlers(engine)
        if not handlers:
            return
        report_path = os.path.join(self.report_dir, "metrics.json")
        report = {}
        if os.path.isfile(report_path):
            with open(report_path, encoding="utf-8") as f:
                report = json.load(f)
        files = sorted(os.path.join(self.report_dir, n) for n in os.listdir(self.report_dir)) if os.path.isdir(self.report_dir) else []
        for handler in handlers:
            _log_metrics(handler, report_metrics(report, self.prefix), 0)
            _log_files(handler, files, "eval")
            handler.close()
