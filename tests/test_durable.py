"""hmn.durable: atomic, durable writes; a full disk is a clear error and leaves the old file as it was."""

from __future__ import annotations

import errno
import os
import stat
from collections import namedtuple

import pytest
import torch

from hmn import durable
from hmn.durable import InsufficientDiskSpaceError, atomic_torch_save, atomic_write, estimated_size, partial_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_writes_the_file_with_an_ordinary_files_mode(tmp_path):
    target = tmp_path / "sub" / "history.csv"
    assert atomic_write(target, lambda f: f.write("epoch,val_auc\n1,0.5\n")) == str(target)
    assert target.read_text() == "epoch,val_auc\n1,0.5\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    assert os.listdir(tmp_path / "sub") == ["history.csv"]  # no temporary file left


def test_a_failing_writer_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old complete file")

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("stopped mid-write")

    with pytest.raises(RuntimeError, match="stopped mid-write"):
        atomic_write(target, broken, binary=True)
    assert target.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["model.pt"]


def test_a_leftover_temporary_file_is_replaced(tmp_path):
    target = tmp_path / "a.json"
    leftover = partial_path(target)
    with open(leftover, "w") as f:
        f.write("garbage from a writer that was killed")
    os.chmod(leftover, 0o600)
    atomic_write(target, lambda f: f.write("{}"))
    assert target.read_text() == "{}" and not os.path.exists(leftover)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_disk_full_while_writing_names_the_folder_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint_epoch=1.pt"
    target.write_bytes(b"epoch 1")

    def fills_the_disk(f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(InsufficientDiskSpaceError) as info:
        atomic_write(target, fills_the_disk, binary=True, expected_size=5 * 2**20)
    err = info.value
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    assert err.folder == str(tmp_path) and str(tmp_path) in str(err) and "5.0 MB" in str(err)
    assert target.read_bytes() == b"epoch 1" and os.listdir(tmp_path) == [target.name]


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    state = {"model": {"w": torch.zeros(1000, 1000)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000, 1000)}}}}
    needed = estimated_size(state)
    assert needed == 2 * 4_000_000 + 2**20  # two float32 1000x1000 storages and the structure's margin
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(durable.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 3 * 2**20, 3 * 2**20))
    calls = []
    monkeypatch.setattr(durable, "_write_partial", lambda *a: calls.append(a))
    target = tmp_path / "checkpoint_epoch=2.pt"
    with pytest.raises(InsufficientDiskSpaceError, match=r"about 8\.6 MB, 3\.0 MB free") as info:
        atomic_torch_save(state, target)
    assert info.value.needed == needed and info.value.free == 3 * 2**20
    assert calls == [] and not target.exists()


def test_estimated_size_bounds_what_torch_save_writes(tmp_path):
    shared = torch.randn(300, 200)
    state = {"a": shared, "b": shared[:10], "c": [torch.randn(50, dtype=torch.float64)], "n": 3, "s": "text"}
    path = atomic_torch_save(state, tmp_path / "x.pt")
    written = os.path.getsize(path)
    storages = 300 * 200 * 4 + 50 * 8  # `b` is a view of `a`'s storage, counted once
    assert storages <= written <= estimated_size(state) == storages + 2**20
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], shared) and loaded["n"] == 3
