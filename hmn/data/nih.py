"""NIH ChestX-ray14 (Wang et al., "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks", CVPR 2017).

:func:`nih_datalist` turns ``Data_Entry_2017*.csv`` ("Finding Labels" pipe-separated, "No Finding" for
none) into the project's datalist, with the official ``train_val_list.txt`` / ``test_list.txt`` split
(validation carved patient-wise out of train_val) or a seeded patient-wise split.

Every row of the table is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the
datalist, printed by ``python -m hmn datalist nih``): rows left out by ``views`` (View Position not asked
for) and, with the official split, rows whose image is in neither list are counted per reason, with a
warning naming the first images. The official lists are checked for patients in both (a warning naming
them and how many: the published lists are patient-wise, so a shared patient means the lists are not the
published ones or were edited). Ages follow the project's rule (:func:`hmn.data.vocabulary.normalize_age`):
``Patient Age`` 0 is unknown.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from .datalist import (
    SPLITS, DatalistError, RowAccounting, check_images_exist, make_datalist, patient_split, read_table,
)
from .vocabulary import VOCABULARY_VERSION, canonical_name, normalize_age, normalize_sex, normalize_view

__all__ = ["NIH_CLASSES", "nih_datalist", "read_nih_table"]

logger = logging.getLogger(__name__)

# The 14 findings in the order of the paper and of TorchXRayVision's NIH dataset.
NIH_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


def read_nih_table(csv: str | os.PathLike):
    """Reads the label table (plain or .gz) and checks its columns; returns a pandas DataFrame."""
    csv = os.fspath(csv)
    df = read_table(csv, "the NIH label table (Data_Entry_2017.csv)", _REQUIRED, dtype={c: str for c in _REQUIRED})
    if df["Finding Labels"].isna().any():
        row = int(np.flatnonzero(df["Finding Labels"].isna().to_numpy())[0])
        raise DatalistError(f"{csv}: empty 'Finding Labels' in row {row + 2} (use 'No Finding' for none)")
    return df


def _read_list(path: str | os.PathLike) -> set[str]:
    try:
        with open(path) as f:
            return {line.strip() for line in f if line.strip()}
    except OSError as e:
        raise DatalistError(f"{os.fspath(path)}: split list cannot be read ({e.strerror or e})") from None


def nih_datalist(
    csv: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str = "patient",
    train_val_list: str | os.PathLike | None = None,
    test_list: str | os.PathLike | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    val_fraction: float = 0.1,
    seed: int = 0,
    classes: Sequence[str] = NIH_CLASSES,
    views: Sequence[str] | None = None,
    check_files: bool = True,
    vocabulary: bool = False,
) -> dict:
    """Builds a datalist from the NIH ChestX-ray14 label table.

    Args:
        csv: ``Data_Entry_2017.csv`` or ``Data_Entry_2017_v2020.csv`` (optionally gzipped).
        image_root: folder holding the PNGs, flat or in the distribution's ``images_0xx/images/``
            sub-folders (found by name). Default: the CSV's folder.
        split: ``"official"`` (needs `train_val_list` and `test_list`; validation is `val_fraction` of
            train_val, patient-wise) or ``"patient"`` (a seeded patient-wise split by `fractions`).
        train_val_list: ``train_val_list.txt`` of the official split.
        test_list: ``test_list.txt`` of the official split.
        fractions: (training, validation, test) image fractions for ``split="patient"``.
        val_fraction: fraction of train_val used for validation with ``split="official"``.
        seed: seed of the patient shuffle.
        classes: label columns of the output, a subset of :data:`NIH_CLASSES` in any order.
        views: keep only these "View Position" values (e.g. ``["PA"]``).
        check_files: raise if an image is not found under `image_root`.
        vocabulary: name the classes by their canonical findings (:mod:`hmn.data.vocabulary`: ``Effusion``
            -> ``Pleural Effusion``, ``Pleural_Thickening`` -> ``Pleural Thickening``) and record
            ``"vocabulary"`` in the datalist.

    Returns:
        the datalist dict (``class_names`` = `classes`, or their canonical names); each entry carries
        ``age`` ("Patient Age", years; ``"057Y"``-style values of older tables read too; 0 and over 120 are
        unknown, :func:`hmn.data.vocabulary.normalize_age`), ``sex`` ("Patient Gender") and ``view``
        ("View Position") where the table has them. ``"rows"`` records the rows read, kept and left out per
        filter and reason (module docstring).
    """
    df = read_nih_table(csv)
    rows = RowAccounting(os.fspath(csv), log=logger)
    rows.read(len(df))
    in_table = set(df["Image Index"].astype(str).str.strip())
    unknown_cls = [c for c in classes if c not in NIH_CLASSES]
    if unknown_cls:
        raise DatalistError(f"classes {unknown_cls} are not ChestX-ray14 findings; accepted: {list(NIH_CLASSES)}")
    if views is not None:
        if "View Position" not in df.columns:
            raise DatalistError(f"{os.fspath(csv)}: views= needs a 'View Position' column")
        wanted = df["View Position"].isin(list(views))
        rows.drop("views", f"View Position not in {list(views)}",
                  df.loc[~wanted, "Image Index"].astype(str).str.strip())
        df = df[wanted]
    names = df["Image Index"].astype(str).str.strip().tolist()
    patients = [str(int(p)) if str(p).strip().isdigit() else str(p).strip() for p in df["Patient ID"]]
    findings = [set(s.split("|")) for s in df["Finding Labels"].astype(str).str.strip()]
    allowed = set(NIH_CLASSES) | {"No Finding"}
    bad = sorted(set().union(*findings) - allowed) if findings else []
    if bad:
        raise DatalistError(f"{os.fspath(csv)}: unknown finding label(s) {bad}; accepted: {sorted(allowed)}")
    labels = [[int(c in f) for c in classes] for f in findings]
    meta = _metadata(df)

    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(os.fspath(csv)))
    paths = _resolve_images(names, root, check_files)

    if split == "official":
        if train_val_list is None or test_list is None:
            raise DatalistError("split='official' needs train_val_list and test_list (train_val_list.txt, test_list.txt)")
        tv, te = _read_list(train_val_list), _read_list(test_list)
        both = tv & te
        if both:
            raise DatalistError(f"{len(both)} image(s) are in both the train_val and the test list, e.g. {sorted(both)[:3]}")
        in_tv = [n in tv for n in names]
        tv_idx = [i for i, t in enumerate(in_tv) if t]
        sub = patient_split([patients[i] for i in tv_idx], (1.0 - val_fraction, val_fraction, 0.0), seed)
        assign = ["" for _ in names]
        for i, s in zip(tv_idx, sub):
            assign[i] = s
        for i, n in enumerate(names):
            if n in te:
                assign[i] = "test"
        rows.drop("split", f"image in neither {os.path.basename(os.fspath(train_val_list))} nor "
                  f"{os.path.basename(os.fspath(test_list))}", [n for n, a in zip(names, assign) if not a])
        unlisted = sorted((tv | te) - in_table)
        if unlisted:  # not rows of the table, so not in its accounting, but not passed over in silence either
            logger.warning("%d image(s) of the split lists have no row in %s and are not in the datalist, e.g. %s",
                           len(unlisted), os.fspath(csv), unlisted[:5])
    elif split == "patient":
        assign = patient_split(patients, fractions, seed)
    else:
        raise DatalistError(f"split={split!r}; accepted: 'official', 'patient'")

    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for path, label, pid, s, m in zip(paths, labels, patients, assign, meta):
        if s:
            out[s].append({"image": path, "label": label, "patient_id": pid, **m})
    if vocabulary:
        data = make_datalist(out, [canonical_name("nih-chestxray14", c) for c in classes],
                             source="nih-chestxray14", vocabulary=VOCABULARY_VERSION)
    else:
        data = make_datalist(out, classes, source="nih-chestxray14")
    where = (f"{os.fspath(train_val_list)} / {os.fspath(test_list)}" if split == "official"
             else f"{os.fspath(csv)} (patient-wise split)")
    return rows.finish(data, where)


def _metadata(df) -> list[dict]:
    """Per row: ``age``, ``sex``, ``view`` (each left out when the table lacks it or the value is blank)."""
    n = len(df)
    ages = df["Patient Age"].tolist() if "Patient Age" in df.columns else [None] * n
    sexes = df["Patient Gender"].tolist() if "Patient Gender" in df.columns else [None] * n
    views = df["View Position"].tolist() if "View Position" in df.columns else [None] * n
    out = []
    for a, s, v in zip(ages, sexes, views):
        m = {"age": normalize_age(a), "sex": normalize_sex(s), "view": normalize_view(v)}
        out.append({k: x for k, x in m.items() if x is not None})
    return out


def _resolve_images(names: Sequence[str], root: str, check_files: bool) -> list[str]:
    if not check_files:
        return [os.path.join(root, n) for n in names]
    index: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in files:
            index.setdefault(f, os.path.join(folder, f))
    check_images_exist(names, "NIH image(s)", f"looked for by file name anywhere under {root}",
                       exists=index.__contains__)
    return [index[n] for n in names]
