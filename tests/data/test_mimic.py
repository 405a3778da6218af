"""MIMIC-CXR-JPG datalists, on small invented tables in the release's published column layout.

Every id, date and age below is made up; the expected labels, splits, ages and paths are worked out by hand
from the tables written here.
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import pytest

from hmn.data import DatalistError, mimic_cxr_datalist, patient_overlap
from hmn.data.cli import datalist_main

FOUR = ["Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"]
OBS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
       "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"]

METADATA = [
    "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,StudyDate,StudyTime,"
    "ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning",
    "d1a,10000001,50000001,CHEST (PA AND LAT),PA,3056,2544,21800506,213014.531,CHEST (PA AND LAT),postero-anterior,Erect",
    "d1b,10000001,50000001,CHEST (PA AND LAT),LATERAL,3056,2544,21800506,213014.531,CHEST (PA AND LAT),lateral,Erect",
    "d2a,10000001,50000002,CHEST (PORTABLE AP),AP,2539,3050,21820101,80000.0,CHEST (PORTABLE AP),antero-posterior,",
    "d3a,10000002,50000003,CHEST (PA AND LAT),PA,3056,2544,,,CHEST (PA AND LAT),postero-anterior,Erect",
    "d3b,10000002,50000003,CHEST (PA AND LAT),LL,3056,2544,,,CHEST (PA AND LAT),left lateral,Erect",
    "d4a,11000003,50000004,CHEST (PORTABLE AP),AP,2539,3050,21900303,101010.0,CHEST (PORTABLE AP),antero-posterior,",
    "d5a,12000004,50000005,CHEST (PA AND LAT),PA,3056,2544,21950101,90000.0,CHEST (PA AND LAT),postero-anterior,Erect",
]


def _label_table(rows: dict[str, dict[str, float]]) -> list[str]:
    """Rows of a chexpert/negbio table: subject_id, study_id, then the 14 observations (blank when not given)."""
    subject = {"50000001": "10000001", "50000002": "10000001", "50000003": "10000002", "50000004": "11000003"}
    lines = ["subject_id,study_id," + ",".join(OBS)]
    for study, values in rows.items():
        lines.append(f"{subject[study]},{study}," + ",".join("" if o not in values else str(values[o]) for o in OBS))
    return lines


CHEXPERT = _label_table({
    "50000001": {"Atelectasis": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0, "Support Devices": 1.0},
    "50000002": {"No Finding": 1.0},
    "50000003": {"Cardiomegaly": 1.0, "Pleural Effusion": -1.0},
    "50000004": {"Atelectasis": -1.0, "Edema": -1.0},
})  # study 50000005 (image d5a) has no label row
NEGBIO = _label_table({
    "50000001": {"Atelectasis": 1.0, "Cardiomegaly": 1.0, "Edema": 0.0},
    "50000002": {"No Finding": 1.0},
    "50000003": {"Pleural Effusion": 1.0},
    "50000004": {"Edema": 1.0},
})
SPLIT = ["dicom_id,study_id,subject_id,split", "d1a,50000001,10000001,train", "d1b,50000001,10000001,train",
         "d2a,50000002,10000001,train", "d3a,50000003,10000002,validate", "d3b,50000003,10000002,validate",
         "d4a,50000004,11000003,test", "d5a,50000005,12000004,train"]
PATIENTS = ["subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod",
            "10000001,F,52,2180,2014 - 2016,", "10000002,M,70,2150,2008 - 2010,2152-01-01"]

# hand-worked: the labels of FOUR per study under each policy (blank = 0), and the mask under "ignore"
ONES = {"50000001": [1, 0, 1, 0], "50000002": [0, 0, 0, 0], "50000003": [0, 1, 0, 1], "50000004": [1, 0, 1, 0]}
ZEROS = {"50000001": [1, 0, 0, 0], "50000002": [0, 0, 0, 0], "50000003": [0, 1, 0, 0], "50000004": [0, 0, 0, 0]}
MASK = {"50000001": [1, 1, 0, 1], "50000002": [1, 1, 1, 1], "50000003": [1, 1, 1, 0], "50000004": [0, 1, 0, 1]}
NEGBIO_FOUR = {"50000001": [1, 1, 0, 0], "50000002": [0, 0, 0, 0], "50000003": [0, 0, 0, 1], "50000004": [0, 0, 1, 0]}
STUDY = {"d1a": "50000001", "d1b": "50000001", "d2a": "50000002", "d3a": "50000003", "d3b": "50000003",
         "d4a": "50000004"}


def _write(path, lines, gz=True):
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture
def release(tmp_path):
    """A MIMIC-CXR-JPG 2.0.0-style folder with gzipped tables (no images) and a MIMIC-IV patients table."""
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    root.mkdir(parents=True)
    for kind, lines in (("metadata", METADATA), ("chexpert", CHEXPERT), ("negbio", NEGBIO), ("split", SPLIT)):
        _write(root / f"mimic-cxr-2.0.0-{kind}.csv.gz", lines)
    _write(tmp_path / "patients.csv.gz", PATIENTS)
    return root


def _by_dicom(d):
    return {os.path.basename(e["image"])[:-4]: (s, e) for s in ("training", "validation", "test") for e in d[s]}


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_study_labels_reach_every_image_under_each_policy(release, policy):
    d = mimic_cxr_datalist(release, classes=FOUR, uncertain=policy, check_files=False)
    got = _by_dicom(d)
    assert sorted(got) == sorted(STUDY)  # d5a's study has no label row
    expected = ONES if policy == "ones" else ZEROS
    for dicom, study in STUDY.items():
        entry = got[dicom][1]
        assert entry["label"] == expected[study], dicom
        if policy == "ignore":
            assert entry["label_mask"] == MASK[study]
        else:
            assert "label_mask" not in entry
    assert d["class_names"] == FOUR and d["source"] == "mimic-cxr" and d["labeler"] == "chexpert"
    assert d["uncertain_policy"] == {c: policy for c in FOUR} and "vocabulary" not in d


def test_per_class_policy_default_classes_and_image_paths(release):
    d = mimic_cxr_datalist(release, uncertain={"Edema": "ignore"}, check_files=False)
    assert d["class_names"] == ["Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                                "Pleural Other", "Fracture", "Support Devices"]
    e = _by_dicom(d)["d4a"][1]  # Atelectasis -1 (ones), Edema -1 (ignored)
    names = d["class_names"]
    assert e["label"][names.index("Atelectasis")] == 1 and e["label"][names.index("Edema")] == 0
    assert [i for i, m in enumerate(e["label_mask"]) if m == 0] == [names.index("Edema")]
    d1b = _by_dicom(d)["d1b"][1]
    assert d1b["label"][names.index("Support Devices")] == 1
    assert d1b["image"] == os.path.join(release, "files", "p10", "p10000001", "s50000001", "d1b.jpg")
    assert _by_dicom(d)["d4a"][1]["image"].endswith(os.path.join("files", "p11", "p11000003", "s50000004", "d4a.jpg"))
    assert all(e["patient_id"] in ("10000001", "10000002", "11000003") for _, e in _by_dicom(d).values())


def test_official_split_maps_validate_and_leaves_out_unlabelled_studies(release, caplog):
    with caplog.at_level(logging.WARNING, logger="hmn.data.mimic"):
        d = mimic_cxr_datalist(release, classes=FOUR, check_files=False)
    assert sorted(os.path.basename(e["image"]) for e in d["training"]) == ["d1a.jpg", "d1b.jpg", "d2a.jpg"]
    assert sorted(os.path.basename(e["image"]) for e in d["validation"]) == ["d3a.jpg", "d3b.jpg"]
    assert [os.path.basename(e["image"]) for e in d["test"]] == ["d4a.jpg"]
    assert patient_overlap(d) == {}
    assert "1 of 7 images left out by labels: its study has no row in" in caplog.text
    assert "chexpert.csv.gz" in caplog.text and "d5a" in caplog.text
    # every image row accounted for: 7 read = 6 kept + d5a, whose study has no label row
    assert d["rows"]["read"] == 7 and d["rows"]["kept"] == 6
    assert [(x["filter"], x["count"], x["examples"]) for x in d["rows"]["dropped"]] == [("labels", 1, ["d5a"])]


def test_patient_split_keeps_each_subject_in_one_split(release):
    d = mimic_cxr_datalist(release, classes=FOUR, split="patient", fractions=(0.5, 0.25, 0.25), seed=3,
                           check_files=False)
    assert patient_overlap(d) == {}
    where = {}
    for s in ("training", "validation", "test"):
        for e in d[s]:
            where.setdefault(e["patient_id"], set()).add(s)
    assert set(where) == {"10000001", "10000002", "11000003"} and all(len(v) == 1 for v in where.values())
    again = mimic_cxr_datalist(release, classes=FOUR, split="patient", fractions=(0.5, 0.25, 0.25), seed=3,
                               check_files=False)
    assert again == d


def test_negbio_labeller(release):
    d = mimic_cxr_datalist(release, labeler="negbio", classes=FOUR, check_files=False)
    assert d["labeler"] == "negbio"
    for dicom, (_, e) in _by_dicom(d).items():
        assert e["label"] == NEGBIO_FOUR[STUDY[dicom]]
    assert NEGBIO_FOUR != ONES  # the two tables really differ here


def test_age_sex_view(release, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hmn.data.mimic"):
        d = mimic_cxr_datalist(release, classes=FOUR, patients_csv=tmp_path / "patients.csv.gz", check_files=False)
    got = {k: e for k, (_, e) in _by_dicom(d).items()}
    # 52 + (2180 - 2180); 52 + (2182 - 2180); no StudyDate: anchor_age 70
    assert (got["d1a"]["age"], got["d1a"]["sex"], got["d1a"]["view"]) == (52, "F", "PA")
    assert (got["d1b"]["age"], got["d1b"]["view"]) == (52, "LATERAL")
    assert (got["d2a"]["age"], got["d2a"]["view"]) == (54, "AP")
    assert (got["d3a"]["age"], got["d3a"]["sex"]) == (70, "M")
    assert got["d3b"]["view"] == "LATERAL"  # LL, normalized
    assert "age" not in got["d4a"] and "sex" not in got["d4a"] and got["d4a"]["view"] == "AP"
    assert "1 subject(s) have no row in" in caplog.text
    plain = mimic_cxr_datalist(release, classes=FOUR, check_files=False)
    assert all("age" not in e and "sex" not in e for _, e in _by_dicom(plain).values())


def test_views_filter_compares_view_position_as_written(release):
    d = mimic_cxr_datalist(release, classes=FOUR, views=["pa"], check_files=False)
    assert sorted(_by_dicom(d)) == ["d1a", "d3a"]
    lat = mimic_cxr_datalist(release, classes=FOUR, views=["LATERAL"], check_files=False)
    assert sorted(_by_dicom(lat)) == ["d1b"]  # LL is not LATERAL as written
    with pytest.raises(DatalistError, match=r"no image has a ViewPosition in \['SWIMMERS'\].*'AP', 'LATERAL', 'LL'"):
        mimic_cxr_datalist(release, views=["SWIMMERS"], check_files=False)


def test_vocabulary(release):
    d = mimic_cxr_datalist(release, check_files=False, vocabulary=True, classes=["Pleural Effusion", "Pleural Other",
                                                                                 "No Finding"])
    assert d["vocabulary"] == "hmn-cxr-1" and d["source"] == "mimic-cxr"
    assert d["class_names"] == ["Pleural Effusion", "Pleural Other", "No Finding"]
    got = {k: e for k, (_, e) in _by_dicom(d).items()}
    assert got["d3a"]["label"] == [1, 0, 0] and got["d2a"]["label"] == [0, 0, 1]
    default = mimic_cxr_datalist(release, check_files=False, vocabulary=True)
    assert "No Finding" not in default["class_names"] and len(default["class_names"]) == 13
    # Pleural Other is not Pleural Thickening (vocabulary rule), and MIMIC has no Pleural Thickening label
    with pytest.raises(DatalistError, match=r"\['Pleural Thickening'\] are not canonical findings.*accepted: \["):
        mimic_cxr_datalist(release, check_files=False, vocabulary=True, classes=["Pleural Thickening"])


def test_check_files(release, tmp_path):
    for dicom, study in STUDY.items():
        subject = {"50000001": "10000001", "50000002": "10000001", "50000003": "10000002",
                   "50000004": "11000003"}[study]
        path = release / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff")
    d = mimic_cxr_datalist(release, classes=FOUR)
    assert all(os.path.isfile(e["image"]) for s in ("training", "validation", "test") for e in d[s])
    # image_root may name files/ itself, and the tables may be given one by one
    moved = tmp_path / "tables"
    moved.mkdir()
    for kind in ("metadata", "negbio", "split"):
        os.replace(release / f"mimic-cxr-2.0.0-{kind}.csv.gz", moved / f"{kind}.csv.gz")
    d2 = mimic_cxr_datalist(image_root=release / "files", metadata_csv=moved / "metadata.csv.gz",
                            labels_csv=moved / "negbio.csv.gz", split_csv=moved / "split.csv.gz", classes=FOUR)
    assert [e["image"] for e in d2["test"]] == [e["image"] for e in d["test"]]
    os.remove(d["test"][0]["image"])
    with pytest.raises(DatalistError, match=r"1 of 6 MIMIC-CXR image\(s\) are missing, e\.g\. .*d4a\.jpg.*"
                                            r"looked for under "):
        mimic_cxr_datalist(image_root=release, metadata_csv=moved / "metadata.csv.gz",
                           labels_csv=moved / "negbio.csv.gz", split_csv=moved / "split.csv.gz", classes=FOUR)


def test_plain_csv_tables_and_leaking_split_warning(tmp_path, caplog):
    for kind, lines in (("metadata", METADATA), ("chexpert", CHEXPERT)):
        _write(tmp_path / f"mimic-cxr-2.0.0-{kind}.csv", lines, gz=False)
    leaky = [line.replace("d2a,50000002,10000001,train", "d2a,50000002,10000001,test") for line in SPLIT]
    _write(tmp_path / "mimic-cxr-2.0.0-split.csv", leaky, gz=False)
    with caplog.at_level(logging.WARNING, logger="hmn.data.mimic"):
        d = mimic_cxr_datalist(tmp_path, classes=FOUR, check_files=False)
    assert [os.path.basename(e["image"]) for e in d["test"]] == ["d2a.jpg", "d4a.jpg"]
    # subject 10000001 has d1a, d1b in training and d2a in test: warned about, by name
    assert "1 patient(s) are in two splits (training/test: 1 patient(s), e.g. ['10000001'])" in caplog.text
    assert d["rows"]["patients_in_two_splits"] == {"training/test": {"count": 1, "patients": ["10000001"]}}


def test_every_image_row_is_accounted_for(release, tmp_path, caplog):
    """The metadata table's 7 image rows, by hand: views=PA keeps d1a, d3a, d5a and leaves out d1b (LATERAL),
    d2a (AP), d3b (LL), d4a (AP); d5a's study has no label row; an image the split table does not list is
    left out too (here d1a, taken out of the split table)."""
    with caplog.at_level(logging.WARNING, logger="hmn.data.mimic"):
        d = mimic_cxr_datalist(release, classes=FOUR, views=["PA"], check_files=False)
    rows = d["rows"]
    assert (rows["unit"], rows["read"], rows["kept"]) == ("images", 7, 2)
    assert [(x["filter"], x["count"], x["examples"]) for x in rows["dropped"]] == [
        ("views", 4, ["d1b", "d2a", "d3b", "d4a"]), ("labels", 1, ["d5a"])]
    assert rows["read"] == rows["kept"] + sum(x["count"] for x in rows["dropped"])
    assert "4 of 7 images left out by views: ViewPosition not in ['PA']" in caplog.text
    _write(release / "mimic-cxr-2.0.0-split.csv.gz", [line for line in SPLIT if not line.startswith("d1a,")])
    d = mimic_cxr_datalist(release, classes=FOUR, check_files=False)
    assert [(x["filter"], x["count"], x["examples"]) for x in d["rows"]["dropped"]] == [
        ("labels", 1, ["d5a"]), ("split", 1, ["d1a"])]
    assert d["rows"]["kept"] == 5 and sorted(_by_dicom(d)) == ["d1b", "d2a", "d3a", "d3b", "d4a"]
    out = tmp_path / "m.json"
    assert datalist_main(["mimic-cxr", "--root", str(release), "--classes", ",".join(FOUR), "--views", "PA",
                          "--no-check-files", "--out", str(out)]) == 0


def test_bad_input_errors(release, tmp_path):
    with pytest.raises(DatalistError, match=r"labeler='chexbert'; accepted: \['chexpert', 'negbio'\]"):
        mimic_cxr_datalist(release, labeler="chexbert", check_files=False)
    with pytest.raises(DatalistError, match=r"classes \['Effusion'\] are not observation columns of .*chexpert"
                                            r".*accepted: \['Atelectasis'"):
        mimic_cxr_datalist(release, classes=["Effusion"], check_files=False)
    with pytest.raises(DatalistError, match="unknown uncertainty policy"):
        mimic_cxr_datalist(release, uncertain="maybe", check_files=False)

    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad / "mimic-cxr-2.0.0-metadata.csv", METADATA, gz=False)
    with pytest.raises(DatalistError, match=r"bad: no mimic-cxr-2\.0\.0-chexpert\.csv\(\.gz\) found"):
        mimic_cxr_datalist(bad, check_files=False)
    _write(bad / "mimic-cxr-2.0.0-chexpert.csv", CHEXPERT, gz=False)
    _write(bad / "mimic-cxr-2.0.0-metadata.csv", [METADATA[0].replace("study_id", "studyid")] + METADATA[1:], gz=False)
    with pytest.raises(DatalistError, match=r"metadata\.csv: missing column\(s\) \['study_id'\]; the MIMIC-CXR "
                                            r"metadata table has \['dicom_id', 'subject_id', 'study_id'\]"):
        mimic_cxr_datalist(bad, check_files=False)
    _write(bad / "mimic-cxr-2.0.0-metadata.csv", METADATA, gz=False)
    _write(bad / "mimic-cxr-2.0.0-chexpert.csv", [CHEXPERT[0], CHEXPERT[1].replace(",-1.0,", ",2,", 1)] + CHEXPERT[2:],
           gz=False)
    with pytest.raises(DatalistError, match=r"chexpert\.csv: value 2\.0 in column 'Edema' \(row 2\); accepted: 1, 0, -1"):
        mimic_cxr_datalist(bad, check_files=False)
    _write(bad / "mimic-cxr-2.0.0-chexpert.csv", CHEXPERT[:3] + [CHEXPERT[3].replace(",1.0,", ",yes,", 1)], gz=False)
    with pytest.raises(DatalistError, match=r"value 'yes' in column 'Cardiomegaly' \(row 4\)"):
        mimic_cxr_datalist(bad, check_files=False)
    _write(bad / "mimic-cxr-2.0.0-chexpert.csv", CHEXPERT, gz=False)
    _write(bad / "mimic-cxr-2.0.0-split.csv", SPLIT[:4] + ["d3a,50000003,10000002,val"] + SPLIT[5:], gz=False)
    with pytest.raises(DatalistError, match=r"split\.csv: split 'val' \(row 5\); accepted: \['train', 'validate', 'test'\]"):
        mimic_cxr_datalist(bad, check_files=False)


def test_cli(release, tmp_path, capsys):
    out = tmp_path / "out" / "mimic.json"
    code = datalist_main(["mimic-cxr", "--root", str(release), "--labeler", "negbio", "--uncertain", "ignore",
                          "--classes", ",".join(FOUR), "--patients-csv", str(tmp_path / "patients.csv.gz"),
                          "--vocabulary", "--no-check-files", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["class_names"] == FOUR and data["vocabulary"] == "hmn-cxr-1" and data["labeler"] == "negbio"
    d1a = next(e for e in data["training"] if e["image"].endswith("d1a.jpg"))
    assert (d1a["label"], d1a["label_mask"], d1a["age"], d1a["sex"], d1a["view"]) == ([1, 1, 0, 0], [1] * 4, 52, "F", "PA")
    assert sorted(os.path.basename(e["image"]) for e in data["validation"]) == ["d3a.jpg", "d3b.jpg"]
    assert "images" in capsys.readouterr().out
    assert datalist_main(["mimic-cxr", "--root", str(release), "--classes", "Effusion", "--no-check-files",
                          "--out", str(out)]) == 1
    assert "error: classes ['Effusion']" in capsys.readouterr().err
