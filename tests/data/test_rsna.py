"""RSNA Pneumonia Detection datalists: tables in the published stage 2 layout (one row per box), the
consistency checks, the optional detailed class, the split and DICOM header metadata. Ids are invented."""

from __future__ import annotations

import json
import logging

import pytest

from hmn.data import DatalistError, VOCABULARY_VERSION, patient_overlap, rsna_pneumonia_datalist
from hmn.data.cli import datalist_main

LABELS = """patientId,x,y,width,height,Target
p-neg-0001,,,,,0
p-box-0002,264.0,152.0,213.0,379.0,1
p-box-0002,562.0,152.0,256.0,453.0,1
p-abn-0003,,,,,0
p-box-0004,323.0,577.0,160.0,104.0,1
p-neg-0005,,,,,0
p-box-0006,100.0,200.0,150.0,250.0,1
p-box-0006,450.0,210.0,140.0,260.0,1
p-box-0006,300.0,600.0,90.0,80.0,1
p-abn-0007,,,,,0
p-neg-0008,,,,,0
p-neg-0009,,,,,0
p-abn-0010,,,,,0
"""
CLASSES = """patientId,class
p-neg-0001,Normal
p-box-0002,Lung Opacity
p-box-0002,Lung Opacity
p-abn-0003,No Lung Opacity / Not Normal
p-box-0004,Lung Opacity
p-neg-0005,Normal
p-box-0006,Lung Opacity
p-box-0006,Lung Opacity
p-box-0006,Lung Opacity
p-abn-0007,No Lung Opacity / Not Normal
p-neg-0008,Normal
p-neg-0009,Normal
p-abn-0010,No Lung Opacity / Not Normal
"""
IDS = ["p-neg-0001", "p-box-0002", "p-abn-0003", "p-box-0004", "p-neg-0005", "p-box-0006", "p-abn-0007",
       "p-neg-0008", "p-neg-0009", "p-abn-0010"]
PNEUMONIA = {"p-box-0002", "p-box-0004", "p-box-0006"}  # hand-read from LABELS: the ids with Target 1
NOT_NORMAL = {"p-abn-0003", "p-abn-0007", "p-abn-0010"}


def _write(folder, labels=LABELS, classes=CLASSES, images=True):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage_2_train_labels.csv").write_text(labels)
    (folder / "stage_2_detailed_class_info.csv").write_text(classes)
    if images:
        (folder / "stage_2_train_images").mkdir(exist_ok=True)
        for pid in IDS:
            (folder / "stage_2_train_images" / f"{pid}.dcm").write_bytes(b"")
    return folder / "stage_2_train_labels.csv", folder / "stage_2_detailed_class_info.csv"


def _labels(d) -> dict[str, list[int]]:
    return {e["patient_id"]: e["label"] for s in ("training", "validation", "test") for e in d[s]}


def test_one_entry_per_image_whatever_its_boxes(tmp_path):
    labels_csv, _ = _write(tmp_path)
    d = rsna_pneumonia_datalist(labels_csv, fractions=(1.0, 0.0, 0.0))
    assert d["class_names"] == ["Pneumonia"] and d["source"] == "rsna-pneumonia" and "vocabulary" not in d
    assert [e["patient_id"] for e in d["training"]] == IDS  # 13 rows, 10 images, table order
    assert _labels(d) == {pid: [int(pid in PNEUMONIA)] for pid in IDS}
    for e in d["training"]:
        assert e["image"] == str(tmp_path / "stage_2_train_images" / f"{e['patient_id']}.dcm")
        assert set(e) == {"image", "label", "patient_id"}


def test_patient_wise_split_by_fractions(tmp_path):
    labels_csv, _ = _write(tmp_path)
    d = rsna_pneumonia_datalist(labels_csv, fractions=(0.6, 0.2, 0.2), seed=1)
    # 10 images of one patient each: each image's midpoint (k + 0.5) / 10 falls below 0.6 six times, in
    # [0.6, 0.8) twice and above twice
    assert [len(d[s]) for s in ("training", "validation", "test")] == [6, 2, 2]
    assert patient_overlap(d) == {}
    again = rsna_pneumonia_datalist(labels_csv, fractions=(0.6, 0.2, 0.2), seed=1)
    assert again == d
    with pytest.raises(DatalistError, match="fractions must be three"):
        rsna_pneumonia_datalist(labels_csv, fractions=(0.5, 0.2))


def test_not_normal_class_and_vocabulary(tmp_path):
    labels_csv, classes_csv = _write(tmp_path)
    d = rsna_pneumonia_datalist(labels_csv, class_info_csv=classes_csv, include_not_normal=True, vocabulary=True,
                                fractions=(1.0, 0.0, 0.0))
    assert d["class_names"] == ["Pneumonia", "No Lung Opacity / Not Normal"]
    assert d["vocabulary"] == VOCABULARY_VERSION and d["source"] == "rsna-pneumonia"
    expected = {pid: [int(pid in PNEUMONIA), int(pid in NOT_NORMAL)] for pid in IDS}
    assert _labels(d) == expected
    assert expected["p-neg-0001"] == [0, 0]  # "Normal" is the all-zero label
    only = rsna_pneumonia_datalist(labels_csv, class_info_csv=classes_csv, vocabulary=True, fractions=(1.0, 0.0, 0.0))
    assert only["class_names"] == ["Pneumonia"]  # the class table alone only checks consistency
    with pytest.raises(DatalistError, match="include_not_normal needs class_info_csv"):
        rsna_pneumonia_datalist(labels_csv, include_not_normal=True)


@pytest.mark.parametrize("labels, message", [
    (LABELS.replace("p-box-0004,323.0,577.0,160.0,104.0,1", "p-box-0004,,,,,1"),
     r"row 6, patientId 'p-box-0004': Target 1 without a complete box"),
    (LABELS.replace("p-neg-0005,,,,,0", "p-neg-0005,10,10,5,5,0"),
     r"row 7, patientId 'p-neg-0005': Target 0 with box value\(s\) in \['x', 'y', 'width', 'height'\]"),
    (LABELS + "p-box-0002,,,,,0\n",
     r"patientId 'p-box-0002' has conflicting rows: Target 1 in row 3 and Target 0 in row 15"),
    (LABELS.replace("p-neg-0008,,,,,0", "p-neg-0008,,,,,2"),
     r"Target '2' in row 12 \(patientId 'p-neg-0008'\); accepted: 0 or 1"),
    ("patientId,x,y,width,height\np1,,,,\n", r"missing column\(s\) \['Target'\]"),
])
def test_inconsistent_label_tables(tmp_path, labels, message):
    labels_csv, _ = _write(tmp_path, labels=labels)
    with pytest.raises(DatalistError, match=message) as err:
        rsna_pneumonia_datalist(labels_csv, check_files=False)
    assert "stage_2_train_labels.csv" in str(err.value)


@pytest.mark.parametrize("classes, message", [
    (CLASSES.replace("p-abn-0003,No Lung Opacity / Not Normal", "p-abn-0003,Lung Opacity"),
     r"patientId 'p-abn-0003': class 'Lung Opacity' in .* contradicts Target 0"),
    (CLASSES.replace("p-neg-0009,Normal", "p-neg-0009,Abnormal"),
     r"class 'Abnormal' in row 13 \(patientId 'p-neg-0009'\); accepted: \['Lung Opacity', "
     r"'No Lung Opacity / Not Normal', 'Normal'\]"),
    (CLASSES.replace("p-neg-0009,Normal\n", ""), r"1 patientId\(s\) of the label table are not in .*p-neg-0009"),
])
def test_inconsistent_class_tables(tmp_path, classes, message):
    labels_csv, classes_csv = _write(tmp_path, classes=classes)
    with pytest.raises(DatalistError, match=message):
        rsna_pneumonia_datalist(labels_csv, class_info_csv=classes_csv, include_not_normal=True, check_files=False)


def test_missing_images(tmp_path):
    labels_csv, _ = _write(tmp_path, images=False)
    with pytest.raises(DatalistError, match=r"10 of 10 RSNA image\(s\) are missing.*<patientId>.dcm"):
        rsna_pneumonia_datalist(labels_csv)
    elsewhere = tmp_path / "dicoms"
    elsewhere.mkdir()
    for pid in IDS:
        (elsewhere / f"{pid}.dcm").write_bytes(b"")
    d = rsna_pneumonia_datalist(labels_csv, image_root=elsewhere, fractions=(1.0, 0.0, 0.0))
    assert d["training"][0]["image"] == str(elsewhere / "p-neg-0001.dcm")


def test_metadata_from_dicom_headers(tmp_path, write_dicom, caplog):
    labels_csv, _ = _write(tmp_path)
    images = tmp_path / "stage_2_train_images"
    write_dicom(images / "p-neg-0001.dcm", PatientAge="51", PatientSex="F", ViewPosition="AP")  # RSNA: no unit
    write_dicom(images / "p-box-0002.dcm", PatientAge="061Y", PatientSex="M", ViewPosition="PA")
    write_dicom(images / "p-abn-0003.dcm", PatientAge="006M")
    write_dicom(images / "p-box-0004.dcm", PatientAge="148", PatientSex="m")  # a typing error in the real table
    write_dicom(images / "p-abn-0007.dcm", PatientAge="0", PatientSex="F")  # age 0: unknown (normalize_age)
    d = rsna_pneumonia_datalist(labels_csv, read_metadata=True, fractions=(1.0, 0.0, 0.0))
    meta = {e["patient_id"]: {k: v for k, v in e.items() if k not in ("image", "label", "patient_id")}
            for e in d["training"]}
    assert meta["p-neg-0001"] == {"age": 51, "sex": "F", "view": "AP"}
    assert meta["p-box-0002"] == {"age": 61, "sex": "M", "view": "PA"}
    assert meta["p-abn-0003"] == {"age": 0.5}
    assert meta["p-box-0004"] == {"sex": "M"}
    assert meta["p-neg-0005"] == {}  # an empty placeholder file has no header
    assert meta["p-abn-0007"] == {"sex": "F"}
    assert "SYNTH" not in json.dumps(d) and "Synthetic" not in json.dumps(d)
    with caplog.at_level(logging.WARNING, logger="hmn.data"):
        nowhere = rsna_pneumonia_datalist(labels_csv, image_root=tmp_path / "nowhere", read_metadata=True,
                                          check_files=False, fractions=(1.0, 0.0, 0.0))
    assert all(set(e) == {"image", "label", "patient_id"} for e in nowhere["training"])
    assert any("10 RSNA Pneumonia image file(s) do not exist" in r.getMessage() for r in caplog.records)


def test_every_image_is_accounted_for(tmp_path, caplog):
    """10 images in the label table, all kept; a patientId only in the class table has no Target and is
    counted as left out, by id."""
    labels_csv, classes_csv = _write(tmp_path, classes=CLASSES + "p-only-0011,Normal\n")
    with caplog.at_level(logging.WARNING, logger="hmn.data.rsna"):
        d = rsna_pneumonia_datalist(labels_csv, class_info_csv=classes_csv, fractions=(1.0, 0.0, 0.0))
    assert (d["rows"]["unit"], d["rows"]["read"], d["rows"]["kept"]) == ("images", 11, 10)
    assert [(x["filter"], x["count"], x["examples"]) for x in d["rows"]["dropped"]] == [
        ("labels", 1, ["p-only-0011"])]
    assert "1 of 11 images left out by labels: patientId only in stage_2_detailed_class_info.csv" in caplog.text
    plain = rsna_pneumonia_datalist(labels_csv, fractions=(1.0, 0.0, 0.0))
    assert (plain["rows"]["read"], plain["rows"]["kept"], plain["rows"]["dropped"]) == (10, 10, [])


def test_cli(tmp_path, capsys):
    labels_csv, classes_csv = _write(tmp_path)
    out = tmp_path / "rsna.json"
    code = datalist_main(["rsna-pneumonia", "--labels-csv", str(labels_csv), "--class-info-csv", str(classes_csv),
                          "--include-not-normal", "--fractions", "0.6,0.2,0.2", "--seed", "1", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["class_names"] == ["Pneumonia", "No Lung Opacity / Not Normal"]
    assert _labels(data) == {pid: [int(pid in PNEUMONIA), int(pid in NOT_NORMAL)] for pid in IDS}
    assert data["training"][0]["image"].startswith("stage_2_train_images/")
    printed = capsys.readouterr().out
    assert "Pneumonia" in printed and "images" in printed
    assert datalist_main(["rsna-pneumonia", "--labels-csv", str(labels_csv), "--include-not-normal",
                          "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: include_not_normal needs") and "Traceback" not in err
