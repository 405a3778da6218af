"""Feature pyramid against a hand-written top-down computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmn.networks.neck import FeaturePyramid


def test_pyramid_matches_reference():
    torch.manual_seed(0)
    chans = [4, 6, 8]
    feats = [torch.randn(2, c, s, s, dtype=torch.float64) for c, s in zip(chans, [8, 4, 2])]
    neck = FeaturePyramid(2, chans, 5).double()
    lat = [F.conv2d(f, m.weight, m.bias) for f, m in zip(feats, neck.lateral)]
    p2 = lat[2]
    p1 = lat[1] + p2.repeat_interleave(2, -1).repeat_interleave(2, -2)
    p0 = lat[0] + p1.repeat_interleave(2, -1).repeat_interleave(2, -2)
    want = [p + F.conv2d(p, m.weight, m.bias, padding=1, groups=5) for p, m in zip([p0, p1, p2], neck.smooth)]
    for g, w in zip(neck(feats), want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_pyramid_3d_and_odd_sizes():
    neck = FeaturePyramid(3, [3, 5], 4)
    out = neck([torch.randn(1, 3, 7, 5, 9), torch.randn(1, 5, 4, 3, 5)])
    assert [tuple(o.shape) for o in out] == [(1, 4, 7, 5, 9), (1, 4, 4, 3, 5)]


def test_pyramid_rejects_wrong_number_of_scales():
    neck = FeaturePyramid(2, [3, 5], 4)
    with pytest.raises(ValueError, match="expects 2 scales, got 1"):
        neck([torch.randn(1, 3, 4, 4)])
