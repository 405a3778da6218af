"""The CT/MR volume input pipeline: loading, RAS orientation, resampling, intensity, fixed size.

:func:`volume_transforms` returns the pipeline as MONAI bundle-config dictionaries (``{"_target_": ...}``),
to be pasted into (or generated for) a bundle's ``preprocessing`` list; :func:`volume_compose` builds the
same list into a :class:`monai.transforms.Compose` through MONAI's own ``ConfigParser``, so that the
objects a bundle instantiates and the ones a script gets are the same. The steps::

    LoadXrayd(voi="ignore")                     file or DICOM series folder -> (C, X, Y, Z), RAS affine; a DICOM
                                                volume without a voxel size is refused unless assume_spacing
    -> Orientationd(axcodes="RAS")              axes permuted/flipped to the nearest RAS grid (MONAI)
    -> Spacingd(pixdim=spacing, "bilinear")     resampled to the voxel size (MONAI; skipped if None)
    -> WindowIntensityd (CT) | PercentileRescaled (MR)   intensities to [0, 1]
    -> ResizeWithPadOrCropd(spatial_size)       centred pad (with 0) or crop to a fixed shape (MONAI)
    -> EnsureTyped(dtype="float32")             (MONAI)

After resampling the voxel size is the affine's (``nibabel.affines.voxel_sizes(img.affine)``); the
meta's ``spacing`` keeps the file's, as MONAI's transforms leave keys they do not own unchanged.
Intensities are normalised before the pad, so the zeros it adds are the lowest normalised value:
air or anything at or below the CT window's lower edge, or the MR image's lower percentile.

Axis convention: after ``Orientationd(axcodes="RAS")`` the array axes are MONAI's ``(C, X, Y, Z)``:
X runs from the patient's left to right, Y from posterior to anterior, Z from inferior to superior
(for an axial CT, Z is the slice axis). ``spacing`` and ``spatial_size`` are given in that order, and
networks see ``(N, C, X, Y, Z)``. Other ``axcodes`` reorder the axes the same way (each letter names
the direction its axis runs towards).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import Compose

from .intensity import WINDOW_PRESETS, PercentileRescale, WindowIntensity, _Dict

__all__ = ["CROP_MODES", "CropOrPadd", "VOLUME_INTENSITIES", "VolumeIntensityd", "volume_compose", "volume_transforms"]

VOLUME_INTENSITIES = ("ct", "mr")

_AXIS_PAIRS = ({"L", "R"}, {"A", "P"}, {"S", "I"})


def _keys(keys: str | Sequence[str]) -> list[str]:
    names = [keys] if isinstance(keys, str) else list(keys)
    if not names or not all(isinstance(k, str) and k for k in names):
        raise ValueError(f"keys={keys!r}: accepted are a key name or a non-empty list of them")
    return names


def _triple(name: str, value: Any, kind: type) -> list:
    """`value` as three positive numbers of `kind` (a single number is repeated)."""
    number = numbers.Integral if kind is int else numbers.Real
    values = [value] * 3 if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    try:
        values = list(values)
    except TypeError:
        values = None
    ok = values is not None and len(values) == 3
    ok = ok and all(isinstance(v, number) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        what = "positive ints" if kind is int else "positive numbers (mm)"
        raise ValueError(f"{name}={value!r}: accepted are three {what} in (X, Y, Z) order, or one for all three")
    return [kind(v) for v in values]


def _axcodes(axcodes: str) -> str:
    codes = axcodes.upper() if isinstance(axcodes, str) else ""
    if len(codes) != 3 or any(sum(c in pair for c in codes) != 1 for pair in _AXIS_PAIRS):
        raise ValueError(
            f"axcodes={axcodes!r}: accepted are three letters, one of L/R, one of A/P and one of S/I (e.g. 'RAS')"
        )
    return codes


def _is_ref(value: Any) -> bool:
    """A bundle-config reference (``"@spacing"``) or expression (``"$..."``), resolved when the config is parsed."""
    return isinstance(value, str) and value.startswith(("@", "$"))


def _window(window: Any) -> tuple[float, float]:
    """``(center, width)`` of a CT window given as a pair or a preset name; ValueError otherwise."""
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(f"window={window!r}: unknown preset; accepted: {sorted(WINDOW_PRESETS)} or (center, width)")
        return WINDOW_PRESETS[window]
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window={window!r}: accepted are (center, width) in HU or a preset name") from None
    if not width > 0:
        raise ValueError(f"window={window!r}: the width must be > 0 HU")
    return center, width


def _percentiles(percentiles: Any) -> tuple[float, float]:
    try:
        lower, upper = (float(v) for v in percentiles)
    except (TypeError, ValueError):
        raise ValueError(f"percentiles={percentiles!r}: accepted are (lower, upper), e.g. (1, 99)") from None
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"percentiles={percentiles!r}: accepted are 0 <= lower < upper <= 100")
    return lower, upper


class VolumeIntensityd(_Dict):
    """Maps volume intensities to [0, 1] by modality: CT by a window in Hounsfield units
    (:class:`~hmn.transforms.WindowIntensity`, clipped), MR by each channel's own percentiles
    (:class:`~hmn.transforms.PercentileRescale`, clipped). One transform for both, so that a bundle switches
    the modality with one setting (``--intensity mr``).

    Args:
        keys: keys of the volumes (``(C, X, Y, Z)``, any spatial rank).
        intensity: ``"ct"`` or ``"mr"`` (:data:`VOLUME_INTENSITIES`).
        window: CT ``(center, width)`` in HU, or a preset name of :data:`hmn.transforms.WINDOW_PRESETS`.
        percentiles: MR ``(lower, upper)``, ``0 <= lower < upper <= 100``.
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: an unknown ``intensity``, a bad window or bad percentiles (the one used), naming the value.
    """

    def __init__(self, keys: KeysCollection, intensity: str = "ct", window: str | Sequence[float] = (40.0, 400.0),
                 percentiles: Sequence[float] = (1.0, 99.0), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if intensity not in VOLUME_INTENSITIES:
            raise ValueError(f"intensity={intensity!r} is not one of {VOLUME_INTENSITIES} (CT in HU, or MR)")
        if intensity == "ct":
            center, width = _window(window)
            self.transform: Any = WindowIntensity(center, width)
        else:
            lower, upper = _percentiles(percentiles)
            # multi-sequence MR (channels from a 4D NIfTI): each on its own scale
            self.transform = PercentileRescale(lower, upper, channel_wise=True)
        self.intensity = intensity


CROP_MODES = ("crop_or_pad", "pad")


class CropOrPadd(_Dict):
    """Brings volumes to a fixed shape (``"crop_or_pad"``: MONAI's ``ResizeWithPadOrCrop``, centred), or only
    pads them to at least that shape (``"pad"``: MONAI's ``SpatialPad``, centred), as a whole study classified
    by sliding windows (:class:`hmn.inferers.SlidingWindowClassifier`) needs. Pads with 0.

    Args:
        keys: keys of the volumes ``(C, X, Y, Z)``.
        spatial_size: the shape in voxels, one int per spatial axis (or one for all).
        mode: ``"crop_or_pad"`` or ``"pad"`` (:data:`CROP_MODES`).
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: an unknown ``mode``.
    """

    def __init__(self, keys: KeysCollection, spatial_size: int | Sequence[int], mode: str = "crop_or_pad",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        from monai.transforms import ResizeWithPadOrCrop, SpatialPad

        if mode not in CROP_MODES:
            raise ValueError(f"mode={mode!r} is not one of {CROP_MODES}")
        self.mode = mode
        self.transform = ResizeWithPadOrCrop(spatial_size) if mode == "crop_or_pad" else SpatialPad(spatial_size)


def volume_transforms(
    keys: str | Sequence[str] = "image",
    spacing: float | Sequence[float] | None = (1.5, 1.5, 1.5),
    spatial_size: int | Sequence[int] = (96, 96, 96),
    intensity: str = "ct",
    window: str | Sequence[float] = (40.0, 400.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    axcodes: str = "RAS",
    crop_mode: str = "crop_or_pad",
    channels: int | str | None = None,
    assume_spacing: float | Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The CT/MR volume preprocessing as a list of MONAI bundle-config dictionaries (JSON-serialisable).

    Example, in a bundle's ``train.json``: the list this returns for ``intensity="mr"`` can be the
    ``"preprocessing"`` transforms; ``volume_compose`` gives the same as objects.

    Args:
        keys: data-dictionary key(s) holding the path of a NIfTI/Analyze file or of a folder with one
            DICOM series (images only: Spacingd interpolates bilinearly).
        spacing: output voxel size in mm, ``(X, Y, Z)`` after orientation (one number for isotropic);
            ``None`` skips resampling and keeps each file's voxel size.
        spatial_size: output shape ``(X, Y, Z)`` in voxels after orientation (one int for a cube); each
            axis is centred, cropped when longer and padded with 0 when shorter (MONAI's
            ``ResizeWithPadOrCrop``), so the field of view is ``spatial_size * spacing`` mm.
        intensity: ``"ct"``: Hounsfield units windowed with ``window`` to [0, 1] (clipped);
            ``"mr"``: each channel clipped to its own ``percentiles`` and rescaled to [0, 1].
        window: CT window as ``(center, width)`` in HU (soft tissue: ``(40, 400)`` maps -160..240 HU
            to 0..1) or a preset name from :data:`hmn.transforms.WINDOW_PRESETS`. Unused for MR.
        percentiles: MR ``(lower, upper)`` percentiles, ``0 <= lower < upper <= 100``. Unused for CT.
        axcodes: target orientation for MONAI's ``Orientationd`` (``"RAS"``: X to the patient's right,
            Y anterior, Z superior).
        crop_mode: ``"crop_or_pad"`` to ``spatial_size``, or ``"pad"`` only (a study classified by sliding
            windows keeps its whole extent; :class:`CropOrPadd`).
        channels: ``None`` (any), or the channels every file must hold (the network's ``in_channels``). Whatever
            it is, a file that is not a volume (a 2D image, a single slice) raises :class:`ImageReadError`
            naming it, as does, with ``channels``, one with another number of volumes (a 4D NIfTI).
        assume_spacing: ``None`` (default): a DICOM volume whose files do not give its voxel size (no
            PixelSpacing; no ImagePositionPatient nor SpacingBetweenSlices) raises :class:`ImageReadError`
            naming it, rather than being resampled as if its voxels were 1 mm. Or the voxel size to assume
            for what the files lack, ``(X, Y, Z)`` in mm before orientation (between columns, between rows,
            between slices) or one number; the loaded meta's ``spacing_source`` records where each came from
            (:class:`hmn.transforms.LoadXray`). The step's dictionary holds it only when given.

    Every argument but ``keys`` and ``axcodes`` may also be a bundle-config reference (``"@spacing"``) or
    expression (``"$..."``): it is passed through unchecked, and checked by the transform when the config is
    parsed (the 3D bundles' configs are written this way, :mod:`hmn.bundles`).

    Returns:
        Six dictionaries (five when ``spacing`` is None): ``hmn.transforms.LoadXrayd`` (``voi="ignore"``,
        so DICOM CT stays in HU), ``monai.transforms.Orientationd``, ``monai.transforms.Spacingd``,
        ``hmn.transforms.WindowIntensityd`` or ``hmn.transforms.PercentileRescaled``,
        ``monai.transforms.ResizeWithPadOrCropd``, ``monai.transforms.EnsureTyped``.

    Raises:
        ValueError: for an ``intensity`` other than ``"ct"``/``"mr"``, a window width <= 0 or unknown
            preset, percentiles out of order or range, malformed ``spacing``/``spatial_size``/``axcodes``
            or empty ``keys``; the message names the value and what is accepted.
    """
    names = _keys(keys)
    if not _is_ref(intensity) and intensity not in VOLUME_INTENSITIES:
        raise ValueError(f"intensity={intensity!r} is not one of {VOLUME_INTENSITIES} (CT in HU, or MR)")
    codes = _axcodes(axcodes)
    size = spatial_size if _is_ref(spatial_size) else _triple("spatial_size", spatial_size, int)
    pixdim = spacing if spacing is None or _is_ref(spacing) else _triple("spacing", spacing, float)
    if not _is_ref(window) and intensity == "ct":
        window = list(_window(window))
    if not _is_ref(percentiles) and intensity == "mr":
        percentiles = list(_percentiles(percentiles))
    if not _is_ref(crop_mode) and crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode={crop_mode!r} is not one of {CROP_MODES}")
    if assume_spacing is not None and not _is_ref(assume_spacing):
        assume_spacing = _triple("assume_spacing", assume_spacing, float)

    load = {"_target_": "hmn.transforms.LoadXrayd", "keys": names, "voi": "ignore", "spatial_dims": 3,
            "channels": channels}
    if assume_spacing is not None:  # absent otherwise, so that configs written before it stay the same
        load["assume_spacing"] = assume_spacing
    steps: list[dict[str, Any]] = [
        load,
        # labels=None: axis letters from the MetaTensor's space (RAS), MONAI's announced default
        {"_target_": "monai.transforms.Orientationd", "keys": names, "axcodes": codes, "labels": None},
    ]
    if pixdim is not None:
        steps.append({"_target_": "monai.transforms.Spacingd", "keys": names, "pixdim": pixdim, "mode": "bilinear"})
    steps += [
        {"_target_": "hmn.transforms.VolumeIntensityd", "keys": names, "intensity": intensity,
         "window": list(window) if isinstance(window, tuple) else window,
         "percentiles": list(percentiles) if isinstance(percentiles, tuple) else percentiles},
        {"_target_": "hmn.transforms.CropOrPadd", "keys": names, "spatial_size": size, "mode": crop_mode},
        {"_target_": "monai.transforms.EnsureTyped", "keys": names, "dtype": "float32"},
    ]
    return steps


def volume_compose(
    keys: str | Sequence[str] = "image",
    spacing: float | Sequence[float] | None = (1.5, 1.5, 1.5),
    spatial_size: int | Sequence[int] = (96, 96, 96),
    intensity: str = "ct",
    window: str | Sequence[float] = (40.0, 400.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    axcodes: str = "RAS",
    crop_mode: str = "crop_or_pad",
    channels: int | None = None,
    assume_spacing: float | Sequence[float] | None = None,
) -> Compose:
    """:func:`volume_transforms` instantiated by MONAI's ``ConfigParser`` into a ``Compose``.

    Args and errors are :func:`volume_transforms`'s. Called on ``{"image": path}`` it returns the
    dictionary with ``"image"`` a ``float32`` MetaTensor of shape ``(C, *spatial_size)`` whose affine
    is the resampled RAS voxel-to-world mapping.
    """
    from monai.bundle import ConfigParser

    steps = volume_transforms(keys, spacing, spatial_size, intensity, window, percentiles, axcodes, crop_mode, channels,
                              assume_spacing)
    return Compose(ConfigParser({"transforms": steps}).get_parsed_content("transforms"))
