"""Backbone registry: one table row per backbone name, the single source of truth.

Every backbone is an ``nn.Module`` whose ``forward`` returns a list of channel-first feature maps
(``N, C, H, W`` for the 2D rows, ``N, C, D, H, W`` for the 3D ones), finest first, with the channels and
strides it promises in ``.channels`` and ``.strides``. The registry, the bundles, their docs and the
parametrized tests all read :data:`BACKBONES`, so adding a backbone is one row; a row's ``spatial_dims``
says whether it takes images or volumes.

``pretrained`` is ``False``, ``True`` (timm's own download, which works where the weights are cached or
a model hub is reachable) or the path of a local checkpoint file (a timm/torchvision ``state_dict``, a
``.pth``/``.bin``/``.safetensors``; the classifier is dropped and the stem adapted to ``in_channels``).
The 3D ConvNeXt takes the same 2D checkpoints and inflates them (:mod:`hmn.networks.convnext3d`).
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    "BackboneSpec",
    "BACKBONES",
    "BACKBONE_OPTIONS",
    "Backbone",
    "TimmBackbone",
    "PretrainedWeightsError",
    "backbone_names",
    "get_backbone_spec",
    "build_backbone",
    "register_backbone",
]

logger = logging.getLogger(__name__)

Pretrained = Union[bool, str, os.PathLike]


class PretrainedWeightsError(RuntimeError):
    """Raised when pretrained weights were asked for but cannot be had (no hub, missing file)."""


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone table.

    Attributes:
        name: the name users write in configs (``convnext_base``).
        family: ``convnext``, ``swin``, ``efficientnetv2``, ``resnet``, ``vim``, ``convnext3d``, ``swin3d``.
        builder: ``"module:function"`` building the module; called as
            ``fn(spec, in_channels=..., img_size=..., pretrained=...)`` (and ``options=...`` when options are given).
        params_m: the published parameter count, in millions, of the ImageNet-1k classifier of this
            name (what users of the original project know); ``None`` for an architecture with no published
            classifier (the 3D rows: nobody published an ImageNet count for them, and none is made up here).
        head_in_features: width of that classifier's final linear layer (1000 classes), so that the
            bare backbone's expected size is ``params_m - (head_in_features * 1000 + 1000) / 1e6``;
            ``None`` where ``params_m`` is.
        timm_name: the timm architecture, for timm-built backbones.
        out_indices: which timm feature levels to return (strides 4, 8, 16, 32 for every 2D entry).
        fixed_size: whether the model is built for one input size (Swin, ViT-like), so ``img_size``
            must be passed at construction.
        description: one line for the bundle docs.
        extra: builder arguments of the row (widths, depths, ...).
        torchscript: how the bundle's TorchScript export converts the network: ``"script"``
            (``torch.jit.script``, what the MONAI model zoo's CI runs; the module keeps its control flow and
            takes any input size the network takes) or ``"trace"`` (``torch.jit.trace`` at one input shape),
            for a backbone whose code TorchScript cannot compile. The bundles' ``configs/export_torchscript.json``
            is written from it (:mod:`hmn.bundle`).
        spatial_dims: 2 for a backbone of images (``N, C, H, W``), 3 for one of volumes (``N, C, D, H, W``).
    """

    name: str
    family: str
    builder: str
    params_m: Optional[float]
    head_in_features: Optional[int]
    timm_name: str | None = None
    out_indices: tuple[int, ...] = (0, 1, 2, 3)
    fixed_size: bool = False
    description: str = ""
    extra: dict = field(default_factory=dict)
    torchscript: str = "script"
    spatial_dims: int = 2

    @property
    def bare_params_m(self) -> float | None:
        """Expected parameter count (millions) of the backbone without its ImageNet classifier, or ``None``
        for a row without a published count (:attr:`params_m`)."""
        if self.params_m is None or self.head_in_features is None:
            return None
        return self.params_m - (self.head_in_features * 1000 + 1000) / 1e6


_TIMM = "hmn.networks.backbones:build_timm_backbone"
_CONVNEXT3D = "hmn.networks.convnext3d:build_convnext3d"
_SWIN3D = "hmn.networks.swin3d:build_swin3d"

# Published ImageNet-1k parameter counts: ConvNeXt (Liu et al., 2022), Swin (Liu et al., 2021),
# EfficientNetV2 (Tan & Le, 2021), ResNet (He et al., 2016; torchvision figures).
_ROWS: list[BackboneSpec] = [
    BackboneSpec("convnext_tiny", "convnext", _TIMM, 28.6, 768, "convnext_tiny", description="ConvNeXt-T"),
    BackboneSpec("convnext_small", "convnext", _TIMM, 50.2, 768, "convnext_small", description="ConvNeXt-S"),
    BackboneSpec("convnext_base", "convnext", _TIMM, 88.6, 1024, "convnext_base", description="ConvNeXt-B"),
    BackboneSpec("convnext_large", "convnext", _TIMM, 197.8, 1536, "convnext_large", description="ConvNeXt-L"),
    BackboneSpec("swin_tiny", "swin", _TIMM, 28.3, 768, "swin_tiny_patch4_window7_224", fixed_size=True,
                 description="Swin-T, patch 4, window 7"),
    BackboneSpec("swin_small", "swin", _TIMM, 49.6, 768, "swin_small_patch4_window7_224", fixed_size=True,
                 description="Swin-S, patch 4, window 7"),
    BackboneSpec("swin_base", "swin", _TIMM, 87.8, 1024, "swin_base_patch4_window7_224", fixed_size=True,
                 description="Swin-B, patch 4, window 7"),
    BackboneSpec("efficientnetv2_s", "efficientnetv2", _TIMM, 21.5, 1280, "tf_efficientnetv2_s",
                 out_indices=(1, 2, 3, 4), description="EfficientNetV2-S"),
    BackboneSpec("efficientnetv2_m", "efficientnetv2", _TIMM, 54.1, 1280, "tf_efficientnetv2_m",
                 out_indices=(1, 2, 3, 4), description="EfficientNetV2-M"),
    BackboneSpec("efficientnetv2_l", "efficientnetv2", _TIMM, 118.5, 1280, "tf_efficientnetv2_l",
                 out_indices=(1, 2, 3, 4), description="EfficientNetV2-L"),
    BackboneSpec("resnet34", "resnet", _TIMM, 21.8, 512, "resnet34", out_indices=(1, 2, 3, 4),
                 description="ResNet-34"),
    BackboneSpec("resnet50", "resnet", _TIMM, 25.6, 2048, "resnet50", out_indices=(1, 2, 3, 4),
                 description="ResNet-50"),
    BackboneSpec("resnet101", "resnet", _TIMM, 44.5, 2048, "resnet101", out_indices=(1, 2, 3, 4),
                 description="ResNet-101"),
    # Vision Mamba (Zhu et al., 2024), published counts with the 1000-class head; no timm weights.
    BackboneSpec("vim_tiny", "vim", "hmn.networks.vim:build_vim", 7.0, 192, fixed_size=True,
                 description="Vision Mamba tiny (Vim-Ti), patch 16", extra={"embed_dim": 192, "depth": 24}),
    BackboneSpec("vim_small", "vim", "hmn.networks.vim:build_vim", 26.0, 384, fixed_size=True,
                 description="Vision Mamba small (Vim-S), patch 16", extra={"embed_dim": 384, "depth": 24}),
    BackboneSpec("vim_base", "vim", "hmn.networks.vim:build_vim", 98.0, 768, fixed_size=True,
                 description="Vision Mamba base (Vim-B), patch 16", extra={"embed_dim": 768, "depth": 24}),
    # 3D: no published ImageNet counts exist for these architectures, so params_m is None.
    # The 3D ConvNeXt (our own code) has the widths and depths of its 2D twin, whose ImageNet weights it inflates.
    BackboneSpec("convnext3d_tiny", "convnext3d", _CONVNEXT3D, None, None, spatial_dims=3,
                 description="3D ConvNeXt-T, 7x7x7 depthwise kernels",
                 extra={"dims": (96, 192, 384, 768), "depths": (3, 3, 9, 3), "inflate_from": "convnext_tiny"}),
    BackboneSpec("convnext3d_small", "convnext3d", _CONVNEXT3D, None, None, spatial_dims=3,
                 description="3D ConvNeXt-S, 7x7x7 depthwise kernels",
                 extra={"dims": (96, 192, 384, 768), "depths": (3, 3, 27, 3), "inflate_from": "convnext_small"}),
    BackboneSpec("convnext3d_base", "convnext3d", _CONVNEXT3D, None, None, spatial_dims=3,
                 description="3D ConvNeXt-B, 7x7x7 depthwise kernels",
                 extra={"dims": (128, 256, 512, 1024), "depths": (3, 3, 27, 3), "inflate_from": "convnext_base"}),
    # MONAI's 3D Swin Transformer blocks (the SwinUNETR encoder) at the Swin-T/S/B widths and depths; its code
    # (einops, NumPy) does not compile with TorchScript, so its bundles trace.
    BackboneSpec("swin3d_tiny", "swin3d", _SWIN3D, None, None, spatial_dims=3, torchscript="trace",
                 description="3D Swin-T (MONAI's SwinUNETR encoder blocks), patch 4, window 7",
                 extra={"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)}),
    BackboneSpec("swin3d_small", "swin3d", _SWIN3D, None, None, spatial_dims=3, torchscript="trace",
                 description="3D Swin-S (MONAI's SwinUNETR encoder blocks), patch 4, window 7",
                 extra={"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)}),
    BackboneSpec("swin3d_base", "swin3d", _SWIN3D, None, None, spatial_dims=3, torchscript="trace",
                 description="3D Swin-B (MONAI's SwinUNETR encoder blocks), patch 4, window 7",
                 extra={"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}),
]

BACKBONES: dict[str, BackboneSpec] = {}

TORCHSCRIPT_MODES = ("script", "trace")


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds one row to :data:`BACKBONES`; a name can be registered once."""
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    if spec.torchscript not in TORCHSCRIPT_MODES:
        raise ValueError(f"backbone {spec.name!r}: torchscript={spec.torchscript!r} is not one of {TORCHSCRIPT_MODES}")
    if spec.spatial_dims not in (2, 3):
        raise ValueError(f"backbone {spec.name!r}: spatial_dims={spec.spatial_dims!r} is not 2 or 3")
    BACKBONES[spec.name] = spec
    return spec


for _row in _ROWS:
    register_backbone(_row)


def backbone_names(family: str | None = None, spatial_dims: int | None = None) -> list[str]:
    """Registered backbone names, in table order, optionally of one family and/or one ``spatial_dims`` (2 or 3)."""
    return [
        n
        for n, s in BACKBONES.items()
        if (family is None or s.family == family) and (spatial_dims is None or s.spatial_dims == spatial_dims)
    ]


def get_backbone_spec(name: str) -> BackboneSpec:
    """The table row for ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown backbone {name!r}; valid names: {', '.join(backbone_names())}"
        ) from None


class Backbone(nn.Module):
    """Base class: ``forward(x)`` returns a list of ``N, C, *spatial`` maps with ``channels`` and ``strides``.

    Subclasses set ``channels`` and ``strides`` (lists of ints, one per output, finest first) in their
    ``__init__``; a 3D backbone whose strides differ between axes also sets ``axis_strides`` (one tuple of
    per-axis strides per output) and reports the largest of each tuple in ``strides``. They are not declared here as class annotations: under ``from __future__ import annotations``
    those are strings, which TorchScript cannot read (``Unknown type annotation: 'list[int]'``).
    """

    def keep_levels(self, levels: Sequence[int]) -> None:
        """Tells the backbone that only the outputs at ``levels`` (indices) are used downstream.

        A backbone whose parameters serve only one output (Vim's pyramid adapters) drops those of the
        unused outputs, so that no parameter goes without a gradient (which DistributedDataParallel
        rejects). The default keeps everything: a timm stage also feeds the stages after it.
        """


class TimmBackbone(Backbone):
    """A timm model built with ``features_only``, returning channel-first maps at strides 4 to 32.

    timm's Swin returns ``N, H, W, C`` maps; they are permuted here so every backbone speaks NCHW.
    """

    def __init__(self, model: nn.Module, channels_last_output: bool) -> None:
        super().__init__()
        self.model = model
        self.channels = list(model.feature_info.channels())
        self.strides = list(model.feature_info.reduction())
        self._nhwc = channels_last_output

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``N, in_channels, H, W`` -> one ``N, C, H / stride, W / stride`` map per level, finest first."""
        feats = self.model(x)
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)


def _as_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``img_size`` as ``(height, width)``; shared by the 2D backbone builders."""
    if isinstance(img_size, int):
        return (img_size, img_size)
    size = tuple(int(s) for s in img_size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (height, width) for a 2D backbone, got {img_size!r}")
    return size  # type: ignore[return-value]


def _as_size_3d(img_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``img_size`` as three positive ints, one per spatial axis of an ``N, C, D, H, W`` tensor; shared by
    the 3D backbone builders.

    Raises:
        ValueError: neither a positive int nor three positive ints.
    """
    size = (img_size,) * 3 if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(
            f"img_size must be a positive int or three positive ints (D, H, W) for a 3D backbone, got {img_size!r}"
        )
    return size  # type: ignore[return-value]


# Options a family's builder accepts through ``build_backbone(..., options=...)``, with what they do.
BACKBONE_OPTIONS: dict[str, dict[str, str]] = {
    "convnext": {
        "norm": "'layer' (the published ConvNeXt) or 'batch': every LayerNorm, stem included, becomes a "
        "BatchNorm; for training from scratch (no pretrained weights)",
        "ls_init_value": "initial layer-scale value of every block (timm's default 1e-6)",
        "stem": "'patch' (the published ConvNeXt: one 4x4 convolution at stride 4) or 'conv': two overlapping 3x3 "
        "convolutions at stride 2 (BatchNorm and GELU between them), same output; for training from scratch",
    },
    "convnext3d": {
        "norm": "'layer' (default: LayerNorms, as the published ConvNeXt) or 'batch': every norm a BatchNorm3d; "
        "for training from scratch (no pretrained weights)",
        "ls_init_value": "initial layer-scale value (gamma) of every block (default 1e-6, the published one)",
        "stem": "'patch' (default: one convolution with kernel = stride = stem_stride), 'conv': two overlapping "
        "3x3x3 convolutions (BatchNorm and GELU between them), same total stride, or 'pool': 3x3x3 convolutions at "
        "the input resolution with max pooling for the stride (for findings a few voxels wide); 'conv' and 'pool' "
        "are for training from scratch",
        "stem_stride": "the stem's stride, an int or one per axis (default 4); e.g. (1, 4, 4) keeps the depth of "
        "thick-slice N, C, D, H, W volumes",
        "downsample_stride": "the stride between stages, an int or one per axis (default 2)",
        "drop_path_rate": "stochastic depth rate of the last block, rising linearly from 0 (default 0)",
        "depth_axis": "the spatial axis (0, 1 or 2) along which 2D pretrained kernels are inflated; default: the one "
        "axis whose strides differ from the others' (0 for (1, 4, 4) on N, C, D, H, W; 2 for (4, 4, 2) on MONAI's "
        "X, Y, Z), else 2 (Z, the slice axis of the RAS-oriented X, Y, Z volumes the project's pipeline gives)",
    },
    "swin3d": {
        "drop_path_rate": "stochastic depth rate of the last block, rising linearly from 0 (default 0)",
    },
    "vim": {
        "scan_impl": "the selective scan of every block: 'auto' (default: mamba_ssm's kernel on CUDA where it "
        "imports, else the chunked PyTorch scan), 'chunked', 'ref', 'cuda' or 'cpu_kernel' (the fused C++ "
        "kernel, compiled on first use; several times faster on a CPU)",
    },
}


class _BatchNormLast(nn.Module):
    """BatchNorm over the last dim of an ``N, H, W, C`` tensor (the slot of ConvNeXt's channels-last LayerNorm)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def _layer_norms_to_batch_norms(model: nn.Module) -> None:
    """Replaces every LayerNorm of a timm ConvNeXt (``LayerNorm2d`` on NCHW, ``LayerNorm`` on NHWC) in place."""
    from timm.layers import LayerNorm2d

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LayerNorm2d):
                setattr(module, name, nn.BatchNorm2d(child.normalized_shape[0]))
            elif isinstance(child, nn.LayerNorm):
                setattr(module, name, _BatchNormLast(child.normalized_shape[0]))


def _conv_stem(patchify: nn.Conv2d) -> nn.Sequential:
    """An overlapping stem with the output of ConvNeXt's 4x4/4 patchify: 3x3/2 conv, BatchNorm, GELU, 3x3/2 conv.

    A patchify convolution sees each pixel once, in one of 16 positions inside its patch; a line one pixel
    wide or a spot a few pixels across lands in one or two patches at an arbitrary phase. Overlapping 3x3
    windows see every pixel from several positions, as the stems of ResNets do.
    """
    c_in, c_out = patchify.in_channels, patchify.out_channels
    mid = max(c_out // 2, 1)
    return nn.Sequential(
        nn.Conv2d(c_in, mid, 3, stride=2, padding=1),
        nn.BatchNorm2d(mid),
        nn.GELU(),
        nn.Conv2d(mid, c_out, 3, stride=2, padding=1),
    )


def _scratch_choice(
    spec: BackboneSpec, options: dict, pretrained: Pretrained, name: str, choices: tuple[str, ...], published: str
) -> str:
    """Pops option ``name`` (default ``choices[0]``, the published architecture); any other choice changes the
    architecture, so it is refused together with pretrained weights, which ``published``."""
    value = options.pop(name, choices[0])
    if value not in choices:
        raise ValueError(f"backbone option {name}={value!r} is not one of {choices}")
    if value != choices[0] and pretrained not in (False, None):
        raise ValueError(
            f"backbone option {name}={value!r} is for training {spec.name!r} from scratch: pretrained ConvNeXt weights "
            f"{published}; drop the option or set pretrained=False"
        )
    return value


def _check_options(spec: BackboneSpec, options: dict | None) -> dict:
    options = dict(options or {})
    accepted = BACKBONE_OPTIONS.get(spec.family, {})
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"backbone {spec.name!r} does not take the option(s) {unknown}; "
            + (f"it accepts {sorted(accepted)}" if accepted else "it takes no options")
        )
    return options


def build_timm_backbone(
    spec: BackboneSpec,
    in_channels: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: Pretrained = False,
    options: dict | None = None,
) -> TimmBackbone:
    """Builds a timm ``features_only`` model for ``spec``; see the module docstring for ``pretrained`` and
    :data:`BACKBONE_OPTIONS` for ``options``."""
    import timm

    options = _check_options(spec, options)
    norm = _scratch_choice(spec, options, pretrained, "norm", ("layer", "batch"), "have LayerNorms")
    stem = _scratch_choice(spec, options, pretrained, "stem", ("patch", "conv"), "have a patchify stem")
    kwargs: dict = dict(features_only=True, in_chans=in_channels, out_indices=spec.out_indices)
    if "ls_init_value" in options:
        kwargs["ls_init_value"] = float(options.pop("ls_init_value"))
    if spec.fixed_size:
        kwargs["img_size"] = _as_size(img_size)
    use_pretrained = False
    if isinstance(pretrained, (str, os.PathLike)):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise PretrainedWeightsError(
                f"pretrained checkpoint {path!r} for backbone {spec.name!r} does not exist; "
                "give the path of a timm/torchvision state_dict file, or pretrained=False"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=path)
        use_pretrained = True
    elif pretrained is True:
        use_pretrained = True
    elif pretrained is not False and pretrained is not None:
        raise ValueError(f"pretrained must be True, False or a checkpoint path, got {pretrained!r}")

    if not use_pretrained:
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        try:
            model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
        except PretrainedWeightsError:
            raise
        except Exception as err:  # hub errors come in many types (OSError, HTTP, LocalEntryNotFound, ...)
            if isinstance(pretrained, (str, os.PathLike)):
                raise PretrainedWeightsError(
                    f"could not load pretrained checkpoint {os.fspath(pretrained)!r} into backbone "
                    f"{spec.name!r} (timm {spec.timm_name}): {err}"
                ) from err
            raise PretrainedWeightsError(
                f"pretrained weights for backbone {spec.name!r} (timm {spec.timm_name}) are not cached "
                "and the model hub cannot be reached: download them where the hub is reachable and pass "
                "pretrained='/path/to/checkpoint', or use pretrained=False."
            ) from err
    if norm == "batch":
        _layer_norms_to_batch_norms(model)
    if stem == "conv":
        patchify = getattr(model, "stem_0", None)
        if not isinstance(patchify, nn.Conv2d) or patchify.stride != (4, 4):
            raise ValueError(f"backbone option stem='conv' expects a ConvNeXt patchify stem in {spec.name!r}, found {patchify!r}")
        model.stem_0 = _conv_stem(patchify)
    nhwc = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
    return TimmBackbone(model, channels_last_output=nhwc)


def _resolve(target: str) -> Callable[..., Backbone]:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def build_backbone(
    name: str,
    in_channels: int = 1,
    img_size: int | Sequence[int] = 224,
    pretrained: Pretrained = False,
    options: dict | None = None,
) -> Backbone:
    """Builds the backbone registered as ``name``.

    Args:
        name: a name from :func:`backbone_names`.
        in_channels: 1 for radiographs and CT/MR volumes (the stem is adapted, pretrained weights summed over
            RGB), or 3.
        img_size: the input size the model will see: an int, ``(H, W)`` for a 2D backbone or ``(D, H, W)``
            for a 3D one; fixed-size models (Swin, Vim) are built for it.
        pretrained: ``False``, ``True`` or the path of a local checkpoint file (a 3D ConvNeXt inflates a 2D
            ConvNeXt checkpoint).
        options: family-specific build options (:data:`BACKBONE_OPTIONS`); an option the family does not
            take raises ``ValueError`` naming the accepted ones.

    Returns:
        A :class:`Backbone` whose ``forward`` maps ``N, in_channels, *spatial`` (``spec.spatial_dims`` axes)
        to a list of channel-first maps, finest first.

    Raises:
        ValueError: an unknown name, ``in_channels`` < 1, a bad option or ``img_size``.
        PretrainedWeightsError: pretrained weights asked for but not to be had.
    """
    spec = get_backbone_spec(name)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    builder = _resolve(spec.builder)
    if _check_options(spec, options):  # only families listed in BACKBONE_OPTIONS get here
        return builder(spec, in_channels=in_channels, img_size=img_size, pretrained=pretrained, options=options)
    return builder(spec, in_channels=in_channels, img_size=img_size, pretrained=pretrained)
