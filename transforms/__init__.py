"""MONAI dictionary transforms for medical image loading and intensity normalization (installed as ``hmn.transforms``).

Loading: :class:`LoadXray` / :class:`LoadXrayd` (DICOM, PNG/JPEG/TIFF, NIfTI, DICOM series folders).
Intensity: :class:`PercentileRescale`, :class:`WindowIntensity`, :class:`ZScoreNormalize`,
:class:`ImageNetNormalize`, :class:`XRVScale`, each with a ``...d`` dictionary wrapper usable from a
bundle config as ``{"_target_": "hmn.transforms.<Name>d", "keys": ["image"], ...}``.
Volumes (CT/MR): :func:`volume_transforms` (bundle-config list) and :func:`volume_compose` (``Compose``):
load -> RAS orientation -> resampling -> CT window or MR percentiles -> fixed size.
"""

from __future__ import annotations

from .intensity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WINDOW_PRESETS,
    ImageNetNormalize,
    ImageNetNormalized,
    PercentileRescale,
    PercentileRescaled,
    WindowIntensity,
    WindowIntensityd,
    XRVScale,
    XRVScaled,
    ZScoreNormalize,
    ZScoreNormalized,
)
from .loading import COLOR_MODES, VOI_MODES, ImageReadError, LoadXray, LoadXrayd, sniff_format
from .volume import CROP_MODES, VOLUME_INTENSITIES, CropOrPadd, VolumeIntensityd, volume_compose, volume_transforms

__all__ = [
    "COLOR_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VOI_MODES",
    "VOLUME_INTENSITIES",
    "WINDOW_PRESETS",
    "ImageNetNormalize",
    "ImageNetNormalized",
    "ImageReadError",
    "LoadXray",
    "LoadXrayd",
    "PercentileRescale",
    "PercentileRescaled",
    "WindowIntensity",
    "WindowIntensityd",
    "XRVScale",
    "XRVScaled",
    "ZScoreNormalize",
    "ZScoreNormalized",
    "sniff_format",
    "CROP_MODES",
    "CropOrPadd",
    "VolumeIntensityd",
    "volume_compose",
    "volume_transforms",
]
