"""PadChest datalists, on a small invented table in the published column layout.

Every id, date, report and label below is made up; the expected labels, ages and views are worked out by
hand from the rows written here.
"""

from __future__ import annotations

import csv
import json
import logging
import os

import pytest

from hmn.data import PADCHEST_CLASSES, DatalistError, padchest_datalist, patient_overlap
from hmn.data.cli import datalist_main
from hmn.data.padchest import parse_padchest_labels

# the published header (the acquisition columns between Modality_DICOM and ReportID abridged)
HEADER = ["ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
          "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric", "Modality_DICOM", "Manufacturer_DICOM",
          "Rows_DICOM", "Columns_DICOM", "ReportID", "Report", "MethodLabel", "Labels", "Localizations",
          "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS"]
# ImageID, ImageDir, StudyDate, PatientID, PatientBirth, Sex, Projection, MethodLabel, Labels, Localizations
ROWS = [
    ("a1_pa.png", "0", "20140721", "pt1", "1939.0", "M", "PA", "Physician",
     "['pleural effusion', 'cardiomegaly']", "['loc left', 'loc basal']"),
    ("a1_l.png", "0", "20140721", "pt1", "1939.0", "M", "L", "Physician",
     "['pleural effusion', 'cardiomegaly']", "['loc left', 'loc basal']"),
    ("b2_ap.png", "1", "20100301", "pt2", "1980", "F", "AP_horizontal", "RNN_model",
     "[' lobar atelectasis ', 'nodule', '']", "['loc right upper lobe']"),
    ("c3_pa.png", "1", "20160101", "pt3", "", "", "PA", "Physician", "['normal']", "[]"),
    ("d4_ap.png", "2", "", "pt4", "1950", "F", "AP", "Physician", "['exclude']", "[]"),
    ("e5_co.png", "2", "20120505", "pt5", "1960", "M", "COSTAL", "RNN_model", "", ""),
    ("f6_pa.png", "2", "20090909", "pt6", "1949", "F", "PA", "Physician",
     "['rib fracture', 'COPD signs', 'suboptimal study']", "['loc rib']"),
    ("g7_pa.png", "3", "20130101", "pt7", "1990", "O", "UNK", "RNN_model",
     "['pulmonary mass', 'aortic elongation']", "['loc left upper lobe']"),
]
KEPT = ["a1_pa.png", "a1_l.png", "b2_ap.png", "c3_pa.png", "f6_pa.png", "g7_pa.png"]  # not exclude, not unlabelled


def _write(path, rows=ROWS, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (image, folder, date, pid, birth, sex, proj, method, labels, locs) in enumerate(rows):
            values = {"ImageID": image, "ImageDir": folder, "StudyDate_DICOM": date, "StudyID": f"st{i}",
                      "PatientID": pid, "PatientBirth": birth, "PatientSex_DICOM": sex, "ViewPosition_DICOM": "",
                      "Projection": proj, "MethodProjection": "Manual review of DICOM fields", "Pediatric": "No",
                      "Modality_DICOM": "CR", "Manufacturer_DICOM": "Invented", "Rows_DICOM": "2000",
                      "Columns_DICOM": "2000", "ReportID": str(1000 + i), "Report": "invented report text, short",
                      "MethodLabel": method, "Labels": labels, "Localizations": locs,
                      "LabelsLocalizationsBySentence": "", "labelCUIS": "", "LocalizationsCUIS": ""}
            w.writerow([values.get(c, "") for c in header])
    return path


@pytest.fixture
def table(tmp_path):
    return _write(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv")


def _by_image(d):
    return {os.path.basename(e["image"]): e for s in ("training", "validation", "test") for e in d[s]}


def test_raw_labels_normal_and_left_out_rows(table, caplog):
    with caplog.at_level(logging.WARNING, logger="hmn.data.padchest"):
        d = padchest_datalist(table, check_files=False)
    got = _by_image(d)
    assert sorted(got) == sorted(KEPT)
    assert d["class_names"] == list(PADCHEST_CLASSES) and d["source"] == "padchest" and "vocabulary" not in d
    names = d["class_names"]

    def positives(image):
        return {n for n, v in zip(names, got[image]["label"]) if v}

    assert positives("a1_pa.png") == positives("a1_l.png") == {"pleural effusion", "cardiomegaly"}
    assert positives("b2_ap.png") == {"lobar atelectasis", "nodule"}  # blanks stripped, empty entry skipped
    assert positives("c3_pa.png") == set()  # normal: no finding
    assert positives("f6_pa.png") == {"rib fracture"}  # COPD signs and suboptimal study have no canonical finding
    assert positives("g7_pa.png") == {"pulmonary mass"}
    assert "1 of 8 rows left out by labels: labelled 'exclude'" in caplog.text and "d4_ap.png" in caplog.text
    assert "1 of 8 rows left out by labels: no labels" in caplog.text and "e5_co.png" in caplog.text
    assert (d["rows"]["read"], d["rows"]["kept"]) == (8, 6)


def test_localizations_never_become_classes(table):
    for vocabulary in (False, True):
        d = padchest_datalist(table, check_files=False, vocabulary=vocabulary)
        assert not any(n.lower().startswith("loc ") for n in d["class_names"])
    with pytest.raises(DatalistError, match=r"\['loc left'\] are localizations .*not findings"):
        padchest_datalist(table, classes=["pleural effusion", "loc left"], check_files=False)
    # a stray localization inside Labels is dropped, not learnt
    assert parse_padchest_labels("['loc left', ' pleural effusion ']") == ["pleural effusion"]


def test_vocabulary_rolls_sub_types_up(table):
    d = padchest_datalist(table, check_files=False, vocabulary=True)
    assert d["vocabulary"] == "hmn-cxr-1" and d["source"] == "padchest"
    assert d["class_names"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Fibrosis",
                                "Fracture", "Hernia", "Infiltration", "Interstitial Lung Disease", "Mass", "Nodule",
                                "Pleural Effusion", "Pleural Thickening", "Pneumonia", "Pneumothorax", "Tuberculosis"]
    got = _by_image(d)

    def positives(image):
        return {n for n, v in zip(d["class_names"], got[image]["label"]) if v}

    assert positives("a1_pa.png") == {"Pleural Effusion", "Cardiomegaly"}
    assert positives("b2_ap.png") == {"Atelectasis", "Nodule"}  # lobar atelectasis -> Atelectasis
    assert positives("f6_pa.png") == {"Fracture"}  # rib fracture -> Fracture
    assert positives("g7_pa.png") == {"Mass"}  # pulmonary mass -> Mass; aortic elongation maps to nothing
    assert positives("c3_pa.png") == set()
    picked = padchest_datalist(table, check_files=False, vocabulary=True, classes=["No Finding", "Atelectasis"])
    assert {k: e["label"] for k, e in _by_image(picked).items()} == {
        "a1_pa.png": [0, 0], "a1_l.png": [0, 0], "b2_ap.png": [0, 1], "c3_pa.png": [1, 0], "f6_pa.png": [0, 0],
        "g7_pa.png": [0, 0]}
    with pytest.raises(DatalistError, match=r"\['Support Devices'\] are not canonical findings PadChest labels map "
                                            r"to.*accepted: \['No Finding', 'Atelectasis'"):
        padchest_datalist(table, check_files=False, vocabulary=True, classes=["Support Devices"])


def test_raw_classes_by_name(table):
    d = padchest_datalist(table, classes=["Suboptimal Study", "normal", "pleural effusion"], check_files=False)
    assert d["class_names"] == ["Suboptimal Study", "normal", "pleural effusion"]
    got = _by_image(d)
    assert got["f6_pa.png"]["label"] == [1, 0, 0] and got["c3_pa.png"]["label"] == [0, 1, 0]
    assert got["a1_l.png"]["label"] == [0, 0, 1]
    with pytest.raises(DatalistError, match=r"classes \['pleural efusion'\] are not PadChest labels.*accepted: \["):
        padchest_datalist(table, classes=["pleural efusion"], check_files=False)
    with pytest.raises(DatalistError, match=r"classes \['exclude'\] are not PadChest labels"):
        padchest_datalist(table, classes=["exclude"], check_files=False)


def test_age_sex_view(table):
    got = _by_image(padchest_datalist(table, check_files=False))
    assert {k: e.get("age") for k, e in got.items()} == {
        "a1_pa.png": 75, "a1_l.png": 75, "b2_ap.png": 30, "c3_pa.png": None, "f6_pa.png": 60, "g7_pa.png": 23}
    assert {k: e.get("sex") for k, e in got.items()} == {
        "a1_pa.png": "M", "a1_l.png": "M", "b2_ap.png": "F", "c3_pa.png": None, "f6_pa.png": "F", "g7_pa.png": "O"}
    assert {k: e.get("view") for k, e in got.items()} == {
        "a1_pa.png": "PA", "a1_l.png": "LATERAL", "b2_ap.png": "AP", "c3_pa.png": "PA", "f6_pa.png": "PA",
        "g7_pa.png": None}
    assert "age" not in got["c3_pa.png"] and "sex" not in got["c3_pa.png"] and "view" not in got["g7_pa.png"]
    assert got["a1_pa.png"]["patient_id"] == "pt1"


def test_physician_only_and_projections(table):
    d = padchest_datalist(table, physician_only=True, check_files=False)
    assert sorted(_by_image(d)) == ["a1_l.png", "a1_pa.png", "c3_pa.png", "f6_pa.png"]
    pa = padchest_datalist(table, projections=["pa"], check_files=False)
    assert sorted(_by_image(pa)) == ["a1_pa.png", "c3_pa.png", "f6_pa.png"]
    # the one AP row is 'exclude', and AP_horizontal is not AP: nothing is left
    with pytest.raises(DatalistError, match=r"no labelled row is left \(1 'exclude', 0 unlabelled\)"):
        padchest_datalist(table, projections=["AP"], check_files=False)
    horizontal = padchest_datalist(table, projections=["AP_horizontal", "L"], physician_only=True, check_files=False)
    assert sorted(_by_image(horizontal)) == ["a1_l.png"]
    with pytest.raises(DatalistError, match=r"no row has a Projection in \['lat'\]; values in the table: \['AP', "):
        padchest_datalist(table, projections=["lat"], check_files=False)


def test_patient_split(tmp_path):
    rows = [(f"i{p}_{k}.png", "0", "20150101", f"pt{p}", "1950", "F", "PA", "Physician", "['cardiomegaly']", "[]")
            for p in range(20) for k in range(3)]
    path = _write(tmp_path / "t.csv", rows)
    d = padchest_datalist(path, fractions=(0.6, 0.2, 0.2), seed=1, check_files=False)
    assert patient_overlap(d) == {}
    assert [len(d[s]) for s in ("training", "validation", "test")] == [36, 12, 12]
    assert padchest_datalist(path, fractions=(0.6, 0.2, 0.2), seed=1, check_files=False) == d


def test_image_layouts_and_check_files(table, tmp_path):
    root = tmp_path / "images"
    for image, folder, *_ in ROWS:
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / image).write_bytes(b"\x89PNG")
    d = padchest_datalist(table, image_root=root)
    assert _by_image(d)["b2_ap.png"]["image"] == os.path.join(root, "1", "b2_ap.png")
    flat = tmp_path / "flat"
    flat.mkdir()
    for image, *_ in ROWS:
        (flat / image).write_bytes(b"\x89PNG")
    f = padchest_datalist(table, image_root=flat)
    assert _by_image(f)["b2_ap.png"]["image"] == os.path.join(flat, "b2_ap.png")
    os.remove(root / "3" / "g7_pa.png")
    with pytest.raises(DatalistError, match=r"1 of 6 PadChest image\(s\) are missing, e\.g\. .*g7_pa\.png"
                                            r".*looked for under .*in <ImageDir>/ folders"):
        padchest_datalist(table, image_root=root)


def test_bad_input_errors(table, tmp_path):
    bad = list(ROWS)
    bad[2] = ROWS[2][:8] + ("['lobar atelectasis', 'nodule'", ROWS[2][9])
    with pytest.raises(DatalistError, match=r"t1\.csv: row 4 \(ImageID 'b2_ap\.png'\): Labels \"\['lobar atelectasis', "
                                            r"'nodule'\" is not a list of label strings; accepted: a Python list"):
        padchest_datalist(_write(tmp_path / "t1.csv", bad), check_files=False)
    bad[2] = ROWS[2][:8] + ("pleural effusion", ROWS[2][9])
    with pytest.raises(DatalistError, match=r"row 4 .*'pleural effusion' is not a list of label strings"):
        padchest_datalist(_write(tmp_path / "t2.csv", bad), check_files=False)
    bad[2] = ROWS[2][:8] + ("[1, 2]", ROWS[2][9])
    with pytest.raises(DatalistError, match=r"row 4 .*'\[1, 2\]' is not a list of label strings"):
        padchest_datalist(_write(tmp_path / "t3.csv", bad), check_files=False)
    no_labels = _write(tmp_path / "t4.csv", ROWS, [c if c != "Labels" else "Label" for c in HEADER])
    with pytest.raises(DatalistError, match=r"t4\.csv: missing column\(s\) \['Labels'\]; the PadChest label table has "
                                            r"\['ImageID', 'PatientID', 'Labels'\]"):
        padchest_datalist(no_labels, check_files=False)
    no_method = _write(tmp_path / "t5.csv", ROWS, [c for c in HEADER if c != "MethodLabel"])
    with pytest.raises(DatalistError, match=r"physician_only needs a 'MethodLabel' column"):
        padchest_datalist(no_method, physician_only=True, check_files=False)
    with pytest.raises(DatalistError, match="label table not found"):
        padchest_datalist(tmp_path / "nope.csv")


def test_cli(table, tmp_path, capsys):
    out = tmp_path / "pc.json"
    code = datalist_main(["padchest", "--csv", str(table), "--physician-only", "--projections", "PA,L",
                          "--vocabulary", "--no-check-files", "--out", str(out), "--fractions", "1,0,0"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["vocabulary"] == "hmn-cxr-1" and data["source"] == "padchest"
    got = {os.path.basename(e["image"]): e for e in data["training"]}
    assert sorted(got) == ["a1_l.png", "a1_pa.png", "c3_pa.png", "f6_pa.png"]
    effusion = data["class_names"].index("Pleural Effusion")
    assert got["a1_l.png"]["label"][effusion] == 1 and got["a1_l.png"]["view"] == "LATERAL"
    assert "images" in capsys.readouterr().out
    assert datalist_main(["padchest", "--csv", str(table), "--classes", "loc left", "--no-check-files",
                          "--out", str(out)]) == 1
    assert "localizations" in capsys.readouterr().err


def test_physician_only_and_projections_count_the_rows_they_leave_out(table, caplog):
    """By hand, on ROWS: physician_only leaves out b2_ap, e5_co, g7_pa (RNN_model); then projections=PA leaves
    out a1_l (L) and d4_ap (AP) of the rest; a1_pa, c3_pa and f6_pa are kept: 8 = 3 + 3 + 2."""
    with caplog.at_level(logging.WARNING, logger="hmn.data.padchest"):
        d = padchest_datalist(table, physician_only=True, projections=["PA"], check_files=False)
    assert sorted(_by_image(d)) == ["a1_pa.png", "c3_pa.png", "f6_pa.png"]
    rows = d["rows"]
    assert (rows["read"], rows["kept"]) == (8, 3)
    assert [(x["filter"], x["count"], x["examples"]) for x in rows["dropped"]] == [
        ("physician_only", 3, ["b2_ap.png", "e5_co.png", "g7_pa.png"]),
        ("projections", 2, ["a1_l.png", "d4_ap.png"])]
    assert "3 of 8 rows left out by physician_only: MethodLabel is not Physician" in caplog.text
    assert "2 of 8 rows left out by projections: Projection not in ['pa']" in caplog.text


# Sub-type labels of PadChest's label tree, one image each (invented rows), and the canonical findings each
# must make positive with vocabulary=True, worked out by hand from the tree and the documented exclusions.
SUBTYPES = [
    ("h01.png", "['apical pleural thickening']", {"Pleural Thickening"}),
    ("h02.png", "['calcified pleural thickening', 'loc left']", {"Pleural Thickening"}),
    ("h03.png", "['loculated pleural effusion']", {"Pleural Effusion"}),
    ("h04.png", "['loculated fissural effusion']", {"Pleural Effusion"}),
    ("h05.png", "['hydropneumothorax']", {"Pneumothorax", "Pleural Effusion"}),
    ("h06.png", "['atelectasis basal']", {"Atelectasis"}),
    ("h07.png", "['empyema']", {"Pleural Effusion"}),
    ("h08.png", "['fracture', 'callus rib fracture']", {"Fracture"}),
    ("h09.png", "['atypical pneumonia']", {"Pneumonia"}),
    ("h10.png", "['reticulonodular interstitial pattern']", {"Interstitial Lung Disease"}),
    ("h11.png", "['pleural mass', 'air bronchogram']", {"Mass", "Consolidation"}),
    # documented exclusions: no parent finding
    ("h12.png", "['subcutaneous emphysema']", set()),
    ("h13.png", "['pleural plaques', 'breast mass', 'tuberculosis sequelae']", set()),
]


def test_vocabulary_maps_the_label_tree_sub_types(tmp_path):
    rows = [(image, "0", "20150101", f"pt{k}", "2015", "F", "PA", "Physician", labels, "[]")
            for k, (image, labels, _) in enumerate(SUBTYPES)]
    d = padchest_datalist(_write(tmp_path / "sub.csv", rows), check_files=False, vocabulary=True,
                          fractions=(1.0, 0.0, 0.0))
    names = d["class_names"]
    got = _by_image(d)
    assert {image: {n for n, v in zip(names, got[image]["label"]) if v} for image, *_ in SUBTYPES} == {
        image: expected for image, _, expected in SUBTYPES}
    assert "age" not in got["h01.png"]  # born in the study year: age 0 is unknown (normalize_age)


def test_sub_types_in_raw_classes(tmp_path):
    """Without the vocabulary, a sub-type is a class of its own, by name."""
    rows = [(image, "0", "20150101", f"pt{k}", "1950", "F", "PA", "Physician", labels, "[]")
            for k, (image, labels, _) in enumerate(SUBTYPES)]
    d = padchest_datalist(_write(tmp_path / "sub.csv", rows), check_files=False, fractions=(1.0, 0.0, 0.0),
                          classes=["pleural thickening", "apical pleural thickening"])
    got = _by_image(d)
    assert got["h01.png"]["label"] == [0, 1] and got["h02.png"]["label"] == [0, 0]
    assert got["h01.png"]["age"] == 65
