"""The engines' run behaviour the bundles add to MONAI's workflows: what MONAI lacks for training, evaluating
and resuming a run (formerly ``hmn.training``).

Everything here is referenced from the bundle configs (``bundles/<name>/configs/*.json``) by ``_target_`` or
``$hmn.workflows...`` expressions, so a downloaded bundle needs only the installed package.

* :mod:`hmn.workflows.data` -> the datalist (demo default), class names, validation check, datasets, cache plan.
* :mod:`hmn.workflows.devices` -> booleans, autocast, channels-last, CPU bfloat16, loader workers, the rank.
* :mod:`hmn.workflows.resume` -> the full-state checkpoints and resuming from the newest readable one.
* :mod:`hmn.workflows.selection` -> the best-model and early-stopping records carried in checkpoints.
* :mod:`hmn.workflows.history` -> the per-epoch ``history.csv`` (training loss, validation metrics) and its plot.
* :mod:`hmn.workflows.estimate` -> the logged estimate of how long the whole run takes.
* :mod:`hmn.workflows.report` -> the test-split evaluation that ends a training run.
* :mod:`hmn.workflows.lifecycle` -> :class:`TrainingRun`, a training run's start and end attached to its trainer.
* :mod:`hmn.workflows.stop` -> SIGINT/SIGTERM caught for a graceful stop, and the command that continues the run.
"""

from __future__ import annotations

from .data import (
    AUTO_CACHE_SHARE,
    CACHE_MODES,
    CACHE_RESIDENT_FACTOR,
    available_memory,
    cache_plan,
    check_validation_split,
    class_names,
    label_tensor,
    ResumableSampler,
    make_dataset,
    pos_weight,
    resolve_datalist,
)
from .devices import (
    AMP_DTYPES,
    CPUAutocastInferer,
    amp_kwargs,
    as_bool,
    cpu_bf16_supported,
    default_num_workers,
    drop_last_batch,
    pretrained_given,
    rank_world,
    to_device,
    worker_ignores_stop_signals,
)
from .estimate import ProgressLog, ProgressReport, RunTimeEstimate
from .history import EpochLoss, MetricHistory, plot_history, trim_history
from .lifecycle import FINAL_MODEL_NAME, TrainingRun, unwrapped_state_dict
from .report import evaluate_after_training
from .resume import (
    MID_EPOCH_PREFIX,
    ResumeFromLatest,
    checkpoints_by_epoch,
    full_state_checkpoints,
    latest_checkpoint,
    mid_epoch_checkpoints,
    set_aside,
)
from .stop import TrainingStopped
from .selection import BestModelRecord, EarlyStopRecord

__all__ = [
    "AMP_DTYPES",
    "AUTO_CACHE_SHARE",
    "BestModelRecord",
    "CACHE_MODES",
    "CACHE_RESIDENT_FACTOR",
    "CPUAutocastInferer",
    "EarlyStopRecord",
    "EpochLoss",
    "FINAL_MODEL_NAME",
    "MID_EPOCH_PREFIX",
    "MetricHistory",
    "ProgressLog",
    "ProgressReport",
    "ResumableSampler",
    "ResumeFromLatest",
    "RunTimeEstimate",
    "TrainingRun",
    "TrainingStopped",
    "amp_kwargs",
    "as_bool",
    "available_memory",
    "cache_plan",
    "check_validation_split",
    "checkpoints_by_epoch",
    "class_names",
    "cpu_bf16_supported",
    "default_num_workers",
    "drop_last_batch",
    "evaluate_after_training",
    "full_state_checkpoints",
    "label_tensor",
    "latest_checkpoint",
    "make_dataset",
    "mid_epoch_checkpoints",
    "plot_history",
    "pos_weight",
    "pretrained_given",
    "rank_world",
    "resolve_datalist",
    "set_aside",
    "to_device",
    "trim_history",
    "unwrapped_state_dict",
    "worker_ignores_stop_signals",
]
