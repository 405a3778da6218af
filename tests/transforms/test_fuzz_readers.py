"""Seeded fuzzing of LoadXray's readers: mutated headers of small DICOM, PNG and NIfTI files, made here.

Each mutated file must be read, or refused with an ImageReadError naming it. The files are read in one child
process, so that a crash of a decoder (segfault, abort) fails the test instead of ending pytest, and so that
its peak resident set can be measured: no mutated file of a few kB may make a reader grow it by
``RSS_BOUND_MB``. The child runs with an address-space limit a few GiB above its start, so that a runaway
allocation cannot take the machine down; a MemoryError that limit causes counts as a failure too.

Run it longer with ``python tests/transforms/test_fuzz_readers.py OUT_DIR SEED COUNT``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import struct
import subprocess
import sys
import zlib

SEED = 20240527
CASES_PER_BASE = 40  # x 10 base files: 400 mutated files, about 10 s on 2 cores
RSS_BOUND_MB = 200
ADDRESS_MARGIN = 6 * 2**30  # the child's address-space limit above its start: 4 GiB float32 at max_pixels fit


# --------------------------------------------------------------------------------------------------
# base files


def _dicom_bytes(rows: int, cols: int, frames: int = 1, rgb: bool = False, rle: bool = False) -> bytes:
    import io

    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(rows * cols + frames)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [0.5, 0.5]
    if rgb:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        arr = rng.integers(0, 255, (rows, cols, 3), dtype=np.uint8)
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1.5", "-100"
        ds.WindowCenter, ds.WindowWidth = "1000", "2000"
        arr = rng.integers(0, 4095, (frames, rows, cols) if frames > 1 else (rows, cols), dtype=np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.tobytes()
    if rle:
        ds.compress(RLELossless, arr)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _png_bytes(mode: str, size: tuple[int, int]) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(size[0])
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "RGB":
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))
    else:
        img = Image.fromarray(rng.integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _nifti_bytes(shape: tuple[int, ...], dtype: str, slope: float = 1.0, inter: float = 0.0, gz: bool = False) -> bytes:
    import nibabel as nib
    import numpy as np

    data = (np.arange(int(np.prod(shape))).reshape(shape, order="F") % 251).astype(dtype)
    header = nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])).header
    header.set_slope_inter(slope, inter)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    return gzip.compress(raw, mtime=0) if gz else raw


def base_files() -> dict[str, bytes]:
    """Name -> content of the small valid files the mutations start from."""
    return {
        "mono.dcm": _dicom_bytes(24, 20),
        "multiframe.dcm": _dicom_bytes(12, 10, frames=3),
        "rgb.dcm": _dicom_bytes(10, 8, rgb=True),
        "rle.dcm": _dicom_bytes(16, 16, rle=True),
        "grey.png": _png_bytes("L", (20, 16)),
        "rgb.png": _png_bytes("RGB", (12, 10)),
        "grey16.png": _png_bytes("I;16", (10, 12)),
        "palette.png": _png_bytes("P", (16, 16)),
        "scaled.nii": _nifti_bytes((8, 6, 4), "int16", slope=2.0, inter=-5.0),
        "volume4d.nii.gz": _nifti_bytes((6, 5, 4, 2), "float32", gz=True),
    }


# --------------------------------------------------------------------------------------------------
# mutations


_SIZES = (0, 1, 3, 255, 256, 4097, 32767, 32768, 65535, 60000, 2**16 + 1, 2**24, 2**31 - 1, 2**32 - 1)


def _dicom_element(raw: bytes, group: int, elem: int) -> tuple[int, int, int] | None:
    """(start of the value, value length, length-field size) of a short-VR explicit VR LE element, or None."""
    at = raw.find(struct.pack("<HH", group, elem), 132)
    if at < 0:
        return None
    vr = raw[at + 4 : at + 6]
    if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OV"):
        return at + 12, struct.unpack_from("<I", raw, at + 8)[0], 4
    return at + 8, struct.unpack_from("<H", raw, at + 6)[0], 2


def _set_dicom_value(raw: bytes, group: int, elem: int, value: bytes) -> bytes:
    found = _dicom_element(raw, group, elem)
    if found is None:
        return raw
    start, length, field = found
    if len(value) % 2:
        value += b" "
    fmt = "<H" if field == 2 else "<I"
    return raw[: start - field] + struct.pack(fmt, len(value)) + value + raw[start + length :]


def _mutate_dicom_fields(raw: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice == 0:  # Rows / Columns / SamplesPerPixel / BitsAllocated / BitsStored (US)
        elem = rng.choice((0x0010, 0x0011, 0x0002, 0x0100, 0x0101, 0x0102, 0x0103))
        return _set_dicom_value(raw, 0x0028, elem, struct.pack("<H", rng.choice(_SIZES) & 0xFFFF))
    if choice == 1:  # NumberOfFrames (IS), added when absent
        value = rng.choice(("0", "-3", "2", "1000", "65535", "2147483647", "abc", "1e9", "", "3\\4"))
        if _dicom_element(raw, 0x0028, 0x0008) is None:
            at = raw.find(struct.pack("<HH", 0x0028, 0x0010), 132)  # (0028,0008) sorts before Rows
            if at < 0:
                return raw
            body = value.encode() + (b" " if len(value) % 2 else b"")
            element = struct.pack("<HH", 0x0028, 0x0008) + b"IS" + struct.pack("<H", len(body)) + body
            return raw[:at] + element + raw[at:]
        return _set_dicom_value(raw, 0x0028, 0x0008, value.encode())
    if choice == 2:  # the Pixel Data length field
        found = _dicom_element(raw, 0x7FE0, 0x0010)
        if found is None:
            return raw
        start, _, _ = found
        length = rng.choice((0, 2, 0xFFFFFFFF, 0xFFFFFFFE, 2**31, len(raw), rng.randrange(1, 4096)))
        return raw[: start - 4] + struct.pack("<I", length) + raw[start:]
    if choice == 3:  # PhotometricInterpretation
        value = rng.choice((b"MONOCHROME1", b"RGB", b"YBR_FULL_422", b"PALETTE COLOR", b"HSV", b""))
        return _set_dicom_value(raw, 0x0028, 0x0004, value)
    if choice == 4:  # rescale and window values
        elem = rng.choice(((0x0028, 0x1053), (0x0028, 0x1052), (0x0028, 0x1050), (0x0028, 0x1051)))
        return _set_dicom_value(raw, *elem, rng.choice((b"0", b"-1", b"1e308", b"x", b"nan", b"")))
    value = rng.choice((b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.4.50", b"1.2.3"))
    return _set_dicom_value(raw, 0x0002, 0x0010, value)  # TransferSyntaxUID


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _mutate_png_fields(raw: bytes, rng: random.Random) -> bytes:
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", raw[16:29])
    field = rng.randrange(4)
    if field == 0:
        width = rng.choice(_SIZES)
    elif field == 1:
        height = rng.choice(_SIZES)
    elif field == 2:
        width, height = rng.choice(((60000, 60000), (100000, 1), (1, 2**31 - 1), (20000, 20000), (4096, 4096)))
    else:
        depth, colour = rng.choice((1, 2, 4, 8, 16, 3)), rng.choice((0, 2, 3, 4, 6, 5))
        interlace = rng.choice((0, 1))
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, comp, filt, interlace))
    return raw[:8] + ihdr + raw[33:]


_NIFTI_FIELDS = {  # offset, struct format, hostile values (nifti1.h)
    "sizeof_hdr": (0, "<i", (0, 540, -348, 2**31 - 1)),
    "dim0": (40, "<h", (0, -1, 1, 2, 5, 7, 8, 32767)),
    "dim1": (42, "<h", (0, -1, 1, 32767, 30000)),
    "dim3": (46, "<h", (0, -8, 32767, 4096)),
    "dim4": (48, "<h", (0, -2, 1000, 32767)),
    "datatype": (70, "<h", (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 99)),
    "bitpix": (72, "<h", (0, 1, 7, 64, 4096)),
    "vox_offset": (108, "<f", (0.0, 1.0, 351.0, 353.0, 1e9, 3e38, -352.0, float("nan"))),
    "scl_slope": (112, "<f", (0.0, -1.0, 1e30, float("inf"), float("nan"))),
    "scl_inter": (116, "<f", (1e38, float("inf"), float("nan"))),
}


def _mutate_nifti_fields(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    for name in rng.sample(sorted(_NIFTI_FIELDS), rng.choice((1, 1, 2))):
        offset, fmt, values = _NIFTI_FIELDS[name]
        struct.pack_into(fmt, out, offset, rng.choice(values))
    if rng.random() < 0.3:  # some headers declaring large images, all of whose dims are consistent
        struct.pack_into("<8h", out, 40, 3, rng.choice((1024, 2048, 32767)), 1024, rng.choice((256, 1024)), 1, 1, 1, 1)
    return bytes(out)


def mutate(name: str, raw: bytes, rng: random.Random) -> bytes:
    """One seeded mutation of a base file: header byte flips, a truncation or a size field changed."""
    gz = name.endswith(".gz")
    if gz:
        raw = gzip.decompress(raw)
    op = rng.randrange(10)
    if op < 3:  # flip 1-4 bytes of the first kilobyte (the headers)
        out = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(out), 1024))
            out[at] ^= rng.randrange(1, 256)
        raw = bytes(out)
    elif op < 5:  # truncation
        raw = raw[: rng.randrange(1, len(raw))]
    elif name.endswith(".dcm"):
        raw = _mutate_dicom_fields(raw, rng)
    elif name.endswith(".png"):
        raw = _mutate_png_fields(raw, rng)
    else:
        raw = _mutate_nifti_fields(raw, rng)
    if gz:
        raw = gzip.compress(raw, mtime=0)
        if rng.random() < 0.2:  # a damaged or cut gzip stream
            at = rng.randrange(10, len(raw))
            raw = raw[:at] if rng.random() < 0.5 else raw[:at] + bytes([raw[at] ^ 0x55]) + raw[at + 1 :]
    return raw


# --------------------------------------------------------------------------------------------------
# the child process


def main(out_dir: str, seed: int, per_base: int) -> None:
    """Writes `per_base` mutations of each base file into `out_dir`, reads each and prints a JSON summary."""
    import resource
    import warnings

    warnings.simplefilter("ignore")  # pydicom and nibabel warn about most of these files
    from hmn.transforms import ImageReadError, LoadXray

    readers = [LoadXray(), LoadXray(frame=0, voi="full_range"), LoadXray(frame="all", color="rgb")]
    bases = base_files()
    for name, content in bases.items():  # warm up every code path on the intact files
        path = os.path.join(out_dir, "base_" + name)
        with open(path, "wb") as f:
            f.write(content)
        readers[1](path)
    start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = vm_kib * 1024 + ADDRESS_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rng = random.Random(seed)
    summary = {"read": 0, "refused": 0, "failures": []}
    for name, content in bases.items():
        for k in range(per_base):
            path = os.path.join(out_dir, f"{k:03d}_{name}")
            with open(path, "wb") as f:
                f.write(mutate(name, content, rng))
            reader = readers[k % len(readers)]
            print("reading", path, file=sys.stderr, flush=True)  # the last one named is the one that crashed
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            try:
                reader(path)
                summary["read"] += 1
            except ImageReadError as e:
                summary["refused"] += 1
                if e.path != path or path not in str(e):
                    summary["failures"].append(f"{path}: error does not name the file: {e}")
                elif "MemoryError" in e.reason:
                    summary["failures"].append(f"{path}: ran out of the {ADDRESS_MARGIN >> 30} GiB allowed: {e}")
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - any other type (a Rust panic too) is what this test looks for
                summary["failures"].append(f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            if grew > 10 * 1024:  # named in the summary, to find the file behind a growth
                summary.setdefault("peak_steps_mb", {})[f"{k:03d}_{name}"] = grew / 1024
            os.remove(path)
    summary["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kib) / 1024
    print(json.dumps(summary))


def run_child(out_dir: str, seed: int, per_base: int, timeout: float = 120) -> subprocess.CompletedProcess:
    import hmn

    # the child imports the hmn this process imported (a checkout's, not another installed copy)
    root = os.path.dirname(os.path.dirname(os.path.abspath(hmn.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, os.path.abspath(__file__), out_dir, str(seed), str(per_base)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "RUST_BACKTRACE": "0", "PYTHONPATH": path},
    )


def test_mutated_headers_are_read_or_refused_naming_the_file(tmp_path):
    proc = run_child(str(tmp_path), SEED, CASES_PER_BASE)
    last = [line for line in proc.stderr.splitlines() if line.startswith("reading ")][-1:]
    assert proc.returncode == 0, f"child died (exit {proc.returncode}) while {last}:\n{proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failures"] == []
    total = len(base_files()) * CASES_PER_BASE
    assert summary["read"] + summary["refused"] == total
    # the mutations reach both outcomes: neither all refused (too broken to test a decoder) nor all read
    assert summary["refused"] > 0.3 * total and summary["read"] > 0.05 * total, summary
    assert summary["rss_growth_mb"] < RSS_BOUND_MB, summary


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
