"""Hostile and odd bundle downloads (issue 27): a zip that writes outside ``<name>/``, escapes with ``..`` or an
absolute path, carries links, devices or duplicate names, or expands absurdly is refused by
``hmn.bundle.download_bundle`` before anything is written; a damaged zip leaves no half-written bundle; and
``fetch_large_files`` refuses to write through a symbolic link that leads out of the bundle.

Every hostile file is built here, in tmp_path, and served over HTTP on loopback (one also by
``file://`` URL). Each test lists the whole tmp folder before and after and checks that nothing outside the target
changed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import logging
import os
import re
import stat
import struct
import threading
import types
import zipfile
from pathlib import Path

import pytest

from hmn.bundle import download_bundle, fetch_large_files, fetch_main

NAME = "convnext_tiny"
GOOD = {f"{NAME}/configs/metadata.json": b'{"version": "0.1.0"}\n', f"{NAME}/configs/inference.json": b"{}\n",
        f"{NAME}/LICENSE": b"Apache-2.0\n"}


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under `root` (links not followed): a file's md5, a link's target, or 'dir'."""
    out: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(folder, n)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _info(name: str, mode: int = 0o644 | stat.S_IFREG, compress: int = zipfile.ZIP_STORED) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = compress
    return info


def _zip(path: Path, extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> Path:
    """A minimal bundle zip (configs and LICENSE under NAME/) with `extra` entries after them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in GOOD.items():
            zf.writestr(n, data)
        for info, data in extra:
            zf.writestr(info, data)
    return path


@pytest.fixture
def scene(tmp_path):
    """tmp_path/dl (the download folder) with a neighbour bundle dl/victim/models/model.pt, and tmp_path/served
    served over HTTP on loopback: ``scene.url`` is its base URL, ``scene.path`` is tmp_path."""
    victim = tmp_path / "dl" / "victim" / "models" / "model.pt"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"the neighbour's weights")
    (tmp_path / "served").mkdir()
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield types.SimpleNamespace(path=tmp_path, url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_good_zip_is_extracted_with_nothing_left_beside_it(scene):
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip")
    got = Path(download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path)))
    assert got == scene.path / "dl" / NAME
    assert {str(p.relative_to(got)): p.read_bytes() for p in got.rglob("*") if p.is_file()} == {
        n[len(NAME) + 1:]: data for n, data in GOOD.items()}
    assert sorted(os.listdir(scene.path / "dl")) == [NAME, "victim"]  # no zip, no temporary folder
    # the same zip by file:// URL
    assert Path(download_bundle(zip_path.as_uri(), scene.path / "by_file", NAME, hash_val=_md5(zip_path))).is_dir()


def _victim_abs(tmp: Path) -> str:
    return str(tmp / "dl" / "victim" / "models" / "model.pt")


_LINK = 0o777 | stat.S_IFLNK
# (id, entries to add given tmp_path, the refused entry given tmp_path, what the error says)
HOSTILE = [
    ("outside", lambda t: [("victim/models/model.pt", b"evil")], lambda t: "victim/models/model.pt",
     f"outside the bundle folder {NAME}/"),
    ("dotdot", lambda t: [(f"{NAME}/../victim/models/model.pt", b"evil")], lambda t: f"{NAME}/../victim/models/model.pt",
     r"'\.\.' part"),
    ("absolute", lambda t: [(_victim_abs(t), b"evil")], _victim_abs, "absolute path"),
    ("backslash", lambda t: [(f"{NAME}\\..\\victim\\models\\model.pt", b"evil")],
     lambda t: f"{NAME}\\..\\victim\\models\\model.pt", "backslash"),
    # a link first, then a file written through it (what `unzip` would do)
    ("symlink", lambda t: [(_info(f"{NAME}/models", _LINK), str(t / "dl" / "victim" / "models").encode()),
                           (f"{NAME}/models/model.pt", b"evil")], lambda t: f"{NAME}/models", "is a symbolic link"),
    ("chardev", lambda t: [(_info(f"{NAME}/models/null", 0o666 | stat.S_IFCHR), b"")], lambda t: f"{NAME}/models/null",
     "is a character device"),
    ("fifo", lambda t: [(_info(f"{NAME}/models/pipe", 0o644 | stat.S_IFIFO), b"")], lambda t: f"{NAME}/models/pipe",
     r"is a FIFO"),
    ("duplicate", lambda t: [(f"{NAME}/models/model.pt", b"first"), (f"{NAME}/models/model.pt", b"second")],
     lambda t: f"{NAME}/models/model.pt", "appears twice"),
    ("case", lambda t: [(f"{NAME}/models/model.pt", b"first"), (f"{NAME}/models/Model.pt", b"second")],
     lambda t: f"{NAME}/models/Model.pt", "only by letter case"),
    ("file_and_folder", lambda t: [(f"{NAME}/models", b"a file"), (f"{NAME}/models/model.pt", b"weights")],
     lambda t: f"{NAME}/models", "is a file and also the folder"),
    # 64 MiB of zeros deflate to about 64 KiB: a ratio near 1000:1
    ("ratio_bomb", lambda t: [(_info(f"{NAME}/models/model.pt", compress=zipfile.ZIP_DEFLATED), bytes(64 << 20))],
     lambda t: f"{NAME}/models/model.pt", "decompression bomb"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_zip_is_refused_before_anything_is_written(scene, case):
    _, entries, entry, says = case
    with pytest.warns(UserWarning, match="Duplicate name") if case[0] == "duplicate" else contextlib.nullcontext():
        zip_path = _zip(scene.path / "served" / f"{NAME}.zip", entries(scene.path))
    before = _snapshot(scene.path)
    # the hash matches: a hash proves where the zip came from, not that its packer meant well
    with pytest.raises(ValueError) as caught:
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path))
    message = str(caught.value)
    assert repr(entry(scene.path)) in message and f"{scene.url}/{NAME}.zip" in message, message
    assert re.search(says, message), message
    assert _snapshot(scene.path) == before


def _patch_central_sizes(path: Path, size: int) -> None:
    """Sets the compressed and uncompressed sizes every central-directory record declares to `size`."""
    data = bytearray(path.read_bytes())
    start = data.index(b"PK\x01\x02")
    while start >= 0:
        data[start + 20:start + 28] = struct.pack("<II", size, size)
        start = data.find(b"PK\x01\x02", start + 4)
    path.write_bytes(bytes(data))


def test_declared_sizes_over_the_default_limit_are_refused_before_reading(scene):
    """Three small entries that declare 4 GiB each (stored, so no ratio gives them away): 12 GiB is over the
    default 8 GiB; refused from the declared sizes, without reading the data."""
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip")
    _patch_central_sizes(zip_path, 0xFFFFFFF0)
    with zipfile.ZipFile(zip_path) as zf:
        assert [i.file_size for i in zf.infolist()] == [0xFFFFFFF0] * 3
    before = _snapshot(scene.path)
    with pytest.raises(ValueError, match=rf"entry '{NAME}/(configs/inference.json|LICENSE)': brings the declared "
                       r"uncompressed size to \d+ bytes, over the limit of 8589934592 bytes"):
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path))
    assert _snapshot(scene.path) == before


def test_max_bytes_limits_the_total(scene):
    payload = [(f"{NAME}/models/part{i}.bin", os.urandom(1 << 20)) for i in range(3)]
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip", payload)
    before = _snapshot(scene.path)
    with pytest.raises(ValueError, match=rf"'{NAME}/models/part1.bin': brings the declared uncompressed size to "
                       rf"\d+ bytes, over the limit of {2 << 20} bytes \(max_bytes\)"):
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path), max_bytes=2 << 20)
    assert _snapshot(scene.path) == before
    assert Path(download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path), max_bytes=4 << 20,
                                large_files=False), "models", "part2.bin").read_bytes() == payload[2][1]


def test_a_damaged_zip_leaves_no_half_written_bundle(scene):
    """The last entry's stored bytes are altered after writing (its CRC-32 no longer matches): the files before it
    were already extracted when the damage shows; none of them may remain."""
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip", [(f"{NAME}/models/model.pt", b"W" * 4096)])
    data = bytearray(zip_path.read_bytes())
    at = data.index(b"W" * 4096)
    data[at + 100] = ord("X")
    zip_path.write_bytes(bytes(data))
    before = _snapshot(scene.path)
    with pytest.raises(ValueError, match=rf"entry '{NAME}/models/model.pt': cannot be extracted \(BadZipFile: Bad CRC-32"):
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path))
    assert _snapshot(scene.path) == before


def test_an_existing_bundle_folder_is_left_alone(scene):
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip")
    mine = scene.path / "dl" / NAME / "configs" / "metadata.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own edits")
    before = _snapshot(scene.path)
    with pytest.raises(FileExistsError, match=f"{scene.path / 'dl' / NAME} already exists"):
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", NAME, hash_val=_md5(zip_path))
    assert _snapshot(scene.path) == before


@pytest.mark.parametrize("name", ["../victim", "a/b", "", ".hidden"])
def test_a_name_that_is_not_one_folder_is_refused(scene, name):
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip")
    before = _snapshot(scene.path)
    with pytest.raises(ValueError, match="is not a plain folder name"):
        download_bundle(f"{scene.url}/{NAME}.zip", scene.path / "dl", name)
    assert _snapshot(scene.path) == before


@pytest.mark.filterwarnings("ignore:No hash value provided:UserWarning")  # MONAI's own, beside ours
def test_a_download_without_hash_warns_that_the_hash_is_the_trust_anchor(scene, caplog):
    zip_path = _zip(scene.path / "served" / f"{NAME}.zip")
    url = f"{scene.url}/{NAME}.zip"
    with caplog.at_level(logging.WARNING, logger="hmn.bundle.distribution"):
        download_bundle(url, scene.path / "with_hash", NAME, hash_val=_md5(zip_path))
    assert not [r for r in caplog.records if "trust anchor" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="hmn.bundle.distribution"):
        download_bundle(url, scene.path / "no_hash", NAME)
    (warned,) = [r for r in caplog.records if "trust anchor" in r.getMessage()]
    assert url in warned.getMessage() and "without hash_val" in warned.getMessage()


# --- fetch-large-files ----------------------------------------------------------------------------------------


def _linked_bundle(tmp: Path, payload: bytes = b"the real weights", url_payload: bytes | None = None) -> tuple[Path, Path]:
    """An unpacked bundle whose large_files.yml links models/model.pt (sha256 of `payload`) served by file:// URL
    with the bytes `url_payload` (default `payload`); returns (bundle, served file)."""
    bundle = tmp / "bundles" / NAME
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text("{}")
    served = tmp / "served" / "model.pt"
    served.parent.mkdir(parents=True, exist_ok=True)
    served.write_bytes(payload if url_payload is None else url_payload)
    sha = hashlib.sha256(payload).hexdigest()
    (bundle / "large_files.yml").write_text(
        f"large_files:\n- path: models/model.pt\n  url: {served.as_uri()}\n  hash_val: {sha}\n  hash_type: sha256\n")
    return bundle, served


def test_fetch_refuses_a_models_folder_linked_out_of_the_bundle(tmp_path, capsys):
    """The tester's case: ``models`` is a symbolic link (as unzip makes from a zip that holds one) to a folder
    outside; before, model.pt was downloaded there and the command said '1 file(s) present and checked'."""
    bundle, _ = _linked_bundle(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (bundle / "models").symlink_to(outside)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"models/model.pt: {bundle / 'models'} is a symbolic link to {outside} "
                       rf"\(resolving to {outside}\), outside the bundle folder {bundle}"):
        fetch_large_files(bundle)
    assert fetch_main([str(bundle)]) == 1
    out = capsys.readouterr()
    assert out.err.startswith(f"error: {bundle / 'large_files.yml'}: models/model.pt: {bundle / 'models'} is a symbolic link")
    assert "present and checked" not in out.out
    assert _snapshot(tmp_path) == before and not list(outside.iterdir())


def test_fetch_refuses_a_target_that_is_itself_a_link(tmp_path):
    """models/model.pt is a link to a file outside holding the right bytes: before, it was 'checked' and kept."""
    bundle, served = _linked_bundle(tmp_path)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").symlink_to(served)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"models/model.pt: {bundle / 'models' / 'model.pt'} is a symbolic link to "
                       rf"{served} \(resolving to {served}\); refused"):
        fetch_large_files(bundle)
    assert _snapshot(tmp_path) == before


def test_fetch_follows_a_link_that_stays_inside_the_bundle(tmp_path):
    bundle, _ = _linked_bundle(tmp_path)
    (bundle / "weights").mkdir()
    (bundle / "models").symlink_to("weights")
    assert fetch_large_files(bundle) == [str(bundle / "models" / "model.pt")]
    assert (bundle / "weights" / "model.pt").read_bytes() == b"the real weights"
    assert os.listdir(bundle / "weights") == ["model.pt"]


def test_fetch_leaves_no_partial_file_when_the_download_is_refused(tmp_path):
    """Served bytes that differ from the hash: no model.pt and no temporary file stays in the bundle; the right
    bytes then land in place, alone."""
    bundle, served = _linked_bundle(tmp_path, url_payload=b"tampered")
    (bundle / "models").mkdir()
    with pytest.raises(RuntimeError, match=r"models/model.pt from .*sha256 hash check of downloaded file failed"):
        fetch_large_files(bundle)
    assert os.listdir(bundle / "models") == []
    served.write_bytes(b"the real weights")
    assert fetch_large_files(bundle) == [str(bundle / "models" / "model.pt")]
    assert os.listdir(bundle / "models") == ["model.pt"]
