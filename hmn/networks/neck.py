"""Feature pyramid neck: every backbone scale projected to one width, with a top-down pathway."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv

from hmn.networks._utils import check_spatial_dims

__all__ = ["FeaturePyramid"]


class FeaturePyramid(nn.Module):
    """FPN-style neck (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017).

    A 1x1 lateral convolution takes each backbone scale to ``out_channels``; going from the coarsest
    scale to the finest, each level adds the nearest-neighbour upsampled level above it; a depthwise
    3x3 convolution then smooths the aliasing of the upsampling. The depthwise smoothing (instead of
    the paper's dense 3x3) keeps the neck cheap next to the backbone: a dense 3x3 at stride 4 alone
    costs most of a ConvNeXt-T forward pass.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: channels of each backbone scale, finest first.
        out_channels: the common width of every pyramid level (``fpn_channels``).
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, check_spatial_dims(spatial_dims)]
        if len(in_channels) < 1:
            raise ValueError("FeaturePyramid needs at least one input scale")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(conv(c, out_channels, kernel_size=1) for c in in_channels)
        self.smooth = nn.ModuleList(
            conv(out_channels, out_channels, kernel_size=3, padding=1, groups=out_channels) for _ in in_channels
        )

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """``feats``: one ``N, in_channels[i], *spatial`` map per scale, finest first -> as many
        ``N, out_channels, *spatial`` maps; another number of scales raises ``ValueError``."""
        if len(feats) != len(self.lateral):
            raise ValueError(f"FeaturePyramid expects {len(self.lateral)} scales, got {len(feats)}")
        laterals: List[torch.Tensor] = []
        for i, lat in enumerate(self.lateral):  # indexed: TorchScript zips a ModuleList with no list
            laterals.append(lat(feats[i]))
        out = [laterals[-1]]
        for i in range(len(laterals) - 2, -1, -1):  # coarse to fine (a loop TorchScript compiles)
            level = laterals[i]
            out.insert(0, level + F.interpolate(out[0], size=level.shape[2:], mode="nearest"))
        return [smooth(out[i]) + out[i] for i, smooth in enumerate(self.smooth)]
