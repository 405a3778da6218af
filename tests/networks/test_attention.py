"""Attention stages against reference computations written here, in double precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hmn.networks.attention import (
    CBAM,
    CrossScaleAttention,
    ScaleSelfAttention,
    build_attention,
    resolve_attention_modes,
)


def _mha_reference(proj, queries, context):
    """Multi-head attention with an explicit softmax matrix, from the module's weights."""
    n, t, c = queries.shape
    h = proj.num_heads
    q = queries @ proj.q.weight.T + proj.q.bias
    kv = context @ proj.kv.weight.T + proj.kv.bias
    k, v = kv[..., :c], kv[..., c:]
    split = lambda z: z.reshape(n, z.shape[1], h, c // h).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    out = torch.softmax(scores, dim=-1) @ v
    out = out.permute(0, 2, 1, 3).reshape(n, t, c)
    return out @ proj.proj.weight.T + proj.proj.bias


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _block_mean(x, size):
    """Average over equal blocks (the maps below divide evenly), written without adaptive pooling."""
    n, c, hh, ww = x.shape
    th, tw = min(hh, size), min(ww, size)
    return x.reshape(n, c, th, hh // th, tw, ww // tw).mean(dim=(3, 5))


def _tokens(x):
    return x.flatten(2).transpose(1, 2)


def _cross_scale_reference(module, feats, context_size):
    contexts = []
    for f, ln in zip(feats, module.norms):
        pooled = f if context_size is None else _block_mean(f, context_size)
        contexts.append(_layer_norm(_tokens(pooled), ln))
    outs = []
    for i, f in enumerate(feats):
        tok = _tokens(f)
        ctx = torch.cat([c for j, c in enumerate(contexts) if j != i], dim=1)
        upd = _mha_reference(module.attn[i], _layer_norm(tok, module.norms[i]), ctx)
        outs.append((tok + upd).transpose(1, 2).reshape(f.shape))
    return outs


@pytest.fixture
def pyramid():
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    return [torch.randn(2, 16, *s, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("context_size", [2, 4, None])
def test_cross_scale_matches_reference(pyramid, context_size):
    torch.manual_seed(1)
    module = CrossScaleAttention(16, num_levels=3, num_heads=4, context_size=context_size).double().eval()
    got = module(pyramid)
    want = _cross_scale_reference(module, pyramid, context_size)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_cross_scale_reduced_equals_full_when_context_covers_every_map(pyramid):
    torch.manual_seed(2)
    full = CrossScaleAttention(16, 3, num_heads=4, context_size=None).double().eval()
    reduced = CrossScaleAttention(16, 3, num_heads=4, context_size=8).double().eval()
    reduced.load_state_dict(full.state_dict())
    for a, b in zip(full(pyramid), reduced(pyramid)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cross_scale_reduction_changes_result(pyramid):
    torch.manual_seed(3)
    full = CrossScaleAttention(16, 3, num_heads=4, context_size=None).double().eval()
    reduced = CrossScaleAttention(16, 3, num_heads=4, context_size=2).double().eval()
    reduced.load_state_dict(full.state_dict())
    # scale 2 (2x2) attends to the 8x8 and 4x4 maps, which the reduced context pools.
    assert not torch.allclose(full(pyramid)[2], reduced(pyramid)[2])


@pytest.mark.parametrize("context_size", [2, None])
def test_self_attention_matches_reference(context_size):
    torch.manual_seed(4)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    module = ScaleSelfAttention(16, num_heads=2, context_size=context_size).double().eval()
    tok = _tokens(x)
    pooled = x if context_size is None else _block_mean(x, context_size)
    ctx = _layer_norm(_tokens(pooled), module.norm)
    want = (tok + _mha_reference(module.attn, _layer_norm(tok, module.norm), ctx)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(module(x), want, rtol=1e-10, atol=1e-10)


def test_cbam_matches_reference():
    torch.manual_seed(5)
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    m = CBAM(2, 16, reduction=2, kernel_size=3).double()
    mlp = lambda v: F.linear(F.relu(F.linear(v, m.mlp[0].weight, m.mlp[0].bias)), m.mlp[2].weight, m.mlp[2].bias)  # noqa: E731
    ch = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    y = x * ch
    sp = torch.sigmoid(F.conv2d(torch.stack([y.mean(1), y.amax(1)], 1), m.spatial.weight, m.spatial.bias, padding=1))
    torch.testing.assert_close(m(x), y * sp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("modes", ["cbam", "self", "cross_scale", ["self", "cross_scale"], "none"])
def test_stages_are_dimension_generic(modes):
    feats = [torch.randn(1, 16, 8, 8, 8), torch.randn(1, 16, 4, 4, 4)]
    stack = build_attention(modes, spatial_dims=3, channels=16, num_levels=2, num_heads=4, context_size=2)
    out = stack(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]


def test_mode_resolution_from_original_flags():
    assert resolve_attention_modes() == ["cbam"]
    assert resolve_attention_modes(use_modern_attention=True) == ["self"]
    assert resolve_attention_modes(use_modern_attention=False, use_cross_scale_attention=True) == ["cbam", "cross_scale"]
    assert resolve_attention_modes(use_modern_attention=True, use_cross_scale_attention=True) == ["self", "cross_scale"]
    assert resolve_attention_modes("none") == []
    with pytest.raises(ValueError, match="either attention"):
        resolve_attention_modes("cbam", use_modern_attention=True)
    with pytest.raises(ValueError, match="unknown attention mode 'selfie'.*cross_scale"):
        resolve_attention_modes("selfie")
