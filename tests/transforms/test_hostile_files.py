"""Hostile and odd files (issue 27): every reader checks declared sizes before it allocates, and every failure of
a decoder on a file is an ImageReadError naming it. The files are made here, in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

import hmn.transforms.loading as loading
from hmn.transforms import ImageReadError, LoadXray, LoadXrayd, sniff_format

RSS_BOUND_MB = 200  # what reading one of these few-hundred-byte files may add to the peak resident set


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path, width: int, height: int) -> str:
    """A PNG of a few dozen bytes whose IHDR declares width x height 8-bit grey, with no image data."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IEND", b""))
    return str(path)


def _nifti_header(shape: tuple[int, ...], dtype) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\0" * 4


def _peak_growths(paths: list[str]) -> list[dict]:
    """Reads each of `paths` with LoadXray() in one fresh interpreter: for each, the growth of the peak resident
    set over its read (ru_maxrss before and after; each read must stay low for the next one to be measured) and
    the error, if any. A fresh interpreter: this one's peak already holds whatever earlier tests used."""
    import hmn

    code = textwrap.dedent(f"""
        import json, resource, sys
        from hmn.transforms import ImageReadError, LoadXray
        reader = LoadXray()
        for path in {paths!r}:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out = {{"error": None}}
            try:
                reader(path)
            except ImageReadError as e:
                out = {{"error": "ImageReadError", "path": e.path, "reason": e.reason}}
            except BaseException as e:
                out = {{"error": type(e).__name__, "reason": str(e)}}
            out["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            print(json.dumps(out), flush=True)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hmn.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "RUST_BACKTRACE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(paths):]]


# --------------------------------------------------------------------------------------------------
# PIL


def test_png_bomb_is_refused_naming_the_file(tmp_path):
    # the tester's file: a few dozen bytes declaring 60000 x 60000 stopped training with PIL's DecompressionBombError
    path = _png_header_only(tmp_path / "bomb.png", 60000, 60000)
    assert os.path.getsize(path) < 70
    with pytest.raises(ImageReadError, match="60000 rows x 60000 columns") as e:
        LoadXrayd(keys="image")({"image": path})
    assert e.value.path == path and "max_pixels=1,073,741,824" in e.value.reason


def test_png_declaring_more_than_its_deflate_data_can_hold(tmp_path):
    # under the pixel limit, but no 65-byte deflate stream (at most 1032:1) can hold 12000 x 12000 bytes
    path = _png_header_only(tmp_path / "tall.png", 12000, 12000)
    with pytest.raises(ImageReadError, match="truncated or its header is corrupt") as e:
        LoadXray()(path)
    assert e.value.path == path and f"only {os.path.getsize(path)} bytes" in e.value.reason


def test_pil_decompression_bomb_error_and_warning_are_image_read_errors(tmp_path, monkeypatch):
    jpg = str(tmp_path / "big.jpg")
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(jpg)  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses more than 2000
    with pytest.raises(ImageReadError, match="PIL.Image.MAX_IMAGE_PIXELS") as e:
        LoadXray(max_pixels=None)(jpg)
    assert e.value.path == jpg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL warns above 3000: an error where warnings are errors
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageReadError, match="DecompressionBombWarning") as e:
            LoadXray(max_pixels=None)(jpg)
    assert e.value.path == jpg


# --------------------------------------------------------------------------------------------------
# max_pixels on every reader


def _small_dicom(tmp_path, frames: int = 1) -> str:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.PixelSpacing = "OT", 12, 10, [0.5, 0.5]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shape = (frames, 12, 10) if frames > 1 else (12, 10)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = (np.arange(np.prod(shape)) % 4000).astype(np.uint16).reshape(shape).tobytes()
    path = str(tmp_path / f"small_{frames}.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("kind", ["png", "dicom", "nifti", "nifti_gz"])
def test_max_pixels_bounds_every_reader_at_the_declared_count(tmp_path, kind):
    if kind == "png":
        path, count = str(tmp_path / "g.png"), 20 * 16  # width x height x 1 band
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(path)
    elif kind == "dicom":
        path, count = _small_dicom(tmp_path), 12 * 10
    else:
        path, count = str(tmp_path / ("v.nii" if kind == "nifti" else "v.nii.gz")), 8 * 6 * 4
        nib.save(nib.Nifti1Image(np.ones((8, 6, 4), np.int16), np.eye(4)), path)
    assert LoadXray(max_pixels=count)(path).numel() == count
    assert LoadXrayd(keys="x", max_pixels=count)({"x": path})["x"].numel() == count
    for reader in (LoadXray(max_pixels=count - 1), LoadXrayd(keys="x", max_pixels=count - 1)):
        with pytest.raises(ImageReadError, match=f"= {count:,} pixel values, more than max_pixels={count - 1:,}") as e:
            reader(path) if isinstance(reader, LoadXray) else reader({"x": path})
        assert e.value.path == path


def test_max_pixels_counts_the_frames_decoded(tmp_path):
    path = _small_dicom(tmp_path, frames=3)
    one = LoadXray(frame=2, voi="ignore", max_pixels=12 * 10)(path)
    np.testing.assert_array_equal(one[0].numpy(), (np.arange(360) % 4000).reshape(3, 12, 10)[2])
    with pytest.raises(ImageReadError, match="3 frames x 12 rows x 10 columns x 1 samples = 360") as e:
        LoadXray(frame="all", max_pixels=12 * 10)(path)
    assert e.value.path == path


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1e9"])
def test_max_pixels_must_be_a_positive_int_or_none(bad):
    with pytest.raises(ValueError, match="max_pixels"):
        LoadXray(max_pixels=bad)
    assert LoadXray(max_pixels=None).max_pixels is None
    assert LoadXray().max_pixels == loading.DEFAULT_MAX_PIXELS == 2**30


def test_check_declared_size():
    check = loading.check_declared_size
    assert check("f", (3, 4), 2, max_pixels=12, file_size=24) == 12
    with pytest.raises(ImageReadError, match="more than max_pixels=11"):
        check("f", (3, 4), 2, max_pixels=11)
    with pytest.raises(ImageReadError, match="only 23 bytes"):
        check("f", (3, 4), 2, None, file_size=23)
    with pytest.raises(ImageReadError, match="only 31 bytes"):
        check("f", (3, 4), 2, None, file_size=31, offset=8)
    assert check("f", (1000, 1000), 1, None, file_size=16, expansion=64 * 1000) == 10**6  # 15.6 bytes needed
    with pytest.raises(ImageReadError, match="only 15 bytes"):
        check("f", (1000, 1000), 1, None, file_size=15, expansion=64 * 1000)
    assert check("f", (9, 8), 1 / 8, None, file_size=9) == 72  # 1-bit data: 72 bits are 9 bytes
    with pytest.raises(ImageReadError, match="negative"):
        check("f", (3, -4), 1)


# --------------------------------------------------------------------------------------------------
# NIfTI: declared size against the file, bounded reading of gzip streams


def _rle_dicom(tmp_path, name: str, **changes) -> str:
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_small_dicom(tmp_path))
    ds.compress(RLELossless)
    for key, value in changes.items():
        setattr(ds, key, value)
    path = str(tmp_path / name)
    ds.save_as(path)
    return path


def test_hostile_headers_cost_what_the_file_holds_not_what_it_declares(tmp_path):
    nii = tmp_path / "big.nii"  # 416 bytes declaring 1 GiB: nibabel allocated the 1 GiB before finding it short
    nii.write_bytes(_nifti_header((1024, 1024, 1024), np.uint8) + b"\0" * 64)
    gz = tmp_path / "big.nii.gz"  # 2 GiB of float32 declared (2**29 voxels, under the limit), nothing held
    gz.write_bytes(gzip.compress(_nifti_header((1024, 1024, 512), np.float32)))
    assert os.path.getsize(gz) < 100
    # 30000 x 30000 16-bit (under max_pixels): pydicom's RLE decoder took 1.7 GB before noticing the short data
    rle = _rle_dicom(tmp_path, "huge_rle.dcm", Rows=30000, Columns=30000)
    expected = {
        str(nii): ("1,073,741,824 bytes", "only 416 bytes"),
        str(gz): ("2,147,483,648 bytes", "truncated"),
        rle: ("30000 rows x 30000 columns", "64:1"),
    }
    for path, out in zip(expected, _peak_growths(list(expected))):
        assert out["growth_mb"] < RSS_BOUND_MB, (path, out)
        assert out["error"] == "ImageReadError" and out["path"] == path, out
        assert all(text in out["reason"] for text in expected[path]), out


def test_gzipped_nifti_over_the_limit_is_refused_from_its_header(tmp_path):
    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip.compress(_nifti_header((2048, 2048, 768), np.uint8)))  # 3 GiB
    with pytest.raises(ImageReadError, match="2048 x 2048 x 768 = 3,221,225,472 pixel values, more than max_pixels"):
        LoadXray()(str(path))


@pytest.mark.parametrize("name", ["scaled.nii", "scaled.nii.gz"])
@pytest.mark.parametrize("slab", [10, 200, 64 * 2**20])  # below one row, a few rows, all at once
def test_nifti_read_in_slabs_equals_nibabel(tmp_path, monkeypatch, name, slab):
    monkeypatch.setattr(loading, "_NIFTI_SLAB_BYTES", slab)
    data = (np.arange(7 * 5 * 4 * 3).reshape(7, 5, 4, 3) % 301 - 150).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(0.25, -12.0)
    path = str(tmp_path / name)
    nib.save(img, path)
    reference = np.asarray(nib.load(path).dataobj, dtype=np.float32)  # nibabel's own scaled read
    out = LoadXray()(path)
    np.testing.assert_array_equal(out.numpy(), np.moveaxis(reference, -1, 0))


def test_gzipped_nifti_cut_short_names_what_it_held(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_NIFTI_SLAB_BYTES", 7 * 5 * 2)  # one row of int16 per slab
    data = np.ones((7, 5, 4), np.int16)
    raw = _nifti_header((7, 5, 4), np.int16) + data.tobytes(order="F")
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(raw[: 352 + 2 * 70 + 10]))  # two rows and part of a third
    with pytest.raises(ImageReadError, match="ends or breaks after 140 of the 280 bytes its header declares") as e:
        LoadXray()(str(path))
    assert e.value.path == str(path)


# --------------------------------------------------------------------------------------------------
# DICOM


def test_native_dicom_declaring_more_than_its_pixel_data(tmp_path):
    ds = pydicom.dcmread(_small_dicom(tmp_path, frames=3))
    ds.NumberOfFrames = 40000
    path = str(tmp_path / "frames.dcm")
    ds.save_as(path)
    with pytest.raises(ImageReadError, match="40000 frames x 12 rows x 10 columns x 1 samples of 2 bytes each") as e:
        LoadXray(frame="all")(path)
    assert e.value.path == path and "only 720 bytes" in e.value.reason


def test_a_decoder_plugin_panic_is_an_image_read_error(tmp_path):
    # the first run of the first RLE segment made a 128-byte replicate run (PackBits header 0x81) in a segment that
    # decodes to 120 bytes: pylibjpeg-rle's Rust decoder panics (pyo3_runtime.PanicException, a BaseException
    # that pydicom does not catch)
    ds = pydicom.dcmread(_rle_dicom(tmp_path, "rle.dcm"))
    data = bytearray(ds.PixelData)
    # basic offset table item (12 bytes), fragment item header (8), RLE header: 2 segments (16-bit), the first at 64
    assert data[20:28] == struct.pack("<II", 2, 64)
    data[20 + 64] = 0x81
    ds.PixelData = bytes(data)
    path = str(tmp_path / "panic.dcm")
    ds.save_as(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageReadError, match="PanicException") as e:
            LoadXray()(path)
    assert e.value.path == path


@pytest.mark.parametrize("keyword, value", [("NumberOfFrames", "abc"), ("BitsAllocated", 12), ("NumberOfFrames", "-3")])
def test_dicom_size_attributes_that_make_no_sense(tmp_path, keyword, value):
    ds = pydicom.dcmread(_small_dicom(tmp_path))
    setattr(ds, keyword, "987" if value == "abc" else value)  # pydicom refuses to set an IS of "abc"
    path = tmp_path / "odd.dcm"
    ds.save_as(path)
    if value == "abc":
        path.write_bytes(path.read_bytes().replace(b"IS\x04\x00987 ", b"IS\x04\x00abc "))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageReadError, match=f"{keyword} '?{value}'? is") as e:
            LoadXray(frame=0)(str(path))
    assert e.value.path == str(path)


# --------------------------------------------------------------------------------------------------
# format detection


def test_corrupt_gzip_stream_is_an_image_read_error(tmp_path):
    raw = gzip.compress(_nifti_header((4, 4, 4), np.uint8) + bytes(64))
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(raw[:10] + b"\xff" * 8 + raw[18:])  # an invalid deflate block type: zlib.error
    with pytest.raises(ImageReadError, match="gzip stream is corrupt") as e:
        sniff_format(path)
    assert e.value.path == str(path)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    import threading

    fifo = str(tmp_path / "pipe.png")
    os.mkfifo(fifo)
    outcome = []

    def sniff():
        try:
            outcome.append(sniff_format(fifo))
        except ImageReadError as e:
            outcome.append(e)

    reader = threading.Thread(target=sniff, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # blocked in open(): a writer's open and close release it
        with open(fifo, "wb"):
            pass
        reader.join(timeout=10)
        pytest.fail("sniff_format blocked on a FIFO")
    assert isinstance(outcome[0], ImageReadError) and outcome[0].path == fifo
    assert "is not a regular file" in outcome[0].reason


def test_a_nan_window_in_the_header_is_refused_not_read_as_nan(tmp_path):
    """Integer pixels with WindowCenter 'nan' once came out as an all-NaN image, read without a word."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from hmn.transforms import ImageReadError, LoadXray

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = "DX", 8, 8, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 10).tobytes()
    ds.WindowCenter, ds.WindowWidth = "400", "800"
    path = tmp_path / "window.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert np.isfinite(LoadXray()(str(path)).numpy()).all()  # the same file with a number reads
    ds.WindowCenter = "nan"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"window\.dcm: 64 of 64 pixels are NaN or infinite after the header's"):
        LoadXray()(str(path))


@pytest.mark.parametrize("interlace", [0, 1])
def test_a_png_whose_data_ends_early_is_refused_not_zero_filled(tmp_path, interlace):
    """A complete zlib stream holding fewer rows than IHDR declares: Pillow fills the rest with zeros silently."""
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    from hmn.transforms import ImageReadError, LoadXray

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rng = np.random.default_rng(0)
    for w, h in ((64, 48), (13, 7)):  # odd sizes: Adam7 passes of unequal widths, some empty
        whole = tmp_path / f"whole{w}_{interlace}.png"
        Image.fromarray(rng.integers(1, 255, (h, w), dtype=np.uint8)).save(whole, interlace=interlace)
        LoadXray()(str(whole))  # the file as written reads (the check counts the Adam7 passes right)
        data = whole.read_bytes()
        start = data.index(b"IDAT") - 4
        length = struct.unpack(">I", data[start:start + 4])[0]
        raw = zlib.decompress(data[start + 8:start + 8 + length])
        short = tmp_path / f"short{w}_{interlace}.png"
        # the longest cut PIL reads without a word (it refuses a stream cut mid-row, not one cut between rows)
        for cut in range(len(raw) - 1, 0, -1):
            short.write_bytes(data[:start] + chunk(b"IDAT", zlib.compress(raw[:cut])) + chunk(b"IEND", b""))
            try:
                silently = np.asarray(Image.open(short))
                break
            except OSError:
                continue
        assert silently.shape == (h, w) and cut < len(raw)  # zero-filled where the data ended
        with pytest.raises(ImageReadError, match=rf"short{w}_{interlace}\.png: PNG image data ends after \d+ of the "
                                                 rf"{len(raw)} bytes its header declares"):
            LoadXray()(str(short))
