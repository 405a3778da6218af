"""The run record: what defines a trained model, kept beside its checkpoints (``models/run.json``).

A model is more than its weights: its class names, image size, channels, backbone and options, attention,
head and preprocessing decide what the weights mean. Training writes them, with the schedule, to
``run.json`` (atomically, :mod:`hmn.durable`) when it starts, and adds an entry for each resume. The
bundles' evaluate and inference configs, a resumed training run and a packed bundle read the record
through :func:`trained`, so a model is rebuilt as it was trained whatever the configs' defaults say.

An explicit command-line override that contradicts the record is checked by :func:`check_run_record`
before anything runs: a setting that changes what the weights are or mean (:data:`REFUSED`: classes,
channels, backbone and options, attention, pyramid and head) is refused with an error naming both values;
any other (image size, VOI, the schedule on a resume) is honoured with a warning naming both.

Record layout (JSON): ``{"format": 1, "hmn_version", "created", "settings": {...}, "starts": [{"time",
"resume", "changed": {key: [recorded, used]}}]}``; ``settings`` holds the keys of :data:`MODEL_SETTINGS`
and, for training, :data:`SCHEDULE_SETTINGS`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MODEL_SETTINGS",
    "REFUSED",
    "RUN_RECORD",
    "SCHEDULE_SETTINGS",
    "INPUT_SETTINGS",
    "VOLUME_SETTINGS",
    "RunRecordMismatchError",
    "check_classes",
    "check_model_file",
    "check_run_record",
    "input_changes",
    "read_run_record",
    "trained",
    "write_run_record",
]

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
MODEL_SETTINGS = ("class_names", "in_channels", "image_size", "voi", "aspect", "backbone", "backbone_options",
                  "attention", "fpn_channels", "fusion_channels", "num_heads", "context_size", "dropout",
                  "hierarchical", "num_coarse_classes", "label_vocabulary")
# the preprocessing of the 3D (volume) bundles, recorded beside MODEL_SETTINGS (which then lack voi and aspect):
# voxel spacing (mm), "ct" or "mr" intensity, the CT window [center, width] (HU) and the MR percentiles
VOLUME_SETTINGS = ("spacing", "intensity", "window", "percentiles")
SCHEDULE_SETTINGS = ("datalist", "max_epochs", "batch_size", "learning_rate", "weight_decay", "warmup_epochs",
                     "accumulation_steps", "seed", "pretrained")
# the settings that decide what the network's input is (preprocessing): a resume that changes one of them
# restarts the best-model choice (hmn.workflows.ResumeFromLatest), as scores on other input do not compare
INPUT_SETTINGS = ("image_size", "voi", "aspect") + VOLUME_SETTINGS
# settings whose change makes the weights mean something else or not fit: refused, never honoured
REFUSED = ("class_names", "in_channels", "backbone", "backbone_options", "attention", "fpn_channels",
           "fusion_channels", "num_heads", "hierarchical", "num_coarse_classes")


class RunRecordMismatchError(ValueError):
    """A setting given for a trained model contradicts its run record (see :data:`REFUSED`)."""


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, numpy and 0-d tensor numbers as Python numbers, torch devices as text."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _path(ckpt_dir: str | os.PathLike) -> str:
    return os.path.join(os.fspath(ckpt_dir), RUN_RECORD)


def read_run_record(ckpt_dir: str | os.PathLike) -> dict | None:
    """The run record in `ckpt_dir`, or None when there is none.

    Raises:
        ValueError: the file is not a run record (unreadable JSON, or no ``settings``), naming it.
    """
    path = _path(ckpt_dir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable run record ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path} is not a run record: no 'settings' object")
    return record


def trained(ckpt_dir: str | os.PathLike, key: str, default: Any, use: Any = True) -> Any:
    """The value of setting `key` from the run record in `ckpt_dir` when `use` and the record has it, else
    `default`. The bundles' configs give their defaults through this, so evaluation, inference, a resume and
    a packed bundle rebuild the trained model (an explicit override replaces the whole expression; then
    :func:`check_run_record` compares)."""
    from hmn.workflows.devices import as_bool

    if not as_bool(use, "use_run_record"):
        return default
    record = read_run_record(ckpt_dir)
    if record is None or key not in record["settings"]:
        return default
    return record["settings"][key]


def write_run_record(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any], resume: Any = False) -> str | None:
    """Writes (a new run) or updates (a resume) the run record in `ckpt_dir`; on one process only.

    A new run replaces any record there. A resume keeps the record's ``created`` time and earlier entries,
    takes `settings` as the current ones and appends a ``starts`` entry naming the settings that changed.
    Returns the record's path (None on the other processes of a distributed run).
    """
    from hmn import __version__
    from hmn.durable import atomic_write
    from hmn.workflows.devices import as_bool, rank_world

    if rank_world()[0] != 0:
        return None
    resume = as_bool(resume, "resume")
    settings = _plain(dict(settings))
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    old = read_run_record(ckpt_dir) if resume else None
    changed = {}
    if old is not None:
        changed = {k: [old["settings"][k], v] for k, v in settings.items() if k in old["settings"] and old["settings"][k] != v}
    record = {
        "format": 1,
        "hmn_version": __version__,
        "created": old.get("created", now) if old else now,
        "settings": settings,
        "starts": (old.get("starts", []) if old else []) + [{"time": now, "resume": resume, "changed": changed}],
    }
    path = _path(ckpt_dir)
    atomic_write(path, lambda f: f.write(json.dumps(record, indent=1) + "\n"))
    return path


def check_run_record(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any], use: Any = True) -> dict[str, list]:
    """Compares the settings a workflow is about to use with the run record in `ckpt_dir`.

    Args:
        ckpt_dir: the folder of ``model.pt`` and ``run.json``.
        settings: the effective settings (keys of :data:`MODEL_SETTINGS` / :data:`SCHEDULE_SETTINGS`);
            keys the record lacks are not compared.
        use: False skips the check (a new training run).

    Returns:
        ``{key: [recorded, used]}`` for the honoured differences (each logged as a warning naming both).

    Raises:
        RunRecordMismatchError: a :data:`REFUSED` setting differs; the message names every such setting with
            both values and the record's path.
    """
    from hmn.workflows.devices import as_bool

    if not as_bool(use, "use_run_record"):
        return {}
    record = read_run_record(ckpt_dir)
    if record is None:
        logger.info("no %s in %s (a model trained before run records, or elsewhere): using the configs' settings",
                    RUN_RECORD, ckpt_dir)
        return {}
    recorded = record["settings"]
    differ = _differences(recorded, settings)
    refused = {k: d for k, d in differ.items() if k in REFUSED}
    if refused:
        raise RunRecordMismatchError(
            f"the model in {ckpt_dir} was trained with "
            + "; ".join(f"{k}={d[0]!r}, not {d[1]!r}" for k, d in refused.items())
            + f" ({_path(ckpt_dir)}): its weights would not fit or would mean something else. "
            "Drop those overrides, or use the bundle (--bundle_root / --ckpt_dir) of a model trained that way"
        )
    shown = {k: recorded[k] for k in ("class_names", "image_size", "backbone", "aspect") if k in recorded}
    logger.info("model settings from the run record %s: %s", _path(ckpt_dir),
                ", ".join(f"{k}={v!r}" for k, v in shown.items()))
    for k, (was, now) in differ.items():
        if k in SCHEDULE_SETTINGS:  # a resume that changes its schedule on purpose
            logger.info("%s: %r in the run record, %r in this run", k, was, now)
        else:
            logger.warning("%s=%r is used, but the model was trained with %s=%r (%s)", k, now, k, was, _path(ckpt_dir))
    return {k: d for k, d in differ.items()}


def input_changes(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any], use: Any = True) -> dict[str, list]:
    """The :data:`INPUT_SETTINGS` in which `settings` differ from the run record in `ckpt_dir`, as
    ``{key: [recorded, used]}``; empty when `use` is false (a new run), without a record, or when none differs.
    Read before this run's start is recorded (the bundles' ``train#resume`` is built first)."""
    from hmn.workflows.devices import as_bool

    if not as_bool(use, "use_run_record"):
        return {}
    record = read_run_record(ckpt_dir)
    if record is None:
        return {}
    return {k: d for k, d in _differences(record["settings"], settings).items() if k in INPUT_SETTINGS}


def _differences(recorded: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, list]:
    """``{key: [recorded, used]}`` for the keys of `settings` (made JSON-plain) that the record holds otherwise."""
    used = _plain(dict(settings))
    return {k: [recorded[k], v] for k, v in used.items() if k in recorded and recorded[k] != v}


def check_classes(model_classes: list[str], data_classes: list[str], source: str = "the datalist") -> None:
    """Evaluation needs the datalist's classes in the model's order.

    Raises:
        RunRecordMismatchError: they differ; the message lists both.
    """
    if list(model_classes) != list(data_classes):
        raise RunRecordMismatchError(
            f"the model predicts {list(model_classes)} but {source} has class_names {list(data_classes)}: labels and "
            "predictions would be paired wrongly. Use a datalist with the model's classes, in its order"
        )


def check_model_file(ckpt_dir: str | os.PathLike, sha256: str | None, name: str = "model.pt") -> None:
    """A packed bundle's evaluation and inference check that ``<ckpt_dir>/<name>`` is the model packed with
    it (its SHA-256); an empty `sha256` (an unpacked bundle) checks nothing.

    Raises:
        FileNotFoundError: the file is missing (the message says to run from the bundle's folder or pass
            ``--bundle_root``, or, where the bundle's ``large_files.yml`` links the weights, to fetch them).
        RunRecordMismatchError: it is another file: its predictions would carry this bundle's class names.
    """
    if not sha256:
        return
    import hashlib

    path = os.path.join(os.fspath(ckpt_dir), name)
    if not os.path.isfile(path):
        bundle = os.path.dirname(os.path.abspath(os.fspath(ckpt_dir)))
        linked = [f for f in ("large_files.yml", "large_files.yaml", "large_files.json") if os.path.isfile(os.path.join(bundle, f))]
        if linked:
            raise FileNotFoundError(f"{path} does not exist: the bundle links it in {os.path.join(bundle, linked[0])}; "
                                    f"download it with: python -m hmn fetch-large-files {bundle}")
        raise FileNotFoundError(f"{path} does not exist: run from the unpacked bundle's folder or pass --bundle_root")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != sha256:
        raise RunRecordMismatchError(
            f"{path} is not the model this bundle was packed with (SHA-256 {h.hexdigest()[:12]}..., packed "
            f"{sha256[:12]}...): its predictions would be labelled with this bundle's classes. Point --bundle_root at the "
            "unpacked bundle; a model trained further from it needs packing again (python -m hmn pack-bundle)"
        )
