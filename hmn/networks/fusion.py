"""Adaptive multi-scale fusion: per-sample learned weights over the pyramid levels."""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

__all__ = ["AdaptiveScaleFusion"]


class AdaptiveScaleFusion(nn.Module):
    """Fuses the pyramid levels into one vector with weights that depend on the image.

    Each level is global-average-pooled; a small gating MLP reads all pooled descriptors and gives a
    softmax weight per level for that sample; the weighted sum is projected to ``out_channels``.
    A radiograph whose finding is a small nodule can so lean on the fine levels, one with
    cardiomegaly on the coarse ones. The weights of the last forward pass are kept in
    ``last_weights`` (``N, num_levels``) for inspection (by the Python module, not by its TorchScript).

    Args:
        channels: width of every level.
        num_levels: number of levels.
        out_channels: width of the fused vector (``fusion_channels``).
        hidden: width of the gating MLP (default ``channels // 4``).
    """

    def __init__(self, channels: int, num_levels: int, out_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or max(channels // 4, 16)
        self.num_levels = num_levels
        self.gate = nn.Sequential(nn.Linear(num_levels * channels, hidden), nn.GELU(), nn.Linear(hidden, num_levels))
        self.proj = nn.Sequential(nn.Linear(channels, out_channels), nn.LayerNorm(out_channels), nn.GELU())
        self.last_weights = None

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """``feats``: ``num_levels`` maps ``N, channels, *spatial`` -> ``N, out_channels``; another number of
        levels raises ``ValueError``."""
        if len(feats) != self.num_levels:
            raise ValueError(f"AdaptiveScaleFusion expects {self.num_levels} levels, got {len(feats)}")
        pooled = torch.stack([f.flatten(2).mean(-1) for f in feats], dim=1)  # N, L, C
        weights = torch.softmax(self.gate(pooled.flatten(1)), dim=-1)
        if not torch.jit.is_scripting():  # a Python-side record; a scripted module keeps none
            self.last_weights = weights.detach()
        return self.proj((weights.unsqueeze(-1) * pooled).sum(1))
