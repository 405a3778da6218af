"""CheXpert (Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels", AAAI 2019).

:func:`chexpert_datalist` reads CheXpert-style CSVs (``Path`` plus one column per observation with
1 positive, 0 negative, -1 uncertain, blank not mentioned) and applies an uncertainty policy per class:
``"ones"`` (U-Ones), ``"zeros"`` (U-Zeros) or ``"ignore"`` (U-Ignore: label 0 with ``label_mask`` 0,
so that a masked loss leaves it out). Blank is read as negative, as in the paper.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .datalist import SPLITS, DatalistError, check_images_exist, make_datalist, patient_split, read_table
from .dicom_metadata import parse_dicom_age
from .uncertain import UNCERTAIN_POLICIES, apply_uncertainty, uncertainty_policies
from .vocabulary import VOCABULARY_VERSION, canonical_name, normalize_sex, normalize_view

__all__ = ["CHEXPERT_CLASSES", "UNCERTAIN_POLICIES", "chexpert_datalist"]

logger = logging.getLogger(__name__)

CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
_PATIENT = re.compile(r"(patient\d+)")


def _read(csv: str | os.PathLike):
    return read_table(csv, "the CheXpert label table", ("Path",))


def _default_root(csv: str, first_path: str) -> str:
    folder = os.path.dirname(os.path.abspath(csv))
    top = first_path.replace("\\", "/").split("/")[0]
    return os.path.dirname(folder) if top and os.path.basename(folder) == top else folder


def _image_locator(root: str, paths: list[str]) -> tuple[str, bool]:
    """How the table's ``Path`` values (``CheXpert-v1.0[-small]/train/patientN/studyM/viewK.jpg``) map to
    files under `root`: ``(base, strip_top)``, the image of ``rel`` being ``base/rel``, or ``base/rel``
    without its first folder when `strip_top`.

    The distributed layouts differ in where that first folder is: the Stanford archives unpack to
    ``CheXpert-v1.0[-small]/`` (give its parent, or the folder itself), the Kaggle copy has ``train.csv``,
    ``valid.csv``, ``train/`` and ``valid/`` side by side with no such folder. The first layout under which
    some of the first 50 images exist is taken; with none found, ``(root, False)``.
    """
    sample = [p.replace("\\", "/") for p in paths[:50]]
    candidates = [(root, False), (root, True), (os.path.dirname(os.path.abspath(root)), False)]
    for base, strip in candidates:
        for rel in sample:
            parts = rel.split("/")
            if strip and len(parts) < 2:
                continue
            if os.path.exists(os.path.join(base, *(parts[1:] if strip else parts))):
                return base, strip
    return root, False


def chexpert_datalist(
    train_csv: str | os.PathLike,
    valid_csv: str | os.PathLike | None = None,
    test_csv: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    uncertain: str | Mapping[str, str] = "ones",
    split: str | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    frontal_only: bool = False,
    check_files: bool = True,
    vocabulary: bool = False,
) -> dict:
    """Builds a datalist from CheXpert-style CSVs.

    Args:
        train_csv: the training table (``train.csv``).
        valid_csv: ``valid.csv``; with ``split="official"`` it becomes the validation split.
        test_csv: an optional test table (becomes the test split with ``split="official"``).
        image_root: where the images are: the folder holding ``CheXpert-v1.0[-small]/``, that folder
            itself, or the Kaggle copy's folder (``train/`` and ``valid/`` beside the CSVs, no
            ``CheXpert-v1.0-small/`` level); the layout is recognised from the files that exist. Default:
            the folder above the CSV's when paths start with the CSV's folder name
            (``CheXpert-v1.0-small/...``), else the CSV's.
        classes: observation columns to use (default: every CheXpert observation in the CSV except
            "No Finding", whose all-zero label means no finding).
        uncertain: policy for -1 values, one of ``"ones"``, ``"zeros"``, ``"ignore"``, or a mapping
            class -> policy (classes not in it get ``"ones"``).
        split: ``"official"`` (the given CSVs are the splits) or ``"patient"`` (all CSVs pooled and
            split patient-wise by `fractions`). Default: official when `valid_csv` is given.
        fractions: (training, validation, test) fractions for ``split="patient"``.
        seed: seed of the patient shuffle.
        frontal_only: keep rows whose "Frontal/Lateral" is "Frontal".
        check_files: raise if an image file is missing.
        vocabulary: name the classes by their canonical findings (:mod:`hmn.data.vocabulary`; CheXpert's
            names are canonical already, ``Pleural Other`` stays apart from ``Pleural Thickening``) and
            record ``"vocabulary"`` in the datalist.

    Returns:
        the datalist dict; with any "ignore" policy every entry also has ``label_mask``. Entries carry
        ``age`` ("Age"), ``sex`` ("Sex": ``Male``/``Female``; ``Unknown`` left out) and ``view``
        (``LATERAL`` when "Frontal/Lateral" is Lateral, else the "AP/PA" value) where the table has them.
    """
    tables = [("training", train_csv), ("validation", valid_csv), ("test", test_csv)]
    tables = [(s, os.fspath(c)) for s, c in tables if c is not None]
    frames = [(s, c, _read(c)) for s, c in tables]
    if classes is None:
        classes = [c for c in CHEXPERT_CLASSES if c != "No Finding" and c in frames[0][2].columns]
        if not classes:
            raise DatalistError(f"{tables[0][1]}: no CheXpert observation columns found; pass classes=")
    classes = list(classes)
    policies = uncertainty_policies(classes, uncertain)
    use_mask = any(p == "ignore" for p in policies.values())
    split = split or ("official" if valid_csv is not None else "patient")
    if split not in ("official", "patient"):
        raise DatalistError(f"split={split!r}; accepted: 'official', 'patient'")

    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pooled: list[dict] = []
    for split_name, csv, df in frames:
        missing = [c for c in classes if c not in df.columns]
        if missing:
            raise DatalistError(f"{csv}: missing observation column(s) {missing}; found {list(df.columns)}")
        if frontal_only:
            if "Frontal/Lateral" not in df.columns:
                raise DatalistError(f"{csv}: frontal_only needs a 'Frontal/Lateral' column")
            df = df[df["Frontal/Lateral"].astype(str).str.lower() == "frontal"]
        if df.empty:
            continue
        labels, mask = apply_uncertainty(df[classes].to_numpy(dtype=np.float64), classes, policies, csv)
        rels = df["Path"].astype(str).tolist()
        root = os.fspath(image_root) if image_root is not None else _default_root(csv, rels[0])
        base, strip_top = _image_locator(root, rels)
        meta = _metadata(df)
        for rel, lab, m, md in zip(rels, labels.astype(int).tolist(), mask.astype(int).tolist(), meta):
            found = _PATIENT.search(rel)
            parts = rel.replace("\\", "/").split("/")
            pid = found.group(1) if found else (parts[-3] if len(parts) >= 3 else parts[0])
            image = os.path.join(base, *(parts[1:] if strip_top and len(parts) > 1 else parts))
            entry = {"image": image, "label": lab, "patient_id": pid, **md}
            if use_mask:
                entry["label_mask"] = m
            (entries[split_name] if split == "official" else pooled).append(entry)
    if split == "patient":
        for entry, s in zip(pooled, patient_split([e["patient_id"] for e in pooled], fractions, seed)):
            entries[s].append(entry)
    if check_files:
        check_images_exist([e["image"] for s in SPLITS for e in entries[s]], "CheXpert image(s)", "set image_root")
    if vocabulary:
        names = [canonical_name("chexpert", c) or c for c in classes]
        return make_datalist(entries, names, source="chexpert", uncertain_policy=dict(zip(names, policies.values())),
                             vocabulary=VOCABULARY_VERSION)
    return make_datalist(entries, classes, source="chexpert", uncertain_policy=policies)


def _metadata(df) -> list[dict]:
    """Per row: ``age``, ``sex``, ``view`` from CheXpert's Age, Sex, Frontal/Lateral and AP/PA columns."""
    n = len(df)

    def col(name: str) -> list:
        return df[name].tolist() if name in df.columns else [None] * n

    out = []
    for a, s, fl, appa in zip(col("Age"), col("Sex"), col("Frontal/Lateral"), col("AP/PA")):
        age = parse_dicom_age(a)
        lateral = isinstance(fl, str) and fl.strip().lower() == "lateral"
        m = {"age": age if age is not None and age >= 0 else None, "sex": normalize_sex(s),
             "view": "LATERAL" if lateral else normalize_view(appa)}
        out.append({k: v for k, v in m.items() if v is not None})
    return out
