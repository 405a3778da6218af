"""Small dimension-generic helpers shared by the neck, attention and fusion stages."""

from __future__ import annotations

from typing import List, Optional

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


def from_tokens(tokens: torch.Tensor, spatial: List[int]) -> torch.Tensor:
    """``N, T, C`` -> ``N, C, *spatial``."""
    return tokens.transpose(1, 2).reshape([tokens.shape[0], tokens.shape[2]] + list(spatial))


def _bin_average_matrix(size: int, target: int, like: torch.Tensor) -> torch.Tensor:
    """``(target, size)``: row ``i`` averages positions ``floor(i * size / target)`` to
    ``ceil((i + 1) * size / target) - 1``, the bins of PyTorch's adaptive average pooling. ``size`` and
    ``target`` are ints (the annotation TorchScript reads), or 0-dim integer tensors while traced: then the
    matrix is recorded as a function of the traced input's size."""
    pos = torch.arange(size, device=like.device)
    i = torch.arange(target, device=like.device).unsqueeze(1)
    inside = (pos >= (i * size) // target) & (pos < ((i + 1) * size + target - 1) // target)
    weights = inside.to(like.dtype)
    return weights / weights.sum(1, keepdim=True)


def pool_to_at_most(x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    """Average-pools each spatial axis of ``x`` (``N, C, *spatial``, 1 to 3 spatial axes) down to at most
    ``size`` positions, with the bins of adaptive average pooling.

    Axes already that small are left alone, so a map no larger than ``size`` in every axis passes
    through unchanged (the reduced attention context then equals the full one). ``size=None`` keeps
    the full resolution.

    Each axis is multiplied by a bin-averaging matrix: what ``adaptive_avg_pool`` computes, written so that
    TorchScript compiles it and a trace (and an ONNX export from it, whose exporter refuses an adaptive
    pool of an input whose size it cannot see) records the pooling as a function of the input's size: a
    model exported with dynamic spatial axes pools a map of any size as the eager model does.
    """
    if size is None:
        return x
    for dim in range(2, x.dim()):
        n = x.shape[dim]
        if not torch.jit.is_scripting():  # TorchScript leaves this block out
            if torch.jit.is_tracing():
                # n is a 0-dim tensor here: no Python comparison, which the trace would freeze
                bins = _bin_average_matrix(n, torch.clamp(n, max=size), x)
                x = torch.matmul(x.transpose(dim, -1), bins.t()).transpose(dim, -1)
                continue
        if n > size:
            bins = _bin_average_matrix(n, size, x)
            x = torch.matmul(x.transpose(dim, -1), bins.t()).transpose(dim, -1)
    return x
