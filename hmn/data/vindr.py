"""VinDr-CXR (Nguyen et al., "VinDr-CXR: An open dataset of chest X-rays with radiologist's annotations",
Scientific Data 2022; PhysioNet release 1.0.0).

:func:`vindr_cxr_datalist` reads the image-level label tables of the PhysioNet release::

    <root>/
      annotations/image_labels_train.csv   image_id, rad_id (or rad_ID), 28 label columns of 0/1;
                                           THREE rows per training image, one per radiologist
      annotations/image_labels_test.csv    image_id, [rad_id,] the same label columns; ONE row per test
                                           image, the consensus of five radiologists
      train/<image_id>.dicom
      test/<image_id>.dicom

The label columns are the 22 local findings and 6 global diagnoses of :data:`VINDR_CXR_CLASSES`
("Other disease" and "Other diseases" are both read as ``"Other diseases"``). The bounding-box tables
(``annotations_*.csv``) and the Kaggle "VinBigData" competition's box table (``train.csv`` with
``class_name``, ``x_min``, ...) are not read: the builder says so when given one.

Every image of the tables is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the
datalist, counted in images: a training image's reader rows are combined into one, never left out). The
builder has no filter that leaves an image out: the accounting says so (read = kept).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .datalist import (
    SPLITS, DatalistError, RowAccounting, check_images_exist, make_datalist, patient_split, read_table,
    require_columns,
)
from .dicom_metadata import add_dicom_metadata
from .vocabulary import CANONICAL_FINDINGS, VOCABULARY_VERSION, canonical_name, source_labels_for

__all__ = ["COMBINE_RULES", "VINDR_CXR_CLASSES", "vindr_cxr_datalist"]

logger = logging.getLogger(__name__)

SOURCE = "vindr-cxr"

# The image-level labels in the order of the published tables' columns (local findings, then global labels).
VINDR_CXR_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung cavity", "Lung cyst", "Lung Opacity",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
)
COMBINE_RULES = ("majority", "any", "all")

_BY_LOWER = {c.lower(): c for c in VINDR_CXR_CLASSES}
_BY_LOWER["other disease"] = "Other diseases"
_KAGGLE_COLUMNS = {"class_name", "class_id", "x_min", "y_min", "x_max", "y_max"}


def _published_name(column: str) -> str | None:
    return _BY_LOWER.get(str(column).strip().lower())


class _Table:
    """One image-level label table: image ids (one per row) and its label columns by published name."""

    def __init__(self, csv: str, kind: str):
        self.csv = csv
        what = f"the VinDr-CXR {kind} label table"
        hint = f"expected annotations/image_labels_{kind}.csv under the data set's root"
        df = read_table(csv, what, hint=hint, dtype=str, keep_default_na=False)
        lower = {str(c).strip().lower(): c for c in df.columns}
        if _KAGGLE_COLUMNS & set(lower):
            raise DatalistError(
                f"{csv}: this is a bounding-box table (one row per box, with class_name/x_min/...: the Kaggle "
                "VinBigData train.csv or VinDr-CXR's annotations_*.csv), which is not read; give the image-level "
                "tables of VinDr-CXR 1.0.0, annotations/image_labels_train.csv and annotations/image_labels_test.csv"
            )
        if "image_id" not in lower:  # matched stripped and in any case; the message shows the columns as found
            require_columns(csv, what, list(df.columns), ("image_id",), hint)
        self.ids = df[lower["image_id"]].str.strip().tolist()
        blank = [i for i, v in enumerate(self.ids) if not v]
        if blank:
            raise DatalistError(f"{csv}: empty image_id in row {blank[0] + 2}")
        self.columns: dict[str, str] = {}  # published name -> column in df
        unknown = []
        for low, col in lower.items():
            if low in ("image_id", "rad_id"):
                continue
            name = _published_name(low)
            if name is None:
                unknown.append(col)
            elif name in self.columns:
                raise DatalistError(f"{csv}: columns {self.columns[name]!r} and {col!r} both give label {name!r}")
            else:
                self.columns[name] = col
        if not self.columns:
            raise DatalistError(f"{csv}: no VinDr-CXR label columns; accepted: {list(VINDR_CXR_CLASSES)}")
        if unknown:
            logger.warning("%s: column(s) %s are not VinDr-CXR labels and were left out", csv, unknown)
        self.df = df

    def values(self, names: Sequence[str]) -> np.ndarray:
        """The 0/1 values of the labels `names` as an (rows, len(names)) int array; DatalistError on others."""
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DatalistError(f"{self.csv}: missing label column(s) {missing}; found {sorted(self.columns)}")
        out = np.zeros((len(self.ids), len(names)), dtype=np.int64)
        for j, name in enumerate(names):
            col = self.df[self.columns[name]].str.strip()
            ok = col.isin(("0", "1", "0.0", "1.0")).to_numpy()
            if not ok.all():
                r = int(np.flatnonzero(~ok)[0])
                raise DatalistError(
                    f"{self.csv}: value {col.iloc[r] or '(blank)'!r} in column {name!r} (row {r + 2}, image_id "
                    f"{self.ids[r]!r}); accepted: 0 or 1"
                )
            out[:, j] = col.astype(float).astype(np.int64).to_numpy()
        return out


def _output_classes(
    available: Sequence[str], classes: Sequence[str] | None, vocabulary: bool
) -> tuple[list[str], list[list[str]]]:
    """The output class names and, for each, the VinDr-CXR labels whose union it is."""
    if not vocabulary:
        if classes is None:
            names = [c for c in VINDR_CXR_CLASSES if c in available and c != "No finding"]
            return names, [[c] for c in names]
        names = []
        for c in classes:
            name = _published_name(c)
            if name is None or name not in available:
                raise DatalistError(f"class {c!r} is not a label of this VinDr-CXR table; accepted: "
                                    f"{[x for x in VINDR_CXR_CLASSES if x in available]}")
            names.append(name)
        return names, [[c] for c in names]

    def sources(finding: str) -> list[str]:
        found = (_published_name(s) for s in source_labels_for(SOURCE, finding))
        return list(dict.fromkeys(s for s in found if s is not None and s in available))

    if classes is None:
        names = [f for f in CANONICAL_FINDINGS if f != "No Finding" and sources(f)]
        return names, [sources(f) for f in names]
    names, groups = [], []
    for c in classes:
        if c in CANONICAL_FINDINGS:
            if not sources(c):
                raise DatalistError(f"no VinDr-CXR label of this table maps to the finding {c!r}; findings available: "
                                    f"{[f for f in CANONICAL_FINDINGS if sources(f)]}")
            names.append(c)
            groups.append(sources(c))
            continue
        own = _published_name(c)
        if own is None or own not in available:
            raise DatalistError(f"class {c!r} is neither a canonical finding nor a VinDr-CXR label of this table; "
                                f"accepted: {list(CANONICAL_FINDINGS)}, or a label without a canonical counterpart "
                                f"by its own name: {[x for x in available if canonical_name(SOURCE, x) is None]}")
        target = canonical_name(SOURCE, own)
        if target is not None:
            raise DatalistError(f"with vocabulary=True classes are canonical findings: VinDr-CXR {own!r} is {target!r}")
        names.append(own)
        groups.append([own])
    return names, groups


def _merge(values: np.ndarray, groups: Sequence[Sequence[str]], columns: Sequence[str]) -> np.ndarray:
    """(rows, len(columns)) -> (rows, len(groups)): each output class is positive when any of its labels is."""
    index = {c: j for j, c in enumerate(columns)}
    out = np.zeros((values.shape[0], len(groups)), dtype=np.int64)
    for k, group in enumerate(groups):
        out[:, k] = values[:, [index[c] for c in group]].max(axis=1)
    return out


def _combine(ids: Sequence[str], rows: np.ndarray, rule: str, readers: int, csv: str) -> tuple[list[str], np.ndarray]:
    """Per image (in first-appearance order), the readers' rows combined by `rule`."""
    order: dict[str, list[int]] = {}
    for r, i in enumerate(ids):
        order.setdefault(i, []).append(r)
    images = list(order)
    out = np.zeros((len(images), rows.shape[1]), dtype=np.int64)
    odd: dict[int, list[str]] = {}
    for k, image in enumerate(images):
        idx = order[image]
        n = len(idx)
        if n != readers:
            odd.setdefault(n, []).append(image)
        votes = rows[idx].sum(axis=0)
        if rule == "majority":
            out[k] = 2 * votes > n
        elif rule == "any":
            out[k] = votes >= 1
        else:
            out[k] = votes == n
    for n, which in sorted(odd.items()):
        logger.warning("%s: %d image(s) have %d reader row(s) instead of %d, e.g. %s; their labels are the %s of "
                       "those %d", csv, len(which), n, readers, which[:3], rule, n)
    return images, out


def vindr_cxr_datalist(
    root: str | os.PathLike,
    train_csv: str | os.PathLike | None = None,
    test_csv: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    combine: str = "majority",
    readers: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    extension: str = ".dicom",
    vocabulary: bool = False,
    read_metadata: bool = False,
    check_files: bool = True,
) -> dict:
    """Builds a datalist from VinDr-CXR 1.0.0's image-level label tables (layout in the module docstring).

    Splits: the official ones. The test table's images are the test split (labels as given: the
    five-radiologist consensus); validation is a seeded `val_fraction` of the training images. VinDr-CXR
    publishes no patient id (the images were de-identified one by one), so each image is its own patient:
    ``patient_id`` is the image id, and the validation split is image-wise.

    Readers: each training image has a row per radiologist (three). A class is positive for the image by
    `combine`: ``"majority"`` when more than half of the image's readers mark it (2 of 3), ``"any"`` when at
    least one does, ``"all"`` when every reader does. Images with another number of rows than `readers`
    are kept, combined over the rows they have (majority of 2 means both), and named in a warning with the
    count. With `vocabulary`, each reader's labels are mapped first (a reader who marks Rib fracture or
    Clavicle fracture marks Fracture) and the readers are combined per canonical finding.

    Args:
        root: the release's folder, holding ``annotations/``, ``train/`` and ``test/``.
        train_csv: the training table (default ``<root>/annotations/image_labels_train.csv``).
        test_csv: the test table (default ``<root>/annotations/image_labels_test.csv``; when that default is
            absent the test split is empty, with a warning).
        image_root: folder holding ``train/`` and ``test/`` (default: `root`).
        classes: output classes. Without `vocabulary`: VinDr-CXR label names (matched case-insensitively;
            default every label column except "No finding": an all-zero label means no finding). With
            `vocabulary`: canonical findings (:data:`hmn.data.vocabulary.CANONICAL_FINDINGS`), or a label
            without canonical counterpart by its own name (e.g. "COPD"); default every finding some column
            maps to, except "No Finding".
        combine: ``"majority"``, ``"any"`` or ``"all"`` (see above).
        readers: the number of reader rows expected per training image.
        val_fraction: share of the training images moved to validation, in [0, 1).
        seed: seed of the validation carve.
        extension: image file extension (``".dicom"`` as published; e.g. ``".png"`` for a converted copy).
        vocabulary: write canonical class names and record ``"vocabulary"`` (module
            :mod:`hmn.data.vocabulary`); "Nodule/Mass" stays "Nodule/Mass".
        read_metadata: add ``age``, ``sex`` and ``view`` from each existing file's DICOM header (keys left
            out where unknown; see :func:`hmn.data.dicom_metadata.read_dicom_metadata`).
        check_files: raise if an image file is missing.

    Returns:
        the datalist dict: entries ``{"image", "label" (one 0/1 per class), "patient_id"}`` (plus
        ``age``/``sex``/``view`` with `read_metadata`), ``"source": "vindr-cxr"`` and
        ``"reader_combination"``; ``"vocabulary"`` with `vocabulary`.

    Raises:
        DatalistError: a table is missing or malformed (the message names the file, row and column, and what
            is accepted), an unknown `combine`/`classes`, an image id in both tables, missing image files.
    """
    if combine not in COMBINE_RULES:
        raise DatalistError(f"combine={combine!r}; accepted: {list(COMBINE_RULES)} (how the three radiologists' "
                            "labels of a training image are combined)")
    if isinstance(readers, bool) or not isinstance(readers, (int, np.integer)) or readers < 1:
        raise DatalistError(f"readers={readers!r}; expected a whole number of reader rows per image, at least 1")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DatalistError(f"val_fraction={val_fraction}; accepted: a number in [0, 1)")
    root = os.fspath(root)
    default = os.path.join(root, "annotations", "image_labels_{}.csv")
    train_path = os.fspath(train_csv) if train_csv is not None else default.format("train")
    test_path: str | None = os.fspath(test_csv) if test_csv is not None else default.format("test")
    if test_csv is None and not os.path.exists(test_path):
        logger.warning("%s not found: the test split is empty", test_path)
        test_path = None
    images = os.fspath(image_root) if image_root is not None else root
    ext = extension if extension.startswith(".") or not extension else "." + extension

    train = _Table(train_path, "train")
    test = _Table(test_path, "test") if test_path is not None else None
    names, groups = _output_classes(list(train.columns), classes, vocabulary)
    needed = list(dict.fromkeys(c for g in groups for c in g))

    train_rows = _merge(train.values(needed), groups, needed)
    train_ids, train_labels = _combine(train.ids, train_rows, combine, int(readers), train_path)
    rows = RowAccounting(train_path + (f", {test_path}" if test is not None else ""), "images", log=logger)
    rows.read(len(train_ids) + (len(test.ids) if test is not None else 0))
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    carve = patient_split(train_ids, (1.0 - float(val_fraction), float(val_fraction), 0.0), seed)
    for image_id, label, split in zip(train_ids, train_labels.tolist(), carve):
        out[split].append({"image": os.path.join(images, "train", image_id + ext), "label": label,
                           "patient_id": image_id})
    if test is not None:
        seen: dict[str, int] = {}
        for r, image_id in enumerate(test.ids):
            if image_id in seen:
                raise DatalistError(
                    f"{test_path}: image_id {image_id!r} in rows {seen[image_id] + 2} and {r + 2}; the test table "
                    "has one (consensus) row per image"
                )
            seen[image_id] = r
        both = sorted(set(seen) & set(train_ids))
        if both:
            raise DatalistError(f"{len(both)} image id(s) are in both {train_path} and {test_path}, e.g. {both[:3]}")
        test_labels = _merge(test.values(needed), groups, needed)
        for image_id, label in zip(test.ids, test_labels.tolist()):
            out["test"].append({"image": os.path.join(images, "test", image_id + ext), "label": label,
                                "patient_id": image_id})
    everything = [e for s in SPLITS for e in out[s]]
    if check_files:
        check_images_exist([e["image"] for e in everything], "VinDr-CXR image(s)", f"images are looked for at "
                           f"<image_root>/train/<image_id>{ext} and test/...; set image_root / extension")
    if read_metadata:
        add_dicom_metadata(everything, "VinDr-CXR")
    logger.info("VinDr-CXR: %d training, %d validation, %d test image(s); readers combined by %s",
                *(len(out[s]) for s in SPLITS), combine)
    extra = {"source": SOURCE, "reader_combination": combine}
    if vocabulary:
        extra["vocabulary"] = VOCABULARY_VERSION
    return rows.finish(make_datalist(out, names, **extra))
