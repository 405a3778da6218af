"""Keeping a run alive when some image files are bad, without counting any image twice.

:class:`SkipBadFilesDataset` wraps any map-style dataset (``monai.data.Dataset``,
``PersistentDataset``, ...). When loading an item fails because of its file (an
:class:`hmn.transforms.ImageReadError` anywhere in the exception chain), in training (``mode="replace"``)
the item is replaced by the next readable one, which is harmless there; in validation and test
(``mode="leave_out"``) it becomes a placeholder marked with its error (a zero image, every label unknown),
which the metrics and the evaluation report leave out and list: a replacement there would count another
image twice. The path is logged once per run - across DataLoader worker processes too, through
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
    """Wraps a dataset so that unreadable files are skipped instead of killing a run.

    Args:
        dataset: any map-style dataset whose items are loaded by :class:`hmn.transforms.LoadXrayd` (or
            anything raising :class:`ImageReadError`).
        max_skips: how many consecutive bad items to step over before giving up with a RuntimeError
            (all files bad usually means a wrong path, not bad files). ``"replace"`` mode only.
        mode: ``"replace"`` (training: the next readable item stands in) or ``"leave_out"`` (validation and
            test: every item carries ``error_key``, empty for a good one; an unreadable one is a placeholder
            with the error message, a zero image of `item_shape` and every label -1, unknown, so each image
            is counted once and a bad one not at all).
        item_shape: the image shape of a placeholder (``"leave_out"``), the shape the preprocessing gives a
            good item (e.g. ``[1, 224, 224]``), so a batch can be stacked.
        image_key, label_key, error_key: the item keys of the image, the label and the error message.

    Raises:
        ValueError: an unknown `mode`, or ``"leave_out"`` without `item_shape`.
    """

    MODES = ("replace", "leave_out")

    def __init__(self, dataset: Any, max_skips: int = 50, mode: str = "replace", item_shape: Any = None,
                 image_key: str = "image", label_key: str = "label", error_key: str = "error") -> None:
        if mode not in self.MODES:
            raise ValueError(f"SkipBadFilesDataset mode={mode!r}; accepted: {', '.join(self.MODES)}")
        if mode == "leave_out" and item_shape is None:
            raise ValueError("SkipBadFilesDataset(mode='leave_out') needs item_shape, the image shape of a placeholder")
        self.dataset = dataset
        self.max_skips = int(max_skips)
        self.mode = mode
        self.item_shape = None if item_shape is None else tuple(int(v) for v in item_shape)
        self.image_key, self.label_key, self.error_key = image_key, label_key, error_key
        # one flag per item, shared with DataLoader workers (fork or spawn) so that a path is logged once
        self._bad = multiprocessing.get_context().Array("b", max(len(dataset), 1), lock=True)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def data(self) -> Any:
        return getattr(self.dataset, "data", None)

    def _mark(self, j: int, err: BaseException) -> None:
        with self._bad.get_lock():
            first = not self._bad[j]
            self._bad[j] = 1
        if first and self.mode == "leave_out":
            logger.warning("unreadable file (item %d) left out of the metrics, not replaced: %s", j, err)
        elif first:
            logger.warning("skipping unreadable file (item %d): %s", j, err)

    def _placeholder(self, index: int, err: BaseException) -> dict:
        import torch
        from monai.data import MetaTensor

        data = self.data
        item = dict(data[index]) if data is not None and index < len(data) and isinstance(data[index], dict) else {}
        path = str(item.get(self.image_key, f"item {index}"))
        out = dict(item)
        out[self.image_key] = MetaTensor(torch.zeros(self.item_shape), meta={"filename_or_obj": path})
        n_labels = len(item[self.label_key]) if isinstance(item.get(self.label_key), (list, tuple)) else 1
        out[self.label_key] = torch.full((n_labels,), -1.0)
        if "label_mask" in item:
            out["label_mask"] = torch.zeros(n_labels)
        text = str(err)
        out[self.error_key] = text if path in text else f"{path}: {text}"
        return out

    def _leave_out_item(self, index: int) -> Any:
        from monai.data import MetaTensor

        try:
            out = self.dataset[index]
        except Exception as e:  # noqa: BLE001 - sorted out below
            err = find_read_error(e)
            if err is None:
                raise
            self._mark(index, err)
            return self._placeholder(index, err)
        if isinstance(out, dict):
            out = dict(out)
            image = out.get(self.image_key)
            if isinstance(image, MetaTensor):  # placeholders carry only the path: a batch needs the same meta keys
                image.meta = {"filename_or_obj": image.meta.get("filename_or_obj", "")}
            out[self.error_key] = ""
        return out

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        if n == 0:
            raise IndexError("empty dataset")
        if self.mode == "leave_out":
            return self._leave_out_item(int(index))
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
                self._mark(j, err)
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
        if n and self.mode == "leave_out":
            logger.warning("%d of %d files were unreadable and left out (not replaced): %s", n, len(self),
                           "; ".join(self.skipped_paths(self.image_key)[:5]))
        elif n:
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
