"""Image loading for radiographs, CT and MR: DICOM (pydicom), PNG/JPEG/TIFF (PIL) and NIfTI (nibabel).

:class:`LoadXray` reads one file (or a folder holding one DICOM series) into a channel-first ``float32``
:class:`monai.data.MetaTensor`; :class:`LoadXrayd` is its dictionary wrapper for MONAI pipelines and
bundle configs (``{"_target_": "hmn.transforms.LoadXrayd", "keys": ["image"]}``).

The reader is chosen by the file's content (its magic bytes), not by its extension.

Conventions of the output:

* 2D images (radiographs, PNG/JPEG, one DICOM frame) are ``(C, H, W)``: rows first, exactly as the
  pixels are stored, so a plotted tensor looks like the radiograph (no transposition, unlike MONAI's
  ``PILReader``). The affine is ``diag(row spacing, column spacing, 1, 1)`` in millimetres.
* 3D volumes (NIfTI, DICOM series folders) follow MONAI's convention ``(C, X, Y, Z)`` with the affine
  in RAS millimetres, the arrays and affines MONAI's ``NibabelReader`` and ``PydicomReader`` give (a
  series may come with its slice axis reversed and a negative slice step; the voxel-to-world mapping is
  the same), so that ``Orientationd`` and ``Spacingd`` act on them correctly. All frames of a
  multi-frame DICOM (``frame="all"``) are ``(C, columns, rows, frames)``: with a Plane Position per frame
  (Enhanced CT/MR, PS3.3 C.7.6.16.2.3) sorted along the slice normal and placed in patient space as a
  series is; without, in stored order with a diagonal affine (not in patient space) whose slice step is
  SpacingBetweenSlices. A DICOM volume must be one regular grid: slices (files, or frames) that
  repeat (SOPInstanceUID, InstanceNumber, position along the normal, identical non-uniform pixel data),
  leave a gap (irregular spacing along the normal; InstanceNumber gaps where there are no positions), or
  differ in orientation, size, PixelSpacing, Frame of Reference, modality, photometric interpretation or
  rescale type (or, in CT, rescale slope/intercept) raise :class:`ImageReadError` naming the files; so
  does a volume without PixelSpacing or a slice spacing, unless ``assume_spacing`` gives them (PS3.3
  C.7.6.2.1.1: SliceThickness is not a spacing). 2D DICOM without PixelSpacing or ImagerPixelSpacing
  keeps 1 mm pixels (``spacing_source="default"``), as projection radiographs often lack both.
* Multi-frame Enhanced DICOM: each frame's Rescale Slope/Intercept/Type, window, pixel spacing,
  orientation and position come from its Per-frame Functional Groups, else the Shared ones (PS3.3
  C.7.6.16), else the top level; frames with different rescales are each scaled by their own.
* DICOM grey levels: stored values -> Modality LUT (RescaleSlope/Intercept or Modality LUT Sequence)
  -> VOI (``voi="apply"``: VOI LUT Sequence or WindowCenter/WindowWidth with the file's VOI LUT
  Function; ``"ignore"``: modality values unchanged; ``"full_range"``: a linear window over the
  image's own minimum to maximum) -> MONOCHROME1 mirrored about the output range, so that air is dark
  in every output. The output range is the one the DICOM standard (and pydicom's
  ``apply_windowing``) defines: the stored bit range sent through the Modality LUT.
* Meta: ``filename_or_obj``, ``format``, ``spacing``, ``modality``, ``photometric_interpretation``
  (as stored in the file), ``bits_stored``, ``voi`` (what was applied), ``inverted``, ``frame``,
  ``spacing_source`` (the attribute that gave the spacing: ``"PixelSpacing"``, ``"ImagerPixelSpacing"``,
  ``"dpi"``, ``"header"``, ``"default"``; for a DICOM volume ``"<in-plane>/<slice>"``, e.g.
  ``"PixelSpacing/ImagePositionPatient"`` or ``"assume_spacing/SpacingBetweenSlices"``),
  ``spatial_shape``, ``original_channel_dim`` and the affine. The key set is the same for every
  format so that a batch mixing DICOM and PNG collates. No patient-identifying DICOM attribute is ever
  read (decoded) unless listed in ``dicom_tags``, whose values are then added under their keywords.

Bad input raises :class:`ImageReadError`, which names the file and the reason: so does every failure of a
decoder (PIL, nibabel, pydicom and its plugins, gzip, zlib). Each reader checks the sizes a header declares
against ``max_pixels`` and against the bytes the file holds before it allocates anything of that size
(:func:`check_declared_size`), so a hostile header costs what its file holds, not what it declares.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import math
import os
import struct
import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = [
    "ImageReadError",
    "LoadXray",
    "LoadXrayd",
    "sniff_format",
    "check_declared_size",
    "DEFAULT_MAX_PIXELS",
    "VOI_MODES",
    "COLOR_MODES",
]

logger = logging.getLogger(__name__)

VOI_MODES = ("apply", "ignore", "full_range")
COLOR_MODES = ("grey", "rgb", "reject")

_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR_PI = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"
# ITU-R BT.601 luma weights, the usual RGB -> grey conversion for medical viewers and PIL's "L" mode.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

class ImageReadError(RuntimeError):
    """A file could not be read as an image; ``path`` names it and ``reason`` says why.

    Raised for every kind of bad input (missing, unreadable, truncated, not an image, unsupported
    photometric interpretation, empty pixel data, NaN/inf pixels), so that callers such as
    :class:`hmn.data.SkipBadFilesDataset` can tell a bad file from a bug.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


# ----------------------------------------------------------------------------------------------
# declared sizes

# 2**30 pixel values (rows x columns x frames x samples; the product of a NIfTI's dimensions) admits every
# routine medical image with room to spare: a 512x512x2000 CT holds 0.52 * 2**30, a 4096x5120 mammogram
# 0.02 * 2**30, a 2457x1890x70 breast tomosynthesis 0.30 * 2**30, a 64x64x40x1000 fMRI run 0.16 * 2**30.
# It still bounds what a hostile header can make a reader allocate: 4 GiB as float32.
DEFAULT_MAX_PIXELS = 2**30

# The most bytes one stored byte can decode to: deflate (PNG) 1032 (a 258-byte match in two 1-bit codes),
# DICOM RLE Lossless (PS3.5 G.3.1, PackBits) 64 (a 128-byte replicate run in 2 bytes).
_DEFLATE_MAX_RATIO = 1032
_RLE_MAX_RATIO = 64


def check_declared_size(
    path: str | os.PathLike,
    shape: Sequence[int],
    itemsize: float,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    file_size: int | None = None,
    *,
    offset: int = 0,
    expansion: float = 1.0,
    axes: Sequence[str] | None = None,
) -> int:
    """Refuses an image whose header declares more than ``max_pixels`` values or more bytes than the file holds.

    Called by every reader with the sizes a header declares, before anything of that size is allocated,
    so that a few hundred bytes declaring a 60000x60000 image cost nothing.

    Args:
        path: the file, named in the error.
        shape: declared dimensions: rows, columns, frames, samples per pixel (DICOM PS3.3 C.7.6.3); the
            image size and bands (PIL); ``dim[1:dim[0]+1]`` (NIfTI). Non-negative ints.
        itemsize: bytes per stored value, may be fractional (``bits / 8``: 0.125 for 1-bit data).
        max_pixels: the most values (the product of ``shape``) accepted; ``None``: no limit.
        file_size: bytes available for the data (the file's size, or the Pixel Data element's length);
            ``None`` skips that check (compressed data whose best ratio is unbounded, gzip streams).
        offset: where the data starts within those ``file_size`` bytes (NIfTI ``vox_offset``).
        expansion: the most bytes one stored byte can decode to for the data's compression (1 for
            uncompressed data, 1032 for deflate, 64 for DICOM RLE), so that the file must hold at least
            ``ceil(prod(shape) * itemsize / expansion)`` bytes after ``offset``.
        axes: names of the dimensions for the message (``("frames", "rows", "columns", "samples")``).

    Returns:
        The number of values, ``prod(shape)``.

    Raises:
        ImageReadError: naming `path`, the declared shape and the limit or file size it exceeds.
    """
    dims = []
    for d in shape:
        try:
            dims.append(int(d))
        except (TypeError, ValueError, OverflowError):
            raise ImageReadError(path, f"header declares a non-integer size {d!r} (shape {tuple(shape)})") from None
    names = list(axes) if axes is not None and len(axes) == len(dims) else [""] * len(dims)
    text = " x ".join(f"{d} {name}".strip() for d, name in zip(dims, names)) or "a scalar"
    if any(d < 0 for d in dims):
        raise ImageReadError(path, f"header declares a negative size ({text})")
    n = math.prod(dims)
    if max_pixels is not None and n > max_pixels:
        raise ImageReadError(
            path, f"header declares {text} = {n:,} pixel values, more than max_pixels={max_pixels:,}: a corrupt or "
            "hostile header, or an image larger than this pipeline accepts (raise max_pixels if it is genuine)"
        )
    if file_size is not None:
        nbytes = math.ceil(n * itemsize)
        need = int(offset) + math.ceil(nbytes / expansion)
        if need > file_size:
            packed = ""
            if expansion != 1:
                packed = f", compressed at most {expansion:g}:1 so at least {need - int(offset):,} stored"
            start = f" after byte {int(offset):,}" if offset else ""
            raise ImageReadError(
                path, f"header declares {text} of {float(itemsize):g} bytes each ({nbytes:,} bytes{packed}{start}), "
                f"but there are only {int(file_size):,} bytes: the file is truncated or its header is corrupt"
            )
    return n


_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _file_errors(what: str):
    """Decorates a reader ``(self, path)`` so that any failure on a file becomes :class:`ImageReadError` naming it.

    Decoders (PIL, nibabel, pydicom and its plugins, gzip, zlib, numpy) raise many exception types on
    corrupt input, some not even an ``Exception`` (a Rust plugin's panic); a caller such as
    :class:`hmn.data.SkipBadFilesDataset` leaves out and names a file on ``ImageReadError`` alone. A bug in
    a reader becomes one too (its type and message in the reason, its traceback in ``__cause__``): the
    tests on valid files are what tell the two apart.
    """

    def wrap(reader):
        @functools.wraps(reader)
        def inner(self, path, *args, **kwargs):
            try:
                return reader(self, path, *args, **kwargs)
            except ImageReadError:
                raise
            except MemoryError as e:
                raise ImageReadError(path, f"not enough memory to read this {what} (MemoryError: {e})") from e
            except _EXITS:
                raise
            except BaseException as e:  # Exception, and the panics of Rust decoders (pyo3_runtime.PanicException)
                reason = " ".join(str(e).split())[:400]
                raise ImageReadError(path, f"{what} cannot be read ({type(e).__name__}: {reason})") from e

        return inner

    return wrap


# ----------------------------------------------------------------------------------------------
# format detection


def sniff_format(path: str | os.PathLike) -> str:
    """Returns ``"dicom"``, ``"dicom_series"``, ``"nifti"`` or ``"pil"`` for `path`, decided by content.

    Raises :class:`ImageReadError` for a missing, empty, unreadable or unrecognised file, for a gzip
    stream that is corrupt, and for anything but a regular file or folder (a FIFO or device would block
    or never end).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "dicom_series"
    if os.path.exists(path) and not os.path.isfile(path):
        raise ImageReadError(
            path, "is not a regular file (a device, FIFO or socket); accepted: image files and folders"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(544)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot be read ({e.strerror or e})") from None
    if not head:
        raise ImageReadError(path, "file is empty (0 bytes)")
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff"):
        return "pil"
    if head[:4] in (b"II*\x00", b"MM\x00*") or head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return "pil"
    if head[:2] == b"BM" or head[:6] in (b"GIF87a", b"GIF89a"):
        return "pil"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(544)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageReadError(path, f"gzip stream is corrupt or truncated ({type(e).__name__}: {e})") from None
        if _is_nifti_header(inner):
            return "nifti"
        raise ImageReadError(path, "gzip file that does not hold a NIfTI image")
    if _is_nifti_header(head) or path.lower().endswith((".hdr", ".img")):
        return "nifti"
    # DICOM written without the 128-byte preamble and 'DICM' prefix: try to parse it as such.
    if _parses_as_dicom(path):
        return "dicom"
    raise ImageReadError(
        path, "not a recognised image format (accepted: DICOM, PNG, JPEG, TIFF, BMP, JPEG 2000, NIfTI, Analyze)"
    )


def _parses_as_dicom(path: str) -> bool:
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["Rows", "SOPClassUID"])
        return "Rows" in ds or "SOPClassUID" in ds
    except Exception:
        return False


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        for endian in "<>":
            size = struct.unpack(endian + "i", head[:4])[0]
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return True
            if size == 540 and head[4:8] == b"n+2\x00":
                return True
    return False


# ----------------------------------------------------------------------------------------------
# DICOM


def _lut_array(item: Any, little_endian: bool) -> tuple[np.ndarray, int, int]:
    """(data, first mapped value, bit depth) of a Modality or VOI LUT Sequence item."""
    n_entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        data = np.frombuffer(raw, dtype="<u2" if little_endian else ">u2")[:n_entries]
    else:
        data = np.asarray(raw if isinstance(raw, Sequence) else [raw], dtype=np.int64)
    return data.astype(np.float32), first_map, bits


def _apply_lut(arr: np.ndarray, lut: np.ndarray, first_map: int) -> np.ndarray:
    idx = np.rint(arr).astype(np.int64) - first_map
    np.clip(idx, 0, len(lut) - 1, out=idx)
    return lut[idx]


def _multi(value: Any, index: int) -> float:
    """Item `index` of a possibly multi-valued DS element (WindowCenter/Width)."""
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, (str, bytes)):
        values = list(value)
        return float(values[min(index, len(values) - 1)])
    return float(value)


class _DicomGrey:
    """Modality LUT, VOI and MONOCHROME1 handling for one DICOM dataset (no identifying attributes).

    ``frame`` holds one frame's attributes from the functional groups of a multi-frame image
    (:func:`_frame_attributes`): its Rescale Slope/Intercept and window override the dataset's.
    """

    def __init__(self, ds: Any, path: str, frame: Mapping[str, Any] | None = None):
        self.ds = ds
        self.path = path
        self.frame = dict(frame or {})
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        self.little_endian = bool(getattr(little, "is_little_endian", True)) if little is not None else True
        self.bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        self.signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        self.mlut = None
        if ds.get("ModalityLUTSequence"):
            self.mlut = _lut_array(ds.ModalityLUTSequence[0], self.little_endian)
        self.slope = _number(self._get("RescaleSlope"), "RescaleSlope", path, 1.0) or 1.0  # 0: invalid, read as 1
        self.intercept = _number(self._get("RescaleIntercept"), "RescaleIntercept", path, 0.0)

    def _get(self, keyword: str) -> Any:
        return self.frame[keyword] if keyword in self.frame else self.ds.get(keyword)

    def same_modality(self, other: _DicomGrey) -> bool:
        """Whether `other` maps stored values to the same modality values (one call can serve both)."""
        return self.mlut is None and other.mlut is None and (self.slope, self.intercept, self.bits, self.signed) == (
            other.slope, other.intercept, other.bits, other.signed)

    def voi_key(self, index: int) -> tuple | None:
        """What ``voi(mode="apply")`` would apply, comparable between frames or slices; None when it has no VOI."""
        if "WindowCenter" not in self.frame and self.ds.get("VOILUTSequence"):
            items = self.ds.VOILUTSequence
            lut, first, bits = _lut_array(items[min(index, len(items) - 1)], self.little_endian)
            return ("voi_lut", lut.tobytes(), first, bits)
        center, width = self._get("WindowCenter"), self._get("WindowWidth")
        if center is None or width is None:
            return None
        func = str(self._get("VOILUTFunction") or "LINEAR").upper()
        return ("window", _multi(center, index), _multi(width, index), func)

    def modality_range(self) -> tuple[float, float]:
        """Nominal output range of the Modality LUT (PS3.3 C.11.2.1.2), as pydicom's windowing uses it."""
        if self.mlut is not None:
            return 0.0, float(2 ** self.mlut[2] - 1)
        lo, hi = (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.signed else (0, 2**self.bits - 1)
        a, b = lo * self.slope + self.intercept, hi * self.slope + self.intercept
        return (min(a, b), max(a, b))

    def modality(self, arr: np.ndarray) -> np.ndarray:
        if self.mlut is not None:
            lut, first, _ = self.mlut
            return _apply_lut(arr, lut, first)
        out = arr.astype(np.float32, copy=False)
        if self.slope != 1.0 or self.intercept != 0.0:
            out = out * np.float32(self.slope) + np.float32(self.intercept)
        elif out is arr:
            out = out.copy()
        return out

    def voi(
        self, arr: np.ndarray, mode: str, index: int, y_range: tuple[float, float] | None = None
    ) -> tuple[np.ndarray, str, tuple[float, float]]:
        """Returns (values, what was applied, output range); `y_range` replaces the Modality LUT's output range
        (the union over a volume's slices or frames, so that they share one scale)."""
        y_lo, y_hi = y_range or self.modality_range()
        if mode == "ignore":
            return arr, "none", (y_lo, y_hi)
        key = self.voi_key(index) if mode == "apply" else None
        if key is not None and key[0] == "voi_lut":
            items = self.ds.VOILUTSequence
            lut, first, bits = _lut_array(items[min(index, len(items) - 1)], self.little_endian)
            return _apply_lut(arr, lut, first), "voi_lut", (0.0, float(2**bits - 1))
        if key is not None:
            _, center, width, func = key
            return self._window(arr, center, width, func, y_lo, y_hi), "window", (y_lo, y_hi)
        # full range (asked for, or "apply" on a file without any VOI): min..max of the image.
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.full_like(arr, y_lo), "full_range", (y_lo, y_hi)
        scale = np.float32((y_hi - y_lo) / (hi - lo))
        return (arr - np.float32(lo)) * scale + np.float32(y_lo), "full_range", (y_lo, y_hi)

    def _window(self, arr: np.ndarray, c: float, w: float, func: str, y_lo: float, y_hi: float) -> np.ndarray:
        span = y_hi - y_lo
        if func == "SIGMOID":
            if w <= 0:
                raise ImageReadError(self.path, f"WindowWidth {w} must be > 0 for a SIGMOID VOI LUT Function")
            z = np.float32(-4.0 / w) * (arr - np.float32(c))
            return np.float32(span) / (1.0 + np.exp(z, dtype=np.float32)) + np.float32(y_lo)
        if func == "LINEAR":
            if w < 1:
                raise ImageReadError(self.path, f"WindowWidth {w} must be >= 1 for a LINEAR VOI LUT Function")
            c, w = c - 0.5, w - 1.0
        elif func == "LINEAR_EXACT":
            if w <= 0:
                raise ImageReadError(self.path, f"WindowWidth {w} must be > 0 for a LINEAR_EXACT VOI LUT Function")
        else:
            raise ImageReadError(
                self.path, f"unsupported VOI LUT Function {func!r} (accepted: LINEAR, LINEAR_EXACT, SIGMOID)"
            )
        if w == 0:  # LINEAR with width 1: a threshold
            return np.where(arr <= c, np.float32(y_lo), np.float32(y_hi)).astype(np.float32)
        out = (arr - np.float32(c)) * np.float32(span / w) + np.float32(0.5 * span + y_lo)
        np.clip(out, y_lo, y_hi, out=out)
        return out


def _read_dicom_dataset(path: str, extra_tags: Sequence[str], header_only: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # A full read is faster than pydicom's specific_tags filter; values are only decoded when accessed,
    # and only the allow-listed attributes (plus the user's dicom_tags) are ever accessed or copied to meta.
    del extra_tags
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except InvalidDicomError as e:
        raise ImageReadError(path, f"not a valid DICOM file ({e})") from e
    except (EOFError, struct.error) as e:
        raise ImageReadError(path, f"DICOM file is truncated ({type(e).__name__}: {e})") from e
    except Exception as e:  # pydicom raises many types on corrupt headers
        raise ImageReadError(path, f"DICOM header cannot be parsed ({type(e).__name__}: {e})") from e


def _extra_meta(ds: Any, names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        value = ds.get(name) if ds is not None else None
        out[name] = "" if value is None else str(value)
    return out


def _check_dicom_size(ds: Any, path: str, tsyntax: Any, index: int | None, max_pixels: int | None) -> None:
    """Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated (PS3.3 C.7.6.3) against ``max_pixels``
    (the frames decoded: one when `index` is given) and, for native (PS3.5 8.1.1) and RLE (PS3.5 Annex G)
    transfer syntaxes, against the bytes of the Pixel Data element, before pydicom allocates its output."""

    def count(keyword: str, default: int) -> int:
        value = ds.get(keyword, default)
        value = default if value is None or value == "" else value
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError):
            raise ImageReadError(path, f"{keyword} {str(value)[:40]!r} is not an integer") from None

    rows, cols, samples = count("Rows", 0), count("Columns", 0), count("SamplesPerPixel", 1)
    frames = count("NumberOfFrames", 1) or 1  # absent, empty or 0: one frame, as pydicom reads it
    if frames < 0:
        raise ImageReadError(path, f"NumberOfFrames {frames} is negative")
    bits = count("BitsAllocated", 0)
    if bits != 1 and not (0 < bits <= 64 and bits % 8 == 0):
        raise ImageReadError(path, f"BitsAllocated {bits} is neither 1 nor a multiple of 8 up to 64 (PS3.5 8.1.1)")
    decoded = 1 if index is not None else frames
    axes = ("frames", "rows", "columns", "samples")
    check_declared_size(path, (decoded, rows, cols, samples), bits / 8, max_pixels, axes=axes)
    keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    value = ds.get(keyword) if keyword else None
    if not isinstance(value, (bytes, bytearray)):
        return
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if getattr(tsyntax, "is_encapsulated", False):
        if str(tsyntax) == "1.2.840.10008.1.2.5":  # RLE Lossless: one PackBits segment per byte plane
            check_declared_size(
                path, (frames, rows, cols, samples), bits / 8, None, len(value), expansion=_RLE_MAX_RATIO, axes=axes
            )
        # JPEG-LS and JPEG 2000 have no useful best-case ratio: their decoders compare the decoded size first
        return
    stored = 2 if pi == "YBR_FULL_422" and samples == 3 else samples  # PS3.3 C.7.6.3.1.2: Cb, Cr shared by 2 pixels
    check_declared_size(path, (frames, rows, cols, stored), bits / 8, None, len(value), axes=axes)


def _decode_dicom(ds: Any, path: str, index: int | None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Frame `index` (``None``: all) of the Pixel Data, decoded by pydicom, after :func:`_check_dicom_size`."""
    from pydicom.pixels import pixel_array

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        # No file meta: guess little endian from how pydicom parsed it.
        import pydicom.uid

        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
        if implicit:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        else:
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
            )
        tsyntax = ds.file_meta.TransferSyntaxUID
    _check_dicom_size(ds, path, tsyntax, index, max_pixels)
    name = getattr(tsyntax, "name", str(tsyntax))
    try:
        return pixel_array(ds, index=index)
    except NotImplementedError as e:
        raise ImageReadError(
            path, f"no installed decoder for transfer syntax {name} ({e}); install pylibjpeg and its plugins"
        ) from e
    except Exception as e:
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:400] or type(e).__name__
        if "less than expected" in reason or "truncat" in reason.lower() or "too short" in reason.lower():
            raise ImageReadError(path, f"pixel data is truncated ({name}): {reason}") from e
        raise ImageReadError(path, f"pixel data cannot be decoded ({name}): {type(e).__name__}: {reason}") from e
    except _EXITS:
        raise
    except BaseException as e:  # a Rust plugin's panic (pylibjpeg-rle: pyo3_runtime.PanicException) is no Exception
        raise ImageReadError(path, f"pixel data decoder failed ({name}): {type(e).__name__}: {e}") from e


def _stored_colour_bits(img: Any, path: str, fmt: str) -> int:
    """Bits per sample the file stores for a colour or grey+alpha image (0 when not known or not such an
    image), read from the PNG header or the TIFF BitsPerSample tag: PIL decodes those at 8 bits."""
    if fmt == "png":
        try:
            with open(path, "rb") as f:
                head = f.read(26)
        except OSError:
            return 0
        if len(head) == 26 and head[12:16] == b"IHDR" and head[25] in (2, 4, 6):  # RGB, grey+alpha, RGBA
            return int(head[24])
        return 0
    if fmt == "tiff":
        bps = getattr(img, "tag_v2", {}).get(258)
        if isinstance(bps, (tuple, list)) and len(bps) > 1:
            return int(max(bps))
    return 0


def _check_png_size(path: str, max_pixels: int | None) -> None:
    """A PNG's IHDR width x height x samples against `max_pixels` and against the file's size, which deflate can
    expand at most 1032-fold (PNG spec 11.2.2, RFC 1951), before PIL allocates anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
        size = os.path.getsize(path)
    except OSError:
        return  # PIL names the problem
    if len(head) < 26 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return
    width, height = struct.unpack(">II", head[16:24])
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(head[25])  # grey, RGB, palette, grey+alpha, RGBA
    if samples is None or head[24] not in (1, 2, 4, 8, 16):
        return  # not a valid IHDR: PIL refuses it
    check_declared_size(
        path, (height, width, samples), head[24] / 8, max_pixels, size, expansion=_DEFLATE_MAX_RATIO,
        axes=("rows", "columns", "samples"),
    )


# Adam7 interlacing (PNG spec 8.2): each pass's first column and row, and its steps
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_data(path: str) -> None:
    """Refuses a PNG whose image data (the IDAT chunks' zlib stream) ends before the rows its IHDR declares.

    Pillow fills the missing rows with zeros without a word when the stream itself is complete but short, and an
    image with its lower part black would be trained on and predicted as if it were whole. The stream is inflated
    again here in bounded pieces, only counted, and its length compared with the filtered scanlines the header
    declares: per row one filter byte and ceil(width x samples x bit depth / 8) bytes, over the seven Adam7 passes
    for an interlaced image (PNG spec 7.2, 8.2)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR" or len(data) < 33:
        return
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if samples is None:
        return

    def scanlines(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * samples * depth + 7) // 8)

    if interlace:
        expected = sum(scanlines(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy)))
                       for x0, y0, dx, dy in _ADAM7)
    else:
        expected = scanlines(width, height)
    inflate, got, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and got < expected:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            piece = inflate.decompress(data[pos + 8:pos + 8 + length], 1 << 20)
            got += len(piece)
            while inflate.unconsumed_tail and got < expected:
                got += len(inflate.decompress(inflate.unconsumed_tail, 1 << 20))
        elif kind == b"IEND":
            break
        pos += 12 + length
    if got < expected:
        raise ImageReadError(path, f"PNG image data ends after {got} of the {expected} bytes its header declares "
                                   f"({width}x{height}): the lower rows are missing (a truncated or damaged file)")


_NIFTI_SLAB_BYTES = 64 * 2**20


def _nifti_slabs(shape: Sequence[int], itemsize: int) -> Any:
    """Index tuples that cover `shape` in the file's (Fortran) order, each reading at most ~64 MiB from the file."""
    k, unit = 0, itemsize
    while k < len(shape) and unit * shape[k] <= _NIFTI_SLAB_BYTES:
        unit *= shape[k]
        k += 1
    if k == len(shape):
        yield (slice(None),) * len(shape)
        return
    step = max(1, _NIFTI_SLAB_BYTES // unit)
    for rest in np.ndindex(*shape[k + 1 :][::-1]):
        for start in range(0, shape[k], step):
            yield (slice(None),) * k + (slice(start, min(start + step, shape[k])),) + tuple(rest[::-1])


def _read_nifti_data(img: Any, path: str, max_pixels: int | None) -> np.ndarray:
    """The voxels of a loaded nibabel image as float32, scaled by scl_slope/scl_inter, read with bounded memory.

    The declared shape x dtype is checked against `max_pixels` and, for an uncompressed file, against the
    bytes after vox_offset (NIfTI-1/2 header, nifti1.h) before anything is allocated. The data are then
    read in slabs of at most ~64 MiB into an array whose pages are only committed as slabs arrive, so a
    gzip stream shorter than its header declares fails after costing what it held, not what it declared.
    """
    proxy = img.dataobj
    shape = tuple(int(s) for s in img.shape)
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    data_file = getattr(proxy, "file_like", None)
    file_size = None
    if isinstance(data_file, str) and not data_file.lower().endswith((".gz", ".bz2", ".zst")):
        file_size = os.path.getsize(data_file)
    check_declared_size(path, shape, itemsize, max_pixels, file_size, offset=int(getattr(proxy, "offset", 0)))
    out = np.empty(shape, dtype=np.float32, order="F")
    done = 0
    for index in _nifti_slabs(shape, itemsize):
        try:
            out[index] = proxy[index]
        except (ValueError, OSError, EOFError, zlib.error) as e:  # short file or stream, corrupt deflate data
            declared = f"{' x '.join(map(str, shape))} of {np.dtype(img.get_data_dtype())}"
            raise ImageReadError(
                path, f"image data ends or breaks after {done:,} of the {out.size * itemsize:,} bytes its header "
                f"declares ({declared}): truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from e
        done += out[index].size * itemsize
    return out


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


# ----------------------------------------------------------------------------------------------
# DICOM geometry: functional groups, pixel spacing, and the slices (or frames) of one volume

# The Functional Group Macros (PS3.3 C.7.6.16.2) this reader uses, with the attributes it takes from each.
_FUNCTIONAL_GROUPS = {
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),  # C.7.6.16.2.1
    "PlanePositionSequence": ("ImagePositionPatient",),  # C.7.6.16.2.3
    "PlaneOrientationSequence": ("ImageOrientationPatient",),  # C.7.6.16.2.4
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),  # C.7.6.16.2.10
    "PixelValueTransformationSequence": ("RescaleIntercept", "RescaleSlope", "RescaleType"),  # C.7.6.16.2.9
}
# Positions closer than this along the slice normal are one position.
_SAME_POSITION_MM = 1e-3


def _frame_attributes(ds: Any, path: str, index: int, n_frames: int) -> dict[str, Any]:
    """The attributes of frame `index` (0-based) that a multi-frame (Enhanced) image gives in its Shared and
    Per-frame Functional Groups Sequences (PS3.3 C.7.6.16), the per-frame item's overriding the shared one's;
    empty for an image without functional groups.

    Raises:
        ImageReadError: a Per-frame Functional Groups Sequence without one item per frame, or groups that
            cannot be parsed.
    """
    try:
        shared = ds.get("SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if not shared and not per_frame:
            return {}
        groups = [shared[0]] if shared else []
        if per_frame:
            if len(per_frame) != n_frames:
                raise ImageReadError(
                    path, f"Per-frame Functional Groups Sequence holds {len(per_frame)} items for {n_frames} frames "
                    "(NumberOfFrames); PS3.3 C.7.6.16 requires one item per frame"
                )
            groups.append(per_frame[index])
        out: dict[str, Any] = {}
        for group in groups:
            for macro, keywords in _FUNCTIONAL_GROUPS.items():
                items = group.get(macro)
                if not items:
                    continue
                for keyword in keywords:
                    value = items[0].get(keyword)
                    if value is not None and value != "":
                        out[keyword] = value
        return out
    except ImageReadError:
        raise
    except Exception as e:  # pydicom parses sequences lazily: a corrupt item fails here
        raise ImageReadError(path, f"functional groups cannot be parsed ({type(e).__name__}: {e})") from e


def _number(value: Any, keyword: str, path: str, default: float) -> float:
    """A DS/IS value as a finite float (`default` when absent); ImageReadError naming the attribute otherwise."""
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ImageReadError(path, f"{keyword} {str(value)[:40]!r} is not a finite number")
    return number


def _numbers(value: Any, n: int, keyword: str, path: str, label: str = "") -> np.ndarray | None:
    """A multi-valued DS attribute as `n` finite floats, None when absent; ImageReadError otherwise."""
    if value is None or value == "":
        return None
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        values = []
    if len(values) != n or not all(math.isfinite(v) for v in values):
        where = f" of {label}" if label else ""
        raise ImageReadError(path, f"{keyword} {str(value)[:80]!r}{where} is not {n} finite numbers")
    return np.array(values)


def _orientation(value: Any, path: str, label: str) -> np.ndarray | None:
    """ImageOrientationPatient as 6 floats (None when absent), checked to be two unit vectors at right angles
    (PS3.3 C.7.6.2.1.1): anything else has no voxel-to-patient mapping."""
    iop = _numbers(value, 6, "ImageOrientationPatient", path, label)
    if iop is not None:
        row, col = iop[:3], iop[3:]
        if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
            raise ImageReadError(
                path, f"ImageOrientationPatient {iop.tolist()} of {label} is not two unit vectors at right angles "
                "(PS3.3 C.7.6.2.1.1): the image has no defined orientation"
            )
    return iop


def _positive_pair(value: Any) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in list(value)[:2])
    except (TypeError, ValueError):
        return None
    return (row, col) if all(math.isfinite(v) and v > 0 for v in (row, col)) else None


def _dicom_spacing(
    ds: Any, frame: Mapping[str, Any] | None = None, keys: Sequence[str] = ("PixelSpacing", "ImagerPixelSpacing")
) -> tuple[tuple[float, float], str]:
    """(row spacing, column spacing) in mm and the attribute that gave it.

    Looked up in `keys` order, each first in the frame's functional groups (Pixel Measures, PS3.3
    C.7.6.16.2.1), then in the dataset: PixelSpacing (PS3.3 C.7.6.2.1.1: in the patient) before
    ImagerPixelSpacing (PS3.3 C.8.11.4: at the detector plane of a projection radiograph, used as is,
    without the magnification correction of PS3.3 10.7.1.1). A value that is not two positive finite
    numbers counts as absent. Without any: ``((1.0, 1.0), "default")``, which only 2D images accept.
    """
    for key in keys:
        for source in (frame or {}, ds):
            pair = _positive_pair(source.get(key))
            if pair is not None:
                return pair, key
    return (1.0, 1.0), "default"


def _spacing_between_slices(ds: Any, frame: Mapping[str, Any], path: str) -> float | None:
    value = frame.get("SpacingBetweenSlices", ds.get("SpacingBetweenSlices"))
    spacing = _number(value, "SpacingBetweenSlices", path, 0.0)
    return spacing if spacing > 0 else None


def _assume_spacing(value: Any) -> tuple[float, float, float] | None:
    """``assume_spacing`` checked: None, or three positive finite mm (one number repeated); ValueError otherwise."""
    if value is None:
        return None
    values = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        values = [v for v in values] if not isinstance(values, (str, bytes)) else None
    except TypeError:
        values = None
    if not values or len(values) != 3 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ValueError(f"assume_spacing={value!r}: accepted are None, or three positive numbers (mm) in (X, Y, Z) "
                         "order (between columns, between rows, between slices), or one for all three")
    return tuple(float(v) for v in values)


class _Plane:
    """One slice of a volume (a file of a series, or a frame of a multi-frame file), as its errors name it."""

    def __init__(self, path: str, label: str, iop: np.ndarray | None, ipp: np.ndarray | None, instance: int | None):
        self.path, self.label, self.iop, self.ipp, self.instance = path, label, iop, ipp, instance


def _pair(a: _Plane, b: _Plane) -> str:
    if a.label.startswith("frame ") and b.label.startswith("frame "):
        return f"frames {a.label[6:]} and {b.label[6:]}"
    return f"{a.label} and {b.label}"


def _instances(a: _Plane, b: _Plane) -> str:
    if a.instance is None or b.instance is None or a.label.startswith("frame "):
        return ""
    return f" (InstanceNumber {a.instance} to {b.instance})"


def _stack_geometry(
    planes: Sequence[_Plane], where: str, pixel: tuple[float, float] | None, between: float | None,
    assume: Sequence[float] | None,
) -> tuple[list[int], np.ndarray, tuple[float, float, float], str]:
    """Orders the slices of one volume and maps its voxels to patient space, refusing what is no regular grid.

    With ImagePositionPatient on every slice: slices sorted along the normal of their common
    ImageOrientationPatient; none may share a position; consecutive gaps may differ from their median by at
    most 10% + 0.05 mm (a missing slice, or irregular spacing, is refused), and every position must lie on the
    line through the first and last (within the same tolerance); the affine is PS3.3 C.7.6.2.1.1's, with the
    mean step as the third column, in RAS. Without positions on any slice: slices in InstanceNumber order
    (frames in stored order), which must have no gaps, with the slice spacing from SpacingBetweenSlices or,
    failing that, `assume`; the affine then has no origin (and is diagonal without ImageOrientationPatient).
    SliceThickness is never taken for the spacing: slices may overlap or leave gaps.

    Args:
        planes: the slices; ``iop``/``ipp`` None where absent.
        where: the folder or file a volume-wide error names.
        pixel: (row, column) spacing in mm from PixelSpacing, None when absent.
        between: SpacingBetweenSlices in mm, None when absent.
        assume: the user's ``assume_spacing`` (X = between columns, Y = between rows, Z = between slices), used
            only for what the files lack; None: a volume lacking any of them is refused.

    Returns:
        (slice order, 4x4 RAS affine, spacing (X, Y, Z) in mm, spacing source as "in-plane/slice").

    Raises:
        ImageReadError: naming the files (or frames) involved, or `where` for a spacing that is missing.
    """
    how = "give the voxel size with assume_spacing=(x, y, z) in mm (LoadXray, LoadXrayd, volume_transforms)"
    if pixel is not None:
        row_sp, col_sp, inplane = pixel[0], pixel[1], "PixelSpacing"
    elif assume is not None:
        col_sp, row_sp, inplane = float(assume[0]), float(assume[1]), "assume_spacing"
    else:
        raise ImageReadError(
            where, "has no PixelSpacing: the size of its voxels is unknown, and a volume resampled at a guessed "
            f"1 mm would show its anatomy at the wrong size; add PixelSpacing to the files or {how}"
        )
    for key in ("iop", "ipp"):
        has = [p for p in planes if getattr(p, key) is not None]
        if has and len(has) < len(planes):
            lacks = next(p for p in planes if getattr(p, key) is None)
            name = "ImageOrientationPatient" if key == "iop" else "ImagePositionPatient"
            raise ImageReadError(lacks.path, f"{lacks.label} has no {name} but {has[0].label} has: the slices' "
                                             "geometry is inconsistent")
    first = planes[0]
    for other in planes[1:]:
        if first.iop is not None and not np.allclose(other.iop, first.iop, atol=1e-4):
            raise ImageReadError(
                other.path, f"ImageOrientationPatient {other.iop.tolist()} of {other.label} differs from "
                f"{first.iop.tolist()} of {first.label}: slices of different orientations (a localizer?) cannot "
                "be stacked into one volume"
            )
    if first.ipp is not None and first.iop is None:
        raise ImageReadError(first.path, f"{first.label} has ImagePositionPatient but no ImageOrientationPatient")
    n = len(planes)
    if first.ipp is None:  # no positions: InstanceNumber (or stored frame) order, spacing from the header or user
        if any(p.instance is None for p in planes):
            lacks = next(p for p in planes if p.instance is None)
            raise ImageReadError(lacks.path, f"{lacks.label} has neither ImagePositionPatient nor InstanceNumber: "
                                             "the slices' order is unknown")
        order = sorted(range(n), key=lambda i: planes[i].instance)
        numbers = [planes[i].instance for i in order]
        steps = np.diff(numbers)
        common = float(np.median(steps)) if n > 1 else 1.0
        for i in np.flatnonzero(steps != common):
            a, b = planes[order[i]], planes[order[i + 1]]
            raise ImageReadError(
                b.path, f"InstanceNumber jumps from {a.instance} to {b.instance} between {_pair(a, b)} where the "
                f"other slices step by {common:g}: slices are missing (there is no ImagePositionPatient to tell "
                "their spacing)"
            )
        if between is not None:
            z, along = between, "SpacingBetweenSlices"
        elif assume is not None:
            z, along = float(assume[2]), "assume_spacing"
        elif n == 1:
            z, along = 1.0, "default"
        else:
            raise ImageReadError(
                where, "has no ImagePositionPatient and no SpacingBetweenSlices: the distance between its slices is "
                f"unknown (SliceThickness is not a spacing: slices may overlap or leave gaps); {how}"
            )
        if first.iop is None:
            return order, np.diag([col_sp, row_sp, z, 1.0]), (col_sp, row_sp, z), f"{inplane}/{along}"
        row_dir, col_dir = first.iop[:3], first.iop[3:]
        step, origin = np.cross(row_dir, col_dir) * z, np.zeros(3)
    else:
        row_dir, col_dir = first.iop[:3], first.iop[3:]
        normal = np.cross(row_dir, col_dir)
        offsets = np.array([float(normal @ p.ipp) for p in planes])
        order = sorted(range(n), key=lambda i: offsets[i])
        gaps = np.diff(offsets[order])
        for i in np.flatnonzero(gaps < _SAME_POSITION_MM):
            a, b = planes[order[i]], planes[order[i + 1]]
            raise ImageReadError(
                b.path, f"{_pair(a, b)} lie at the same position along the slice normal ({offsets[order[i]]:.4g} mm)"
                f"{_instances(a, b)}: one volume cannot hold several echoes, phases, stacks or copies of a slice"
            )
        if n > 1:
            typical = float(np.median(gaps))
            tolerance = 0.1 * typical + 0.05
            for i in np.flatnonzero(np.abs(gaps - typical) > tolerance):
                a, b = planes[order[i]], planes[order[i + 1]]
                ratio = gaps[i] / typical
                missing = int(round(ratio)) - 1
                what = (f"{missing} slice{'s' if missing > 1 else ''} missing" if missing >= 1 and
                        abs(ratio - round(ratio)) * typical <= tolerance else "irregular slice spacing")
                raise ImageReadError(
                    b.path, f"{_pair(a, b)} are {gaps[i]:.4g} mm apart along the slice normal where the others are "
                    f"{typical:.4g} mm apart: {what}{_instances(a, b)}. One affine cannot place such slices"
                )
            start, end = planes[order[0]].ipp, planes[order[-1]].ipp
            step = (end - start) / (n - 1)
            for k, i in enumerate(order):
                off = float(np.linalg.norm(planes[i].ipp - (start + k * step)))
                if off > tolerance:
                    raise ImageReadError(
                        planes[i].path, f"ImagePositionPatient of {planes[i].label} lies {off:.4g} mm off the line "
                        f"from {planes[order[0]].label} to {planes[order[-1]].label} that the other slices follow: "
                        "one affine cannot place it"
                    )
            _check_instance_order([planes[i] for i in order], where)
            along = "ImagePositionPatient"
        else:
            between_or = between if between is not None else (float(assume[2]) if assume is not None else 1.0)
            step = normal * between_or
            along = "SpacingBetweenSlices" if between is not None else "assume_spacing" if assume else "default"
        origin = planes[order[0]].ipp
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_sp, col_dir * row_sp, step, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return order, ras, (col_sp, row_sp, float(np.linalg.norm(step))), f"{inplane}/{along}"


def _check_instance_order(planes: Sequence[_Plane], where: str) -> None:
    """Cross-checks InstanceNumber against the slices' order along the normal: a jump or a reversal while the
    positions are regular is logged (numbering is not bound to position by the standard)."""
    numbers = [p.instance for p in planes]
    if len(numbers) < 3 or any(v is None for v in numbers) or planes[0].label.startswith("frame "):
        return
    steps = np.diff(numbers)
    if not (np.all(steps > 0) or np.all(steps < 0)):
        logger.warning("DICOM series in %s: InstanceNumber does not follow the slices' positions", where)
    elif len(set(np.abs(steps).tolist())) > 1:
        i = int(np.flatnonzero(np.abs(steps) != np.min(np.abs(steps)))[0])
        logger.warning(
            "DICOM series in %s: InstanceNumber jumps from %s to %s between %s although the slice positions are "
            "regular", where, numbers[i], numbers[i + 1], _pair(planes[i], planes[i + 1]),
        )


# Attributes every slice of a series must share (compared as text; SliceThickness as a number), and why.
_SERIES_SAME = (
    ("SOPClassUID", "images of different kinds (SOP classes)"),
    ("StudyInstanceUID", "images of different studies"),
    ("Rows", "slices of different sizes"),
    ("Columns", "slices of different sizes"),
    ("SamplesPerPixel", "grey and colour slices"),
    ("PhotometricInterpretation", "slices of different photometric interpretations"),
    ("PresentationLUTShape", "slices of different presentation LUT shapes"),
    ("Modality", "images of different modalities"),
    ("FrameOfReferenceUID", "slices in different patient coordinate systems"),
    ("SliceThickness", "slices of different thicknesses"),
    ("EchoNumbers", "images of different echoes"),
    ("TemporalPositionIdentifier", "images of different time points"),
    ("NumberOfSlices", "slices of different PET/NM series"),
)


def _check_series_headers(headers: Sequence[tuple[str, Any]]) -> None:
    """Refuses the files of one series folder that cannot be one volume, naming both files involved: a
    SOPInstanceUID or InstanceNumber found twice, a multi-frame file, and a difference in size, samples,
    photometric interpretation, modality, Frame of Reference (PS3.3 C.7.4.1), PixelSpacing or Rescale Type.
    Rescale Slope and Intercept (PS3.3 C.11.1) may differ between slices, as PET and MR scale each image on
    its own (the reader applies each slice's), except in CT, where they define Hounsfield units for the whole
    reconstruction: there a difference means files of several series."""
    ref_path, ref = headers[0]
    ref_name = os.path.basename(ref_path)
    seen_uid: dict[str, str] = {}
    seen_number: dict[int, str] = {}
    modality = str(ref.get("Modality", "") or "").strip().upper()

    def rescale(ds: Any, path: str) -> tuple[float, float, str, bool]:
        kind = str(ds.get("RescaleType", "") or "").strip().upper() or ("HU" if modality == "CT" else "US")
        return (_number(ds.get("RescaleSlope"), "RescaleSlope", path, 1.0),
                _number(ds.get("RescaleIntercept"), "RescaleIntercept", path, 0.0), kind,
                bool(ds.get("ModalityLUTSequence")))

    ref_rescale = rescale(ref, ref_path)
    ref_spacing = _positive_pair(ref.get("PixelSpacing"))
    varying: list[str] = []
    for path, ds in headers:
        frames = _number(ds.get("NumberOfFrames"), "NumberOfFrames", path, 1.0)
        if frames > 1:
            raise ImageReadError(path, f"is a multi-frame file ({frames:g} frames) in a series folder: a folder holds "
                                       "single-frame slices; read a multi-frame file on its own (frame='all')")
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if uid and uid in seen_uid:
            raise ImageReadError(path, f"has the SOPInstanceUID of {os.path.basename(seen_uid[uid])}: the same image "
                                       "twice (a copied file?)")
        seen_uid[uid] = path
        if ds.get("InstanceNumber") not in (None, ""):
            number = int(_number(ds.get("InstanceNumber"), "InstanceNumber", path, 0.0))
            if number in seen_number:
                raise ImageReadError(path, f"has InstanceNumber {number}, as {os.path.basename(seen_number[number])} "
                                           "has: two images of one number in one series (a copy, or another stack?)")
            seen_number[number] = path
        if path == ref_path:
            continue
        for keyword, why in _SERIES_SAME:
            mine, theirs = (str(d.get(keyword, "") or "").strip() for d in (ds, ref))
            if keyword == "SliceThickness" and mine and theirs:
                same = math.isclose(_number(mine, keyword, path, 0.0), _number(theirs, keyword, ref_path, 0.0),
                                    rel_tol=1e-4)
                mine, theirs = (mine, mine) if same else (mine, theirs)
            if mine != theirs:
                raise ImageReadError(path, f"{keyword} {mine or '(missing)'!r} differs from {theirs or '(missing)'!r} "
                                           f"of {ref_name}: {why} cannot be stacked into one volume")
        localizer = ["LOCALIZER" in str(d.get("ImageType", "") or "").upper() for d in (ds, ref)]
        if localizer[0] != localizer[1]:
            raise ImageReadError(path, f"is {'' if localizer[0] else 'not '}a LOCALIZER (ImageType) but {ref_name} is "
                                       f"{'not ' if localizer[0] else ''}: a scout image is not a slice of the volume")
        spacing = _positive_pair(ds.get("PixelSpacing"))
        if (spacing is None) != (ref_spacing is None) or spacing and not np.allclose(spacing, ref_spacing, rtol=1e-4):
            raise ImageReadError(path, f"PixelSpacing {list(spacing) if spacing else '(missing)'} differs from "
                                       f"{list(ref_spacing) if ref_spacing else '(missing)'} of {ref_name}: slices "
                                       "of different pixel sizes cannot be stacked into one volume")
        slope, intercept, kind, lut = rescale(ds, path)
        if (kind, lut) != ref_rescale[2:]:
            raise ImageReadError(path, f"RescaleType {kind!r}{' with a Modality LUT' if lut else ''} differs from "
                                       f"{ref_rescale[2]!r}{' with a Modality LUT' if ref_rescale[3] else ''} of "
                                       f"{ref_name}: slices in different units cannot be one volume")
        for keyword, mine, theirs in (("RescaleSlope", slope, ref_rescale[0]),
                                      ("RescaleIntercept", intercept, ref_rescale[1])):
            if mine != theirs:
                if modality == "CT":
                    raise ImageReadError(
                        path, f"{keyword} {mine:g} differs from {theirs:g} of {ref_name}: one CT reconstruction has "
                        "one rescale to Hounsfield units, so these files come from different series or were altered"
                    )
                varying.append(keyword)
    if varying:
        logger.warning("DICOM series in %s: %s vary between slices; each slice is scaled by its own (PS3.3 C.11.1)",
                       os.path.dirname(ref_path), " and ".join(sorted(set(varying))))


def _check_slice_count(headers: Sequence[tuple[str, Any]], folder: str) -> None:
    """PET and NM series state their slices per time slot, NumberOfSlices (PS3.3 C.8.9.4), and number each by
    ImageIndex: fewer files than that (slices missing at either end too) raises ImageReadError naming the folder
    and the missing indices."""
    first = headers[0][1]
    expected = first.get("NumberOfSlices")
    if expected in (None, ""):
        return
    expected = int(_number(expected, "NumberOfSlices", headers[0][0], 0.0))
    slots = int(_number(first.get("NumberOfTimeSlots"), "NumberOfTimeSlots", headers[0][0], 1.0))
    if expected == len(headers) or slots > 1:  # several time slots repeat positions: refused before this
        return
    indices = {int(_number(ds.get("ImageIndex"), "ImageIndex", p, 0.0)) for p, ds in headers if ds.get("ImageIndex")}
    missing = sorted(set(range(1, expected + 1)) - indices) if indices else []
    which = f"; ImageIndex {', '.join(map(str, missing[:20]))} missing" if missing else ""
    raise ImageReadError(folder, f"holds {len(headers)} slices but NumberOfSlices says {expected} per time slot "
                                 f"(PS3.3 C.8.9.4){which}: slices are missing, or files of another series are here")


def _modality_stack(greys: Sequence[_DicomGrey], arr: np.ndarray) -> np.ndarray:
    """Modality values of frames ``arr`` (F, H, W), each frame through its own Modality LUT / rescale."""
    if len(greys) == 1 or all(g.same_modality(greys[0]) for g in greys[1:]):
        return greys[0].modality(arr)
    out = np.empty(arr.shape, dtype=np.float32)
    for k, grey in enumerate(greys):
        out[k] = grey.modality(arr[k])
    return out


def _voi_stack(
    greys: Sequence[_DicomGrey], values: np.ndarray, mode: str, index: int, where: str
) -> tuple[np.ndarray, str, tuple[float, float]]:
    """VOI of a volume's slices ``values`` (F, H, W) of modality values, each slice by its own window or VOI LUT
    (a Frame VOI LUT, PS3.3 C.7.6.16.2.10), all mapped to one output range: the union of the slices' Modality
    LUT output ranges (PS3.3 C.11.2.1.2). ``"full_range"`` (and ``"apply"`` where a slice has no VOI) maps the
    volume's own minimum..maximum, not each slice's."""
    ranges = [g.modality_range() for g in greys]
    y_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    if mode == "apply":
        keys = [g.voi_key(index) for g in greys]
        if all(k is not None for k in keys):
            if all(k == keys[0] for k in keys[1:]):
                return greys[0].voi(values, mode, index, y_range)
            out = np.empty(values.shape, dtype=np.float32)
            applied = set()
            for k, grey in enumerate(greys):
                out[k], kind, out_range = grey.voi(values[k], mode, index, y_range)
                applied.add((kind, out_range))
            if len(applied) > 1:
                raise ImageReadError(where, "slices carry VOIs of different kinds (windows and VOI LUTs of different "
                                            "output ranges); read it with voi='ignore' or voi='full_range'")
            kind, out_range = applied.pop()
            return out, kind, out_range
        mode = "full_range"
    return greys[0].voi(values, mode, index, y_range)


class _Loaded:
    """What a reader returns before it becomes a MetaTensor."""

    def __init__(
        self, array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], meta: dict, from_float: bool = True
    ):
        self.array, self.affine, self.spacing, self.meta = array, affine, tuple(float(s) for s in spacing), meta
        self.from_float = from_float  # integer sources cannot hold NaN/inf: no need to scan them


# meta keys that LoadXray._finish computes from the array and affine (not carried over from an in-memory image)
_RECOMPUTED_META = ("filename_or_obj", "affine", "original_affine", "spatial_shape", "original_channel_dim", "space")
_RESIZE_MODES = ("area", "bilinear", "trilinear", "bicubic", "nearest")
ASPECT_MODES = ("stretch", "pad", "crop")


def _affine_2d(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([float(spacing[0]), float(spacing[1]), 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# the array transform


class LoadXray(Transform):
    """Loads a radiograph, CT or MR file into a channel-first ``float32`` MetaTensor, reader chosen by content.

    DICOM is decoded by pydicom (compressed transfer syntaxes through the pylibjpeg plugins) with the
    Modality LUT, VOI (window or VOI LUT) and MONOCHROME1 inversion applied as the DICOM standard
    says (PS3.3 C.11); PNG/JPEG/TIFF are read by PIL without transposition; NIfTI/Analyze by nibabel
    keeping the affine. See the module docstring for the output conventions.

    Args:
        voi: ``"apply"`` the file's VOI LUT Sequence or WindowCenter/WindowWidth (falling back to
            ``"full_range"`` when it has none), ``"ignore"`` it and return modality values (HU for CT),
            or ``"full_range"``: a linear window from the image's minimum to its maximum.
        voi_index: which of several windows / VOI LUTs to use.
        invert_monochrome1: mirror MONOCHROME1 (and Presentation LUT Shape INVERSE) images so that air is dark.
        frame: for multi-frame DICOM (and multi-page images): ``None`` rejects them with an error, an
            int selects that frame (negative counts from the end), ``"all"`` returns the frames as a 3D
            volume ``(C, X, Y, frames)``. Either reads each frame's rescale, window, spacing and geometry
            from the Enhanced image's functional groups (PS3.3 C.7.6.16); ``"all"`` refuses frames that are
            no regular grid (several stacks, phases or times at one position; gaps) and, without
            ``assume_spacing``, frames without PixelSpacing or a slice spacing.
        color: colour images (RGB, YBR, palette, ultrasound): ``"grey"`` converts them to one channel
            with the BT.601 luma weights (0.299 R + 0.587 G + 0.114 B), ``"rgb"`` keeps three channels,
            ``"reject"`` raises :class:`ImageReadError`.
        dicom_tags: DICOM keywords whose values (as strings, ``""`` when absent or not DICOM) go into the
            meta. Nothing else from the DICOM header does, so patient-identifying attributes
            (PatientName, PatientID, PatientBirthDate, AccessionNumber, ...) appear only if listed here.
            A series folder gives its first file's values, except ``SOPInstanceUID`` (``""``: the volume is
            many instances).
        dtype: output dtype (float32 by default).
        spatial_size: resize the image to this size as it is loaded (an int for every spatial axis, or one
            per axis), with ``resize_mode``; ``None`` keeps the file's size. The pixels and the affine equal
            those of MONAI's ``Resized(spatial_size, mode=resize_mode)`` applied after loading; the meta's
            ``spacing`` is the new pixel spacing (``Resized`` leaves that key as loaded), ``spatial_shape``
            stays the file's shape and ``resized_from`` records it. This
            skips ``Resized``'s per-call bookkeeping (about 0.3 ms per image; decoding a 256x256 PNG
            takes about 0.9 ms) but, unlike ``Resized``, records no operation for MONAI's ``Invertd``.
        resize_mode: ``torch.nn.functional.interpolate`` mode for ``spatial_size``: ``"area"`` (default,
            right for shrinking), ``"bilinear"``/``"trilinear"``, ``"bicubic"`` or ``"nearest"``.
        aspect: how ``spatial_size`` treats an image of another aspect ratio: ``"stretch"`` (default)
            resizes each axis to its size, distorting the anatomy (a 1955x1841 radiograph squashed to a
            square); ``"pad"`` keeps the aspect ratio, resizing so the image fits (the scale of the axis
            that needs the most shrinking, each size rounded as MONAI's ``Resize(size_mode="longest")``
            does) and padding both sides equally with the image's minimum (air on a radiograph); ``"crop"``
            resizes so the image covers the size (the scale of the axis that needs the least) and keeps
            the centre as MONAI's ``CenterSpatialCrop`` does. The affine follows the resize and the
            pad or crop.
        spatial_dims: ``None`` (any), or the number of spatial axes the image must have, each longer than
            one voxel: with 3 (a volume pipeline) a 2D image or a single slice raises :class:`ImageReadError`.
        channels: ``None`` (any), or the number of channels the image must have after ``color`` (the
            network's ``in_channels``): a 4D NIfTI holding several volumes, or a colour image kept as
            ``"rgb"``, raises :class:`ImageReadError` naming the count when it differs.
        max_pixels: the most pixel values a file may declare: rows x columns x frames x samples per pixel
            for DICOM (the frames decoded: one with an int ``frame``), width x height x bands for PNG/JPEG/
            TIFF, the product of the dimensions for NIfTI. Default :data:`DEFAULT_MAX_PIXELS` (2**30, which
            admits a 512x512x2000 CT or any mammogram, and bounds the float32 output at 4 GiB, with a peak of
            about twice that while a ``.nii.gz`` is converted); ``None``: no limit. A larger header raises
            :class:`ImageReadError` before anything is allocated. Independently of it, a header declaring
            more bytes than the file can hold is refused (uncompressed DICOM, NIfTI; PNG and DICOM RLE at
            their codecs' best ratio, 1032:1 and 64:1), and PIL formats are also held to PIL's own limit,
            2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (about 179 million pixels), within which a plain JPEG file is
            decoded at its declared size (its decoder fills missing data with grey).
        assume_spacing: ``None`` (default), or the voxel size in mm, ``(X, Y, Z)`` = (between columns, between
            rows, between slices), or one number for all three, to use for a DICOM volume (a series folder or
            ``frame="all"``) whose files lack it: X and Y where there is no PixelSpacing (Pixel Measures), Z
            where there is neither ImagePositionPatient nor SpacingBetweenSlices. What the files give always
            wins; the meta's ``spacing_source`` (``"<in-plane>/<slice>"``, e.g. ``"assume_spacing/
            ImagePositionPatient"``) says where each came from. Without it such a volume raises
            :class:`ImageReadError`: resampled at a guessed 1 mm its anatomy would have the wrong size. A 2D
            image without PixelSpacing or ImagerPixelSpacing keeps 1 mm (``spacing_source="default"``).
    """

    def __init__(
        self,
        voi: str = "apply",
        voi_index: int = 0,
        invert_monochrome1: bool = True,
        frame: int | str | None = None,
        color: str = "grey",
        dicom_tags: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        spatial_size: int | Sequence[int] | None = None,
        resize_mode: str = "area",
        aspect: str = "stretch",
        spatial_dims: int | None = None,
        channels: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        assume_spacing: float | Sequence[float] | None = None,
    ) -> None:
        for name, value in (("spatial_dims", spatial_dims), ("channels", channels), ("max_pixels", max_pixels)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}: accepted are None or a positive int")
        self.spatial_dims, self.channels, self.max_pixels = spatial_dims, channels, max_pixels
        self.assume_spacing = _assume_spacing(assume_spacing)
        if voi not in VOI_MODES:
            raise ValueError(f"voi={voi!r} is not one of {VOI_MODES}")
        if color not in COLOR_MODES:
            raise ValueError(f"color={color!r} is not one of {COLOR_MODES}")
        if not (frame is None or frame == "all" or isinstance(frame, int)):
            raise ValueError(f"frame={frame!r}: accepted are None (reject multi-frame), an int index or 'all'")
        if isinstance(dicom_tags, str):
            dicom_tags = [dicom_tags]
        from pydicom.datadict import tag_for_keyword

        unknown = [t for t in dicom_tags if tag_for_keyword(t) is None]
        if unknown:
            raise ValueError(f"dicom_tags {unknown} are not DICOM keywords (e.g. 'PatientID', 'StudyDate')")
        self.voi, self.voi_index, self.invert_monochrome1 = voi, int(voi_index), bool(invert_monochrome1)
        self.frame, self.color, self.dicom_tags, self.dtype = frame, color, list(dicom_tags), dtype
        if spatial_size is not None:
            sizes = [spatial_size] if isinstance(spatial_size, int) else spatial_size
            sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [None]
            if not sizes or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
                raise ValueError(f"spatial_size={spatial_size!r}: accepted are None, a positive int or a list of them")
            spatial_size = tuple(sizes)
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} is not one of {_RESIZE_MODES}")
        if aspect not in ASPECT_MODES:
            raise ValueError(f"aspect={aspect!r} is not one of {ASPECT_MODES}")
        self.spatial_size, self.resize_mode, self.aspect = spatial_size, resize_mode, aspect

    # -- public -------------------------------------------------------------------------------
    def __call__(self, path: str | os.PathLike | np.ndarray | torch.Tensor) -> MetaTensor:
        """Loads `path` (a file, or a folder holding one DICOM series), or takes an image already in memory
        (:meth:`from_memory`: a numpy array, tensor or MetaTensor, as MONAI Deploy's bundle operator hands it
        over).

        Raises:
            ImageReadError: the file (or in-memory image) cannot be read or breaks a limit set here.
            TypeError: `path` is none of the accepted types.
        """
        if isinstance(path, (np.ndarray, torch.Tensor)):
            return self.from_memory(path)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LoadXray expects a file path or an in-memory image (numpy array, torch tensor or "
                            f"MetaTensor), got {type(path).__name__}")
        path = os.fspath(path)
        kind = sniff_format(path)
        if kind == "dicom":
            loaded = self._read_dicom(path)
        elif kind == "dicom_series":
            loaded = self._read_dicom_series(path)
        elif kind == "nifti":
            loaded = self._read_nifti(path)
        else:
            loaded = self._read_pil(path)
        return self._finish(path, loaded)

    def from_memory(self, image: np.ndarray | torch.Tensor) -> MetaTensor:
        """An image already in memory, as the file path would give it where the pixels allow.

        Two layouts are accepted, told apart by the meta of a MetaTensor:

        * an image this class loaded (its meta has ``voi``, ``spacing_source`` and ``original_channel_dim`` 0,
          e.g. what :class:`hmn.deploy.app.XrayInferenceOperator` hands the bundle operator: ``LoadXray()`` without ``spatial_size``): its pixels,
          photometrics and meta are kept and only ``spatial_size``/``aspect`` and the shape checks are applied,
          so the result equals the file path's exactly, MONOCHROME1 and VOI included;
        * any other array (MONAI's ``LoadImage`` layout, which MONAI Deploy's ``DICOMSeriesToVolumeOperator``
          and ``MonaiBundleInferenceOperator`` give): spatial axes ``(X, Y[, Z])`` = (columns, rows[, slices]),
          the channel axis where ``meta["original_channel_dim"]`` says (``"no_channel"``, the default, for
          none). A 2D pipeline (``spatial_dims`` 2, or an image whose last axis is 1) gets ``(C, rows,
          columns)`` as from a file; ``meta["spacing"]`` (X, Y[, Z]) in mm gives the spacing (1 mm without).
          The values are taken as they are (modality values, when the producer applied the Modality LUT as
          the SDK does): no VOI window can be applied (the header is not at hand; ``meta["voi"]`` is
          ``"none"``), and MONOCHROME1 is mirrored about the image's own range only where
          ``meta["photometric_interpretation"]`` (or ``PhotometricInterpretation``) says MONOCHROME1. After
          the bundles' percentile normalization a MONOCHROME2 image without a VOI window gives the same
          network input as its file; one whose window clips values, or a MONOCHROME1 image whose meta does
          not say so, does not (:mod:`hmn.deploy` reads the files itself for that reason).

        Raises:
            ImageReadError: no pixels, more than ``max_pixels`` values, NaN/inf values, or a shape that breaks
                ``spatial_dims``/``channels``; the message names ``meta["filename_or_obj"]`` where there is one.
        """
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        name = meta.get("filename_or_obj")
        name = str(name) if isinstance(name, (str, os.PathLike)) and str(name) else "<in-memory image>"
        if isinstance(image, MetaTensor):
            arr = image.as_tensor().detach().cpu().numpy()
        elif isinstance(image, torch.Tensor):
            arr = image.detach().cpu().numpy()
        else:
            arr = np.asarray(image)
        if arr.dtype.kind not in "biuf":
            raise ImageReadError(name, f"in-memory image of dtype {arr.dtype}: accepted are numbers")
        if self.max_pixels is not None and arr.size > self.max_pixels:
            raise ImageReadError(name, f"in-memory image of {arr.size} values (shape {arr.shape}) is over "
                                       f"max_pixels={self.max_pixels}")
        arr = arr.astype(np.float32, copy=False) if arr.dtype.kind != "f" else arr
        ours = meta.get("original_channel_dim") == 0 and "voi" in meta and "spacing_source" in meta
        if ours:
            if arr.ndim < 3:
                raise ImageReadError(name, f"in-memory image of shape {arr.shape} has no channel axis first")
            affine = np.asarray(image.affine if isinstance(image, MetaTensor) else _affine_2d(meta["spacing"]))
            kept = {k: v for k, v in meta.items() if k not in _RECOMPUTED_META}
            return self._finish(name, _Loaded(arr, affine, meta["spacing"], kept))
        channel = meta.get("original_channel_dim", "no_channel")
        if channel is None or channel == "no_channel" or (isinstance(channel, float) and math.isnan(channel)):
            arr = arr[None]
        else:
            try:
                arr = np.moveaxis(arr, int(channel), 0)
            except (TypeError, ValueError, np.exceptions.AxisError) as e:
                raise ImageReadError(name, f"original_channel_dim={channel!r} does not fit shape {arr.shape}") from e
        spacing = [float(v) for v in np.asarray(meta.get("spacing", []), dtype=float).reshape(-1)]
        if arr.ndim == 4 and arr.shape[-1] == 1 and self.spatial_dims != 3:
            arr = arr[..., 0]  # one slice (a radiograph as a one-image series)
        if arr.ndim == 3:  # (C, X, Y) -> (C, rows, columns)
            arr = np.swapaxes(arr, 1, 2)
            xy = spacing[:2] if len(spacing) >= 2 and all(v > 0 for v in spacing[:2]) else [1.0, 1.0]
            spacing, source = [xy[1], xy[0]], "meta" if len(spacing) >= 2 else "default"
            affine = _affine_2d(spacing)
        elif arr.ndim == 4:
            if isinstance(image, MetaTensor):
                affine = np.asarray(image.affine, dtype=np.float64)
            else:
                affine = np.diag([*(spacing[:3] if len(spacing) >= 3 else [1.0] * 3), 1.0])
            spacing = [float(np.linalg.norm(affine[:3, k])) for k in range(3)]
            source = "meta"
        else:
            raise ImageReadError(name, f"in-memory image of shape {tuple(np.shape(image))} (channel "
                                       f"{channel!r}): accepted are 2D or 3D images with at most one channel axis")
        pi = str(meta.get("photometric_interpretation", meta.get("PhotometricInterpretation", "")) or "").upper()
        out_meta: dict[str, Any] = {"format": "in_memory", "voi": "none", "spacing_source": source,
                                    "photometric_interpretation": pi}
        if pi == "MONOCHROME1" and self.invert_monochrome1:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = np.float32(lo + hi) - arr
            out_meta["inverted"] = True
        for key in ("modality", "Modality"):
            if meta.get(key):
                out_meta["modality"] = str(meta[key])
        out_meta.update({k: str(meta[k]) for k in self.dicom_tags if meta.get(k) not in (None, "")})
        return self._finish(name, _Loaded(np.ascontiguousarray(arr), affine, spacing, out_meta))

    # -- finishing ----------------------------------------------------------------------------
    def _finish(self, path: str, loaded: _Loaded) -> MetaTensor:
        arr = loaded.array
        if arr.size == 0:
            raise ImageReadError(path, f"image has no pixels (shape {tuple(arr.shape)})")
        self._check_shape(path, tuple(arr.shape))
        if arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                # integer pixels become NaN only through the header's numbers (a NaN or infinite rescale or window)
                why = "" if loaded.from_float else (" after the header's rescale and window (RescaleSlope/Intercept, "
                                                     "WindowCenter/Width, per frame or shared) were applied")
                raise ImageReadError(path, f"{bad} of {arr.size} pixels are NaN or infinite{why}")
        meta = {
            "filename_or_obj": path,
            "format": "",
            "spacing": loaded.spacing,
            "modality": "",
            "photometric_interpretation": "",
            "bits_stored": 0,
            "voi": "none",
            "inverted": False,
            "frame": -1,
            "spacing_source": "default",
        }
        meta.update(loaded.meta)
        if "output_range" not in meta:
            meta["output_range"] = (float(arr.min()), float(arr.max()))
        meta.update({k: v for k, v in _extra_meta(None, self.dicom_tags).items() if k not in meta})
        affine = torch.as_tensor(loaded.affine, dtype=torch.float64)
        meta["spatial_shape"] = np.asarray(arr.shape[1:])
        meta["original_channel_dim"] = 0
        meta["original_affine"] = affine.clone()
        tensor = torch.from_numpy(np.ascontiguousarray(arr)).to(self.dtype)
        if self.spatial_size is not None:
            tensor, affine = self._resize(path, tensor, affine, meta)
        return MetaTensor(tensor, affine=affine, meta=meta)

    def _check_shape(self, path: str, shape: tuple) -> None:
        """``spatial_dims`` and ``channels`` against the loaded ``(C, *spatial)`` shape."""
        spatial = shape[1:]
        if self.spatial_dims is not None:
            if len(spatial) != self.spatial_dims:
                raise ImageReadError(path, f"has {len(spatial)} spatial axes (shape {shape}, channels first), "
                                           f"not the {self.spatial_dims} this pipeline takes")
            if self.spatial_dims == 3 and min(spatial) < 2:
                raise ImageReadError(path, f"is a single slice (shape {shape}, channels first), not a volume: "
                                           "a 3D bundle takes NIfTI volumes or folders of DICOM series")
        if self.channels is not None and shape[0] != self.channels:
            what = f"is a 4D file of {shape[0]} volumes" if len(spatial) == 3 else f"has {shape[0]} channels"
            raise ImageReadError(path, f"{what} (shape {shape}, channels first); the model takes {self.channels} "
                                       "(in_channels): give one file per study holding that many")

    def _resize(self, path: str, tensor: torch.Tensor, affine: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Resizes ``tensor`` (C, *spatial) to ``spatial_size`` as MONAI's ``Resized`` would, affine included."""
        from monai.transforms.utils import scale_affine

        orig = tuple(int(v) for v in tensor.shape[1:])
        size = self.spatial_size * len(orig) if len(self.spatial_size) == 1 else self.spatial_size
        if len(size) != len(orig):
            raise ImageReadError(
                path, f"spatial_size={self.spatial_size} has {len(size)} axes but the image has {len(orig)} ({orig})"
            )
        if size == orig:
            return tensor, affine
        final = size
        if self.aspect != "stretch":
            factor = (min if self.aspect == "pad" else max)(s / o for s, o in zip(size, orig))
            size = tuple(max(1, int(round(o * factor))) for o in orig)
        mode = self.resize_mode
        if mode in ("bilinear", "trilinear"):  # the linear mode of the image's dimension
            mode = "bilinear" if len(orig) == 2 else "trilinear"
        elif mode == "bicubic" and len(orig) != 2:
            raise ImageReadError(path, f"resize_mode='bicubic' is for 2D images; this one has {len(orig)} axes {orig}")
        align = False if mode in ("bilinear", "trilinear", "bicubic") else None
        n = affine.shape[0] - 1
        k = min(len(orig), n)
        out = tensor.float()
        if size != orig:
            out = torch.nn.functional.interpolate(out[None], size=size, mode=mode, align_corners=align)[0]
            scale = torch.as_tensor(scale_affine(orig, size, align_corners=False), dtype=torch.float64)
            full = torch.eye(n + 1, dtype=torch.float64)
            full[:k, :k], full[:k, n] = scale[:k, :k], scale[:k, len(orig)]
            affine = affine @ full
        if size != final:  # pad or crop the aspect-preserving resize to the size asked for
            starts = [(s // 2 - f // 2) if s >= f else -((f - s) // 2) for s, f in zip(size, final)]
            canvas = torch.full((out.shape[0], *final), float(out.min()), dtype=out.dtype)
            src = tuple(slice(max(st, 0), max(st, 0) + min(s, f)) for st, s, f in zip(starts, size, final))
            dst = tuple(slice(max(-st, 0), max(-st, 0) + min(s, f)) for st, s, f in zip(starts, size, final))
            canvas[(slice(None), *dst)] = out[(slice(None), *src)]
            out = canvas
            shift = torch.eye(n + 1, dtype=torch.float64)
            shift[: min(len(starts), n), n] = torch.as_tensor(starts[:n], dtype=torch.float64)
            affine = affine @ shift
        meta["spacing"] = tuple(float(sp) * o / s for sp, o, s in zip(meta["spacing"], orig, size))
        meta["resized_from"] = orig
        if self.aspect != "stretch":
            meta["aspect"] = self.aspect
        return out.to(self.dtype), affine

    # -- DICOM --------------------------------------------------------------------------------
    @_file_errors("DICOM image")
    def _read_dicom(self, path: str) -> _Loaded:
        ds = _read_dicom_dataset(path, self.dicom_tags)
        pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        if not has_pixels:
            if len(ds) == 0:
                raise ImageReadError(path, "DICOM file holds no data elements after its file meta: truncated or corrupt")
            sop = ds.get("SOPClassUID")
            sop_name = getattr(sop, "name", "") if sop is not None else ""
            if "Rows" in ds or "Image Storage" in sop_name:
                raise ImageReadError(path, f"DICOM file is truncated: it ends before its pixel data ({sop_name or 'image'})")
            kind = str(ds.get("Modality", "") or "none")
            raise ImageReadError(path, f"DICOM file has no pixel data (Modality {kind}): not an image object")
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if rows == 0 or cols == 0:
            raise ImageReadError(path, f"DICOM image is empty (Rows={rows}, Columns={cols})")
        if pi not in _MONO + _COLOUR_PI + (_PALETTE,):
            raise ImageReadError(
                path,
                f"unsupported photometric interpretation {pi or '(missing)'!r} (accepted: MONOCHROME1, "
                "MONOCHROME2, RGB, YBR_*, PALETTE COLOR)",
            )
        if pi not in _MONO and self.color == "reject":
            raise ImageReadError(path, f"colour DICOM ({pi}) rejected because color='reject'")
        try:
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            n_frames = 1
        index, frame_meta = self._frame_index(path, n_frames)
        arr = _decode_dicom(ds, path, index, self.max_pixels)
        if arr.size == 0:
            raise ImageReadError(path, "DICOM pixel data is empty")
        if n_frames > 1 and index is None and arr.ndim == (2 if pi in _MONO else 3):
            arr = arr[None]  # a one-frame decode of a declared multi-frame file
        volume = self.frame == "all" and n_frames > 1
        # each frame's functional groups (Enhanced images, PS3.3 C.7.6.16): rescale, window, spacing, geometry
        if volume:
            frames = [_frame_attributes(ds, path, k, n_frames) for k in range(arr.shape[0])]
        else:
            frames = [_frame_attributes(ds, path, index or 0, n_frames)]
        spacing, spacing_src = _dicom_spacing(ds, frames[0])
        meta = {
            "format": "dicom",
            "modality": str(ds.get("Modality", "") or ""),
            "photometric_interpretation": pi,
            "bits_stored": int(ds.get("BitsStored", 0) or 0),
            "frame": frame_meta,
            "spacing_source": spacing_src,
        }
        meta.update(_extra_meta(ds, self.dicom_tags))

        if pi in _MONO:
            greys = [_DicomGrey(ds, path, frame) for frame in frames]
            if volume:
                values = _modality_stack(greys, arr)
                values, applied, (y_lo, y_hi) = _voi_stack(greys, values, self.voi, self.voi_index, path)
            else:
                values = greys[0].modality(arr)
                values, applied, (y_lo, y_hi) = greys[0].voi(values, self.voi, self.voi_index)
            invert = self.invert_monochrome1 and (
                pi == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
            )
            if invert:
                values = np.float32(y_lo + y_hi) - values
            meta.update(voi=applied, inverted=bool(invert), output_range=(float(y_lo), float(y_hi)))
            channels = values[None]
        else:
            if pi == _PALETTE:
                from pydicom.pixels import apply_color_lut

                try:
                    arr = apply_color_lut(arr, ds)
                except Exception as e:
                    raise ImageReadError(path, f"palette colour lookup table cannot be applied ({e})") from e
            # pydicom's decoders return YBR data converted to RGB by default.
            values = arr.astype(np.float32, copy=False)
            if self.color == "grey":
                channels = _to_grey(values)[None]
            else:
                channels = np.moveaxis(values[..., :3], -1, 0)
            top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else float(values.max())
            meta.update(voi="none", inverted=False, output_range=(0.0, top))
        if volume and channels.ndim == 4:
            # (C, F, H, W) -> MONAI's 3D order (C, X=columns, Y=rows, Z=frames), frames sorted along the normal
            channels = np.transpose(channels, (0, 3, 2, 1))
            order, affine, spacing3, meta["spacing_source"] = self._frames_geometry(ds, path, frames)
            if order != sorted(order):
                channels = channels[..., order]
            return _Loaded(channels, affine, spacing3, meta, arr.dtype.kind == "f")
        return _Loaded(channels, _affine_2d(spacing), spacing, meta, arr.dtype.kind == "f")

    def _frames_geometry(
        self, ds: Any, path: str, frames: Sequence[Mapping[str, Any]]
    ) -> tuple[list[int], np.ndarray, tuple[float, float, float], str]:
        """Frame order, RAS affine, spacing and its source of a multi-frame image read as one volume, from each
        frame's Pixel Measures, Plane Orientation and Plane Position (PS3.3 C.7.6.16.2), by
        :func:`_stack_geometry`'s rules. Positions come from the functional groups only: a top-level
        ImagePositionPatient places the first frame, not the others."""
        pixel: tuple[float, float] | None = None
        planes = []
        for k, frame in enumerate(frames):
            pair, source = _dicom_spacing(ds, frame, ("PixelSpacing",))
            pair = pair if source != "default" else None
            if k == 0:
                pixel = pair
            elif (pair is None) != (pixel is None) or pair and not np.allclose(pair, pixel, rtol=1e-4):
                raise ImageReadError(
                    path, f"frames 0 and {k} differ in PixelSpacing ({list(pixel) if pixel else '(missing)'} and "
                    f"{list(pair) if pair else '(missing)'}): frames of different pixel sizes are not one volume"
                )
            iop = _orientation(frame.get("ImageOrientationPatient", ds.get("ImageOrientationPatient")), path,
                               f"frame {k}")
            ipp = _numbers(frame.get("ImagePositionPatient"), 3, "ImagePositionPatient", path, f"frame {k}")
            planes.append(_Plane(path, f"frame {k}", iop, ipp, k))
        between = _spacing_between_slices(ds, frames[0], path)
        return _stack_geometry(planes, path, pixel, between, self.assume_spacing)

    def _frame_index(self, path: str, n_frames: int) -> tuple[int | None, int]:
        if self.frame == "all":
            return None, -1
        if n_frames <= 1:
            if isinstance(self.frame, int) and self.frame not in (0, -1):
                raise ImageReadError(path, f"frame={self.frame} asked for, but the file has a single frame")
            return None, 0
        if self.frame is None:
            raise ImageReadError(
                path,
                f"multi-frame DICOM ({n_frames} frames); choose one with frame=<index> or all with frame='all'",
            )
        index = self.frame + n_frames if self.frame < 0 else self.frame
        if not 0 <= index < n_frames:
            raise ImageReadError(path, f"frame={self.frame} is out of range for {n_frames} frames")
        return index, index

    @_file_errors("DICOM series")
    def _read_dicom_series(self, folder: str) -> _Loaded:
        names = sorted(os.listdir(folder))
        headers = []
        for name in names:
            full = os.path.join(folder, name)
            if not os.path.isfile(full):
                continue
            try:
                if sniff_format(full) != "dicom":
                    continue
            except ImageReadError:
                continue
            ds = _read_dicom_dataset(full, self.dicom_tags, header_only=True)
            if "ImagePositionPatient" in ds or "InstanceNumber" in ds:
                headers.append((full, ds))
        if not headers:
            raise ImageReadError(folder, "folder holds no DICOM image files (expected one DICOM series)")
        series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
        if len(series) > 1:
            raise ImageReadError(folder, f"folder holds {len(series)} DICOM series; put each in its own folder")
        _check_series_headers(headers)
        planes = []
        for full, ds in headers:
            name = os.path.basename(full)
            number = ds.get("InstanceNumber")
            planes.append(_Plane(
                full, name, _orientation(ds.get("ImageOrientationPatient"), full, name),
                _numbers(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", full, name),
                None if number in (None, "") else int(_number(number, "InstanceNumber", full, 0.0)),
            ))
        first = headers[0][1]
        pixel, source = _dicom_spacing(first, None, ("PixelSpacing",))
        between = _spacing_between_slices(first, {}, headers[0][0])
        order, ras, spacing, spacing_src = _stack_geometry(
            planes, folder, pixel if source != "default" else None, between, self.assume_spacing
        )
        headers = [headers[i] for i in order]
        _check_slice_count(headers, folder)
        # modality values of each slice (its own rescale); the VOI and MONOCHROME1 inversion follow on the volume
        single = LoadXray(voi="ignore", invert_monochrome1=False, frame=None, color=self.color,
                          dicom_tags=self.dicom_tags, max_pixels=self.max_pixels)
        slices, meta, digests = [], None, {}
        for full, _ in headers:
            loaded = single._read_dicom(full)
            array = loaded.array
            if slices and array.shape != slices[0].shape:
                raise ImageReadError(full, f"slice shape {array.shape[1:]} differs from the shape "
                                           f"{slices[0].shape[1:]} of {os.path.basename(headers[0][0])}")
            if array.size and float(array.min()) != float(array.max()):  # uniform slices (air) may well repeat
                digest = hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16).digest()
                if digest in digests:
                    raise ImageReadError(full, f"has pixel data identical to {os.path.basename(digests[digest])}: the "
                                               "same image twice, under another position or UID")
                digests[digest] = full
            slices.append(array)
            meta = meta or loaded.meta
        vol = np.stack(slices, axis=1)  # (C, Z, rows, cols)
        meta = dict(meta or {})
        pi = str(first.get("PhotometricInterpretation", "") or "").strip().upper()
        if pi in _MONO:
            greys = [_DicomGrey(ds, full) for full, ds in headers]
            values, applied, (y_lo, y_hi) = _voi_stack(greys, vol[0], self.voi, self.voi_index, folder)
            invert = self.invert_monochrome1 and (
                pi == "MONOCHROME1" or str(first.get("PresentationLUTShape", "")).upper() == "INVERSE"
            )
            if invert:
                values = np.float32(y_lo + y_hi) - values
            meta.update(voi=applied, inverted=bool(invert), output_range=(float(y_lo), float(y_hi)))
            vol = values[None]
        vol = np.transpose(vol, (0, 3, 2, 1))  # (C, X=cols, Y=rows, Z)
        meta.update(format="dicom_series", frame=-1, spacing_source=spacing_src)
        # dicom_tags come from the first file; an instance's own UID does not stand for the series
        if "SOPInstanceUID" in self.dicom_tags:
            meta["SOPInstanceUID"] = ""
        return _Loaded(vol, ras, spacing, meta)

    # -- PIL ----------------------------------------------------------------------------------
    @_file_errors("image")
    def _read_pil(self, path: str) -> _Loaded:
        from PIL import Image, ImageOps, UnidentifiedImageError

        _check_png_size(path, self.max_pixels)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageReadError(
                path, f"declares more pixels than PIL's decompression-bomb limit ({e}); if the image is genuine, raise "
                "PIL.Image.MAX_IMAGE_PIXELS"
            ) from e
        except UnidentifiedImageError as e:
            raise ImageReadError(path, f"not a readable image ({e})") from e
        except OSError as e:
            raise ImageReadError(path, f"cannot be read ({e})") from e
        with img:
            n_frames = int(getattr(img, "n_frames", 1) or 1)
            frame = 0
            if n_frames > 1:
                if self.frame is None:
                    raise ImageReadError(path, f"multi-page image ({n_frames} frames); choose one with frame=<index>")
                if self.frame == "all":
                    raise ImageReadError(path, "frame='all' is supported for DICOM only")
                frame = self.frame + n_frames if self.frame < 0 else self.frame
                if not 0 <= frame < n_frames:
                    raise ImageReadError(path, f"frame={self.frame} is out of range for {n_frames} frames")
                img.seek(frame)
            fmt = (img.format or "image").lower()
            width, height = img.size
            check_declared_size(path, (height, width, len(img.getbands())), 1, self.max_pixels,
                                axes=("rows", "columns", "bands"))
            stored_bits = _stored_colour_bits(img, path, fmt)
            try:
                img.load()
                # the displayed orientation, whatever the format (JPEG, TIFF, PNG's eXIf, WebP)
                img = ImageOps.exif_transpose(img)
            except Exception as e:  # OSError, SyntaxError, ValueError, zlib.error, struct.error, MemoryError, ...
                reason = f"{type(e).__name__}: {e}"
                raise ImageReadError(path, f"{fmt.upper()} data is truncated or corrupt ({reason})") from e
            if fmt == "png":
                _check_png_data(path)
            mode = img.mode
            dpi = img.info.get("dpi")
            transparency = img.info.get("transparency") if not isinstance(img.info.get("transparency"), bytes) else None
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
                mode = img.mode
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
                mode = "RGB"
            arr = np.asarray(img)
        if stored_bits > 8 and arr.dtype == np.uint8:
            raise ImageReadError(
                path, f"{fmt.upper()} stores {stored_bits}-bit colour or grey+alpha samples, which PIL reads as 8 bits: "
                "values would be lost. Save it as 16-bit greyscale without alpha (or as DICOM)"
            )
        key = transparency if mode not in ("P", "PA", "LA", "La", "RGBA", "RGBa") else None
        if key is not None:  # a tRNS colour key on a grey or RGB image: pixels of that value are see-through
            hit = np.all(arr == np.asarray(key, dtype=arr.dtype), axis=-1) if arr.ndim == 3 else arr == key
            if hit.any():
                raise ImageReadError(
                    path, f"has transparent pixels ({int(hit.sum())} of {hit.size} match its transparency key {key}): "
                    "what it shows depends on the background it is drawn on. Flatten it onto its intended background first"
                )
        if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
            alpha = arr[..., -1]
            if alpha.min() < (np.iinfo(arr.dtype).max if arr.dtype.kind in "ui" else 1.0):
                raise ImageReadError(
                    path, f"has transparent pixels (mode {mode}, {int((alpha < alpha.max()).sum())} of {alpha.size} "
                    "not opaque): what it shows depends on the background it is drawn on. Flatten it onto its "
                    "intended background first"
                )
            arr = arr[..., :-1]
            if mode in ("LA", "La"):
                arr = arr[..., 0]
        bits = {"1": 1, "L": 8, "LA": 8, "La": 8, "I": 32, "F": 32}.get(mode, 16 if mode.startswith("I;16") else 8)
        meta = {"format": fmt, "photometric_interpretation": mode, "bits_stored": bits, "frame": frame}
        if arr.dtype.kind in "ui":
            meta["output_range"] = (0.0, float(2**bits - 1) if bits < 32 else float(np.iinfo(arr.dtype).max))
        if arr.ndim == 3:  # RGB / RGBA
            if self.color == "reject":
                raise ImageReadError(path, f"colour image (mode {mode}) rejected because color='reject'")
            rgb = arr[..., :3].astype(np.float32)
            channels = _to_grey(rgb)[None] if self.color == "grey" else np.moveaxis(rgb, -1, 0)
        elif arr.ndim == 2:
            channels = arr.astype(np.float32)[None]
        else:
            raise ImageReadError(path, f"unexpected image array shape {arr.shape} (mode {mode})")
        spacing = (1.0, 1.0)
        meta["spacing_source"] = "default"
        if dpi:
            try:
                dx, dy = (float(v) for v in dpi)
                if dx > 1 and dy > 1:
                    spacing, meta["spacing_source"] = (25.4 / dy, 25.4 / dx), "dpi"
            except (TypeError, ValueError):
                pass
        return _Loaded(channels, _affine_2d(spacing), spacing, meta, arr.dtype.kind == "f")

    # -- NIfTI --------------------------------------------------------------------------------
    @_file_errors("NIfTI/Analyze image")
    def _read_nifti(self, path: str) -> _Loaded:
        import nibabel as nib

        try:
            # one open file for the whole read: each slab below then continues a gzip stream instead of restarting it
            img = nib.load(path, keep_file_open=True)
        except FileNotFoundError as e:
            raise ImageReadError(path, f"file not found ({e.filename})") from e
        except Exception as e:
            raise ImageReadError(path, f"NIfTI/Analyze header cannot be read ({type(e).__name__}: {e})") from e
        arr = _read_nifti_data(img, path, self.max_pixels)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim == 3:
            channels = arr[None]
        elif arr.ndim == 4:
            channels = np.moveaxis(arr, -1, 0)  # time / components become channels
        elif arr.ndim == 5 and arr.shape[3] == 1:
            channels = np.moveaxis(arr[:, :, :, 0, :], -1, 0)
        else:
            raise ImageReadError(path, f"NIfTI image of shape {arr.shape} is not 2D, 3D or 4D")
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        zooms = zooms + (1.0,) * (3 - len(zooms))
        meta = {
            "format": "nifti",
            "bits_stored": int(np.dtype(img.get_data_dtype()).itemsize * 8),
            "spacing_source": "header",
        }
        return _Loaded(channels, np.asarray(img.affine, dtype=np.float64), zooms, meta)


class LoadXrayd(MapTransform):
    """Dictionary wrapper of :class:`LoadXray`: replaces each path (or in-memory image, see
    :meth:`LoadXray.from_memory`) under `keys` by the loaded MetaTensor.

    Usable from a bundle config::

        {"_target_": "hmn.transforms.LoadXrayd", "keys": ["image"], "voi": "apply", "color": "grey"}

    Args:
        keys: keys of the items holding file paths (or in-memory images).
        allow_missing_keys: do not raise when a key is missing.
        All other arguments are :class:`LoadXray`'s.
    """

    def __init__(
        self,
        keys: KeysCollection,
        voi: str = "apply",
        voi_index: int = 0,
        invert_monochrome1: bool = True,
        frame: int | str | None = None,
        color: str = "grey",
        dicom_tags: Sequence[str] = (),
        dtype: torch.dtype = torch.float32,
        spatial_size: int | Sequence[int] | None = None,
        resize_mode: str = "area",
        aspect: str = "stretch",
        allow_missing_keys: bool = False,
        spatial_dims: int | None = None,
        channels: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        assume_spacing: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadXray(
            voi, voi_index, invert_monochrome1, frame, color, dicom_tags, dtype, spatial_size, resize_mode, aspect,
            spatial_dims, channels, max_pixels=max_pixels, assume_spacing=assume_spacing,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
