"""CheXpert (Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels", AAAI 2019).

:func:`chexpert_datalist` reads CheXpert-style CSVs (``Path`` plus one column per observation with
1 positive, 0 negative, -1 uncertain, blank not mentioned) and applies an uncertainty policy per class:
``"ones"`` (U-Ones), ``"zeros"`` (U-Zeros) or ``"ignore"`` (U-Ignore: label 0 with ``label_mask`` 0,
so that a masked loss leaves it out). Blank is read as negative, as in the paper.

The view of a row, one rule for ``view`` and ``frontal_only`` alike (:func:`chexpert_view`): the
``Frontal/Lateral`` column says which kind of image it is and ``AP/PA`` the projection (AP, PA; LL and RL,
left and right lateral, are DICOM ViewPosition values of a *lateral* image). Where the two disagree (the 17
rows of the training table whose Frontal/Lateral is Frontal while AP/PA is LL or RL; or a Lateral row with
AP or PA) the view is **unknown**: the entry gets no ``view``, and ``frontal_only`` leaves the row out,
counted under its own reason, as it does the Lateral rows (a blank Frontal/Lateral leaves AP/PA to decide:
AP or PA is frontal, LL or RL lateral, blank unknown). Neither column is taken to overrule the other: the
table does not say which one is wrong, and a lateral image kept as frontal, or a frontal one reported as
lateral, would both be silent errors.

Every row read is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the datalist,
printed by ``python -m hmn datalist chexpert``). Ages follow the project's rule
(:func:`hmn.data.vocabulary.normalize_age`): ``Age`` 0 is unknown.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from .datalist import (
    SPLITS, DatalistError, RowAccounting, check_images_exist, make_datalist, patient_split, read_table,
)
from .uncertain import UNCERTAIN_POLICIES, apply_uncertainty, uncertainty_policies
from .vocabulary import VOCABULARY_VERSION, canonical_name, normalize_age, normalize_sex, normalize_view

__all__ = ["CHEXPERT_CLASSES", "UNCERTAIN_POLICIES", "chexpert_datalist", "chexpert_view"]

logger = logging.getLogger(__name__)

CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
_PATIENT = re.compile(r"(patient\d+)")


_FRONTAL_PROJECTIONS = {"AP", "PA"}
# why a row is not a frontal image (frontal_only's reasons), by chexpert_view's verdict
_NOT_FRONTAL = {
    "lateral": "Frontal/Lateral is Lateral",
    "disagree": "Frontal/Lateral and AP/PA disagree (e.g. Frontal with AP/PA LL or RL): view unknown",
    "unknown": "Frontal/Lateral names neither Frontal nor Lateral, and AP/PA no projection",
}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def chexpert_view(frontal_lateral, ap_pa) -> tuple[str, str | None]:
    """The view of a CheXpert row from its ``Frontal/Lateral`` and ``AP/PA`` cells (the rule in the module
    docstring).

    Returns:
        ``(kind, view)``. kind: ``"frontal"`` (Frontal, and AP/PA is AP, PA, blank or another value that is
        not lateral), ``"lateral"`` (Lateral, and AP/PA is blank or lateral), ``"disagree"`` (Frontal with a
        lateral AP/PA, LL or RL; or Lateral with AP or PA) or ``"unknown"`` (Frontal/Lateral names neither;
        where it is blank, AP/PA alone decides: AP or PA is frontal, LL or RL lateral). view, the entry's
        ``view``: the AP/PA value for a frontal row (None when blank), ``"LATERAL"`` for a lateral one, None
        otherwise.
    """
    fl = _cell(frontal_lateral).lower()
    projection = normalize_view(_cell(ap_pa) or None)
    if not fl:
        fl = "frontal" if projection in _FRONTAL_PROJECTIONS else "lateral" if projection == "LATERAL" else ""
    if fl == "frontal":
        if projection == "LATERAL":
            return "disagree", None
        return "frontal", projection
    if fl == "lateral":
        if projection in _FRONTAL_PROJECTIONS:
            return "disagree", None
        return "lateral", "LATERAL"
    return "unknown", None


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
        frontal_only: keep the frontal rows: "Frontal/Lateral" is "Frontal" and "AP/PA" does not say a
            lateral projection (:func:`chexpert_view`); the rows left out are counted per reason (Lateral;
            the two columns disagree; blank).
        check_files: raise if an image file is missing.
        vocabulary: name the classes by their canonical findings (:mod:`hmn.data.vocabulary`; CheXpert's
            names are canonical already, ``Pleural Other`` stays apart from ``Pleural Thickening``) and
            record ``"vocabulary"`` in the datalist.

    Returns:
        the datalist dict; with any "ignore" policy every entry also has ``label_mask``. Entries carry
        ``age`` ("Age"; 0 is unknown, :func:`hmn.data.vocabulary.normalize_age`), ``sex`` ("Sex":
        ``Male``/``Female``; ``Unknown`` left out) and ``view`` (:func:`chexpert_view`: ``LATERAL`` for a
        Lateral row, the "AP/PA" value for a Frontal one, left out where the two columns disagree) where the
        table has them. ``"rows"`` records the rows read, kept and left out per filter and reason.
    """
    tables = [("training", train_csv), ("validation", valid_csv), ("test", test_csv)]
    tables = [(s, os.fspath(c)) for s, c in tables if c is not None]
    frames = [(s, c, _read(c)) for s, c in tables]
    rows = RowAccounting(", ".join(c for _, c in tables), log=logger)
    for _, _, df in frames:
        rows.read(len(df))
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
            appa = df["AP/PA"].tolist() if "AP/PA" in df.columns else [None] * len(df)
            kinds = [chexpert_view(fl, ap)[0] for fl, ap in zip(df["Frontal/Lateral"], appa)]
            paths = df["Path"].astype(str).tolist()
            for kind, reason in _NOT_FRONTAL.items():
                rows.drop("frontal_only", reason, [p for p, k in zip(paths, kinds) if k == kind])
            df = df[[k == "frontal" for k in kinds]]
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
        data = make_datalist(entries, names, source="chexpert", uncertain_policy=dict(zip(names, policies.values())),
                             vocabulary=VOCABULARY_VERSION)
    else:
        data = make_datalist(entries, classes, source="chexpert", uncertain_policy=policies)
    return rows.finish(data, " / ".join(c for _, c in tables) if split == "official" else None)


def _metadata(df) -> list[dict]:
    """Per row: ``age``, ``sex``, ``view`` from CheXpert's Age, Sex, Frontal/Lateral and AP/PA columns."""
    n = len(df)

    def col(name: str) -> list:
        return df[name].tolist() if name in df.columns else [None] * n

    out = []
    for a, s, fl, appa in zip(col("Age"), col("Sex"), col("Frontal/Lateral"), col("AP/PA")):
        view = chexpert_view(fl, appa)[1]
        m = {"age": normalize_age(a), "sex": normalize_sex(s), "view": view}
        out.append({k: v for k, v in m.items() if v is not None})
    return out
