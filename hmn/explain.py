"""Heatmaps: where a HybridMedNet saw each finding.

* :func:`gradcam` / :func:`gradcam_pairs`: Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from
  Deep Networks via Gradient-based Localization", ICCV 2017) through MONAI's
  :class:`monai.visualize.GradCAM`, on the pyramid levels after attention, which the adaptive fusion
  pools and weighs into the vector the head reads. One map per (image, finding), at the input's
  resolution, scaled to [0, 1].
* :func:`attention_rollout`: attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in
  Transformers", ACL 2020) through the ``self`` and ``cross_scale`` attention stages; one class-agnostic
  map per image.
* :func:`render_overlay`, :func:`write_heatmaps`: an overlay PNG (the map over the grey image, the finding
  and its probability in the picture) and the raw map as ``.npy``, named by :func:`heatmap_id`, a hash
  of the input path: never a DICOM attribute, and nothing but the finding and its probability is drawn.
* :class:`SourceGeometry`, :func:`maps_to_source`: the maps taken back from the network's input (after the
  loader's resize with ``aspect`` ``stretch``/``pad``/``crop``) to the source file's rows x columns, so that
  ``map[r, c]`` is about pixel ``(r, c)`` of the DICOM/PNG file (``geometry="source"``; see
  :func:`maps_to_source` for what the parts of the file the network did not see hold).
* ``python -m hmn explain IMAGE --bundle-root DIR`` (:func:`explain_main`): the same for one file, with the
  network rebuilt from the bundle (its run record and ``models/model.pt``); the bundles' inference takes
  ``--heatmaps True`` (:class:`hmn.handlers.HeatmapWriter`).

Why the finest level by default: in HybridMedNet every path from a pyramid level to the logits goes
through the fusion's spatial mean, so the gradient of a logit with respect to a level's map is the same
at every position and Grad-CAM there is exactly the level's first-order contribution to the logit at
each position. The levels differ only in resolution (stride 8, 16, 32). ``levels="all"`` sums the
levels' maps as contributions per input pixel (each weighted by its positions' share of the image);
``levels="finest"`` uses the stride-8 level alone. The heatmap benchmark (``benchmarks/bench_heatmaps.py``,
BENCHMARKS.md) measured how often each one's peak falls inside the drawn lesion on the demo data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from monai.visualize.visualizer import default_upsampler

from hmn.inference import DICOM_UID_COLUMNS

__all__ = [
    "GRADCAM_LEVELS",
    "HEATMAP_GEOMETRIES",
    "HEATMAP_INDEX_COLUMNS",
    "ROLLOUT_MODES",
    "SourceGeometry",
    "append_index",
    "attention_rollout",
    "check_index",
    "explain_main",
    "find_loader",
    "gradcam",
    "gradcam_pairs",
    "heatmap_id",
    "index_to_source",
    "load_bundle_network",
    "maps_to_source",
    "render_overlay",
    "resolve_findings",
    "resolve_thresholds",
    "write_heatmaps",
]

logger = logging.getLogger(__name__)

GRADCAM_LEVELS = ("finest", "all")
ROLLOUT_MODES = ("self", "cross_scale")
# "input": the maps (and the overlay's picture) at the network input's size, as the network saw the image (after the
# loader's resize, pad or crop); "source": at the source file's rows x columns (SourceGeometry, maps_to_source)
HEATMAP_GEOMETRIES = ("input", "source")
# heatmaps.csv: the DICOM UIDs (hmn.inference.DICOM_UID_COLUMNS; "" for a file that is not DICOM) after the id, as
# predictions.csv has them after "error"; "geometry" says which of HEATMAP_GEOMETRIES the row's files are in
HEATMAP_INDEX_COLUMNS = ("image", "id", *DICOM_UID_COLUMNS, "finding", "probability", "threshold", "geometry", "png",
                         "npy")


# ----------------------------------------------------------------------------------------------- Grad-CAM


def _check_network(network: nn.Module) -> list[int]:
    """The strides of the pyramid levels the attention returns, finest first; TypeError for another network."""
    attention, levels = getattr(network, "attention", None), getattr(network, "levels", None)
    strides = getattr(getattr(network, "backbone", None), "strides", None)
    if not isinstance(attention, nn.Module) or levels is None or strides is None:
        raise TypeError(
            f"heatmaps need a HybridMedNet (a network with .attention returning the pyramid levels, .levels and "
            f".backbone.strides), got {type(network).__name__}"
        )
    return [int(strides[i]) for i in levels]


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be an N, C, H, W tensor, got {shape}")


class _Taps(nn.Module):
    """The network, with one identity module per pyramid level that the attention's output passes through
    (``taps.0`` the finest), so that MONAI's hooks can name the levels as layers."""

    def __init__(self, network: nn.Module, num_levels: int) -> None:
        super().__init__()
        self.network = network
        self.taps = nn.ModuleList(nn.Identity() for _ in range(num_levels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


@contextlib.contextmanager
def _tapped(network: nn.Module, num_levels: int) -> Iterator[_Taps]:
    """`network` wrapped in :class:`_Taps` for the duration; the hook on its attention is removed afterwards."""
    wrapper = _Taps(network, num_levels)
    wrapper.train(network.training)  # MONAI's hooks restore the wrapper's mode, and with it the network's

    def route(_module: nn.Module, _inputs: Any, output: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(output) != num_levels:
            raise RuntimeError(f"the attention returned {len(output)} levels, expected {num_levels}")
        return [tap(f) for tap, f in zip(wrapper.taps, output)]

    handle = network.attention.register_forward_hook(route)
    try:
        yield wrapper
    finally:
        handle.remove()


class _PairScores(ModelWithHooks):
    """MONAI's ModelWithHooks scoring each sample by its own class (``class_idx`` holds one class per
    sample), so that one backward pass gives the maps of many (image, finding) pairs. Samples do not
    interact in evaluation mode, so each sample's gradients are those of its own score."""

    def class_score(self, logits: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return logits.gather(1, class_idx.view(-1, 1)).squeeze(1)


def _unit_max(maps: torch.Tensor) -> torch.Tensor:
    """Each ``M, 1, *spatial`` map divided by its maximum; a map without positive values becomes zeros."""
    flat = maps.flatten(1)
    peak = flat.amax(1, keepdim=True)
    out = torch.where(peak > 0, flat / peak.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.clamp_(0.0, 1.0).view_as(maps)


def gradcam_pairs(
    network: nn.Module,
    x: torch.Tensor,
    image_index: Sequence[int] | torch.Tensor,
    class_index: Sequence[int] | torch.Tensor,
    levels: str = "finest",
    batch_size: int = 8,
) -> torch.Tensor:
    """Grad-CAM maps for chosen (image, finding) pairs.

    Args:
        network: a :class:`~hmn.networks.HybridMedNet` (put in evaluation mode for the computation, then
            restored; its parameters' ``.grad`` are cleared afterwards).
        x: ``N, C, H, W`` input batch, preprocessed as for the network.
        image_index: ``M`` indices into `x`.
        class_index: ``M`` class indices in ``[0, network.num_classes)`` (the fine classes of a hierarchical head).
        levels: ``"finest"`` (the stride-8 pyramid level after attention) or ``"all"`` (every level's map
            upsampled and summed as a contribution per input pixel).
        batch_size: pairs per forward/backward pass.

    Returns:
        ``M, H, W`` float32 tensor on ``x.device``, each map scaled to [0, 1] by its maximum (all zeros
        when nothing in the image speaks for the finding).

    Raises:
        ValueError: `x` is not 4-D, the index lists differ in length or hold out-of-range values, `levels`
            is not one of :data:`GRADCAM_LEVELS`, or `batch_size` < 1.
        TypeError: `network` is not a HybridMedNet.
    """
    strides = _check_network(network)
    _check_input(x)
    if levels not in GRADCAM_LEVELS:
        raise ValueError(f"levels must be one of {GRADCAM_LEVELS}, got {levels!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    img = torch.as_tensor(image_index, dtype=torch.long).reshape(-1).cpu()
    cls = torch.as_tensor(class_index, dtype=torch.long).reshape(-1).cpu()
    if img.numel() != cls.numel():
        raise ValueError(f"image_index and class_index differ in length ({img.numel()} and {cls.numel()})")
    n, num_classes = x.shape[0], int(getattr(network, "num_classes", 0)) or None
    if img.numel() and (int(img.min()) < 0 or int(img.max()) >= n):
        raise ValueError(f"image_index values must lie in [0, {n}), got {img.tolist()}")
    if cls.numel() and (int(cls.min()) < 0 or (num_classes is not None and int(cls.max()) >= num_classes)):
        raise ValueError(f"class_index values must lie in [0, {num_classes}), got {cls.tolist()}")
    out = torch.zeros((img.numel(), *x.shape[2:]), dtype=torch.float32, device=x.device)
    if not img.numel():
        return out
    names = [f"taps.{i}" for i in (range(len(strides)) if levels == "all" else [0])]
    area = float(np.prod(x.shape[2:]))
    try:
        with _tapped(network, len(strides)) as wrapper, torch.enable_grad():
            cam = GradCAM(
                _PairScores(wrapper, names, register_forward=True, register_backward=True),
                target_layers=names, upsampler=default_upsampler, postprocessing=_unit_max,
            )
            for start in range(0, img.numel(), int(batch_size)):
                i = img[start : start + int(batch_size)]
                # a leaf that requires grad, so the hooks fire even when the parameters are frozen
                xb = x[i.to(x.device)].detach().float().requires_grad_(True)
                cb = cls[start : start + int(batch_size)].to(x.device)
                if levels == "finest":
                    maps = cam(xb, class_idx=cb, layer_idx=0)
                else:
                    # each level's Grad-CAM as a contribution per input pixel: its positions cover
                    # area / positions pixels each, so weigh the upsampled map by positions / area
                    total = 0.0
                    for layer, _stride in enumerate(strides):
                        raw = cam.compute_map(xb, class_idx=cb, layer_idx=layer)
                        positions = float(np.prod(raw.shape[2:]))
                        total = total + cam.upsampler(xb.shape[2:])(raw) * (positions / area)
                    maps = _unit_max(total)
                out[start : start + i.numel()] = maps[:, 0].detach().float()
    finally:
        network.zero_grad(set_to_none=True)
    return out


def gradcam(
    network: nn.Module,
    x: torch.Tensor,
    class_indices: Sequence[int] | None = None,
    levels: str = "finest",
    batch_size: int = 8,
) -> torch.Tensor:
    """Grad-CAM maps of every image in `x` for each chosen finding.

    Args:
        network: a :class:`~hmn.networks.HybridMedNet`.
        x: ``N, C, H, W`` input batch, preprocessed as for the network.
        class_indices: ``K`` class indices (``None``: every class, ``K = network.num_classes``).
        levels: ``"finest"`` or ``"all"`` (see :func:`gradcam_pairs`).
        batch_size: (image, finding) pairs per forward/backward pass.

    Returns:
        ``N, K, H, W`` float32 tensor on ``x.device`` with values in [0, 1] (each map divided by its maximum;
        a map with no positive evidence is all zeros).

    Raises:
        ValueError, TypeError: as :func:`gradcam_pairs`.
    """
    _check_network(network)
    _check_input(x)
    k_all = list(range(int(network.num_classes))) if class_indices is None else [int(c) for c in class_indices]
    n, k = x.shape[0], len(k_all)
    img = torch.arange(n).repeat_interleave(k)
    cls = torch.tensor(k_all, dtype=torch.long).repeat(n)
    return gradcam_pairs(network, x, img, cls, levels=levels, batch_size=batch_size).view(n, k, *x.shape[2:])


# ----------------------------------------------------------------------------------------------- rollout


def _pool_matrix(size: Sequence[int], context_size: int | None, device: torch.device) -> torch.Tensor:
    """``T_ctx, T`` matrix of the key/value pooling (:func:`hmn.networks._utils.pool_to_at_most`): row ``j``
    holds the weights with which pooled token ``j`` averages the map's positions."""
    from hmn.networks._utils import pool_to_at_most

    t = int(np.prod(size))
    basis = torch.eye(t, device=device).view(t, 1, *size)
    return pool_to_at_most(basis, context_size).reshape(t, -1).T.contiguous()


def _attention_probs(attn: nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``N, T, T_ctx`` attention weights of a multi-head projection module, averaged over heads (what
    its ``scaled_dot_product_attention`` computes internally and does not return)."""
    n, t, c = queries.shape
    h = int(attn.num_heads)
    q = attn.q(queries).view(n, t, h, c // h).transpose(1, 2)
    k = attn.kv(context).view(n, context.shape[1], 2, h, c // h)[:, :, 0].transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1).mean(1)


@torch.no_grad()
def attention_rollout(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention rollout through HybridMedNet's ``self`` and ``cross_scale`` attention stages.

    The tokens are the positions of every pyramid level. Each stage's attention (averaged over heads, its
    pooled keys mapped back to the positions they average) is mixed with the identity for the residual
    connection, ``0.5 A + 0.5 I`` as in Abnar & Zuidema (2020); the stages' matrices are multiplied in
    order, and the product is read out as the fusion reads the levels (each level's positions averaged,
    weighted by the fusion's per-image level weights). Each level's share is spread over the pixels its
    positions cover and the levels are summed. The map is class-agnostic: it says which positions the
    attention routed into the pooled features, not where a particular finding is (use :func:`gradcam`).
    It covers only HybridMedNet's attention stages, not attention inside a backbone (Swin's windows).

    A CBAM stage is skipped (identity): it gates each position by its own channel and spatial statistics
    and moves no information between positions, so it has nothing to roll out. A network whose attention
    is only ``cbam`` or ``none`` has no rollout at all.

    Args:
        network: a :class:`~hmn.networks.HybridMedNet` whose attention modes include ``"self"`` or
            ``"cross_scale"`` (:data:`ROLLOUT_MODES`).
        x: ``N, C, H, W`` input batch.

    Returns:
        ``N, 1, H, W`` float32 tensor on ``x.device``, each map divided by its maximum (values in [0, 1]).

    Raises:
        ValueError: the network has no ``self`` or ``cross_scale`` stage (the message says why rollout needs
            one), or `x` is not 4-D.
        TypeError: `network` is not a HybridMedNet.
    """
    from hmn.networks.attention import CrossScaleAttention, PerScale, ScaleSelfAttention

    strides = _check_network(network)
    _check_input(x)
    modes = list(getattr(network.attention, "modes", []))
    if not any(m in ROLLOUT_MODES for m in modes):
        raise ValueError(
            f"attention rollout needs attention between positions ('self' or 'cross_scale'); this network's "
            f"attention is {modes or ['none']}: CBAM gates each position by its own statistics and moves nothing "
            "between positions, so there is no attention flow to roll out. Use Grad-CAM instead (hmn.explain.gradcam; "
            "python -m hmn explain without --rollout)"
        )
    stages = list(network.attention.stages)
    captured: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    shapes: list[tuple[int, ...]] = []
    handles = []

    def keep(key: tuple[int, int]):
        def hook(_module: nn.Module, inputs: tuple, _output: Any) -> None:
            captured[key] = (inputs[0].detach(), inputs[1].detach())

        return hook

    for s, stage in enumerate(stages):
        if isinstance(stage, CrossScaleAttention):
            handles += [a.register_forward_hook(keep((s, i))) for i, a in enumerate(stage.attn)]
        elif isinstance(stage, PerScale) and all(isinstance(b, ScaleSelfAttention) for b in stage.blocks):
            handles += [b.attn.register_forward_hook(keep((s, i))) for i, b in enumerate(stage.blocks)]
    handles.append(network.attention.register_forward_pre_hook(
        lambda _m, inputs: shapes.extend(tuple(f.shape[2:]) for f in inputs[0])))
    train = network.training
    network.eval()
    try:
        network(x)
    finally:
        network.train(train)
        for h in handles:
            h.remove()
    weights = getattr(network.fusion, "last_weights", None)
    n, dev = x.shape[0], x.device
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    total = offsets[-1]
    eye = torch.eye(total, device=dev).expand(n, total, total)
    rollout = eye.clone()
    for s, stage in enumerate(stages):
        if isinstance(stage, CrossScaleAttention):
            pools = [_pool_matrix(shape, stage.context_size, dev) for shape in shapes]
        elif isinstance(stage, PerScale) and all(isinstance(b, ScaleSelfAttention) for b in stage.blocks):
            pools = [_pool_matrix(shape, b.context_size, dev) for shape, b in zip(shapes, stage.blocks)]
        else:
            continue  # CBAM: no flow between positions
        mix = 0.5 * eye.clone()
        for i in range(len(shapes)):
            queries, context = captured[(s, i)]
            attn = stage.attn[i] if isinstance(stage, CrossScaleAttention) else stage.blocks[i].attn
            probs = _attention_probs(attn, queries, context)  # N, T_i, T_ctx
            rows = slice(offsets[i], offsets[i + 1])
            sources = [j for j in range(len(shapes)) if j != i] if isinstance(stage, CrossScaleAttention) else [i]
            col = 0
            for j in sources:
                width = pools[j].shape[0]
                mix[:, rows, offsets[j] : offsets[j + 1]] += 0.5 * probs[:, :, col : col + width] @ pools[j]
                col += width
        rollout = mix @ rollout
    level_w = weights.to(dev) if weights is not None else torch.full((n, len(shapes)), 1.0 / len(shapes), device=dev)
    readout = torch.cat([level_w[:, i : i + 1].expand(n, t) / t for i, t in enumerate(sizes)], dim=1)  # N, T
    relevance = (readout.unsqueeze(1) @ rollout).squeeze(1)  # N, T: share of each input position
    area = float(np.prod(x.shape[2:]))
    up = default_upsampler(x.shape[2:])
    image = 0.0
    for i, (shape, t) in enumerate(zip(shapes, sizes)):
        density = relevance[:, offsets[i] : offsets[i + 1]].reshape(n, 1, *shape) * (t / area)
        image = image + up(density)
    return _unit_max(image.float())


# ----------------------------------------------------------------------------------------------- source geometry


def find_loader(preprocessing: Any) -> Any:
    """The :class:`hmn.transforms.LoadXray` that made the network's input: `preprocessing` itself, the loader of a
    :class:`hmn.transforms.LoadXrayd`, or that of the first one in a MONAI ``Compose`` (the bundles'
    ``preprocessing``). ValueError when there is none (a source geometry needs to know how the file was resized)."""
    from hmn.transforms import LoadXray, LoadXrayd

    if isinstance(preprocessing, LoadXray):
        return preprocessing
    if isinstance(preprocessing, LoadXrayd):
        return preprocessing.loader
    for t in getattr(preprocessing, "transforms", None) or ():
        if isinstance(t, (LoadXray, LoadXrayd)):
            return find_loader(t)
    raise ValueError(
        f"heatmaps in the source geometry need the hmn.transforms.LoadXray(d) that loaded and resized the images (the "
        f"inference preprocessing), got {type(preprocessing).__name__} without one; use geometry='input'"
    )


def index_to_source(input_affine: Any, source_affine: Any, spatial_dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis ``(scale, offset)`` with ``source_index = scale * input_index + offset``, from the affines (index to
    world) of the network's input and of the source image as loaded at its own size: ``inv(source) @ input``.

    Raises:
        ValueError: the map between the two grids is not a scaling and shift per axis (a rotation or a shear: no
            transform of this project's loader makes one).
    """
    a_in = np.asarray(torch.as_tensor(input_affine, dtype=torch.float64).cpu(), dtype=np.float64)
    a_src = np.asarray(torch.as_tensor(source_affine, dtype=torch.float64).cpu(), dtype=np.float64)
    m = np.linalg.solve(a_src, a_in)
    d = int(spatial_dims)
    lin, shift = m[:d, :d], m[:d, -1]
    scale = np.diag(lin).copy()
    if np.abs(lin - np.diag(scale)).max() > 1e-6 * max(1.0, np.abs(scale).max()) or np.any(np.abs(scale) < 1e-12):
        raise ValueError(f"the network input's grid is not a scaled and shifted copy of the source's (index map "
                         f"{np.round(m, 6).tolist()}): it cannot be taken back to the source geometry")
    return scale, shift.copy()


def _axis_weights(n_src: int, n_in: int, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """``n_src, n_in`` linear-interpolation weights of one axis and the mask of the source positions in view."""
    src = np.arange(n_src, dtype=np.float64)
    y = (src - offset) / scale  # each source pixel's centre on the input's grid
    # the source's extent on the input grid: a pad's border (the image's minimum) is not part of the image, so the
    # samples stay within the first and last input pixels whose centres lie on the image, as they do at the edges
    # of a stretched image
    tol = 1e-6
    edges = np.sort([(-0.5 - offset) / scale, (n_src - 0.5 - offset) / scale])
    lo = min(max(0.0, float(np.ceil(edges[0] - tol))), n_in - 1.0)
    hi = max(min(n_in - 1.0, float(np.floor(edges[1] + tol))), lo)
    seen = (y >= -0.5 - tol) & (y <= n_in - 0.5 + tol)  # a crop's lost margins are outside the network's view
    yc = np.clip(y, lo, hi)
    i0 = np.clip(np.floor(yc).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = yc - i0
    weights = np.zeros((n_src, n_in), dtype=np.float64)
    rows = np.arange(n_src)
    np.add.at(weights, (rows, i0), 1.0 - w1)
    np.add.at(weights, (rows, i1), w1)
    return weights, seen


def maps_to_source(
    maps: np.ndarray | torch.Tensor, source_shape: Sequence[int], scale: Sequence[float], offset: Sequence[float]
) -> np.ndarray:
    """Maps at the network input's size taken back to the source image's rows x columns.

    Each source pixel's centre is placed on the input's grid through the loader's resize (and pad or crop),
    ``input_index = (source_index - offset) / scale`` (:func:`index_to_source`), and the map is read there by
    linear interpolation, held at the image's first and last input pixels at the edges (for ``stretch`` this is
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`` to the source's size). So
    ``out[k, r, c]`` refers to pixel ``(r, c)`` of the file:

    * ``aspect="pad"``: the padding (the border the loader added) is left out, every source pixel has a value;
    * ``aspect="crop"``: the margins the centre crop cut off were never seen by the network and hold **NaN**
      (not 0: zero would claim "no evidence here", where the network had no view at all; ``np.nanmax`` and the
      like skip them, and the overlay leaves them uncoloured inside a dashed frame of the network's view).

    Values stay those of the input's map (in [0, 1]): they are not divided by the maximum again, so a peak
    that falls between source pixel centres reads slightly below 1.

    Args:
        maps: ``K, H, W`` (or ``H, W``) maps at the network input's size.
        source_shape: the source's ``rows, columns``.
        scale, offset: per axis, ``source_index = scale * input_index + offset`` (:func:`index_to_source`).

    Returns:
        ``K, rows, columns`` (or ``rows, columns``) float32.
    """
    arr = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    single = arr.ndim == 2
    arr = arr[None] if single else arr
    if arr.ndim != 3 or len(source_shape) != 2 or len(scale) != 2 or len(offset) != 2:
        raise ValueError(f"maps must be K, H, W (or H, W) with a 2D source_shape, scale and offset; got maps "
                         f"{arr.shape}, source_shape {tuple(source_shape)}, scale {tuple(scale)}, "
                         f"offset {tuple(offset)}")
    (rows, cols), (h, w) = (int(v) for v in source_shape), arr.shape[1:]
    wr, seen_r = _axis_weights(rows, h, float(scale[0]), float(offset[0]))
    wc, seen_c = _axis_weights(cols, w, float(scale[1]), float(offset[1]))
    wr, wc = wr.astype(np.float32), wc.astype(np.float32)
    out = np.empty((arr.shape[0], rows, cols), dtype=np.float32)
    for k, m in enumerate(arr.astype(np.float32)):  # one map at a time: a source map may be millions of pixels
        out[k] = wr @ m @ wc.T
    out[:, ~seen_r, :] = np.nan
    out[:, :, ~seen_c] = np.nan
    return out[0] if single else out


class SourceGeometry:
    """Takes heatmaps from the network's input back to each source file's own rows x columns
    (``geometry="source"``): loads the file again at its own size with the preprocessing's loader (the same
    photometrics: VOI, MONOCHROME1, frame, colour) for the overlay's picture, and finds where the network's input
    lies on it from the affines, the loader's resize applied to the loaded image (:func:`index_to_source`), so
    that the resize and its ``aspect`` (``stretch``, ``pad``, ``crop``) are undone exactly as the loader did them.

    Only the loader's own resize, pad and crop are undone: a preprocessing that changes the geometry after the
    loader (a MONAI ``Resized`` or crop later in the chain) gives an input of another size, and :meth:`load`
    refuses it.

    Args:
        loader: the :class:`hmn.transforms.LoadXray` that made the network's input, or a ``LoadXrayd`` or
            ``Compose`` holding it (:func:`find_loader`).
    """

    def __init__(self, loader: Any) -> None:
        self.loader = find_loader(loader)
        self.native = copy.copy(self.loader)
        self.native.spatial_size = None  # the file at its own size (nothing else of the loader changes)

    def load(self, path: str | os.PathLike, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The source image of `path` (``C, rows, columns`` float32, as the loader reads it before its resize) and
        the per-axis ``(scale, offset)`` of :func:`index_to_source`.

        Raises:
            ImageReadError: the file cannot be read now (:class:`hmn.transforms.LoadXray`).
            ValueError: the loader's resize of the file does not give `input_shape` (``H, W``, the network's input).
        """
        source = self.native(os.fspath(path))
        resized = self.loader(source)  # the loader's resize alone, on the image it read (LoadXray.from_memory)
        want, got = tuple(int(v) for v in input_shape[-2:]), tuple(int(v) for v in resized.shape[1:])
        if source.ndim != 3 or got != want:
            raise ValueError(
                f"{os.fspath(path)}: the loader's resize gives {got}, but the network's input is {want}: the "
                "preprocessing changes the image's geometry after LoadXrayd, which geometry='source' cannot undo "
                "(only LoadXrayd's spatial_size and aspect can); use geometry='input'"
            )
        scale, offset = index_to_source(resized.affine, source.affine)
        return source.as_tensor().numpy().astype(np.float32, copy=False), scale, offset


# ----------------------------------------------------------------------------------------------- files


def heatmap_id(path: str | os.PathLike) -> str:
    """The name under which an image's heatmaps are written: the first 16 hex digits of the SHA-256 of its
    path as given. Nothing from the file's contents (no DICOM attribute) and nothing readable from the path
    (whose folder or file names may carry a patient's name or ID) goes into it."""
    return hashlib.sha256(os.fspath(path).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _file_name(finding: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", finding).strip("._") or "finding"


def resolve_findings(findings: str | Sequence[str] | None, class_names: Sequence[str]) -> list[int]:
    """Class indices of the findings to explain: ``"all"`` / ``None`` for every class, or a list of class names
    (or one name). ValueError naming the unknown ones and the model's classes."""
    names = [str(c) for c in class_names]
    if findings is None or (isinstance(findings, str) and findings == "all"):
        return list(range(len(names)))
    wanted = [findings] if isinstance(findings, str) else [str(f) for f in findings]
    unknown = [f for f in wanted if f not in names]
    if unknown or not wanted:
        raise ValueError(f"heatmap findings {unknown or wanted} are not classes of the model; its classes: {names} (or 'all')")
    return sorted({names.index(f) for f in wanted})


def resolve_thresholds(thresholds: Any, class_names: Sequence[str], default: float = 0.5) -> np.ndarray:
    """One threshold per class: a number (every class), a ``{class: threshold}`` mapping, or the path of a
    ``metrics.json`` written by the evaluation report (its per-class operating thresholds). A class the file
    or mapping has no threshold for gets `default`, with a warning. ValueError for anything else, or a
    threshold outside [0, 1]."""
    names = [str(c) for c in class_names]
    if isinstance(thresholds, bool):
        raise ValueError(f"heatmap thresholds must be a number, a mapping or a metrics.json path, got {thresholds!r}")
    if isinstance(thresholds, (int, float)):
        out = np.full(len(names), float(thresholds))
    elif isinstance(thresholds, Mapping):
        out = np.array([float(thresholds[c]) if thresholds.get(c) is not None else np.nan for c in names])
    elif isinstance(thresholds, (str, os.PathLike)):
        try:
            out = np.full(len(names), float(thresholds))  # a number given on the command line
        except ValueError:
            from hmn.evaluation.metrics import load_thresholds

            if not os.path.isfile(thresholds):
                raise ValueError(f"heatmap thresholds {os.fspath(thresholds)!r}: no such metrics.json (give a number, "
                                 "a {class: threshold} mapping or the path of an evaluation metrics.json)") from None
            out = load_thresholds(thresholds, names)
    else:
        raise ValueError(f"heatmap thresholds must be a number, a mapping or a metrics.json path, got {thresholds!r}")
    missing = [c for c, t in zip(names, out) if not np.isfinite(t)]
    if missing:
        logger.warning("no heatmap threshold for %s: %.2f used", missing, default)
        out = np.where(np.isfinite(out), out, float(default))
    bad = [(c, float(t)) for c, t in zip(names, out) if not 0.0 <= t <= 1.0]
    if bad:
        raise ValueError(f"heatmap thresholds must lie in [0, 1] (they compare with probabilities), got {bad}")
    return out


def render_overlay(
    image: np.ndarray, heatmap: np.ndarray, title: str, alpha: float = 0.6, cmap: str = "jet",
    outline: np.ndarray | None = None, native: bool = False,
) -> bytes:
    """PNG bytes of the heatmap over the grey image, with `title` above it and a colour bar.

    Args:
        image: ``H, W`` grey image (any range; shown between its 0.5th and 99.5th percentiles).
        heatmap: ``H, W`` map in [0, 1]; its opacity grows with its value, so the image shows through
            where the map is low. NaN (a source's part the network did not see, :func:`maps_to_source`) is left
            uncoloured, and a dashed white frame marks the part that has values.
        title: the text drawn above the picture (the finding and its probability).
        alpha: the opacity at the map's maximum.
        cmap: a matplotlib colour map name.
        outline: an optional ``H, W`` mask whose edge is drawn in white (e.g. where a lesion was drawn).
        native: draw the picture at the image's own size, one image pixel per PNG pixel (the source geometry:
            the picture's pixel ``(r, c)`` is the file's pixel ``(r, c)``, at the offset :func:`_native_layout`
            gives; the title and colour bar grow with the image). Otherwise the picture is about 330 pixels
            across, drawn with bilinear interpolation (the network input's size, 224 or so, looks blocky at 1:1).

    The PNG carries no text chunks (matplotlib's "Software" entry is left out).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    image, heatmap = np.asarray(image, dtype=np.float32), np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 2 or image.shape != heatmap.shape:
        raise ValueError(f"image and heatmap must be two H, W arrays of one shape, got {image.shape} and {heatmap.shape}")
    lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    hi = hi if hi > lo else lo + 1.0
    h, w = image.shape
    finite = np.isfinite(heatmap)
    level = np.where(finite, np.clip(heatmap, 0.0, 1.0), 0.0)
    frame = _view_frame(finite) if not finite.all() else None
    if native:
        lay = _native_layout(h, w)
        # the map's colour blended over the grey image by hand, one channel at a time (millions of pixels)
        a = (float(alpha) * level).astype(np.float32)
        base = np.clip((image - lo) / (hi - lo), 0.0, 1.0) * (1.0 - a) * 255.0
        lut = colormaps[cmap].resampled(256)(np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32) * 255.0
        q = np.rint(level * 255.0).astype(np.uint8)
        rgb = np.empty((h, w, 3), dtype=np.uint8)
        for ch in range(3):
            v = np.take(lut[:, ch], q)
            v *= a
            v += base
            rgb[..., ch] = np.rint(v, out=v)
        del a, base, q
        thick = max(1, int(round(lay["scale"])))
        if outline is not None and np.any(outline):
            _paint_edge(rgb, np.asarray(outline, dtype=bool), thick)
        if frame is not None:
            _paint_dashed_frame(rgb, frame, thick)
        fig = Figure(figsize=(lay["width"] / 100.0, lay["height"] / 100.0), dpi=100)
        FigureCanvasAgg(fig)
        fs = lay["scale"]
        fig.text((lay["left"] + w / 2.0) / lay["width"], 1.0 - lay["top"] / 2.0 / lay["height"], title,
                 ha="center", va="center", fontsize=11 * fs)
        cax = fig.add_axes((lay["bar_left"] / lay["width"], (lay["height"] - lay["top"] - 0.9 * h) / lay["height"],
                            lay["bar_width"] / lay["width"], 0.8 * h / lay["height"]))
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=colormaps[cmap]), cax=cax)
        bar.set_label("relative evidence", fontsize=8 * fs)
        bar.ax.tick_params(labelsize=7 * fs)
        # the frame (title, colour bar) drawn by matplotlib, the picture put in pixel for pixel, the PNG written by
        # PIL as RGB (no text chunks): several times faster than matplotlib compositing and encoding megapixels
        fig.canvas.draw()
        drawn = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        canvas = np.full((lay["height"], lay["width"], 3), 255, dtype=np.uint8)  # exact, whatever matplotlib rounds
        dh, dw = min(drawn.shape[0], lay["height"]), min(drawn.shape[1], lay["width"])
        canvas[:dh, :dw] = drawn[:dh, :dw]
        canvas[lay["top"] : lay["top"] + h, lay["left"] : lay["left"] + w] = rgb
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="PNG", compress_level=3)
        return buf.getvalue()

    fig = Figure(figsize=(4.2 * w / max(h, w) + 0.9, 4.2 * h / max(h, w) + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.78 * 1.0, 0.86))
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="bilinear")
    rgba = colormaps[cmap](level)
    rgba[..., 3] = alpha * level
    ax.imshow(rgba, interpolation="bilinear")
    if outline is not None and np.any(outline):
        ax.contour(np.asarray(outline, dtype=np.float32), levels=[0.5], colors="white", linewidths=0.9)
    if frame is not None:
        from matplotlib.patches import Rectangle

        (r0, r1), (c0, c1) = frame
        ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="white",
                               linestyle="--", linewidth=0.9))
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    cax = fig.add_axes((0.83, 0.1, 0.04, 0.7))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=colormaps[cmap]), cax=cax)
    bar.set_label("relative evidence", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _native_layout(h: int, w: int) -> dict[str, Any]:
    """Where :func:`render_overlay` (``native=True``) puts an ``h, w`` picture: PNG rows ``top .. top + h - 1`` and
    columns ``left .. left + w - 1`` hold it; the PNG is ``height, width`` pixels."""
    scale = max(1.0, max(h, w) / 330.0)
    margin, top = int(round(8 * scale)), int(round(34 * scale))
    gap, bar, labels = int(round(14 * scale)), int(round(16 * scale)), int(round(48 * scale))
    return {"scale": scale, "left": margin, "top": top, "width": margin + w + gap + bar + labels,
            "height": top + h + margin, "bar_left": margin + w + gap, "bar_width": bar}


def _view_frame(finite: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """First and last row and column with a value (the network's view on the source), None for none."""
    rows, cols = np.flatnonzero(finite.any(1)), np.flatnonzero(finite.any(0))
    return ((int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))) if rows.size and cols.size else None


def _paint_edge(rgb: np.ndarray, mask: np.ndarray, thick: int) -> None:
    """Paints the edge of `mask` (its pixels with a neighbour outside it) white, `thick` pixels wide."""
    inner = mask.copy()
    for _ in range(thick):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    rgb[mask & ~inner] = 255


def _paint_dashed_frame(rgb: np.ndarray, frame: tuple[tuple[int, int], tuple[int, int]], thick: int) -> None:
    """Paints a dashed white rectangle along the inside of `frame` ((first, last) row, (first, last) column)."""
    (r0, r1), (c0, c1) = frame
    dash = 6 * thick
    cols, rows = np.arange(c0, c1 + 1), np.arange(r0, r1 + 1)
    cols, rows = cols[((cols - c0) // dash) % 2 == 0], rows[((rows - r0) // dash) % 2 == 0]
    for t in range(thick):
        for r in {min(r0 + t, r1), max(r1 - t, r0)}:
            rgb[r, cols] = 255
        for c in {min(c0 + t, c1), max(c1 - t, c0)}:
            rgb[rows, c] = 255


def write_heatmaps(
    out_dir: str | os.PathLike,
    image_path: str | os.PathLike,
    image: np.ndarray | torch.Tensor,
    maps: np.ndarray | torch.Tensor,
    findings: Sequence[str],
    probabilities: Sequence[float],
    thresholds: Sequence[float],
    uids: Mapping[str, str] | Sequence[str] | None = None,
    geometry: str = "input",
) -> list[dict[str, str]]:
    """Writes one overlay PNG and one ``.npy`` per finding of one image, under ``out_dir/<id>/`` with ``<id>``
    = :func:`heatmap_id` of `image_path`: ``<finding>.png`` (the overlay, titled with the finding and its
    probability) and ``<finding>.npy`` (the ``H, W`` float32 map). Each file is written atomically.

    Args:
        out_dir: the heatmap folder.
        image_path: the input's path (only its hash is used for the names).
        image: the picture under the maps, ``C, H, W`` or ``H, W`` (the first channel is shown): the network's
            input (``geometry="input"``) or the source image (``"source"``, drawn at its own size).
        maps: ``K, H, W`` maps in [0, 1] (NaN where a source's part was not seen), one per finding.
        findings, probabilities, thresholds: ``K`` finding names, their probabilities and thresholds.
        uids: the image's :data:`hmn.inference.DICOM_UID_COLUMNS` (a mapping, or the values in that order);
            ``""`` for those missing (a file that is not DICOM).
        geometry: the geometry `image` and `maps` are in (:data:`HEATMAP_GEOMETRIES`), for the index.

    Returns:
        One row per finding with the keys of :data:`HEATMAP_INDEX_COLUMNS` (file paths relative to `out_dir`).
    """
    from hmn.durable import atomic_write

    if geometry not in HEATMAP_GEOMETRIES:
        raise ValueError(f"heatmap geometry must be one of {HEATMAP_GEOMETRIES}, got {geometry!r}")
    if uids is None:
        uid_values = {c: "" for c in DICOM_UID_COLUMNS}
    elif isinstance(uids, Mapping):
        uid_values = {c: "" if uids.get(c) is None else str(uids.get(c)) for c in DICOM_UID_COLUMNS}
    else:
        uid_values = {c: "" if v is None else str(v) for c, v in zip(DICOM_UID_COLUMNS, uids)}
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    img = img[0] if img.ndim == 3 else img
    arr = maps.detach().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps)
    if arr.ndim != 3 or arr.shape[1:] != img.shape or not len(findings) == len(arr) == len(probabilities) == len(thresholds):
        raise ValueError(f"maps must be K, H, W with K findings and probabilities and H, W the image's {img.shape}; got "
                         f"maps {arr.shape}, {len(findings)} findings, {len(probabilities)} probabilities")
    hid = heatmap_id(image_path)
    rows, used = [], set()
    for name, m, p, t in zip(findings, arr.astype(np.float32), probabilities, thresholds):
        stem = _file_name(str(name))
        while stem in used:
            stem += "_"
        used.add(stem)
        png, npy = f"{hid}/{stem}.png", f"{hid}/{stem}.npy"
        data = render_overlay(img, m, f"{name}   p = {float(p):.2f}", native=geometry == "source")
        atomic_write(os.path.join(out_dir, png), lambda f, d=data: f.write(d), binary=True)
        atomic_write(os.path.join(out_dir, npy), lambda f, a=m: np.save(f, a), binary=True)
        rows.append({"image": os.fspath(image_path), "id": hid, **uid_values, "finding": str(name),
                     "probability": repr(float(p)), "threshold": repr(float(t)), "geometry": geometry, "png": png,
                     "npy": npy})
    return rows


def check_index(path: str | os.PathLike) -> None:
    """Refuses a heatmap index that rows of this version cannot be added to: one whose header is not
    :data:`HEATMAP_INDEX_COLUMNS` (written by a version without the DICOM UID and geometry columns, or not a heatmap
    index). Nothing for a file that does not exist or is empty.

    Raises:
        ValueError: naming the file, its columns and the ones expected, and what to do.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()  # the header alone: the index is read on every append
    header = next(csv.reader([first]), None) if first.endswith("\n") else None
    if header is not None and tuple(header) != HEATMAP_INDEX_COLUMNS:
        missing = [c for c in HEATMAP_INDEX_COLUMNS if c not in header]
        why = (f"it lacks {missing} (written by a version without the DICOM UID and geometry columns)" if missing
               else "it is not a heatmap index of this version")
        raise ValueError(
            f"{path} has columns {header}, not {list(HEATMAP_INDEX_COLUMNS)}: {why}. New rows cannot be added to it: "
            "move it away (its heatmap files stay valid), or write the heatmaps to another folder"
        )


def append_index(path: str | os.PathLike, rows: Sequence[Mapping[str, str]]) -> None:
    """Appends rows to a heatmap index CSV (header :data:`HEATMAP_INDEX_COLUMNS` when new) and syncs it.

    Raises:
        ValueError: the file exists with other columns (:func:`check_index`).
    """
    from hmn.durable import PATH_ERRORS  # a file name that is not UTF-8: its other bytes as \\xNN

    path = os.fspath(path)
    check_index(path)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8", errors=PATH_ERRORS) as f:
        w = csv.writer(f, lineterminator="\n")
        if new:
            w.writerow(HEATMAP_INDEX_COLUMNS)
        w.writerows([[r[c] for c in HEATMAP_INDEX_COLUMNS] for r in rows])
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- the CLI


def load_bundle_network(bundle_root: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The trained network of a bundle folder with its preprocessing, as its inference workflow builds them.

    The bundle's ``configs/inference.json`` is read when present (a packed bundle's carries its settings);
    otherwise the template's inference config of the recorded backbone's bundle. The settings come from the
    run record ``models/run.json`` (:func:`hmn.runs.trained`), checked like inference checks them
    (:func:`hmn.runs.check_run_record`, a packed bundle's model hash), and ``models/model.pt`` is loaded
    strictly.

    Returns:
        ``{"network" (eval mode, on device), "preprocessing", "class_names", "image_size"}``.

    Raises:
        FileNotFoundError: no ``models/model.pt``, or neither a config nor a run record to build from.
    """
    from monai.bundle import ConfigParser

    from hmn import runs
    from hmn.bundle.table import BUNDLES
    from hmn.bundle.template import inference_config

    root = os.fspath(bundle_root)
    ckpt_dir = os.path.join(root, "models")
    weights = os.path.join(ckpt_dir, "model.pt")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist: give the --bundle-root of a trained bundle")
    cfg_file = os.path.join(root, "configs", "inference.json")
    parser = ConfigParser()
    if os.path.isfile(cfg_file):
        parser.read_config(cfg_file)
    else:
        record = runs.read_run_record(ckpt_dir)
        if record is None:
            raise FileNotFoundError(f"neither {cfg_file} nor a run record {os.path.join(ckpt_dir, runs.RUN_RECORD)}: "
                                    "nothing says how the network in model.pt was built")
        backbone = record["settings"].get("backbone")
        parser.read_config(inference_config(backbone if backbone in BUNDLES else next(iter(BUNDLES))))
    parser["bundle_root"] = root
    parser["device"] = f"$torch.device({str(device)!r})"
    parser.get_parsed_content("imports")
    runs.check_model_file(ckpt_dir, parser.get_parsed_content("model_sha256"))
    runs.check_run_record(ckpt_dir, parser.get_parsed_content("model_settings"),
                          parser.get_parsed_content("use_run_record"))
    network = parser.get_parsed_content("network_def").to(device)
    from hmn.checkpoints import CheckpointReadError, load_checkpoint

    state = load_checkpoint(weights, map_location=device)
    try:
        network.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointReadError(weights, f"does not fit the recorded network ({type(e).__name__}: {e})") from e
    return {"network": network.eval(), "preprocessing": parser.get_parsed_content("preprocessing"),
            "class_names": [str(c) for c in parser.get_parsed_content("class_names")],
            "image_size": parser.get_parsed_content("image_size")}


def explain_image(
    bundle: Mapping[str, Any],
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    findings: str | Sequence[str] | None = "all",
    thresholds: Any = 0.5,
    levels: str = "finest",
    rollout: bool = False,
    geometry: str = "input",
) -> dict[str, Any]:
    """Heatmaps of one file with a bundle from :func:`load_bundle_network`: the probabilities of every class,
    then for each chosen finding at or above its threshold an overlay PNG and a ``.npy`` (:func:`write_heatmaps`),
    listed in ``out_dir/heatmaps.csv``; with `rollout`, also ``<id>/attention_rollout.png`` and ``.npy``.
    `geometry` ``"source"`` writes them at the file's own rows x columns (:class:`SourceGeometry`).

    Returns:
        ``{"id", "probabilities": {class: p}, "rows": [index rows written], "rollout": path or None}``.

    Raises:
        ValueError: a 3D (volume) bundle's network, an unknown finding, a bad threshold or geometry, or an index
            ``heatmaps.csv`` of an older version in `out_dir` (:func:`check_index`).
    """
    network, names = bundle["network"], bundle["class_names"]
    if getattr(network, "spatial_dims", 2) != 2:
        from hmn.inference import NO_VOLUME_HEATMAPS

        raise ValueError(f"{os.fspath(image_path)}: the bundle is a 3D bundle (spatial_dims={network.spatial_dims}); "
                         f"{NO_VOLUME_HEATMAPS}")
    if geometry not in HEATMAP_GEOMETRIES:
        raise ValueError(f"heatmap geometry must be one of {HEATMAP_GEOMETRIES}, got {geometry!r}")
    chosen = resolve_findings(findings, names)
    thr = resolve_thresholds(thresholds, names)
    index = os.path.join(out_dir, "heatmaps.csv")
    check_index(index)
    source = SourceGeometry(bundle["preprocessing"]) if geometry == "source" else None
    item = bundle["preprocessing"]({"image": os.fspath(image_path)})
    meta = getattr(item["image"], "meta", {})
    uids = {c: meta.get(c, "") for c in DICOM_UID_COLUMNS}  # read when the bundle's loader has dicom_tags
    x = torch.as_tensor(item["image"]).float()[None].to(next(network.parameters()).device)
    with torch.no_grad():
        probs = torch.sigmoid(network(x)[0, : len(names)].float()).cpu().numpy()
    above = [k for k in chosen if probs[k] >= thr[k]]
    # every map before any file: a refused rollout (a CBAM network) leaves nothing half-written
    rollout_map = attention_rollout(network, x)[0, 0].cpu().numpy() if rollout else None
    maps = gradcam_pairs(network, x, [0] * len(above), above, levels=levels).cpu().numpy()
    picture = x[0].cpu().numpy()
    if source is not None:
        picture, scale, offset = source.load(image_path, x.shape[2:])
        maps = maps_to_source(maps, picture.shape[1:], scale, offset)
        if rollout_map is not None:
            rollout_map = maps_to_source(rollout_map, picture.shape[1:], scale, offset)
    rows = write_heatmaps(out_dir, image_path, picture, maps, [names[k] for k in above], probs[above], thr[above],
                          uids=uids, geometry=geometry)
    if rows:
        append_index(index, rows)
    rollout_png = None
    if rollout_map is not None:
        from hmn.durable import atomic_write

        m = rollout_map
        hid = heatmap_id(image_path)
        rollout_png = os.path.join(out_dir, hid, "attention_rollout.png")
        data = render_overlay(picture[0], m, "attention rollout (all findings)", native=source is not None)
        atomic_write(rollout_png, lambda f: f.write(data), binary=True)
        atomic_write(os.path.join(out_dir, hid, "attention_rollout.npy"), lambda f: np.save(f, m.astype(np.float32)), binary=True)
    return {"id": heatmap_id(image_path), "probabilities": dict(zip(names, map(float, probs))), "rows": rows,
            "rollout": rollout_png}


def explain_main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmn explain IMAGE --bundle-root DIR [--findings ...] [--out DIR]``."""
    ap = argparse.ArgumentParser(
        prog="python -m hmn explain",
        description="Grad-CAM heatmaps of one image with a trained bundle: one overlay PNG and one .npy per finding at "
        "or above its threshold, under OUT/<id>/ where <id> is a hash of the image's path (listed in OUT/heatmaps.csv).",
    )
    ap.add_argument("image", help="a DICOM, PNG, JPEG, TIFF or NIfTI file")
    ap.add_argument("--bundle-root", required=True, help="the bundle folder holding models/model.pt and models/run.json")
    ap.add_argument("--findings", nargs="+", default=["all"], help="class names to explain (default: all)")
    ap.add_argument("--out", default=None, help="output folder (default: BUNDLE_ROOT/runs/heatmaps)")
    ap.add_argument("--thresholds", default="0.5",
                    help="a probability for every finding, or an evaluation metrics.json with per-finding thresholds (default 0.5)")
    ap.add_argument("--levels", choices=GRADCAM_LEVELS, default="finest", help="pyramid levels of the Grad-CAM (default: finest)")
    ap.add_argument("--rollout", action="store_true", help="also write the attention rollout (self / cross_scale attention only)")
    ap.add_argument("--geometry", choices=HEATMAP_GEOMETRIES, default="input",
                    help="input: maps and overlays at the network's input size (default); source: at the file's own rows x "
                    "columns, the loader's resize and pad/crop undone (a crop's unseen margins are NaN in the .npy)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out or os.path.join(args.bundle_root, "runs", "heatmaps")
    findings = "all" if args.findings == ["all"] else args.findings
    try:
        bundle = load_bundle_network(args.bundle_root, args.device)
        result = explain_image(bundle, args.image, out, findings, args.thresholds, args.levels, args.rollout,
                               args.geometry)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a file that cannot be read comes wrapped by MONAI's Compose
        from hmn.data.dataset import find_read_error
        from hmn.inference import error_message

        if find_read_error(e) is None:
            raise
        print(f"error: {error_message(e, args.image)}", file=sys.stderr)
        return 1
    print(f"{args.image} (id {result['id']}):")
    for name, p in result["probabilities"].items():
        print(f"  {name:<24} {p:.4f}")
    if result["rows"]:
        print(f"heatmaps in {out}:")
        for r in result["rows"]:
            print(f"  {r['finding']:<24} {r['png']}  {r['npy']}")
    else:
        print("no chosen finding reached its threshold: no heatmap written")
    if result["rollout"]:
        print(f"attention rollout: {result['rollout']}")
    return 0
