"""Datalists from a folder-per-class layout, and from an existing MONAI datalist JSON.

Folder layout (single-label; each class folder's images are positive for that class only)::

    root/<class>/<image>                       -> one pool, split patient-wise
    root/{train,val,test}/<class>/<image>      -> the folders are the splits

A ``negative_class`` folder (e.g. "No Finding" or "normal") gives all-zero labels.

Every file is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the datalist, printed
by ``python -m hmn datalist folder``): a file inside a class folder that is not an image by its extension
(or, for volumes, neither a volume file nor a DICOM slice), and a file outside every class folder, are
counted as left out with the first names. Hidden files and folders (names starting with ``.``) are not
read. Split folders are checked for patients in two of them (a warning naming them).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from .datalist import (
    _SERIES_EXTENSIONS,
    IMAGE_EXTENSIONS,
    SPLITS,
    VOLUME_EXTENSIONS,
    DatalistError,
    RowAccounting,
    find_images,
    find_volumes,
    make_datalist,
    read_datalist,
    split_entries,
)

__all__ = ["folder_datalist", "json_datalist"]

logger = logging.getLogger(__name__)

_SPLIT_FOLDERS = {
    "train": "training", "training": "training",
    "val": "validation", "valid": "validation", "validation": "validation",
    "test": "test", "testing": "test",
}


def _patient_of(path: str, pattern: re.Pattern | None) -> str:
    name = os.path.basename(path)
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else os.path.splitext(name)[0]
    if pattern is None:
        return stem
    m = pattern.search(name)
    if not m:
        raise DatalistError(f"{path}: file name does not match patient_regex {pattern.pattern!r}")
    return m.group(1) if m.groups() else m.group(0)


def _files_under(folder: str) -> list[str]:
    """Every file under `folder` (recursively) whose name does not start with "." (as find_images walks)."""
    out = []
    for base, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(base, f) for f in sorted(files) if not f.startswith("."))
    return out


def _covered_by_volumes(taken: list[str]) -> set[str]:
    """The files the volume entries `taken` (files and DICOM series folders) stand for: each volume file, an
    Analyze header's ``.img``, and every DICOM slice of each series folder."""
    covered: set[str] = set()
    for t in taken:
        if os.path.isdir(t):
            covered.update(os.path.join(t, n) for n in os.listdir(t)
                           if n.lower().endswith(_SERIES_EXTENSIONS) or "." not in n)
        else:
            covered.add(t)
            if t.lower().endswith(".hdr"):
                covered.add(t[:-4] + ".img")
                covered.add(t[:-4] + ".IMG")
    return covered


def folder_datalist(
    root: str | os.PathLike,
    negative_class: str | None = None,
    patient_regex: str | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    volumes: bool = False,
) -> dict:
    """Builds a datalist from a folder per class.

    Args:
        root: the folder holding one sub-folder per class, or train/val/test folders that each do.
        negative_class: name of the folder whose images have no finding (all-zero label).
        patient_regex: regular expression on the file name whose first group (or whole match) is the
            patient id, e.g. ``r"^(\\d+)_"`` for NIH names. Without it each image is its own patient
            and a warning says that the split cannot be patient-wise.
        fractions: (training, validation, test) fractions when there are no split folders.
        seed: seed of the patient shuffle.
        extensions: image file extensions (files without an extension, as DICOMs often are, count too).
        volumes: take CT/MR studies instead of images (the 3D bundles): each NIfTI/Analyze file and each
            folder directly holding DICOM files (one series) is one entry (:func:`hmn.data.datalist.find_volumes`);
            `extensions` is then unused. A series folder's name is its file name for `patient_regex`.

    Returns:
        the datalist dict; ``class_names`` are the sorted class folder names without `negative_class`;
        ``"rows"`` records the files read, kept and left out per reason (module docstring).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatalistError(f"{root}: not a folder")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    split_dirs = {d: _SPLIT_FOLDERS[d.lower()] for d in subdirs if d.lower() in _SPLIT_FOLDERS}
    layout = {s: os.path.join(root, d) for d, s in split_dirs.items()} if split_dirs else {"": root}
    if split_dirs and len(split_dirs) != len(subdirs):
        others = sorted(set(subdirs) - set(split_dirs))
        raise DatalistError(f"{root}: mixes split folders {sorted(split_dirs)} with other folders {others}")
    class_dirs: dict[str, list[tuple[str, str]]] = {}
    for s, base in layout.items():
        for d in sorted(os.listdir(base)):
            if os.path.isdir(os.path.join(base, d)) and not d.startswith("."):
                class_dirs.setdefault(d, []).append((s, os.path.join(base, d)))
    if not class_dirs:
        raise DatalistError(f"{root}: no class folders found (expected root/<class>/<images>)")
    if negative_class is not None and negative_class not in class_dirs:
        raise DatalistError(f"{root}: negative_class {negative_class!r} is not a folder; found {sorted(class_dirs)}")
    classes = sorted(c for c in class_dirs if c != negative_class)
    pattern = re.compile(patient_regex) if patient_regex else None
    if pattern is None:
        logger.warning("%s: no patient_regex given, so every image is its own patient and splits are image-wise", root)
    rows = RowAccounting(root, "studies and other files" if volumes else "files", log=logger)
    outside = [os.path.join(base, f) for base in [root, *(b for s, b in layout.items() if s)]
               for f in sorted(os.listdir(base)) if os.path.isfile(os.path.join(base, f)) and not f.startswith(".")]
    rows.read(len(outside))
    rows.drop("layout", "not inside a class folder", outside)
    not_taken = ("neither a volume file (" + ", ".join(VOLUME_EXTENSIONS) + ") nor a DICOM slice" if volumes else
                 "not an image file by its extension (accepted: " + ", ".join(extensions) + ", or none)")
    per_split: dict[str, list[dict]] = {}
    for c, locations in class_dirs.items():
        label = [int(c == k) for k in classes]
        for s, folder in locations:
            files = find_volumes(folder) if volumes else find_images(folder, extensions)
            covered = _covered_by_volumes(files) if volumes else set(files)
            others = [f for f in _files_under(folder) if f not in covered]
            rows.read(len(files) + len(others))
            rows.drop("extensions" if not volumes else "volumes", not_taken, others)
            if not files:
                logger.warning("%s: class folder holds no images", folder)
            for f in files:
                per_split.setdefault(s, []).append({"image": f, "label": list(label), "patient_id": _patient_of(f, pattern)})
    if "" in per_split:
        splits = split_entries(sorted(per_split[""], key=lambda e: e["image"]), fractions, seed)
    else:
        splits = {s: sorted(per_split.get(s, []), key=lambda e: e["image"]) for s in SPLITS}
    datalist = make_datalist(splits, classes, source="folder")
    return rows.finish(datalist, f"{root}: the split folders" if "" not in per_split else None)


def _names_from(data: dict) -> list[str] | None:
    for key in ("class_names", "labels"):
        value = data.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, dict):  # decathlon style {"0": "name", ...}
            try:
                return [value[k] for k in sorted(value, key=lambda k: int(k))]
            except (TypeError, ValueError):
                return None
    return None


def json_datalist(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    check_files: bool = True,
    base_dir: str | os.PathLike | None = None,
) -> dict:
    """Reads an existing MONAI datalist JSON and returns it in this project's form.

    Accepts "training"/"validation"/"test" (or "testing") lists of entries with ``image`` and
    ``label`` as a multi-hot list or a class index (turned into one-hot). Entries without
    ``patient_id`` get their image's file stem (with a warning). When only "training" is present it is
    split patient-wise by `fractions`. Relative image paths are resolved against `base_dir` (default:
    the JSON's folder) and, with `check_files`, must exist. No entry is left out (a malformed one is an
    error); ``"rows"`` records the count, and splits sharing a patient are warned about, naming them.
    """
    path = os.fspath(path)
    data = read_datalist(path)
    base = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(path))
    if "testing" in data and "test" not in data:
        data["test"] = data.pop("testing")
    if not any(isinstance(data.get(s), list) and data.get(s) for s in SPLITS):
        raise DatalistError(f"{path}: no non-empty 'training', 'validation' or 'test' list")
    names = list(class_names) if class_names is not None else _names_from(data)
    n_classes = len(names) if names else None
    if n_classes is None:
        for s in SPLITS:
            for e in data.get(s) or []:
                if isinstance(e, dict) and isinstance(e.get("label"), list):
                    n_classes = len(e["label"])
                    break
            if n_classes:
                break
    entries: dict[str, list[dict]] = {}
    no_pid = 0
    missing: list[str] = []
    for s in SPLITS:
        out = []
        for i, e in enumerate(data.get(s) or []):
            if not isinstance(e, dict) or "image" not in e:
                raise DatalistError(f"{path}: {s}[{i}] has no 'image' key")
            img = e["image"]
            if not isinstance(img, str):
                raise DatalistError(f"{path}: {s}[{i}] 'image' must be one path, got {type(img).__name__}")
            full = img if os.path.isabs(img) else os.path.normpath(os.path.join(base, img))
            if check_files and not os.path.exists(full):
                missing.append(f"{s}[{i}]: {full}")
            item: dict[str, Any] = {**e, "image": full}
            label = e.get("label")
            if isinstance(label, bool) or (isinstance(label, (int, float)) and not isinstance(label, bool)):
                if n_classes is None or not 0 <= int(label) < n_classes:
                    raise DatalistError(
                        f"{path}: {s}[{i}] has class index {label}; give class_names to know the number of classes"
                    )
                item["label"] = [int(int(label) == k) for k in range(n_classes)]
            elif isinstance(label, list):
                if n_classes is not None and len(label) != n_classes:
                    raise DatalistError(f"{path}: {s}[{i}] has {len(label)} labels, expected {n_classes}")
            elif label is not None:
                raise DatalistError(f"{path}: {s}[{i}] label {label!r} is neither a multi-hot list nor a class index")
            if "patient_id" not in e:
                no_pid += 1
                item["patient_id"] = _patient_of(full, None)
            else:
                item["patient_id"] = str(e["patient_id"])
            out.append(item)
        entries[s] = out
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatalistError(f"{path}: {len(missing)} image file(s) listed but missing: {'; '.join(missing[:5])}{more}")
    if no_pid:
        logger.warning("%s: %d entries have no patient_id; their image file name stands in for it", path, no_pid)
    if entries["training"] and not entries["validation"] and not entries["test"]:
        entries = split_entries(entries["training"], fractions, seed)
    names = names or [f"class_{k}" for k in range(n_classes or 0)]
    datalist = make_datalist(entries, names, source="json")
    rows = RowAccounting(path, "entries", log=logger)
    rows.read(sum(len(v) for v in entries.values()))
    return rows.finish(datalist)
