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
  source labels is positive.
* A source label mapped to ``None`` has no canonical counterpart; builders keep it only when asked for by
  its own name.

The canonical list and the tables are versioned as :data:`VOCABULARY_VERSION`; a datalist built with the
vocabulary records it under ``"vocabulary"``.

Metadata keys (:data:`METADATA_KEYS`) a datalist entry may carry beside ``image``/``label``/``patient_id``:
``age`` (years at the study, a number), ``sex`` (``"M"``, ``"F"`` or ``"O"``, DICOM PatientSex
(0010,0040) values) and ``view`` (``"PA"``, ``"AP"`` or ``"LATERAL"``, or another projection upper-cased
as the source writes it; DICOM ViewPosition (0018,5101)). A key is left out where the source does not
know the value. Nothing else identifying is carried.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "AGE_BANDS",
    "CANONICAL_FINDINGS",
    "METADATA_KEYS",
    "SOURCE_VOCABULARIES",
    "VOCABULARY_VERSION",
    "age_band",
    "canonical_name",
    "match_findings",
    "normalize_sex",
    "normalize_view",
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
    "padchest": {
        "normal": "No Finding",
        "atelectasis": "Atelectasis",
        "laminar atelectasis": "Atelectasis",
        "lobar atelectasis": "Atelectasis",
        "segmental atelectasis": "Atelectasis",
        "round atelectasis": "Atelectasis",
        "total atelectasis": "Atelectasis",
        "cardiomegaly": "Cardiomegaly",
        "consolidation": "Consolidation",
        "pulmonary edema": "Edema",
        "emphysema": "Emphysema",
        "pulmonary fibrosis": "Fibrosis",
        "rib fracture": "Fracture",
        "clavicle fracture": "Fracture",
        "humeral fracture": "Fracture",
        "vertebral fracture": "Fracture",
        "hiatal hernia": "Hernia",
        "infiltrates": "Infiltration",
        "interstitial pattern": "Interstitial Lung Disease",
        "mass": "Mass",
        "pulmonary mass": "Mass",
        "nodule": "Nodule",
        "multiple nodules": "Nodule",
        "pleural effusion": "Pleural Effusion",
        "pleural thickening": "Pleural Thickening",
        "pneumonia": "Pneumonia",
        "pneumothorax": "Pneumothorax",
        "aortic elongation": None,  # elongation is not enlargement
        "calcified granuloma": None,
        "tuberculosis": "Tuberculosis",
        "tuberculosis sequelae": None,
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
    """The source's labels that map to canonical `finding` (several where the source splits it in sub-types)."""
    if finding not in CANONICAL_FINDINGS:
        raise ValueError(f"{finding!r} is not a canonical finding; accepted: {list(CANONICAL_FINDINGS)}")
    _lower_table(source)
    return [k for k, v in SOURCE_VOCABULARIES[source].items() if v == finding]


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
