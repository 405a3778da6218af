"""The finding vocabulary: each source's labels onto one canonical list, and the metadata normalizers."""

from __future__ import annotations

import pytest

from hmn.data import CHEXPERT_CLASSES, NIH_CLASSES
from hmn.data.vocabulary import (
    ALSO_POSITIVE_FOR,
    CANONICAL_FINDINGS,
    SOURCE_VOCABULARIES,
    age_band,
    canonical_name,
    match_findings,
    normalize_age,
    normalize_sex,
    normalize_view,
    source_labels_for,
)


def test_every_table_maps_onto_the_canonical_list():
    for source, table in SOURCE_VOCABULARIES.items():
        for label, finding in table.items():
            assert finding is None or finding in CANONICAL_FINDINGS, (source, label, finding)
    assert len(set(CANONICAL_FINDINGS)) == len(CANONICAL_FINDINGS)
    # every NIH and CheXpert class has a canonical name
    assert all(canonical_name("nih-chestxray14", c) for c in NIH_CLASSES)
    assert all(canonical_name("chexpert", c) for c in CHEXPERT_CLASSES)


@pytest.mark.parametrize("source, label, expected", [
    ("nih-chestxray14", "Effusion", "Pleural Effusion"),
    ("chexpert", "Pleural Effusion", "Pleural Effusion"),
    ("nih-chestxray14", "Pleural_Thickening", "Pleural Thickening"),
    ("chexpert", "Pleural Other", "Pleural Other"),  # broader than thickening: kept apart
    ("vindr-cxr", "Nodule/Mass", "Nodule/Mass"),  # a union: neither Nodule nor Mass
    ("padchest", " Lobar Atelectasis ", "Atelectasis"),  # sub-type rolled up, case and blanks ignored
    ("padchest", "aortic elongation", None),
    ("padchest", "not a padchest label", None),
    (None, "pleural effusion", "Pleural Effusion"),
])
def test_canonical_name(source, label, expected):
    assert canonical_name(source, label) == expected


def test_unknown_source_and_finding_are_refused():
    with pytest.raises(ValueError, match="unknown source 'nihh'.*nih-chestxray14"):
        canonical_name("nihh", "Mass")
    with pytest.raises(ValueError, match="not a canonical finding"):
        source_labels_for("padchest", "Effusion")


def test_source_labels_for_lists_sub_types():
    assert set(source_labels_for("vindr-cxr", "Fracture")) == {"Clavicle fracture", "Rib fracture"}
    assert source_labels_for("nih-chestxray14", "Pleural Effusion") == ["Effusion"]


def test_match_findings_between_nih_and_chexpert():
    m = match_findings(NIH_CLASSES, CHEXPERT_CLASSES, "nih-chestxray14", "chexpert")
    # written out from the two published label lists
    shared = {"Atelectasis", "Cardiomegaly", "Pleural Effusion", "Pneumonia", "Pneumothorax", "Consolidation", "Edema"}
    assert {f for _, _, f in m["pairs"]} == shared
    for i, j, _ in m["pairs"]:
        assert canonical_name("nih-chestxray14", NIH_CLASSES[i]) == canonical_name("chexpert", CHEXPERT_CLASSES[j])
    assert [i for i, _, _ in m["pairs"]] == sorted(i for i, _, _ in m["pairs"])  # model order
    assert set(m["model_only"]) == {"Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"}
    assert "Pleural Other" in m["data_only"] and "Effusion" not in m["data_only"]


def test_match_findings_with_own_names():
    m = match_findings(["lesion", "Effusion"], ["Pleural Effusion", "lesion", "other"])
    assert m["pairs"] == [(0, 1, "lesion")]  # a user's own names match by equality; "Effusion" is not canonical
    m = match_findings(["lesion", "Effusion"], ["Pleural Effusion", "lesion"], model_source="nih-chestxray14")
    assert m["pairs"] == [(0, 1, "lesion"), (1, 0, "Pleural Effusion")]


def test_metadata_normalizers():
    assert [normalize_sex(v) for v in ("Male", "F", " female ", "Unknown", None, float("nan"), "O")] == \
        ["M", "F", "F", None, None, None, "O"]
    assert [normalize_view(v) for v in ("PA", "ap", "AP_horizontal", "L", "Lateral", "", None, "COSTAL")] == \
        ["PA", "AP", "AP", "LATERAL", "LATERAL", None, None, "COSTAL"]
    assert [age_band(a) for a in (0, 19.9, 20, 59, 60, 79.99, 80, 101, -1, None, "x")] == \
        ["0-19", "0-19", "20-39", "40-59", "60-79", "60-79", "80+", "80+", None, None, None]


@pytest.mark.parametrize("value, expected", [
    (61, 61), ("61", 61), ("061Y", 61), (68.0, 68), ("006M", 0.5), ("002W", 0.038), ("003D", 0.008),
    (120, 120), (1, 1),
    # unknown: age 0 in any unit, implausible, negative, blank, not an age
    (0, None), (0.0, None), ("0", None), ("000Y", None), ("000D", None), ("000M", None), (121, None),
    ("148", None), (-2, None), (float("nan"), None), ("", None), (None, None), ("abc", None), (True, None),
])
def test_age_rule(value, expected):
    """The one age rule of every builder and the DICOM reader (normalize_age)."""
    assert normalize_age(value) == expected


def test_age_rule_is_the_dicom_readers(tmp_path, write_dicom):
    from hmn.data.dicom_metadata import normalize_age as dicom_rule
    from hmn.data.dicom_metadata import read_dicom_metadata

    assert dicom_rule is normalize_age
    for text, expected in (("000Y", {}), ("0", {}), ("006M", {"age": 0.5}), ("061Y", {"age": 61})):
        assert read_dicom_metadata(write_dicom(tmp_path / f"{text}.dcm", PatientAge=text)) == expected


# PadChest's published label tree (Bustos et al. 2020): the children of each label that the vocabulary maps,
# and the decision for each, worked out by hand: the parent's finding, another finding, or None (a documented
# exclusion, commented in SOURCE_VOCABULARIES). No child of a mapped label may be left without a decision.
PADCHEST_TREE = {
    "atelectasis": {"total atelectasis": "Atelectasis", "lobar atelectasis": "Atelectasis",
                    "segmental atelectasis": "Atelectasis", "laminar atelectasis": "Atelectasis",
                    "round atelectasis": "Atelectasis", "atelectasis basal": "Atelectasis"},
    "pleural thickening": {"apical pleural thickening": "Pleural Thickening",
                           "calcified pleural thickening": "Pleural Thickening"},
    "pleural effusion": {"loculated pleural effusion": "Pleural Effusion",
                         "loculated fissural effusion": "Pleural Effusion", "empyema": "Pleural Effusion",
                         "hydropneumothorax": "Pneumothorax"},  # and Pleural Effusion, by ALSO_POSITIVE_FOR
    "pneumothorax": {"hydropneumothorax": "Pneumothorax"},
    "mass": {"pulmonary mass": "Mass", "pleural mass": "Mass", "mediastinal mass": "Mass", "breast mass": None,
             "soft tissue mass": None},
    "nodule": {"multiple nodules": "Nodule"},
    "fracture": {"rib fracture": "Fracture", "callus rib fracture": "Fracture", "clavicle fracture": "Fracture",
                 "humeral fracture": "Fracture", "vertebral fracture": "Fracture"},
    "pneumonia": {"atypical pneumonia": "Pneumonia"},
    "tuberculosis": {"tuberculosis sequelae": None},
    "pulmonary fibrosis": {"post radiotherapy changes": None, "asbestosis signs": None},
    "consolidation": {"air bronchogram": "Consolidation"},
    "infiltrates": {"consolidation": "Consolidation", "interstitial pattern": "Interstitial Lung Disease",
                    "reticular interstitial pattern": "Interstitial Lung Disease",
                    "reticulonodular interstitial pattern": "Interstitial Lung Disease",
                    "alveolar pattern": None, "ground glass pattern": None, "miliary opacities": None,
                    "air bronchogram": "Consolidation"},
}


def test_padchest_sub_types_each_have_a_decision():
    table = SOURCE_VOCABULARIES["padchest"]
    for parent, children in PADCHEST_TREE.items():
        assert table[parent] is not None, parent
        for child, expected in children.items():
            assert child in table, (parent, child)  # explicitly decided, never left out by oversight
            assert table[child] == expected, (parent, child, table[child])
    # hydropneumothorax is both: air (Pneumothorax) and fluid (Pleural Effusion)
    assert ALSO_POSITIVE_FOR["padchest"] == {"hydropneumothorax": ("Pleural Effusion",)}
    assert "hydropneumothorax" in source_labels_for("padchest", "Pleural Effusion")
    assert "hydropneumothorax" in source_labels_for("padchest", "Pneumothorax")
    assert source_labels_for("padchest", "Pleural Thickening") == [
        "pleural thickening", "apical pleural thickening", "calcified pleural thickening"]
    assert "subcutaneous emphysema" not in source_labels_for("padchest", "Emphysema")
    assert table["subcutaneous emphysema"] is None
