"""`python -m hmn datalist ...` and `python -m hmn demo-data ...`: files written, counts printed, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from hmn.__main__ import main


def test_nih_command(nih_csv, tmp_path, capsys):
    out = tmp_path / "nih.json"
    assert main(["datalist", "nih", "--csv", nih_csv, "--no-check-files", "--out", str(out), "--seed", "2"]) == 0
    data = json.loads(out.read_text())
    assert sum(len(data[s]) for s in ("training", "validation", "test")) == 112120
    printed = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.startswith(("Hernia", "images"))}
    assert table["images"] == [str(len(data[s])) for s in ("training", "validation", "test")]
    hernia = [sum(e["label"][13] for e in data[s]) for s in ("training", "validation", "test")]
    assert table["Hernia"] == [str(h) for h in hernia] and sum(hernia) == 227


def test_datalist_command_prints_rows_left_out_per_filter_and_reason(nih_csv, chexpert_csv, tmp_path, capsys):
    """NIH's published view counts (67,310 PA, 44,810 AP) and the CheXpert excerpt's (316 frontal, 84 lateral
    rows, hand-counted from the excerpt): the numbers printed add up to the rows read."""
    out = tmp_path / "nih.json"
    assert main(["datalist", "nih", "--csv", nih_csv, "--views", "PA", "--no-check-files", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "112120 rows read, 67310 kept, 44810 left out" in printed
    import pandas as pd

    table = pd.read_csv(nih_csv)
    first_ap = table.loc[table["View Position"] != "PA", "Image Index"].head(5).tolist()
    assert f"left out by views: 44810 (View Position not in ['PA']), e.g. {', '.join(first_ap)}" in printed
    assert json.loads(out.read_text())["rows"]["kept"] == 67310
    assert main(["datalist", "chexpert", "--train-csv", chexpert_csv, "--frontal-only", "--no-check-files",
                 "--out", str(tmp_path / "cx.json")]) == 0
    printed = capsys.readouterr().out
    assert "400 rows read, 316 kept, 84 left out" in printed
    assert "left out by frontal_only: 84 (Frontal/Lateral is Lateral)" in printed


def test_chexpert_command_with_ignore_policy(chexpert_csv, tmp_path, capsys):
    out = tmp_path / "cx.json"
    code = main(["datalist", "chexpert", "--train-csv", chexpert_csv, "--uncertain", "ignore",
                 "--classes", "Edema,Atelectasis", "--no-check-files", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["class_names"] == ["Edema", "Atelectasis"]
    assert all("label_mask" in e for e in data["training"])
    assert "(with ignored)" in capsys.readouterr().out


def test_folder_and_json_commands(tmp_path, capsys):
    for cls in ("A", "B"):
        for i in range(3):
            p = tmp_path / "root" / cls / f"{cls}{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(p)
    out = tmp_path / "f.json"
    assert main(["datalist", "folder", "--root", str(tmp_path / "root"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["class_names"] == ["A", "B"]
    again = tmp_path / "j.json"
    assert main(["datalist", "json", "--input", str(out), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["class_names"] == ["A", "B"]


def test_bad_csv_is_an_error_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["datalist", "nih", "--csv", str(bad), "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.csv" in err and "Traceback" not in err


def test_demo_data_command(tmp_path, capsys):
    root = tmp_path / "demo"
    assert main(["demo-data", "--root", str(root), "--n-images", "10", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert f"datalist: {root / 'datalist.json'}" in printed and "Cardiomegaly" in printed
    assert len(json.loads((root / "datalist.json").read_text())["class_names"]) == 5


def test_module_entry_point_lists_commands():
    res = subprocess.run([sys.executable, "-m", "hmn"], capture_output=True, text=True, timeout=120)
    assert "datalist" in res.stdout and "demo-data" in res.stdout


def test_datalist_command_warns_about_splits_without_positives(tmp_path, capsys):
    def entries(labels, split):
        out = []
        for i, lab in enumerate(labels):
            path = tmp_path / f"{split}{i}.png"
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
            out.append({"image": str(path), "label": lab, "patient_id": f"{split}{i}"})
        return out

    data = {"class_names": ["Effusion", "Hernia"],
            "training": entries([[1, 1], [0, 0], [1, 0]], "t"),
            "validation": entries([[1, 0], [0, 0]], "v"),
            "test": entries([[0, 1], [1, 0]], "s")}
    data["test"][0]["label_mask"] = [1, 0]  # the only Hernia positive of the test split is masked
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    assert main(["datalist", "json", "--input", str(src), "--out", str(tmp_path / "out.json")]) == 0
    err = capsys.readouterr().err
    assert "the validation split has no positive label for 1 class(es): Hernia" in err
    assert "the test split has no positive label for 1 class(es): Hernia" in err and "training split" not in err


def test_relative_images_and_out_resolve_from_anywhere(nih_csv, tmp_path, monkeypatch):
    """`python -m hmn datalist nih --csv nih/Data_Entry_2017.csv --images nih --out nih/out.json`, run from
    the folder above: the JSON once held `nih/images_001/...`, which MONAI resolved to `nih/nih/...`."""
    import pandas as pd

    from hmn.data import load_datalist

    rows = pd.read_csv(nih_csv).head(30)
    (tmp_path / "nih" / "images_001" / "images").mkdir(parents=True)
    rows.to_csv(tmp_path / "nih" / "Data_Entry_2017.csv", index=False)
    for name in rows["Image Index"]:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "nih" / "images_001" / "images" / name)
    monkeypatch.chdir(tmp_path)
    for out in ("nih/out.json", "lists/out.json"):  # under the images' folder, and beside it
        assert main(["datalist", "nih", "--csv", "nih/Data_Entry_2017.csv", "--images", "nih", "--out", out]) == 0
        monkeypatch.chdir("/")
        data = load_datalist(str(tmp_path / out))
        images = [e["image"] for s in ("training", "validation", "test") for e in data[s]]
        assert len(images) == 30
        assert sorted(images) == sorted(str(tmp_path / "nih" / "images_001" / "images" / n) for n in rows["Image Index"])
        monkeypatch.chdir(tmp_path)


def test_chexpert_distributed_layouts(chexpert_csv, tmp_path, monkeypatch):
    """The Stanford archive (CheXpert-v1.0-small/ with the CSVs inside) given as its parent, as itself or
    not at all, and the Kaggle copy (train.csv and train/ side by side, Path values still starting with
    CheXpert-v1.0-small/), every image found."""
    import pandas as pd

    from hmn.data import load_datalist

    rows = pd.read_csv(chexpert_csv).head(12)
    rels = rows["Path"].tolist()
    assert all(r.startswith("CheXpert-v1.0-small/train/") for r in rels)

    archive = tmp_path / "stanford"
    (archive / "CheXpert-v1.0-small").mkdir(parents=True)
    rows.to_csv(archive / "CheXpert-v1.0-small" / "train.csv", index=False)
    for rel in rels:
        (archive / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(archive / rel, format="JPEG")
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    rows.to_csv(kaggle / "train.csv", index=False)
    for rel in rels:
        (kaggle / rel.split("/", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(kaggle / rel.split("/", 1)[1], format="JPEG")

    cases = [(archive / "CheXpert-v1.0-small" / "train.csv", [archive], archive / rels[0]),
             (archive / "CheXpert-v1.0-small" / "train.csv", [archive / "CheXpert-v1.0-small"], archive / rels[0]),
             (archive / "CheXpert-v1.0-small" / "train.csv", [], archive / rels[0]),
             (kaggle / "train.csv", [kaggle], kaggle / rels[0].split("/", 1)[1]),
             (kaggle / "train.csv", [], kaggle / rels[0].split("/", 1)[1])]
    for i, (csv, images, first) in enumerate(cases):
        out = tmp_path / f"cx{i}.json"
        args = ["datalist", "chexpert", "--train-csv", str(csv), "--out", str(out)]
        assert main(args + (["--images", str(images[0])] if images else [])) == 0, (csv, images)
        data = load_datalist(str(out))
        found = sorted(e["image"] for s in ("training", "validation", "test") for e in data[s])
        assert len(found) == 12 and str(first) in found, (csv, images)


def test_folder_command_takes_volumes_each_dicom_series_as_one_study(tmp_path):
    """--volumes: NIfTI files and DICOM-series folders, one entry per study (the slices of a series are not
    entries of their own, as they are for radiographs)."""
    root = tmp_path / "root"
    for cls, studies in (("liver lesion", ["p1_a.nii.gz", "p2_b.nii.gz"]), ("normal", ["p3_c.nii.gz"])):
        (root / cls).mkdir(parents=True)
        for s in studies:
            (root / cls / s).write_bytes(b"")
    series = root / "liver lesion" / "p4_series"
    series.mkdir()
    for i in range(5):
        (series / f"IM{i:04d}.dcm").write_bytes(b"")
    out = tmp_path / "ct.json"
    assert main(["datalist", "folder", "--root", str(root), "--volumes", "--negative-class", "normal",
                 "--patient-regex", "^(p\\d)_", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    entries = {os.path.basename(e["image"]): e for s in ("training", "validation", "test") for e in data[s]}
    assert sorted(entries) == ["p1_a.nii.gz", "p2_b.nii.gz", "p3_c.nii.gz", "p4_series"]
    assert entries["p4_series"]["label"] == [1] and entries["p3_c.nii.gz"]["label"] == [0]
    assert entries["p4_series"]["patient_id"] == "p4"
