"""CheXpert-style datalists with uncertainty policies, on an excerpt of the real CheXpert training table."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from hmn.data import CHEXPERT_CLASSES, DatalistError, chexpert_datalist, patient_overlap

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def _entries(d):
    return {e["image"]: e for s in ("training", "validation", "test") for e in d[s]}


@pytest.mark.parametrize("policy", ["ones", "zeros", "ignore"])
def test_uncertainty_policies(chexpert_csv, policy):
    d = chexpert_datalist(chexpert_csv, image_root="/cx", classes=FIVE, uncertain=policy, check_files=False)
    raw = pd.read_csv(chexpert_csv)
    values = raw[FIVE].to_numpy(dtype=float)
    assert (values == -1).any()  # the excerpt does have uncertain labels
    expected = {"ones": (values == 1) | (values == -1), "zeros": values == 1, "ignore": values == 1}[policy]
    got = _entries(d)
    for row, path in enumerate(raw["Path"]):
        e = got[os.path.join("/cx", path)]
        assert e["label"] == expected[row].astype(int).tolist()
        if policy == "ignore":
            assert e["label_mask"] == (values[row] != -1).astype(int).tolist()
        else:
            assert "label_mask" not in e
    assert d["class_names"] == FIVE


def test_per_class_policy_and_default_classes(chexpert_csv):
    d = chexpert_datalist(chexpert_csv, uncertain={"Atelectasis": "ones", "Edema": "ignore"}, check_files=False)
    assert d["class_names"] == [c for c in CHEXPERT_CLASSES if c != "No Finding"]
    raw = pd.read_csv(chexpert_csv)
    idx = d["class_names"].index("Edema")
    masked = sum(1 - e["label_mask"][idx] for e in _entries(d).values())
    assert masked == int((raw["Edema"] == -1).sum())
    at = d["class_names"].index("Atelectasis")
    assert sum(e["label"][at] for e in _entries(d).values()) == int(raw["Atelectasis"].isin([1, -1]).sum())


def test_patient_ids_and_split(chexpert_csv):
    d = chexpert_datalist(chexpert_csv, fractions=(0.6, 0.2, 0.2), check_files=False)
    assert patient_overlap(d) == {}
    e = next(iter(_entries(d).values()))
    assert e["patient_id"].startswith("patient") and e["patient_id"] in e["image"]
    assert len({x["patient_id"] for x in _entries(d).values()}) == 114


def test_official_split_and_frontal_only(chexpert_csv, tmp_path):
    raw = pd.read_csv(chexpert_csv)
    valid = tmp_path / "valid.csv"
    raw.head(30).to_csv(valid, index=False)
    d = chexpert_datalist(chexpert_csv, valid_csv=valid, image_root="/cx", check_files=False, frontal_only=True)
    n_frontal = int((raw["Frontal/Lateral"] == "Frontal").sum())
    assert len(d["training"]) == n_frontal
    assert len(d["validation"]) == int((raw.head(30)["Frontal/Lateral"] == "Frontal").sum())
    assert d["test"] == []
    # 430 rows read (400 + the 30 of valid.csv); the excerpt's Lateral rows all have a blank AP/PA
    n_lateral = int((raw["Frontal/Lateral"] == "Lateral").sum()) + int((raw.head(30)["Frontal/Lateral"] == "Lateral").sum())
    assert (d["rows"]["read"], d["rows"]["kept"]) == (430, 430 - n_lateral)
    assert [(x["filter"], x["reason"], x["count"]) for x in d["rows"]["dropped"]] == [
        ("frontal_only", "Frontal/Lateral is Lateral", n_lateral)]


def test_default_image_root_and_missing_files(chexpert_csv, tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    raw = pd.read_csv(chexpert_csv).head(3)
    raw.to_csv(folder / "train.csv", index=False)
    for p in raw["Path"]:
        os.makedirs(tmp_path / os.path.dirname(p), exist_ok=True)
        (tmp_path / p).write_bytes(b"jpg")
    d = chexpert_datalist(folder / "train.csv", fractions=(1.0, 0.0, 0.0))
    assert all(os.path.isfile(e["image"]) for e in d["training"])
    os.remove(tmp_path / raw["Path"][0])
    with pytest.raises(DatalistError, match=r"1 of 3 CheXpert image\(s\) are missing"):
        chexpert_datalist(folder / "train.csv")


def test_bad_csvs(tmp_path):
    no_path = tmp_path / "a.csv"
    no_path.write_text("Image,Edema\nx.jpg,1\n")
    with pytest.raises(DatalistError, match=r"missing column\(s\) \['Path'\]"):
        chexpert_datalist(no_path, check_files=False)
    odd = tmp_path / "b.csv"
    odd.write_text("Path,Edema\npatient1/study1/view1_frontal.jpg,2\n")
    with pytest.raises(DatalistError, match="value 2.0 in column 'Edema'"):
        chexpert_datalist(odd, check_files=False)
    with pytest.raises(DatalistError, match=r"missing observation column\(s\) \['Fracture'\]"):
        chexpert_datalist(odd, classes=["Edema", "Fracture"], check_files=False)
    with pytest.raises(DatalistError, match="unknown uncertainty policy"):
        chexpert_datalist(odd, uncertain="maybe", check_files=False)


def test_age_sex_view_from_the_table(chexpert_csv):
    d = chexpert_datalist(chexpert_csv, check_files=False, fractions=(1.0, 0.0, 0.0))
    df = pd.read_csv(chexpert_csv)
    entries = d["training"]
    by = {e["image"].split("CheXpert-v1.0-small/")[-1]: e for e in entries}
    for _, row in df.iterrows():
        e = by[row["Path"].split("CheXpert-v1.0-small/")[-1]]
        assert e["age"] == row["Age"]
        assert e.get("sex") == {"Male": "M", "Female": "F"}.get(row["Sex"])
        expected_view = "LATERAL" if row["Frontal/Lateral"] == "Lateral" else row["AP/PA"]
        assert e.get("view") == (expected_view if isinstance(expected_view, str) else None)


def test_vocabulary_keeps_pleural_other_apart(chexpert_csv):
    d = chexpert_datalist(chexpert_csv, check_files=False, vocabulary=True)
    assert d["vocabulary"] == "hmn-cxr-1"
    assert "Pleural Other" in d["class_names"] and "Pleural Thickening" not in d["class_names"]


# A table in CheXpert's published layout (Path, Sex, Age, Frontal/Lateral, AP/PA, the 14 observations), invented.
HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_CLASSES)
VIEWS = [  # (path, sex, age, Frontal/Lateral, AP/PA) -> expected view, kept by frontal_only
    ("patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP", "AP", True),
    ("patient00002/study1/view1_frontal.jpg", "Male", "0", "Frontal", "PA", "PA", True),
    ("patient00002/study1/view2_lateral.jpg", "Male", "0", "Lateral", "", "LATERAL", False),
    ("patient00003/study1/view1_frontal.jpg", "Female", "45", "Frontal", "LL", None, False),  # disagree
    ("patient00004/study1/view1_frontal.jpg", "Male", "77", "Frontal", "RL", None, False),  # disagree
    ("patient00004/study2/view1_frontal.jpg", "Male", "77", "Frontal", "", None, True),  # no projection given
    ("patient00005/study1/view2_lateral.jpg", "Unknown", "50", "Lateral", "AP", None, False),  # disagree
]


def _views_table(tmp_path):
    lines = [HEADER]
    for path, sex, age, fl, appa, *_ in VIEWS:
        lines.append(f"CheXpert-v1.0-small/train/{path},{sex},{age},{fl},{appa}," + ",".join(
            "1.0" if c == "Edema" else "" for c in CHEXPERT_CLASSES))
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def test_view_rule_frontal_lateral_and_ap_pa_disagree(tmp_path, caplog):
    """Frontal with AP/PA LL or RL (17 rows of the real training table), or Lateral with AP: the view is
    unknown, and frontal_only leaves the row out under its own counted reason, so that view and
    frontal_only never disagree."""
    csv = _views_table(tmp_path)
    every = {e["image"].split("train/")[-1]: e for e in _entries(
        chexpert_datalist(csv, image_root="/cx", check_files=False, fractions=(1.0, 0.0, 0.0))).values()}
    assert {p: every[p].get("view") for p, *_ in VIEWS} == {p: view for p, *_, view, _ in VIEWS}
    with caplog.at_level("WARNING", logger="hmn.data.chexpert"):
        d = chexpert_datalist(csv, image_root="/cx", check_files=False, frontal_only=True, fractions=(1.0, 0.0, 0.0))
    kept = {e["image"].split("train/")[-1]: e for e in _entries(d).values()}
    assert sorted(kept) == sorted(p for p, *_, frontal in VIEWS if frontal)
    assert all(e.get("view") in ("AP", "PA", None) for e in kept.values())  # nothing lateral is kept
    assert (d["rows"]["read"], d["rows"]["kept"]) == (7, 3)
    assert [(x["filter"], x["count"]) for x in d["rows"]["dropped"]] == [("frontal_only", 1), ("frontal_only", 3)]
    lateral, disagree = d["rows"]["dropped"]
    assert lateral["reason"] == "Frontal/Lateral is Lateral"
    assert disagree["reason"].startswith("Frontal/Lateral and AP/PA disagree")
    assert [p.split("train/")[-1] for p in disagree["examples"]] == [
        "patient00003/study1/view1_frontal.jpg", "patient00004/study1/view1_frontal.jpg",
        "patient00005/study1/view2_lateral.jpg"]
    assert "3 of 7 rows left out by frontal_only: Frontal/Lateral and AP/PA disagree" in caplog.text


def test_age_zero_is_unknown(tmp_path):
    d = chexpert_datalist(_views_table(tmp_path), check_files=False, fractions=(1.0, 0.0, 0.0))
    ages = {e["image"].split("train/")[-1]: e.get("age") for e in d["training"]}
    assert ages["patient00001/study1/view1_frontal.jpg"] == 68
    assert ages["patient00002/study1/view1_frontal.jpg"] is None  # Age 0: unknown (normalize_age)
    assert ages["patient00004/study2/view1_frontal.jpg"] == 77
