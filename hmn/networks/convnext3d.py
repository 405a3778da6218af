"""A 3D ConvNeXt for CT and MR volumes, and the inflation of 2D ImageNet ConvNeXt weights into it.

The network is the ConvNeXt of Liu et al., "A ConvNet for the 2020s" (CVPR 2022) with every 2D
operation made 3D: a patchify stem, four stages of blocks (7x7x7 depthwise convolution, LayerNorm over
channels, an inverted-bottleneck MLP four times as wide, layer scale, stochastic depth, residual) and a
LayerNorm plus strided convolution between stages. Its parameters carry the names of timm's 2D ConvNeXt
(``stem.0``, ``stages.{i}.downsample.1``, ``stages.{i}.blocks.{j}.conv_dw``, ``.norm``, ``.mlp.fc1``,
``.mlp.fc2``, ``.gamma``), so a 2D ImageNet checkpoint maps onto it name for name:
:func:`inflate_2d_state_dict` repeats each 2D kernel along the depth axis and divides it by the depth,
the inflation of Carreira & Zisserman, "Quo Vadis, Action Recognition? A New Model and the Kinetics
Dataset" (CVPR 2017), so that a volume constant along depth gives the 2D network's response on the slice
(away from the zero padding at the first and last slices).

For training from scratch the patchify stem can be replaced by two overlapping strided convolutions
(``stem="conv"``, as the 2D bundles do) or by convolutions at the input resolution with max pooling for the
stride (``stem="pool"``, :func:`_pool_stem`, the 3D bundle's: findings a few voxels wide survive it).

Strides can differ between axes (``stem_stride=(1, 4, 4)`` keeps every slice of a thick-slice volume),
so the backbone reports per-axis strides in ``axis_strides`` and the largest of each level in
``strides``.
"""

from __future__ import annotations

import os
import re
from typing import List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmn.networks.backbones import (
    Backbone,
    BackboneSpec,
    Pretrained,
    PretrainedWeightsError,
    _as_size_3d,
    _check_options,
    _scratch_choice,
)

__all__ = [
    "ConvNeXt3d",
    "ConvNeXtBlock3d",
    "DepthwiseConv3d",
    "LayerNormChannelsFirst",
    "build_convnext3d",
    "inflate_2d_state_dict",
]

# the published ConvNeXt's in-plane strides, which 2D pretrained kernels fit
_PUBLISHED_STEM_STRIDE = 4
_PUBLISHED_DOWNSAMPLE_STRIDE = 2


def _axis_triple(name: str, value: object) -> Tuple[int, int, int]:
    """``value`` (an int or three ints) as one positive int per spatial axis; anything else raises ``ValueError``."""
    triple = (value,) * 3 if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(triple) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in triple):
        raise ValueError(f"backbone option {name}={value!r} must be a positive int or three positive ints (one per axis)")
    return triple  # type: ignore[return-value]


def _infer_depth_axis(stem_stride: Tuple[int, int, int], downsample_stride: Tuple[int, int, int]) -> int:
    """The axis whose (stem, downsample) strides differ from the two others', which agree: the slice axis of
    thick-slice volumes, first in ``D, H, W`` (``(1, 4, 4)``) or last in MONAI's ``X, Y, Z`` (``(4, 4, 2)``).
    2 when no single axis stands out: Z, the slice axis of an axial study in the ``X, Y, Z`` order the project's
    volume pipeline gives after orientation to RAS (:func:`hmn.transforms.volume_transforms`)."""
    pairs = list(zip(stem_stride, downsample_stride))
    for a in range(3):
        others = [pairs[b] for b in range(3) if b != a]
        if others[0] == others[1] != pairs[a]:
            return a
    return 2


class _DepthwiseConv3dFunction(torch.autograd.Function):
    """A stride-1, "same"-padded depthwise 3D convolution whose backward is two forward convolutions."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv3d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        n, c = x.shape[:2]
        grad_x = grad_w = grad_b = None
        # float32 whatever the forward's autocast dtype: the gradient of the float32 convolution
        with torch.autocast("cpu", enabled=False):
            dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
            g = grad_out.to(dtype).contiguous()
            if ctx.needs_input_grad[0]:
                # the transposed convolution of stride 1 is the convolution with the kernel flipped on every axis
                grad_x = F.conv3d(g, weight.to(dtype).flip(2, 3, 4), padding=ctx.padding, groups=c).to(x.dtype)
            if ctx.needs_input_grad[1]:
                # each (sample, channel) pair is a group: the padded input correlated with its output gradient
                # gives that pair's kernel-sized weight gradient, summed over the batch
                xs = x.to(dtype).contiguous().reshape(1, n * c, *x.shape[2:])
                corr = F.conv3d(xs, g.reshape(n * c, 1, *g.shape[2:]), padding=ctx.padding, groups=n * c)
                grad_w = corr.reshape(n, c, 1, *weight.shape[2:]).sum(0).to(weight.dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum((0, 2, 3, 4)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise 3D convolution (``groups = channels``), stride 1, zero "same" padding, with a faster CPU backward.

    The module is an ``nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)``,
    parameters and state-dict names included. Only the backward differs, on the CPU while gradients are
    recorded: PyTorch's CPU backward of a depthwise 3D convolution is many times slower than its forward (an
    open PyTorch issue, pytorch/pytorch#37406), and it was most of a 3D ConvNeXt's training step. A forward +
    backward pass over 8 x 96 channels at 16^3 took 0.74 s with ``nn.Conv3d`` and 0.10 s with this module on 2
    threads (``benchmarks/bench_3d.py --depthwise``, BENCHMARKS.md). Both
    gradients are forward convolutions instead: the input's is the convolution with the flipped kernel, the
    weight's a correlation of the input with the output gradient, one group per sample and channel. They are
    computed in float32 under bfloat16 autocast. On a GPU, while scripting or tracing and without gradients,
    the forward is ``nn.Conv3d``'s.

    Args:
        channels: input and output channels.
        kernel_size: odd side of the cubic kernel (7 in ConvNeXt); an even one raises ``ValueError``.
        bias: whether the convolution adds a bias per channel.

    Shapes: ``N, channels, D, H, W`` -> the same shape.
    """

    def __init__(self, channels: int, kernel_size: int = 7, bias: bool = True) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"DepthwiseConv3d needs an odd kernel_size for same padding, got kernel_size={kernel_size}")
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # a branch TorchScript does not compile
            if not torch.jit.is_tracing() and self._fast_backward(x):
                return _DepthwiseConv3dFunction.apply(x, self.weight, self.bias, self.padding)
        return self._conv_forward(x, self.weight, self.bias)

    def _fast_backward(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and (x.requires_grad or self.weight.requires_grad))


class LayerNormChannelsFirst(nn.LayerNorm):
    """LayerNorm over the channels of an ``N, C, D, H, W`` tensor (the slot of timm's ``LayerNorm2d``).

    Args:
        num_channels: ``C``.
        eps: added to the variance (1e-6, timm's ConvNeXt value).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N, C, D, H, W`` -> the same shape (contiguous), each position's ``C`` values normalized."""
        # explicit permutations: the ONNX exporter writes movedim's negative axes into an invalid Transpose
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        # Contiguous channels-first, not the channels-last view movedim gives: the whole network would run
        # channels-last from here, and oneDNN's backward of a channels-last depthwise 3D convolution whose
        # kernel exceeds the map (7^3 over 2^3) took 12 s a call on 2 threads, against 0.09 s channels-first.
        return x.permute(0, 4, 1, 2, 3).contiguous()


class _BatchNormChannelsLast(nn.Module):
    """BatchNorm3d over the last dim of an ``N, D, H, W, C`` tensor (the slot of a block's channels-last LayerNorm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


def _channels_first_norm(norm: str, channels: int) -> nn.Module:
    return LayerNormChannelsFirst(channels) if norm == "layer" else nn.BatchNorm3d(channels)


class ConvNeXtBlock3d(nn.Module):
    """One ConvNeXt block in 3D: depthwise ``kernel_size``^3 convolution, norm over channels, Linear to
    ``mlp_ratio`` x the width, GELU, Linear back, layer scale ``gamma``, stochastic depth, residual.

    The norm and the MLP run channels-last (``N, D, H, W, C``), as in timm's ConvNeXt with ``conv_mlp=False``,
    so the block's parameters have timm's names and 2D shapes (bar the depthwise kernel's depth).

    Args:
        dim: channels in and out.
        kernel_size: side of the depthwise kernel (7).
        mlp_ratio: width of the MLP's hidden layer over ``dim`` (4).
        ls_init_value: initial value of every entry of ``gamma``.
        drop_path: stochastic depth probability of the residual branch.
        norm: ``"layer"`` (LayerNorm) or ``"batch"`` (BatchNorm3d).
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        mlp_ratio: int = 4,
        ls_init_value: float = 1e-6,
        drop_path: float = 0.0,
        norm: str = "layer",
    ) -> None:
        super().__init__()
        from timm.layers import DropPath, Mlp

        self.conv_dw = DepthwiseConv3d(dim, kernel_size)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm == "layer" else _BatchNormChannelsLast(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim, act_layer=nn.GELU)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N, dim, D, H, W`` -> the same shape."""
        y = self.conv_dw(x).permute(0, 2, 3, 4, 1)
        y = self.mlp(self.norm(y)) * self.gamma
        return x + self.drop_path(y.permute(0, 4, 1, 2, 3))


class _Stage(nn.Module):
    """``downsample`` (norm and strided convolution, or identity for the first stage), then ``blocks``."""

    def __init__(self, downsample: nn.Module, blocks: nn.Sequential) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


def _conv_stem(in_channels: int, out_channels: int, stride: Tuple[int, int, int]) -> nn.Sequential:
    """Two overlapping 3x3x3 convolutions, BatchNorm and GELU between them, of total stride ``stride``
    (each axis's stride 1, 2 or 4: the first convolution takes up to 2 of it, the second the rest)."""
    first = tuple(min(s, 2) for s in stride)
    second = tuple(s // f for s, f in zip(stride, first))
    mid = max(out_channels // 2, 1)
    return nn.Sequential(
        nn.Conv3d(in_channels, mid, 3, stride=first, padding=1),
        nn.BatchNorm3d(mid),
        nn.GELU(),
        nn.Conv3d(mid, out_channels, 3, stride=second, padding=1),
    )


def _pool_stem(in_channels: int, out_channels: int, stride: Tuple[int, int, int]) -> nn.Sequential:
    """A stem that sees the volume at its full resolution before it downsamples, for findings a few voxels wide.

    Two 3x3x3 convolutions at the input resolution (``max(out_channels // 6, 8)`` channels), max pooling by up
    to 2 per axis, a 3x3x3 convolution to ``out_channels // 2`` channels, max pooling by the rest of ``stride``
    (each axis 1, 2 or 4), and a 1x1x1 convolution to ``out_channels``; BatchNorm and GELU after each 3x3x3
    convolution. The encoder of a 3D U-Net (Cicek et al., MICCAI 2016) starts the same way: convolutions at full
    resolution, max pooling between levels. Max pooling keeps a lesion's response however small the lesion,
    where a strided convolution of a few early filters averages it with its surroundings.
    """
    width = max(out_channels // 6, 8)
    mid = max(out_channels // 2, 1)
    first = tuple(min(s, 2) for s in stride)
    second = tuple(s // f for s, f in zip(stride, first))

    def conv_bn_gelu(cin: int, cout: int) -> list:
        return [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.GELU()]

    layers = conv_bn_gelu(in_channels, width) + conv_bn_gelu(width, width)
    if any(f > 1 for f in first):
        layers.append(nn.MaxPool3d(first))
    layers += conv_bn_gelu(width, mid)
    if any(s > 1 for s in second):
        layers.append(nn.MaxPool3d(second))
    layers.append(nn.Conv3d(mid, out_channels, 1))
    return nn.Sequential(*layers)


class ConvNeXt3d(Backbone):
    """3D ConvNeXt backbone (Liu et al., "A ConvNet for the 2020s", CVPR 2022, with 3D convolutions).

    ``forward`` maps an ``N, in_channels, D, H, W`` volume to four channel-first maps, finest first: level
    ``i`` has ``dims[i]`` channels and ``floor(size / axis_strides[i][a])`` positions along axis ``a`` (with
    ``stem="conv"``, whose padded strided convolutions round up, the stem gives ``ceil(size / stem_stride)``
    and each downsampling floors). ``axis_strides[i]`` is ``stem_stride * downsample_stride ** i`` per axis; ``strides[i]`` is its largest
    entry (``[4, 8, 16, 32]`` with the defaults, and with ``stem_stride=(1, 4, 4)``).

    Args:
        in_channels: channels of the volume (1 for CT/MR).
        dims: width of each of the four stages.
        depths: blocks of each stage.
        kernel_size: side of the depthwise kernels (7).
        ls_init_value: initial layer-scale value.
        norm: ``"layer"`` (published) or ``"batch"`` (BatchNorm3d everywhere, for training from scratch).
        stem: ``"patch"`` (published: one convolution, kernel = stride = ``stem_stride``), ``"conv"``
            (:func:`_conv_stem`) or ``"pool"`` (:func:`_pool_stem`: convolutions at the input resolution and max
            pooling); for ``"conv"`` and ``"pool"`` each axis of ``stem_stride`` must be 1, 2 or 4.
        stem_stride: the stem's stride, an int or one per axis.
        downsample_stride: the stride of the convolution between stages (kernel = stride), an int or one per axis.
        drop_path_rate: stochastic depth probability of the last block, rising linearly from 0 over the blocks.
        depth_axis: the spatial axis (0, 1 or 2) that :func:`inflate_2d_state_dict` inflates along; ``None``
            takes the one axis whose strides differ from the two others' (axis 0 of ``stem_stride=(1, 4, 4)``,
            axis 2 of ``(4, 4, 2)``), or axis 2 (Z of the RAS-oriented ``X, Y, Z`` volumes) when the strides single
            none out.

    Raises:
        ValueError: a choice outside the accepted ones (the value and the accepted ones are named).
    """

    def __init__(
        self,
        in_channels: int = 1,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (3, 3, 9, 3),
        kernel_size: int = 7,
        ls_init_value: float = 1e-6,
        norm: str = "layer",
        stem: str = "patch",
        stem_stride: int | Sequence[int] = 4,
        downsample_stride: int | Sequence[int] = 2,
        drop_path_rate: float = 0.0,
        depth_axis: int | None = None,
    ) -> None:
        super().__init__()
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"dims and depths need 4 stages each, got dims={tuple(dims)} and depths={tuple(depths)}")
        if norm not in ("layer", "batch"):
            raise ValueError(f"norm={norm!r} is not one of ('layer', 'batch')")
        if stem not in ("patch", "conv", "pool"):
            raise ValueError(f"stem={stem!r} is not one of ('patch', 'conv', 'pool')")
        if depth_axis not in (None, 0, 1, 2) or isinstance(depth_axis, bool):
            raise ValueError(f"depth_axis={depth_axis!r} is not one of (None, 0, 1, 2)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate!r} must be in [0, 1)")
        stem_stride = _axis_triple("stem_stride", stem_stride)
        downsample_stride = _axis_triple("downsample_stride", downsample_stride)
        if depth_axis is None:
            depth_axis = _infer_depth_axis(stem_stride, downsample_stride)
        if stem in ("conv", "pool") and not all(s in (1, 2, 4) for s in stem_stride):
            raise ValueError(
                f"stem={stem!r} takes a stem_stride of 1, 2 or 4 per axis (two downsampling steps of up to 2), "
                f"got {stem_stride}"
            )
        self.depth_axis = depth_axis
        if stem == "patch":
            first: nn.Module = nn.Conv3d(in_channels, dims[0], kernel_size=stem_stride, stride=stem_stride)
        elif stem == "conv":
            first = _conv_stem(in_channels, dims[0], stem_stride)
        else:
            first = _pool_stem(in_channels, dims[0], stem_stride)
        self.stem = nn.Sequential(first, _channels_first_norm(norm, dims[0]))

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages: list[nn.Module] = []
        strides = [stem_stride]
        start = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i == 0:
                downsample: nn.Module = nn.Identity()  # timm's first stage has no downsampling either
            else:
                downsample = nn.Sequential(
                    _channels_first_norm(norm, dims[i - 1]),
                    nn.Conv3d(dims[i - 1], dim, kernel_size=downsample_stride, stride=downsample_stride),
                )
                strides.append(tuple(s * d for s, d in zip(strides[-1], downsample_stride)))
            blocks = nn.Sequential(
                *[
                    ConvNeXtBlock3d(dim, kernel_size, ls_init_value=ls_init_value, drop_path=rates[start + j], norm=norm)
                    for j in range(depth)
                ]
            )
            start += depth
            stages.append(_Stage(downsample, blocks))
        self.stages = nn.Sequential(*stages)
        self.channels = [int(d) for d in dims]
        self.axis_strides = [tuple(int(s) for s in a) for a in strides]
        self.strides = [max(a) for a in self.axis_strides]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # timm's ConvNeXt initialisation: truncated normal (std 0.02) weights, zero biases
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``N, in_channels, D, H, W`` -> four ``N, channels[i], *size // axis_strides[i]`` maps, finest first.

        Raises:
            ValueError: ``x`` is not 5D, or an axis is shorter than the coarsest level's stride along it.
        """
        if x.dim() != 5:
            raise ValueError(f"a 3D ConvNeXt takes N, C, D, H, W volumes, got a tensor of shape {list(x.shape)}")
        coarsest = self.axis_strides[-1]
        for a in range(3):
            if x.shape[2 + a] < coarsest[a]:
                raise ValueError(
                    f"input of shape {list(x.shape)} is too small: spatial axis {a} needs at least "
                    f"{coarsest[a]} voxels (the coarsest level's stride along it)"
                )
        x = self.stem(x)
        feats: List[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------------------------------------
# Inflation of 2D weights.
# ----------------------------------------------------------------------------------------------------------


def _unwrap(state: Mapping[str, object]) -> dict:
    """The state_dict inside ``{'model': ...}`` / ``{'state_dict': ...}``, ``module.`` prefixes removed."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]  # type: ignore[assignment]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(
            "a 2D ConvNeXt checkpoint must be a state_dict (a dict of tensors, possibly under 'model' or 'state_dict')"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}


def _timm_names(state: dict, model3d: nn.Module) -> dict:
    """Renames the other layouts of a 2D ConvNeXt checkpoint to timm's model names: the facebookresearch
    release (``downsample_layers.*``, ``dwconv``, ``pwconv``; timm's own filter converts it) and timm's
    ``features_only`` models (``stem_0``, ``stages_1``)."""
    if any(k.startswith("downsample_layers.") for k in state):
        from timm.models.convnext import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(state, model3d)
        except KeyError as err:  # timm looks up the model's tensor of each MLP weight
            raise PretrainedWeightsError(f"the 2D checkpoint's tensor {err} has no counterpart in this 3D ConvNeXt") from err
    return {re.sub(r"^(stem|stages)_(\d+)\.", r"\1.\2.", k): v for k, v in state.items()}


def _inflate_kernel(weight: torch.Tensor, size: int, axis: int) -> torch.Tensor:
    """``(out, in, kh, kw)`` -> a 3D kernel with ``size`` copies of it along spatial ``axis`` (0, 1 or 2), over ``size``."""
    return weight.unsqueeze(2 + axis).repeat_interleave(size, dim=2 + axis) / size


def inflate_2d_state_dict(
    state_dict_2d: Mapping[str, torch.Tensor], model3d: ConvNeXt3d, depth_axis: int | None = None
) -> dict[str, torch.Tensor]:
    """Inflates a 2D ConvNeXt state_dict to the state_dict of ``model3d`` (I3D inflation, Carreira &
    Zisserman, CVPR 2017).

    Each 2D kernel ``(out, in, kh, kw)`` becomes ``model3d``'s kernel by repeating it ``kd`` times along
    ``depth_axis`` and dividing by ``kd`` (``kd`` = that kernel's size along the axis: 7 for the depthwise
    convolutions, the stride for the stem and downsampling; 1 where the stride along it is 1), so that a
    volume constant along the axis gives the 2D response on each slice. The stem's input channels are
    adapted to ``model3d``'s first (RGB summed for one channel, as timm adapts 2D stems). The classifier
    (``head.*``) is dropped; every other tensor is copied by name.

    Args:
        state_dict_2d: a timm 2D ConvNeXt state_dict of the same widths and depths (timm's names, timm's
            ``features_only`` names or the facebookresearch release's), possibly under ``'model'`` or
            ``'state_dict'``.
        model3d: the 3D ConvNeXt (norm ``"layer"``, stem ``"patch"``) the weights are for.
        depth_axis: the axis of ``D, H, W`` to inflate along; ``None`` takes ``model3d.depth_axis``. The 2D
            kernel's ``(kh, kw)`` go to the other two axes, in order.

    Returns:
        A state_dict that ``model3d.load_state_dict(..., strict=True)`` takes.

    Raises:
        PretrainedWeightsError: the checkpoint lacks a tensor of ``model3d`` or holds one it does not have
            (the keys are named), or a tensor's shape does not fit (key and both shapes named).
        ValueError: ``depth_axis`` not 0, 1, 2 or ``None``.
    """
    from timm.models import adapt_input_conv

    axis = model3d.depth_axis if depth_axis is None else depth_axis
    if axis not in (0, 1, 2):
        raise ValueError(f"depth_axis={axis!r} is not one of (0, 1, 2)")
    state = _timm_names(_unwrap(state_dict_2d), model3d)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = model3d.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(
                f"unexpected {unexpected[:8]}" + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            )
        raise PretrainedWeightsError(
            "the 2D checkpoint does not fit this 3D ConvNeXt (another width, depth, norm or stem?): " + "; ".join(parts)
        )
    out: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        value = state[key]
        if target.dim() == 5 and value.dim() == 4:
            if key == "stem.0.weight" and value.shape[1] != target.shape[1]:
                value = adapt_input_conv(int(target.shape[1]), value, base_chans=int(value.shape[1]))
            value = _inflate_kernel(value, int(target.shape[2 + axis]), axis)
        if value.shape != target.shape:
            raise PretrainedWeightsError(
                f"{key}: the 2D checkpoint's tensor {tuple(state[key].shape)} (inflated along axis {axis}: "
                f"{tuple(value.shape)}) does not fit the 3D model's {tuple(target.shape)}"
            )
        out[key] = value.to(target.dtype)
    return out


def _load_2d_checkpoint(spec: BackboneSpec, pretrained: Pretrained) -> dict:
    """The 2D state_dict behind ``pretrained``: a local file (``.pth``/``.bin``/``.safetensors``), or ``True``:
    timm's ImageNet weights of the 2D twin (``spec.extra['inflate_from']``), where cached or reachable."""
    import timm

    twin = spec.extra.get("inflate_from")
    if pretrained is True:
        try:
            return timm.create_model(twin, pretrained=True).state_dict()
        except Exception as err:  # hub errors come in many types (OSError, HTTP, LocalEntryNotFound, ...)
            raise PretrainedWeightsError(
                f"pretrained weights for backbone {spec.name!r} (inflated from timm {twin}) are not cached and the "
                f"model hub cannot be reached: download the 2D {twin} weights where the hub is reachable and pass "
                "pretrained='/path/to/checkpoint', or use pretrained=False."
            ) from err
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(
            f"pretrained checkpoint {path!r} for backbone {spec.name!r} does not exist; give the path of a 2D "
            f"ConvNeXt state_dict ({twin}) to inflate, or pretrained=False"
        )
    try:
        from timm.models import load_state_dict

        return load_state_dict(path, use_ema=False)  # torch.load(weights_only=True) or safetensors
    except Exception as err:
        raise PretrainedWeightsError(f"could not read checkpoint {path!r}: {err}") from err


def build_convnext3d(
    spec: BackboneSpec,
    in_channels: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: Pretrained = False,
    options: dict | None = None,
) -> ConvNeXt3d:
    """Builds the 3D ConvNeXt of a registry row (``dims``, ``depths`` from ``spec.extra``).

    Args:
        spec: a ``convnext3d`` row of :data:`hmn.networks.backbones.BACKBONES`.
        in_channels: channels of the volume.
        img_size: an int or ``(D, H, W)``; checked, not needed to build (any size the strides fit is taken).
        pretrained: ``False``; ``True`` (timm's 2D ImageNet weights of ``spec.extra['inflate_from']``,
            inflated); or the path of a 2D ConvNeXt checkpoint to inflate (:func:`inflate_2d_state_dict`).
        options: see ``BACKBONE_OPTIONS["convnext3d"]`` in :mod:`hmn.networks.backbones`.

    Raises:
        ValueError: an unknown or bad option, a bad ``img_size`` or ``pretrained``, ``img_size`` smaller than
            the coarsest stride, or pretrained weights with an architecture they do not fit (``norm='batch'``,
            ``stem='conv'`` or ``'pool'``, strides other than 4 and 2 on the two axes beside ``depth_axis``, the one given or
            the one inferred as :class:`ConvNeXt3d` infers it).
        PretrainedWeightsError: the weights cannot be had or do not fit.
    """
    options = _check_options(spec, options)
    if not (pretrained is None or isinstance(pretrained, (bool, str, os.PathLike))):
        raise ValueError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    pretrained = False if pretrained is None else pretrained
    norm = _scratch_choice(spec, options, pretrained, "norm", ("layer", "batch"), "have LayerNorms")
    stem = _scratch_choice(spec, options, pretrained, "stem", ("patch", "conv", "pool"), "have a patchify stem")
    stem_stride = _axis_triple("stem_stride", options.pop("stem_stride", _PUBLISHED_STEM_STRIDE))
    downsample_stride = _axis_triple("downsample_stride", options.pop("downsample_stride", _PUBLISHED_DOWNSAMPLE_STRIDE))
    depth_axis = options.pop("depth_axis", None)
    if depth_axis not in (None, 0, 1, 2) or isinstance(depth_axis, bool):
        raise ValueError(f"backbone option depth_axis={depth_axis!r} is not one of (None, 0, 1, 2)")
    if depth_axis is None:
        depth_axis = _infer_depth_axis(stem_stride, downsample_stride)
    ls_init_value = options.pop("ls_init_value", 1e-6)
    drop_path_rate = options.pop("drop_path_rate", 0.0)
    for name, value in (("ls_init_value", ls_init_value), ("drop_path_rate", drop_path_rate)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"backbone option {name}={value!r} must be a number")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"backbone option drop_path_rate={drop_path_rate!r} must be in [0, 1)")
    if pretrained is not False:
        plane = [a for a in range(3) if a != depth_axis]
        if any(stem_stride[a] != _PUBLISHED_STEM_STRIDE or downsample_stride[a] != _PUBLISHED_DOWNSAMPLE_STRIDE for a in plane):
            raise ValueError(
                f"pretrained 2D ConvNeXt kernels fit a stem stride of {_PUBLISHED_STEM_STRIDE} and a downsample stride "
                f"of {_PUBLISHED_DOWNSAMPLE_STRIDE} on the axes {plane} beside depth_axis={depth_axis}; got "
                f"stem_stride={stem_stride} and downsample_stride={downsample_stride} for {spec.name!r} (give the "
                "depth_axis whose strides differ, or pretrained=False)"
            )
    size = _as_size_3d(img_size)
    model = ConvNeXt3d(
        in_channels=in_channels,
        dims=spec.extra["dims"],
        depths=spec.extra["depths"],
        ls_init_value=float(ls_init_value),
        norm=norm,
        stem=stem,
        stem_stride=stem_stride,
        downsample_stride=downsample_stride,
        drop_path_rate=float(drop_path_rate),
        depth_axis=depth_axis,
    )
    coarsest = model.axis_strides[-1]
    if any(s < c for s, c in zip(size, coarsest)):
        raise ValueError(
            f"img_size {size} is smaller than the coarsest stride {coarsest} of {spec.name!r} along some axis; "
            "give a larger img_size or smaller stem_stride/downsample_stride"
        )
    if pretrained is not False:
        model.load_state_dict(inflate_2d_state_dict(_load_2d_checkpoint(spec, pretrained), model), strict=True)
    return model
