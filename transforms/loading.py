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
  multi-frame DICOM (``frame="all"``) are ``(C, columns, rows, frames)`` with a diagonal affine of the
  pixel spacing and SliceThickness: that affine is not placed in patient space.
* DICOM grey levels: stored values -> Modality LUT (RescaleSlope/Intercept or Modality LUT Sequence)
  -> VOI (``voi="apply"``: VOI LUT Sequence or WindowCenter/WindowWidth with the file's VOI LUT
  Function; ``"ignore"``: modality values unchanged; ``"full_range"``: a linear window over the
  image's own minimum to maximum) -> MONOCHROME1 mirrored about the output range, so that air is dark
  in every output. The output range is the one the DICOM standard (and pydicom's
  ``apply_windowing``) defines: the stored bit range sent through the Modality LUT.
* Meta: ``filename_or_obj``, ``format``, ``spacing``, ``modality``, ``photometric_interpretation``
  (as stored in the file), ``bits_stored``, ``voi`` (what was applied), ``inverted``, ``frame``,
  ``spatial_shape``, ``original_channel_dim`` and the affine. The key set is the same for every
  format so that a batch mixing DICOM and PNG collates. No patient-identifying DICOM attribute is ever
  read (decoded) unless listed in ``dicom_tags``, whose values are then added under their keywords.

Bad input raises :class:`ImageReadError`, which names the file and the reason.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
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
# format detection


def sniff_format(path: str | os.PathLike) -> str:
    """Returns ``"dicom"``, ``"dicom_series"``, ``"nifti"`` or ``"pil"`` for `path`, decided by content.

    Raises :class:`ImageReadError` for a missing, empty, unreadable or unrecognised file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "dicom_series"
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
        except (OSError, EOFError) as e:
            raise ImageReadError(path, f"gzip stream is corrupt or truncated ({e})") from None
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
    """Modality LUT, VOI and MONOCHROME1 handling for one DICOM dataset (no identifying attributes)."""

    def __init__(self, ds: Any, path: str):
        self.ds = ds
        self.path = path
        little = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        self.little_endian = bool(getattr(little, "is_little_endian", True)) if little is not None else True
        self.bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
        self.signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        self.mlut = None
        if ds.get("ModalityLUTSequence"):
            self.mlut = _lut_array(ds.ModalityLUTSequence[0], self.little_endian)
        slope, icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        self.slope = float(slope) if slope not in (None, "") and float(slope) != 0.0 else 1.0
        self.intercept = float(icpt) if icpt not in (None, "") else 0.0

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

    def voi(self, arr: np.ndarray, mode: str, index: int) -> tuple[np.ndarray, str, tuple[float, float]]:
        """Returns (values, what was applied, output range)."""
        ds = self.ds
        y_lo, y_hi = self.modality_range()
        if mode == "ignore":
            return arr, "none", (y_lo, y_hi)
        if mode == "apply" and ds.get("VOILUTSequence"):
            items = ds.VOILUTSequence
            lut, first, bits = _lut_array(items[min(index, len(items) - 1)], self.little_endian)
            return _apply_lut(arr, lut, first), "voi_lut", (0.0, float(2**bits - 1))
        if mode == "apply" and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            center, width = _multi(ds.WindowCenter, index), _multi(ds.WindowWidth, index)
            func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
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


def _dicom_spacing(ds: Any) -> tuple[tuple[float, float], str]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None:
            try:
                row, col = (float(v) for v in list(value)[:2])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return (row, col), key
    return (1.0, 1.0), "default"


def _extra_meta(ds: Any, names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        value = ds.get(name) if ds is not None else None
        out[name] = "" if value is None else str(value)
    return out


def _decode_dicom(ds: Any, path: str, index: int | None) -> np.ndarray:
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


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * _LUMA[0] + rgb[..., 1] * _LUMA[1] + rgb[..., 2] * _LUMA[2]


def _check_series_geometry(headers: Sequence[tuple[str, Any]], iop: Sequence[float], normal: np.ndarray) -> None:
    """Refuses sorted series slices that cannot form one regular grid; warns when their spacing is uneven.

    One affine describes the whole volume, so every slice must share the first slice's
    ImageOrientationPatient and no two slices may sit at the same position along the slice normal
    (multi-echo, multi-phase or duplicated files). Uneven gaps (a missing slice) leave the affine's
    mean step wrong for part of the volume: logged as a warning.

    Raises:
        ImageReadError: naming the offending slice file.
    """
    for full, ds in headers[1:]:
        other = [float(v) for v in ds.get("ImageOrientationPatient", iop)]
        if not np.allclose(other, iop, atol=1e-4):
            raise ImageReadError(
                full, f"ImageOrientationPatient {other} differs from the series' first slice {list(iop)}: slices of "
                "different orientations (a localizer?) cannot be stacked into one volume"
            )
    if len(headers) < 2 or any("ImagePositionPatient" not in ds for _, ds in headers):
        return
    offsets = np.array([np.dot(normal, [float(v) for v in ds.ImagePositionPatient]) for _, ds in headers])
    gaps = np.diff(offsets)
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        i = int(same[0])
        raise ImageReadError(
            headers[i + 1][0], f"lies at the same position along the slice normal ({offsets[i]:.3f} mm) as "
            f"{os.path.basename(headers[i][0])}: a folder must hold one volume, not several echoes, phases or copies"
        )
    mean = float(gaps.mean())
    if float(np.abs(gaps - mean).max()) > 0.01 * mean:
        logger.warning(
            "DICOM series in %s: slice spacing varies from %.4g to %.4g mm (missing slices?); the affine uses the "
            "mean, %.4g mm", os.path.dirname(headers[0][0]), float(gaps.min()), float(gaps.max()), mean,
        )


class _Loaded:
    """What a reader returns before it becomes a MetaTensor."""

    def __init__(
        self, array: np.ndarray, affine: np.ndarray, spacing: Sequence[float], meta: dict, from_float: bool = True
    ):
        self.array, self.affine, self.spacing, self.meta = array, affine, tuple(float(s) for s in spacing), meta
        self.from_float = from_float  # integer sources cannot hold NaN/inf: no need to scan them


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
            volume ``(C, X, Y, frames)``.
        color: colour images (RGB, YBR, palette, ultrasound): ``"grey"`` converts them to one channel
            with the BT.601 luma weights (0.299 R + 0.587 G + 0.114 B), ``"rgb"`` keeps three channels,
            ``"reject"`` raises :class:`ImageReadError`.
        dicom_tags: DICOM keywords whose values (as strings, ``""`` when absent or not DICOM) go into the
            meta. Nothing else from the DICOM header does, so patient-identifying attributes
            (PatientName, PatientID, PatientBirthDate, AccessionNumber, ...) appear only if listed here.
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
    ) -> None:
        for name, value in (("spatial_dims", spatial_dims), ("channels", channels)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}: accepted are None or a positive int")
        self.spatial_dims, self.channels = spatial_dims, channels
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
    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"LoadXray expects a file path, got {type(path).__name__}")
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

    # -- finishing ----------------------------------------------------------------------------
    def _finish(self, path: str, loaded: _Loaded) -> MetaTensor:
        arr = loaded.array
        if arr.size == 0:
            raise ImageReadError(path, f"image has no pixels (shape {tuple(arr.shape)})")
        self._check_shape(path, tuple(arr.shape))
        if loaded.from_float and arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ImageReadError(path, f"{bad} of {arr.size} pixels are NaN or infinite")
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
        arr = _decode_dicom(ds, path, index)
        if arr.size == 0:
            raise ImageReadError(path, "DICOM pixel data is empty")
        if n_frames > 1 and index is None and arr.ndim == (2 if pi in _MONO else 3):
            arr = arr[None]  # a one-frame decode of a declared multi-frame file
        spacing, spacing_src = _dicom_spacing(ds)
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
            grey = _DicomGrey(ds, path)
            values = grey.modality(arr)
            values, applied, (y_lo, y_hi) = grey.voi(values, self.voi, self.voi_index)
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
        if self.frame == "all" and n_frames >= 1 and channels.ndim == 4:
            # (C, F, H, W) -> MONAI's 3D order (C, X=columns, Y=rows, Z=frames)
            channels = np.transpose(channels, (0, 3, 2, 1))
            thickness = float(ds.get("SliceThickness", 1.0) or 1.0)
            affine = np.diag([spacing[1], spacing[0], thickness, 1.0])
            return _Loaded(channels, affine, (spacing[1], spacing[0], thickness), meta, arr.dtype.kind == "f")
        return _Loaded(channels, _affine_2d(spacing), spacing, meta, arr.dtype.kind == "f")

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
        first = headers[0][1]
        iop = [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
        row_dir, col_dir = np.array(iop[:3]), np.array(iop[3:6])
        normal = np.cross(row_dir, col_dir)

        def position(item: tuple[str, Any]) -> float:
            ds = item[1]
            if "ImagePositionPatient" in ds:
                return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
            return float(ds.get("InstanceNumber", 0) or 0)

        headers.sort(key=position)
        _check_series_geometry(headers, iop, normal)
        slices, meta = [], None
        single = LoadXray(voi=self.voi, voi_index=self.voi_index, invert_monochrome1=self.invert_monochrome1,
                          frame=None, color=self.color, dicom_tags=self.dicom_tags)
        for full, _ in headers:
            loaded = single._read_dicom(full)
            if slices and loaded.array.shape != slices[0].shape:
                raise ImageReadError(full, f"slice shape {loaded.array.shape[1:]} differs from the series' "
                                           f"{slices[0].shape[1:]}")
            slices.append(loaded.array)
            meta = meta or loaded.meta
        vol = np.stack(slices, axis=-1)  # (C, rows, cols, Z)
        vol = np.transpose(vol, (0, 2, 1, 3))  # (C, X=cols, Y=rows, Z)
        (row_sp, col_sp), _ = _dicom_spacing(first)
        positions = [
            np.array([float(v) for v in ds.ImagePositionPatient]) if "ImagePositionPatient" in ds else None
            for _, ds in headers
        ]
        origin = positions[0] if positions[0] is not None else np.zeros(3)
        if len(headers) > 1 and positions[-1] is not None and positions[0] is not None:
            step = (positions[-1] - positions[0]) / (len(headers) - 1)
        else:
            step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
        lps = np.eye(4)
        lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_sp, col_dir * row_sp, step, origin
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        meta = dict(meta or {})
        meta.update(format="dicom_series", frame=-1)
        spacing = (col_sp, row_sp, float(np.linalg.norm(step)) or 1.0)
        return _Loaded(vol, ras, spacing, meta)

    # -- PIL ----------------------------------------------------------------------------------
    def _read_pil(self, path: str) -> _Loaded:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            img = Image.open(path)
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
            stored_bits = _stored_colour_bits(img, path, fmt)
            try:
                img.load()
                # the displayed orientation, whatever the format (JPEG, TIFF, PNG's eXIf, WebP)
                img = ImageOps.exif_transpose(img)
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageReadError(path, f"{fmt.upper()} data is truncated or corrupt ({e})") from e
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
    def _read_nifti(self, path: str) -> _Loaded:
        import nibabel as nib

        try:
            img = nib.load(path)
            arr = np.asarray(img.dataobj, dtype=np.float32)
        except FileNotFoundError as e:
            raise ImageReadError(path, f"file not found ({e.filename})") from e
        except Exception as e:
            raise ImageReadError(path, f"NIfTI/Analyze image cannot be read ({type(e).__name__}: {e})") from e
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
    """Dictionary wrapper of :class:`LoadXray`: replaces each path under `keys` by the loaded MetaTensor.

    Usable from a bundle config::

        {"_target_": "hmn.transforms.LoadXrayd", "keys": ["image"], "voi": "apply", "color": "grey"}

    Args:
        keys: keys of the items holding file paths.
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
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadXray(
            voi, voi_index, invert_monochrome1, frame, color, dicom_tags, dtype, spatial_size, resize_mode, aspect,
            spatial_dims, channels,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
