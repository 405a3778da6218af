"""HybridMedNet and its parts: backbone registry (2D and 3D backbones), feature pyramid, attention, fusion and heads."""

from __future__ import annotations

from hmn.networks.attention import (
    ATTENTION_MODES,
    CBAM,
    CrossScaleAttention,
    ScaleSelfAttention,
    build_attention,
    resolve_attention_modes,
)
from hmn.networks.backbones import (
    BACKBONE_OPTIONS,
    BACKBONES,
    BackboneSpec,
    PretrainedWeightsError,
    backbone_names,
    build_backbone,
    get_backbone_spec,
)
from hmn.networks.convnext3d import ConvNeXt3d, inflate_2d_state_dict
from hmn.networks.fusion import AdaptiveScaleFusion
from hmn.networks.heads import HierarchicalHead, MultiLabelHead, split_hierarchical
from hmn.networks.hybrid import HybridMedNet
from hmn.networks.neck import FeaturePyramid
from hmn.networks.swin3d import SwinTransformer3d

__all__ = [
    "ATTENTION_MODES",
    "BACKBONE_OPTIONS",
    "BACKBONES",
    "AdaptiveScaleFusion",
    "BackboneSpec",
    "CBAM",
    "ConvNeXt3d",
    "CrossScaleAttention",
    "FeaturePyramid",
    "HierarchicalHead",
    "HybridMedNet",
    "MultiLabelHead",
    "PretrainedWeightsError",
    "ScaleSelfAttention",
    "SwinTransformer3d",
    "backbone_names",
    "build_attention",
    "build_backbone",
    "get_backbone_spec",
    "inflate_2d_state_dict",
    "resolve_attention_modes",
    "split_hierarchical",
]
