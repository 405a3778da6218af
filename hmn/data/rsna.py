"""RSNA Pneumonia Detection Challenge (Shih et al., "Augmenting the National Institutes of Health Chest
Radiograph Dataset with Expert Annotations of Possible Pneumonia", Radiology: AI 2019; Kaggle, stage 2).

:func:`rsna_pneumonia_datalist` reads the challenge's training tables::

    <folder>/
      stage_2_train_labels.csv           patientId, x, y, width, height, Target: one row per box of a
                                         pneumonia-like lung opacity (Target 1); an image without one has a
                                         single row with Target 0 and a blank box
      stage_2_detailed_class_info.csv    patientId, class: "Lung Opacity", "No Lung Opacity / Not Normal"
                                         or "Normal" (optional; repeated once per box like the labels)
      stage_2_train_images/<patientId>.dcm

The stage 1 tables (``stage_1_train_labels.csv``, ...) have the same layout and are read the same way.
The test images (``stage_2_test_images/``) have no public labels and are not listed.

Every image is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the datalist, counted
in images, one per patientId): the label table's images are all kept; a patientId found only in the class
table has no Target and is counted as left out, with the first ids.
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
from .vocabulary import VOCABULARY_VERSION, canonical_name

__all__ = ["RSNA_DETAILED_CLASSES", "RSNA_NOT_NORMAL", "rsna_pneumonia_datalist"]

logger = logging.getLogger(__name__)

SOURCE = "rsna-pneumonia"
RSNA_NOT_NORMAL = "No Lung Opacity / Not Normal"
RSNA_DETAILED_CLASSES = ("Lung Opacity", RSNA_NOT_NORMAL, "Normal")
_BOX = ("x", "y", "width", "height")


def _read_csv(csv: str, required: Sequence[str], what: str):
    what = f"the RSNA {what}"
    df = read_table(csv, what, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    require_columns(csv, what, list(df.columns), required)
    df = df.apply(lambda col: col.str.strip())
    blank = np.flatnonzero((df["patientId"] == "").to_numpy())
    if blank.size:
        raise DatalistError(f"{csv}: empty patientId in row {int(blank[0]) + 2}")
    return df


def _targets(csv: str) -> dict[str, int]:
    """patientId -> 0/1 (first-appearance order), after checking every row and each image's rows agree."""
    df = _read_csv(csv, ("patientId", "Target"), "label table (stage_2_train_labels.csv)")
    box_cols = [c for c in _BOX if c in df.columns]
    if box_cols and len(box_cols) != len(_BOX):
        raise DatalistError(f"{csv}: box column(s) {[c for c in _BOX if c not in box_cols]} missing beside "
                            f"{box_cols}; the RSNA table has x, y, width, height")
    out: dict[str, int] = {}
    first_row: dict[str, int] = {}
    for r, (pid, target) in enumerate(zip(df["patientId"], df["Target"])):
        line = r + 2
        if target not in ("0", "1"):
            raise DatalistError(f"{csv}: Target {target or '(blank)'!r} in row {line} (patientId {pid!r}); "
                                "accepted: 0 or 1")
        t = int(target)
        if box_cols:
            filled = [c for c in _BOX if df[c].iat[r] != ""]
            if t == 1 and len(filled) != len(_BOX):
                raise DatalistError(f"{csv}: row {line}, patientId {pid!r}: Target 1 without a complete box "
                                    f"(x, y, width, height); a box is given exactly when Target is 1")
            if t == 0 and filled:
                raise DatalistError(f"{csv}: row {line}, patientId {pid!r}: Target 0 with box value(s) in "
                                    f"{filled}; a box is given exactly when Target is 1")
        if pid in out and out[pid] != t:
            raise DatalistError(f"{csv}: patientId {pid!r} has conflicting rows: Target {out[pid]} in row "
                                f"{first_row[pid] + 2} and Target {t} in row {line} (an image is either negative, "
                                "one Target 0 row, or has one Target 1 row per box)")
        if pid not in out:
            out[pid], first_row[pid] = t, r
    return out


def _detailed(csv: str, targets: dict[str, int], required: bool) -> dict[str, str]:
    """patientId -> detailed class, checked against the Target of `targets`."""
    df = _read_csv(csv, ("patientId", "class"), "class table (stage_2_detailed_class_info.csv)")
    out: dict[str, str] = {}
    for r, (pid, cls) in enumerate(zip(df["patientId"], df["class"])):
        if cls not in RSNA_DETAILED_CLASSES:
            raise DatalistError(f"{csv}: class {cls or '(blank)'!r} in row {r + 2} (patientId {pid!r}); accepted: "
                                f"{list(RSNA_DETAILED_CLASSES)}")
        if pid in out and out[pid] != cls:
            raise DatalistError(f"{csv}: patientId {pid!r} has conflicting classes {out[pid]!r} and {cls!r} "
                                f"(row {r + 2})")
        out[pid] = cls
    for pid, t in targets.items():
        cls = out.get(pid)
        if cls is not None and (cls == "Lung Opacity") != (t == 1):
            raise DatalistError(f"patientId {pid!r}: class {cls!r} in {csv} contradicts Target {t} of the label "
                                "table (class 'Lung Opacity' goes with Target 1, the others with Target 0)")
    absent = [p for p in targets if p not in out]
    if absent:
        message = f"{len(absent)} patientId(s) of the label table are not in {csv}, e.g. {absent[:3]}"
        if required:
            raise DatalistError(message + "; include_not_normal needs the class of every image")
        logger.warning("%s", message)
    return out


def rsna_pneumonia_datalist(
    labels_csv: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    class_info_csv: str | os.PathLike | None = None,
    include_not_normal: bool = False,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    vocabulary: bool = False,
    read_metadata: bool = False,
    check_files: bool = True,
) -> dict:
    """Builds a datalist from the RSNA Pneumonia Detection Challenge's training tables (layout in the module
    docstring): one entry per image, however many boxes it has.

    Label: ``"Pneumonia"`` is 1 when the image's rows have Target 1 (one or more boxes of a lung opacity
    the annotators took as evidence of pneumonia), 0 for its single Target 0 row. The table is checked:
    a box is given exactly when Target is 1, and an image's rows never mix Target 0 and 1.

    ``include_not_normal`` adds a second class, ``"No Lung Opacity / Not Normal"`` (from the detailed class
    table): images with another abnormality but no pneumonia-like opacity. It is never positive together
    with Pneumonia. It is useful as an auxiliary training target and to evaluate how a pneumonia model
    treats abnormal-but-not-pneumonia images (the hard negatives); it is not a finding, so it has no
    canonical name and keeps its own under `vocabulary`. "Normal" images are the all-zero label.

    Splits: a seeded split by `fractions`, patient-wise. In the challenge data each patientId has exactly
    one image, so ``patient_id`` is the patientId and the split is image-wise in effect.

    Args:
        labels_csv: ``stage_2_train_labels.csv``.
        image_root: folder of the ``<patientId>.dcm`` files (default: ``stage_2_train_images`` beside the CSV).
        class_info_csv: ``stage_2_detailed_class_info.csv``; when given, its classes are checked against
            Target. Needed for `include_not_normal`.
        include_not_normal: add the class "No Lung Opacity / Not Normal" (see above).
        fractions: (training, validation, test) fractions of the images.
        seed: seed of the shuffle.
        vocabulary: record ``"vocabulary"`` (:mod:`hmn.data.vocabulary`); "Pneumonia" is already canonical.
        read_metadata: add ``age``, ``sex`` and ``view`` from each existing file's DICOM header (keys left
            out where unknown; see :func:`hmn.data.dicom_metadata.read_dicom_metadata`).
        check_files: raise if an image file is missing.

    Returns:
        the datalist dict: entries ``{"image", "label", "patient_id"}`` (plus ``age``/``sex``/``view`` with
        `read_metadata`), ``class_names`` ``["Pneumonia"]`` (or with the second class), ``"source":
        "rsna-pneumonia"``; ``"vocabulary"`` with `vocabulary`.

    Raises:
        DatalistError: a table is missing or malformed (the message names the file, row or patientId, and
            what is accepted), inconsistent boxes or classes, missing image files.
    """
    labels_csv = os.fspath(labels_csv)
    targets = _targets(labels_csv)
    if include_not_normal and class_info_csv is None:
        raise DatalistError("include_not_normal needs class_info_csv (stage_2_detailed_class_info.csv), which tells "
                            "'No Lung Opacity / Not Normal' from 'Normal'")
    detailed = _detailed(os.fspath(class_info_csv), targets, include_not_normal) if class_info_csv is not None else {}
    rows = RowAccounting(labels_csv + (f", {os.fspath(class_info_csv)}" if class_info_csv is not None else ""),
                         "images", log=logger)
    only_classes = [p for p in detailed if p not in targets]
    rows.read(len(targets) + len(only_classes))
    rows.drop("labels", f"patientId only in {os.path.basename(os.fspath(class_info_csv or ''))}, not in the label "
              "table: no Target", only_classes)

    pneumonia = canonical_name(SOURCE, "Pneumonia") if vocabulary else "Pneumonia"
    names = [pneumonia] + ([RSNA_NOT_NORMAL] if include_not_normal else [])
    root = (os.fspath(image_root) if image_root is not None
            else os.path.join(os.path.dirname(os.path.abspath(labels_csv)), "stage_2_train_images"))
    pids = list(targets)
    entries = []
    for pid in pids:
        label = [targets[pid]] + ([int(detailed[pid] == RSNA_NOT_NORMAL)] if include_not_normal else [])
        entries.append({"image": os.path.join(root, pid + ".dcm"), "label": label, "patient_id": pid})
    assign = patient_split(pids, fractions, seed)
    if check_files:
        check_images_exist([e["image"] for e in entries], "RSNA image(s)",
                           "images are looked for at <image_root>/<patientId>.dcm; set image_root")
    if read_metadata:
        add_dicom_metadata(entries, "RSNA Pneumonia")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry, split in zip(entries, assign):
        out[split].append(entry)
    logger.info("RSNA Pneumonia: %d image(s), %d with Target 1; %d training, %d validation, %d test",
                len(entries), sum(targets.values()), *(len(out[s]) for s in SPLITS))
    extra = {"source": SOURCE}
    if vocabulary:
        extra["vocabulary"] = VOCABULARY_VERSION
    return rows.finish(make_datalist(out, names, **extra))
