"""Small dimension-generic helpers shared by the neck, attention and fusion stages."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["to_tokens", "from_tokens", "pool_to_at_most", "check_spatial_dims"]


def check_spatial_dims(spatial_dims: int) -> int:
    """Returns ``spatial_dims`` if it is 1, 2 or 3, else raises ``ValueError``."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``N, C, *spatial`` -> ``N, T, C`` with ``T`` the number of positions."""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``N, T, C`` -> ``N, C, *spatial``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *spatial)


_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pool_to_at_most(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Average-pools each spatial axis of ``x`` down to at most ``size`` positions.

    Axes already that small are left alone, so a map no larger than ``size`` in every axis passes
    through unchanged (the reduced attention context then equals the full one). ``size=None`` keeps
    the full resolution.
    """
    if size is None:
        return x
    spatial = x.shape[2:]
    target = tuple(min(int(s), int(size)) for s in spatial)
    if target == tuple(spatial):
        return x
    return _ADAPTIVE_AVG[len(spatial)](x, target)
