"""Pieces the training bundles need that MONAI lacks: datalist resolution with the demo default,
dataset construction with selectable caching, resuming from the latest full-state checkpoint, and a
per-epoch metric history file.

Everything here is referenced from the bundle configs (``bundles/<name>/configs/*.json``) by
``_target_`` or ``$hmn.training...`` expressions, so a downloaded bundle needs only the installed package.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from monai.inferers import Inferer

__all__ = [
    "BestModelRecord",
    "CACHE_MODES",
    "CPUAutocastInferer",
    "EarlyStopRecord",
    "MetricHistory",
    "ResumeFromLatest",
    "as_bool",
    "class_names",
    "cpu_bf16_supported",
    "label_tensor",
    "latest_checkpoint",
    "make_dataset",
    "pos_weight",
    "resolve_datalist",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("none", "memory", "persistent")


def resolve_datalist(dataset_dir: str, datalist: str | None = None, demo: Mapping[str, Any] | None = None) -> str:
    """The datalist JSON a run uses.

    ``datalist`` given: it must exist. Otherwise ``dataset_dir/datalist.json`` if present; otherwise, when
    ``demo`` settings are given (the bundles' default), the SYNTHETIC demo dataset is written into
    ``dataset_dir`` (or reused) by :func:`hmn.data.make_demo_dataset`. Anything else is an error that
    says how to make a datalist.
    """
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist {datalist!r} does not exist; make one with `python -m hmn datalist ...`")
        return os.path.abspath(datalist)
    candidate = os.path.join(dataset_dir, "datalist.json")
    if os.path.isfile(candidate) and not demo:
        return os.path.abspath(candidate)
    if demo:
        from hmn.data import make_demo_dataset

        logger.info("using the SYNTHETIC demo dataset in %s", dataset_dir)
        return make_demo_dataset(dataset_dir, **dict(demo))
    raise FileNotFoundError(
        f"no datalist.json in dataset_dir {dataset_dir!r}; pass --datalist PATH, or write one with "
        "`python -m hmn datalist nih|chexpert|folder|json ...`"
    )


def class_names(datalist: str) -> list[str]:
    """The ``class_names`` recorded in a datalist JSON."""
    from hmn.data import read_datalist

    names = read_datalist(datalist).get("class_names")
    if not names:
        raise ValueError(f"datalist {datalist!r} has no 'class_names' list; write it with `python -m hmn datalist`")
    return list(names)


def pos_weight(items: Sequence[Mapping[str, Any]], enabled: bool = True, max_weight: float = 100.0) -> torch.Tensor | None:
    """``negatives / positives`` per class over the training items (see :func:`hmn.losses.pos_weight_from_labels`)."""
    if not enabled:
        return None
    from hmn.losses import pos_weight_from_labels

    return pos_weight_from_labels([it["label"] for it in items], max_weight=max_weight)


def make_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable,
    cache: str = "memory",
    cache_dir: str | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    skip_bad_files: bool = False,
) -> torch.utils.data.Dataset:
    """A MONAI dataset over ``data`` with the chosen caching.

    Args:
        data: datalist entries.
        transform: a ``monai.transforms.Compose``; caching stores the output of its leading
            deterministic transforms (loading, resizing, normalization), so epochs after the first do
            not decode images again.
        cache: ``"none"`` (``Dataset``), ``"memory"`` (``CacheDataset``, ``cache_rate`` of the items) or
            ``"persistent"`` (``PersistentDataset`` in ``cache_dir``, reused across runs).
        skip_bad_files: wrap in :class:`hmn.data.SkipBadFilesDataset`, which logs each unreadable file once
            and carries on with the next item.
    """
    import monai.data as md

    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}; accepted: {', '.join(CACHE_MODES)}")
    data = list(data)
    if cache == "none":
        ds: torch.utils.data.Dataset = md.Dataset(data, transform)
    elif cache == "memory":
        # Filled as items are first read (not up front), so that an unreadable file surfaces where
        # SkipBadFilesDataset can step over it; shared with DataLoader workers when there are any.
        ds = md.CacheDataset(
            data, transform, cache_rate=cache_rate, runtime_cache="processes" if num_workers > 0 else True
        )
    else:
        if not cache_dir:
            raise ValueError("cache='persistent' needs a cache_dir")
        os.makedirs(cache_dir, exist_ok=True)
        ds = md.PersistentDataset(data, transform, cache_dir=cache_dir)
    if skip_bad_files:
        from hmn.data import SkipBadFilesDataset

        ds = SkipBadFilesDataset(ds)
    return ds


def as_bool(value: Any, name: str = "value") -> bool:
    """``True``/``False``, or the strings a command line gives (``true``, ``false``, ``1``, ``0``, ``yes``, ``no``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; accepted: true/false, 1/0, yes/no")


# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: x86 AVX-512 BF16 and AMX-BF16, Arm BF16.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_bf16_supported(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively, read from ``/proc/cpuinfo`` (or the text given).

    Looks for the ``avx512_bf16`` or ``amx_bf16`` flag (x86) or the ``bf16`` feature (Arm) on the
    ``flags``/``Features`` lines. Without native support PyTorch emulates bfloat16 and autocast to it is
    slower than float32, so the bundles' ``cpu_bf16`` default follows this answer. False where the file
    cannot be read (macOS, Windows).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def _as_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, Mapping):
        return type(out)({k: _as_float32(v) for k, v in out.items()})
    if isinstance(out, (list, tuple)):
        return type(out)(_as_float32(v) for v in out)
    return out


class CPUAutocastInferer(Inferer):
    """The bundles' training inferer: the network's forward pass under bfloat16 autocast on a CPU.

    MONAI's ``amp`` switch is CUDA-only (it autocasts to ``"cuda"`` and uses a CUDA gradient scaler). This
    inferer does the CPU's part: when ``enabled`` and the input is on the CPU, the forward pass runs under
    ``torch.autocast("cpu", dtype=torch.bfloat16)`` (convolutions and matrix products in bfloat16, the rest
    as autocast decides) and the prediction comes back as float32, so the loss, its gradient and the
    optimizer step stay in float32 (bfloat16 has float32's range, so no loss scaling is needed). Inputs on
    another device, or ``enabled`` false, run the network as MONAI's ``SimpleInferer`` does. Validation,
    evaluation and inference keep ``SimpleInferer`` and float32.
    """

    def __init__(self, enabled: Any = False) -> None:
        self.enabled = as_bool(enabled, "cpu_bf16")

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not (self.enabled and inputs.device.type == "cpu"):
            return network(inputs, *args, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = network(inputs, *args, **kwargs)
        return _as_float32(out)


_EPOCH_RE = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The full-state checkpoint of the highest epoch in ``ckpt_dir`` (``checkpoint_epoch=N.pt``), or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")):
        m = _EPOCH_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


class ResumeFromLatest:
    """Ignite handler: when ``enabled``, loads the latest full-state checkpoint in ``ckpt_dir`` before the run.

    The checkpoint holds the network, optimizer, LR scheduler and trainer state (epoch and iteration)
    written each epoch by the bundle's ``CheckpointSaver``, so a killed run restarted with
    ``--resume true`` continues with the epoch after the last finished one. ``enabled`` with no
    checkpoint found starts from scratch and says so.

    With ``saver`` (the bundle's per-epoch ``CheckpointSaver``), the loaded file is handed to it as the
    checkpoint it last wrote, so the next epoch's checkpoint replaces it instead of leaving it behind. The
    bundles' ``load_dict`` also restores the best validation score (:class:`BestModelRecord`) and the
    early-stopping count (:class:`EarlyStopRecord`).
    """

    def __init__(
        self, ckpt_dir: str, load_dict: Mapping[str, Any], enabled: bool = False, map_location: Any = None, saver: Any = None
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.enabled = as_bool(enabled, "resume")
        self.saver = saver
        self.loaded_from: str | None = None

    def attach(self, engine: Any) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            logger.warning("resume requested but no checkpoint_epoch=*.pt in %s: starting from scratch", self.ckpt_dir)
            return
        from monai.handlers import CheckpointLoader

        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=path, load_dict=self.load_dict, map_location=self.map_location).attach(engine)
        self.loaded_from = path
        if self.saver is not None:
            interval = getattr(self.saver, "_interval_checkpoint", None)
            if interval is None:
                raise ValueError("ResumeFromLatest(saver=...) expects a CheckpointSaver with save_interval > 0")
            epoch = int(_EPOCH_RE.search(os.path.basename(path)).group(1))
            state = interval.state_dict()  # {"_saved": []} in ignite 0.5 ("saved" in earlier versions)
            state[next(iter(state))] = [(epoch, os.path.basename(path))]
            interval.load_state_dict(state)


def _plain_number(value: Any) -> Any:
    """Python ``float``/``int`` for numpy and 0-d tensor scores (MONAI's metrics return numpy scalars), which
    ``torch.load(weights_only=True)``, as MONAI's ``CheckpointLoader`` uses it, refuses to read back."""
    if hasattr(value, "item") and not isinstance(value, str):  # before float: numpy.float64 is a float subclass
        return value.item()
    return value


class BestModelRecord:
    """A checkpoint entry holding the best-model ``CheckpointSaver``'s record: the best key-metric score so
    far and the file it was written to.

    The bundles add it to every full-state checkpoint; on ``--resume`` the loader restores it, so the
    resumed run compares its validations with the best one before the stop and does not overwrite
    ``model.pt`` with a worse model. ``saver`` must be a MONAI ``CheckpointSaver`` with ``save_key_metric``.
    """

    def __init__(self, saver: Any) -> None:
        self._checkpoint = getattr(saver, "_key_metric_checkpoint", None)
        if self._checkpoint is None:
            raise ValueError(f"BestModelRecord needs a CheckpointSaver with save_key_metric=True, got {saver!r}")

    def state_dict(self) -> dict:
        return {k: [(_plain_number(p), f) for p, f in v] for k, v in self._checkpoint.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._checkpoint.load_state_dict(state)


class EarlyStopRecord:
    """A checkpoint entry holding a MONAI ``EarlyStopHandler``'s count of validations without improvement
    and its best score, so that early stopping on a resumed run counts on from before the stop.

    The handler's trainer must be set (``set_trainer``) before the checkpoint is saved or loaded, as the
    bundles' ``run`` does first.
    """

    def __init__(self, handler: Any) -> None:
        if not hasattr(handler, "set_trainer"):
            raise ValueError(f"EarlyStopRecord needs a MONAI EarlyStopHandler, got {handler!r}")
        self.handler = handler

    def _early_stopping(self) -> Any:
        if self.handler._handler is None:
            raise RuntimeError("EarlyStopRecord: call the EarlyStopHandler's set_trainer() before saving or loading")
        return self.handler._handler

    def state_dict(self) -> dict:
        return {k: _plain_number(v) for k, v in self._early_stopping().state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._early_stopping().load_state_dict(state)


class MetricHistory:
    """Ignite handler for the evaluator: appends one CSV row per validation (epoch, metrics, wall time).

    The file (``history.csv``) is the run's learning curve; each row is flushed as it is written, and a
    resumed run appends to it. The epoch is the trainer's (MONAI's evaluators run with the trainer's epoch).
    """

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self._start = time.time()

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        row: dict[str, Any] = {"epoch": engine.state.epoch, "elapsed_s": round(time.time() - self._start, 1)}
        for k, v in engine.state.metrics.items():
            if isinstance(v, (int, float)):
                row[k] = v
        os.makedirs(os.path.dirname(os.path.abspath(self.filename)), exist_ok=True)
        new = not os.path.exists(self.filename)
        with open(self.filename, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def label_tensor(item: dict) -> dict:
    """Dictionary transform for the bundles: ``label`` to a float tensor, with entries whose
    ``label_mask`` is 0 (CheXpert's "ignore" policy) set to -1, which the losses leave out and the
    evaluation report counts as unknown."""
    out = dict(item)
    label = torch.as_tensor(out["label"], dtype=torch.float32)
    if "label_mask" in out:
        mask = torch.as_tensor(out["label_mask"], dtype=torch.float32)
        if mask.shape != label.shape:
            raise ValueError(f"{out.get('image')}: label_mask shape {tuple(mask.shape)} differs from label {tuple(label.shape)}")
        label = torch.where(mask > 0, label, torch.full_like(label, -1.0))
        out["label_mask"] = mask
    out["label"] = label
    return out
