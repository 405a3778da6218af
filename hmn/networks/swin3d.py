"""A 3D Swin Transformer backbone built from MONAI's SwinUNETR encoder blocks.

Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows", ICCV 2021) in 3D, as the encoder of SwinUNETR (Hatamizadeh et al., "Swin UNETR: Swin
Transformers for Semantic Segmentation of Brain Tumors in MRI Images", BrainLes 2021) runs it: MONAI's
patch embedding, ``BasicLayer`` stages of shifted-window attention blocks and ``PatchMerging``.

MONAI's ``SwinTransformer.forward`` returns each stage's output after that stage's patch merging, and
builds a merge after the last stage too. This backbone drives the same MONAI layers itself to give the
standard Swin outputs: each stage's output *before* its merge, ``C, 2C, 4C, 8C`` channels at strides 4,
8, 16, 32, and no merge after the last stage (so every parameter serves an output).
"""

from __future__ import annotations

import os
from typing import List, Sequence

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
)

__all__ = ["SwinTransformer3d", "build_swin3d"]


def _layer_norm_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """LayerNorm without affine over the channels of ``N, C, D, H, W`` (MONAI's ``proj_out(normalize=True)``),
    returned contiguous channels-first: oneDNN's backward of a depthwise 3D convolution downstream (the neck's)
    can take seconds a call on a channels-last map."""
    x = x.permute(0, 2, 3, 4, 1)  # explicit: the ONNX exporter mistranslates movedim's negative axes
    # channels given, not read from x: the ONNX exporter needs a constant normalized_shape
    return F.layer_norm(x, [channels]).permute(0, 4, 1, 2, 3).contiguous()


class SwinTransformer3d(Backbone):
    """3D Swin Transformer backbone over MONAI's SwinUNETR encoder layers.

    ``forward`` maps ``N, in_channels, D, H, W`` to four maps, finest first: ``embed_dim * 2**i``
    channels at stride ``patch_size * 2**i`` on every axis, each normalized over its channels (a
    LayerNorm without affine, as MONAI's ``proj_out`` with ``normalize=True``). Any volume size is taken:
    as in MONAI, the patch embedding, the window attention and the merges zero-pad an axis that does not
    divide, so level ``i`` has ``ceil(size / stride_i)`` positions along each axis (exactly ``size /
    stride_i`` when the size divides by 32). Windows are ``window_size`` on a side, or the whole axis where
    the map is smaller (MONAI's ``get_window_size``).

    Args:
        in_channels: channels of the volume.
        embed_dim: channels of the first level (96 for Swin-T and Swin-S, 128 for Swin-B).
        depths: blocks of each of the four stages.
        num_heads: attention heads of each stage.
        window_size: side of the attention windows (7).
        patch_size: side of the patch embedding (4).
        mlp_ratio: width of the blocks' MLP over the stage's width.
        drop_path_rate: stochastic depth probability of the last block, rising linearly from 0.

    Raises:
        ValueError: ``depths`` and ``num_heads`` of different lengths, or a stage width not divisible by its heads.
    """

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import PatchEmbed
        from monai.networks.nets.swin_unetr import BasicLayer, PatchMerging

        if len(depths) != len(num_heads) or not depths:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage each")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i}: width {embed_dim * 2**i} is not divisible by its {heads} heads")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate!r} must be in [0, 1)")
        self.in_channels = in_channels
        # Swin's patch embedding has a LayerNorm after the projection (patch_norm); SwinUNETR leaves it out.
        self.patch_embed = PatchEmbed(
            patch_size=patch_size, in_chans=in_channels, embed_dim=embed_dim, norm_layer=nn.LayerNorm, spatial_dims=3
        )
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        start = 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            self.stages.append(
                BasicLayer(
                    dim=dim,
                    depth=depth,
                    num_heads=heads,
                    window_size=(window_size,) * 3,
                    drop_path=rates[start : start + depth],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    norm_layer=nn.LayerNorm,
                    downsample=None,  # merged here, between stages, so the stage's own output is seen
                )
            )
            start += depth
            if i < len(depths) - 1:
                self.merges.append(PatchMerging(dim=dim, norm_layer=nn.LayerNorm, spatial_dims=3))
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        self.strides = [patch_size * 2**i for i in range(len(depths))]
        self.axis_strides = [(s, s, s) for s in self.strides]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``N, in_channels, D, H, W`` -> one ``N, channels[i], ceil(D / s), ceil(H / s), ceil(W / s)`` map per
        level (``s = strides[i]``), finest first.

        Raises:
            ValueError: ``x`` is not ``N, in_channels, D, H, W``.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"a 3D Swin backbone of {self.in_channels} input channel(s) takes N, {self.in_channels}, D, H, W "
                f"volumes, got a tensor of shape {list(x.shape)}"
            )
        x = self.patch_embed(x)
        feats: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x.contiguous())  # N, C, D, H, W (no downsample inside)
            feats.append(_layer_norm_channels(x, self.channels[i]))
            if i < len(self.merges):
                x = self.merges[i](x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return feats


def _load_own_checkpoint(net: SwinTransformer3d, path: str | os.PathLike, name: str) -> None:
    """Loads a state_dict of this backbone (``patch_embed.*``, ``stages.*``, ``merges.*``) strictly."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(
            f"pretrained checkpoint {path!r} for backbone {name!r} does not exist; give the path of a state_dict "
            "of this backbone, or pretrained=False"
        )
    try:
        from timm.models import load_state_dict

        state = load_state_dict(path, use_ema=False)
    except Exception as err:
        raise PretrainedWeightsError(f"could not read checkpoint {path!r}: {err}") from err
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise PretrainedWeightsError(
            f"checkpoint {path!r} does not fit backbone {name!r}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"wrong shapes {wrong[:8]}"
        )
    net.load_state_dict(state, strict=True)


def build_swin3d(
    spec: BackboneSpec,
    in_channels: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: Pretrained = False,
    options: dict | None = None,
) -> SwinTransformer3d:
    """Builds the 3D Swin backbone of a registry row (``embed_dim``, ``depths``, ``num_heads`` from ``spec.extra``).

    Args:
        spec: a ``swin3d`` row of :data:`hmn.networks.backbones.BACKBONES`.
        in_channels: channels of the volume.
        img_size: an int or ``(D, H, W)``; checked, not needed to build (any size is taken).
        pretrained: ``False``, or the path of a state_dict of this same backbone (loaded strictly). No 3D Swin
            weights at these widths are published, so ``True`` raises :class:`PretrainedWeightsError`.
        options: ``drop_path_rate`` only (``BACKBONE_OPTIONS["swin3d"]``).

    Raises:
        ValueError: an unknown or bad option, a bad ``img_size`` or ``pretrained``.
        PretrainedWeightsError: ``pretrained=True``, or a checkpoint that is missing or does not fit.
    """
    options = _check_options(spec, options)
    _as_size_3d(img_size)
    if pretrained is True:
        raise PretrainedWeightsError(
            f"backbone {spec.name!r}: no pretrained 3D Swin weights of these widths are published (MONAI's SwinUNETR "
            "weights are 48 channels wide); pass the path of a state_dict of this backbone, or pretrained=False"
        )
    if not (pretrained is False or pretrained is None or isinstance(pretrained, (str, os.PathLike))):
        raise ValueError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    drop_path_rate = options.pop("drop_path_rate", 0.0)
    if not isinstance(drop_path_rate, (int, float)) or isinstance(drop_path_rate, bool) or not 0 <= drop_path_rate < 1:
        raise ValueError(f"backbone option drop_path_rate={drop_path_rate!r} must be a number in [0, 1)")
    net = SwinTransformer3d(
        in_channels=in_channels,
        embed_dim=spec.extra["embed_dim"],
        depths=spec.extra["depths"],
        num_heads=spec.extra["num_heads"],
        drop_path_rate=float(drop_path_rate),
    )
    if isinstance(pretrained, (str, os.PathLike)):
        _load_own_checkpoint(net, pretrained, spec.name)
    return net
