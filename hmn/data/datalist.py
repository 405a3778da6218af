"""The project's datalist format, patient-wise splits, and reading / writing / summarizing datalists.

A datalist is MONAI's datalist JSON with the class names recorded beside the splits::

    {
      "class_names": ["Atelectasis", "Cardiomegaly", ...],
      "training":   [{"image": "images/00000001_000.png", "label": [0, 1, ...], "patient_id": "1"}, ...],
      "validation": [...],
      "test":       [...]
    }

``label`` is a multi-hot list in ``class_names`` order (all zeros: no finding). An entry may carry a
``label_mask`` of the same length (1: the label counts, 0: the loss must ignore it, e.g. CheXpert's
uncertain labels under the "ignore" policy). Relative image paths are relative to the JSON file's
folder, which is also what ``monai.data.load_decathlon_datalist`` assumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .vocabulary import METADATA_KEYS

__all__ = [
    "datalist_metadata",
    "SPLITS",
    "DatalistError",
    "patient_split",
    "split_entries",
    "make_datalist",
    "write_datalist",
    "load_datalist",
    "read_datalist",
    "summarize",
    "patient_overlap",
    "find_images",
    "IMAGE_EXTENSIONS",
    "read_table",
    "require_columns",
    "check_images_exist",
    "RowAccounting",
    "accounting_lines",
    "check_patient_overlap",
]

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".nii", ".nii.gz", ".j2k", ".jp2")


class DatalistError(ValueError):
    """A label table or datalist is malformed (missing columns, unknown labels, missing files, leakage)."""


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""


def require_columns(
    path: str, what: str, columns: Sequence[str], required: Sequence[str], hint: str = ""
) -> None:
    """Raises :class:`DatalistError` when `columns` (a table's column names, as the caller matches them)
    lack some of `required`, naming the file, `what` it should be, the missing and required columns and the
    first columns found."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise DatalistError(f"{path}: missing column(s) {missing}; {what} has {list(required)}, "
                            f"found {list(columns)[:14]}{_hint(hint)}")


def read_table(
    path: str | os.PathLike, what: str, required: Sequence[str] = (), hint: str = "", **read_csv_kwargs: Any
):
    """Reads a label table with ``pandas.read_csv`` (plain or compressed) and checks its columns.

    Every datalist builder reads its tables here, so that a missing, unreadable or wrongly shaped file is
    reported the same way whatever the source.

    Args:
        path: the CSV file.
        what: what the file should be, for messages (e.g. "the PadChest label table").
        required: column names the table must have (exact match).
        hint: extra guidance appended to every message (e.g. where the file is expected).
        read_csv_kwargs: passed to ``pandas.read_csv`` (dtype, keep_default_na, low_memory, ...).

    Returns:
        the ``pandas.DataFrame``.

    Raises:
        DatalistError: the file is not found, cannot be parsed as CSV, or lacks a required column.
    """
    import pandas as pd

    path = os.fspath(path)
    try:
        df = pd.read_csv(path, **read_csv_kwargs)
    except FileNotFoundError:
        raise DatalistError(f"{path}: {what} not found{_hint(hint)}") from None
    except Exception as e:
        raise DatalistError(f"{path}: {what} cannot be read as CSV ({type(e).__name__}: {e}){_hint(hint)}") from None
    require_columns(path, what, list(df.columns), required, hint)
    return df


def check_images_exist(
    images: Iterable[str], what: str, hint: str = "", exists: Callable[[str], bool] = os.path.exists
) -> None:
    """Raises :class:`DatalistError` when some of `images` do not exist: how many of how many `what`
    (e.g. "PadChest image(s)") are missing, the first three, `hint` (where they were looked for, what to set)
    and how to skip the check (``check_files=False`` / ``--no-check-files``).

    `exists` tells whether one image exists (default: :func:`os.path.exists` on its path).
    """
    images = list(images)
    missing = [p for p in images if not exists(p)]
    if missing:
        skip = "check_files=False / --no-check-files to write the datalist anyway"
        raise DatalistError(f"{len(missing)} of {len(images)} {what} are missing, e.g. {missing[:3]} "
                            f"({hint + '; or ' if hint else ''}{skip})")


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0, atol=1e-6):
        raise DatalistError(
            f"fractions must be three non-negative numbers (training, validation, test) summing to 1, got {fractions}"
        )
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def patient_split(
    patient_ids: Sequence[str], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> list[str]:
    """Assigns each item a split name so that all items of one patient land in the same split.

    Patients are shuffled with ``numpy.random.default_rng(seed)`` (after sorting, so the result does
    not depend on input order) and cut where the cumulative number of images crosses the fractions.

    Args:
        patient_ids: one patient id per item.
        fractions: target fractions of images in training, validation, test.
        seed: the shuffle's seed.

    Returns:
        the split name ("training", "validation" or "test") of each item.
    """
    fr = _check_fractions(fractions)
    ids = [str(p) for p in patient_ids]
    unique, counts = np.unique(np.asarray(ids, dtype=object).astype(str), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    cum = np.cumsum(counts[order]) - counts[order] / 2.0  # each patient's midpoint in image counts
    position = cum / max(len(ids), 1)
    bounds = np.cumsum(fr)[:2]
    which = np.searchsorted(bounds, position, side="right")
    assigned = {unique[i]: SPLITS[int(w)] for i, w in zip(order, which)}
    return [assigned[p] for p in ids]


def split_entries(
    entries: Sequence[dict], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, list[dict]]:
    """Patient-wise split of datalist entries (each with ``patient_id``) into the three splits."""
    names = patient_split([e["patient_id"] for e in entries], fractions, seed)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry, name in zip(entries, names):
        out[name].append(entry)
    return out


def make_datalist(splits: Mapping[str, Sequence[dict]], class_names: Sequence[str], **extra: Any) -> dict:
    """Assembles a datalist dict: ``class_names``, then every split (missing ones empty), then `extra` keys."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DatalistError(f"unknown split names {bad}; accepted: {list(SPLITS)}")
    d: dict[str, Any] = {"class_names": list(class_names)}
    for s in SPLITS:
        d[s] = list(splits.get(s, []))
    d.update(extra)
    return d


def patient_overlap(datalist: Mapping[str, Any]) -> dict[tuple[str, str], set[str]]:
    """Patients that appear in two splits: {(split_a, split_b): {patient ids}} (empty when there is no leakage)."""
    patients = {s: {str(e.get("patient_id")) for e in datalist.get(s, []) if "patient_id" in e} for s in SPLITS}
    out = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            both = patients[a] & patients[b]
            if both:
                out[(a, b)] = both
    return out


def check_patient_overlap(
    datalist: Mapping[str, Any], what: str, shown: int = 5, log: logging.Logger | None = None
) -> dict[str, dict[str, Any]]:
    """Checks that no patient is in two splits of `datalist`, the one check every builder makes (official
    splits, split folders, an existing JSON; a seeded patient-wise split passes by construction).

    A patient in two splits is **warned about, not refused**: an official split is the source's own and
    stays as published (refusing would leave no way to build it), but the warning names the pairs of splits,
    how many patients each shares and the first `shown` of them, so that the leak can be fixed or reported.

    Args:
        datalist: a datalist dict (entries with ``patient_id``).
        what: what the splits come from, for the message (e.g. ``"train_val_list.txt / test_list.txt"``).
        shown: how many patient ids to name per pair of splits.
        log: the logger the warning goes through (default: this module's).

    Returns:
        ``{"training/test": {"count": n, "patients": [first ids, sorted]}, ...}`` for each pair of splits that
        share patients; empty when none do.
    """
    leaks = patient_overlap(datalist)
    out: dict[str, dict[str, Any]] = {}
    for (a, b), patients in leaks.items():
        ids = sorted(patients, key=lambda p: (len(p), p))
        out[f"{a}/{b}"] = {"count": len(ids), "patients": ids[:shown]}
    if out:
        total = len(set().union(*leaks.values()))
        detail = "; ".join(f"{pair}: {v['count']} patient(s), e.g. {v['patients']}" for pair, v in out.items())
        (log or logger).warning("%s: %d patient(s) are in two splits (%s); their images leak between the "
                                "splits", what, total, detail)
    return out


class RowAccounting:
    """What a datalist builder did with every row it read: how many it read, how many it kept, and how many
    each filter left out and why, so that ``read == kept + left out``.

    Every builder fills one: :meth:`read` for the rows it reads, :meth:`drop` for the rows a filter leaves
    out (with the filter, the reason and the rows' ids), then :meth:`finish` with the datalist it built. That
    checks that the numbers add up, checks the splits for patients in two of them
    (:func:`check_patient_overlap`), logs one warning per filter and reason (count and first ids) and stores
    :meth:`as_dict` in the datalist under ``"rows"``, which ``python -m hmn datalist`` prints
    (:func:`accounting_lines`).

    Args:
        what: what the rows come from, for messages (the table's path, or the source's name).
        unit: what the rows are, plural (``"rows"``, ``"images"``, ``"files"``).
        log: the builder's logger, which the warnings go through (default: this module's).
    """

    SHOWN = 5

    def __init__(self, what: str, unit: str = "rows", log: logging.Logger | None = None):
        self.what = str(what)
        self.log = log or logger
        self.unit = unit
        self.n_read = 0
        self._dropped: dict[tuple[str, str], list[str]] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self.overlap: dict[str, dict[str, Any]] = {}

    def read(self, n: int) -> None:
        """Counts `n` more rows read."""
        self.n_read += int(n)

    def drop(self, by: str, reason: str, ids: Iterable[Any]) -> int:
        """Counts the rows `ids` (one id per row left out, e.g. image names) as left out by the filter `by`
        (an option such as ``"views"``, or the builder's step such as ``"labels"``) for `reason`; returns how
        many. Nothing is counted for an empty `ids`."""
        ids = [str(i) for i in ids]
        if ids:
            key = (str(by), str(reason))
            self._counts[key] = self._counts.get(key, 0) + len(ids)
            shown = self._dropped.setdefault(key, [])
            shown.extend(ids[: max(self.SHOWN - len(shown), 0)])
        return len(ids)

    @property
    def n_dropped(self) -> int:
        return sum(self._counts.values())

    def dropped(self) -> list[dict[str, Any]]:
        """``[{"filter", "reason", "count", "examples"}]`` in the order the reasons were first met."""
        return [{"filter": f, "reason": r, "count": n, "examples": list(self._dropped[(f, r)])}
                for (f, r), n in self._counts.items()]

    def as_dict(self, kept: int) -> dict[str, Any]:
        """``{"unit", "read", "kept", "dropped": [...], "patients_in_two_splits"?}``, the ``"rows"`` record."""
        out: dict[str, Any] = {"unit": self.unit, "read": self.n_read, "kept": int(kept), "dropped": self.dropped()}
        if self.overlap:
            out["patients_in_two_splits"] = self.overlap
        return out

    def finish(self, datalist: dict, overlap_what: str | None = None) -> dict:
        """Checks the counts against `datalist`'s entries, checks its splits for shared patients
        (:func:`check_patient_overlap`, naming them `overlap_what`, default the rows' source), logs a warning
        per filter and reason, and stores the accounting in ``datalist["rows"]``; returns `datalist`.

        Raises:
            RuntimeError: the entries and the rows left out do not add up to the rows read (a builder's bug).
        """
        kept = sum(len(datalist.get(s) or []) for s in SPLITS)
        if kept + self.n_dropped != self.n_read:
            raise RuntimeError(f"{self.what}: {self.n_read} {self.unit} read but {kept} kept and {self.n_dropped} "
                               f"left out ({self._counts}); the builder lost count of some rows")
        for d in self.dropped():
            self.log.warning("%s: %d of %d %s left out by %s: %s, e.g. %s", self.what, d["count"],
                             self.n_read, self.unit, d["filter"], d["reason"], d["examples"])
        self.overlap = check_patient_overlap(datalist, overlap_what or self.what, log=self.log)
        datalist["rows"] = self.as_dict(kept)
        return datalist


def accounting_lines(datalist: Mapping[str, Any]) -> list[str]:
    """The lines ``python -m hmn datalist`` prints for a datalist's ``"rows"`` record (none without one):
    rows read, kept and left out, then one line per filter and reason, then the patients in two splits."""
    rows = datalist.get("rows")
    if not isinstance(rows, Mapping):
        return []
    unit = rows.get("unit", "rows")
    dropped = list(rows.get("dropped") or [])
    n_out = sum(int(d["count"]) for d in dropped)
    out = [f"{rows.get('read')} {unit} read, {rows.get('kept')} kept, {n_out} left out"]
    for d in dropped:
        out.append(f"  left out by {d['filter']}: {d['count']} ({d['reason']}), e.g. {', '.join(d['examples'])}")
    for pair, v in (rows.get("patients_in_two_splits") or {}).items():
        out.append(f"  patients in two splits, {pair}: {v['count']}, e.g. {', '.join(map(str, v['patients']))}")
    return out


def _relativize(path: str, base: str) -> str:
    """`path` (absolute, or relative to the working directory, as the builders give it) as a path relative
    to `base` when it lies under it, else absolute: either way it resolves as MONAI and
    :func:`load_datalist` read a datalist, against the JSON's own folder."""
    path = os.path.abspath(path)
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # other drive on Windows
        return path
    if not rel.startswith(".."):
        return rel.replace(os.sep, "/")
    return path


def write_datalist(datalist: Mapping[str, Any], path: str | os.PathLike, relative: bool = True) -> str:
    """Writes `datalist` as JSON to `path` (atomically).

    Image paths in `datalist` are absolute or relative to the working directory (what the builders make
    of ``--images``). They are written so that they resolve wherever the JSON is read from: relative to
    the JSON's own folder when the image lies under it and `relative`, absolute otherwise.

    Returns the path written.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    os.makedirs(base, exist_ok=True)
    out = dict(datalist)
    for s in SPLITS:
        if s in out:
            out[s] = [{**e, "image": _relativize(str(e["image"]), base) if relative else os.path.abspath(str(e["image"]))}
                      for e in out[s]]
    from hmn.durable import atomic_write

    return atomic_write(path, lambda f: json.dump(out, f, indent=1))


def read_datalist(path: str | os.PathLike) -> dict:
    """Reads a datalist JSON (no checks, paths as written); raises :class:`DatalistError` for unreadable JSON."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist file not found") from None
    except json.JSONDecodeError as e:
        raise DatalistError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatalistError(f"{path}: a datalist must be a JSON object with 'training'/'validation'/'test' lists")
    return data


def load_datalist(
    path: str | os.PathLike,
    split: str | None = None,
    check_files: bool = True,
    base_dir: str | os.PathLike | None = None,
    metadata: bool = False,
) -> Any:
    """Reads a datalist, resolves relative image paths and validates every entry.

    Args:
        path: the datalist JSON.
        split: return only this split's list ("training", "validation" or "test"); None returns the dict.
        check_files: raise :class:`DatalistError` naming the split, index and path of each missing file.
        base_dir: folder relative image paths are resolved against (default: the JSON's folder).
        metadata: keep the entries' ``age``, ``sex`` and ``view`` (:data:`hmn.data.vocabulary.METADATA_KEYS`).
            By default they are left out: a batch of entries where some lack a key cannot be collated, and
            the network does not use them; the evaluation report reads them with :func:`datalist_metadata`.

    A bundle config can use it as ``{"_target_": "hmn.data.load_datalist", "path": "...", "split": "training"}``.
    """
    path = os.fspath(path)
    data = read_datalist(path)
    base = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(path))
    names = data.get("class_names")
    n_classes = len(names) if isinstance(names, list) else None
    missing: list[str] = []
    for s in SPLITS:
        items = data.get(s, [])
        if not isinstance(items, list):
            raise DatalistError(f"{path}: '{s}' must be a list of entries, got {type(items).__name__}")
        resolved = []
        for i, e in enumerate(items):
            if not isinstance(e, dict) or "image" not in e:
                raise DatalistError(f"{path}: {s}[{i}] has no 'image' key")
            img = e["image"]
            full = img if os.path.isabs(img) else os.path.normpath(os.path.join(base, img))
            label = e.get("label")
            if n_classes is not None and label is not None and isinstance(label, list) and len(label) != n_classes:
                raise DatalistError(
                    f"{path}: {s}[{i}] ({img}) has {len(label)} labels but class_names has {n_classes}"
                )
            if check_files and not os.path.exists(full):
                missing.append(f"{s}[{i}]: {full}")
            entry = {**e, "image": full}
            if not metadata:
                for key in METADATA_KEYS:
                    entry.pop(key, None)
            resolved.append(entry)
        data[s] = resolved
    if missing:
        shown = "; ".join(missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatalistError(f"{path}: {len(missing)} image file(s) listed but missing: {shown}{more}")
    if split is not None:
        if split not in SPLITS:
            raise DatalistError(f"split {split!r} is not one of {list(SPLITS)}")
        return data[split]
    return data


def datalist_metadata(path: str | os.PathLike, split: str | None = None) -> dict[str, dict[str, Any]]:
    """``{resolved image path: {"age", "sex", "view"}}`` of a datalist's entries (those that carry any),
    for the evaluation report's subgroups; `split` limits it to one split. Files are not checked."""
    data = load_datalist(path, split, check_files=False, metadata=True)
    entries = data if split is not None else [e for s in SPLITS for e in data.get(s, [])]
    out = {}
    for e in entries:
        meta = {k: e[k] for k in METADATA_KEYS if e.get(k) is not None}
        if meta:
            out[e["image"]] = meta
    return out


def summarize(datalist: Mapping[str, Any]) -> str:
    """A text table of images, patients and positives per class in each split."""
    names = list(datalist.get("class_names") or [])
    if not names:
        for s in SPLITS:
            for e in datalist.get(s, []):
                if isinstance(e.get("label"), list):
                    names = [f"class_{i}" for i in range(len(e["label"]))]
                    break
            if names:
                break
    width = max([len(n) for n in names] + [14])
    header = f"{'':<{width}}" + "".join(f"{s:>12}" for s in SPLITS)
    rows = [header]
    per_split = {s: list(datalist.get(s, [])) for s in SPLITS}
    rows.append(f"{'images':<{width}}" + "".join(f"{len(per_split[s]):>12}" for s in SPLITS))
    rows.append(
        f"{'patients':<{width}}"
        + "".join(f"{len({str(e.get('patient_id')) for e in per_split[s]}):>12}" for s in SPLITS)
    )
    counts = {}
    for s in SPLITS:
        labelled = [e["label"] for e in per_split[s] if isinstance(e.get("label"), list)]
        arr = np.asarray(labelled, dtype=np.float64).reshape(len(labelled), -1) if labelled else np.zeros((0, len(names)))
        counts[s] = arr
    for i, n in enumerate(names):
        rows.append(
            f"{n:<{width}}"
            + "".join(f"{int((counts[s][:, i] > 0).sum()) if counts[s].shape[1] > i else 0:>12}" for s in SPLITS)
        )
    rows.append(
        f"{'(no finding)':<{width}}"
        + "".join(f"{int((counts[s].sum(axis=1) == 0).sum()) if len(counts[s]) else 0:>12}" for s in SPLITS)
    )
    masked = {s: sum(1 for e in per_split[s] if e.get("label_mask") and 0 in e["label_mask"]) for s in SPLITS}
    if any(masked.values()):
        rows.append(f"{'(with ignored)':<{width}}" + "".join(f"{masked[s]:>12}" for s in SPLITS))
    return "\n".join(rows)


def label_counts(entries: Iterable[Mapping[str, Any]], class_names: Sequence[str], split: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Per class, how many entries have a *known* label (finite, not below 0, and ``label_mask`` not 0
    where there is one) and how many of those are positive (1): two int arrays of length K.

    Raises:
        ValueError: an entry's label does not have one value per class; the message names the image.
    """
    k = len(class_names)
    known = np.zeros(k, dtype=np.int64)
    positives = np.zeros(k, dtype=np.int64)
    for e in entries:
        label = np.asarray(e["label"], dtype=np.float64).reshape(-1)
        if label.size != k:
            raise ValueError(f"{split + ' ' if split else ''}entry {e.get('image')}: {label.size} labels for {k} classes "
                             f"{list(class_names)}")
        ok = np.isfinite(label) & (label >= 0)
        if e.get("label_mask") is not None:
            ok &= np.asarray(e["label_mask"], dtype=np.float64).reshape(-1) > 0
        known += ok
        positives += ok & (label == 1)
    return known, positives


def classes_without_positives(datalist: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per non-empty labelled split, the classes with no positive label there (a label of 1 whose
    ``label_mask``, if any, is not 0); splits where every class has one are not listed."""
    names = list(datalist.get("class_names") or [])
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        entries = [e for e in datalist.get(split, []) if isinstance(e.get("label"), list)]
        if not entries or not names:
            continue
        _, positives = label_counts(entries, names, split)
        missing = [n for n, p in zip(names, positives) if not p]
        if missing:
            out[split] = missing
    return out


def find_images(root: str, extensions: Iterable[str] = IMAGE_EXTENSIONS, extensionless: bool = True) -> list[str]:
    """All image files under `root` (recursively, sorted), by extension; files without one are included
    when `extensionless` (DICOM files often have none)."""
    exts = tuple(e.lower() for e in extensions)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            low = name.lower()
            if name.startswith("."):
                continue
            if low.endswith(exts) or (extensionless and "." not in name):
                out.append(os.path.join(folder, name))
    return out


VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".hdr")  # NIfTI, and Analyze by its header file
_SERIES_EXTENSIONS = (".dcm", ".dicom", ".ima")


def find_volumes(root: str) -> list[str]:
    """The volumes under `root` (recursively, sorted): NIfTI/Analyze files, and every folder that directly
    holds DICOM files (``.dcm``, ``.dicom``, ``.ima`` or extensionless), taken as one DICOM series, as
    :class:`hmn.transforms.LoadXray` reads a series folder. The slices of a series are not listed apart.

    Raises:
        ValueError: a folder holds both DICOM slices and volume files, so which is the study is ambiguous.
    """
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        names = [n for n in sorted(files) if not n.startswith(".")]
        vols = [n for n in names if n.lower().endswith(VOLUME_EXTENSIONS)]
        slices = [n for n in names if n.lower().endswith(_SERIES_EXTENSIONS) or "." not in n]
        if vols and slices:
            raise ValueError(f"{folder} holds both volume files ({vols[0]}, ...) and DICOM slices ({slices[0]}, ...); "
                             "put each DICOM series in a folder of its own")
        out.extend(os.path.join(folder, n) for n in vols)
        if slices:
            out.append(folder)
    return out
