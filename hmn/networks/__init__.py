"""HybridMedNet and its parts: backbone registry, feature pyramid, attention, fusion and heads."""

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
    BACKBONES,
    BackboneSpec,
    PretrainedWeightsError,
    backbone_names,
    build_backbone,
    get_backbone_spec,
)
from hmn.networks.fusion import AdaptiveScaleFusion
from hmn.networks.heads import HierarchicalHead, MultiLabelHead, split_hierarchical
from hmn.networks.hybrid import HybridMedNet
from hmn.networks.neck import FeaturePyramid

__all__ = [
    "ATTENTION_MODES",
    "BACKBONES",
    "AdaptiveScaleFusion",
    "BackboneSpec",
    "CBAM",
    "CrossScaleAttention",
    "FeaturePyramid",
    "HierarchicalHead",
    "HybridMedNet",
    "MultiLabelHead",
    "PretrainedWeightsError",
    "ScaleSelfAttention",
    "backbone_names",
    "build_attention",
    "build_backbone",
    "get_backbone_spec",
    "resolve_attention_modes",
    "split_hierarchical",
]
