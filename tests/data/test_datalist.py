"""Patient-wise splits, datalist files, folder-per-class and existing-JSON datalists."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from hmn.data import (
    DatalistError,
    RowAccounting,
    folder_datalist,
    json_datalist,
    load_datalist,
    make_datalist,
    patient_overlap,
    patient_split,
    summarize,
    write_datalist,
)


def test_patient_split_keeps_patients_together_and_hits_fractions():
    rng = np.random.default_rng(3)
    pids = [f"p{int(i)}" for i in rng.integers(0, 400, size=2000)]
    splits = patient_split(pids, (0.6, 0.2, 0.2), seed=5)
    by_patient = {}
    for p, s in zip(pids, splits):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())
    for name, target in (("training", 0.6), ("validation", 0.2), ("test", 0.2)):
        assert abs(splits.count(name) / len(pids) - target) < 0.03
    # independent of input order, dependent on seed
    order = rng.permutation(len(pids))
    shuffled = patient_split([pids[i] for i in order], (0.6, 0.2, 0.2), seed=5)
    assert all(shuffled[k] == splits[i] for k, i in enumerate(order))
    assert patient_split(pids, (0.6, 0.2, 0.2), seed=6) != splits


def test_patient_split_hand_worked_edges():
    assert patient_split(["a", "a", "b"], (1.0, 0.0, 0.0)) == ["training"] * 3
    assert patient_split(["a", "b"], (0.0, 0.0, 1.0)) == ["test"] * 2
    with pytest.raises(DatalistError, match="summing to 1"):
        patient_split(["a"], (0.5, 0.2, 0.2))


def test_write_and_load_relative_paths(tmp_path):
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(img)
    d = make_datalist({"training": [{"image": str(img), "label": [1, 0], "patient_id": "7"}]}, ["A", "B"])
    path = write_datalist(d, tmp_path / "dl.json")
    raw = json.loads(open(path).read())
    assert raw["training"][0]["image"] == "imgs/a.png" and raw["class_names"] == ["A", "B"]
    assert raw["validation"] == [] and raw["test"] == []
    assert load_datalist(path, "training")[0]["image"] == str(img)
    # MONAI's own reader understands the file
    assert load_decathlon_datalist(path, is_segmentation=False, data_list_key="training")[0]["image"] == str(img)
    os.remove(img)
    with pytest.raises(DatalistError, match=r"1 image file\(s\) listed but missing: training\[0\]"):
        load_datalist(path)
    assert load_datalist(path, check_files=False)["training"][0]["label"] == [1, 0]


def test_load_rejects_wrong_label_length(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"class_names": ["A", "B"], "training": [{"image": "x.png", "label": [1]}]}))
    with pytest.raises(DatalistError, match=r"training\[0\].*1 labels but class_names has 2"):
        load_datalist(p, check_files=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatalistError, match="not valid JSON"):
        load_datalist(tmp_path / "bad.json")


def test_summarize_hand_worked():
    d = make_datalist(
        {
            "training": [
                {"image": "a", "label": [1, 0], "patient_id": "1"},
                {"image": "b", "label": [1, 1], "patient_id": "1"},
                {"image": "c", "label": [0, 0], "patient_id": "2"},
            ],
            "test": [{"image": "d", "label": [0, 1], "patient_id": "3"}],
        },
        ["Mass", "Nodule"],
    )
    lines = {line.split()[0]: line.split()[1:] for line in summarize(d).splitlines()[1:]}
    assert lines["images"] == ["3", "0", "1"]
    assert lines["patients"] == ["2", "0", "1"]
    assert lines["Mass"] == ["2", "0", "0"]
    assert lines["Nodule"] == ["1", "0", "1"]
    assert lines["(no"] == ["finding)", "1", "0", "0"]


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def test_folder_per_class(tmp_path):
    for cls, n in (("Effusion", 4), ("Cardiomegaly", 3), ("normal", 5)):
        for i in range(n):
            _png(tmp_path / cls / f"p{i % 3}_{cls}_{i}.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    d = folder_datalist(tmp_path, negative_class="normal", patient_regex=r"^(p\d+)_", fractions=(0.34, 0.33, 0.33))
    assert d["class_names"] == ["Cardiomegaly", "Effusion"]
    entries = [e for s in ("training", "validation", "test") for e in d[s]]
    assert len(entries) == 12
    for e in entries:
        cls = os.path.basename(os.path.dirname(e["image"]))
        assert e["label"] == {"Cardiomegaly": [1, 0], "Effusion": [0, 1], "normal": [0, 0]}[cls]
        assert e["patient_id"] == os.path.basename(e["image"]).split("_")[0]
    assert patient_overlap(d) == {}
    # 13 files read: 12 images and notes.txt, which is left out by name, not silently
    assert (d["rows"]["unit"], d["rows"]["read"], d["rows"]["kept"]) == ("files", 13, 12)
    assert [(x["filter"], x["count"], x["examples"]) for x in d["rows"]["dropped"]] == [
        ("extensions", 1, [str(tmp_path / "normal" / "notes.txt")])]


def test_folder_with_split_folders(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("A", "B"):
            _png(tmp_path / split / cls / f"{split}_{cls}.png")
    d = folder_datalist(tmp_path)
    assert [len(d[s]) for s in ("training", "validation", "test")] == [2, 2, 2]
    assert all("/val/" in e["image"] for e in d["validation"])
    with pytest.raises(DatalistError, match="negative_class 'C' is not a folder"):
        folder_datalist(tmp_path, negative_class="C")
    with pytest.raises(DatalistError, match="not a folder"):
        folder_datalist(tmp_path / "nope")


def test_folder_counts_every_file_it_leaves_out(tmp_path, caplog):
    """By hand: A holds a1.png, a2.gif (not an image extension), notes/readme.txt; B holds b1.png and a
    hidden .DS_Store (not read); the root holds list.csv (outside every class folder): 5 files read,
    2 kept, 2 left out by extension, 1 by layout."""
    _png(tmp_path / "A" / "a1.png")
    (tmp_path / "A" / "a2.gif").write_bytes(b"GIF89a")
    (tmp_path / "A" / "notes").mkdir()
    (tmp_path / "A" / "notes" / "readme.txt").write_text("x")
    _png(tmp_path / "B" / "b1.png")
    (tmp_path / "B" / ".DS_Store").write_bytes(b"")
    (tmp_path / "list.csv").write_text("x")
    with caplog.at_level("WARNING", logger="hmn.data.folder"):
        d = folder_datalist(tmp_path, fractions=(1.0, 0.0, 0.0))
    assert sorted(os.path.basename(e["image"]) for e in d["training"]) == ["a1.png", "b1.png"]
    rows = d["rows"]
    assert (rows["read"], rows["kept"]) == (5, 2)
    assert [(x["filter"], x["count"], [os.path.basename(p) for p in x["examples"]]) for x in rows["dropped"]] == [
        ("layout", 1, ["list.csv"]), ("extensions", 2, ["a2.gif", "readme.txt"])]
    assert "2 of 5 files left out by extensions: not an image file by its extension" in caplog.text


def test_folder_volumes_count_stray_files(tmp_path):
    """--volumes: a NIfTI file, a DICOM series folder of 3 slices (one entry) and a JSON sidecar in it, an
    Analyze pair (.hdr + .img, one entry): 3 studies and 1 other file read, the sidecar left out."""
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "p1.nii.gz").write_bytes(b"")
    (tmp_path / "A" / "p2.hdr").write_bytes(b"")
    (tmp_path / "A" / "p2.img").write_bytes(b"")
    series = tmp_path / "A" / "p3"
    series.mkdir()
    for i in range(3):
        (series / f"IM{i}.dcm").write_bytes(b"")
    (series / "p3.json").write_text("{}")
    d = folder_datalist(tmp_path, volumes=True, fractions=(1.0, 0.0, 0.0))
    assert sorted(os.path.basename(e["image"]) for e in d["training"]) == ["p1.nii.gz", "p2.hdr", "p3"]
    assert (d["rows"]["read"], d["rows"]["kept"]) == (4, 3)
    assert [(x["filter"], x["count"]) for x in d["rows"]["dropped"]] == [("volumes", 1)]


def test_split_folders_sharing_a_patient_are_warned_about_by_name(tmp_path, caplog):
    _png(tmp_path / "train" / "A" / "p1_a.png")
    _png(tmp_path / "train" / "A" / "p2_a.png")
    _png(tmp_path / "test" / "A" / "p1_b.png")
    _png(tmp_path / "test" / "A" / "p3_b.png")
    with caplog.at_level("WARNING", logger="hmn.data.folder"):
        d = folder_datalist(tmp_path, patient_regex=r"^(p\d)_")
    assert d["rows"]["patients_in_two_splits"] == {"training/test": {"count": 1, "patients": ["p1"]}}
    assert "1 patient(s) are in two splits (training/test: 1 patient(s), e.g. ['p1'])" in caplog.text


def test_row_accounting_adds_up_or_refuses():
    rows = RowAccounting("t.csv")
    rows.read(5)
    rows.drop("views", "View Position not in ['PA']", ["a", "b"])
    rows.drop("views", "View Position not in ['PA']", [])  # nothing left out: nothing counted
    d = make_datalist({"training": [{"image": x, "label": [0], "patient_id": x} for x in "cde"]}, ["X"])
    rows.finish(d)
    assert d["rows"] == {"unit": "rows", "read": 5, "kept": 3, "dropped": [
        {"filter": "views", "reason": "View Position not in ['PA']", "count": 2, "examples": ["a", "b"]}]}
    lost = RowAccounting("t.csv")
    lost.read(6)
    with pytest.raises(RuntimeError, match="6 rows read but 3 kept and 0 left out"):
        lost.finish(make_datalist({"training": d["training"]}, ["X"]))


def test_existing_monai_json(tmp_path):
    for i in range(6):
        _png(tmp_path / "img" / f"s{i}.png")
    src = {
        "labels": {"0": "normal", "1": "pneumonia"},
        "training": [{"image": f"img/s{i}.png", "label": i % 2, "patient_id": f"pt{i // 2}"} for i in range(6)],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(src))
    d = json_datalist(tmp_path / "dataset.json", fractions=(0.34, 0.33, 0.33))
    assert d["class_names"] == ["normal", "pneumonia"]
    entries = {os.path.basename(e["image"]): e for s in ("training", "validation", "test") for e in d[s]}
    assert entries["s3.png"]["label"] == [0, 1] and entries["s2.png"]["label"] == [1, 0]
    assert os.path.isabs(entries["s3.png"]["image"])
    assert patient_overlap(d) == {} and len({e["patient_id"] for e in entries.values()}) == 3
    assert (d["rows"]["read"], d["rows"]["kept"], d["rows"]["dropped"]) == (6, 6, [])
    src["validation"] = [{"image": "img/missing.png", "label": [0, 1]}]
    (tmp_path / "dataset.json").write_text(json.dumps(src))
    with pytest.raises(DatalistError, match=r"validation\[0\]: .*missing.png"):
        json_datalist(tmp_path / "dataset.json")
    src["validation"] = [{"image": "img/s0.png", "label": [0, 1, 1]}]
    (tmp_path / "dataset.json").write_text(json.dumps(src))
    with pytest.raises(DatalistError, match="3 labels, expected 2"):
        json_datalist(tmp_path / "dataset.json")


def test_metadata_is_kept_out_of_the_pipeline_and_read_for_the_report(tmp_path):
    import json

    from hmn.data import datalist_metadata, load_datalist

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    data = {"class_names": ["x"], "training": [], "validation": [],
            "test": [{"image": "a.png", "label": [1], "patient_id": "1", "age": 61, "sex": "F", "view": "PA"},
                     {"image": "b.png", "label": [0], "patient_id": "2", "site": "north"}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    entries = load_datalist(tmp_path / "d.json", "test")
    # entries where only some carry a key cannot be collated into a batch: metadata stays out
    assert [sorted(e) for e in entries] == [["image", "label", "patient_id"], ["image", "label", "patient_id", "site"]]
    full = load_datalist(tmp_path / "d.json", "test", metadata=True)
    assert full[0]["age"] == 61
    assert datalist_metadata(tmp_path / "d.json", "test") == {str(tmp_path / "a.png"): {"age": 61, "sex": "F", "view": "PA"}}
