"""The bundle table: one row per bundle (its backbone and the settings that differ between bundles), and the
constants the other modules of :mod:`hmn.bundle` share (tested versions, 3D defaults, export arguments, hashes).
"""

from __future__ import annotations

from dataclasses import dataclass

from hmn.networks.backbones import get_backbone_spec

__all__ = ["BUNDLES", "BundleRow", "EXPORT_ARGS", "HASH_TYPES", "ONNX_ATOL", "ONNX_OPSET", "PLACEHOLDER_URL",
           "REQUIRED_PACKAGES", "SELF_CROSS", "TESTED_WITH", "TS_PLACEHOLDER_URL", "VOLUME_BUNDLES", "VOLUME_DEFAULTS",
           "is_volume_bundle"]

SELF_CROSS = ["self", "cross_scale"]

# The versions the bundles were generated and tested with (fixed here, not read from the running
# environment, so that the generated files do not change from one machine to the next). Exact versions:
# the MONAI model zoo's CI turns each metadata entry into a pip line "name==value" (ci/get_bundle_requirements.py),
# so a range such as ">=3.0" would become the invalid "pydicom==>=3.0". A packed bundle records the versions
# installed where it was packed instead (installed_versions).
TESTED_WITH = {"monai": "1.6.1", "torch": "2.14.1", "numpy": "2.4.6", "pydicom": "3.0.2", "timm": "1.0.31",
               "pytorch-ignite": "0.5.5"}
# metadata key -> distribution name; the packages of required_packages_version are those TESTED_WITH lists
# beyond these three. The project itself (distribution "hybridmednet") is not among them: no package index has
# it, and one line pip cannot install would fail the zoo's whole requirements file; the metadata's description
# and docs/README.md say how to install it.
_VERSION_KEYS = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}
REQUIRED_PACKAGES = ("pydicom", "timm", "pytorch-ignite")


@dataclass(frozen=True)
class BundleRow:
    """One bundle: the backbone and the settings that differ between bundles.

    Whether a bundle takes radiographs or volumes follows from its backbone's ``spatial_dims``
    (:class:`hmn.networks.backbones.BackboneSpec`); :func:`is_volume_bundle`.
    """

    backbone: str
    attention: tuple[str, ...]
    batch_size: int = 16
    learning_rate: float = 2e-4
    backbone_options: tuple[tuple[str, object], ...] = ()


# ConvNeXt trained from scratch (the bundles' default: no pretrained weights can be assumed): BatchNorm in
# place of every LayerNorm, layer scale starting at 1, and a stem of two overlapping 3x3 stride-2 convs in
# place of the 4x4/4 patchify. With the published LayerNorms and layer scale 1e-6 a from-scratch ConvNeXt
# did not learn the demo data at all; the conv stem took it from 0.75 to 0.80 macro ROC AUC in 10 epochs
# (BENCHMARKS.md, "Demo training curve"). With --pretrained, pass --backbone_options "{}" to build the
# published architecture the weights fit.
_CONVNEXT_SCRATCH = (("norm", "batch"), ("ls_init_value", 1.0), ("stem", "conv"))


# ConvNeXt and Swin (and the larger EfficientNetV2s) with self- and cross-scale attention, as users of
# the original project were advised; the small ConvNeXt and EfficientNetV2, ResNet and Vim with CBAM.
BUNDLES: dict[str, BundleRow] = {
    r.backbone: r
    for r in [
        BundleRow("convnext_tiny", ("cbam",), backbone_options=_CONVNEXT_SCRATCH),
        BundleRow("convnext_small", tuple(SELF_CROSS), backbone_options=_CONVNEXT_SCRATCH),
        BundleRow("convnext_base", tuple(SELF_CROSS), batch_size=16, learning_rate=1e-4, backbone_options=_CONVNEXT_SCRATCH),
        BundleRow("convnext_large", tuple(SELF_CROSS), batch_size=8, learning_rate=1e-4, backbone_options=_CONVNEXT_SCRATCH),
        BundleRow("swin_tiny", tuple(SELF_CROSS)),
        BundleRow("swin_small", tuple(SELF_CROSS)),
        BundleRow("swin_base", tuple(SELF_CROSS), batch_size=16, learning_rate=1e-4),
        BundleRow("efficientnetv2_s", ("cbam",), learning_rate=5e-4),
        BundleRow("efficientnetv2_m", tuple(SELF_CROSS), learning_rate=3e-4),
        BundleRow("efficientnetv2_l", tuple(SELF_CROSS), batch_size=8, learning_rate=2e-4),
        BundleRow("resnet50", ("cbam",), learning_rate=5e-4),
        # Vision Mamba: linear in the number of tokens; the light CBAM keeps the head cheap.
        BundleRow("vim_tiny", ("cbam",), learning_rate=5e-4),
        BundleRow("vim_small", ("cbam",), learning_rate=3e-4),
        BundleRow("vim_base", ("cbam",), batch_size=8, learning_rate=1e-4),
    ]
}

# The 3D bundles (CT and MR volumes). The demo volumes (hmn.data.demo3d) are 1.5 x 1.5 x 3 mm voxels; the
# network sees 64 x 64 x 32 of them (96 x 96 x 96 mm), so the 3D ConvNeXt's stem takes 4 x 4 x 2 voxels
# (6 mm on each side) and every stage stays isotropic in millimetres. Its stem is 'pool' (convolutions at the
# input resolution, max pooling for the stride): with the 2D bundles' strided 'conv' stem a from-scratch 3D
# ConvNeXt-T learnt the enlarged organ and not the lesions a few voxels wide; and 2e-4 as its learning rate:
# at 1e-3 its training loss fell slowly and the lesions stayed near chance (BENCHMARKS.md, "3D demo training
# curve" and "What learning the lesions needs").
_CONVNEXT3D_SCRATCH = tuple({**dict(_CONVNEXT_SCRATCH), "stem": "pool", "stem_stride": [4, 4, 2]}.items())
VOLUME_BUNDLES: dict[str, BundleRow] = {
    r.backbone: r
    for r in [
        BundleRow("convnext3d_tiny", ("cbam",), batch_size=8, learning_rate=2e-4, backbone_options=_CONVNEXT3D_SCRATCH),
        BundleRow("swin3d_small", tuple(SELF_CROSS), batch_size=4, learning_rate=2e-4),
    ]
}
BUNDLES.update(VOLUME_BUNDLES)
# what the 3D bundles see by default (image_size is X, Y, Z after orientation to RAS; spacing in mm)
VOLUME_DEFAULTS = {"image_size": [64, 64, 32], "spacing": [1.5, 1.5, 3.0], "intensity": "ct", "window": [40, 400],
                   "percentiles": [1.0, 99.0]}


def is_volume_bundle(name: str) -> bool:
    """Whether bundle ``name`` takes volumes (its backbone is 3D)."""
    return get_backbone_spec(BUNDLES[name].backbone).spatial_dims == 3


# The argument files of the export commands (MONAI's `ckpt_export` and `onnx_export` take `--args_file`), relative to
# the bundle's folder like the model zoo's commands: one line, the same for every bundle, exports it from its folder,
# in the repository or packed. How each bundle converts comes from the backbone table (BackboneSpec.torchscript,
# BackboneSpec.fixed_size).
EXPORT_ARGS = {"torchscript": "configs/export_torchscript.json", "onnx": "configs/export_onnx.json"}

ONNX_ATOL = 1e-4
"""The largest absolute difference between onnxruntime's logits and the PyTorch network's that the ONNX export
accepts: its own check at export time (batch 1) and the tests' (batch 1 and 4). Measured at 64x64 with random
weights (tests/test_export.py): at most 1.9e-5 (EfficientNetV2-M, batch 4), 4.2e-6 for EfficientNetV2-S and -L,
at most 1.2e-6 for the other backbones."""

# opset 17: the first with LayerNormalization; read by onnxruntime since 1.11 and by TensorRT 8.6
ONNX_OPSET = 17

# what a packed bundle's large_files.yml says while the packer has given no URL; fetch_large_files refuses it
PLACEHOLDER_URL = "<upload models/model.pt and put its download URL here>"
TS_PLACEHOLDER_URL = "<upload models/model.ts and put its download URL here>"
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # what MONAI's download_url (and so the zoo's CI) checks
