"""Inference over a folder with a broken file: InferenceDataset placeholders, PredictionCSVWriter rows written as
the run goes, resuming an interrupted run, and inference_items sources."""

from __future__ import annotations

import csv
import os

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
from hmn.inference import (
    InferenceDataset,
    completed_images,
    inference_items,
    merge_csv_files,
    merge_rank_outputs,
    rank_file,
    rank_files,
    run_outputs,
    shard_items,
)
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


@pytest.mark.numerics
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
    # PNG files: the DICOM UID columns are there, empty
    assert header == ["image", "error", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Effusion", "Mass"]
    assert [r[0] for r in rows] == paths
    assert all(r[2:5] == ["", "", ""] for r in rows)
    bad = rows[1]
    assert bad[0] == paths[1] and bad[5:] == ["", ""]
    assert bad[1].startswith(paths[1] + ": ") and "\n" not in bad[1]
    # independent: preprocess the good files directly and run the network on them, in the evaluator's batches
    # (batch_size=2: a.png beside b.png's zero placeholder, then c.png alone). A float32 logit moves by an ulp or so
    # with the shape of the batch it is computed in (the CPU's matrix-product kernels block each shape
    # differently, per instruction set), so the same batch shapes make these the evaluator's logits exactly.
    pre = _preprocessing()
    xa, xc = (pre({"image": p})["image"].as_tensor()[None] for p in (paths[0], paths[2]))
    with torch.no_grad():
        logits = [net(torch.cat([xa, torch.zeros_like(xa)]))[0], net(xc)[0]]
    for row, logit in zip((rows[0], rows[2]), logits):
        expected = torch.sigmoid(logit.double()).numpy()
        assert row[1] == ""
        assert 0.01 < expected.min() and expected.max() < 0.99  # logits in a range that tells them apart
        np.testing.assert_allclose([float(v) for v in row[5:]], expected, rtol=1e-6)
    assert writer.errors == 1 and writer.rows_written == 3


def test_resume_keeps_finished_rows_and_retries_errors(tmp_path, caplog):
    root = _folder(tmp_path)
    paths = [str(root / "a.png"), str(root / "b.png"), str(root / "sub" / "c.png")]
    out = tmp_path / "predictions.csv"
    # an interrupted run: a.png done, b.png failed, c.png cut off mid-row
    out.write_text(f"image,error,StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,Effusion,Mass\n{paths[0]},,,,,0.25,0.5\n{paths[1]},{paths[1]}: bad,,,,,\n{paths[2]},,,,,0.3")
    assert completed_images(out) == {paths[0]}

    items = inference_items(root, skip_done=out)
    assert items == [{"image": paths[1]}, {"image": paths[2]}]
    _evaluate(items, PredictionCSVWriter(out, CLASSES, resume=True), _network())
    _, rows = _read(out)
    assert [r[0] for r in rows] == [paths[0], paths[1], paths[2]]
    assert rows[0] == [paths[0], "", "", "", "", "0.25", "0.5"]  # kept as it was
    assert rows[1][1] != "" and rows[2][1] == "" and rows[2][5] != "0.3"

    # the writer alone (all items given again) does not duplicate rows it already has
    _evaluate(inference_items(root), PredictionCSVWriter(out, CLASSES, resume=True), _network())
    _, again = _read(out)
    assert [r[0] for r in again] == [paths[0], paths[2], paths[1]]  # the error row was dropped and retried

    # without resume the file is rewritten from scratch, with a warning saying how many rows go
    with caplog.at_level("WARNING", logger="hmn.handlers"):
        _evaluate([{"image": paths[0]}], PredictionCSVWriter(out, CLASSES), _network(), batch_size=1)
    assert f"overwriting {out} and its 3 rows from an earlier run (--resume True would keep" in caplog.text
    _, fresh = _read(out)
    assert [r[0] for r in fresh] == [paths[0]] and fresh[0][5] != "0.25"

    with pytest.raises(ValueError, match="written for other classes"):
        PredictionCSVWriter(out, ["Effusion", "Nodule"], resume=True).start()
    # a file of a version before the DICOM UID columns is refused on resume, not appended to with other columns
    out.write_text(f"image,error,Effusion,Mass\n{paths[0]},,0.25,0.5\n")
    with pytest.raises(ValueError, match="without the DICOM UID columns"):
        PredictionCSVWriter(out, CLASSES, resume=True).start()


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


# ------------------------------------------------------------------ torchrun: shares, per-rank files, the merge


def test_shard_items_split_every_list_into_disjoint_balanced_shares():
    for n in range(8):
        items = [{"image": f"/x/{i}.png"} for i in range(n)]
        for world in (1, 2, 3):
            shares = [shard_items(items, r, world) for r in range(world)]
            flat = [i["image"] for s in shares for i in s]
            assert sorted(flat) == sorted(i["image"] for i in items) and len(set(flat)) == n
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shard_items([1, 2, 3]) == [1, 2, 3]  # no process group: one process takes everything
    with pytest.raises(ValueError, match="rank must lie in"):
        shard_items([1, 2], 2, 2)


def test_rank_files_are_the_outputs_shares_in_rank_order(tmp_path):
    for name in ("pred.rank10.csv", "pred.rank1.csv", "pred.rank0.csv", "pred.rankx.csv", "other.rank0.csv",
                 "pred.csv", "pred.rank2.csv.tmp", "pred.rank3.json"):
        (tmp_path / name).write_text("image,error\n")
    assert rank_files(tmp_path / "pred.csv") == [str(tmp_path / f"pred.rank{r}.csv") for r in (0, 1, 10)]
    assert run_outputs(tmp_path / "pred.csv")[0] == str(tmp_path / "pred.csv")
    assert rank_files(tmp_path / "none.csv") == []
    # what each process writes: the file itself alone, its share under torchrun (which rank_files finds)
    assert rank_file(tmp_path / "pred.csv", 0, 1) == str(tmp_path / "pred.csv")
    assert rank_file(tmp_path / "pred.csv", 10, 12) == str(tmp_path / "pred.rank10.csv")
    assert rank_file(tmp_path / "pred.csv") == str(tmp_path / "pred.csv")  # no process group


def test_merge_csv_files_one_row_per_key_error_free_rows_win(tmp_path):
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "out.csv"
    a.write_text("image,error,Mass\n/z.png,,0.1\n/y.png,,0.2\n/x.png,/x.png: bad,\n")
    b.write_text("image,error,Mass\n/y.png,/y.png: bad,\n/x.png,,0.3\n/z.png,,0.4\n/w.png,,0.5")  # last row cut off
    assert merge_csv_files(out, [a, b, tmp_path / "missing.csv"]) == 3
    header, rows = _read(out)
    # sorted by path; the later file's z wins, its error row for y does not replace a's value, /w.png was cut off
    assert header == ["image", "error", "Mass"]
    assert rows == [["/x.png", "", "0.3"], ["/y.png", "", "0.2"], ["/z.png", "", "0.4"]]
    assert merge_csv_files(out, [out]) == 3 and _read(out)[1] == rows  # the output may be one of the parts
    (tmp_path / "c.csv").write_text("image,error,Nodule\n/v.png,,0.1\n")
    with pytest.raises(ValueError, match="c.csv has columns"):
        merge_csv_files(out, [a, tmp_path / "c.csv"])
    with pytest.raises(ValueError, match="no \\['finding'\\] column"):
        merge_csv_files(out, [a], key_columns=("image", "finding"))


def _sharded_inference_worker(rank, world, init_file, root, out, resume):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        items = shard_items(inference_items(root, skip_done=run_outputs(out) if resume else None))
        if items:
            _evaluate(items, PredictionCSVWriter(out, CLASSES, resume=resume), _network(), batch_size=1)
        merge_rank_outputs(out, keep_existing=resume)
    finally:
        torch.distributed.destroy_process_group()


def _two_processes(tmp_path, *args):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    init = tmp_path / f"init{len(list(tmp_path.glob('init*')))}"
    procs = [ctx.Process(target=_sharded_inference_worker, args=(r, 2, init, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]


def test_two_processes_write_the_single_process_csv_and_resume(tmp_path):
    root = _folder(tmp_path)
    for i in range(3):  # 6 files: shares of 3 images each
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / f"d{i}.png")
    single = tmp_path / "single.csv"
    _evaluate(inference_items(root), PredictionCSVWriter(single, CLASSES), _network(), batch_size=1)
    want = _read(single)

    out = tmp_path / "pred.csv"
    _two_processes(tmp_path, root, out, False)
    assert _read(out) == want  # one file, every image once, sorted by path, the same numbers
    assert rank_files(out) == []  # the shares are gone once merged

    # a stopped run: two images done (merged earlier), one rank's share written part-way, a row cut off
    rows = want[1]
    out.write_text("image,error,StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,Effusion,Mass\n" + "".join(",".join(r) + "\n" for r in rows[:2]))
    (tmp_path / "pred.rank1.csv").write_text("image,error,StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID,Effusion,Mass\n" + ",".join(rows[3]) + "\n" + rows[4][0] + ",,,,,0.")
    done = {r[0] for r in (rows[0], rows[1], rows[3]) if r[1] == ""}  # an error row (b.png) is tried again
    assert len(done) == 2 and {i["image"] for i in inference_items(root, skip_done=run_outputs(out))} == {
        r[0] for r in rows} - done
    _two_processes(tmp_path, root, out, True)
    assert _read(out) == want and rank_files(out) == []

    # nothing left to do: every rank has an empty share, and the file stays as it is
    _two_processes(tmp_path, root, out, True)
    assert _read(out) == want


def test_a_folder_of_volumes_lists_each_nifti_file_and_each_dicom_series_once(tmp_path):
    """3D bundles: a DICOM series is one study (its folder), not one item per slice; NIfTI files are one each."""
    from hmn.inference import inference_items

    (tmp_path / "a" / "series1").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "a" / "series1" / f"IM{i:04d}").write_bytes(b"")  # extensionless slices, as scanners write them
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ct.nii.gz").write_bytes(b"")
    (tmp_path / "b" / "mr.nii").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_bytes(b"")
    (tmp_path / "c").mkdir()
    for i in range(2):
        (tmp_path / "c" / f"{i}.dcm").write_bytes(b"")
    items = inference_items(tmp_path, volumes=True)
    assert [e["image"] for e in items] == [str(tmp_path / "a" / "series1"), str(tmp_path / "b" / "ct.nii.gz"),
                                           str(tmp_path / "b" / "mr.nii"), str(tmp_path / "c")]
    # the 2D search lists the slices one by one
    assert len(inference_items(tmp_path)) == 3 + 2 + 2
    (tmp_path / "c" / "x.nii").write_bytes(b"")
    with pytest.raises(ValueError, match="holds both volume files .* and DICOM slices"):
        inference_items(tmp_path, volumes=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="looked for NIfTI files and folders of DICOM files"):
        inference_items(tmp_path / "empty", volumes=True)


def test_file_names_that_are_not_utf8_get_rows_and_resume(tmp_path, caplog):
    """Linux file names are bytes; one that is not UTF-8 (here Latin-1 'café.png') once emptied the CSV with a
    UnicodeEncodeError. Its row names it with the undecodable byte as \\xNN, and a resumed run finds that row."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    latin1 = os.fsdecode(os.fsencode(root) + b"/caf\xe9.png")  # what os.listdir gives for those bytes
    for name in (str(root / "a.png"), latin1):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(name)
    broken = os.fsdecode(os.fsencode(root) + b"/bad\xff.png")
    with open(broken, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "predictions.csv"
    with caplog.at_level("WARNING", logger="hmn.handlers"):
        _evaluate(inference_items(root), PredictionCSVWriter(out, CLASSES), _network())
    with open(out, newline="", encoding="utf-8") as f:  # strict UTF-8: the file is valid
        rows = list(csv.reader(f))[1:]
    shown = {"a.png": str(root / "a.png"), "bad": str(root) + "/bad\\xff.png", "cafe": str(root) + "/caf\\xe9.png"}
    assert [r[0] for r in rows] == [shown["a.png"], shown["bad"], shown["cafe"]]
    assert rows[1][1].startswith(shown["bad"] + ": ") and rows[2][1] == "" and rows[2][5] != ""
    assert f"not UTF-8, written with its other bytes as \\xNN: {shown['cafe']}" in caplog.text
    # resume: the Latin-1 file's row is found (not predicted again, not repeated); the broken one is retried
    items = inference_items(root, skip_done=out)
    assert items == [{"image": broken}]
    _evaluate(items, PredictionCSVWriter(out, CLASSES, resume=True), _network())
    with open(out, newline="", encoding="utf-8") as f:
        again = list(csv.reader(f))[1:]
    assert sorted(r[0] for r in again) == sorted(shown.values()) and len(again) == 3
