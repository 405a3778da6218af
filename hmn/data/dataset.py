"""Keeping a training run alive when some image files are bad.

:class:`SkipBadFilesDataset` wraps any map-style dataset (``monai.data.Dataset``,
``PersistentDataset``, ...). When loading an item fails because of its file (an
:class:`hmn.transforms.ImageReadError` anywhere in the exception chain) the item is replaced by the
next readable one, the path is logged once per run - across DataLoader worker processes too, through
a shared flag array - and the number of skipped files is available at the end (:meth:`report`, or the
:class:`SkippedFilesReport` ignite handler). Any other exception is a bug and propagates.

In a bundle config::

    "train#dataset": {"_target_": "hmn.data.SkipBadFilesDataset",
                      "dataset": {"_target_": "Dataset", "data": "@train#datalist", "transform": "@train#preprocessing"}}
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import Any

from torch.utils.data import Dataset

from hmn.transforms import ImageReadError

__all__ = ["SkipBadFilesDataset", "SkippedFilesReport", "find_read_error"]

logger = logging.getLogger(__name__)


def find_read_error(exc: BaseException | None) -> ImageReadError | None:
    """The :class:`ImageReadError` in `exc`'s cause/context chain (MONAI wraps transform errors), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ImageReadError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class SkipBadFilesDataset(Dataset):
    """Wraps a dataset so that unreadable files are skipped (replaced by the next good item) instead of killing a run.

    Args:
        dataset: any map-style dataset whose items are loaded by :class:`hmn.transforms.LoadXrayd` (or
            anything raising :class:`ImageReadError`).
        max_skips: how many consecutive bad items to step over before giving up with a RuntimeError
            (all files bad usually means a wrong path, not bad files).
    """

    def __init__(self, dataset: Any, max_skips: int = 50) -> None:
        self.dataset = dataset
        self.max_skips = int(max_skips)
        # one flag per item, shared with DataLoader workers (fork or spawn) so that a path is logged once
        self._bad = multiprocessing.get_context().Array("b", max(len(dataset), 1), lock=True)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def data(self) -> Any:
        return getattr(self.dataset, "data", None)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        if n == 0:
            raise IndexError("empty dataset")
        for step in range(min(self.max_skips, n) + 1):
            j = (int(index) + step) % n
            if self._bad[j]:
                continue
            try:
                return self.dataset[j]
            except Exception as e:  # noqa: BLE001 - sorted out below
                err = find_read_error(e)
                if err is None:
                    raise
                with self._bad.get_lock():
                    first = not self._bad[j]
                    self._bad[j] = 1
                if first:
                    logger.warning("skipping unreadable file (item %d): %s", j, err)
        raise RuntimeError(
            f"{min(self.max_skips, n) + 1} consecutive items from index {index} are unreadable; "
            f"{self.skipped_count} of {n} skipped so far - check the datalist's paths"
        )

    @property
    def skipped_count(self) -> int:
        """How many items have been found unreadable so far (in this process and its workers)."""
        return int(sum(self._bad[:]))

    def skipped_indices(self) -> list[int]:
        """Indices of the unreadable items."""
        return [i for i, b in enumerate(self._bad[:]) if b]

    def skipped_paths(self, key: str = "image") -> list[str]:
        """Paths of the unreadable items, when the wrapped dataset has a ``data`` list of dicts."""
        data = self.data
        out = []
        for i in self.skipped_indices():
            item = data[i] if data is not None and i < len(data) else None
            out.append(str(item.get(key)) if isinstance(item, dict) else f"item {i}")
        return out

    def report(self) -> int:
        """Logs how many files were skipped (a warning when any) and returns the count."""
        n = self.skipped_count
        if n:
            logger.warning("%d of %d files were skipped as unreadable", n, len(self))
        else:
            logger.info("no unreadable files among %d", len(self))
        return n


class SkippedFilesReport:
    """Ignite handler that calls :meth:`SkipBadFilesDataset.report` when the engine completes (and each epoch if asked).

    Bundle config: ``{"_target_": "hmn.data.SkippedFilesReport", "dataset": "@train#dataset"}`` in the
    trainer's handlers.
    """

    def __init__(self, dataset: Any, every_epoch: bool = False) -> None:
        self.dataset, self.every_epoch = dataset, every_epoch

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)
        if self.every_epoch:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any = None) -> int:
        # Any dataset may be given (a bundle whose skip_bad_files is off passes a plain one): only a
        # SkipBadFilesDataset has anything to report.
        report = getattr(self.dataset, "report", None)
        return int(report()) if callable(report) else 0
