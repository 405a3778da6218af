"""Attention stages that act on the pyramid levels: CBAM, self-attention and cross-scale attention.

Every stage takes and returns a list of ``N, C, *spatial`` maps of one width ``C`` (the pyramid's),
so stages can be chained in any order. :func:`build_attention` turns a mode name, or a list of them,
into a stage; :data:`ATTENTION_MODES` lists the names.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv

from hmn.networks._utils import check_spatial_dims, from_tokens, pool_to_at_most, to_tokens

__all__ = [
    "ATTENTION_MODES",
    "CBAM",
    "ScaleSelfAttention",
    "CrossScaleAttention",
    "PerScale",
    "AttentionStack",
    "build_attention",
    "resolve_attention_modes",
]

ATTENTION_MODES = ("none", "cbam", "self", "cross_scale")


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., "CBAM: Convolutional Block Attention Module",
    ECCV 2018): channel attention from average- and max-pooled descriptors through a shared MLP, then
    spatial attention from the channel-wise average and maximum through a ``kernel_size`` convolution.

    Args:
        spatial_dims: 2 or 3.
        channels: input and output channels.
        reduction: channel reduction of the shared MLP.
        kernel_size: size of the spatial-attention convolution.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, check_spatial_dims(spatial_dims)]
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = conv(2, 1, kernel_size=kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        gate = torch.sigmoid(self.mlp(flat.mean(-1)) + self.mlp(flat.amax(-1)))
        for _ in range(x.dim() - 2):  # N, C -> N, C, 1, ... (no shape arithmetic: TorchScript, dynamic ONNX axes)
            gate = gate.unsqueeze(-1)
        x = x * gate
        desc = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(desc))


class _MultiHeadProjection(nn.Module):
    """Query, key, value and output projections of multi-head attention, computed with
    ``scaled_dot_product_attention`` (no explicit attention matrix is kept)."""

    def __init__(self, channels: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        self.dropout = dropout

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, c = queries.shape[0], queries.shape[1], queries.shape[2]
        h = self.num_heads
        q = self.q(queries).view(n, t, h, c // h).transpose(1, 2)
        kv = self.kv(context).view(n, context.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class ScaleSelfAttention(nn.Module):
    """Multi-head self-attention among the positions of one scale (pre-norm, residual).

    Every position is a query. Keys and values come from the same map, average-pooled to at most
    ``context_size`` positions per axis when it is larger, the spatial-reduction attention of
    PVT (Wang et al., "Pyramid Vision Transformer", ICCV 2021); a map that small already, or
    ``context_size=None``, gives exact full self-attention.

    Args:
        channels: token width.
        num_heads: attention heads; ``channels`` must divide by it.
        context_size: the key/value grid's largest side, or ``None`` for full resolution.
        dropout: attention dropout.
    """

    def __init__(self, channels: int, num_heads: int = 8, context_size: int | None = 7, dropout: float = 0.0) -> None:
        super().__init__()
        self.context_size = context_size
        self.norm = nn.LayerNorm(channels)
        self.attn = _MultiHeadProjection(channels, num_heads, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = to_tokens(x)
        context = self.norm(to_tokens(pool_to_at_most(x, self.context_size)))
        out = tokens + self.attn(self.norm(tokens), context)
        return from_tokens(out, x.shape[2:])


class CrossScaleAttention(nn.Module):
    """Cross-scale attention: each scale's tokens attend to the tokens of all the other scales.

    The context of scale ``i`` is the concatenation of every other scale's tokens, each map first
    average-pooled to at most ``context_size`` positions per axis (spatially reduced keys and values,
    as in PVT's spatial-reduction attention), so the cost grows with the number of query positions
    times a small constant. ``context_size=None`` uses every other scale at its full resolution; both
    run through ``scaled_dot_product_attention`` and never hold an explicit attention matrix of their own.
    Each scale has its own projections and norm; the update is residual.

    Args:
        channels: token width shared by all scales.
        num_levels: number of scales.
        num_heads: attention heads.
        context_size: largest side of each other scale's key/value grid, or ``None`` for full resolution.
        dropout: attention dropout.
    """

    def __init__(
        self,
        channels: int,
        num_levels: int,
        num_heads: int = 8,
        context_size: int | None = 7,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"cross-scale attention needs at least 2 scales, got {num_levels}")
        self.context_size = context_size
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(num_levels))
        self.attn = nn.ModuleList(_MultiHeadProjection(channels, num_heads, dropout) for _ in range(num_levels))

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """``num_levels`` maps ``N, channels, *spatial`` -> as many, same shapes; another number raises ``ValueError``."""
        if len(feats) != len(self.attn):
            raise ValueError(f"CrossScaleAttention expects {len(self.attn)} scales, got {len(feats)}")
        # Each scale's reduced, normalized tokens, computed once and shared by the other scales' queries.
        contexts = [norm(to_tokens(pool_to_at_most(feats[i], self.context_size))) for i, norm in enumerate(self.norms)]
        out: List[torch.Tensor] = []
        for i, (norm, attn) in enumerate(zip(self.norms, self.attn)):
            f = feats[i]
            tokens = to_tokens(f)
            others = torch.cat(contexts[:i] + contexts[i + 1 :], dim=1)
            out.append(from_tokens(tokens + attn(norm(tokens), others), f.shape[2:]))
        return out


class PerScale(nn.Module):
    """Applies its own copy of a single-map module to each scale."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(modules)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """One map per block -> the blocks' outputs, in order."""
        return [block(feats[i]) for i, block in enumerate(self.blocks)]


class AttentionStack(nn.Module):
    """Runs attention stages one after another; records the mode names in ``modes``."""

    def __init__(self, modes: Sequence[str], stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.modes = list(modes)
        self.stages = nn.ModuleList(stages)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        """A list of maps -> the list after every stage, in order (unchanged with no stage)."""
        feats = list(feats)
        for stage in self.stages:
            feats = stage(feats)
        return feats


def resolve_attention_modes(
    attention: str | Sequence[str] | None = None,
    use_modern_attention: bool | None = None,
    use_cross_scale_attention: bool | None = None,
) -> list[str]:
    """The attention stages to build, from the ``attention`` key or the original project's two flags.

    The flags map as: ``use_modern_attention`` False -> ``cbam``, True -> ``self`` (multi-head
    self-attention); ``use_cross_scale_attention`` True appends ``cross_scale``. So the recommended
    ConvNeXt/Swin setting (both True) is ``["self", "cross_scale"]``. Giving ``attention`` together
    with either flag is an error, since the two could disagree. With nothing given: ``["cbam"]``.
    """
    flags_given = use_modern_attention is not None or use_cross_scale_attention is not None
    if attention is not None and flags_given:
        raise ValueError(
            "give either attention=... or the use_modern_attention/use_cross_scale_attention flags, not both"
        )
    if attention is None:
        modes = ["self" if use_modern_attention else "cbam"]
        if use_cross_scale_attention:
            modes.append("cross_scale")
        return modes
    modes = [attention] if isinstance(attention, str) else list(attention)
    if not modes:
        raise ValueError(f"attention must name at least one mode of {ATTENTION_MODES}, got an empty list")
    for mode in modes:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"unknown attention mode {mode!r}; valid modes: {', '.join(ATTENTION_MODES)}")
    if "none" in modes and len(modes) > 1:
        raise ValueError(f"attention 'none' cannot be combined with other modes, got {modes}")
    return [m for m in modes if m != "none"]


def build_attention(
    modes: str | Sequence[str],
    spatial_dims: int,
    channels: int,
    num_levels: int,
    num_heads: int = 8,
    context_size: int | None = 7,
    dropout: float = 0.0,
) -> AttentionStack:
    """Builds the chain of attention stages named by ``modes`` (see :data:`ATTENTION_MODES`)."""
    modes = resolve_attention_modes(modes) if modes else []
    stages: list[nn.Module] = []
    for mode in modes:
        if mode == "cbam":
            stages.append(PerScale([CBAM(spatial_dims, channels) for _ in range(num_levels)]))
        elif mode == "self":
            stages.append(PerScale([ScaleSelfAttention(channels, num_heads, context_size, dropout) for _ in range(num_levels)]))
        elif mode == "cross_scale":
            stages.append(CrossScaleAttention(channels, num_levels, num_heads, context_size, dropout))
    return AttentionStack(modes, stages)
