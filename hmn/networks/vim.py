"""Vision Mamba (Vim) backbones: ``vim_tiny``, ``vim_small`` and ``vim_base``.

Vim (Zhu et al., 2024, "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State
Space Model", ICML, arXiv:2401.09417) replaces the self-attention of a plain ViT with bidirectional Mamba
blocks (Gu & Dao, 2023, arXiv:2312.00752): the image is cut into 16 x 16 patches, a class token is put
in the middle of the patch sequence, learned absolute position embeddings are added, and every block
scans the token sequence forwards and backwards with a selective state space model. Its cost grows
linearly with the number of tokens, which matters for large radiographs.

The model here follows the published architecture (bidirectional "v2" blocks with their own convolution,
projections, ``A``, ``D`` and step sizes per direction, RMSNorm, the two directions averaged, patch 16,
state size 16, expansion 2) and uses hustvl/Vim's parameter names, so its checkpoints load directly.
The selective scan runs on the CPU or any GPU through :mod:`hmn.networks.selective_scan`, and through
``mamba_ssm``'s CUDA kernel where that is installed.

Multi-scale outputs. Vim is a plain (non-hierarchical) model whose tokens all lie on one stride-16 grid.
For the HybridMedNet neck, :class:`VimBackbone` takes the token sequence after blocks ``depth/4``,
``depth/2``, ``3 depth/4`` and ``depth`` (6, 12, 18 and 24 of 24, the layers hustvl/Vim's segmentation
model uses), drops the class token, reshapes the patch tokens to their 2D grid and turns the four maps
into a pyramid at strides 4, 8, 16 and 32, as in ViTDet's simple feature pyramid (Li et al., 2022,
"Exploring Plain Vision Transformer Backbones for Object Detection") and BEiT/ViT-Adapter segmentation:
the shallowest map is upsampled 4x by two stride-2 transposed convolutions, the next 2x by one, the third
is kept and the deepest is max-pooled 2x. Channels halve with each 2x upsampling, like a hierarchical
backbone: ``[dim/4, dim/2, dim, dim]``. These adapters are not part of the published model and are
initialised afresh; the strides match every other backbone, so the neck, attention and fusion stages
work unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hmn.networks.backbones import Backbone, BackboneSpec, Pretrained, PretrainedWeightsError, _as_size
from hmn.networks.selective_scan import SCAN_IMPLS, selective_scan, selective_scan_export_state

__all__ = [
    "BiMambaMixer",
    "RMSNorm",
    "VimBlock",
    "VisionMamba",
    "VimBackbone",
    "build_vim",
    "causal_depthwise_conv1d",
    "load_vim_checkpoint",
    "resample_pos_embed",
]

logger = logging.getLogger(__name__)


class BiMambaMixer(nn.Module):
    """The bidirectional Mamba mixer of a Vim block (Zhu et al., 2024; Mamba: Gu & Dao, 2023).

    One input projection gives ``x`` and the gate ``z``; then, once over the token sequence and once over
    the reversed sequence, each direction with its own parameters: a causal depthwise convolution and
    SiLU, an input-dependent step size ``delta`` (low rank, softplus) and input-dependent ``B`` and ``C``,
    and the selective scan with its own ``A`` and skip ``D``, gated by ``silu(z)``. The two outputs (the
    backward one flipped back) are averaged and projected back to the model width.

    Args:
        dim: model width.
        d_state: state size ``N`` of the scan.
        d_conv: kernel size of the causal convolution.
        expand: inner width is ``expand * dim``.
        dt_rank: rank of the step-size projection; ``None`` for ``ceil(dim / 16)``.
        dt_min, dt_max: range of the initial step sizes (log-uniform), as in Mamba.
        scan_impl: selective scan implementation, see :func:`hmn.networks.selective_scan.selective_scan`.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"unknown scan_impl {scan_impl!r}; valid: {', '.join(SCAN_IMPLS)}")
        self.dim = dim
        self.d_state = d_state
        self.d_inner = int(expand * dim)
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else int(dt_rank)
        self.scan_impl = scan_impl
        inner = self.d_inner
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        # Forward-direction parameters keep Mamba's names; the backward direction's carry a "_b".
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, f"dt_proj{suffix}", nn.Linear(self.dt_rank, inner, bias=True))
        # S4D-real initialisation A = -(1..N) for every channel, stored as log(-A) so A stays negative.
        a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)
        self.A_log = nn.Parameter(a_log.clone())
        self.A_b_log = nn.Parameter(a_log.clone())
        self.D = nn.Parameter(torch.ones(inner))
        self.D_b = nn.Parameter(torch.ones(inner))
        for p in (self.A_log, self.A_b_log, self.D, self.D_b):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self._dt_range = (dt_min, dt_max)
        self.reset_dt()

    def reset_dt(self) -> None:
        """Mamba's step-size initialisation: small uniform ``dt_proj`` weights, and biases such that
        ``softplus(bias)`` is log-uniform in ``[dt_min, dt_max]``."""
        dt_min, dt_max = self._dt_range
        std = self.dt_rank**-0.5
        for proj in (self.dt_proj, self.dt_proj_b):
            nn.init.uniform_(proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=1e-4)
            with torch.no_grad():
                proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus

    def scan_direction(self, xz: torch.Tensor, backward: bool) -> torch.Tensor:
        """One direction's output ``(batch, inner, length)`` for ``xz = in_proj(x)`` as ``(batch, 2 inner,
        length)``; with ``backward`` the sequence is scanned from its end (the result is in scan order)."""
        if backward:
            return self._direction(xz.flip(-1), self.conv1d_b.weight, self.conv1d_b.bias, self.x_proj_b.weight,
                                   self.dt_proj_b.weight, self.dt_proj_b.bias, self.A_b_log, self.D_b)  # fmt: skip
        return self._direction(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                               self.dt_proj.bias, self.A_log, self.D)  # fmt: skip

    def _direction(
        self,
        xz: torch.Tensor,
        conv_weight: torch.Tensor,
        conv_bias: Optional[torch.Tensor],
        x_proj_weight: torch.Tensor,
        dt_proj_weight: torch.Tensor,
        dt_proj_bias: Optional[torch.Tensor],
        a_log: torch.Tensor,
        skip: torch.Tensor,
    ) -> torch.Tensor:
        # One direction's parameters are passed as tensors (not looked up by name) so TorchScript compiles it.
        x, z = xz.chunk(2, dim=1)
        x = F.silu(causal_depthwise_conv1d(x, conv_weight, conv_bias))
        x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)  # (batch, length, rank + 2 N)
        parts = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(parts[0], dt_proj_weight).transpose(1, 2)  # the bias goes into the scan (delta_bias)
        b = parts[1].transpose(1, 2).contiguous()
        c = parts[2].transpose(1, 2).contiguous()
        a = -torch.exp(_fp32_at_least(a_log))
        bias: Optional[torch.Tensor] = None
        if dt_proj_bias is not None:
            bias = _fp32_at_least(dt_proj_bias)
        if not torch.jit.is_scripting():  # TorchScript leaves this block out
            if not _exporting():
                return selective_scan(x, delta, a, b, c, D=_fp32_at_least(skip), z=z, delta_bias=bias,
                                      delta_softplus=True, impl=self.scan_impl)  # fmt: skip
        # scripted, traced or exported: plain tensor operations that all three follow, whatever scan_impl says
        return selective_scan_export_state(x, delta, a, b, c, _fp32_at_least(skip), z, bias, True)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, length, dim)`` -> ``(batch, length, dim)``."""
        xz = self.in_proj(x).transpose(1, 2)
        y = self.scan_direction(xz, backward=False) + self.scan_direction(xz, backward=True).flip(-1)
        return self.out_proj((y / 2).transpose(1, 2))


def _exporting() -> bool:
    """Whether this forward pass is being traced (``torch.jit.trace``, the TorchScript-based ONNX exporter)
    or exported (``torch.onnx.export``, ``torch.export``)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6; the project allows 2.4
    return bool(is_exporting is not None and is_exporting())


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Mamba's short causal convolution, ``(batch, channels, length)`` with ``weight`` ``(channels, 1, k)``:
    ``out_t = bias + sum_j weight[:, j] * x_{t - (k - 1 - j)}``. Written as ``k`` shifted multiply-adds, which
    on CPUs is many times faster than a grouped ``conv1d`` (and needs no ``causal-conv1d`` package)."""
    k = weight.shape[-1]
    length = x.shape[-1]
    padded = F.pad(x, (k - 1, 0))
    w = weight[:, 0].to(x.dtype)
    out = x * w[:, k - 1, None]
    if bias is not None:
        out = out + bias.to(x.dtype)[:, None]
    for j in range(k - 1):
        out = out + padded[..., j : j + length] * w[:, j, None]
    return out


def _fp32_at_least(t: torch.Tensor) -> torch.Tensor:
    # A, D and the step-size bias stay in float32 under half precision (as Mamba keeps them); float64 stays.
    return t.to(torch.promote_types(t.dtype, torch.float32))


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (Zhang & Sennrich, 2019), written out in basic operations while traced or exported: the
    TorchScript-based ONNX exporter has no ``aten::rms_norm`` ("not supported" at opset 20). Eagerly and
    scripted it is ``F.rms_norm``; the parameter is ``weight``, as hustvl/Vim's checkpoints name it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., normalized_shape)`` -> the same shape."""
        if not torch.jit.is_scripting():  # TorchScript leaves this block out
            if _exporting():
                eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
                axes = list(range(-len(self.normalized_shape), 0))
                out = x * torch.rsqrt(x.pow(2).mean(axes, keepdim=True) + eps)
                return out * self.weight if self.weight is not None else out
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class VimBlock(nn.Module):
    """A pre-norm residual Vim block: ``x + drop_path(mixer(RMSNorm(x)))`` (Zhu et al., 2024)."""

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = _drop_path_module(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mixer(self.norm(x)))


def _drop_path_module(rate: float) -> nn.Module:
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: Tuple[int, int],
    new_grid: Tuple[int, int],
) -> torch.Tensor:
    """Position embeddings ``(1, gh*gw + 1, dim)`` with the class token's entry in the middle (index
    ``gh*gw // 2``, as Vim places it) resampled from ``old_grid`` to ``new_grid`` (``(rows, columns)``;
    bicubic on the patch grid; the class token's entry is kept and moved to the middle of the new
    sequence). The same grid returns ``pos_embed`` itself; a ``pos_embed`` that does not fit ``old_grid``
    raises ``ValueError``. TorchScript compiles it."""
    old_h, old_w = int(old_grid[0]), int(old_grid[1])
    new_h, new_w = int(new_grid[0]), int(new_grid[1])
    n_old = old_h * old_w
    if pos_embed.dim() != 3 or pos_embed.shape[1] != n_old + 1:
        raise ValueError(
            f"pos_embed of shape {list(pos_embed.shape)} does not fit a {old_h}x{old_w} grid "
            f"plus a class token (expected (1, {n_old + 1}, dim))"
        )
    if old_h == new_h and old_w == new_w:
        return pos_embed
    mid = n_old // 2
    cls = pos_embed[:, mid : mid + 1]
    patches = torch.cat([pos_embed[:, :mid], pos_embed[:, mid + 1 :]], dim=1)
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=[new_h, new_w], mode="bicubic", align_corners=False).to(pos_embed.dtype)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)
    new_mid = patches.shape[1] // 2
    return torch.cat([patches[:, :new_mid], cls, patches[:, new_mid:]], dim=1)


class VisionMamba(nn.Module):
    """The Vim trunk (Zhu et al., 2024): patch embedding, middle class token, absolute position
    embeddings, ``depth`` bidirectional Mamba blocks and a final RMSNorm; no classifier.

    ``forward_features(x, taps)`` returns the token sequences after the blocks listed in ``taps``
    (the last block's through the final norm), the patch grid, and the class token's index.

    Args:
        embed_dim: model width (192 tiny, 384 small, 768 base).
        depth: number of blocks (24 for the published sizes).
        in_channels: image channels (1 for radiographs, 3 for RGB).
        img_size: the input size the position embeddings are built for; other sizes are interpolated to.
        patch_size: patch (and stride) size of the embedding.
        d_state: state size of the scan (16).
        expand: inner width factor of the mixer (2).
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        scan_impl: selective scan implementation of every block.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 24,
        in_channels: int = 3,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        d_state: int = 16,
        expand: int = 2,
        drop_path_rate: float = 0.0,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        size = _as_size(img_size)
        if size[0] < patch_size or size[1] < patch_size:
            raise ValueError(f"img_size {img_size!r} is smaller than one {patch_size}x{patch_size} patch")
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.img_size = size
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 1 else [drop_path_rate]
        self.layers = nn.ModuleList(
            VimBlock(embed_dim, drop_path=r, d_state=d_state, expand=expand, scan_impl=scan_impl) for r in rates
        )
        self.norm_f = RMSNorm(embed_dim, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        from timm.layers import lecun_normal_, trunc_normal_

        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for block in self.layers:
            # Mamba/GPT-2: residual output projections scaled by 1/sqrt(depth) at initialisation.
            out = block.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out, a=math.sqrt(5))
            with torch.no_grad():
                out.div_(math.sqrt(self.depth))

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that optimizers usually exclude from weight decay."""
        names = {"pos_embed", "cls_token"}
        names.update(n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    def set_scan_impl(self, impl: str) -> None:
        """Switches the selective scan implementation of every block (see ``selective_scan``)."""
        if impl not in SCAN_IMPLS:
            raise ValueError(f"unknown scan_impl {impl!r}; valid: {', '.join(SCAN_IMPLS)}")
        for block in self.layers:
            block.mixer.scan_impl = impl

    def pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embeddings for a patch grid, interpolated when it differs from the configured one."""
        return resample_pos_embed(self.pos_embed, self.grid_size, grid)

    def forward_features(
        self, x: torch.Tensor, taps: Optional[List[int]] = None
    ) -> Tuple[List[torch.Tensor], Tuple[int, int], int]:
        """Token sequences ``(batch, tokens, dim)`` after the blocks in ``taps`` (0-based; default: the
        last), the last one normalised by ``norm_f``; also the patch grid and the class token's index.
        ``x`` is ``(batch, channels, height, width)``; another rank, or an image smaller than one patch,
        raises ``ValueError``."""
        taps = [self.depth - 1] if taps is None else list(taps)
        if not torch.jit.is_scripting():
            x = _plain_tensor(x)
        if x.dim() != 4:
            raise ValueError(f"Vim expects images (batch, channels, height, width), got shape {list(x.shape)}")
        patches = self.patch_embed.proj(x)
        grid = (patches.shape[-2], patches.shape[-1])
        if grid[0] < 1 or grid[1] < 1:
            raise ValueError(f"input {list(x.shape[-2:])} is smaller than one {self.patch_size}-pixel patch")
        tokens = patches.flatten(2).transpose(1, 2)
        mid = tokens.shape[1] // 2  # the class token goes in the middle of the sequence
        cls = self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        tokens = torch.cat([tokens[:, :mid], cls, tokens[:, mid:]], dim=1)
        # The residual stream is kept in float32 under autocast (Vim's residual_in_fp32).
        h = _fp32_at_least(tokens) + _fp32_at_least(self.pos_embed_for(grid))
        outs: List[torch.Tensor] = []
        last = max(taps)
        for i, block in enumerate(self.layers):
            if i <= last:  # the blocks after the last tap are skipped (no break: TorchScript unrolls this loop)
                h = block(h)
                if i in taps:
                    outs.append(self.norm_f(h) if i == self.depth - 1 else h)
        return outs, grid, mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's final features ``(batch, dim)``, as Vim's classifier reads them."""
        outs, _, mid = self.forward_features(x)
        return outs[-1][:, mid]


def _plain_tensor(x: torch.Tensor) -> torch.Tensor:
    # A MONAI MetaTensor batch would try to slice its per-image metadata along with the tokens.
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


class VimBackbone(Backbone):
    """Vim as a HybridMedNet backbone: a :class:`VisionMamba` trunk plus the pyramid adapters described
    in the module docstring, returning four ``N, C, H, W`` maps at strides 4, 8, 16 and 32.

    Args:
        embed_dim, depth, in_channels, img_size, patch_size, d_state, expand, drop_path_rate, scan_impl:
            as :class:`VisionMamba`.
        out_indices: the four blocks (0-based) whose tokens feed strides 4, 8, 16 and 32; default
            ``depth/4 - 1``, ``depth/2 - 1``, ``3 depth/4 - 1``, ``depth - 1``.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 24,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        d_state: int = 16,
        expand: int = 2,
        drop_path_rate: float = 0.0,
        scan_impl: str = "auto",
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4 for the stride-4 level, got {patch_size}")
        if out_indices is None:
            out_indices = [max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)]
        out_indices = [int(i) for i in out_indices]
        if len(out_indices) != 4 or sorted(out_indices) != out_indices or not all(0 <= i < depth for i in out_indices):
            raise ValueError(
                f"out_indices must be four increasing block indices in [0, {depth - 1}], got {out_indices!r}"
            )
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
        self.trunk = VisionMamba(
            embed_dim=embed_dim, depth=depth, in_channels=in_channels, img_size=img_size,
            patch_size=patch_size, d_state=d_state, expand=expand, drop_path_rate=drop_path_rate,
            scan_impl=scan_impl,
        )  # fmt: skip
        self.out_indices = out_indices
        d = embed_dim
        from timm.layers import LayerNorm2d

        # Intermediate taps get their own LayerNorm; the last goes through the trunk's norm_f, so its slot is an
        # Identity (no parameters: the state_dict is that of three norms), which lets forward zip the two lists.
        self.tap_norms = nn.ModuleList([nn.LayerNorm(d) for _ in out_indices[:-1]] + [nn.Identity()])
        self.adapters = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                    nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2),
                ),  # fmt: skip
                nn.ConvTranspose2d(d, d // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        )
        self.channels = [d // 4, d // 2, d, d]
        self.strides = [patch_size // 4, patch_size // 2, patch_size, patch_size * 2]

    def keep_levels(self, levels: Sequence[int]) -> None:
        """Drops the adapters (and tap norms) of unused outputs; those outputs become the bare
        stride-16 token grid, which nothing downstream reads."""
        for i in range(len(self.adapters)):
            if i not in levels:
                self.adapters[i] = nn.Identity()
                self.tap_norms[i] = nn.Identity()

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(batch, in_channels, H, W)`` -> four ``(batch, channels[i], H / strides[i], W / strides[i])`` maps."""
        tokens, grid, mid = self.trunk.forward_features(x, self.out_indices)
        feats: List[torch.Tensor] = []
        for i, (norm, adapter) in enumerate(zip(self.tap_norms, self.adapters)):
            t = norm(tokens[i])
            patches = torch.cat([t[:, :mid], t[:, mid + 1 :]], dim=1)  # drop the class token
            fmap = patches.transpose(1, 2).reshape(t.shape[0], t.shape[2], grid[0], grid[1])
            feats.append(adapter(fmap))
        return feats


# ----------------------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------------------


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(
            f"checkpoint {path!r} holds no state_dict (a dict of tensors, possibly under 'model' or 'state_dict')"
        )
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_vim_checkpoint(backbone: VimBackbone, path: str | os.PathLike) -> None:
    """Loads a local checkpoint into ``backbone``.

    Accepted: this project's ``VimBackbone`` state_dict (keys ``trunk.*``, ``tap_norms.*``,
    ``adapters.*``), or a hustvl/Vim ``VisionMamba`` checkpoint (``{"model": state_dict}``; its classifier
    ``head.*`` is dropped and the pyramid adapters stay freshly initialised). Position embeddings are
    resampled to the configured image size, and RGB patch-embedding weights are summed for one input
    channel (one-channel weights repeated / 3 for RGB). Missing and unexpected keys are logged as a
    warning; a checkpoint that matches nothing or has a tensor of the wrong shape raises
    :class:`PretrainedWeightsError`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(
            f"pretrained checkpoint {path!r} for the Vim backbone does not exist; give the path of a "
            "hustvl/Vim or HybridMedNet Vim state_dict, or pretrained=False"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise PretrainedWeightsError(f"could not read checkpoint {path!r}: {err}") from err
    state = _unwrap_state_dict(raw, path)
    project_format = any(k.startswith(("trunk.", "adapters.", "tap_norms.")) for k in state)
    if not project_format:
        dropped = [k for k in state if k.startswith("head.")]
        if dropped:
            logger.info("Vim checkpoint %s: dropping the classifier (%s)", path, ", ".join(dropped))
        state = {f"trunk.{k}": v for k, v in state.items() if not k.startswith("head.")}

    own = backbone.state_dict()
    trunk: VisionMamba = backbone.trunk
    pe = state.get("trunk.pos_embed")
    # Position embeddings of another grid are resampled; another width is reported with the other shapes.
    if pe is not None and pe.shape != own["trunk.pos_embed"].shape and pe.dim() == 3 and pe.shape[2] == trunk.embed_dim:
        n = pe.shape[1] - 1
        side = math.isqrt(max(n, 0))
        if side * side != n:
            raise PretrainedWeightsError(
                f"checkpoint {path!r}: pos_embed of shape {tuple(pe.shape)} is not a square grid plus a class "
                f"token, so it cannot be resampled to {tuple(own['trunk.pos_embed'].shape)}"
            )
        state["trunk.pos_embed"] = resample_pos_embed(pe, (side, side), trunk.grid_size)
        logger.info("Vim checkpoint %s: position embeddings resampled from %dx%d to %dx%d", path, side, side,
                    *trunk.grid_size)  # fmt: skip
    key = "trunk.patch_embed.proj.weight"
    if key in state and state[key].shape != own[key].shape and state[key].dim() == 4:
        w, c_model = state[key], own[key].shape[1]
        if w.shape[1] == 3 and c_model == 1:
            state[key] = w.sum(1, keepdim=True)
        elif w.shape[1] == 1 and c_model == 3:
            state[key] = w.repeat(1, 3, 1, 1) / 3
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise PretrainedWeightsError(
            f"checkpoint {path!r} does not fit this Vim backbone (another size?): " + "; ".join(wrong[:5])
            + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )  # fmt: skip
    matched = [k for k in state if k in own]
    if not matched:
        raise PretrainedWeightsError(
            f"checkpoint {path!r} shares no parameter name with the Vim backbone (e.g. {next(iter(state), None)!r}); "
            "expected hustvl/Vim keys (patch_embed.proj.weight, layers.0.mixer.A_log, ...) or this project's"
        )
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if project_format or k.startswith("trunk.")]
    if missing:
        logger.warning("Vim checkpoint %s lacks %d parameters, left as initialised: %s", path, len(missing),
                       ", ".join(missing))  # fmt: skip
    if result.unexpected_keys:
        logger.warning("Vim checkpoint %s has %d keys this model does not use, ignored: %s", path,
                       len(result.unexpected_keys), ", ".join(result.unexpected_keys))  # fmt: skip
    logger.info("loaded %d tensors into the Vim backbone from %s", len(matched), path)


# ----------------------------------------------------------------------------------------------------------
# The registry builder.
# ----------------------------------------------------------------------------------------------------------

def build_vim(
    spec: BackboneSpec,
    in_channels: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: Pretrained = False,
    options: dict | None = None,
    **kwargs,
) -> VimBackbone:
    """Builds the Vim backbone of a registry row (``embed_dim``, ``depth`` and any other
    :class:`VimBackbone` argument from ``spec.extra``).

    ``pretrained``: ``False``, or the path of a local checkpoint (see :func:`load_vim_checkpoint`); ``True``
    raises :class:`PretrainedWeightsError`, since no model hub serves Vim weights. Extra keyword arguments
    (``scan_impl``, ``drop_path_rate``, ``out_indices``) go to :class:`VimBackbone`; so do ``options``
    (``scan_impl``, as :data:`hmn.networks.backbones.BACKBONE_OPTIONS` lists for the family).
    """
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3 for a Vim backbone, got {in_channels!r}")
    if pretrained is True:
        raise PretrainedWeightsError(
            f"backbone {spec.name!r}: Vim weights have no model hub source (timm has none); download a "
            "hustvl/Vim checkpoint where the internet is reachable and pass pretrained='/path/to/checkpoint.pth', "
            "or use pretrained=False"
        )
    if not (pretrained is False or pretrained is None or isinstance(pretrained, (str, os.PathLike))):
        raise ValueError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")
    config = dict(spec.extra)
    if "embed_dim" not in config or "depth" not in config:
        raise ValueError(f"backbone row {spec.name!r} needs embed_dim and depth in its extra, got {config!r}")
    config.update(options or {})
    config.update(kwargs)
    net = VimBackbone(in_channels=in_channels, img_size=img_size, **config)
    if isinstance(pretrained, (str, os.PathLike)):
        load_vim_checkpoint(net, pretrained)
    return net
