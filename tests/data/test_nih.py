"""NIH ChestX-ray14 datalists on the real 112,120-row label table."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pandas as pd
import pytest

from hmn.data import NIH_CLASSES, DatalistError, nih_datalist, patient_overlap

# Image counts per finding published with the data set (NIH Clinical Center README / Wang et al. 2017).
PUBLISHED = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Effusion": 13317, "Infiltration": 19894, "Mass": 5782,
    "Nodule": 6331, "Pneumonia": 1431, "Pneumothorax": 5302, "Consolidation": 4667, "Edema": 2303,
    "Emphysema": 2516, "Fibrosis": 1686, "Pleural_Thickening": 3385, "Hernia": 227,
}


@pytest.fixture(scope="module")
def nih(nih_csv):
    return nih_datalist(nih_csv, image_root="/data/nih", split="patient", seed=0, check_files=False)


def _all(d):
    return [e for s in ("training", "validation", "test") for e in d[s]]


def test_labels_match_published_counts(nih):
    entries = _all(nih)
    assert len(entries) == 112120
    labels = np.array([e["label"] for e in entries])
    assert nih["class_names"] == list(NIH_CLASSES)
    assert dict(zip(NIH_CLASSES, labels.sum(0).tolist())) == PUBLISHED
    assert int((labels.sum(1) == 0).sum()) == 60361  # "No Finding"
    first = {e["image"]: e for e in entries}[os.path.join("/data/nih", "00000001_001.png")]
    assert [NIH_CLASSES[i] for i, v in enumerate(first["label"]) if v] == ["Cardiomegaly", "Emphysema"]
    assert first["patient_id"] == "1"


def test_patient_wise_split_has_no_leakage(nih):
    assert patient_overlap(nih) == {}
    patients = {e["patient_id"] for e in _all(nih)}
    assert len(patients) == 30805
    n = 112120
    for split, target in zip(("training", "validation", "test"), (0.7, 0.1, 0.2)):
        assert abs(len(nih[split]) / n - target) < 0.01


def test_split_is_seeded(nih_csv, nih):
    again = nih_datalist(nih_csv, image_root="/data/nih", seed=0, check_files=False)
    assert [e["image"] for e in again["test"]] == [e["image"] for e in nih["test"]]
    other = nih_datalist(nih_csv, image_root="/data/nih", seed=1, check_files=False)
    assert {e["image"] for e in other["test"]} != {e["image"] for e in nih["test"]}
    assert patient_overlap(other) == {}


def test_official_split_lists(nih_csv, tmp_path):
    df = pd.read_csv(nih_csv)
    test_names = df.loc[df["Patient ID"] % 5 == 0, "Image Index"].tolist()
    tv_names = df.loc[df["Patient ID"] % 5 != 0, "Image Index"].tolist()[:-10]  # 10 images in neither list
    (tmp_path / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(tv_names) + "\n")
    d = nih_datalist(nih_csv, image_root="/x", split="official", train_val_list=tmp_path / "train_val_list.txt",
                     test_list=tmp_path / "test_list.txt", val_fraction=0.1, check_files=False)
    assert {os.path.basename(e["image"]) for e in d["test"]} == set(test_names)
    assert len(d["training"]) + len(d["validation"]) == len(tv_names)
    assert abs(len(d["validation"]) / len(tv_names) - 0.1) < 0.01
    assert patient_overlap(d) == {}


def test_views_and_class_subset(nih_csv):
    d = nih_datalist(nih_csv, classes=["Hernia", "Mass"], views=["PA"], check_files=False)
    df = pd.read_csv(nih_csv)
    pa = df[df["View Position"] == "PA"]
    entries = _all(d)
    assert len(entries) == len(pa)
    assert sum(e["label"][0] for e in entries) == int(pa["Finding Labels"].str.contains("Hernia").sum())
    assert d["class_names"] == ["Hernia", "Mass"]


def test_images_found_in_subfolders_and_missing_reported(nih_csv, tmp_path):
    rows = pd.read_csv(nih_csv).head(6)
    csv = tmp_path / "Data_Entry_2017.csv"
    rows.to_csv(csv, index=False)
    for i, name in enumerate(rows["Image Index"]):
        folder = tmp_path / f"images_00{1 + i % 2}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"png")
    d = nih_datalist(csv, fractions=(0.5, 0.0, 0.5))
    for e in _all(d):
        assert os.path.isfile(e["image"]) and "images_00" in e["image"]
    os.remove(_all(d)[0]["image"])
    with pytest.raises(DatalistError, match=r"1 of 6 NIH image\(s\) are missing"):
        nih_datalist(csv)


def test_bad_tables(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("Image Index,Finding Labels\na.png,Mass\n")
    with pytest.raises(DatalistError, match=r"labels.csv: missing column\(s\) \['Patient ID'\]"):
        nih_datalist(bad, check_files=False)
    typo = tmp_path / "typo.csv"
    typo.write_text("Image Index,Finding Labels,Patient ID\na.png,Mass|Nodle,1\n")
    with pytest.raises(DatalistError, match="unknown finding label.*Nodle"):
        nih_datalist(typo, check_files=False)
    with pytest.raises(DatalistError, match="not found"):
        nih_datalist(tmp_path / "nope.csv")
    ok = tmp_path / "ok.csv"
    ok.write_text("Image Index,Finding Labels,Patient ID\na.png,Mass,1\n")
    with pytest.raises(DatalistError, match="train_val_list and test_list"):
        nih_datalist(ok, split="official", check_files=False)


def test_gz_and_plain_read_alike(nih_csv, tmp_path):
    plain = tmp_path / "Data_Entry_2017.csv"
    with gzip.open(nih_csv, "rt") as f:
        head = "".join(next(f) for _ in range(200))
    plain.write_text(head)
    d = nih_datalist(plain, check_files=False)
    assert sum(len(d[s]) for s in ("training", "validation", "test")) == 199


# Sex and view counts published with the data set (NIH Clinical Center README): 63,340 male, 48,780 female
# images; 67,310 PA and 44,810 AP.
def test_age_sex_view_reach_the_datalist(nih):
    entries = _all(nih)
    sexes = [e["sex"] for e in entries]
    assert (sexes.count("M"), sexes.count("F")) == (63340, 48780)
    views = [e["view"] for e in entries]
    assert (views.count("PA"), views.count("AP")) == (67310, 44810)
    first = {e["image"]: e for e in entries}[os.path.join("/data/nih", "00000001_001.png")]
    assert (first["age"], first["sex"], first["view"]) == (58, "M", "PA")  # row 3 of the table
    # the table's 14 rows with Patient Age 0 have no age (normalize_age); every other age is whole, 1 to 95
    no_age = [os.path.basename(e["image"]) for e in entries if "age" not in e]
    assert len(no_age) == 14 and "00010230_000.png" in no_age and "00010230_001.png" not in no_age
    assert all(isinstance(e["age"], int) and 1 <= e["age"] <= 95 for e in entries if "age" in e)


def test_vocabulary_names_and_dicom_style_ages(tmp_path):
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
        "a.png,Effusion|Pleural_Thickening,0,1,057Y,F,AP\n"
        "b.png,No Finding,0,2,006M,M,PA\n"
        "c.png,Hernia,0,3,,M,\n"
    )
    d = nih_datalist(csv, check_files=False, vocabulary=True, fractions=(1.0, 0.0, 0.0))
    assert d["vocabulary"] == "hmn-cxr-1"
    assert d["class_names"][2] == "Pleural Effusion" and d["class_names"][12] == "Pleural Thickening"
    by = {os.path.basename(e["image"]): e for e in d["training"]}
    assert by["a.png"]["label"][2] == 1 and by["a.png"]["label"][12] == 1
    assert (by["a.png"]["age"], by["a.png"]["sex"], by["a.png"]["view"]) == (57, "F", "AP")
    assert by["b.png"]["age"] == 0.5
    assert "age" not in by["c.png"] and "view" not in by["c.png"] and by["c.png"]["sex"] == "M"


# A small table in the published Data_Entry_2017_v2020.csv layout (invented rows), for hand-counted checks.
SMALL = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
    "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n"
    "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143\n"
    "00000002_000.png,No Finding,0,2,0,F,AP,2500,2048,0.168,0.168\n"
    "00000003_000.png,Hernia,0,3,81,F,AP,2582,2991,0.143,0.143\n"
    "00000003_001.png,Hernia,1,3,81,F,PA,2500,2048,0.168,0.168\n"
    "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168\n"
    "00000005_000.png,No Finding,0,5,1,F,PA,2048,2500,0.168,0.168\n"
)


def _dropped(d):
    return [(x["filter"], x["count"], x["examples"]) for x in d["rows"]["dropped"]]


def test_views_filter_counts_every_row_it_leaves_out(tmp_path, caplog):
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    csv.write_text(SMALL)
    with caplog.at_level("WARNING", logger="hmn.data.nih"):
        d = nih_datalist(csv, views=["PA"], check_files=False, fractions=(1.0, 0.0, 0.0))
    # by hand: rows 3, 4 and 6 are AP
    assert sorted(os.path.basename(e["image"]) for e in _all(d)) == [
        "00000001_000.png", "00000001_001.png", "00000003_001.png", "00000005_000.png"]
    assert (d["rows"]["read"], d["rows"]["kept"]) == (7, 4)
    assert _dropped(d) == [("views", 3, ["00000002_000.png", "00000003_000.png", "00000004_000.png"])]
    assert "3 of 7 rows left out by views: View Position not in ['PA']" in caplog.text
    assert "00000002_000.png" in caplog.text


def test_official_split_counts_unlisted_rows_and_names_shared_patients(tmp_path, caplog):
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    csv.write_text(SMALL)
    # patient 3 has one image in each list; 00000002_000.png is in neither
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000003_000.png\n"
                                                 "00000005_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_001.png\n00000004_000.png\n00000099_000.png\n")
    with caplog.at_level("WARNING", logger="hmn.data.nih"):
        d = nih_datalist(csv, split="official", train_val_list=tmp_path / "train_val_list.txt",
                         test_list=tmp_path / "test_list.txt", val_fraction=0.0, check_files=False)
    assert sorted(os.path.basename(e["image"]) for e in d["test"]) == ["00000003_001.png", "00000004_000.png"]
    assert len(d["training"]) == 4 and d["validation"] == []
    assert (d["rows"]["read"], d["rows"]["kept"]) == (7, 6)
    assert _dropped(d) == [("split", 1, ["00000002_000.png"])]
    assert d["rows"]["patients_in_two_splits"] == {"training/test": {"count": 1, "patients": ["3"]}}
    assert patient_overlap(d) == {("training", "test"): {"3"}}
    assert "1 patient(s) are in two splits (training/test: 1 patient(s), e.g. ['3'])" in caplog.text
    assert "train_val_list.txt" in caplog.text and "in neither train_val_list.txt nor test_list.txt" in caplog.text
    assert "1 image(s) of the split lists have no row in" in caplog.text and "00000099_000.png" in caplog.text


def test_patient_age_zero_is_unknown(tmp_path):
    """The age rule (hmn.data.vocabulary.normalize_age): a Patient Age of 0 is unknown, 1 is an age."""
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    csv.write_text(SMALL)
    by = {os.path.basename(e["image"]): e for e in _all(nih_datalist(csv, check_files=False))}
    assert "age" not in by["00000002_000.png"] and by["00000002_000.png"]["sex"] == "F"
    assert by["00000005_000.png"]["age"] == 1 and by["00000003_000.png"]["age"] == 81
