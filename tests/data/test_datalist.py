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
