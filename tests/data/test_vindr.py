"""VinDr-CXR datalists: reader combination on a hand-made three-reader table in the published column layout,
the official split, the vocabulary mapping and DICOM header metadata. Ids are invented; no patient data."""

from __future__ import annotations

import json
import logging

import pytest

from hmn.data import DatalistError, VOCABULARY_VERSION, patient_overlap, vindr_cxr_datalist
from hmn.data.cli import datalist_main
from hmn.data.dicom_metadata import parse_dicom_age

# The published columns of annotations/image_labels_train.csv (after image_id, rad_id).
LABELS = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung cavity", "Lung cyst", "Lung Opacity",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]

# image -> one set of marked labels per radiologist
TRAIN = {
    "t1": [{"Cardiomegaly", "Aortic enlargement"}, {"Cardiomegaly"}, {"No finding"}],
    "t2": [{"Pleural effusion"}, {"Pleural effusion"}, {"Pleural effusion", "Rib fracture"}],
    "t3": [{"Rib fracture"}, {"Clavicle fracture"}, {"No finding"}],
    "t4": [{"No finding"}, {"No finding"}, {"No finding"}],
    "t5": [{"Nodule/Mass"}, {"Nodule/Mass"}, {"Nodule/Mass", "COPD"}],
    "t6": [{"Atelectasis"}, {"No finding"}, {"Atelectasis", "Lung Opacity"}],
}
# test images: one consensus row each
TEST = {
    "s1": {"Pneumonia", "Consolidation"},
    "s2": {"No finding"},
    "s3": {"Pleural effusion", "Lung tumor", "Nodule/Mass"},
}

# Hand-worked: the positive labels of each training image under each rule.
EXPECTED = {
    "majority": {"t1": {"Cardiomegaly"}, "t2": {"Pleural effusion"}, "t3": set(), "t4": set(),
                 "t5": {"Nodule/Mass"}, "t6": {"Atelectasis"}},
    "any": {"t1": {"Cardiomegaly", "Aortic enlargement"}, "t2": {"Pleural effusion", "Rib fracture"},
            "t3": {"Rib fracture", "Clavicle fracture"}, "t4": set(), "t5": {"Nodule/Mass", "COPD"},
            "t6": {"Atelectasis", "Lung Opacity"}},
    "all": {"t1": set(), "t2": {"Pleural effusion"}, "t3": set(), "t4": set(), "t5": {"Nodule/Mass"}, "t6": set()},
}


def _row(values: list[str]) -> str:
    return ",".join(f'"{v}"' if "," in v else v for v in values)


def _write_tables(root, train=TRAIN, test=TEST, rad="rad_id", test_rad=False, test_other="Other disease"):
    ann = root / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    lines = [_row(["image_id", rad] + LABELS)]
    for image, readers in train.items():
        for k, marked in enumerate(readers):
            lines.append(_row([image, f"R{k + 1}"] + [str(int(c in marked)) for c in LABELS]))
    (ann / "image_labels_train.csv").write_text("\n".join(lines) + "\n")
    test_labels = [test_other if c == "Other diseases" else c for c in LABELS]
    lines = [_row(["image_id"] + (["rad_id"] if test_rad else []) + test_labels)]
    for image, marked in test.items():
        lines.append(_row([image] + (["R8"] if test_rad else []) + [str(int(c in marked)) for c in LABELS]))
    (ann / "image_labels_test.csv").write_text("\n".join(lines) + "\n")
    for split, ids in (("train", train), ("test", test)):
        (root / split).mkdir(exist_ok=True)
        for image in ids:
            (root / split / f"{image}.dicom").write_bytes(b"")
    return root


def _positives(d) -> dict[str, set[str]]:
    names = d["class_names"]
    return {e["patient_id"]: {n for n, v in zip(names, e["label"]) if v}
            for s in ("training", "validation", "test") for e in d[s]}


@pytest.mark.parametrize("rule", ["majority", "any", "all"])
def test_reader_combination_rules(tmp_path, rule):
    _write_tables(tmp_path)
    d = vindr_cxr_datalist(tmp_path, combine=rule, val_fraction=0.0)
    assert d["class_names"] == [c for c in LABELS if c != "No finding"]
    got = _positives(d)
    assert {k: got[k] for k in TRAIN} == EXPECTED[rule]
    # the test split is the consensus table as given, whatever the rule
    assert {k: got[k] for k in TEST} == {k: v - {"No finding"} for k, v in TEST.items()}
    assert d["source"] == "vindr-cxr" and d["reader_combination"] == rule and "vocabulary" not in d


def test_rules_differ_on_the_hand_made_table():
    # the table is only a good test when each rule gives a different answer
    m, a, al = EXPECTED["majority"], EXPECTED["any"], EXPECTED["all"]
    assert m != a and m != al and a != al


def test_official_split_and_validation_carve(tmp_path):
    _write_tables(tmp_path)
    d = vindr_cxr_datalist(tmp_path, val_fraction=0.5, seed=3)
    assert sorted(e["patient_id"] for e in d["test"]) == sorted(TEST)
    carved = [e["patient_id"] for e in d["training"] + d["validation"]]
    assert sorted(carved) == sorted(TRAIN)
    assert len(d["training"]) == 3 and len(d["validation"]) == 3  # half of 6 images
    assert patient_overlap(d) == {}
    for s, folder in (("training", "train"), ("validation", "train"), ("test", "test")):
        for e in d[s]:
            assert e["image"] == str(tmp_path / folder / f"{e['patient_id']}.dicom")
            assert set(e) == {"image", "label", "patient_id"}
    again = vindr_cxr_datalist(tmp_path, val_fraction=0.5, seed=3)
    assert [e["patient_id"] for e in again["validation"]] == [e["patient_id"] for e in d["validation"]]
    assert vindr_cxr_datalist(tmp_path, val_fraction=0.0)["validation"] == []
    (tmp_path / "annotations" / "image_labels_test.csv").unlink()  # the default test table is optional
    assert vindr_cxr_datalist(tmp_path)["test"] == []
    with pytest.raises(DatalistError, match="test label table not found"):  # a table named by the user is not
        vindr_cxr_datalist(tmp_path, test_csv=tmp_path / "annotations" / "image_labels_test.csv")


def test_rad_ID_spelling_and_test_table_with_reader_column(tmp_path):
    _write_tables(tmp_path, rad="rad_ID", test_rad=True)
    d = vindr_cxr_datalist(tmp_path, val_fraction=0.0)
    assert _positives(d)["s3"] == {"Pleural effusion", "Lung tumor", "Nodule/Mass"}
    assert "Other diseases" in d["class_names"]


def test_unexpected_reader_count_warns_with_the_count(tmp_path, caplog):
    train = dict(TRAIN, t7=[{"Edema"}, {"No finding"}], t8=[{"Edema"}, {"Edema"}])
    _write_tables(tmp_path, train=train)
    with caplog.at_level(logging.WARNING, logger="hmn.data.vindr"):
        d = vindr_cxr_datalist(tmp_path, val_fraction=0.0)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 image(s) have 2 reader row(s) instead of 3" in m and "t7" in m for m in messages)
    got = _positives(d)
    assert got["t7"] == set() and got["t8"] == {"Edema"}  # majority of two readers needs both


def test_vocabulary_mapping(tmp_path):
    _write_tables(tmp_path)
    d = vindr_cxr_datalist(tmp_path, vocabulary=True, val_fraction=0.0)
    assert d["class_names"] == [
        "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Fracture",
        "Infiltration", "Interstitial Lung Disease", "Lung Opacity", "Nodule/Mass", "Pleural Effusion",
        "Pleural Thickening", "Pneumonia", "Pneumothorax", "Aortic Enlargement", "Calcification", "Tuberculosis",
    ]
    assert d["vocabulary"] == VOCABULARY_VERSION and d["source"] == "vindr-cxr"
    got = _positives(d)
    # t3: one reader marks a rib fracture, one a clavicle fracture: two of three readers see a Fracture
    assert got["t3"] == {"Fracture"}
    assert got["t2"] == {"Pleural Effusion"}
    assert got["t5"] == {"Nodule/Mass"}  # not Nodule, not Mass; COPD has no canonical counterpart
    assert got["s3"] == {"Pleural Effusion", "Nodule/Mass"}  # Lung tumor has none either
    anyone = _positives(vindr_cxr_datalist(tmp_path, vocabulary=True, combine="any", val_fraction=0.0))
    assert anyone["t2"] == {"Pleural Effusion", "Fracture"}


def test_vocabulary_classes_chosen(tmp_path):
    _write_tables(tmp_path)
    d = vindr_cxr_datalist(tmp_path, vocabulary=True, classes=["Fracture", "COPD"], combine="any", val_fraction=0.0)
    assert d["class_names"] == ["Fracture", "COPD"]
    assert _positives(d)["t5"] == {"COPD"} and _positives(d)["t3"] == {"Fracture"}
    with pytest.raises(DatalistError, match="'Pleural effusion' is 'Pleural Effusion'"):
        vindr_cxr_datalist(tmp_path, vocabulary=True, classes=["Pleural effusion"])
    with pytest.raises(DatalistError, match="no VinDr-CXR label .* maps to the finding 'Hernia'"):
        vindr_cxr_datalist(tmp_path, vocabulary=True, classes=["Hernia"])
    src = vindr_cxr_datalist(tmp_path, classes=["pleural EFFUSION", "No finding"], val_fraction=0.0)
    assert src["class_names"] == ["Pleural effusion", "No finding"]
    assert _positives(src)["t4"] == {"No finding"}


def test_bad_input_messages(tmp_path):
    root = _write_tables(tmp_path)
    with pytest.raises(DatalistError, match=r"combine='vote'; accepted: \['majority', 'any', 'all'\]"):
        vindr_cxr_datalist(root, combine="vote")
    with pytest.raises(DatalistError, match="class 'Hernia' is not a label"):
        vindr_cxr_datalist(root, classes=["Hernia"])
    csv = root / "annotations" / "image_labels_train.csv"
    lines = csv.read_text().splitlines()
    cells = lines[4].split(",")
    cells[2 + LABELS.index("Edema")] = "2"
    lines[4] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatalistError, match=r"image_labels_train.csv: value '2' in column 'Edema' \(row 5, image_id "
                                            r"'t2'\); accepted: 0 or 1"):
        vindr_cxr_datalist(root)
    kaggle = tmp_path / "train.csv"
    kaggle.write_text("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\nk1,No finding,14,R1,,,,\n")
    with pytest.raises(DatalistError, match="bounding-box table .* not read"):
        vindr_cxr_datalist(root, train_csv=kaggle)
    with pytest.raises(DatalistError, match="train label table not found"):
        vindr_cxr_datalist(tmp_path / "nowhere")


def test_duplicate_test_rows_overlap_and_missing_files(tmp_path):
    root = _write_tables(tmp_path / "a", test=dict(TEST, t1={"Edema"}))
    with pytest.raises(DatalistError, match="1 image id.* in both"):
        vindr_cxr_datalist(root)
    root = _write_tables(tmp_path / "b")
    test_csv = root / "annotations" / "image_labels_test.csv"
    test_csv.write_text(test_csv.read_text() + test_csv.read_text().splitlines()[1] + "\n")
    with pytest.raises(DatalistError, match=r"image_id 's1' in rows 2 and 5; the test table has one"):
        vindr_cxr_datalist(root)
    root = _write_tables(tmp_path / "c")
    (root / "train" / "t4.dicom").unlink()
    with pytest.raises(DatalistError, match=r"1 of 9 VinDr-CXR image\(s\) are missing"):
        vindr_cxr_datalist(root)
    assert len(vindr_cxr_datalist(root, check_files=False, val_fraction=0.0)["training"]) == 6  # still listed


@pytest.mark.parametrize("text, years", [("061Y", 61), ("006M", 0.5), ("003M", 0.25), ("002W", 0.038),
                                         ("003D", 0.008), ("000D", 0.0), ("51", 51), ("", None), ("abc", None)])
def test_dicom_age_parsing(text, years):
    assert parse_dicom_age(text) == years


def test_metadata_from_dicom_headers(tmp_path, write_dicom, caplog):
    root = _write_tables(tmp_path)
    write_dicom(root / "train" / "t1.dicom", PatientAge="061Y", PatientSex="F", ViewPosition="PA")
    write_dicom(root / "train" / "t2.dicom", PatientAge="006M", PatientSex="M")
    write_dicom(root / "train" / "t3.dicom", PatientAge="000D", PatientSex="O", ViewPosition="")
    write_dicom(root / "test" / "s1.dicom", PatientSex="", ViewPosition="AP")
    plain = vindr_cxr_datalist(root, val_fraction=0.0)
    assert all(set(e) == {"image", "label", "patient_id"} for e in plain["training"] + plain["test"])
    with caplog.at_level(logging.INFO, logger="hmn.data"):
        d = vindr_cxr_datalist(root, val_fraction=0.0, read_metadata=True)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "5 VinDr-CXR image file(s) have no readable DICOM header" in logged  # the empty placeholders
    assert "age known for 2, sex for 3, view for 2" in logged
    assert "061Y" not in logged and "Synthetic" not in logged  # counts only, never values
    meta = {e["patient_id"]: {k: v for k, v in e.items() if k not in ("image", "label", "patient_id")}
            for s in ("training", "test") for e in d[s]}
    assert meta["t1"] == {"age": 61, "sex": "F", "view": "PA"}
    assert meta["t2"] == {"age": 0.5, "sex": "M"}
    assert meta["t3"] == {"sex": "O"}  # 000D is the anonymiser's blank, not a newborn
    assert meta["s1"] == {"view": "AP"}
    assert meta["t4"] == {} and meta["s2"] == {}  # empty placeholder files: no readable header
    out = tmp_path / "dl.json"
    assert "Synthetic" not in json.dumps(d) and "SYNTH" not in json.dumps(d)
    assert datalist_main(["vindr-cxr", "--root", str(root), "--read-metadata", "--out", str(out)]) == 0
    assert "SYNTH" not in out.read_text()


def test_every_image_is_accounted_for(tmp_path):
    """6 training images (18 reader rows, combined per image) and 3 test images: none is left out."""
    root = _write_tables(tmp_path)
    d = vindr_cxr_datalist(root, val_fraction=0.0)
    assert d["rows"] == {"unit": "images", "read": 9, "kept": 9, "dropped": []}


def test_cli(tmp_path, capsys):
    root = _write_tables(tmp_path / "vindr")
    out = tmp_path / "vindr.json"
    code = datalist_main(["vindr-cxr", "--root", str(root), "--combine", "any", "--vocabulary", "--val-fraction", "0",
                          "--classes", "Fracture,Pleural Effusion", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["class_names"] == ["Fracture", "Pleural Effusion"] and data["vocabulary"] == VOCABULARY_VERSION
    labels = {e["patient_id"]: e["label"] for s in ("training", "test") for e in data[s]}
    assert labels["t2"] == [1, 1] and labels["t3"] == [1, 0] and labels["s3"] == [0, 1]
    assert data["training"][0]["image"] == "vindr/train/t1.dicom"  # relative to the JSON's folder
    printed = capsys.readouterr().out
    assert "images" in printed and "9 images read, 9 kept, 0 left out" in printed
    assert datalist_main(["vindr-cxr", "--root", str(root), "--combine", "vote", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: combine='vote'") and "Traceback" not in err
