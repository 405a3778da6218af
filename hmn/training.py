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

import numpy as np
import torch
from monai.inferers import Inferer

__all__ = [
    "BestModelRecord",
    "CACHE_MODES",
    "CPUAutocastInferer",
    "EarlyStopRecord",
    "MetricHistory",
    "ResumeFromLatest",
    "RunTimeEstimate",
    "amp_kwargs",
    "as_bool",
    "class_names",
    "check_validation_split",
    "checkpoints_by_epoch",
    "cpu_bf16_supported",
    "default_num_workers",
    "label_tensor",
    "latest_checkpoint",
    "available_memory",
    "cache_plan",
    "make_dataset",
    "EpochLoss",
    "plot_history",
    "evaluate_after_training",
    "pos_weight",
    "pretrained_given",
    "resolve_datalist",
    "set_aside",
    "to_device",
    "trim_history",
]

logger = logging.getLogger(__name__)

CACHE_MODES = ("auto", "none", "memory", "persistent")
# share of the memory available at start that "auto" lets the in-memory caches of one process take: the
# network, optimizer, loader workers and the rest of the run need the remainder
AUTO_CACHE_SHARE = 0.5
# resident memory an in-memory cache takes per byte of its float32 images: over one training epoch with --cache memory
# the process grew by 324 MiB (1,000 cached 196 KiB images) and 1,061 MiB (2,000); the same epochs without a cache
# grew by 18 and 386 MiB; the difference, the cache's own cost, is 313 and 346 KiB per image, 1.6x and 1.8x
# (benchmarks/bench_scale.py --cache-items N [--cache-mode none], convnext_tiny bundle at 224x224); planned with 2
CACHE_RESIDENT_FACTOR = 2.0
_CACHE_RESERVED: list[int] = []  # bytes promised to the in-memory caches built so far in this process


def resolve_datalist(dataset_dir: str, datalist: str | None = None, demo: Mapping[str, Any] | None = None,
                     volumes: bool = False) -> str:
    """The datalist JSON a run uses.

    ``datalist`` given: it must exist. Otherwise ``dataset_dir/datalist.json`` if present; otherwise, when
    ``demo`` settings are given (the bundles' default), the SYNTHETIC demo dataset is written into
    ``dataset_dir`` (or reused) by :func:`hmn.data.make_demo_dataset`, or with ``volumes`` (the 3D bundles)
    the SYNTHETIC demo volumes by :func:`hmn.data.make_demo3d_dataset`. Anything else is an error that
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
        from hmn.data import make_demo3d_dataset, make_demo_dataset

        logger.info("using the SYNTHETIC demo %s in %s", "volumes" if volumes else "dataset", dataset_dir)
        return (make_demo3d_dataset if volumes else make_demo_dataset)(dataset_dir, **dict(demo))
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


def check_validation_split(items: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> list[str]:
    """Checks, before training, which classes the validation macro ROC AUC (the bundles' model-selection
    metric, :class:`hmn.handlers.MacroROCAUC`) can average, and says once which it leaves out.

    A class counts when the split has at least one positive and one negative *known* label for it (an
    entry whose ``label_mask`` is 0 or whose label is below 0 is unknown). Rare findings often have no
    positive in a small validation split: they are left out of the average, with a warning naming them.

    Args:
        items: the validation datalist entries (``label``, optional ``label_mask``).
        class_names: the class names, in label order.

    Returns:
        The names of the classes the metric averages.

    Raises:
        ValueError: the split is empty, a label has the wrong length, or no class has both label values
            (model selection would compare nothing); the message gives each class's counts.
    """
    from hmn.evaluation.metrics import _absent_reason

    from hmn.data.datalist import label_counts

    names = [str(c) for c in class_names]
    items = list(items)
    if not items:
        raise ValueError("the validation split is empty: model selection needs labelled validation images")
    known, positives = label_counts(items, names, "validation")
    reasons = {n: _absent_reason(int(k), int(p)) for n, k, p in zip(names, known, positives)}
    defined = [n for n in names if reasons[n] is None]
    counts = ", ".join(f"{n}: {int(p)} positive / {int(k)} known" for n, k, p in zip(names, known, positives))
    if not defined:
        raise ValueError(
            f"no class has both a positive and a negative label among the {len(items)} validation images "
            f"({counts}): the validation ROC AUC that selects the best model is undefined. Make a validation "
            "split with positives (a larger validation share when building it with `python -m hmn datalist`)"
        )
    left_out = {n: r for n, r in reasons.items() if r is not None}
    if left_out:
        logger.warning(
            "validation split (%d images): %d of %d classes are left out of the validation macro ROC AUC that "
            "selects the best model, because their AUC is undefined there: %s",
            len(items), len(left_out), len(names), "; ".join(f"{n} ({r})" for n, r in left_out.items()),
        )
    return defined


def pos_weight(items: Sequence[Mapping[str, Any]], enabled: bool = True, max_weight: float = 100.0) -> torch.Tensor | None:
    """``negatives / positives`` per class over the training items (see :func:`hmn.losses.pos_weight_from_labels`)."""
    if not enabled:
        return None
    from hmn.losses import pos_weight_from_labels

    return pos_weight_from_labels([it["label"] for it in items], max_weight=max_weight)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; elsewhere ``psutil``'s
    ``available`` where installed), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def cache_plan(
    n_items: int, item_shape: Sequence[int] | None, cache: str, cache_dir: str | None, name: str = "dataset",
) -> str:
    """The cache a dataset of `n_items` gets, and a log line saying how big it will be.

    The cached item is the output of the deterministic transforms: a float32 image of `item_shape`
    (channels and spatial size at the run's image size), ``4 * prod(item_shape)`` bytes on disk; in memory
    :data:`CACHE_RESIDENT_FACTOR` times that (the process's measured growth per cached image).

    * ``"auto"`` (the bundles' default): ``"memory"`` when every item fits in :data:`AUTO_CACHE_SHARE` of
      the memory available (less what the caches built before in this process take, and divided among
      the processes of a ``torchrun`` node); else ``"persistent"`` (a disk cache in `cache_dir`) when the
      disk has room for it; else ``"none"``. The choice and the sizes are logged.
    * ``"memory"`` given explicitly: refused when it cannot fit in the memory available.
    * ``"none"``, ``"persistent"``: taken as given.

    Returns:
        the cache mode to build (``"none"``, ``"memory"`` or ``"persistent"``).

    Raises:
        ValueError: an unknown `cache`; or ``"memory"`` that needs more than the memory available (the
            message gives both sizes and what to pass instead).
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}; accepted: {', '.join(CACHE_MODES)}")
    if cache in ("none", "persistent") or not item_shape:
        return "memory" if cache == "auto" else cache
    size = int(n_items) * 4 * int(np.prod([int(d) for d in item_shape]))  # the float32 images: the disk cache's size
    need = int(size * CACHE_RESIDENT_FACTOR)  # what holding them in memory takes, as measured
    avail = available_memory()
    per_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    gb = 1e9
    shape = "x".join(str(int(d)) for d in item_shape)
    what = f"{n_items} images x {shape} float32 = {size / gb:.2f} GB, about {need / gb:.1f} GB resident in memory"
    if avail is None:
        logger.info("%s cache: %s (available memory unknown)", name, what)
        return "memory"
    room = avail / per_node - sum(_CACHE_RESERVED)
    if cache == "memory":
        if need > room:
            raise ValueError(
                f"cache='memory' for the {name} needs about {need / gb:.1f} GB of memory ({what}: "
                f"{CACHE_RESIDENT_FACTOR:g}x the images' size, as measured) but about {max(room, 0) / gb:.1f} GB is "
                f"available; pass --cache persistent (a disk cache of about {size / gb:.1f} GB in {cache_dir}), "
                "--cache none (decode every epoch), or --cache auto"
            )
        _CACHE_RESERVED.append(need)
        logger.info("%s cache in memory: %s (%.1f GB available)", name, what, room / gb)
        return "memory"
    if need <= AUTO_CACHE_SHARE * room:
        _CACHE_RESERVED.append(need)
        logger.info("%s cache in memory: %s (%.1f GB available; filled during the first epoch)", name, what, room / gb)
        return "memory"
    import shutil

    folder = cache_dir or "."
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe or ".").free
    if size * 1.1 <= free:
        logger.warning("%s cache on disk in %s: %s would not fit in %.0f%% of the %.1f GB of memory available "
                       "(pass --cache memory to insist, --cache none for no cache)",
                       name, folder, what, 100 * AUTO_CACHE_SHARE, room / gb)
        return "persistent"
    logger.warning("%s: no cache: %s fits neither in memory (%.1f GB available) nor on disk in %s (%.1f GB free); "
                   "every epoch decodes the images again", name, what, room / gb, folder, free / gb)
    return "none"


def make_dataset(
    data: Sequence[Mapping[str, Any]],
    transform: Callable,
    cache: str = "auto",
    cache_dir: str | None = None,
    cache_rate: float = 1.0,
    num_workers: int = 0,
    skip_bad_files: bool = False,
    item_shape: Sequence[int] | None = None,
    name: str = "dataset",
    bad_files: str = "replace",
) -> torch.utils.data.Dataset:
    """A MONAI dataset over ``data`` with the chosen caching.

    Args:
        data: datalist entries.
        transform: a ``monai.transforms.Compose``; caching stores the output of its leading
            deterministic transforms (loading, resizing, normalization), so epochs after the first do
            not decode images again.
        cache: ``"auto"`` (memory when it fits, else disk, else none: :func:`cache_plan`), ``"none"``
            (``Dataset``), ``"memory"`` (``CacheDataset``, ``cache_rate`` of the items; refused when it
            cannot fit) or ``"persistent"`` (``PersistentDataset`` in ``cache_dir``, reused across runs).
        item_shape: channels and spatial size of a cached image (e.g. ``[1, 224, 224]``), for the size
            estimate of :func:`cache_plan`; None skips the estimate.
        name: what the dataset is (``"training"``), for the log.
        skip_bad_files: wrap in :class:`hmn.data.SkipBadFilesDataset`, which logs each unreadable file once
            and carries on.
        bad_files: what the wrapper does with an unreadable file: ``"replace"`` it by the next readable item
            (training) or ``"leave_out"`` (validation and test: a placeholder the metrics and the report leave
            out and list, so no image is counted twice; needs `item_shape`).
    """
    import monai.data as md

    data = list(data)
    cache = cache_plan(int(len(data) * (cache_rate if cache == "memory" else 1.0)), item_shape, cache, cache_dir, name)
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

        ds = SkipBadFilesDataset(ds, mode=bad_files, item_shape=item_shape)
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


AMP_DTYPES = ("bfloat16", "float16")


def amp_kwargs(dtype: Any) -> dict[str, Any]:
    """The ``amp_kwargs`` of MONAI's ``SupervisedTrainer`` (``torch.autocast`` arguments) for the bundles'
    ``amp_dtype``: ``{"dtype": torch.bfloat16}`` or ``{"dtype": torch.float16}``.

    Raises:
        ValueError: `dtype` is not one of :data:`AMP_DTYPES` (a ``torch.dtype`` of those is accepted too).
    """
    name = str(dtype).removeprefix("torch.").strip().lower()
    if name not in AMP_DTYPES:
        raise ValueError(f"amp_dtype={dtype!r} is not accepted; use one of {AMP_DTYPES}")
    return {"dtype": getattr(torch, name)}


def drop_last_batch(num_items: int, batch_size: int, world_size: int | None = None) -> bool:
    """Whether the training DataLoader drops its last batch: only when that batch would hold a single item.

    BatchNorm in training mode cannot normalize one item (PyTorch raises "Expected more than 1 value per
    channel when training"), and the bundles' from-scratch recipe uses BatchNorm, so a training split of, say,
    9 at batch 4 stopped the run at the end of its first epoch. Dropping that item leaves it to another
    epoch's shuffle; every other split keeps its partial last batch.

    Args:
        num_items: the training dataset's length.
        batch_size: the DataLoader's batch size.
        world_size: processes sharing the dataset (a DistributedSampler gives each ``ceil(num_items /
            world_size)``); default: torch.distributed's world size when initialized, else 1.
    """
    if world_size is None:
        world_size = _rank_world()[1]
    per_process = -(-int(num_items) // max(int(world_size), 1))
    return per_process > batch_size and per_process % batch_size == 1


def default_num_workers(cuda: bool | None = None, cpus: int | None = None, local_processes: int | None = None,
                        maximum: int = 8) -> int:
    """The bundles' default number of DataLoader worker processes.

    Without CUDA, 0: on the CPU the model, not loading, limits training (``benchmarks/bench_data.py``:
    the bundles' transforms load 100-600 images/s on 2 cores, a convnext_tiny training step runs at about
    7), and workers would only take cores from it. With CUDA, the CPUs this process may use
    (``os.sched_getaffinity``), shared among the node's torchrun processes (``LOCAL_WORLD_SIZE``), one left
    to the main process, between 1 and `maximum`.

    Args:
        cuda: whether CUDA is used (default: ``torch.cuda.is_available()``).
        cpus: the CPUs available (default: this process's affinity).
        local_processes: processes on this node (default: ``LOCAL_WORLD_SIZE``, else 1).
        maximum: the most workers per process.
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = max(1, int(cpus) // max(1, int(local_processes)))
    return max(1, min(int(maximum), share - 1))


def to_device(network: torch.nn.Module, device: Any, channels_last: Any = False) -> torch.nn.Module:
    """`network` moved to `device`; with `channels_last` its 4-D weights are stored channels-last (NHWC), so
    that convolutions (whose output follows the weight's layout) run in NHWC, the layout of the GPUs'
    tensor-core kernels. Values are unchanged; a state dict saved from it loads into a contiguous network."""
    if as_bool(channels_last, "channels_last"):
        return network.to(device=device, memory_format=torch.channels_last)
    return network.to(device)


def pretrained_given(value: Any) -> bool:
    """Whether a ``pretrained`` setting asks for weights: True, or a checkpoint path (False, None, "" and the
    command line's "false"/"0"/"no"/"none" do not)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    return str(value).strip().lower() not in ("", "false", "0", "no", "none")


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


def checkpoints_by_epoch(ckpt_dir: str) -> list[tuple[int, str]]:
    """The full-state checkpoints in ``ckpt_dir`` (``checkpoint_epoch=N.pt``) as ``(N, path)``, newest first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(ckpt_dir), "checkpoint_epoch=*.pt")):
        m = _EPOCH_RE.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The full-state checkpoint of the highest epoch in ``ckpt_dir`` (``checkpoint_epoch=N.pt``), or None.
    It is not opened: :class:`ResumeFromLatest` checks that it can be read."""
    found = checkpoints_by_epoch(ckpt_dir)
    return found[0][1] if found else None


def set_aside(path: str, suffix: str = ".unreadable") -> str:
    """Renames `path` to ``<path><suffix>`` (``<path><suffix>.1``, ... if taken) and returns the new name."""
    target, n = path + suffix, 0
    while os.path.lexists(target):
        n += 1
        target = f"{path}{suffix}.{n}"
    os.replace(path, target)
    return target


class ResumeFromLatest:
    """Ignite handler: when ``enabled``, restores the newest readable full-state checkpoint in ``ckpt_dir``
    when the run starts.

    The checkpoint holds the network, optimizer, LR scheduler and trainer state (epoch and iteration)
    written each epoch by the bundle's checkpoint saver, so a stopped run restarted with ``--resume true``
    continues with the epoch after the last one whose checkpoint is complete. Checkpoints are tried newest
    first, each read once (``torch.load(weights_only=True)``); one that cannot be read (truncated by a
    writer that was not atomic, damaged on disk or in a copy) is set aside as ``<name>.unreadable`` (renamed,
    never deleted) with a warning naming it and why, and the next older one is tried. With no readable
    checkpoint the run starts from scratch and the log says why. Weights load strictly: a missing,
    unexpected or mis-shaped entry is an error naming it.

    With ``saver`` (the bundle's per-epoch :class:`hmn.checkpoints.AtomicCheckpointSaver` or a MONAI
    ``CheckpointSaver``), the restored file is handed to it as the checkpoint it last wrote, so the next
    epoch's checkpoint replaces it; older complete checkpoints found beside it are removed after that next
    checkpoint is complete, never before. When that saver promotes a staged best model
    (``best_model_saver``), the staged best model of the restored epoch becomes ``model.pt`` and staged
    models of later epochs (which will be trained again) are discarded, so ``model.pt`` and the restored
    best score (:class:`BestModelRecord`) describe the same model. Incomplete ``.*.partial`` files in
    ``ckpt_dir`` are removed. The bundles' ``load_dict`` also restores the early-stopping count
    (:class:`EarlyStopRecord`). With ``history`` (the run's ``history.csv``), rows of epochs after the
    restored one (validated before the stop, but without a complete checkpoint) are dropped at once, so
    ``history.csv``, ``model.pt`` and the restored best score agree from the start of the resumed run.

    With ``input_changes`` (``{setting: [recorded, used]}``, :func:`hmn.runs.input_changes`: this resume
    preprocesses the images otherwise than the run so far, e.g. another image size or CT window), the restored
    best score and early-stopping count are dropped with a warning: they were measured on other input, and
    ``model.pt`` must be a model of the preprocessing the run record now describes, so the resumed run's first
    validation replaces ``model.pt`` and the comparisons start again from there.

    Without ``enabled`` (a new run), a ``ckpt_dir`` that already holds a full-state checkpoint or the best
    model is refused (``FileExistsError``) unless ``refuse_used_folder`` is False: the new run's files
    would mix with the earlier run's, a later resume would pick the earlier run's newest checkpoint, and
    its best model would be overwritten.

    Raises (when the run starts):
        KeyError / RuntimeError: the readable checkpoint does not fit ``load_dict`` (other network or
            objects); the message names the file.
        ValueError: the checkpoint's epoch is beyond the trainer's ``max_epochs``.
    """

    def __init__(
        self, ckpt_dir: str, load_dict: Mapping[str, Any], enabled: bool = False, map_location: Any = None, saver: Any = None,
        history: str | None = None, refuse_used_folder: bool = True, input_changes: Mapping[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir, self.load_dict, self.map_location = ckpt_dir, dict(load_dict), map_location
        self.input_changes = dict(input_changes or {})
        self.enabled = as_bool(enabled, "resume")
        self.saver = saver
        self.history = history
        self.refuse_used_folder = as_bool(refuse_used_folder, "refuse_used_folder")
        self.loaded_from: str | None = None
        self.loaded_epoch: int | None = None
        self.set_aside: list[str] = []
        self.unreadable: list[str] = []
        self._checkpoint: Any = None

    def _newest_readable(self, writer: bool) -> tuple[int, str, Any] | None:
        for epoch, path in checkpoints_by_epoch(self.ckpt_dir):
            try:
                checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
                if not isinstance(checkpoint, Mapping):
                    raise TypeError(f"it holds a {type(checkpoint).__name__}, not a dict of states")
            except (MemoryError, PermissionError, torch.OutOfMemoryError):
                raise  # the machine's trouble, not the file's: never set a good checkpoint aside for it
            except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
                reason = " ".join(str(e).split())[:300]
                self.unreadable.append(os.path.basename(path))
                if writer:
                    moved = set_aside(path)
                    self.set_aside.append(moved)
                    logger.warning("checkpoint %s cannot be read (%s: %s); set aside as %s", path,
                                   type(e).__name__, reason, os.path.basename(moved))
                else:
                    logger.warning("checkpoint %s cannot be read (%s: %s); skipped", path, type(e).__name__, reason)
                continue
            return epoch, path, checkpoint
        return None

    def _refuse_a_used_folder(self) -> None:
        best_saver = getattr(self.saver, "best_model_saver", None)
        best_name = getattr(best_saver, "key_metric_filename", None) or "model.pt"
        found = [os.path.basename(p) for _, p in checkpoints_by_epoch(self.ckpt_dir)]
        if os.path.isfile(os.path.join(self.ckpt_dir, best_name)):
            found.append(best_name)
        if found:
            raise FileExistsError(
                f"{self.ckpt_dir} already holds a run ({', '.join(found[:4])}): a new run would mix with it and "
                "overwrite its best model. Continue it with --resume True, or start a new run elsewhere "
                "(--bundle_root DIR, or --ckpt_dir and --output_dir), or move those files away"
            )

    def attach(self, engine: Any) -> None:
        if not self.enabled:
            if self.refuse_used_folder:
                self._refuse_a_used_folder()
            return
        from ignite.engine import Events

        from hmn.checkpoints import remove_partial_files

        writer = _rank_world()[0] == 0  # only one process renames or removes files
        if writer and os.path.isdir(self.ckpt_dir):
            remove_partial_files(self.ckpt_dir)
        found = self._newest_readable(writer)
        best_saver = getattr(self.saver, "best_model_saver", None)
        if found is None:
            if self.unreadable:
                what = "set aside" if writer else "skipped"
                why = f"every checkpoint there was unreadable and {what} ({', '.join(self.unreadable)})"
            else:
                why = "there is no checkpoint_epoch=*.pt"
            logger.warning("resume requested but %s in %s: starting from scratch", why, self.ckpt_dir)
            if writer:
                if best_saver is not None:
                    best_saver.promote(0)  # staged best models without a committed epoch are discarded
                if self.history:
                    trim_history(self.history, 0)
            return
        epoch, path, self._checkpoint = found
        logger.info("resuming from %s (epoch %d)", path, epoch)
        if writer and self.history:
            trim_history(self.history, epoch)
        engine.add_event_handler(Events.STARTED, self._restore)
        self.loaded_from, self.loaded_epoch = path, epoch
        if best_saver is not None and writer:
            promoted = best_saver.promote(epoch)
            if promoted:
                logger.info("the best model staged at epoch <= %d is now %s", epoch, best_saver.key_metric_filename)
        if self.saver is not None:
            interval = getattr(self.saver, "_interval_checkpoint", None)
            if interval is None:
                raise ValueError("ResumeFromLatest(saver=...) expects a CheckpointSaver with save_interval > 0")
            state = interval.state_dict()  # {"_saved": []} in ignite 0.5 ("saved" in earlier versions)
            state[next(iter(state))] = [(epoch, os.path.basename(path))]
            interval.load_state_dict(state)
            older = [os.path.basename(p) for e, p in checkpoints_by_epoch(self.ckpt_dir) if e < epoch]
            if older and hasattr(interval.save_handler, "defer_removal"):
                interval.save_handler.defer_removal(older)

    def _restore(self, engine: Any) -> None:
        from ignite.handlers import Checkpoint

        checkpoint, self._checkpoint = self._checkpoint, None
        prior_max_epochs = engine.state.max_epochs
        schedulers = {k: o for k, o in self.load_dict.items() if isinstance(o, torch.optim.lr_scheduler.LRScheduler)}
        horizons = {k: _schedule_settings(o) for k, o in schedulers.items()}
        try:
            Checkpoint.load_objects(to_load=self.load_dict, checkpoint=checkpoint, strict=True)
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise type(e)(f"cannot restore {self.loaded_from} into this run: {e}") from e
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"{self.loaded_from} is at epoch {engine.state.epoch}, beyond max_epochs={prior_max_epochs}; "
                "pass a larger --max_epochs to train on"
            )
        saved_max_epochs = engine.state.max_epochs
        engine.state.max_epochs = prior_max_epochs
        if saved_max_epochs != prior_max_epochs:
            logger.info("max_epochs %s -> %s: this run trains to epoch %s", saved_max_epochs, prior_max_epochs, prior_max_epochs)
        # The scheduler's state holds its settings (e.g. t_total, the horizon) beside its progress; keep this
        # run's settings, so a larger max_epochs stretches the schedule to the new end instead of starting a
        # second cycle after the old one.
        for key, sched in schedulers.items():
            loaded = _schedule_settings(sched)
            changed = {n: (loaded[n], v) for n, v in horizons[key].items() if n in loaded and loaded[n] != v}
            for name, (_, value) in changed.items():
                setattr(sched, name, value)
            if changed and isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                # the restored optimizer holds the old schedule's rate for this step: recompute it (LambdaLR's
                # rate is a closed form of the step; a chained scheduler would take it from the next step on)
                lrs = [base * lmbda(sched.last_epoch) for base, lmbda in zip(sched.base_lrs, sched.lr_lambdas)]
                for group, lr in zip(sched.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sched._last_lr = lrs
            if changed:
                logger.info("%s settings follow this run: %s", key,
                            ", ".join(f"{n} {old} -> {new}" for n, (old, new) in changed.items()))
        logger.info("restored network, optimizer, scheduler and trainer state from %s (epoch %s, iteration %s)",
                    self.loaded_from, engine.state.epoch, engine.state.iteration)
        if self.input_changes:
            records = [o for o in self.load_dict.values() if isinstance(o, (BestModelRecord, EarlyStopRecord))]
            for record in records:
                record.restart()
            if records:
                changes = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.input_changes.items())
                logger.warning("this resume changes the network's input (%s): the best score and early-stopping count "
                               "so far were measured on the old input, so the best-model choice starts again: the "
                               "next validation's model replaces the best model", changes)


# progress entries of a torch LR scheduler's state; the other plain numbers are its settings
_SCHEDULE_PROGRESS = {"last_epoch", "base_lrs", "lr_lambdas"}


def _schedule_settings(scheduler: Any) -> dict[str, Any]:
    return {k: v for k, v in scheduler.state_dict().items()
            if not k.startswith("_") and k not in _SCHEDULE_PROGRESS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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

    With ``evaluator`` (the MONAI evaluator the saver is attached to), its ``state.best_metric`` and
    ``best_metric_epoch`` are kept too (as ``"evaluator_best"``), so that its "Got new best metric" log after a
    resume is about the same best as ``model.pt``. A checkpoint without them (written before they were kept)
    restores the saver's best score with epoch 0, the epoch being unknown.
    """

    def __init__(self, saver: Any, evaluator: Any = None) -> None:
        self._checkpoint = getattr(saver, "_key_metric_checkpoint", None)
        if self._checkpoint is None:
            raise ValueError(f"BestModelRecord needs a CheckpointSaver with save_key_metric=True, got {saver!r}")
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state: dict[str, Any] = {k: [(_plain_number(p), f) for p, f in v] for k, v in self._checkpoint.state_dict().items()}
        if self.evaluator is not None:
            s = self.evaluator.state
            state["evaluator_best"] = [_plain_number(s.best_metric), int(s.best_metric_epoch)]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        best = state.pop("evaluator_best", None)
        self._checkpoint.load_state_dict(state)
        if self.evaluator is not None:
            saved = [p for entries in state.values() for p, _ in entries]
            if best is None and saved:
                best = [max(saved), 0]
            if best is not None:
                self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = best[0], int(best[1])

    def restart(self) -> None:
        """Forgets the best score: the next validation's model is saved as the best whatever it scores."""
        self._checkpoint.load_state_dict({k: [] for k in self._checkpoint.state_dict()})
        if self.evaluator is not None:
            self.evaluator.state.best_metric, self.evaluator.state.best_metric_epoch = -1, -1


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

    def restart(self) -> None:
        """Forgets the best score and the count of validations without improvement."""
        handler = self._early_stopping()
        handler.counter, handler.best_score = 0, None


def _history_rows(path: str, last_epoch: int) -> tuple[list[dict[str, Any]], int]:
    """The whole rows of ``history.csv`` up to `last_epoch`, and how many rows were left out."""
    if not os.path.exists(path):
        return [], 0
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = []
    for row in rows:
        try:
            row_epoch = int(row["epoch"])
        except (KeyError, TypeError, ValueError):
            continue  # a row cut off by a writer that was not atomic
        if row_epoch <= last_epoch and None not in row.values():
            kept.append(row)
    return kept, len(rows) - len(kept)


def _write_history(path: str, rows: list[dict[str, Any]], header: Sequence[str] = ()) -> None:
    """Rewrites ``history.csv`` atomically: the columns are every key of the rows in first-seen order
    (`header` when there is no row), a missing value is empty."""
    from hmn.durable import atomic_write

    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    fields = fields or list(header)

    def write(f: Any) -> None:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write)


def trim_history(path: str, last_epoch: int) -> int:
    """Drops the rows of ``history.csv`` after `last_epoch` (and any cut-off row), rewriting the file
    atomically; removes a leftover temporary file of it. Returns the number of rows dropped."""
    from hmn.durable import partial_path

    if os.path.lexists(partial_path(path)):
        os.remove(partial_path(path))
    kept, dropped = _history_rows(path, last_epoch)
    if dropped:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        _write_history(path, kept, header)
        logger.info("%s: %d row(s) after epoch %d dropped (validated before the stop, without a complete "
                    "checkpoint; they are trained again)", path, dropped, last_epoch)
    return dropped


class MetricHistory:
    """Ignite handler for the evaluator: one CSV row per validation (epoch, elapsed training time, metrics).

    The file (``history.csv``) is the run's learning curve. Every row is written by rewriting the whole
    (small) file atomically (:func:`hmn.durable.atomic_write`), so a stop never leaves half a row. The epoch
    is the trainer's (MONAI's evaluators run with the trainer's epoch). On its first row in a process the
    handler reads the file it finds: rows of the epoch being validated and later ones are dropped (they
    belong to epochs a resumed run trains again, after a stop before their checkpoint was complete), and
    ``elapsed_s`` continues from the last row kept, so it is the training time summed over resumes (the
    time between a stop and the resume, and the lost part of the stopped epoch, are not counted).

    Args:
        filename: the CSV (``runs/history.csv`` in the bundles).
        loss: an :class:`EpochLoss` attached to the trainer: its mean over the epoch goes into a
            ``train_loss`` column (this process's iterations; under ``torchrun``, rank 0's share).
        plot: also draw the curves (training loss and every validation metric against the epoch) into a
            PNG beside the CSV (``history.png``), rewritten with every row, so a run always ends, or stops,
            with its learning curve to look at.
    """

    def __init__(self, filename: str, loss: EpochLoss | None = None, plot: bool = True) -> None:
        self.filename = filename
        self.loss = loss
        self.plot = bool(plot)
        self._start = time.time()
        self._rows: list[dict[str, Any]] | None = None
        self._offset = 0.0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def _read_existing(self, epoch: int) -> list[dict[str, Any]]:
        kept, dropped = _history_rows(self.filename, epoch - 1)
        if dropped:
            logger.info("%s: %d row(s) of epoch %d or later dropped (trained again after the resume)",
                        self.filename, dropped, epoch)
        return kept

    def __call__(self, engine: Any) -> None:
        epoch = int(engine.state.epoch)
        if self._rows is None:
            self._rows = self._read_existing(epoch)
            if self._rows:
                try:
                    self._offset = float(self._rows[-1].get("elapsed_s") or 0.0)
                except ValueError:
                    self._offset = 0.0
        row: dict[str, Any] = {"epoch": epoch, "elapsed_s": round(self._offset + time.time() - self._start, 1)}
        if self.loss is not None and self.loss.mean() is not None:
            row["train_loss"] = self.loss.mean()
        for k, v in engine.state.metrics.items():
            if isinstance(v, (int, float)):
                row[k] = v
        self._rows.append(row)
        _write_history(self.filename, self._rows)
        if self.plot:
            try:
                plot_history(self.filename, os.path.splitext(self.filename)[0] + ".png")
            except Exception as e:  # a plot is never worth stopping a run for
                logger.warning("could not draw the learning curve of %s: %s", self.filename, e)


class EpochLoss:
    """Ignite handler for the trainer: the mean training loss of the current epoch (reset when an epoch
    starts), read by :class:`MetricHistory`. The loss is taken from the trainer's output with
    ``monai.handlers.from_engine(["loss"], first=True)``, as MONAI's StatsHandler takes it."""

    def __init__(self) -> None:
        self._sum, self._count = 0.0, 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)

    def reset(self, engine: Any = None) -> None:
        self._sum, self._count = 0.0, 0

    def update(self, engine: Any) -> None:
        from monai.handlers import from_engine

        value = from_engine(["loss"], first=True)(engine.state.output)
        if isinstance(value, (tuple, list)):  # a batched dict gives a tuple, a list of items the value itself
            value = value[0]
        value = float(value.item() if hasattr(value, "item") else value)
        if np.isfinite(value):
            self._sum += value
            self._count += 1

    def mean(self) -> float | None:
        """The mean loss over the epoch's iterations so far (None before the first)."""
        return self._sum / self._count if self._count else None


def evaluate_after_training(evaluator: Any, ckpt_dir: str, enabled: Any = True) -> bool:
    """After training, evaluates the best model (``<ckpt_dir>/model.pt``, loaded by the evaluator's
    ``CheckpointLoader``) on the test split, so the run ends with its report (the bundles' ``test#evaluator``
    writes ``runs/eval/``). Skipped, with a log line, when disabled, on other ranks than 0, without a
    ``model.pt`` (no validation ran) or with an empty test split. Returns whether it ran."""
    if not as_bool(enabled, "evaluate_after_training") or _rank_world()[0] != 0:
        return False
    if not os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        logger.info("no %s: the test split is not evaluated", os.path.join(ckpt_dir, "model.pt"))
        return False
    n = len(evaluator.data_loader.dataset)
    if n == 0:
        logger.info("the datalist has no test split: nothing evaluated after training")
        return False
    logger.info("training done: evaluating the best model (%s) on the %d test images",
                os.path.join(ckpt_dir, "model.pt"), n)
    evaluator.run()
    return True


def plot_history(csv_path: str, png_path: str) -> str:
    """Draws a ``history.csv``: the training loss (left axis) and each validation metric (right axis)
    against the epoch, into a PNG written atomically. Returns `png_path`."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hmn.durable import atomic_write

    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    metrics = [k for k in (rows[0].keys() if rows else []) if k not in ("epoch", "elapsed_s", "train_loss")]
    fig = Figure(figsize=(6.5, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x, y = series("train_loss") if rows and "train_loss" in rows[0] else ([], [])
    if x:
        ax.plot(x, y, marker="o", markersize=3, color="tab:red", label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:red")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    for i, key in enumerate(metrics):
        mx, my = series(key)
        if mx:
            right.plot(mx, my, marker="s", markersize=3, color=f"C{i}" if i else "tab:blue", label=key)
    right.set_ylabel("validation metric")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    if handles:
        ax.legend(handles, labels, loc="center right", fontsize=8)
    last = rows[-1] if rows else {}
    ax.set_title(f"learning curve ({len(rows)} epochs, {_duration(float(last.get('elapsed_s') or 0))} of training)",
                 fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(png_path, lambda f: f.write(buf.getvalue()), binary=True)


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunTimeEstimate:
    """Ignite handler for the trainer: logs how long the whole run will take, not only the epoch (the
    progress bar's estimate).

    After ``after_iterations`` training iterations of this process it logs the training-only estimate
    (iterations left times the mean time per iteration so far; validation not included). After each epoch
    it logs the mean wall time of the epochs this process finished (training and validation together,
    over the last ``window``) times the epochs left, and the clock time it points to. A resumed run counts
    from the epoch it resumed at; a run stopped early (early stopping) ends sooner.

    Args:
        after_iterations: when to give the first, training-only estimate.
        window: epochs averaged for the per-epoch estimate.
        clock: the time source (seconds), for tests.
    """

    def __init__(self, after_iterations: int = 20, window: int = 3, clock: Callable[[], float] = time.time) -> None:
        self.after_iterations, self.window, self.clock = int(after_iterations), int(window), clock
        self._run_start: float | None = None
        self._start_iteration = 0
        self._epoch_start: float | None = None
        self._epoch_times: list[float] = []
        self.last_message: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Any) -> None:
        self._run_start = None  # set at the first epoch: a resume restores the iteration count at STARTED

    def _epoch_started(self, engine: Any) -> None:
        self._epoch_start = self.clock()
        if self._run_start is None:
            self._run_start, self._start_iteration = self._epoch_start, engine.state.iteration

    def _say(self, message: str) -> None:
        self.last_message = message
        logger.info(message)

    def _iteration(self, engine: Any) -> None:
        done = engine.state.iteration - self._start_iteration
        if done != self.after_iterations or self._run_start is None:
            return
        per_iteration = (self.clock() - self._run_start) / done
        left = engine.state.max_epochs * engine.state.epoch_length - engine.state.iteration
        self._say(f"{per_iteration:.2f} s per training iteration: the remaining {left} iterations take about "
                  f"{_duration(per_iteration * left)} (validation not included)")

    def _epoch_completed(self, engine: Any) -> None:
        # runs after the handlers attached before it (validation and checkpoint are attached earlier)
        if self._epoch_start is None:
            return
        self._epoch_times.append(self.clock() - self._epoch_start)
        recent = self._epoch_times[-self.window :]
        per_epoch = sum(recent) / len(recent)
        left = engine.state.max_epochs - engine.state.epoch
        if left <= 0:
            return
        finish = time.strftime("%H:%M", time.localtime(time.time() + per_epoch * left))
        self._say(f"epoch {engine.state.epoch}/{engine.state.max_epochs}: {_duration(per_epoch)} per epoch with "
                  f"validation; {left} epoch(s) left, about {_duration(per_epoch * left)} (around {finish})")


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
