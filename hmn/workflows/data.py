"""The data side of a training run: the datalist it uses (the SYNTHETIC demo dataset by default), its class
names, the check of the validation split before training, the loss's ``pos_weight``, and the MONAI datasets
with their cache planned against the memory available.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import DistributedSampler

__all__ = ["AUTO_CACHE_SHARE", "CACHE_MODES", "CACHE_RESIDENT_FACTOR", "available_memory", "cache_plan",
           "ResumableSampler", "check_validation_split", "class_names", "label_tensor", "make_dataset", "pos_weight",
           "resolve_datalist"]

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


class ResumableSampler(DistributedSampler):
    """The training split's sampler: each epoch's order is a function of the seed and the epoch alone, so a run
    stopped in the middle of an epoch continues with the rest of that epoch's order (:meth:`skip`).

    It is MONAI's ``DistributedSampler`` (torch's, with ``even_divisible``): epoch ``e`` shuffles with
    ``torch.randperm`` drawn from a generator seeded with ``seed + e``; MONAI's workflows call ``set_epoch`` when
    each epoch starts. Outside ``torch.distributed`` it is one replica (``num_replicas=1, rank=0``) holding every
    item; under ``torchrun`` each rank gets its share.

    Args:
        dataset: the training dataset (a sized map-style dataset).
        shuffle: shuffle each epoch (False: the datalist's order).
        seed: the shuffling seed (the bundle's ``seed``).
        even_divisible: under ``torchrun``, pad the shares to equal length (MONAI's meaning).
        num_replicas, rank: as torch's ``DistributedSampler``; None: from ``torch.distributed``, or 1 and 0 outside it.

    :meth:`skip` ``(n)`` makes the next iteration over the sampler start ``n`` items into the epoch's order (the
    position a mid-epoch checkpoint holds: the epoch's iterations done times the batch size); the length stays the
    epoch's, so ignite's count of the epoch's iterations is unchanged.
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0, even_divisible: bool = True,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            num_replicas, rank = 1, 0
        super().__init__(dataset, even_divisible=even_divisible, num_replicas=num_replicas, rank=rank,
                         shuffle=bool(shuffle), seed=int(seed))
        self._skip = 0

    def skip(self, n: int) -> None:
        """The next ``iter()`` starts `n` items into this epoch's order (0 <= n <= the epoch's items).

        Raises:
            ValueError: `n` outside that range.
        """
        n = int(n)
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"cannot skip {n} items of an epoch of {self.num_samples}")
        self._skip = n

    def __iter__(self):
        skip, self._skip = self._skip, 0
        indices = list(super().__iter__())
        return iter(indices[skip:])
