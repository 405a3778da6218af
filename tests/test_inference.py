"""Inference over a folder with a broken file: InferenceDataset placeholders, PredictionCSVWriter rows written as
the run goes, resuming an interrupted run, and inference_items sources."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose, Lambdad, Resized, ScaleIntensityd
from PIL import Image

from hmn.data import make_datalist, write_datalist
from hmn.handlers import PredictionCSVWriter
from hmn.inference import InferenceDataset, completed_images, inference_items
from hmn.transforms import LoadXrayd

CLASSES = ["Effusion", "Mass"]


def _folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (6, 10), dtype=np.uint8)).save(root / "sub" / "c.png")
    (root / "b.png").write_bytes(b"this is not an image\n")
    (root / "notes.txt").write_text("ignored")
    return root


def _preprocessing():
    return Compose([LoadXrayd(keys="image"), ScaleIntensityd(keys="image"), Resized(keys="image", spatial_size=(4, 4))])


def _network():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()


def _read(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _evaluate(items, writer, network, batch_size=2, probe=None):
    ds = InferenceDataset(items, _preprocessing(), placeholder_shape=(1, 4, 4))
    evaluator = SupervisedEvaluator(
        device="cpu", val_data_loader=DataLoader(ds, batch_size=batch_size, num_workers=0), network=network,
        val_handlers=[writer],
    )
    if probe is not None:
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, probe)  # runs after the writer's handler
    evaluator.run()


def test_folder_with_a_broken_file(tmp_path):
    root = _folder(tmp_path)
    items = inference_items(root)
    paths = [str(root / "a.png"), str(root / "b.png"), str(root / "sub" / "c.png")]
    assert items == [{"image": p} for p in paths]

    out = tmp_path / "out" / "predictions.csv"
    writer = PredictionCSVWriter(out, CLASSES)
    net = _network()
    rows_seen = []
    _evaluate(items, writer, net, probe=lambda engine: rows_seen.append(len(_read(out)[1])))
    assert rows_seen == [2, 3]  # on disk after each iteration, before the run completes

    header, rows = _read(out)
    assert header == ["image", "error", "Effusion", "Mass"]
    assert [r[0] for r in rows] == paths
    bad = rows[1]
    assert bad[0] == paths[1] and bad[2:] == ["", ""]
    assert bad[1].startswith(paths[1] + ": ") and "\n" not in bad[1]
    # independent: preprocess the good files directly and run the network on them
    pre = _preprocessing()
    with torch.no_grad():
        for row, path in ((rows[0], paths[0]), (rows[2], paths[2])):
            x = pre({"image": path})["image"].as_tensor()[None]
            expected = torch.sigmoid(net(x).double())[0].numpy()
            assert row[1] == ""
            assert 0.01 < expected.min() and expected.max() < 0.99  # logits in a range that tells them apart
            np.testing.assert_allclose([float(v) for v in row[2:]], expected, rtol=1e-6)
    assert writer.errors == 1 and writer.rows_written == 3


def test_resume_keeps_finished_rows_and_retries_errors(tmp_path):
    root = _folder(tmp_path)
    paths = [str(root / "a.png"), str(root / "b.png"), str(root / "sub" / "c.png")]
    out = tmp_path / "predictions.csv"
    # an interrupted run: a.png done, b.png failed, c.png cut off mid-row
    out.write_text(f"image,error,Effusion,Mass\n{paths[0]},,0.25,0.5\n{paths[1]},{paths[1]}: bad,,\n{paths[2]},,0.3")
    assert completed_images(out) == {paths[0]}

    items = inference_items(root, skip_done=out)
    assert items == [{"image": paths[1]}, {"image": paths[2]}]
    _evaluate(items, PredictionCSVWriter(out, CLASSES, resume=True), _network())
    _, rows = _read(out)
    assert [r[0] for r in rows] == [paths[0], paths[1], paths[2]]
    assert rows[0] == [paths[0], "", "0.25", "0.5"]  # kept as it was
    assert rows[1][1] != "" and rows[2][1] == "" and rows[2][2] != "0.3"

    # the writer alone (all items given again) does not duplicate rows it already has
    _evaluate(inference_items(root), PredictionCSVWriter(out, CLASSES, resume=True), _network())
    _, again = _read(out)
    assert [r[0] for r in again] == [paths[0], paths[2], paths[1]]  # the error row was dropped and retried

    # without resume the file is rewritten from scratch
    _evaluate([{"image": paths[0]}], PredictionCSVWriter(out, CLASSES), _network(), batch_size=1)
    _, fresh = _read(out)
    assert [r[0] for r in fresh] == [paths[0]] and fresh[0][2] != "0.25"

    with pytest.raises(ValueError, match="written for other classes"):
        PredictionCSVWriter(out, ["Effusion", "Nodule"], resume=True).start()


def test_dataset_only_catches_file_errors_unless_asked(tmp_path):
    root = _folder(tmp_path)

    def boom(x):
        raise ValueError("a bug in a transform")

    transform = Compose([LoadXrayd(keys="image"), Lambdad("image", boom)])
    ds = InferenceDataset([str(root / "a.png")], transform, placeholder_shape=(1, 4, 4))
    with pytest.raises(Exception) as e:
        ds[0]
    chain, exc = [], e.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__
    assert any(isinstance(x, ValueError) and str(x) == "a bug in a transform" for x in chain)
    item = InferenceDataset([str(root / "a.png")], transform, placeholder_shape=(1, 4, 4), catch_all=True)[0]
    assert item["error"] == f"{root / 'a.png'}: ValueError: a bug in a transform"
    assert item["image"].shape == (1, 4, 4) and not item["image"].any()
    assert item["image"].meta["filename_or_obj"] == str(root / "a.png")
    good = InferenceDataset([str(root / "a.png")], _preprocessing())[0]
    assert good["error"] == "" and set(good["image"].meta) == {"filename_or_obj"}


def test_inference_items_sources(tmp_path):
    root = _folder(tmp_path)
    (root / "IM0001").write_bytes(b"\0" * 200)  # extensionless, as DICOM files often are
    found = [i["image"] for i in inference_items(root)]
    assert found == sorted(str(root / n) for n in ("IM0001", "a.png", "b.png", "sub/c.png"))
    entries = {s: [{"image": str(root / f"{n}.png"), "label": [0, 1], "patient_id": n}]
               for s, n in (("training", "a"), ("test", "b"))}
    path = write_datalist(make_datalist(entries, CLASSES), tmp_path / "datalist.json")
    assert inference_items(path) == [{"image": str(root / "b.png")}]  # no labels or patient ids carried
    assert inference_items(path, split=None) == [{"image": str(root / "a.png")}, {"image": str(root / "b.png")}]
    assert inference_items([root / "b.png", str(root / "a.png")]) == [
        {"image": str(root / "a.png")}, {"image": str(root / "b.png")}]
    assert inference_items(root / "a.png") == [{"image": str(root / "a.png")}]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        inference_items(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files under"):
        inference_items(tmp_path / "empty")
