"""Intensity normalization for radiographs and volumes, each an array transform plus a MONAI dictionary wrapper.

* :class:`PercentileRescale` - clip to the [lower, upper] percentiles and rescale to [out_min, out_max]
  (robust to the bright labels and collimator edges of radiographs).
* :class:`WindowIntensity` - a fixed window (center/width, e.g. a CT lung window) to [out_min, out_max].
* :class:`ZScoreNormalize` - subtract the mean, divide by the standard deviation.
* :class:`ImageNetNormalize` - ImageNet mean/std for pretrained backbones, repeating one channel to three.
* :class:`XRVScale` - the [-1024, 1024] scaling that TorchXRayVision models expect.

All of them keep a :class:`monai.data.MetaTensor`'s meta and return the input's type (tensor or numpy
array). In a bundle config, e.g.::

    {"_target_": "hmn.transforms.PercentileRescaled", "keys": ["image"], "lower": 0.5, "upper": 99.5}
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

__all__ = [
    "PercentileRescale",
    "PercentileRescaled",
    "WindowIntensity",
    "WindowIntensityd",
    "ZScoreNormalize",
    "ZScoreNormalized",
    "ImageNetNormalize",
    "ImageNetNormalized",
    "XRVScale",
    "XRVScaled",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WINDOW_PRESETS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (center, width) in Hounsfield units; the usual CT display windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}


def _as_tensor(img: Any) -> tuple[torch.Tensor, Any]:
    """(plain tensor, the original input) so that the result can be given the input's type and meta."""
    if isinstance(img, MetaTensor):
        return img.as_tensor(), img
    if isinstance(img, torch.Tensor):
        return img, img
    if isinstance(img, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(img)), img
    raise TypeError(f"expected a torch.Tensor, MetaTensor or numpy array, got {type(img).__name__}")


def _back(out: torch.Tensor, original: Any) -> Any:
    if isinstance(original, np.ndarray):
        return out.detach().cpu().numpy()
    if isinstance(original, MetaTensor):  # MONAI's own cheap re-wrap: shallow copies of meta and operations
        return out.as_subclass(MetaTensor).copy_meta_from(original, copy_attr=True)
    return out


def _float(img: torch.Tensor) -> torch.Tensor:
    return img if img.is_floating_point() else img.float()


def _percentiles(flat: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """numpy's default ("linear") percentiles, from one partial sort instead of ``np.percentile``'s several."""
    n = flat.size
    pos = [(n - 1) * q / 100.0 for q in (lower, upper)]
    idx = sorted({min(int(np.floor(p)) + k, n - 1) for p in pos for k in (0, 1)})
    part = np.partition(flat, idx)
    out = []
    for p in pos:
        i = int(np.floor(p))
        a, b = float(part[i]), float(part[min(i + 1, n - 1)])
        out.append(a + (p - i) * (b - a))
    return out[0], out[1]


class PercentileRescale(Transform):
    """Clips an image to its [lower, upper] percentiles and rescales that range linearly to [out_min, out_max].

    Args:
        lower: lower percentile in [0, 100].
        upper: upper percentile in [0, 100], > lower.
        out_min: output value of the lower percentile.
        out_max: output value of the upper percentile.
        clip: clip values outside the percentile range (otherwise they extrapolate linearly).
        channel_wise: percentiles per channel instead of over all channels.
    """

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        out_min: float = 0.0,
        out_max: float = 1.0,
        clip: bool = True,
        channel_wise: bool = False,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}")
        self.lower, self.upper = float(lower), float(upper)
        self.out_min, self.out_max, self.clip, self.channel_wise = float(out_min), float(out_max), clip, channel_wise

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = _percentiles(x.detach().reshape(-1).cpu().numpy(), self.lower, self.upper)
        if hi <= lo:  # constant image: map everything to out_min
            return torch.full_like(x, self.out_min)
        scale = (self.out_max - self.out_min) / float(hi - lo)
        out = torch.sub(x, float(lo))  # one new tensor, then in place: the input is never modified
        out.mul_(scale).add_(self.out_min)
        if self.clip:
            out.clamp_(min(self.out_min, self.out_max), max(self.out_min, self.out_max))
        return out

    def __call__(self, img: Any) -> Any:
        x, was_np = _as_tensor(img)
        x = _float(x)
        out = torch.stack([self._one(c) for c in x]) if self.channel_wise else self._one(x)
        return _back(out, was_np)


class WindowIntensity(Transform):
    """Maps a fixed window [center - width/2, center + width/2] linearly to [out_min, out_max], clipping outside.

    Args:
        center: window center (e.g. HU for CT), or give `preset`.
        width: window width (> 0).
        preset: a name from :data:`WINDOW_PRESETS` ("lung", "mediastinum", "soft_tissue", "bone", "brain", "liver").
        out_min: value for inputs at or below the window's lower edge.
        out_max: value for inputs at or above its upper edge.
    """

    def __init__(
        self,
        center: float | None = None,
        width: float | None = None,
        preset: str | None = None,
        out_min: float = 0.0,
        out_max: float = 1.0,
    ) -> None:
        if preset is not None:
            if preset not in WINDOW_PRESETS:
                raise ValueError(f"unknown window preset {preset!r}; accepted: {sorted(WINDOW_PRESETS)}")
            center, width = WINDOW_PRESETS[preset]
        if center is None or width is None:
            raise ValueError("give center and width, or a preset")
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        self.center, self.width, self.out_min, self.out_max = float(center), float(width), float(out_min), float(out_max)

    def __call__(self, img: Any) -> Any:
        x, was_np = _as_tensor(img)
        lo = self.center - self.width / 2.0
        out = (_float(x) - lo) * ((self.out_max - self.out_min) / self.width) + self.out_min
        out = out.clamp(min(self.out_min, self.out_max), max(self.out_min, self.out_max))
        return _back(out, was_np)


class ZScoreNormalize(Transform):
    """Subtracts the mean and divides by the standard deviation (population std, over all or per channel).

    Args:
        channel_wise: statistics per channel.
        nonzero: statistics over nonzero voxels only, leaving zeros (background) at zero.
        eps: added to the std; a constant image maps to zeros.
    """

    def __init__(self, channel_wise: bool = False, nonzero: bool = False, eps: float = 1e-8) -> None:
        self.channel_wise, self.nonzero, self.eps = channel_wise, nonzero, float(eps)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if not self.nonzero:
            mean, std = float(x.double().mean()), float(x.double().std(unbiased=False))
            return (x - mean) / (std + self.eps)
        mask = x != 0
        if not bool(mask.any()):
            return x.clone()
        vals = x[mask].double()
        mean, std = float(vals.mean()), float(vals.std(unbiased=False))
        return torch.where(mask, (x - mean) / (std + self.eps), torch.zeros_like(x))

    def __call__(self, img: Any) -> Any:
        x, was_np = _as_tensor(img)
        x = _float(x)
        if self.channel_wise:
            out = torch.stack([self._one(c) for c in x])
        else:
            out = self._one(x)
        return _back(out, was_np)


class ImageNetNormalize(Transform):
    """ImageNet mean/std normalization of a [0, 1] image for ImageNet-pretrained backbones.

    A one-channel image is repeated to three channels (``to_rgb=True``, the default) or normalized with
    the channel averages of mean and std (``to_rgb=False``); a three-channel image is normalized per
    channel. Other channel counts are rejected.

    Args:
        mean: per-channel means (RGB order).
        std: per-channel standard deviations.
        to_rgb: repeat one channel to three.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, to_rgb: bool = True
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three values each and std > 0, got mean={mean}, std={std}")
        self.mean, self.std, self.to_rgb = tuple(float(m) for m in mean), tuple(float(s) for s in std), to_rgb

    def __call__(self, img: Any) -> Any:
        x, was_np = _as_tensor(img)
        x = _float(x)
        channels = x.shape[0]
        if channels == 1 and self.to_rgb:
            x = x.repeat(3, *([1] * (x.ndim - 1)))
            channels = 3
        shape = (-1,) + (1,) * (x.ndim - 1)
        if channels == 3:
            mean = torch.tensor(self.mean, dtype=x.dtype).reshape(shape)
            std = torch.tensor(self.std, dtype=x.dtype).reshape(shape)
        elif channels == 1:
            mean = torch.tensor([sum(self.mean) / 3.0], dtype=x.dtype).reshape(shape)
            std = torch.tensor([sum(self.std) / 3.0], dtype=x.dtype).reshape(shape)
        else:
            raise ValueError(f"ImageNetNormalize expects 1 or 3 channels (channel-first), got shape {tuple(x.shape)}")
        return _back((x - mean) / std, was_np)


class XRVScale(Transform):
    """Scales [in_min, in_max] linearly to [-1024, 1024], the input range of TorchXRayVision models.

    TorchXRayVision's ``normalize(img, maxval)`` computes ``(2 * img / maxval - 1) * 1024``; with the
    defaults (``in_min=0, in_max=1``) this is the same for an image already rescaled to [0, 1].

    Args:
        in_min: input value mapped to -1024.
        in_max: input value mapped to +1024.
        clip: clip the output to [-1024, 1024].
    """

    def __init__(self, in_min: float = 0.0, in_max: float = 1.0, clip: bool = False) -> None:
        if in_max <= in_min:
            raise ValueError(f"in_max must be > in_min, got in_min={in_min}, in_max={in_max}")
        self.in_min, self.in_max, self.clip = float(in_min), float(in_max), clip

    def __call__(self, img: Any) -> Any:
        x, was_np = _as_tensor(img)
        out = ((_float(x) - self.in_min) * (2.0 / (self.in_max - self.in_min)) - 1.0) * 1024.0
        if self.clip:
            out = out.clamp(-1024.0, 1024.0)
        return _back(out, was_np)


class _Dict(MapTransform):
    """Applies the array transform built in the subclass to every key."""

    transform: Transform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class PercentileRescaled(_Dict):
    """Dictionary wrapper of :class:`PercentileRescale`."""

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        out_min: float = 0.0,
        out_max: float = 1.0,
        clip: bool = True,
        channel_wise: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = PercentileRescale(lower, upper, out_min, out_max, clip, channel_wise)


class WindowIntensityd(_Dict):
    """Dictionary wrapper of :class:`WindowIntensity`."""

    def __init__(
        self,
        keys: KeysCollection,
        center: float | None = None,
        width: float | None = None,
        preset: str | None = None,
        out_min: float = 0.0,
        out_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = WindowIntensity(center, width, preset, out_min, out_max)


class ZScoreNormalized(_Dict):
    """Dictionary wrapper of :class:`ZScoreNormalize`."""

    def __init__(
        self,
        keys: KeysCollection,
        channel_wise: bool = False,
        nonzero: bool = False,
        eps: float = 1e-8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ZScoreNormalize(channel_wise, nonzero, eps)


class ImageNetNormalized(_Dict):
    """Dictionary wrapper of :class:`ImageNetNormalize`."""

    def __init__(
        self,
        keys: KeysCollection,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        to_rgb: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ImageNetNormalize(mean, std, to_rgb)


class XRVScaled(_Dict):
    """Dictionary wrapper of :class:`XRVScale`."""

    def __init__(
        self,
        keys: KeysCollection,
        in_min: float = 0.0,
        in_max: float = 1.0,
        clip: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = XRVScale(in_min, in_max, clip)
