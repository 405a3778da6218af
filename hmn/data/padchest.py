"""PadChest (Bustos et al., "PadChest: A large chest x-ray image dataset with multi-label annotated reports",
Medical Image Analysis 66, 2020; BIMCV, Hospital San Juan, Alicante).

:func:`padchest_datalist` reads the published label table
``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)``, one row per image, whose columns include::

    ImageID, ImageDir, StudyDate_DICOM (YYYYMMDD), StudyID, PatientID, PatientBirth (a year),
    PatientSex_DICOM, ViewPosition_DICOM, Projection (PA, AP, AP_horizontal, L, COSTAL, ...),
    MethodProjection, Pediatric, Modality_DICOM, ..., ReportID, Report, MethodLabel (Physician / RNN_model),
    Labels, Localizations, LabelsLocalizationsBySentence, labelCUIS, LocalizationsCUIS

``Labels`` is a Python list literal such as ``"['pleural effusion', 'cardiomegaly']"`` or ``"['normal']"``
(entries may carry surrounding blanks; empty entries are skipped). ``['normal']`` means no finding (an
all-zero label). ``Localizations`` (``'loc left'``, ...) are anatomical places, not findings: they never
become classes. The images are PNGs at ``<image_root>/<ImageDir>/<ImageID>`` (the distribution's numbered
zip folders, ``ImageDir`` 0, 1, ...) or flat at ``<image_root>/<ImageID>``; which of the two is found on
disk is used.

Every row is accounted for (:class:`hmn.data.datalist.RowAccounting`, ``"rows"`` in the datalist, printed
by ``python -m hmn datalist padchest``). Rows the builder leaves out, each filter and reason with one
warning giving its count and first image ids:

* ``physician_only``: rows whose ``MethodLabel`` is not ``Physician``;
* ``projections``: rows whose ``Projection`` is not one asked for;
* rows labelled ``exclude`` (the annotators' mark for images not to use);
* rows with blank ``Labels`` or an empty list (no label to learn from).

With ``vocabulary=True``, sub-type labels roll up to their finding by PadChest's label tree
(``apical pleural thickening`` -> Pleural Thickening, ``hydropneumothorax`` -> Pneumothorax and Pleural
Effusion, ...); the tree's children that do not are named, with the reason, in
:data:`hmn.data.vocabulary.SOURCE_VOCABULARIES` (module :mod:`hmn.data.vocabulary`, "Mapping rules").
``age`` follows the project's rule (:func:`hmn.data.vocabulary.normalize_age`): an image taken in the
patient's birth year (age 0) has no age.

A ``Labels`` value that is not a list of strings stops the build with a :class:`DatalistError` naming the
row: the table is then not the published one, and guessing its labels would corrupt the datalist silently.
PadChest publishes no split, so the split is patient-wise (seeded, on PatientID).
"""

from __future__ import annotations

import ast
import logging
import math
import os
from collections.abc import Sequence

from .datalist import (
    SPLITS, DatalistError, RowAccounting, check_images_exist, make_datalist, patient_split, read_table,
)
from .vocabulary import (
    CANONICAL_FINDINGS,
    SOURCE_VOCABULARIES,
    VOCABULARY_VERSION,
    normalize_age,
    normalize_sex,
    normalize_view,
    source_labels_for,
)

__all__ = ["PADCHEST_CLASSES", "padchest_datalist", "parse_padchest_labels"]

logger = logging.getLogger(__name__)

_SOURCE = "padchest"
# PadChest labels with a canonical counterpart (vocabulary.SOURCE_VOCABULARIES["padchest"]), but "normal":
# the default raw classes
PADCHEST_CLASSES = tuple(k for k, v in SOURCE_VOCABULARIES[_SOURCE].items() if v is not None and k != "normal")
_REQUIRED = ("ImageID", "PatientID", "Labels")
_EXCLUDE = "exclude"
_NO_VIEW = {"UNK", "UNKNOWN", "EXCLUDE"}  # Projection values that name no projection


def parse_padchest_labels(text, where: str = "Labels") -> list[str] | None:
    """The labels of one ``Labels`` cell, blanks stripped, empty entries and localizations (``loc ...``) dropped.

    Args:
        text: the cell, e.g. ``"['pleural effusion', ' cardiomegaly']"``; NaN / None / blank for none.
        where: the cell's place for the error message (file, row, image).

    Returns:
        the label list (``[]`` for ``"[]"`` or ``"['']"``), or None for a blank cell.

    Raises:
        DatalistError: the text is not a Python list (or tuple) of strings.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    raw = str(text).strip()
    if not raw or raw.lower() == "nan":
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        value = None
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) for x in value):
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        raise DatalistError(f"{where}: Labels {shown!r} is not a list of label strings; accepted: a Python list "
                            "literal such as \"['pleural effusion', 'cardiomegaly']\" or \"['normal']\"")
    labels = [x.strip() for x in value]
    return [x for x in labels if x and not x.lower().startswith("loc ")]


def _read(csv: str):
    return read_table(csv, "the PadChest label table", _REQUIRED, dtype=str, keep_default_na=True, low_memory=False)


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _int(value) -> int | None:
    try:
        x = float(_text(value))
    except ValueError:
        return None
    return int(x) if math.isfinite(x) and x.is_integer() else None


def _age(study_date, birth) -> int | None:
    """Study year (``YYYYMMDD``) minus birth year, by the project's age rule
    (:func:`hmn.data.vocabulary.normalize_age`); None when either is missing or the age is not known (0,
    negative, implausible)."""
    date = _text(study_date)
    if date.endswith(".0"):
        date = date[:-2]
    year = int(date[:4]) if len(date) == 8 and date.isdigit() else None
    born = _int(birth)
    if year is None or born is None:
        return None
    return normalize_age(year - born)


def _folder(image_dir) -> str | None:
    """``ImageDir`` as a folder name (``"0"``, not ``"0.0"``); None when blank."""
    n = _int(image_dir)
    return str(n) if n is not None else (_text(image_dir) or None)


def _layout(root: str, rows: list[tuple[str | None, str]]) -> bool:
    """Whether images lie in ``<root>/<ImageDir>/`` (True) or flat in `root` (False), from the first 50 rows
    found on disk either way; with none found, True where rows have an ImageDir."""
    for folder, image in rows[:50]:
        if folder is not None and os.path.exists(os.path.join(root, folder, image)):
            return True
        if os.path.exists(os.path.join(root, image)):
            return False
    return any(folder is not None for folder, _ in rows[:50])


def _resolve_classes(classes: Sequence[str] | None, vocabulary: bool, seen: set[str]) -> tuple[list[str], list[set[str]]]:
    """Output class names and, per class, the lower-cased PadChest labels that make it positive."""
    table = SOURCE_VOCABULARIES[_SOURCE]
    if vocabulary:
        mappable = [f for f in CANONICAL_FINDINGS if source_labels_for(_SOURCE, f)]
        classes = [f for f in mappable if f != "No Finding"] if classes is None else list(classes)
        unknown = [c for c in classes if c not in mappable]
        if unknown:
            raise DatalistError(f"classes {unknown} are not canonical findings PadChest labels map to "
                                f"(vocabulary=True); accepted: {mappable}")
        return classes, [{s.lower() for s in source_labels_for(_SOURCE, c)} for c in classes]
    classes = list(PADCHEST_CLASSES) if classes is None else [str(c).strip() for c in classes]
    known = {k.lower() for k in table} | seen
    local = [c for c in classes if c.lower().startswith("loc ")]
    if local:
        raise DatalistError(f"classes {local} are localizations (PadChest's 'Localizations'), not findings; "
                            "classes must be labels of the 'Labels' column, e.g. 'pleural effusion'")
    unknown = [c for c in classes if c.lower() not in known or c.lower() == _EXCLUDE]
    if unknown:
        shown = sorted(known - {_EXCLUDE})
        raise DatalistError(f"classes {unknown} are not PadChest labels (neither in the table's 'Labels' nor in "
                            f"hmn.data.vocabulary); accepted: {shown[:60]}{' ...' if len(shown) > 60 else ''}")
    return classes, [{c.lower()} for c in classes]


def padchest_datalist(
    csv: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    physician_only: bool = False,
    projections: Sequence[str] | None = None,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    check_files: bool = True,
    vocabulary: bool = False,
) -> dict:
    """Builds a datalist from PadChest's label table (layout and left-out rows in the module docstring).

    Args:
        csv: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (optionally gzipped).
        image_root: the folder holding the numbered ``ImageDir`` folders, or the PNGs flat. Default: the
            CSV's folder.
        classes: PadChest label names as the ``Labels`` column writes them (matched case-insensitively; any
            label found in the table or in the vocabulary's PadChest table, not ``exclude`` or a
            localization), default :data:`PADCHEST_CLASSES` (the labels that map to a canonical finding);
            with `vocabulary`, canonical findings PadChest's labels map to (default: all of them but
            ``No Finding``). ``normal`` / ``No Finding`` may be asked for by name.
        physician_only: keep the rows whose ``MethodLabel`` is ``Physician`` (the ~27% labelled by hand;
            the rest were labelled by the authors' RNN from the reports).
        projections: keep rows whose ``Projection`` is one of these (``PA``, ``AP``, ``AP_horizontal``,
            ``L``, ``COSTAL``, ...; case-insensitive, as written: ``AP`` does not keep ``AP_horizontal``).
        fractions: (training, validation, test) image fractions of the patient-wise split.
        seed: seed of the patient shuffle.
        check_files: raise if an image file is missing.
        vocabulary: name the classes by canonical findings (:mod:`hmn.data.vocabulary`): a finding is
            positive when any of its PadChest labels is, sub-types by PadChest's label tree
            (``lobar atelectasis`` -> ``Atelectasis``, ``apical pleural thickening`` -> ``Pleural Thickening``,
            ``hydropneumothorax`` -> ``Pneumothorax`` and ``Pleural Effusion``); the datalist records
            ``"vocabulary"``.

    Returns:
        the datalist dict, recording ``"source": "padchest"``. Each entry is ``{"image", "label" (K ints),
        "patient_id" (PatientID), "age"?, "sex"?, "view"?}``: ``age`` = study year - PatientBirth (0 is
        unknown, :func:`hmn.data.vocabulary.normalize_age`), ``sex`` from PatientSex_DICOM, ``view`` from
        Projection (PA, AP, ``AP_horizontal`` -> AP, ``L`` -> LATERAL, others upper-cased), each left out
        when unknown. ``"rows"`` records the rows read, kept and left out per filter and reason (module
        docstring).

    Raises:
        DatalistError: the table is missing or unreadable or lacks a column (ImageID, PatientID, Labels;
            MethodLabel for `physician_only`, Projection for `projections`); a ``Labels`` cell is not a list of
            strings (naming the row and image); an unknown or localization class; filters that keep no row;
            missing images with `check_files`.
    """
    csv = os.fspath(csv)
    df = _read(csv)
    rows = RowAccounting(csv, log=logger)
    rows.read(len(df))
    rows_all = range(len(df))
    image_ids = [_text(x) for x in df["ImageID"]]
    keep = [True] * len(df)
    if physician_only:
        if "MethodLabel" not in df.columns:
            raise DatalistError(f"{csv}: physician_only needs a 'MethodLabel' column (Physician / RNN_model)")
        passes = [_text(m).lower() == "physician" for m in df["MethodLabel"]]
        rows.drop("physician_only", "MethodLabel is not Physician (RNN_model or blank)",
                  [i for i, k, c in zip(image_ids, keep, passes) if k and not c])
        keep = [k and c for k, c in zip(keep, passes)]
    if projections is not None:
        if "Projection" not in df.columns:
            raise DatalistError(f"{csv}: projections= needs a 'Projection' column")
        wanted = {str(p).strip().lower() for p in projections}
        passes = [_text(p).lower() in wanted for p in df["Projection"]]
        rows.drop("projections", f"Projection not in {sorted(wanted)}",
                  [i for i, k, c in zip(image_ids, keep, passes) if k and not c])
        keep = [k and c for k, c in zip(keep, passes)]
        if not any(keep):
            found = sorted({_text(p) for p in df["Projection"]} - {""})
            raise DatalistError(f"{csv}: no row has a Projection in {sorted(wanted)}"
                                f"{' among the Physician rows' if physician_only else ''}; values in the table: {found}")
    if not any(keep):
        raise DatalistError(f"{csv}: no row is left after the filters (physician_only={physician_only}, "
                            f"projections={projections})")

    parsed: list[list[str] | None] = []
    for i, cell in zip(rows_all, df["Labels"]):
        labels = parse_padchest_labels(cell, f"{csv}: row {i + 2} (ImageID {image_ids[i]!r})")
        parsed.append(None if labels is None else [x.lower() for x in labels])
    seen = {x for labels in parsed if labels for x in labels}
    classes, positives = _resolve_classes(classes, vocabulary, seen)

    n = len(df)

    def col(name: str) -> list:
        return df[name].tolist() if name in df.columns else [None] * n

    dirs = [_folder(d) for d in col("ImageDir")]
    excluded: list[str] = []
    unlabelled: list[str] = []
    chosen: list[int] = []
    for i in rows_all:
        if not keep[i]:
            continue
        labels = parsed[i]
        if not labels:
            unlabelled.append(image_ids[i])
        elif _EXCLUDE in labels:
            excluded.append(image_ids[i])
        else:
            chosen.append(i)
    rows.drop("labels", "labelled 'exclude' (the annotators' mark for images not to use)", excluded)
    rows.drop("labels", "no labels (blank or empty 'Labels')", unlabelled)
    if not chosen:
        raise DatalistError(f"{csv}: no labelled row is left ({len(excluded)} 'exclude', {len(unlabelled)} unlabelled)")

    root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(csv))
    in_dirs = _layout(root, [(dirs[i], image_ids[i]) for i in chosen])
    dates, births, sexes, projs = col("StudyDate_DICOM"), col("PatientBirth"), col("PatientSex_DICOM"), col("Projection")
    patients = [_text(p) for p in df["PatientID"]]
    kept: list[dict] = []
    for i in chosen:
        found = set(parsed[i] or ())
        folder = dirs[i] if in_dirs else None
        entry: dict = {
            "image": os.path.join(root, folder, image_ids[i]) if folder is not None else os.path.join(root, image_ids[i]),
            "label": [int(bool(found & pos)) for pos in positives],
            "patient_id": patients[i],
        }
        age = _age(dates[i], births[i])
        if age is not None:
            entry["age"] = age
        sex = normalize_sex(_text(sexes[i]) or None)
        if sex is not None:
            entry["sex"] = sex
        proj = _text(projs[i])
        view = None if proj.upper() in _NO_VIEW else normalize_view(proj or None)
        if view is not None:
            entry["view"] = view
        kept.append(entry)

    blank_ids = [e["image"] for e in kept if not e["patient_id"]]
    if blank_ids:
        raise DatalistError(f"{csv}: {len(blank_ids)} row(s) have no PatientID, e.g. {blank_ids[:3]}; "
                            "a patient-wise split needs one per row")
    if check_files:
        layout = "in <ImageDir>/ folders" if in_dirs else "flat"
        check_images_exist([e["image"] for e in kept], "PadChest image(s)",
                           f"looked for under {root}, {layout}; set image_root")
    entries: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for entry, s in zip(kept, patient_split([e["patient_id"] for e in kept], fractions, seed)):
        entries[s].append(entry)
    extra = {"vocabulary": VOCABULARY_VERSION} if vocabulary else {}
    return rows.finish(make_datalist(entries, classes, source=_SOURCE, **extra))
