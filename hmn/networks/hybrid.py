"""HybridMedNet: backbone -> feature pyramid -> attention -> adaptive fusion -> multi-label head."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, Union

import torch
import torch.nn as nn

from hmn.networks._utils import check_spatial_dims
from hmn.networks.attention import build_attention, resolve_attention_modes
from hmn.networks.backbones import backbone_names, build_backbone, get_backbone_spec
from hmn.networks.fusion import AdaptiveScaleFusion
from hmn.networks.heads import HierarchicalHead, MultiLabelHead
from hmn.networks.neck import FeaturePyramid

__all__ = ["HybridMedNet"]


class HybridMedNet(nn.Module):
    """Multi-label medical image classifier over a registered backbone.

    An image (``N, in_channels, H, W``) or, over a 3D backbone, a volume (``N, in_channels, D, H, W``) passes
    through the backbone (a list of maps at strides 4 to 32), a feature pyramid that takes every scale to
    ``fpn_channels``, one or more attention stages (CBAM, per-scale
    self-attention, cross-scale attention), an adaptive fusion that weighs the scales per image into a
    ``fusion_channels`` vector, and a multi-label or hierarchical head. The output is a logits tensor
    ``N, num_classes`` (hierarchical: ``N, num_classes + num_coarse_classes``, fine first; see
    :class:`~hmn.networks.heads.HierarchicalHead`).

    Args:
        backbone: a name from :func:`hmn.networks.backbone_names`.
        num_classes: number of findings (14 for ChestX-ray14).
        in_channels: 1 for radiographs and CT/MR volumes, 3 for RGB; the backbone's stem is adapted.
        img_size: the input size, an int or ``(H, W)`` (2D) or ``(D, H, W)`` (3D); fixed-size backbones
            (Swin, Vim) are built for it.
        pretrained: ``False``, ``True`` (timm's weights, where cached or reachable) or a checkpoint path (a
            3D ConvNeXt inflates 2D ConvNeXt weights).
        spatial_dims: ``None`` (the backbone's: 2 for images, 3 for the ``convnext3d_*`` and ``swin3d_*``
            volume backbones), or 2 or 3, which must then be the backbone's; the neck and attention are
            built with it.
        feature_strides: which backbone scales, by stride, feed the pyramid; ``None`` takes all of them.
            The default leaves out stride 4: at 224x224 it holds three quarters of all positions, and
            the neck and attention over it would cost more than the rest of the network beside the
            backbone (see BENCHMARKS.md).
        fpn_channels: width of the pyramid and the attention.
        fusion_channels: width of the fused vector the head reads.
        attention: a mode or list of modes from ``("none", "cbam", "self", "cross_scale")``, applied in order.
        num_heads: heads of the self and cross-scale attention.
        context_size: largest side of the pooled key/value grid of each scale in the self and cross-scale
            attention, or ``None`` for full resolution (exact, and much more expensive: in 3D the number of
            positions grows with the cube of the side, so keep the reduced context there).
        dropout: dropout before the head.
        hierarchical: use the hierarchical (coarse, fine) head.
        num_coarse_classes: number of coarse groups for the hierarchical head.
        use_modern_attention: the original project's flag; True selects ``self`` attention, False ``cbam``.
        use_cross_scale_attention: the original project's flag; True adds ``cross_scale`` attention.
        backbone_options: family-specific backbone build options
            (:data:`hmn.networks.backbones.BACKBONE_OPTIONS`), e.g. ``{"norm": "batch", "ls_init_value": 1.0}``
            for a ConvNeXt trained from scratch, ``{"stem_stride": (1, 4, 4)}`` for a 3D ConvNeXt over
            thick-slice volumes.

    Raises:
        ValueError: an unknown backbone or attention mode, a ``spatial_dims`` other than the backbone's (both
            named), feature strides the backbone does not have, or another invalid argument.
    """

    def __init__(
        self,
        backbone: str = "convnext_tiny",
        num_classes: int = 14,
        in_channels: int = 1,
        img_size: int | Sequence[int] = 224,
        pretrained: Union[bool, str, os.PathLike] = False,
        spatial_dims: int | None = None,
        feature_strides: Sequence[int] | None = (8, 16, 32),
        fpn_channels: int = 256,
        fusion_channels: int = 512,
        attention: str | Sequence[str] | None = None,
        num_heads: int = 8,
        context_size: int | None = 7,
        dropout: float = 0.2,
        hierarchical: bool = False,
        num_coarse_classes: int = 4,
        use_modern_attention: bool | None = None,
        use_cross_scale_attention: bool | None = None,
        backbone_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = get_backbone_spec(backbone)
        if spatial_dims is None:
            spatial_dims = spec.spatial_dims
        check_spatial_dims(spatial_dims)
        if spatial_dims != spec.spatial_dims:
            fitting = backbone_names(spatial_dims=spatial_dims)
            raise ValueError(
                f"backbone {backbone!r} is {spec.spatial_dims}D; spatial_dims={spatial_dims} needs a {spatial_dims}D "
                + (f"backbone ({', '.join(fitting)})" if fitting else "backbone, and none is registered")
                + f", or pass spatial_dims={spec.spatial_dims} (or None) for {backbone!r}"
            )
        self.spatial_dims = spatial_dims
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.modes = resolve_attention_modes(attention, use_modern_attention, use_cross_scale_attention)
        self.backbone_name = spec.name
        self.num_classes = num_classes
        self.hierarchical = hierarchical
        self.num_coarse_classes = num_coarse_classes if hierarchical else 0

        self.backbone = build_backbone(
            backbone, in_channels=in_channels, img_size=img_size, pretrained=pretrained, options=dict(backbone_options or {})
        )
        strides = list(self.backbone.strides)
        if feature_strides is None:
            self.levels = list(range(len(strides)))
        else:
            missing = [s for s in feature_strides if s not in strides]
            if missing or not feature_strides:
                raise ValueError(
                    f"feature_strides {list(feature_strides)} not available from backbone {backbone!r}; "
                    f"its strides are {strides} (or pass None for all)"
                )
            self.levels = sorted(strides.index(s) for s in set(feature_strides))
        self.backbone.keep_levels(self.levels)
        channels = [self.backbone.channels[i] for i in self.levels]
        num_levels = len(channels)
        self.neck = FeaturePyramid(spatial_dims, channels, fpn_channels)
        self.attention = build_attention(
            self.modes, spatial_dims, fpn_channels, num_levels, num_heads=num_heads, context_size=context_size
        )
        self.fusion = AdaptiveScaleFusion(fpn_channels, num_levels, fusion_channels)
        if hierarchical:
            self.head: nn.Module = HierarchicalHead(fusion_channels, num_classes, num_coarse_classes, dropout)
        else:
            self.head = MultiLabelHead(fusion_channels, num_classes, dropout)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "HybridMedNet":
        """Builds the network from a config mapping (the original project's keys are accepted).

        Unknown keys raise ``TypeError`` naming them, so a misspelt key is not silently ignored.
        """
        return cls(**dict(config))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused ``N, fusion_channels`` vector the head reads."""
        feats = self.backbone(x)
        feats = self.neck([feats[i] for i in self.levels])
        feats = self.attention(feats)
        return self.fusion(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
