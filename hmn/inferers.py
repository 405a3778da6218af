"""Inferers for :class:`monai.engines.SupervisedEvaluator` that MONAI lacks: study-level sliding-window classification.

:class:`SlidingWindowClassifier` runs a classifier trained on patches (crops of ``roi_size``) over a
whole CT/MR volume or a large 2D image and pools the per-patch logits into one row per study. In a
bundle config::

    "inferer": {"_target_": "hmn.inferers.SlidingWindowClassifier", "roi_size": [96, 96, 96],
                "overlap": 0.25, "aggregate": "max"}
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import Inferer

__all__ = ["AGGREGATES", "PADDING_MODES", "SlidingWindowClassifier"]

AGGREGATES = ("mean", "max")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class SlidingWindowClassifier(Inferer):
    """Classifies a whole study by running a patch classifier over sliding windows and pooling the logits.

    The input ``(N, C, X, Y, Z)`` (or 2D ``(N, C, H, W)``) is cut into windows of ``roi_size`` placed as
    MONAI's ``sliding_window_inference`` places them (its stride ``int(roi * (1 - overlap))``, at least
    1; MONAI's ``dense_patch_slices`` for the window starts, the last one shifted back inside the
    image). An input smaller than ``roi_size`` along an axis is first padded on both sides to it, as
    MONAI pads (``padding_mode``, ``cval``). The network runs on batches of ``sw_batch_size`` windows,
    each returning ``(windows, num_classes)`` logits, and the windows' logits of each input are pooled
    into one ``(num_classes,)`` row:

    * ``"max"``: for findings present in one region (a nodule, a haemorrhage, a fracture): the study is
      as positive as its most positive window. Sigmoid is monotonic, so this is also the maximum
      per-window probability.
    * ``"mean"``: for diffuse findings spread over the volume (emphysema, fibrosis, oedema). The mean
      is over logits, not probabilities, every window counting once (no importance weighting); the
      windows overlap more near the image edges, where the last window is shifted inward.

    Why not MONAI's own: ``monai.inferers.SlidingWindowInferer`` (MONAI 1.6) stitches dense outputs
    back into an image: it allocates an output of the input's spatial size, weights every window's
    output by an importance map resized to the output's spatial shape, and averages overlaps. A
    classifier's ``(N, num_classes)`` output has no spatial axes, so it fails there
    (``F.interpolate``: input and output must have the same number of spatial dimensions), and there
    is no pooling of windows into one row, let alone a maximum.

    Args:
        roi_size: window size in voxels, one positive int per spatial axis in the input's order
            (``(X, Y, Z)`` for volumes from :func:`hmn.transforms.volume_transforms`), or one int for all.
            Use the crop size the network was trained on.
        overlap: fraction in ``[0, 1)`` by which neighbouring windows overlap, one for all axes or one per axis.
        aggregate: ``"mean"`` or ``"max"`` over the windows of each input (see above).
        sw_batch_size: windows per network call (windows of different inputs of the batch may share a call).
        padding_mode: how an input smaller than ``roi_size`` is padded: ``"constant"`` (with ``cval``),
            ``"reflect"``, ``"replicate"`` or ``"circular"`` (``torch.nn.functional.pad`` modes).
        cval: value of constant padding (0 is the lowest value after the volume pipeline's normalisation).
        sw_device: device the windows are run on (default: the input's).
        device: device of the returned logits (default: the input's).

    Returns (from ``__call__``):
        ``(N, num_classes)`` logits, a plain tensor of the network's dtype.

    Raises:
        ValueError: at construction, for a non-positive or non-integer ``roi_size``, ``overlap`` outside
            ``[0, 1)``, an ``aggregate`` or ``padding_mode`` not listed above, or ``sw_batch_size`` < 1;
            at call, for an input that is not ``(N, C, H, W)`` or ``(N, C, X, Y, Z)``, a ``roi_size`` or
            ``overlap`` with another number of axes, or a network output that is not ``(windows, classes)``.
        TypeError: if the network returns something other than a tensor.
    """

    def __init__(
        self,
        roi_size: int | Sequence[int],
        overlap: float | Sequence[float] = 0.25,
        aggregate: str = "mean",
        sw_batch_size: int = 4,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        roi = [roi_size] if _is_int(roi_size) else roi_size
        try:
            roi = list(roi)
        except TypeError:
            roi = []
        if not roi or not all(_is_int(v) and v > 0 for v in roi):
            raise ValueError(f"roi_size={roi_size!r}: accepted are a positive int or one per spatial axis")
        overlaps = [overlap] if isinstance(overlap, numbers.Real) and not isinstance(overlap, bool) else overlap
        try:
            overlaps = [float(o) for o in overlaps]
        except (TypeError, ValueError):
            overlaps = []
        if not overlaps or not all(0.0 <= o < 1.0 for o in overlaps):
            raise ValueError(f"overlap={overlap!r}: accepted is a fraction in [0, 1), one for all axes or one per axis")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={aggregate!r} is not one of {AGGREGATES}")
        if not (_is_int(sw_batch_size) and sw_batch_size >= 1):
            raise ValueError(f"sw_batch_size={sw_batch_size!r}: accepted is an int >= 1")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
        self.roi_size, self.overlap, self.aggregate = tuple(int(v) for v in roi), tuple(overlaps), aggregate
        self.sw_batch_size, self.padding_mode, self.cval = int(sw_batch_size), padding_mode, float(cval)
        self.sw_device, self.device = sw_device, device

    def _per_axis(self, name: str, values: tuple, dims: int, shape: Sequence[int]) -> tuple:
        if len(values) == 1:
            return values * dims
        if len(values) != dims:
            raise ValueError(
                f"{name}={values} has {len(values)} axes but the input {tuple(shape)} has {dims} spatial axes"
            )
        return values

    def windows(self, spatial_shape: Sequence[int]) -> tuple[list[int], list[tuple[slice, ...]]]:
        """Padding and windows for an input of `spatial_shape`.

        Returns:
            ``(pad, slices)``: ``pad`` in ``torch.nn.functional.pad`` order (last axis first, before and
            after each), and the windows as slices into the padded array's spatial axes.
        """
        dims = len(spatial_shape)
        roi = self._per_axis("roi_size", self.roi_size, dims, spatial_shape)
        overlap = self._per_axis("overlap", self.overlap, dims, spatial_shape)
        pad: list[int] = []
        for size, r in zip(reversed(spatial_shape), reversed(roi)):
            short = max(r - size, 0)
            pad += [short // 2, short - short // 2]
        padded = [max(s, r) for s, r in zip(spatial_shape, roi)]
        stride = [r if r == s else max(int(r * (1.0 - o)), 1) for s, r, o in zip(padded, roi, overlap)]
        return pad, dense_patch_slices(padded, roi, stride)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """Study-level logits ``(N, num_classes)`` of `network` over the windows of `inputs` ``(N, C, *spatial)``.

        ``args`` and ``kwargs`` are passed to every network call.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.ndim not in (4, 5):
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"inputs of shape {shape}: accepted are (N, C, H, W) or (N, C, X, Y, Z) tensors")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        pad, slices = self.windows(tuple(x.shape[2:]))
        if any(pad):
            kw = {"value": self.cval} if self.padding_mode == "constant" else {}
            x = F.pad(x, pad, mode=self.padding_mode, **kw)
        n, per = x.shape[0], len(slices)
        sw_device = self.sw_device if self.sw_device is not None else x.device
        chunks = []
        for start in range(0, n * per, self.sw_batch_size):
            idx = range(start, min(start + self.sw_batch_size, n * per))
            batch = torch.cat([x[(slice(i // per, i // per + 1), slice(None), *slices[i % per])] for i in idx])
            out = network(batch.to(sw_device), *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"the network returned {type(out).__name__}; SlidingWindowClassifier expects a "
                    "(windows, num_classes) logits tensor"
                )
            if out.ndim != 2 or out.shape[0] != len(idx):
                raise ValueError(
                    f"the network returned shape {tuple(out.shape)} for {len(idx)} windows; SlidingWindowClassifier "
                    "expects (windows, num_classes) logits (for dense outputs use monai.inferers.SlidingWindowInferer)"
                )
            chunks.append(out)
        logits = torch.cat(chunks).reshape(n, per, -1)
        pooled = logits.mean(dim=1) if self.aggregate == "mean" else logits.amax(dim=1)
        device = self.device if self.device is not None else inputs.device
        return pooled.to(device)
