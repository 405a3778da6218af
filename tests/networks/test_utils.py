"""The pooled attention context (hmn.networks._utils.pool_to_at_most) against bins computed here by hand:
eagerly, scripted, and traced at one size then run at others."""

from __future__ import annotations

import math

import pytest
import torch

from hmn.networks._utils import pool_to_at_most

F64 = torch.float64


def _bins_by_hand(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling written as loops: output cell i of an axis of n positions averages input
    positions floor(i n / t) .. ceil((i + 1) n / t) - 1, t = min(n, size)."""
    spatial = list(x.shape[2:])
    targets = [min(n, size) for n in spatial]
    out = torch.empty(*x.shape[:2], *targets, dtype=x.dtype)
    for cell in torch.cartesian_prod(*[torch.arange(t) for t in targets]).reshape(-1, len(targets)).tolist():
        index = [slice(None), slice(None)]
        for i, n, t in zip(cell, spatial, targets):
            index.append(slice(math.floor(i * n / t), math.ceil((i + 1) * n / t)))
        out[(slice(None), slice(None), *cell)] = x[tuple(index)].mean(dim=tuple(range(2, x.dim())))
    return out


@pytest.mark.parametrize("shape", [(2, 3, 28, 28), (2, 3, 14, 21), (1, 2, 9, 13), (2, 3, 16), (1, 2, 28, 14, 9),
                                   (2, 3, 8, 8), (2, 3, 3, 5), (2, 3, 7, 30)])
def test_pooling_matches_adaptive_bins(shape):
    x = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(sum(shape)))
    out = pool_to_at_most(x, 7)
    torch.testing.assert_close(out, _bins_by_hand(x, 7))
    if all(n <= 7 for n in shape[2:]):
        assert out is x  # nothing to pool: the map itself
    assert pool_to_at_most(x, None) is x


def test_scripted_and_traced_pooling_follow_the_input_size():
    """TorchScript compiles it; a trace taken at one size records the pooling as a function of the size, so an
    ONNX graph with dynamic spatial axes pools another size as the eager function does."""

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return pool_to_at_most(x, 7)

    scripted = torch.jit.script(Pool())
    traced = torch.jit.trace(Pool(), torch.randn(1, 2, 28, 13))
    for shape in [(1, 2, 28, 13), (3, 2, 9, 30), (2, 2, 5, 5), (1, 2, 40, 32)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2]))
        want = _bins_by_hand(x.double(), 7).float()
        torch.testing.assert_close(scripted(x), want)
        torch.testing.assert_close(traced(x), want)
