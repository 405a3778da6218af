"""SkipBadFilesDataset: bad files are skipped, logged once, and counted, across epochs and worker processes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, Lambdad, Resized
from PIL import Image

from hmn.data import SkipBadFilesDataset, SkippedFilesReport, find_read_error
from hmn.transforms import ImageReadError, LoadXrayd


def _data(tmp_path):
    items = []
    for i in range(6):
        p = tmp_path / f"ok{i}.png"
        Image.fromarray(np.full((8, 8), i * 10, np.uint8)).save(p)
        items.append({"image": str(p), "label": [i % 2]})
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(big)
    cut = tmp_path / "cut.png"
    cut.write_bytes(big.read_bytes()[:2000])
    items.insert(2, {"image": str(tmp_path / "missing.png"), "label": [0]})
    items.insert(5, {"image": str(cut), "label": [1]})
    return items


def _pipeline():
    return Compose([LoadXrayd(keys="image"), Resized(keys="image", spatial_size=(8, 8))])


def test_skips_logs_once_and_counts(tmp_path, caplog):
    items = _data(tmp_path)
    ds = SkipBadFilesDataset(Dataset(items, transform=_pipeline()))
    caplog.set_level(logging.WARNING, logger="hmn.data.dataset")
    seen = []
    for _ in range(3):  # epochs
        for batch in DataLoader(ds, batch_size=4, num_workers=0):
            seen.extend(batch["image"].meta["filename_or_obj"])
    assert len(seen) == 3 * len(items)
    assert not any("missing" in p or "cut" in p for p in seen)
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable file" in r.getMessage()]
    assert len(warnings) == 2
    assert any("missing.png: file not found" in w for w in warnings)
    assert any("cut.png" in w and "truncated" in w for w in warnings)
    assert ds.skipped_count == 2 and ds.skipped_indices() == [2, 5]
    assert ds.skipped_paths() == [items[2]["image"], items[5]["image"]]
    caplog.clear()
    assert SkippedFilesReport(ds)() == 2
    assert "2 of 8 files were skipped as unreadable" in caplog.text


def test_shared_across_worker_processes(tmp_path):
    items = _data(tmp_path)
    ds = SkipBadFilesDataset(Dataset(items, transform=_pipeline()))
    loader = DataLoader(ds, batch_size=2, num_workers=2)
    n = sum(len(b["label"][0]) for _ in range(2) for b in loader)
    assert n == 2 * len(items)
    assert ds.skipped_count == 2  # flags set in the workers are visible in the main process


def test_other_errors_propagate(tmp_path):
    items = _data(tmp_path)

    def boom(x):
        raise ValueError("a bug, not a bad file")

    ds = SkipBadFilesDataset(Dataset(items, transform=Compose([LoadXrayd(keys="image"), Lambdad("image", boom)])))
    with pytest.raises(Exception) as e:
        ds[0]
    assert find_read_error(e.value) is None
    assert ds.skipped_count == 0


def test_all_bad_gives_up_with_a_clear_error(tmp_path):
    ds = SkipBadFilesDataset(Dataset([{"image": str(tmp_path / f"n{i}.png")} for i in range(3)],
                                     transform=LoadXrayd(keys="image")), max_skips=5)
    with pytest.raises(RuntimeError, match="consecutive items .* unreadable"):
        ds[0]
    assert ds.skipped_count == 3


def test_handler_attaches_to_ignite(tmp_path, caplog):
    from ignite.engine import Engine

    ds = SkipBadFilesDataset(Dataset(_data(tmp_path), transform=_pipeline()))
    engine = Engine(lambda e, b: None)
    SkippedFilesReport(ds).attach(engine)
    caplog.set_level(logging.WARNING, logger="hmn.data.dataset")
    engine.run(DataLoader(ds, batch_size=4), max_epochs=1)
    assert "2 of 8 files were skipped" in caplog.text


def test_find_read_error_walks_the_chain():
    inner = ImageReadError("/a.dcm", "truncated")
    try:
        try:
            raise inner
        except ImageReadError as e:
            raise RuntimeError("applying transform LoadXrayd") from e
    except RuntimeError as outer:
        assert find_read_error(outer) is inner
    assert find_read_error(RuntimeError("x")) is None


def test_leave_out_mode_counts_each_image_once_and_names_the_bad_ones(tmp_path, caplog):
    """Validation and test: an unreadable file becomes a placeholder marked with its error (every label unknown),
    never the next image again; each readable image appears exactly once, in order."""
    from hmn.workflows import label_tensor

    items = _data(tmp_path)
    pipeline = Compose([LoadXrayd(keys="image"), Resized(keys="image", spatial_size=(8, 8)), label_tensor])
    ds = SkipBadFilesDataset(Dataset(items, transform=pipeline), mode="leave_out", item_shape=(1, 8, 8))
    caplog.set_level(logging.WARNING, logger="hmn.data.dataset")
    paths, errors, labels = [], [], []
    for batch in DataLoader(ds, batch_size=3, num_workers=0):
        paths.extend(batch["image"].meta["filename_or_obj"])
        errors.extend(batch["error"])
        labels.extend(batch["label"][:, 0].tolist())
    assert paths == [e["image"] for e in items]  # every item once, in order, none twice
    bad = [i for i, e in enumerate(errors) if e]
    assert bad == [2, 5] and "missing.png" in errors[2] and "cut.png" in errors[5]
    assert labels[2] == labels[5] == -1.0 and [labels[i] for i in (0, 1, 3)] == [0.0, 1.0, 0.0]
    assert ds.skipped_count == 2
    assert sum("left out of the metrics, not replaced" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ValueError, match="item_shape"):
        SkipBadFilesDataset(Dataset(items), mode="leave_out")
    with pytest.raises(ValueError, match="accepted: replace, leave_out"):
        SkipBadFilesDataset(Dataset(items), mode="skip")
