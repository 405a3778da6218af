"""Adaptive fusion and heads against hand computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hmn.networks.fusion import AdaptiveScaleFusion
from hmn.networks.heads import HierarchicalHead, MultiLabelHead, split_hierarchical


def test_fusion_is_a_per_sample_softmax_weighting():
    torch.manual_seed(0)
    feats = [torch.randn(3, 8, 4, 4, dtype=torch.float64), torch.randn(3, 8, 2, 2, dtype=torch.float64)]
    fusion = AdaptiveScaleFusion(8, 2, 6).double()
    out = fusion(feats)
    pooled = torch.stack([f.mean((2, 3)) for f in feats], 1)
    g = fusion.gate
    logits = F.linear(F.gelu(F.linear(pooled.flatten(1), g[0].weight, g[0].bias)), g[2].weight, g[2].bias)
    w = torch.softmax(logits, -1)
    torch.testing.assert_close(fusion.last_weights, w)
    torch.testing.assert_close(fusion.last_weights.sum(1), torch.ones(3, dtype=torch.float64))
    assert not torch.allclose(w[0], w[1])  # weights depend on the image
    mixed = (w[..., None] * pooled).sum(1)
    p = fusion.proj
    want = F.gelu(F.layer_norm(F.linear(mixed, p[0].weight, p[0].bias), (6,), p[1].weight, p[1].bias))
    torch.testing.assert_close(out, want)


def test_hierarchical_head_conditions_fine_on_coarse():
    torch.manual_seed(1)
    head = HierarchicalHead(10, num_classes=5, num_coarse_classes=2).double().eval()
    x = torch.randn(4, 10, dtype=torch.float64)
    out = head(x)
    assert out.shape == (4, 7)
    fine, coarse = split_hierarchical(out, 5)
    torch.testing.assert_close(coarse, F.linear(x, head.coarse.weight, head.coarse.bias))
    want = F.linear(torch.cat([x, torch.sigmoid(coarse)], 1), head.fine.weight, head.fine.bias)
    torch.testing.assert_close(fine, want)


def test_multilabel_head_shape():
    head = MultiLabelHead(10, 14).eval()
    assert head(torch.randn(3, 10)).shape == (3, 14)
