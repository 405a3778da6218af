"""MIMIC-CXR-JPG (Johnson et al., "MIMIC-CXR-JPG, a large publicly available database of labeled chest
radiographs", arXiv:1901.07042, 2019; PhysioNet, versions 2.0.0 and 2.1.0).

:func:`mimic_cxr_datalist` reads the tables of the PhysioNet release, laid out as published::

    <root>/
      mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, PerformedProcedureStepDescription,
                                        ViewPosition, Rows, Columns, StudyDate (YYYYMMDD, shifted), StudyTime,
                                        ProcedureCodeSequence_CodeMeaning, ViewCodeSequence_CodeMeaning,
                                        PatientOrientationCodeSequence_CodeMeaning      (one row per image)
      mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, then CheXpert's 14 observations
      mimic-cxr-2.0.0-negbio.csv.gz     the same columns, from the NegBio labeller (one row per study)
      mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
      files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
            p{first two digits of subject_id}/p{subject_id}/s{study_id}/{dicom_id}.jpg

(version 2.1.0 keeps the 2.0.0 table names; plain ``.csv`` files are read too). Labels are given per
study: every image of a study gets its study's labels, with 1 positive, 0 negative, -1 uncertain and blank
not mentioned, under the uncertainty policies of :mod:`hmn.data.uncertain` (as for CheXpert). The patients'
age and sex are not in MIMIC-CXR-JPG; they come from MIMIC-IV's ``patients.csv.gz`` when it is given (ages
by the project's rule, :func:`hmn.data.vocabulary.normalize_age`).

Every image row of the metadata table is accounted for (:class:`hmn.data.datalist.RowAccounting`,
``"rows"`` in the datalist, printed by ``python -m hmn datalist mimic-cxr``): left out by ``views``, for a
study without a label row, or (official split) for an image the split table does not list, each counted
with the first dicom_ids. The official split is checked for subjects in two splits (a warning naming them).
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from .chexpert import CHEXPERT_CLASSES
from .datalist import (
    SPLITS, DatalistError, RowAccounting, check_images_exist, make_datalist, patient_split, read_table,
)
from .uncertain import apply_uncertainty, uncertainty_policies
from .vocabulary import (
    VOCABULARY_VERSION, canonical_name, normalize_age, normalize_sex, normalize_view, source_labels_for,
)

__all__ = ["MIMIC_LABELERS", "MIMIC_SPLITS", "mimic_cxr_datalist"]

logger = logging.getLogger(__name__)

MIMIC_LABELERS = ("chexpert", "negbio")
# the split table's values -> the datalist's split names
MIMIC_SPLITS = {"train": "training", "validate": "validation", "test": "test"}
_SOURCE = "mimic-cxr"
_IDS = ("subject_id", "study_id", "dicom_id")


def _find_table(folder: str | None, kind: str, given: str | os.PathLike | None) -> str:
    """The path of table `kind` (metadata, chexpert, negbio, split): `given`, else found in `folder` by name."""
    if given is not None:
        return os.fspath(given)
    if folder is None:
        raise DatalistError(f"no folder to find mimic-cxr-2.0.0-{kind}.csv(.gz) in: pass root= (--root), the "
                            "folder holding the MIMIC-CXR-JPG tables, or the table itself")
    for name in (f"mimic-cxr-2.0.0-{kind}.csv.gz", f"mimic-cxr-2.0.0-{kind}.csv"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(glob.glob(os.path.join(glob.escape(folder), f"mimic-cxr-*-{kind}.csv*")))
    if found:
        return found[-1]
    raise DatalistError(f"{folder}: no mimic-cxr-2.0.0-{kind}.csv(.gz) found; give the folder holding the "
                        f"MIMIC-CXR-JPG tables, or the table's path")


def _read(path: str, required: Sequence[str], what: str, id_columns: Sequence[str] = _IDS):
    """Reads a CSV (plain or .gz; id columns as text) and checks that it has the `required` columns."""
    df = read_table(path, f"the MIMIC-CXR {what}", required, dtype={c: str for c in id_columns}, low_memory=False)
    for c in id_columns:
        if c in df.columns:
            df[c] = df[c].map(_norm_id)
    return df


def _norm_id(value) -> str:
    """A MIMIC id as text: blanks stay blank, ``"10000032.0"`` (a float-typed copy) reads as ``"10000032"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].isdigit():
        text = text[:-2]
    return text


def _numbers(df, columns: Sequence[str], path: str) -> np.ndarray:
    """The columns as an (N, K) float array (blank -> NaN); raises naming the first value that is no number."""
    import pandas as pd

    out = np.empty((len(df), len(columns)), dtype=np.float64)
    for j, c in enumerate(columns):
        col = pd.to_numeric(df[c], errors="coerce")
        bad = col.isna() & df[c].notna() & (df[c].astype(str).str.strip() != "")
        if bad.any():
            r = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatalistError(f"{path}: value {df[c].iloc[r]!r} in column {c!r} (row {r + 2}); "
                                "accepted: 1, 0, -1 or blank")
        out[:, j] = col.to_numpy(dtype=np.float64)
    return out


def _year(date) -> int | None:
    """The year of a ``YYYYMMDD`` date (text or number); None otherwise."""
    text = _norm_id(date)
    return int(text[:4]) if len(text) == 8 and text.isdigit() else None


def _number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _patients(path: str) -> dict[str, tuple[float | None, int | None, str | None]]:
    """MIMIC-IV ``patients.csv(.gz)``: subject_id -> (anchor_age, anchor_year, sex)."""
    df = _read(path, ("subject_id", "gender", "anchor_age", "anchor_year"), "patients table", ("subject_id",))
    out = {}
    for sid, g, age, year in zip(df["subject_id"], df["gender"], df["anchor_age"], df["anchor_year"]):
        y = _number(year)
        out[sid] = (_number(age), int(y) if y is not None else None, normalize_sex(g))
    return out


def _resolve_classes(classes: Sequence[str] | None, observations: list[str], vocabulary: bool,
                     labels_path: str) -> tuple[list[str], dict[str, list[str]]]:
    """Output class names and, for each, the label-table columns it is positive from."""
    if not vocabulary:
        if classes is None:
            classes = [c for c in CHEXPERT_CLASSES if c != "No Finding" and c in observations]
            if not classes:
                raise DatalistError(f"{labels_path}: no CheXpert observation columns found; pass classes=")
        classes = list(classes)
        unknown = [c for c in classes if c not in observations]
        if unknown:
            raise DatalistError(f"classes {unknown} are not observation columns of {labels_path}; "
                                f"accepted: {observations}")
        return classes, {c: [c] for c in classes}
    mappable = [f for f in dict.fromkeys(canonical_name(_SOURCE, c) for c in observations) if f is not None]
    if classes is None:
        classes = [f for f in mappable if f != "No Finding"]
    classes = list(classes)
    unknown = [c for c in classes if c not in mappable]
    if unknown:
        raise DatalistError(f"classes {unknown} are not canonical findings the MIMIC-CXR labels of {labels_path} "
                            f"map to (vocabulary=True); accepted: {mappable}")
    return classes, {c: [s for s in source_labels_for(_SOURCE, c) if s in observations] for c in classes}


def mimic_cxr_datalist(
    root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    labeler: str = "chexpert",
    classes: Sequence[str] | None = None,
    uncertain: str | Mapping[str, str] = "ones",
    views: Sequence[str] | None = None,
    split: str = "official",
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    patients_csv: str | os.PathLike | None = None,
    metadata_csv: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    split_csv: str | os.PathLike | None = None,
    check_files: bool = True,
    vocabulary: bool = False,
) -> dict:
    """Builds a datalist from MIMIC-CXR-JPG's tables (layout in the module docstring).

    Args:
        root: the folder holding ``mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv(.gz)`` (and
            usually ``files/``). Default: the folder of `metadata_csv`.
        image_root: the folder holding ``files/`` (or ``files/`` itself). Default: `root`.
        labeler: ``"chexpert"`` (``mimic-cxr-2.0.0-chexpert.csv``) or ``"negbio"``
            (``mimic-cxr-2.0.0-negbio.csv``): whose study labels to use.
        classes: observation columns to use (default: the 14 CheXpert observations except "No Finding",
            whose all-zero label means no finding); with `vocabulary`, canonical findings
            (:data:`hmn.data.vocabulary.CANONICAL_FINDINGS`) that MIMIC-CXR's labels map to.
        uncertain: policy for -1 values, ``"ones"``, ``"zeros"``, ``"ignore"``, or a mapping class -> policy
            (classes not in it get ``"ones"``), as for :func:`hmn.data.chexpert_datalist`.
        views: keep only images whose ``ViewPosition`` is one of these (e.g. ``["PA", "AP"]``; compared
            case-insensitively as written in the table, so ``LL`` is not ``LATERAL`` here).
        split: ``"official"`` (the split table: train -> training, validate -> validation, test -> test;
            images it does not list are left out with a warning) or ``"patient"`` (a seeded patient-wise
            split on subject_id by `fractions`).
        fractions: (training, validation, test) image fractions for ``split="patient"``.
        seed: seed of the patient shuffle.
        patients_csv: MIMIC-IV ``patients.csv(.gz)`` (subject_id, gender, anchor_age, anchor_year, ...):
            gives each entry ``sex`` and ``age`` = anchor_age + (study year - anchor_year), or anchor_age
            where the image has no ``YYYYMMDD`` StudyDate. MIMIC-IV writes ages over 89 as 91.
        metadata_csv, labels_csv, split_csv: the tables' paths, where they are not found in `root` by name
            (`labels_csv` replaces the `labeler`'s table).
        check_files: raise if an image file is missing.
        vocabulary: name the classes by their canonical findings (:mod:`hmn.data.vocabulary`; MIMIC-CXR uses
            CheXpert's names, which are canonical) and record ``"vocabulary"`` in the datalist.

    Returns:
        the datalist dict, recording ``"source": "mimic-cxr"``, ``"labeler"`` and ``"uncertain_policy"``.
        Each entry is ``{"image", "label" (K ints), "patient_id" (subject_id), "view"?, "age"?, "sex"?}``
        (``view`` from ViewPosition by :func:`hmn.data.vocabulary.normalize_view`; a key is left out where the
        value is unknown), plus ``label_mask`` with any ``"ignore"`` policy. Images whose study has no row in
        the label table are left out with a warning giving the count. ``"rows"`` records the images read,
        kept and left out per filter and reason (module docstring).

    Raises:
        DatalistError: a table is missing or unreadable, lacks a column, holds a label other than 1, 0, -1 or
            blank or a split other than train / validate / test (naming the file and row); an unknown
            labeller, split, class or policy; a `views` filter that keeps nothing; missing images with
            `check_files`.
    """
    if labeler not in MIMIC_LABELERS:
        raise DatalistError(f"labeler={labeler!r}; accepted: {list(MIMIC_LABELERS)}")
    if split not in ("official", "patient"):
        raise DatalistError(f"split={split!r}; accepted: 'official', 'patient'")
    if root is None and metadata_csv is not None:
        root = os.path.dirname(os.path.abspath(os.fspath(metadata_csv)))
    folder = os.fspath(root) if root is not None else None
    meta_path = _find_table(folder, "metadata", metadata_csv)
    labels_path = _find_table(folder, labeler, labels_csv)

    meta = _read(meta_path, ("dicom_id", "subject_id", "study_id"), "metadata table")
    rows = RowAccounting(meta_path, "images", log=logger)
    rows.read(len(meta))
    if views is not None:
        if "ViewPosition" not in meta.columns:
            raise DatalistError(f"{meta_path}: views= needs a 'ViewPosition' column")
        written = meta["ViewPosition"].fillna("").astype(str).str.strip().str.upper()
        wanted = {str(v).strip().upper() for v in views}
        chosen = written.isin(wanted)
        rows.drop("views", f"ViewPosition not in {sorted(wanted)}", meta.loc[~chosen, "dicom_id"])
        meta = meta[chosen]
        if meta.empty:
            raise DatalistError(f"{meta_path}: no image has a ViewPosition in {sorted(wanted)}; values in the table: "
                                f"{sorted(set(written) - {''})}")

    table = _read(labels_path, ("study_id",), f"{labeler} label table")
    observations = [c for c in table.columns if c not in _IDS]
    classes, sources = _resolve_classes(classes, observations, vocabulary, labels_path)
    policies = uncertainty_policies(classes, uncertain)
    use_mask = any(p == "ignore" for p in policies.values())
    columns = list(dict.fromkeys(s for c in classes for s in sources[c]))
    column_policy = {s: policies[c] for c in classes for s in sources[c]}
    col_labels, col_mask = apply_uncertainty(_numbers(table, columns, labels_path), columns, column_policy, labels_path)
    # a class is positive when any of its source columns is; unknown (mask 0) only when none is positive
    # and one of them is an ignored uncertain
    labels = np.zeros((len(table), len(classes)), dtype=int)
    mask = np.ones((len(table), len(classes)), dtype=int)
    for k, c in enumerate(classes):
        idx = [columns.index(s) for s in sources[c]]
        labels[:, k] = col_labels[:, idx].max(axis=1)
        mask[:, k] = np.where(labels[:, k] == 1, 1, col_mask[:, idx].min(axis=1))
    row_of: dict[str, int] = {}
    duplicates = 0
    for i, study in enumerate(table["study_id"]):
        if study in row_of:
            duplicates += 1
        else:
            row_of[study] = i
    if duplicates:
        logger.warning("%s: %d study row(s) repeat a study_id; the first row of each study is used",
                       labels_path, duplicates)

    assign: dict[str, str] | None = None
    split_path: str | None = None
    if split == "official":
        split_path = _find_table(folder, "split", split_csv)
        st = _read(split_path, ("dicom_id", "split"), "split table")
        values = st["split"].fillna("").astype(str).str.strip()
        bad = ~values.isin(list(MIMIC_SPLITS))
        if bad.any():
            r = int(np.flatnonzero(bad.to_numpy())[0])
            raise DatalistError(f"{split_path}: split {st['split'].iloc[r]!r} (row {r + 2}); "
                                f"accepted: {list(MIMIC_SPLITS)}")
        assign = {d: MIMIC_SPLITS[v] for d, v in zip(st["dicom_id"], values)}

    people = _patients(os.fspath(patients_csv)) if patients_csv is not None else {}
    base = os.fspath(image_root) if image_root is not None else (folder or ".")
    files = base if os.path.basename(os.path.normpath(base)) == "files" and not os.path.isdir(
        os.path.join(base, "files")) else os.path.join(base, "files")

    n = len(meta)
    view_col = meta["ViewPosition"].tolist() if "ViewPosition" in meta.columns else [None] * n
    date_col = meta["StudyDate"].tolist() if "StudyDate" in meta.columns else [None] * n
    kept: list[dict] = []
    kept_split: list[str] = []
    unlabelled_studies: set[str] = set()
    unlabelled: list[str] = []
    not_in_split: list[str] = []
    no_patient: set[str] = set()
    for dicom, subject, study, view, date in zip(meta["dicom_id"], meta["subject_id"], meta["study_id"],
                                                 view_col, date_col):
        row = row_of.get(study)
        if row is None:
            unlabelled_studies.add(study)
            unlabelled.append(dicom)
            continue
        if assign is not None:
            s = assign.get(dicom)
            if s is None:
                not_in_split.append(dicom)
                continue
            kept_split.append(s)
        entry: dict = {
            "image": os.path.join(files, f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom}.jpg"),
            "label": labels[row].tolist(),
            "patient_id": subject,
        }
        if subject in people:
            anchor_age, anchor_year, sex = people[subject]
            year = _year(date)
            age = anchor_age + (year - anchor_year) if (anchor_age is not None and year is not None
                                                        and anchor_year is not None) else anchor_age
            age = normalize_age(age)
            if age is not None:
                entry["age"] = age
            if sex is not None:
                entry["sex"] = sex
        elif people:
            no_patient.add(subject)
        v = normalize_view(view)
        if v is not None:
            entry["view"] = v
        if use_mask:
            entry["label_mask"] = mask[row].tolist()
        kept.append(entry)
    rows.drop("labels", f"its study has no row in {labels_path} ({len(unlabelled_studies)} study(ies))", unlabelled)
    if not_in_split:
        rows.drop("split", f"not listed in {split_path}", not_in_split)
    if no_patient:
        logger.warning("%d subject(s) have no row in %s; their entries carry no age or sex", len(no_patient),
                       os.fspath(patients_csv))

    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    if split == "patient":
        kept_split = patient_split([e["patient_id"] for e in kept], fractions, seed)
    for entry, s in zip(kept, kept_split):
        entries[s].append(entry)
    if check_files:
        check_images_exist([e["image"] for e in kept], "MIMIC-CXR image(s)",
                           f"looked for under {files}; set image_root to the folder holding files/")
    extra = {"vocabulary": VOCABULARY_VERSION} if vocabulary else {}
    data = make_datalist(entries, classes, source=_SOURCE, **extra, labeler=labeler, uncertain_policy=policies)
    return rows.finish(data, f"the split table {split_path}" if split == "official" else None)
