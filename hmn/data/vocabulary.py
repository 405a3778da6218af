"""One finding vocabulary for the public chest X-ray sources, and the metadata keys a datalist may carry.

Each source names its findings its own way (NIH ``Effusion``, CheXpert ``Pleural Effusion``, VinDr-CXR
``Pleural effusion``, PadChest ``pleural effusion``). :data:`SOURCE_VOCABULARIES` maps every source's
label names onto :data:`CANONICAL_FINDINGS`; a datalist builder given ``vocabulary=True``
(``--vocabulary`` on the command line) writes canonical class names, and evaluation of a model on a data
set with other classes compares the findings both map to (:func:`match_findings`).

Mapping rules (decided here, documented in the bundles' docs):

* A source label is mapped only where it names the same finding. Labels that are broader, narrower or
  a union of two canonical findings are kept apart under their own canonical name:
  CheXpert/MIMIC ``Pleural Other`` (thickening, fibrosis, calcification and more) is **not**
  ``Pleural Thickening``; VinDr-CXR ``Nodule/Mass`` is **not** ``Nodule`` or ``Mass``; ``Lung Opacity``
  and ``Lung Lesion`` stay themselves.
* Sub-types roll up to their finding where the source splits it (PadChest ``lobar atelectasis`` ->
  ``Atelectasis``, ``rib fracture`` -> ``Fracture``): a builder sets the canonical label when any of its
  source labels is positive. For PadChest the sub-types are those of its published label tree: e.g.
  ``apical pleural thickening`` and ``calcified pleural thickening`` -> ``Pleural Thickening``;
  ``loculated pleural effusion``, ``loculated fissural effusion`` and ``empyema`` -> ``Pleural Effusion``;
  ``atelectasis basal`` -> ``Atelectasis``; ``hydropneumothorax`` -> ``Pneumothorax`` *and*
  ``Pleural Effusion`` (:data:`ALSO_POSITIVE_FOR`). A child of the tree that does not roll up to its parent
  is listed in the table with None and a comment saying why (``subcutaneous emphysema`` is not
  emphysema; ``pleural plaques`` stay apart from pleural thickening; ``breast mass`` is not a chest
  ``Mass``; ``tuberculosis sequelae`` are not tuberculosis; consolidation and the interstitial patterns,
  which the tree puts under ``infiltrates``, go to their own findings and not to ``Infiltration``): an
  image labelled with one of them is a negative of the parent finding by that stated decision, never by
  omission.
* A source label mapped to ``None`` has no canonical counterpart; builders keep it only when asked for by
  its own name.

The canonical list and the tables are versioned as :data:`VOCABULARY_VERSION`; a datalist built with the
vocabulary records it under ``"vocabulary"``.

Metadata keys (:data:`METADATA_KEYS`) a datalist entry may carry beside ``image``/``label``/``patient_id``:
``age`` (years at the study, a number; every builder and the DICOM reader keep an age through
:func:`normalize_age`, so an age of 0 is unknown everywhere, see there), ``sex`` (``"M"``, ``"F"`` or
``"O"``, DICOM PatientSex (0010,0040) values) and ``view`` (``"PA"``, ``"AP"`` or ``"LATERAL"``, or another
projection upper-cased as the source writes it; DICOM ViewPosition (0018,5101)). A key is left out where
the source does not know the value. Nothing else identifying is carried.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AGE_BANDS",
    "ALSO_POSITIVE_FOR",
    "MAX_PLAUSIBLE_AGE",
    "CANONICAL_FINDINGS",
    "METADATA_KEYS",
    "SOURCE_VOCABULARIES",
    "VOCABULARY_VERSION",
    "age_band",
    "canonical_name",
    "match_findings",
    "normalize_age",
    "normalize_sex",
    "normalize_view",
    "parse_dicom_age",
    "source_labels_for",
]

VOCABULARY_VERSION = "hmn-cxr-1"

CANONICAL_FINDINGS = (
    "No Finding",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged Cardiomediastinum",
    "Fibrosis",
    "Fracture",
    "Hernia",
    "Infiltration",
    "Interstitial Lung Disease",
    "Lung Lesion",
    "Lung Opacity",
    "Mass",
    "Nodule",
    "Nodule/Mass",
    "Pleural Effusion",
    "Pleural Other",
    "Pleural Thickening",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
    "Aortic Enlargement",
    "Calcification",
    "Tuberculosis",
)

_CHEXPERT = {
    "No Finding": "No Finding",
    "Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum",
    "Cardiomegaly": "Cardiomegaly",
    "Lung Opacity": "Lung Opacity",
    "Lung Lesion": "Lung Lesion",
    "Edema": "Edema",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax",
    "Pleural Effusion": "Pleural Effusion",
    "Pleural Other": "Pleural Other",
    "Fracture": "Fracture",
    "Support Devices": "Support Devices",
}

# source -> {label as the source writes it: canonical finding, or None (no counterpart)}
SOURCE_VOCABULARIES: dict[str, dict[str, str | None]] = {
    "nih-chestxray14": {
        "No Finding": "No Finding",
        "Atelectasis": "Atelectasis",
        "Cardiomegaly": "Cardiomegaly",
        "Effusion": "Pleural Effusion",
        "Infiltration": "Infiltration",
        "Mass": "Mass",
        "Nodule": "Nodule",
        "Pneumonia": "Pneumonia",
        "Pneumothorax": "Pneumothorax",
        "Consolidation": "Consolidation",
        "Edema": "Edema",
        "Emphysema": "Emphysema",
        "Fibrosis": "Fibrosis",
        "Pleural_Thickening": "Pleural Thickening",
        "Hernia": "Hernia",
    },
    "chexpert": dict(_CHEXPERT),
    # MIMIC-CXR-JPG's CheXpert- and NegBio-labeller tables use CheXpert's 14 observation names
    "mimic-cxr": dict(_CHEXPERT),
    # PadChest's labels as the Labels column writes them. Sub-types roll up to their finding by PadChest's
    # published label tree (Bustos et al. 2020); the tree's children that are NOT mapped to their parent are
    # listed with None and the reason, so that none of them is a negative of its parent by oversight.
    "padchest": {
        "normal": "No Finding",
        "atelectasis": "Atelectasis",
        "laminar atelectasis": "Atelectasis",
        "lobar atelectasis": "Atelectasis",
        "segmental atelectasis": "Atelectasis",
        "round atelectasis": "Atelectasis",
        "total atelectasis": "Atelectasis",
        "atelectasis basal": "Atelectasis",  # basal atelectasis, as PadChest words it
        "cardiomegaly": "Cardiomegaly",
        "consolidation": "Consolidation",
        "air bronchogram": "Consolidation",  # the tree's child of consolidation
        "pulmonary edema": "Edema",
        "emphysema": "Emphysema",
        "subcutaneous emphysema": None,  # air in the soft tissues of the chest wall, not pulmonary emphysema
        "pulmonary fibrosis": "Fibrosis",
        # under pulmonary fibrosis in the tree, but they name a cause whose radiographic signs are not only
        # fibrosis (radiation pneumonitis; asbestos-related pleural plaques)
        "post radiotherapy changes": None,
        "asbestosis signs": None,
        "fracture": "Fracture",
        "rib fracture": "Fracture",
        "callus rib fracture": "Fracture",  # a healing rib fracture
        "clavicle fracture": "Fracture",
        "humeral fracture": "Fracture",
        "vertebral fracture": "Fracture",
        "hiatal hernia": "Hernia",
        # infiltrates: the tree puts the alveolar and interstitial patterns (and consolidation) under it, but
        # ChestX-ray14 and VinDr-CXR label Infiltration apart from Consolidation and the interstitial
        # patterns, so Infiltration is PadChest's "infiltrates" only; consolidation and the interstitial
        # patterns go to their own findings, the other patterns to none
        "infiltrates": "Infiltration",
        "alveolar pattern": None,
        "ground glass pattern": None,
        "miliary opacities": None,
        "interstitial pattern": "Interstitial Lung Disease",
        "reticular interstitial pattern": "Interstitial Lung Disease",
        "reticulonodular interstitial pattern": "Interstitial Lung Disease",
        "mass": "Mass",
        "pulmonary mass": "Mass",
        "pleural mass": "Mass",
        "mediastinal mass": "Mass",
        "breast mass": None,  # the tree's children of mass outside the chest cavity: not a chest radiograph's Mass
        "soft tissue mass": None,
        "nodule": "Nodule",
        "multiple nodules": "Nodule",
        "pseudonodule": None,  # things that look like a nodule and are not one (the tree's own branch)
        "nipple shadow": None,
        "end on vessel": None,
        "granuloma": None,
        "calcified granuloma": None,
        "pleural effusion": "Pleural Effusion",
        "loculated pleural effusion": "Pleural Effusion",
        "loculated fissural effusion": "Pleural Effusion",
        "empyema": "Pleural Effusion",  # an infected pleural effusion
        "hydropneumothorax": "Pneumothorax",  # and Pleural Effusion (ALSO_POSITIVE_FOR): air and fluid
        "costophrenic angle blunting": None,  # a sign of a small effusion or of pleural thickening, not either
        "pleural thickening": "Pleural Thickening",
        "apical pleural thickening": "Pleural Thickening",
        "calcified pleural thickening": "Pleural Thickening",
        "pleural plaques": None,  # the tree keeps plaques (and fissure thickening) apart from pleural thickening
        "calcified pleural plaques": None,
        "fissure thickening": None,
        "minor fissure thickening": None,
        "major fissure thickening": None,
        "pneumonia": "Pneumonia",
        "atypical pneumonia": "Pneumonia",
        "pneumothorax": "Pneumothorax",
        "aortic elongation": None,  # elongation is not enlargement
        "tuberculosis": "Tuberculosis",
        "tuberculosis sequelae": None,  # the scars of a past tuberculosis, not the disease
        "COPD signs": None,
        "chronic changes": None,
        "unchanged": None,
        "exclude": None,
    },
    "vindr-cxr": {
        "No finding": "No Finding",
        "Aortic enlargement": "Aortic Enlargement",
        "Atelectasis": "Atelectasis",
        "Calcification": "Calcification",
        "Cardiomegaly": "Cardiomegaly",
        "Clavicle fracture": "Fracture",
        "Rib fracture": "Fracture",
        "Consolidation": "Consolidation",
        "Edema": "Edema",
        "Emphysema": "Emphysema",
        "Enlarged PA": None,
        "ILD": "Interstitial Lung Disease",
        "Infiltration": "Infiltration",
        "Lung cavity": None,
        "Lung cyst": None,
        "Lung Opacity": "Lung Opacity",
        "Mediastinal shift": None,
        "Nodule/Mass": "Nodule/Mass",
        "Pleural effusion": "Pleural Effusion",
        "Pleural thickening": "Pleural Thickening",
        "Pneumothorax": "Pneumothorax",
        "Pulmonary fibrosis": "Fibrosis",
        "Other lesion": None,
        "COPD": None,
        "Lung tumor": None,
        "Pneumonia": "Pneumonia",
        "Tuberculosis": "Tuberculosis",
        "Other disease": None,
        "Other diseases": None,
    },
    # the built-in synthetic demo (hmn.data.demo) names its findings as ChestX-ray14 does
    "hmn-demo-synthetic": {"Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion", "Mass": "Mass",
                           "Nodule": "Nodule", "Pneumothorax": "Pneumothorax"},
    # RSNA Pneumonia Detection: Target 1 (a "Lung Opacity" box, the challenge's evidence of pneumonia)
    "rsna-pneumonia": {"Pneumonia": "Pneumonia", "No Lung Opacity / Not Normal": None},
}

# Source labels that are a kind of more than one canonical finding: the findings besides the one
# SOURCE_VOCABULARIES names. source_labels_for() lists the label under each of them, so a builder sets them
# all positive. PadChest's tree puts hydropneumothorax (air and fluid in the pleural space) under both
# pneumothorax and pleural effusion.
ALSO_POSITIVE_FOR: dict[str, dict[str, tuple[str, ...]]] = {
    "padchest": {"hydropneumothorax": ("Pleural Effusion",)},
}

METADATA_KEYS = ("age", "sex", "view")

# (label, low, high): age in [low, high); the bands of the chest X-ray fairness literature
AGE_BANDS = (("0-19", 0.0, 20.0), ("20-39", 20.0, 40.0), ("40-59", 40.0, 60.0), ("60-79", 60.0, 80.0),
             ("80+", 80.0, math.inf))

_SEX = {"m": "M", "male": "M", "f": "F", "female": "F", "o": "O", "other": "O"}
_VIEW = {"pa": "PA", "ap": "AP", "ap_horizontal": "AP", "ap supine": "AP", "lateral": "LATERAL", "lat": "LATERAL",
         "l": "LATERAL", "ll": "LATERAL", "rl": "LATERAL", "left lateral": "LATERAL", "right lateral": "LATERAL"}


def _lower_table(source: str) -> dict[str, str | None]:
    if source not in SOURCE_VOCABULARIES:
        raise ValueError(f"unknown source {source!r}; sources with a vocabulary: {sorted(SOURCE_VOCABULARIES)}")
    return {k.lower(): v for k, v in SOURCE_VOCABULARIES[source].items()}


def canonical_name(source: str | None, label: str) -> str | None:
    """The canonical finding a source's label names, or None when it has no counterpart.

    Args:
        source: a key of :data:`SOURCE_VOCABULARIES` (e.g. ``"nih-chestxray14"``), or None / ``"canonical"``
            for names that are already canonical.
        label: the label as the source writes it (matched case-insensitively, surrounding blanks ignored).

    Raises:
        ValueError: for an unknown source.
    """
    text = str(label).strip()
    canon = {c.lower(): c for c in CANONICAL_FINDINGS}
    if source is None or source == "canonical" or source == VOCABULARY_VERSION:
        return canon.get(text.lower())
    table = _lower_table(source)
    if text.lower() in table:
        return table[text.lower()]
    return None


def source_labels_for(source: str, finding: str) -> list[str]:
    """The source's labels that make canonical `finding` positive: those that map to it (several where the
    source splits it in sub-types), then those that are also a kind of it (:data:`ALSO_POSITIVE_FOR`)."""
    if finding not in CANONICAL_FINDINGS:
        raise ValueError(f"{finding!r} is not a canonical finding; accepted: {list(CANONICAL_FINDINGS)}")
    _lower_table(source)
    own = [k for k, v in SOURCE_VOCABULARIES[source].items() if v == finding]
    also = [k for k, fs in ALSO_POSITIVE_FOR.get(source, {}).items() if finding in fs and k not in own]
    return own + also


def match_findings(
    model_classes: Sequence[str],
    data_classes: Sequence[str],
    model_source: str | None = None,
    data_source: str | None = None,
) -> dict[str, Any]:
    """Which outputs of a model trained on one source correspond to which label columns of another.

    Each class name is mapped to its canonical finding (through its source's table, or taken as canonical
    when the source is None); names equal on both sides match even without a mapping.

    Args:
        model_classes: the model's class names, in output order.
        data_classes: the evaluated datalist's class names, in label order.
        model_source, data_source: the sources the names come from (a :data:`SOURCE_VOCABULARIES` key, the
            datalist's ``"source"``), or None when the names are canonical (a datalist built with the
            vocabulary) or the user's own.

    Returns:
        ``{"pairs": [(model_index, data_index, finding)], "model_only": [names], "data_only": [names]}``:
        the findings compared, in model order, and the class names of either side left out.
    """

    def canon(names: Sequence[str], source: str | None) -> list[str]:
        out = []
        for n in names:
            try:
                c = canonical_name(source, n)
            except ValueError:
                c = canonical_name(None, n)
            out.append(c if c is not None else str(n))
        return out

    m, d = canon(model_classes, model_source), canon(data_classes, data_source)
    where = {}
    for j, name in enumerate(d):
        where.setdefault(name, j)
    pairs = [(i, where[name], name) for i, name in enumerate(m) if name in where]
    used_d = {j for _, j, _ in pairs}
    return {
        "pairs": pairs,
        "model_only": [str(model_classes[i]) for i, name in enumerate(m) if name not in where],
        "data_only": [str(data_classes[j]) for j in range(len(d)) if j not in used_d],
    }


def normalize_sex(value: Any) -> str | None:
    """``"M"``, ``"F"`` or ``"O"`` from a source's sex / gender value (``Male``, ``F``, ...); None when unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _SEX.get(str(value).strip().lower())


def normalize_view(value: Any) -> str | None:
    """``"PA"``, ``"AP"``, ``"LATERAL"`` (or another projection upper-cased) from a source's view value;
    None when blank or unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    if not text or text.lower() in ("nan", "unknown", "none"):
        return None
    return _VIEW.get(text.lower(), text.upper())


# Ages above this (RSNA's table has a few of 148-155, old NIH tables up to 414) are typing errors, not patients.
MAX_PLAUSIBLE_AGE = 120
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$", re.IGNORECASE)
_DAYS_PER_YEAR = 365.25


def parse_dicom_age(value: Any) -> float | int | None:
    """Years from a DICOM Age String (VR AS, ``nnnD``/``nnnW``/``nnnM``/``nnnY``), e.g. ``"061Y"`` -> 61,
    ``"006M"`` -> 0.5, ``"002W"`` -> 0.038, ``"003D"`` -> 0.008.

    A bare number (``"51"``, as RSNA's headers and the NIH and CheXpert tables write it, or an int) is read
    as years. Whole years come back as an int, other units as a float rounded to 3 decimals. The value is
    returned as written (``"000D"`` -> 0.0); :func:`normalize_age` decides which ages are known.

    Returns:
        the age in years, or None when `value` is blank or not an age string.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value if value == value else None  # NaN -> None
    m = _AGE.match(str(value).strip())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).upper()
    if unit in ("", "Y"):
        return n
    years = {"D": n / _DAYS_PER_YEAR, "W": 7 * n / _DAYS_PER_YEAR, "M": n / 12.0}[unit]
    return round(years, 3)


def normalize_age(value: Any) -> float | int | None:
    """The ``age`` a datalist entry carries: the project's one age rule, used by every builder (NIH
    "Patient Age", CheXpert "Age", MIMIC-IV anchor ages, PadChest's study year - birth year) and by the
    DICOM reader (PatientAge, :func:`hmn.data.dicom_metadata.read_dicom_metadata`).

    The value is read as years (a number, or a DICOM Age String through :func:`parse_dicom_age`, so
    ``"006M"`` -> 0.5 and a float that is a whole number -> int). It is **unknown** (None) when blank, not an
    age, not finite, negative, above :data:`MAX_PLAUSIBLE_AGE`, **or exactly 0**.

    Why 0 is unknown: a recorded age of 0 cannot be told from the placeholder that de-identification tools
    and tables write where the age was removed or never entered (DICOM ``"000Y"``/``"000D"``; CheXpert, from
    an adult hospital, has Age 0 rows), and a wrong age puts an image into the youngest band of the
    evaluation report's subgroups, while an unknown one only leaves it out of the age breakdown. The cost:
    true newborns lose their age (NIH ChestX-ray14 has 14 images at age 0 whose patients' later images are
    1 to 5 years old; PadChest images taken in the birth year), since a whole-year 0 does not say which it
    is. An age under a year written in months, weeks or days (``"006M"``, ``"002W"``) is kept.

    Returns:
        the age in years (int when whole), or None when unknown.
    """
    age = parse_dicom_age(value)
    if age is None or isinstance(age, bool):
        return None
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a) or a <= 0 or a > MAX_PLAUSIBLE_AGE:
        return None
    return int(a) if a.is_integer() else age


def age_band(age: Any) -> str | None:
    """The :data:`AGE_BANDS` label of an age in years (e.g. 57 -> ``"40-59"``); None when unknown or negative."""
    try:
        a = float(age)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(a) or a < 0:
        return None
    return next(label for label, lo, hi in AGE_BANDS if lo <= a < hi)


def metadata_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`METADATA_KEYS` an entry carries (others left out)."""
    return {k: entry[k] for k in METADATA_KEYS if entry.get(k) is not None}
