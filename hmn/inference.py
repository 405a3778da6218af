"""Inference over unlabelled files: the list of items to predict and a dataset that survives bad files.

* :func:`inference_items` turns a folder (searched recursively for DICOM, extensionless DICOM,
  PNG/JPEG, TIFF, NIfTI), a datalist JSON, one image file or a list of paths into sorted
  ``[{"image": path}]`` items.
* :class:`InferenceDataset` applies the preprocessing to each item. When a file cannot be read it
  returns a placeholder instead of raising: the image is a zero MetaTensor of ``placeholder_shape``
  whose ``filename_or_obj`` is the path, and the item's ``"error"`` is a one-line message naming the
  file and the reason (``""`` for good items, so that every item has the same keys and MONAI's
  collate works). The network still runs on the zeros; :class:`hmn.handlers.PredictionCSVWriter`
  writes an error row for the item and ignores its output.

* Under ``torchrun`` (``configs/multi_gpu_inference.json``) every process predicts its share of the
  items (:func:`shard_items`) into ``<stem>.rank<r><suffix>``, and :func:`merge_rank_outputs` joins the
  shares into the one CSV asked for when all have finished (and the heatmap indexes, likewise). A run
  stopped part-way is resumed with ``--resume True``: images that already have an error-free row, in the
  CSV or in any share, are left out (:func:`run_outputs`, ``inference_items(skip_done=...)``).

In a bundle's inference.json::

    "datalist": {"_target_": "hmn.inference.inference_items", "source": "@input_dir"},
    "dataset": {"_target_": "hmn.inference.InferenceDataset", "data": "@datalist",
                "transform": "@preprocessing", "placeholder_shape": [1, 224, 224]}
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.transforms import apply_transform
from torch.utils.data import Dataset

from hmn.data.dataset import find_read_error
from hmn.data.datalist import IMAGE_EXTENSIONS, find_images, find_volumes, load_datalist
from hmn.durable import atomic_write, portable_text

__all__ = [
    "DICOM_UID_COLUMNS",
    "InferenceDataset",
    "completed_images",
    "error_message",
    "inference_items",
    "merge_csv_files",
    "merge_rank_outputs",
    "rank_file",
    "rank_files",
    "read_prediction_rows",
    "refuse_volume_heatmaps",
    "run_outputs",
    "shard_items",
]

logger = logging.getLogger(__name__)


def _innermost(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None and id(exc.__cause__ or exc.__context__) not in seen:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen.add(id(exc))
    return exc


def error_message(exc: BaseException, path: str) -> str:
    """One line naming the file and why it failed: the :class:`hmn.transforms.ImageReadError` in `exc`'s
    chain when there is one (``"<path>: <reason>"``), else the innermost exception's type and message."""
    read_error = find_read_error(exc)
    if read_error is not None:
        text = str(read_error)
        if path and path not in text:
            text = f"{path}: {text}"
    else:
        inner = _innermost(exc)
        text = f"{path}: {type(inner).__name__}: {inner}"
    return " ".join(text.split())


class InferenceDataset(Dataset):
    """Map-style dataset for inference that turns an unreadable file into a placeholder item with an
    ``"error"`` message instead of stopping the run.

    Args:
        data: a list of item dicts (each with `image_key`) or of paths.
        transform: the preprocessing (e.g. a MONAI ``Compose`` starting with ``hmn.transforms.LoadXrayd``);
            applied with ``monai.transforms.apply_transform`` as ``monai.data.Dataset`` does.
        image_key: the key of the image path / tensor.
        error_key: the key of the error message (``""`` for good items).
        placeholder_shape: the shape of the zero image of a failed item; it must be the shape the
            preprocessing gives good items (e.g. ``(1, 224, 224)``) so that a batch can be stacked.
        keep_meta: the image meta keys every item keeps (``""`` where the transform set none, and in
            placeholders; MONAI's collate needs the same keys in a batch); ``None`` keeps the transform's meta
            untouched.
        catch_all: also turn other exceptions of the transform into error items. By default only file
            read errors (an :class:`hmn.transforms.ImageReadError` anywhere in the exception chain) are,
            and anything else, being a bug or a configuration error, propagates.
    """

    def __init__(
        self,
        data: Sequence[Any],
        transform: Callable | None = None,
        image_key: str = "image",
        error_key: str = "error",
        placeholder_shape: Sequence[int] = (1, 224, 224),
        keep_meta: Sequence[str] | None = ("filename_or_obj",),
        catch_all: bool = False,
    ) -> None:
        self.data = [d if isinstance(d, dict) else {image_key: os.fspath(d)} for d in data]
        missing = [i for i, d in enumerate(self.data) if image_key not in d]
        if missing:
            raise ValueError(f"items {missing[:5]} have no {image_key!r} key; items must be dicts with the image path")
        self.transform = transform
        self.image_key, self.error_key = image_key, error_key
        self.placeholder_shape = tuple(int(s) for s in placeholder_shape)
        self.keep_meta = None if keep_meta is None else list(keep_meta)
        self.catch_all = bool(catch_all)

    def __len__(self) -> int:
        return len(self.data)

    def _reduce_meta(self, image: Any) -> Any:
        if self.keep_meta is not None and isinstance(image, MetaTensor):
            # a key the transform did not set is "" (a placeholder's meta, a file without the DICOM tag), so that
            # every item of a batch has the same keys
            image.meta = {k: image.meta.get(k, "") for k in self.keep_meta}
        return image

    def placeholder(self, item: dict, message: str) -> dict:
        """The stand-in for a failed item: zeros of ``placeholder_shape`` and the error message."""
        path = str(item.get(self.image_key, ""))
        image = MetaTensor(torch.zeros(self.placeholder_shape), meta={"filename_or_obj": path})
        return {**item, self.image_key: self._reduce_meta(image), self.error_key: message}

    def __getitem__(self, index: int) -> dict:
        item = dict(self.data[index])
        path = str(item.get(self.image_key, ""))
        try:
            out = apply_transform(self.transform, item) if self.transform is not None else item
        except Exception as e:  # noqa: BLE001 - sorted out below
            if not self.catch_all and find_read_error(e) is None:
                raise
            message = error_message(e, path)
            logger.warning("item %d cannot be used: %s", index, message)
            return self.placeholder(item, message)
        if not isinstance(out, dict):
            raise TypeError(f"InferenceDataset's transform must return a dict, got {type(out).__name__}")
        out[self.image_key] = self._reduce_meta(out[self.image_key])
        out[self.error_key] = ""
        return out


def inference_items(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    split: str | None = "test",
    skip_done: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    image_key: str = "image",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    volumes: bool = False,
) -> list[dict[str, str]]:
    """The items to predict, as ``[{"image": path}]`` sorted by path.

    Args:
        source: a folder (searched recursively; files with one of `extensions` and files without an
            extension, as DICOM files often are), a datalist JSON (the `split`'s images; ``split=None``:
            all splits), a single image file, or a list of paths.
        split: the datalist split to take (``"training"``, ``"validation"``, ``"test"`` or None for all).
        skip_done: a predictions CSV from an interrupted run, or a list of them (e.g. :func:`run_outputs`:
            the CSV and its per-rank shares): images with an error-free row in any of them are left out
            (see :func:`completed_images`); use with ``PredictionCSVWriter(resume=True)``.
        image_key: the key of the path in each item.
        extensions: the file extensions searched for in a folder.
        volumes: a folder holds volumes (the 3D bundles): NIfTI files and DICOM series, one folder per series
            (:func:`hmn.data.datalist.find_volumes`), instead of one image per file.

    Raises:
        FileNotFoundError: `source` does not exist. ValueError: it holds no image files.
    """
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
    else:
        source = os.fspath(source)
        if os.path.isdir(source):
            paths = find_volumes(source) if volumes else find_images(source, extensions=extensions)
            if not paths:
                looked = ("NIfTI files and folders of DICOM files" if volumes
                          else f"{', '.join(extensions)} and extensionless files")
                raise ValueError(f"no image files under {source} (looked for {looked})")
        elif os.path.isfile(source) and source.lower().endswith(".json"):
            if split is None:
                data = load_datalist(source, check_files=False)
                entries = [e for s in ("training", "validation", "test") for e in data.get(s, [])]
            else:
                entries = load_datalist(source, split=split, check_files=False)
            paths = [e["image"] for e in entries]
            if not paths:
                raise ValueError(f"datalist {source} has no images in split {split!r}")
        elif os.path.isfile(source):
            paths = [source]
        else:
            raise FileNotFoundError(
                f"{source}: no such file or folder; give a folder of images, a datalist JSON or an image file"
            )
    paths = sorted(dict.fromkeys(paths))  # deterministic order, duplicates once
    if skip_done is not None:
        done_files = [skip_done] if isinstance(skip_done, (str, os.PathLike)) else list(skip_done)
        done_files = [os.fspath(f) for f in done_files if os.path.exists(f)]
        if done_files:
            done = set().union(*(completed_images(f) for f in done_files))
            before = len(paths)
            paths = [p for p in paths if portable_text(p) not in done]  # as the CSV holds them
            logger.info("%d of %d images already have predictions in %s", before - len(paths), before,
                        ", ".join(done_files))
    return [{image_key: p} for p in paths]


def shard_items(items: Sequence[Any], rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """This process's share of `items` under ``torchrun``: every `world_size`-th item from `rank`
    (``items[rank::world_size]``), so the shares are disjoint, cover every item and differ in size by at
    most one. `rank` and `world_size` default to ``torch.distributed``'s (all items in a single process).

    Raises:
        ValueError: `rank` is not in ``[0, world_size)``.
    """
    if rank is None or world_size is None:
        from hmn.workflows.devices import rank_world

        rank, world_size = rank_world()
    rank, world_size = int(rank), int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
    return list(items)[rank::world_size]


def rank_file(output_file: str | os.PathLike, rank: int | None = None, world_size: int | None = None) -> str:
    """The file a process writes for `output_file`: `output_file` itself in a single process, else its
    share ``<stem>.rank<r><suffix>``. `rank` and `world_size` default to ``torch.distributed``'s."""
    if rank is None or world_size is None:
        from hmn.workflows.devices import rank_world

        rank, world_size = rank_world()
    if int(world_size) == 1:
        return os.fspath(output_file)
    stem, suffix = os.path.splitext(os.fspath(output_file))
    return f"{stem}.rank{int(rank)}{suffix}"


def rank_files(output_file: str | os.PathLike) -> list[str]:
    """The per-rank shares of `output_file` (:func:`rank_file`) that exist, in rank order."""
    stem, suffix = os.path.splitext(os.fspath(output_file))
    share = re.compile(re.escape(stem) + r"\.rank(\d+)" + re.escape(suffix))
    found = [(int(m.group(1)), f) for f in glob.glob(glob.escape(stem) + ".rank*" + glob.escape(suffix))
             if (m := share.fullmatch(f))]
    return [f for _, f in sorted(found)]


def run_outputs(output_file: str | os.PathLike) -> list[str]:
    """`output_file` and its per-rank shares (whether they exist or not, the file first): what an
    interrupted run, single-process or under torchrun, may have written."""
    return [os.fspath(output_file), *rank_files(output_file)]


def merge_csv_files(
    output_file: str | os.PathLike,
    parts: Sequence[str | os.PathLike],
    key_columns: Sequence[str] = ("image",),
    error_column: str | None = "error",
) -> int:
    """Joins CSV files with one header into `output_file` (written atomically), one row per key, sorted
    by key. A later part's row replaces an earlier one with the same key, except that an error row
    (non-empty `error_column`) never replaces an error-free one. Rows cut off by a crash are dropped
    (:func:`read_prediction_rows`). `output_file` may be one of `parts`. Returns the number of rows.

    Raises:
        ValueError: the parts' headers differ, or lack a key column.
    """
    header: list[str] | None = None
    rows: dict[tuple[str, ...], list[str]] = {}
    for part in parts:
        part = os.fspath(part)
        if not os.path.exists(part):
            continue
        h, part_rows = read_prediction_rows(part)
        if h is None:
            continue
        if header is None:
            missing = [c for c in key_columns if c not in h]
            if missing:
                raise ValueError(f"{part}: no {missing} column in the header {h}")
            header = h
        elif h != header:
            raise ValueError(f"{part} has columns {h}, not {header} as {parts[0]}: these files cannot be merged")
        keys = [header.index(c) for c in key_columns]
        i_err = header.index(error_column) if error_column in header else None
        for r in part_rows:
            key = tuple(r[i] for i in keys)
            old = rows.get(key)
            if old is not None and i_err is not None and r[i_err] and not old[i_err]:
                continue
            rows[key] = r
    if header is None:
        return 0
    ordered = [rows[k] for k in sorted(rows)]

    def write(f: Any) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(ordered)

    atomic_write(output_file, write)
    return len(ordered)


def merge_rank_outputs(
    output_file: str | os.PathLike, heatmap_dir: str | os.PathLike | None = None, keep_existing: bool = False
) -> None:
    """After a ``torchrun`` inference: waits for every process, then rank 0 merges the per-rank predictions
    CSVs into `output_file` (one row per image, sorted by path) and, when `heatmap_dir` is given, the
    per-rank ``heatmaps.rank<r>.csv`` indexes into ``heatmaps.csv`` (one row per image and finding), and
    removes the shares once the merged file is on disk. With `keep_existing` (a resumed run) the rows
    already in `output_file` are kept; otherwise it is replaced. Call it on every rank; in a single
    process (where the writers write `output_file` itself) it does nothing.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    dist.barrier()
    if dist.get_rank() == 0:
        jobs = [(os.fspath(output_file), ("image",), "error")]
        if heatmap_dir is not None:
            jobs.append((os.path.join(os.fspath(heatmap_dir), "heatmaps.csv"), ("image", "finding"), None))
        for out, keys, err in jobs:
            shares = rank_files(out)
            if not shares:
                continue
            previous = [out] if keep_existing and os.path.exists(out) else []
            n = merge_csv_files(out, previous + shares, keys, err)
            for f in shares:
                os.remove(f)
            logger.info("%s: %d rows merged from %d per-rank files", out, n, len(shares))
    dist.barrier()


def read_prediction_rows(csv_path: str | os.PathLike) -> tuple[list[str] | None, list[list[str]]]:
    """The header and the complete rows of a CSV that may have been cut off by a crash: a last line
    without its line ending, and rows with the wrong number of fields, are dropped."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        text = f.read()  # written as UTF-8 (file names that are not UTF-8 as \\xNN: hmn.durable.PATH_ERRORS)
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the unterminated last line was cut off mid-write
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return None, []
    header = rows[0]
    return header, [r for r in rows[1:] if len(r) == len(header)]


def completed_images(csv_path: str | os.PathLike, image_column: str = "image", error_column: str = "error") -> set[str]:
    """Images with a complete, error-free row in a predictions CSV written by
    :class:`hmn.handlers.PredictionCSVWriter` (an empty set when the file does not exist)."""
    csv_path = os.fspath(csv_path)
    if not os.path.exists(csv_path):
        return set()
    header, rows = read_prediction_rows(csv_path)
    if not header or image_column not in header:
        raise ValueError(f"{csv_path}: no {image_column!r} column in the header {header}")
    i_img = header.index(image_column)
    i_err = header.index(error_column) if error_column in header else None
    return {row[i_img] for row in rows if i_err is None or row[i_err] == ""}


# the DICOM attributes that tie a prediction to its source: columns of predictions.csv and heatmaps.csv after "error"
# (empty for a file that is not DICOM, and SOPInstanceUID for a series folder), read by LoadXrayd's dicom_tags
DICOM_UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def class_columns(header: Sequence[str]) -> list[str]:
    """The class names of a predictions CSV header (:class:`hmn.handlers.PredictionCSVWriter`): the columns
    after ``image``, ``error`` and :data:`DICOM_UID_COLUMNS` (a file written before the UID columns existed has
    none of them)."""
    return [c for c in header if c not in ("image", "error", *DICOM_UID_COLUMNS)]


# why a 3D (volume) bundle gets no heatmaps, from inference (--heatmaps) and from `hmn explain`
NO_VOLUME_HEATMAPS = "Grad-CAM heatmaps are drawn on radiographs (2D bundles) and have no volume counterpart yet"


def refuse_volume_heatmaps(heatmaps: Any) -> None:
    """Stops a 3D bundle's inference run asked for ``heatmaps``: the Grad-CAM overlays
    (:class:`hmn.handlers.HeatmapWriter`) are drawn on 2D radiographs and have no volume counterpart yet.

    Raises:
        ValueError: ``heatmaps`` is true (as ``hmn.workflows.as_bool`` reads it).
    """
    from hmn.workflows.devices import as_bool

    if as_bool(heatmaps, "heatmaps"):
        raise ValueError(f"heatmaps=True: {NO_VOLUME_HEATMAPS}; a 3D bundle's inference writes predictions only. "
                         "Drop --heatmaps")
