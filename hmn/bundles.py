"""Writes ``bundles/<name>/`` for every bundle from one template and the per-backbone table below.

    python -m hmn bundles [--out bundles] [--check]

Each bundle is MONAI bundle configuration only (``configs/*.json``, ``docs/README.md``, ``LICENSE``); the
code it names lives in the installed ``hmn`` package. ``--check`` compares the committed bundles with
what the generator writes and fails on any difference, so that a fix lands in all bundles at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmn import __version__
from hmn.data.demo import DEMO_CLASSES
from hmn.networks.backbones import get_backbone_spec
from hmn.runs import MODEL_SETTINGS, SCHEDULE_SETTINGS, VOLUME_SETTINGS

__all__ = ["BUNDLES", "BundleRow", "bundle_files", "check_bundles", "check_overrides", "download_bundle", "error_summary",
           "EXPORT_ARGS", "ONNX_ATOL", "export_args",
           "install_error_summary", "main", "pack_bundle", "write_bundles", "SCHEMA_URL",
           "HASH_TYPES", "LARGE_FILES", "PLACEHOLDER_URL", "REQUIRED_PACKAGES", "TESTED_WITH", "ZOO_FILE_LIMIT",
           "fetch_large_files", "file_hash", "installed_versions", "large_files_text", "read_large_files"]

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
"""The MONAI bundle metadata schema that ``metadata.json`` names (the MONAI model zoo's CI downloads it and
validates against it; the tests hold a copy, tests/bundles/data/); the project also ships its own stricter
offline check of the fields it fills in, ``bundles/meta_schema.json`` (see the README)."""

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
INSTALL_NOTE = ("Needs the hybridmednet package (the configs name hmn.* targets), which is not on a package index: "
                "install it from the project's source tree (pip install <path or git URL of HybridMedNet>), as "
                "docs/README.md says under 'Sharing and the MONAI model zoo'.")


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


_LOSS = "$monai.handlers.from_engine(['loss'], first=True)"
_RANK0_TRAIN_HANDLERS = 4  # the last entries of train#handlers run on rank 0 only (see multi_gpu_train.json)
_RANK0_VAL_HANDLERS = 4
# `python -m monai.bundle run training` runs the id "training"; a plain `run` runs "run".
# Before anything runs: overrides that contradict the model's run record (models/run.json) are refused or
# warned about (hmn.runs.check_run_record); training then records (or, on a resume, updates) it.
_CHECK_RECORD = "$hmn.runs.check_run_record(@ckpt_dir, @run_settings, @use_run_record)"
# a resumed run (use_run_record) trains on labels in the model's class order, or stops
_CHECK_RESUME_CLASSES = ("$hmn.runs.check_classes(@class_names, hmn.training.class_names(@datalist), @datalist) "
                         "if @use_run_record else None")
_WRITE_RECORD = "$hmn.runs.write_run_record(@ckpt_dir, @run_settings, @resume)"
# Before training: which classes the validation metric can average (named once), or a clear stop if none.
_CHECK_VAL = "$hmn.training.check_validation_split(@validate#dataset#data, @class_names)"
_EVAL_RUN = [
    "$hmn.runs.check_model_file(@ckpt_dir, @model_sha256)",
    "$hmn.runs.check_run_record(@ckpt_dir, @model_settings, @use_run_record)",
    # the datalist's classes are the model's, or (findings "shared") paired with them by finding
    "$@finding_match",
    "$@validate#evaluator.run()",
]
# an empty list of items (every image already predicted, on a resume; or a torchrun share of a short list) runs nothing
_INFER_RUN = ["$hmn.runs.check_model_file(@ckpt_dir, @model_sha256)",
              "$hmn.runs.check_run_record(@ckpt_dir, @model_settings, @use_run_record)",
              "$@evaluator.run() if len(@dataset) else None"]
# under torchrun: every rank predicts its share, then rank 0 merges the shares into output_file (and heatmaps.csv)
_DIST_INFER_RUN = [*_INFER_RUN,
                   "$hmn.inference.merge_rank_outputs(@output_file, @heatmap_dir if hmn.training.as_bool(@heatmaps) else None, "
                   "keep_existing=hmn.training.as_bool(@resume))"]
_TRAIN_RUN = [
    "$@train#run_lock.acquire()",
    _CHECK_RECORD,
    _CHECK_RESUME_CLASSES,
    _CHECK_VAL,
    "$@validate#early_stop.set_trainer(@train#trainer)",
    "$@train#resume.attach(@train#trainer)",
    _WRITE_RECORD,
    "$@train#checkpoint.attach(@train#trainer)",
    "$@train#trainer.run()",
    # the best model on the test split (runs/eval/), so the run ends with its report (not under torchrun:
    # evaluate.json there)
    "$hmn.training.evaluate_after_training(@test#evaluator, @ckpt_dir, @evaluate_after_training)",
]
_DIST_TRAIN_RUN = [
    "$@train#run_lock.acquire()",
    _CHECK_RECORD,
    _CHECK_RESUME_CLASSES,
    _CHECK_VAL,
    "$@validate#early_stop.set_trainer(@train#trainer)",
    "$@train#resume.attach(@train#trainer)",
    _WRITE_RECORD,
    "$@train#checkpoint.attach(@train#trainer) if dist.get_rank() == 0 else None",
    "$@train#trainer.run()",
]


def _load_transforms() -> list[dict]:
    return [
        {
            "_target_": "hmn.transforms.LoadXrayd",
            "keys": "image",
            "voi": "@voi",
            "spatial_size": ["@image_size", "@image_size"],
            "resize_mode": "area",
            "aspect": "@aspect",
        },
        {"_target_": "hmn.transforms.PercentileRescaled", "keys": "image", "lower": 0.5, "upper": 99.5},
    ]


def _label_transform() -> dict:
    return {"_target_": "Lambda", "func": "$hmn.training.label_tensor"}


def _dataset(split: str, transform: str) -> dict:
    return {
        "_target_": "hmn.training.make_dataset",
        "data": f"$hmn.data.load_datalist(@datalist, '{split}')",
        "transform": transform,
        "cache": "@cache",
        "cache_dir": "$os.path.join(@output_dir, 'cache')",
        "num_workers": "@num_workers",
        "skip_bad_files": "@skip_bad_files",
        # an unreadable file: replaced by the next one in training; left out and listed in validation and test,
        # where a replacement would count another image twice
        "bad_files": "replace" if split == "training" else "leave_out",
        "item_shape": "$[@network_def#in_channels, @image_size, @image_size]",
        "name": f"{split} data",
    }


def _val_postprocessing() -> dict:
    # hierarchical heads put the coarse logits after the fine ones: the metrics read the fine ones;
    # masked (-1, uncertain) labels stay -1: the validation metric leaves them out, as the report does.
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x[: @num_classes]"},
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        ],
    }


# arguments of `python -m monai.bundle run` that are not config overrides
_RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
             "workflow_type", "properties_path"}


def _raised_by_project(exc: BaseException) -> bool:
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
    return module.split(".")[0] == "hmn" or type(exc).__module__.split(".")[0] == "hmn"


def error_summary(exc: BaseException) -> str | None:
    """``"error: <message>"`` for the outermost exception of `exc`'s chain (``__cause__``, or ``__context__``
    unless suppressed) that the project's own code raised, or None when none did. MONAI wraps such an
    error in "Failed to instantiate component ..." and prints a long traceback; this is the sentence that
    says what to fix (the project's errors name the file or value and what is accepted)."""
    current, seen = exc, set()
    while current is not None and id(current) not in seen:
        if _raised_by_project(current):
            return f"error: {type(current).__name__}: {' '.join(str(current).split())}"
        seen.add(id(current))
        current = current.__cause__ if current.__cause__ is not None else (
            None if current.__suppress_context__ else current.__context__)
    return None


def install_error_summary() -> None:
    """Makes an uncaught error end the output with one readable line, :func:`error_summary`, after Python's
    usual traceback. The bundles call it first in their ``initialize``; installing it twice adds nothing."""
    previous = sys.excepthook
    if getattr(previous, "_hmn_error_summary", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        previous(kind, value, tb)
        line = error_summary(value)
        if line:
            print(line, file=sys.stderr)

    hook._hmn_error_summary = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _config_ids(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every id of a parsed config (``a``, ``a#b``, ``a#0``, ...) with its raw value."""
    out: dict[str, Any] = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        cid = f"{prefix}#{key}" if prefix else str(key)
        out[cid] = value
        out.update(_config_ids(value, cid))
    return out


def _command_line_overrides(argv: list[str]) -> tuple[dict[str, str], Any]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle run`` command line, and its config_file."""
    pairs: dict[str, str] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            pairs[key.replace("::", "#")] = value
        i += 1
    config = pairs.pop("config_file", None)
    if isinstance(config, str) and config.strip().startswith("["):
        import ast

        config = ast.literal_eval(config)
    return pairs, config


def check_overrides(argv: list[str] | None = None) -> list[str]:
    """Warns about command-line overrides that name no key of the bundle's configs, with the closest key.

    ``python -m monai.bundle run ... --backbone convnext_tinyy`` adds a new top-level key that nothing
    reads: the run trains the default backbone without a word. The bundles call this first (their
    ``initialize``): each ``--key`` of the command line (MONAI's own ``run`` arguments aside) must be an id
    of the merged configs (``image_size``, ``network_def#backbone``, ...) or a new entry of an existing
    component (``--validate#best_saver#key_metric_n_saved 2``). Anything else is logged as a warning
    naming the key and the closest id (the id ending in the same name, else the nearest spelling).

    Args:
        argv: the command line; default ``sys.argv`` when the process runs ``monai.bundle`` (otherwise,
            e.g. ``monai.bundle.load`` from a Python program, nothing is checked).

    Returns:
        The warnings logged (empty when every override names a key).
    """
    import logging

    if argv is None:
        main = sys.argv[0] if sys.argv else ""
        if not (main.endswith("__main__.py") and os.path.basename(os.path.dirname(main)) == "bundle"):
            return []
        argv = sys.argv[1:]
    pairs, config = _command_line_overrides(list(argv))
    if not config:
        return []
    from monai.bundle import ConfigParser

    try:
        merged = ConfigParser.load_config_files(config)
    except Exception:  # noqa: BLE001 - MONAI reports an unreadable config itself
        return []
    ids = _config_ids(dict(merged))
    by_name: dict[str, list[str]] = {}
    for cid in ids:
        by_name.setdefault(cid.rsplit("#", 1)[-1], []).append(cid)
    warnings = []
    for key in pairs:
        if key in _RUN_ARGS or key in ids:
            continue
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if parent is not None and isinstance(ids.get(parent), dict) and "_target_" in ids[parent]:
            continue  # a new argument of an existing component: MONAI passes it on (and refuses a wrong one)
        name = key.rsplit("#", 1)[-1]
        close = by_name.get(name) or difflib.get_close_matches(key, list(ids), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        warnings.append(f"--{key} is not a setting of this bundle ({', '.join(map(str, config if isinstance(config, list) else [config]))}): "
                        f"nothing reads it, so it changes nothing{hint}")
    log = logging.getLogger(__name__)
    for w in warnings:
        log.warning(w)
    return warnings


def _trained(key: str, default: str) -> str:
    """A config value: the run record's `key` when the workflow uses the record (evaluation, inference, a
    resume), else `default` (a Python expression)."""
    return f"$hmn.runs.trained(@ckpt_dir, {key!r}, {default}, @use_run_record)"


# what the run record holds (hmn.runs.MODEL_SETTINGS / SCHEDULE_SETTINGS), as config references: the network's
# own arguments under network_def, the rest top-level keys
_NETWORK_DEF_SETTINGS = ("in_channels", "backbone", "attention", "fpn_channels", "fusion_channels", "num_heads",
                         "context_size", "dropout")
_MODEL_SETTINGS = {k: f"@network_def#{k}" if k in _NETWORK_DEF_SETTINGS else f"@{k}" for k in MODEL_SETTINGS}
_SCHEDULE_SETTINGS = {k: f"@{k}" for k in SCHEDULE_SETTINGS}


def _scratch_default(row: BundleRow) -> str:
    # the from-scratch recipe applies only without pretrained weights: --pretrained alone builds the
    # published architecture the weights fit
    return f"{{}} if hmn.training.pretrained_given(@pretrained) else {dict(row.backbone_options)!r}"


# -- the 3D bundles: what differs from the 2D template -----------------------------------------------------
_VOLUME_MODEL_SETTINGS = {**{k: v for k, v in _MODEL_SETTINGS.items() if k not in ("voi", "aspect")},
                          **{k: f"@{k}" for k in VOLUME_SETTINGS}}


def _volume_load_transforms(training: bool = False) -> list[dict]:
    """Volume loading as the 3D bundles run it (:func:`hmn.transforms.volume_transforms`, with every setting a
    reference): modality values as stored (HU for CT), oriented to RAS, resampled to ``spacing``, CT window or
    MR percentiles to [0, 1], and centre-cropped or padded to ``image_size`` (outside training only padded where
    the study is classified by sliding windows); a file that is not a volume of ``in_channels`` channels is a
    named read error (an error row in inference, skipped in training)."""
    from hmn.transforms import volume_transforms

    mode = "crop_or_pad" if training else "$'pad' if hmn.training.as_bool(@sliding_window) else 'crop_or_pad'"
    return volume_transforms("image", spacing="@spacing", spatial_size="@image_size", intensity="@intensity",
                             window="@window", percentiles="@percentiles", crop_mode=mode,
                             channels="@network_def#in_channels")


def _volume_augmentation() -> list[dict]:
    # small rotations about the body axis (S-I), scaling and shifts; no flips (left and right differ in anatomy)
    return [
        {"_target_": "RandAffined", "keys": "image", "prob": 0.7, "rotate_range": [0.0, 0.0, 0.15],
         "scale_range": [0.1, 0.1, 0.1], "translate_range": "$[s * 0.05 for s in @image_size]",
         "padding_mode": "zeros"},
        {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
    ]


def _volume_inferer() -> str:
    # a whole study at the training spacing, classified by windows of image_size whose logits are aggregated
    return ("$hmn.inferers.SlidingWindowClassifier(roi_size=@image_size, overlap=@sliding_window_overlap, "
            "aggregate=@sliding_window_aggregate) if hmn.training.as_bool(@sliding_window) else monai.inferers.SimpleInferer()")


_VOLUME_KEYS = {
    "image_size": _trained("image_size", repr(VOLUME_DEFAULTS["image_size"])),
    # voxel spacing in mm along X, Y, Z (RAS) that every volume is resampled to
    "spacing": _trained("spacing", repr(VOLUME_DEFAULTS["spacing"])),
    # "ct": a window in Hounsfield units, [center, width], to [0, 1]; "mr": the [lower, upper] percentiles to [0, 1]
    "intensity": _trained("intensity", repr(VOLUME_DEFAULTS["intensity"])),
    "window": _trained("window", repr(VOLUME_DEFAULTS["window"])),
    "percentiles": _trained("percentiles", repr(VOLUME_DEFAULTS["percentiles"])),
    # evaluation and inference: classify the whole resampled study by windows of image_size (batch size 1),
    # aggregating their logits by "max" (a finding in one place, as a lesion) or "mean"
    "sliding_window": False,
    "sliding_window_overlap": 0.25,
    "sliding_window_aggregate": "max",
}


def _volume_eval_batch_size() -> str:
    return "$1 if hmn.training.as_bool(@sliding_window) else @batch_size"


def _volume_common(config: dict) -> dict:
    """The keys every 3D config shares, replacing the radiograph ones (``voi``, ``aspect``, square sizes)."""
    for key in ("voi", "aspect"):
        config.pop(key, None)
    config.update({k: v for k, v in _VOLUME_KEYS.items()})
    config["imports"] = [*config["imports"], "$import hmn.inferers"]
    config["model_settings"] = dict(_VOLUME_MODEL_SETTINGS)
    config["dataset_dir"] = "$hmn.data.cli.default_demo3d_root()"
    return config


def _volume_train_config(config: dict) -> dict:
    config = _volume_common(config)
    config["demo"] = {"n_volumes": 600, "seed": 0}
    config["datalist"] = (
        "$hmn.runs.trained(@ckpt_dir, 'datalist', None, @use_run_record) or hmn.training.resolve_datalist(@dataset_dir, "
        "demo=@demo if @dataset_dir == hmn.data.cli.default_demo3d_root() else None, volumes=True)")
    train, validate, test = config["train"], config["validate"], config["test"]
    train["preprocessing"]["transforms"] = (_volume_load_transforms(training=True) + [_label_transform()] + _volume_augmentation()
                                            + [{"_target_": "EnsureTyped", "keys": ["image", "label"], "track_meta": False}])
    validate["preprocessing"]["transforms"] = _volume_load_transforms() + [_label_transform()]
    for split in (train, validate, test):
        split["dataset"]["item_shape"] = "$[@network_def#in_channels, *@image_size]"
    # validation, the test split after training and evaluate.json classify studies as sliding_window says
    for split in (validate, test):
        split["dataloader"]["batch_size"] = _volume_eval_batch_size()
    validate["inferer"] = _volume_inferer()
    test["evaluator"]["inferer"] = _volume_inferer()
    return config


def train_config(name: str) -> dict:
    """``configs/train.json`` of bundle ``name``."""
    row = BUNDLES[name]
    # best_model and early_stop: the best validation score so far and the early-stopping count, so that a
    # resumed run neither overwrites model.pt with a worse model nor restarts its patience
    save_dict = {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "trainer": "@train#trainer",
                 "best_model": "$hmn.training.BestModelRecord(@validate#best_saver, @validate#evaluator)",
                 "early_stop": "$hmn.training.EarlyStopRecord(@validate#early_stop)"}
    config = {
        "imports": [
            "$import os",
            "$import torch",
            "$import monai",
            "$import ignite",
            "$import hmn",
            "$import hmn.bundles",
            "$import hmn.checkpoints",
            "$import hmn.evaluation",
            "$import hmn.evaluation.external",
            "$import hmn.data",
            "$import hmn.data.cli",
            "$import hmn.handlers",
            "$import hmn.losses",
            "$import hmn.networks",
            "$import hmn.runs",
            "$import hmn.training",
            "$import hmn.transforms",
        ],
        "bundle_root": f"bundles/{name}",
        "ckpt_dir": "$os.path.join(@bundle_root, 'models')",
        "output_dir": "$os.path.join(@bundle_root, 'runs')",
        "dataset_dir": "$hmn.data.cli.default_demo_root()",
        "demo": {"n_images": 900, "image_size": 256, "seed": 0},
        # a resume, evaluation and inference default to the datalist the model was trained on (run record)
        "datalist": "$hmn.runs.trained(@ckpt_dir, 'datalist', None, @use_run_record) or hmn.training.resolve_datalist(@dataset_dir, demo=@demo if @dataset_dir == hmn.data.cli.default_demo_root() else None)",
        # evaluation, inference and a resume take the model's settings from its run record (hmn.runs)
        "use_run_record": "$hmn.training.as_bool(@resume)",
        # a packed bundle names its model.pt here (sha256); evaluation and inference refuse other weights
        "model_sha256": "",
        "class_names": _trained("class_names", "hmn.training.class_names(@datalist)"),
        # how the class names read in the finding vocabulary (hmn.data.vocabulary): the datalist's source
        "label_vocabulary": _trained("label_vocabulary", "hmn.evaluation.external.datalist_vocabulary(@datalist)"),
        "num_classes": "$len(@class_names)",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "seed": _trained("seed", "0"),
        "image_size": _trained("image_size", "224"),
        "voi": _trained("voi", "'apply'"),
        # other aspect ratios than square: "stretch" to image_size, or keep proportions and "pad" / "crop"
        "aspect": _trained("aspect", "'stretch'"),
        "batch_size": _trained("batch_size", repr(row.batch_size)),
        # loader worker processes: none on the CPU (loading runs at 100-600 images/s there, the model at about 7,
        # benchmarks/bench_data.py), the node's CPUs shared among its processes with CUDA (hmn.training.default_num_workers)
        "num_workers": "$hmn.training.default_num_workers()",
        # "auto": in memory when the split fits in half the memory available (counting 2x the float32 images'
        # size, the resident cost measured per cached image), else on disk (runs/cache), else none, with the sizes
        # logged; "memory" (refused when it cannot fit), "persistent", "none"
        "cache": "auto",
        "skip_bad_files": True,
        "max_epochs": _trained("max_epochs", "30"),
        "val_interval": 1,
        "early_stop_patience": 10,
        "learning_rate": _trained("learning_rate", repr(row.learning_rate)),
        "weight_decay": _trained("weight_decay", "0.05"),
        "warmup_epochs": _trained("warmup_epochs", "1"),
        "accumulation_steps": _trained("accumulation_steps", "1"),
        "amp": "$torch.cuda.is_available()",
        # the GPU fast path: the training autocast's type (bfloat16 where the GPU computes it, Ampere
        # and later; float16 before), the network's weights in channels_last (NHWC; convolutions then run in it
        # on the tensor cores), and the fused AdamW kernel; each can be switched off from the command line
        "amp_dtype": "$'bfloat16' if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else 'float16'",
        "channels_last": "$torch.cuda.is_available()",
        "fused_optimizer": "$torch.cuda.is_available()",
        # bfloat16 autocast of the training forward pass on a CPU that computes bfloat16 natively (the
        # CUDA counterpart is "amp"); validation, evaluation and inference stay float32.
        "cpu_bf16": "$hmn.training.cpu_bf16_supported()",
        "compile": False,
        "use_pos_weight": True,
        "resume": False,
        "pretrained": False,
        "backbone_options": _trained("backbone_options", _scratch_default(row)),
        "hierarchical": _trained("hierarchical", "False"),
        # the hierarchical head's coarse groups are those of the run's classes (4 for ChestX-ray14's 14)
        "num_coarse_classes": "$len(hmn.losses.fine_to_coarse_indices(@class_names)[1]) if @hierarchical else 0",
        "network_def": {
            "_target_": "hmn.networks.HybridMedNet",
            "backbone": _trained("backbone", repr(name)),
            "num_classes": "@num_classes",
            "in_channels": _trained("in_channels", "1"),
            "img_size": "@image_size",
            "pretrained": "@pretrained",
            "backbone_options": "@backbone_options",
            "attention": _trained("attention", repr(list(row.attention))),
            "fpn_channels": _trained("fpn_channels", "256"),
            "fusion_channels": _trained("fusion_channels", "512"),
            "num_heads": _trained("num_heads", "8"),
            "context_size": _trained("context_size", "7"),
            "dropout": _trained("dropout", "0.2"),
            "hierarchical": "@hierarchical",
            "num_coarse_classes": "@num_coarse_classes",
        },
        "model_settings": dict(_MODEL_SETTINGS),
        "schedule_settings": dict(_SCHEDULE_SETTINGS),
        "run_settings": "$dict(@model_settings, **@schedule_settings)",
        "network": "$hmn.training.to_device(@network_def, @device, @channels_last)",
        "loss": "$hmn.losses.MultiLabelBCELoss(pos_weight=hmn.training.pos_weight(@train#dataset#data, @use_pos_weight)).to(@device) if not @hierarchical else hmn.losses.HierarchicalLoss(@num_classes, hmn.losses.fine_to_coarse_indices(@class_names)[0], pos_weight=hmn.training.pos_weight(@train#dataset#data, @use_pos_weight)).to(@device)",
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
            "weight_decay": "@weight_decay",
            "fused": "$hmn.training.as_bool(@fused_optimizer) or None",
        },
        "lr_scheduler": {
            "_target_": "monai.optimizers.WarmupCosineSchedule",
            "optimizer": "@optimizer",
            "warmup_steps": "$@warmup_epochs * len(@train#dataloader)",
            "t_total": "$@max_epochs * len(@train#dataloader)",
            "warmup_multiplier": 0.01,
        },
        "train": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": _load_transforms()
                + [
                    _label_transform(),
                    {
                        "_target_": "RandAffined",
                        "keys": "image",
                        "prob": 0.7,
                        "rotate_range": [0.15],
                        "scale_range": [0.1, 0.1],
                        "translate_range": ["$@image_size * 0.05", "$@image_size * 0.05"],
                        "padding_mode": "zeros",
                    },
                    {"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5]},
                    {"_target_": "EnsureTyped", "keys": ["image", "label"], "track_meta": False},
                ],
            },
            "dataset": _dataset("training", "@train#preprocessing"),
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "shuffle": True,
                "num_workers": "@num_workers",
                # a last batch of one item would stop BatchNorm in training mode: it waits for another epoch
                "drop_last": "$hmn.training.drop_last_batch(len(@train#dataset), @batch_size)",
            },
            "inferer": {"_target_": "hmn.training.CPUAutocastInferer", "enabled": "@cpu_bf16"},
            "postprocessing": {"_target_": "Compose", "transforms": []},
            # These two reference the trainer itself, so they are attached in "run", not listed in its handlers.
            "resume": {
                "_target_": "hmn.training.ResumeFromLatest",
                "ckpt_dir": "@ckpt_dir",
                "enabled": "@resume",
                "load_dict": save_dict,
                "map_location": "@device",
                "saver": "@train#checkpoint",
                "history": "$os.path.join(@output_dir, 'history.csv')",
                # read before this run's start is recorded ("run" attaches the resume first)
                "input_changes": "$hmn.runs.input_changes(@ckpt_dir, @run_settings, @use_run_record)",
            },
            # Crash-safe (hmn.checkpoints): atomic writes, the previous checkpoint kept until the next is
            # complete, and the staged best model promoted to model.pt once its epoch's checkpoint is complete.
            "checkpoint": {"_target_": "hmn.checkpoints.AtomicCheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": save_dict,
                           "save_interval": 1, "n_saved": 1, "best_model_saver": "@validate#best_saver"},
            # inline in the handler list, named here by reference: MONAI's check_properties reads every entry of
            # train#handlers as a dict (a "@..." entry there stops it with a TypeError, so the zoo's checks fail)
            "epoch_loss": "@train#handlers#0",
            # one run per models folder (hmn.run_lock): taken first thing in "run" (before the checks of the folder),
            # and by the trainer itself when it starts under another driver
            "run_lock": "@train#handlers#1",
            "handlers": [
                {"_target_": "hmn.training.EpochLoss"},
                {"_target_": "hmn.run_lock.RunLock", "path": "@ckpt_dir", "purpose": "training"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "epoch_level": False, "print_lr": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True, "interval": "@val_interval"},
                {"_target_": "hmn.data.SkippedFilesReport", "dataset": "@train#dataset"},
                # rank 0 only from here on (multi_gpu_train.json drops the last entries on other ranks)
                {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": _LOSS},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss", "output_transform": _LOSS},
                {"_target_": "hmn.training.RunTimeEstimate"},
                {"_target_": "ignite.handlers.ProgressBar", "persist": True},
            ],
            "trainer": {
                "_target_": "SupervisedTrainer",
                "device": "@device",
                "max_epochs": "@max_epochs",
                "train_data_loader": "@train#dataloader",
                "network": "@network",
                "optimizer": "@optimizer",
                "loss_function": "@loss",
                "inferer": "@train#inferer",
                "postprocessing": "@train#postprocessing",
                "train_handlers": "@train#handlers",
                "amp": "@amp",
                "amp_kwargs": "$hmn.training.amp_kwargs(@amp_dtype)",
                "compile": "@compile",
                "accumulation_steps": "@accumulation_steps",
            },
        },
        # after training: the best model on the test split (hmn.training.evaluate_after_training)
        "evaluate_after_training": True,
        # the fewest positive (and negative) patients a finding needs for intervals and the macro means
        "min_positives": "$hmn.evaluation.DEFAULT_MIN_POSITIVES",
        "test": {
            "dataset": {
                "_target_": "hmn.training.make_dataset",
                "data": "$hmn.data.load_datalist(@datalist, 'test')",
                "transform": "@validate#preprocessing",
                "cache": "none",
                "skip_bad_files": "@skip_bad_files",
                "bad_files": "leave_out",
                "item_shape": "$[@network_def#in_channels, @image_size, @image_size]",
            },
            "dataloader": {"_target_": "DataLoader", "dataset": "@test#dataset", "batch_size": "@batch_size",
                           "shuffle": False, "num_workers": "@num_workers"},
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@test#dataloader",
                "network": "@network",
                "inferer": {"_target_": "SimpleInferer"},
                "amp": "@amp",
                "val_handlers": [
                    {"_target_": "hmn.checkpoints.CheckpointLoader", "load_path": "$os.path.join(@ckpt_dir, 'model.pt')",
                     "load_dict": {"model": "@network"}, "map_location": "@device"},
                    # thresholds: the validation split's, recorded with model.pt (models/thresholds.json)
                    {"_target_": "hmn.handlers.EvaluationReportHandler", "output_dir": "$os.path.join(@output_dir, 'eval')",
                     "class_names": "@class_names", "num_classes": "@num_classes",
                     "thresholds": "$hmn.evaluation.model_thresholds(@ckpt_dir)",
                     "min_positives": "@min_positives",
                     "metadata": "$hmn.data.datalist_metadata(@datalist, 'test')"},
                ],
            },
        },
        "validate": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": _load_transforms() + [_label_transform()],
            },
            "dataset": _dataset("validation", "@validate#preprocessing"),
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@validate#dataset",
                "batch_size": "@batch_size",
                "shuffle": False,
                "num_workers": "@num_workers",
            },
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": _val_postprocessing(),
            # the report's macro ROC AUC: undefined classes and masked labels left out (hmn.evaluation.macro_auc)
            "key_metric": {"val_auc": {"_target_": "hmn.handlers.MacroROCAUC"}},
            "early_stop": {
                "_target_": "EarlyStopHandler",
                "patience": "@early_stop_patience",
                "score_function": "$monai.handlers.stopping_fn_from_metric('val_auc')",
                "epoch_level": True,
            },
            "handlers": [
                "@validate#early_stop",
                # with each new best model, the validation split's operating thresholds (models/thresholds.json)
                {"_target_": "hmn.handlers.ValidationThresholds", "ckpt_dir": "@ckpt_dir", "class_names": "@class_names"},
                # rank 0 only from here on
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
                "@validate#best_saver",
                {"_target_": "hmn.training.MetricHistory", "filename": "$os.path.join(@output_dir, 'history.csv')",
                 "loss": "@train#epoch_loss"},
            ],
            "best_saver": {
                "_target_": "hmn.checkpoints.AtomicCheckpointSaver",
                "save_dir": "@ckpt_dir",
                "save_dict": {"model": "@network"},
                "save_key_metric": True,
                "key_metric_filename": "model.pt",
                "stage_key_metric": True,
            },
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@validate#dataloader",
                "network": "@network",
                "inferer": "@validate#inferer",
                "postprocessing": "@validate#postprocessing",
                "key_val_metric": "@validate#key_metric",
                "val_handlers": "@validate#handlers",
                "amp": "@amp",
            },
        },
        "initialize": ["$hmn.bundles.install_error_summary()", "$hmn.bundles.check_overrides()",
                       "$monai.utils.set_determinism(seed=@seed)"],
        "run": _TRAIN_RUN,
        "training": _TRAIN_RUN,
        # a run driven from Python (monai.bundle.run, create_workflow) leaves the models folder free for the next
        "finalize": ["$@train#run_lock.release()"],
    }
    return _volume_train_config(config) if is_volume_bundle(name) else config


def evaluate_config(name: str) -> dict:
    """``configs/evaluate.json``: overrides ``train.json`` to evaluate ``models/model.pt`` on the test split."""
    return {
        "eval_split": "test",
        "eval_dir": "$os.path.join(@output_dir, 'eval')",
        # the model is rebuilt from its run record (models/run.json); its weights come from model.pt
        "use_run_record": True,
        "pretrained": False,
        # "validation": the validation split's thresholds recorded with the model (models/thresholds.json; a fixed
        # 0.5, stated, when there is none); a metrics.json or thresholds.json path; "fixed" (fixed_threshold);
        # "youden": fitted on the evaluated split itself, optimistic, and marked so in every file
        "thresholds": "validation",
        "fixed_threshold": 0.5,
        "n_bootstrap": 1000,
        # "none", or the metrics.json of an evaluation on the validation split: its fitted temperatures
        "temperature": "none",
        # "same": the datalist has the model's classes; "shared": evaluate the findings both name (external
        # validation through hmn.data.vocabulary)
        "findings": "same",
        "label_vocabulary": _trained("label_vocabulary", "None"),
        "finding_match": "$hmn.evaluation.external.match_for_evaluation(@class_names, @datalist, @findings, @label_vocabulary)",
        "validate#dataset#data": "$hmn.data.load_datalist(@datalist, @eval_split)",
        "validate#dataset#name": "$@eval_split + ' data'",
        "validate#postprocessing": {"_target_": "Compose", "transforms": []},
        "validate#key_metric": {
            "test_auc": {
                "_target_": "hmn.handlers.MacroROCAUC",
                "output_transform": "$lambda out: hmn.handlers.stack_pred_label(out, @num_classes, @finding_match)",
            }
        },
        "validate#handlers": [
            {"_target_": "hmn.checkpoints.CheckpointLoader", "load_path": "$os.path.join(@ckpt_dir, 'model.pt')", "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "hmn.handlers.EvaluationReportHandler",
                "output_dir": "@eval_dir",
                "class_names": "@class_names",
                "thresholds": "$hmn.evaluation.model_thresholds(@ckpt_dir, @thresholds)",
                "fixed_threshold": "@fixed_threshold",
                "n_bootstrap": "@n_bootstrap",
                "min_positives": "@min_positives",
                "num_classes": "@num_classes",
                "metadata": "$hmn.data.datalist_metadata(@datalist, @eval_split)",
                "temperature": "@temperature",
                "finding_match": "@finding_match",
            },
        ],
        "initialize": ["$hmn.bundles.install_error_summary()", "$hmn.bundles.check_overrides()",
                       "$monai.utils.set_determinism(seed=@seed)"],
        "run": _EVAL_RUN,
        "evaluating": _EVAL_RUN,
    }


def inference_config(name: str) -> dict:
    """``configs/inference.json``: a folder or datalist of unlabelled images to a predictions CSV (standalone)."""
    train = train_config(name)
    config = {
        "imports": ["$import os", "$import torch", "$import monai", "$import hmn", "$import hmn.bundles", "$import hmn.data.cli", "$import hmn.inference", "$import hmn.networks", "$import hmn.handlers", "$import hmn.losses", "$import hmn.runs", "$import hmn.training", "$import hmn.transforms"],
        "bundle_root": train["bundle_root"],
        "ckpt_dir": train["ckpt_dir"],
        "output_dir": train["output_dir"],
        "dataset_dir": "$hmn.data.cli.default_demo_root()",
        "input": "@dataset_dir",
        "output_file": "$os.path.join(@output_dir, 'predictions.csv')",
        # --resume True after a stop: images with an error-free row in output_file (or, under torchrun, in a
        # rank's share) are not predicted again, and the rows (and heatmap index) written so far are kept
        "resume": False,
        # Grad-CAM heatmaps (hmn.explain): per image, an overlay PNG and a .npy per chosen finding at or above its
        # threshold (a number, or an evaluation metrics.json's per-finding thresholds), named by a hash of the path
        "heatmaps": False,
        "heatmap_dir": "$os.path.join(@output_dir, 'heatmaps')",
        "heatmap_findings": "all",
        "heatmap_thresholds": 0.5,
        "heatmap_levels": "finest",
        # the model is rebuilt from its run record (models/run.json); the demo's classes without one
        "use_run_record": True,
        "model_sha256": "",
        "class_names": _trained("class_names", repr(list(DEMO_CLASSES))),
        "label_vocabulary": _trained("label_vocabulary", "None"),
        "num_classes": "$len(@class_names)",
        "device": train["device"],
        "image_size": train["image_size"],
        "voi": train.get("voi"),
        "aspect": train.get("aspect"),
        "batch_size": train["batch_size"],
        "num_workers": "$hmn.training.default_num_workers()",
        "pretrained": False,
        "backbone_options": train["backbone_options"],
        "hierarchical": train["hierarchical"],
        # the hierarchical head's coarse groups are those of the run's classes (4 for ChestX-ray14's 14)
        "num_coarse_classes": "$len(hmn.losses.fine_to_coarse_indices(@class_names)[1]) if @hierarchical else 0",
        "network_def": train["network_def"],
        "model_settings": dict(_MODEL_SETTINGS),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _load_transforms()},
        "dataset": {
            "_target_": "hmn.inference.InferenceDataset",
            "data": "$hmn.inference.inference_items(@input, skip_done=@output_file if hmn.training.as_bool(@resume) else None)",
            "transform": "@preprocessing",
            "placeholder_shape": [1, "@image_size", "@image_size"],
        },
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size", "shuffle": False, "num_workers": "@num_workers"},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": []},
        "handlers": [
            {"_target_": "hmn.checkpoints.CheckpointLoader", "load_path": "$os.path.join(@ckpt_dir, 'model.pt')", "load_dict": {"model": "@network"}, "map_location": "@device"},
            # before the CSV writer: an iteration's heatmaps are on disk before its rows (see HeatmapWriter)
            {
                "_target_": "hmn.handlers.HeatmapWriter",
                "enabled": "@heatmaps",
                "output_dir": "@heatmap_dir",
                "network": "@network",
                "class_names": "@class_names",
                "num_classes": "@num_classes",
                "findings": "@heatmap_findings",
                "thresholds": "@heatmap_thresholds",
                "levels": "@heatmap_levels",
                "resume": "$hmn.training.as_bool(@resume)",
            },
            {
                "_target_": "hmn.handlers.PredictionCSVWriter",
                "output_file": "@output_file",
                "class_names": "@class_names",
                "num_classes": "@num_classes",
                "resume": "$hmn.training.as_bool(@resume)",
            },
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "$torch.cuda.is_available()",
        },
        "initialize": ["$hmn.bundles.install_error_summary()", "$hmn.bundles.check_overrides()"],
        "run": _INFER_RUN,
        "inference": _INFER_RUN,
    }
    return _volume_inference_config(config) if is_volume_bundle(name) else config


def _volume_inference_config(config: dict) -> dict:
    from hmn.data.demo3d import DEMO3D_CLASSES

    config = _volume_common(config)
    config["class_names"] = _trained("class_names", repr(list(DEMO3D_CLASSES)))
    config["preprocessing"]["transforms"] = _volume_load_transforms()
    dataset = config["dataset"]
    # a folder is searched for NIfTI files and DICOM series folders (one study each), not for single files
    dataset["data"] = dataset["data"].replace("hmn.inference.inference_items(@input, ", "hmn.inference.inference_items(@input, volumes=True, ")
    dataset["placeholder_shape"] = "$[1, *@image_size]"
    config["dataloader"]["batch_size"] = _volume_eval_batch_size()
    config["inferer"] = _volume_inferer()
    # Grad-CAM overlays are drawn on radiographs; a 3D model has none
    config["heatmaps"] = False
    config["run"] = config["inference"] = ["$hmn.inference.refuse_volume_heatmaps(@heatmaps)", *_INFER_RUN]
    return config


# the start of every torchrun workflow: the process group (NCCL on GPUs, gloo on CPUs), this rank's GPU, and the
# override check on rank 0 only
_DIST_INIT = [
    "$import torch.distributed as dist",
    "$hmn.bundles.install_error_summary()",
    "$dist.is_initialized() or dist.init_process_group(backend=@backend)",
    "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
    "$hmn.bundles.check_overrides() if dist.get_rank() == 0 else None",
]


def multi_gpu_config(name: str) -> dict:
    """``configs/multi_gpu_train.json``: overrides ``train.json`` for ``torchrun`` (DDP, DistributedSampler)."""
    return {
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else torch.device('cpu')",
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$hmn.training.to_device(@network_def, @device, @channels_last)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
        },
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True, "shuffle": True},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "train#trainer#train_handlers": f"$@train#handlers[: -{_RANK0_TRAIN_HANDLERS} if dist.get_rank() > 0 else None]",
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False, "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#val_handlers": f"$@validate#handlers[: -{_RANK0_VAL_HANDLERS} if dist.get_rank() > 0 else None]",
        "initialize": [*_DIST_INIT, "$monai.utils.set_determinism(seed=@seed)"],
        "run": _DIST_TRAIN_RUN,
        "training": _DIST_TRAIN_RUN,
        "finalize": ["$@train#run_lock.release()", "$dist.is_initialized() and dist.destroy_process_group()"],
    }


def multi_gpu_inference_config(name: str) -> dict:
    """``configs/multi_gpu_inference.json``: overrides ``inference.json`` for ``torchrun``. Each process
    predicts every world_size-th image (``hmn.inference.shard_items``) into ``<stem>.rank<r>.csv``; rank 0
    merges the shares into the one ``output_file`` when all are done (``hmn.inference.merge_rank_outputs``).
    No DDP wrapper: inference needs no gradient synchronisation."""
    volumes = is_volume_bundle(name)
    run = ["$hmn.inference.refuse_volume_heatmaps(@heatmaps)", *_DIST_INFER_RUN] if volumes else _DIST_INFER_RUN
    return {
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else torch.device('cpu')",
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "dataset#data": "$hmn.inference.shard_items(hmn.inference.inference_items(@input, " + ("volumes=True, " if volumes else "")
                        + "skip_done=hmn.inference.run_outputs(@output_file) if hmn.training.as_bool(@resume) else None))",
        "initialize": _DIST_INIT,
        "run": run,
        "inference": run,
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }


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


def export_args(name: str, fmt: str) -> dict:
    """The ``--args_file`` content of bundle ``name``'s export: ``fmt`` ``"torchscript"`` for
    ``python -m monai.bundle ckpt_export``, ``"onnx"`` for ``python -m monai.bundle onnx_export``.

    Both build ``network_def`` of ``configs/inference.json`` with ``bundle_root`` ``"."`` (so the network comes
    from ``models/run.json`` and ``models/model.pt`` of the folder the command runs in) and write
    ``models/model.ts`` or ``models/model.onnx``; any argument given on the command line wins over the file's.
    TorchScript: scripted (``use_trace`` false), or traced at the metadata's input shape where the backbone
    row says ``torchscript="trace"``. ONNX: traced by PyTorch's TorchScript-based exporter (``dynamo`` false: the
    newer exporter needs the ``onnxscript`` package), at the metadata's input shape (``--input_shape`` for
    another), with a dynamic batch axis, dynamic height and width unless the backbone is built for one size
    (Swin, Vim), and checked with onnxruntime against the PyTorch network within :data:`ONNX_ATOL`.
    An unknown ``fmt`` raises ``ValueError``.
    """
    spec = get_backbone_spec(name)
    common = {
        "net_id": "network_def",
        "bundle_root": ".",
        "config_file": "configs/inference.json",
        "meta_file": "configs/metadata.json",
        "ckpt_file": "models/model.pt",
    }
    if fmt == "torchscript":
        return {**common, "filepath": "models/model.ts", "use_trace": spec.torchscript == "trace"}
    if fmt == "onnx":
        return {
            **common,
            "filepath": "models/model.onnx",
            "use_trace": True,
            "converter_kwargs": {
                "dynamo": False,
                "opset_version": ONNX_OPSET,
                "input_names": ["image"],
                "output_names": ["pred"],
                # axis lists (JSON has no integer keys); the exporter names them
                # a traced backbone (3D Swin) bakes the traced size into its window arithmetic, as a fixed-size one does
                "dynamic_axes": {"image": [0] if spec.fixed_size or spec.torchscript == "trace"
                                 else [0, *range(2, spec.spatial_dims + 2)], "pred": [0]},
                "verify": True,
                "use_ort": True,
                "rtol": 0.0,
                "atol": ONNX_ATOL,
            },
        }
    raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORT_ARGS)}")


def metadata(name: str) -> dict:
    """``configs/metadata.json`` following MONAI's bundle specification."""
    spec = get_backbone_spec(name)
    row = BUNDLES[name]
    meta = {
        "schema": SCHEMA_URL,
        "version": __version__,
        "changelog": {__version__: f"first HybridMedNet bundle over {spec.description or name}"},
        "monai_version": TESTED_WITH["monai"],
        "pytorch_version": TESTED_WITH["torch"],
        "numpy_version": TESTED_WITH["numpy"],
        # MONAI renames the older "optional_packages_version" to this key (with a warning), so there is one.
        "required_packages_version": {k: TESTED_WITH[k] for k in REQUIRED_PACKAGES},
        "name": f"HybridMedNet {name}",
        "task": "Multi-label classification of findings on chest radiographs",
        "description": (
            f"HybridMedNet over a {spec.description or name} backbone ({spec.params_m}M parameters as an ImageNet "
            f"classifier): feature pyramid, {' + '.join(row.attention)} attention, adaptive multi-scale fusion "
            "and a multi-label head. The default data is the project's SYNTHETIC demo dataset; no accuracy on "
            "real radiographs is claimed. " + INSTALL_NOTE
        ),
        "authors": "HybridMedNet developers",
        "copyright": "Copyright (c) HybridMedNet developers",
        "data_source": "Synthetic chest-radiograph phantoms generated by hmn.data.make_demo_dataset (default); "
        "NIH ChestX-ray14, CheXpert or a folder per class through `python -m hmn datalist`.",
        "data_type": "dicom, png",
        "image_classes": "one channel, intensity rescaled to [0, 1] (0.5-99.5 percentiles), resized to image_size",
        "label_classes": "multi-hot vector, one entry per class in the datalist's class_names",
        "pred_classes": "one logit per class (sigmoid for probabilities)",
        "intended_use": "Research only. Not a medical device; not for diagnosis or treatment decisions.",
        "references": [
            "Liu Z. et al., A ConvNet for the 2020s, CVPR 2022",
            "Liu Z. et al., Swin Transformer, ICCV 2021",
            "Tan M., Le Q., EfficientNetV2, ICML 2021",
            "Zhu L. et al., Vision Mamba, ICML 2024",
            "Lin T.-Y. et al., Feature Pyramid Networks for Object Detection, CVPR 2017",
            "Woo S. et al., CBAM: Convolutional Block Attention Module, ECCV 2018",
            "Wang X. et al., ChestX-ray8, CVPR 2017",
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "XR",
                    "num_channels": 1,
                    "spatial_shape": [224, 224],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    # one logit per class, not probabilities (the schema's "tabular": one row of values per image)
                    "type": "tabular",
                    "format": "classes",
                    "num_channels": len(DEMO_CLASSES),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_onehot": False,
                    "channel_def": {str(i): c for i, c in enumerate(DEMO_CLASSES)},
                }
            },
        },
    }
    return _volume_metadata(meta) if is_volume_bundle(name) else meta


def _volume_metadata(meta: dict) -> dict:
    from hmn.data.demo3d import DEMO3D_CLASSES

    meta["task"] = "Multi-label classification of findings on CT and MR volumes"
    description = meta["description"]
    meta["description"] = (description[: description.index(" (")] + " (no published ImageNet size: a 3D network)"
                           + description[description.index("): ") + 1:]).replace(
        "SYNTHETIC demo dataset", "SYNTHETIC 3D demo dataset (CT-like volumes)").replace(
        "no accuracy on real radiographs is claimed", "no accuracy on real CT or MR studies is claimed")
    meta["data_source"] = ("Synthetic CT phantoms generated by hmn.data.make_demo3d_dataset (default); your own NIfTI "
                           "files or DICOM series through a datalist JSON (`python -m hmn datalist json`).")
    meta["data_type"] = "nifti, dicom"
    meta["image_classes"] = ("one channel, oriented to RAS, resampled to 1.5 x 1.5 x 3 mm, CT window 40/400 HU (or MR "
                             "1-99 percentiles) to [0, 1], cropped or padded to image_size (X, Y, Z)")
    meta["references"] = [r for r in meta["references"] if "Mamba" not in r and "ChestX-ray8" not in r] + [
        "Hatamizadeh A. et al., Swin UNETR, BrainLes 2021 (MONAI's 3D Swin Transformer encoder)",
        "Carreira J., Zisserman A., Quo Vadis, Action Recognition? (I3D weight inflation), CVPR 2017",
    ]
    image = meta["network_data_format"]["inputs"]["image"]
    image["modality"] = "CT"
    image["spatial_shape"] = list(VOLUME_DEFAULTS["image_size"])
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(DEMO3D_CLASSES)
    pred["channel_def"] = {str(i): c for i, c in enumerate(DEMO3D_CLASSES)}
    return meta


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=4) + "\n"


def bundle_files(name: str) -> dict[str, str]:
    """Relative path -> content of every generated file of bundle ``name``."""
    from hmn.bundle_docs import bundle_readme, license_text, volume_bundle_readme

    return {
        "configs/metadata.json": _dump(metadata(name)),
        "configs/train.json": _dump(train_config(name)),
        "configs/evaluate.json": _dump(evaluate_config(name)),
        "configs/inference.json": _dump(inference_config(name)),
        "configs/multi_gpu_train.json": _dump(multi_gpu_config(name)),
        "configs/multi_gpu_inference.json": _dump(multi_gpu_inference_config(name)),
        **{path: _dump(export_args(name, fmt)) for fmt, path in EXPORT_ARGS.items()},
        "configs/logging.conf": LOGGING_CONF,
        "docs/README.md": (volume_bundle_readme if is_volume_bundle(name) else bundle_readme)(name, BUNDLES[name], train_config(name)),
        "LICENSE": license_text(),
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def write_bundles(out: str | os.PathLike = "bundles", names: list[str] | None = None) -> list[str]:
    """Writes the bundles into ``out``; returns the files written."""
    written = []
    for name in names or list(BUNDLES):
        for rel, text in bundle_files(name).items():
            path = Path(out) / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(str(path))
    return written


def check_bundles(out: str | os.PathLike = "bundles") -> list[str]:
    """Differences between the bundles in ``out`` and what the generator writes (empty when identical)."""
    problems = []
    for name in BUNDLES:
        for rel, text in bundle_files(name).items():
            path = Path(out) / name / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            have = path.read_text()
            if have != text:
                diff = "".join(difflib.unified_diff(have.splitlines(True), text.splitlines(True), str(path), "generated", n=1))
                problems.append(diff[:2000])
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m hmn bundles``."""
    p = argparse.ArgumentParser(prog="python -m hmn bundles", description="Write or check the MONAI bundles.")
    p.add_argument("--out", default="bundles", help="bundles folder (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="fail if the committed bundles differ from the generator's")
    p.add_argument("names", nargs="*", help="bundles to write (default: all)")
    args = p.parse_args(argv)
    if args.check:
        problems = check_bundles(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} difference(s)" if problems else "bundles are up to date")
        return 1 if problems else 0
    unknown = [n for n in args.names if n not in BUNDLES]
    if unknown:
        print(f"unknown bundle(s) {unknown}; known: {', '.join(BUNDLES)}", file=sys.stderr)
        return 2
    files = write_bundles(args.out, args.names or None)
    print(f"wrote {len(files)} files under {args.out}/")
    return 0


def installed_versions(packages: tuple[str, ...] | None = None) -> dict[str, str]:
    """The installed version of each distribution in `packages` (default: those of :data:`TESTED_WITH`), as
    exact public versions (a local label such as ``+cu130`` dropped: no package index serves it). A package
    that is not installed keeps its :data:`TESTED_WITH` version, with a warning naming it."""
    import importlib.metadata
    import logging

    out = {}
    for dist in packages or tuple(TESTED_WITH):
        try:
            out[dist] = importlib.metadata.version(dist).split("+", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            logging.getLogger(__name__).warning("%s is not installed here: the packed metadata names the tested "
                                                "version %s", dist, TESTED_WITH.get(dist))
            if dist in TESTED_WITH:
                out[dist] = TESTED_WITH[dist]
    return out


def packed_metadata(metadata: dict, record: dict, versions: dict[str, str] | None = None) -> dict:
    """``metadata.json`` describing the trained model of run record `record`, as MONAI model-zoo bundles do:
    the input's channels and spatial shape, and the output's channels with a ``channel_def`` naming each
    class (then each coarse group of a hierarchical head).

    `versions` (distribution -> exact version, e.g. :func:`installed_versions`) replaces the template's
    ``monai_version``, ``pytorch_version``, ``numpy_version`` and the ``required_packages_version`` entries it
    names, so that the packed bundle says what it was packed with; None keeps the template's."""
    settings = record["settings"]
    out = json.loads(json.dumps(metadata))
    for key, dist in _VERSION_KEYS.items():
        if versions and dist in versions:
            out[key] = versions[dist]
    required = out.get("required_packages_version", {})
    for dist in required:
        if versions and dist in versions:
            required[dist] = versions[dist]
    fmt = out.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    image["num_channels"] = int(settings.get("in_channels", 1))
    size = settings["image_size"]
    # a radiograph model records one side (square images), a volume model its X, Y, Z sizes
    image["spatial_shape"] = [int(v) for v in size] if isinstance(size, (list, tuple)) else [int(size)] * 2
    classes = list(settings["class_names"])
    coarse = int(settings.get("num_coarse_classes") or 0) if settings.get("hierarchical") else 0
    pred = fmt.setdefault("outputs", {}).setdefault("pred", {})
    pred["num_channels"] = len(classes) + coarse
    pred["channel_def"] = {str(i): c for i, c in enumerate(classes + [f"coarse_group_{g}" for g in range(coarse)])}
    return out


_TRAINED_RE = re.compile(r"^\$hmn\.runs\.trained\(@ckpt_dir, '(\w+)', (.*), @use_run_record\)$")


def _literal(value: Any) -> str:
    """`value` as a Python literal for a config expression; "@" and "#" written as "\\x40" and "\\x23" so that
    MONAI neither reads a class name such as "Effusion (L@R)" as a reference nor rewrites "Heart #2"."""
    return repr(value).replace("@", "\\x40").replace("#", "\\x23")


def packed_config(config: dict, record: dict, model_sha256: str) -> dict:
    """A config of a packed bundle: every setting the configs take from a run record (:func:`_trained`)
    defaults to the recorded value (the datalist aside: the recipient has their own), so
    ``monai.bundle.load`` (with either workflow type) and the workflows build the trained model without
    reading the record; ``bundle_root`` is ``"."`` (MONAI's convention: run from the unpacked bundle's folder,
    or pass ``--bundle_root``); and ``model_sha256`` names the packed ``model.pt``, which the evaluation and
    inference workflows check before they run, so they never use other weights under this bundle's classes.
    """
    settings = {k: v for k, v in record["settings"].items() if k != "datalist"}

    def bake(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: bake(v) for k, v in node.items()}
        if isinstance(node, list):
            return [bake(v) for v in node]
        if isinstance(node, str):
            m = _TRAINED_RE.match(node)
            if m and m.group(1) in settings:
                return _trained(m.group(1), _literal(settings[m.group(1)]))
        return node

    out = bake(json.loads(json.dumps(config)))
    if "bundle_root" in out:
        out["bundle_root"] = "."
    out["model_sha256"] = model_sha256
    return out


def packed_inference_config(config: dict, record: dict, model_sha256: str = "") -> dict:
    """``inference.json`` of a packed bundle: :func:`packed_config`, reading no record at run time."""
    out = packed_config(config, record, model_sha256)
    out["use_run_record"] = False
    return out


# Files over this size the MONAI model zoo does not take into its repository: they are linked from
# large_files.yml (the zoo's CONTRIBUTING.md, "Model storage": 25 MB).
ZOO_FILE_LIMIT = 25_000_000
LARGE_FILES = "large_files.yml"
# what a packed bundle's large_files.yml says while the packer has given no URL; fetch_large_files refuses it
PLACEHOLDER_URL = "<upload models/model.pt and put its download URL here>"
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # what MONAI's download_url (and so the zoo's CI) checks


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """The hex digest of the file at `path` (read in 1 MiB blocks).

    Raises:
        ValueError: `hash_type` is not one of :data:`HASH_TYPES`.
    """
    import hashlib

    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def large_files_text(entries: list[dict[str, str]]) -> str:
    """``large_files.yml`` listing `entries` (``path``, ``url``, ``hash_val``, ``hash_type`` each), in the MONAI
    model zoo's layout, with a comment saying what the file is for and what to fill in."""
    import yaml

    head = (
        "# Files of this bundle that are linked rather than included (the MONAI model zoo's large_files.yml).\n"
        "# Each is downloaded to `path` (relative to the bundle folder) and checked against `hash_val` by\n"
        "# `python -m hmn fetch-large-files BUNDLE_FOLDER`, hmn.bundles.download_bundle and the zoo's CI.\n"
        f"# A url of {PLACEHOLDER_URL!r} is a placeholder: upload the file and put its download URL there.\n"
    )
    return head + yaml.safe_dump({"large_files": entries}, sort_keys=False, default_flow_style=False, width=1000)


def pack_bundle(name: str, zip_path: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                bundles_dir: str | os.PathLike = "bundles", link_weights: bool = False, weights_url: str | None = None,
                hash_type: str = "sha256") -> str:
    """Zips bundle ``name`` (configs, docs, LICENSE) with the trained ``models/model.pt``, its run record
    ``models/run.json`` and, where training recorded them, the validation split's operating thresholds
    ``models/thresholds.json``, for sharing.

    The archive holds one top-level folder ``<name>/``, the layout ``monai.bundle.download`` extracts and the
    MONAI model zoo's ``models/<name>/``: ``configs/metadata.json``, ``configs/inference.json``, ``LICENSE``
    and the weights at ``models/model.pt`` (the zoo's CI requires these). ``models_dir`` is where the trained
    ``model.pt`` and ``run.json`` lie (default: the bundle's own ``models/``); the full-state
    ``checkpoint_epoch=*.pt`` files are left out. The packed configs read the run record (:mod:`hmn.runs`), so
    evaluation, inference and ``monai.bundle.load`` rebuild the trained model; ``configs/metadata.json`` is
    rewritten to describe it and to name the package versions installed here (:func:`packed_metadata`,
    :func:`installed_versions`), and ``configs/inference.json`` carries the recorded settings itself
    (:func:`packed_inference_config`).

    Args:
        name: a bundle of :data:`BUNDLES`.
        zip_path: the archive to write (its folder is created).
        models_dir: the folder of ``model.pt`` and ``run.json``.
        bundles_dir: the folder of the generated bundles.
        link_weights: leave ``models/model.pt`` out of the archive and write ``large_files.yml`` at the
            bundle's root instead (the zoo links files over 25 MB): ``path`` ``models/model.pt``, ``url``
            `weights_url` or :data:`PLACEHOLDER_URL`, and ``hash_val`` / ``hash_type`` computed here.
            The file to upload is ``models_dir/model.pt`` itself.
        weights_url: where ``model.pt`` will be downloaded from; giving it implies `link_weights`.
        hash_type: the digest written to ``large_files.yml``: one of :data:`HASH_TYPES` (the zoo's own
            files use md5).

    Raises:
        FileNotFoundError: no bundle `name`, no ``model.pt``, or no ``run.json`` beside it (without the
            record a packed bundle could not know the model's classes and image size).
        ValueError: `hash_type` is not one of :data:`HASH_TYPES`, or `weights_url` is empty or not an
            http(s), ftp or file URL.
    """
    import zipfile
    from urllib.parse import urlparse

    from hmn.runs import RUN_RECORD, read_run_record

    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    if weights_url is not None:
        if urlparse(weights_url).scheme not in ("http", "https", "ftp", "file"):
            raise ValueError(f"weights URL {weights_url!r} is not an http(s), ftp or file URL")
        link_weights = True
    src = Path(bundles_dir) / name
    if not (src / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{src} is not a bundle (no configs/train.json); known bundles: {', '.join(BUNDLES)}")
    models = Path(models_dir or src / "models")
    model = models / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"no trained weights at {model}: train the bundle first, or pass models_dir")
    record = read_run_record(models)
    if record is None:
        raise FileNotFoundError(
            f"no {RUN_RECORD} beside {model}: without the run record a packed bundle cannot know the model's classes, "
            "image size and architecture (training writes it; a model trained before run records can be recorded "
            "with hmn.runs.write_run_record)"
        )
    sha = file_hash(model, "sha256")
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in bundle_files(name):
            if rel == "configs/metadata.json":
                meta = json.loads((src / rel).read_text())
                zf.writestr(f"{name}/{rel}", json.dumps(packed_metadata(meta, record, installed_versions()), indent=4) + "\n")
            elif rel == "configs/inference.json":
                config = json.loads((src / rel).read_text())
                zf.writestr(f"{name}/{rel}", json.dumps(packed_inference_config(config, record, sha), indent=4) + "\n")
            elif rel == "configs/train.json":
                config = json.loads((src / rel).read_text())
                zf.writestr(f"{name}/{rel}", json.dumps(packed_config(config, record, sha), indent=4) + "\n")
            else:
                zf.write(src / rel, f"{name}/{rel}")
        if link_weights:
            entry = {"path": "models/model.pt", "url": weights_url or PLACEHOLDER_URL,
                     "hash_val": sha if hash_type == "sha256" else file_hash(model, hash_type), "hash_type": hash_type}
            zf.writestr(f"{name}/{LARGE_FILES}", large_files_text([entry]))
        else:
            zf.write(model, f"{name}/models/model.pt")
        # the recipient has their own data: the local datalist path stays here
        shared = {**record, "settings": {k: v for k, v in record["settings"].items() if k != "datalist"}}
        zf.writestr(f"{name}/models/{RUN_RECORD}", json.dumps(shared, indent=1) + "\n")
        # the validation split's operating thresholds travel with the model they were fitted for
        if (models / "thresholds.json").is_file():
            zf.write(models / "thresholds.json", f"{name}/models/thresholds.json")
    return str(zip_path)


def pack_main(argv: list[str] | None = None) -> int:
    """``python -m hmn pack-bundle NAME ZIP [--models-dir DIR] [--link-weights] [--weights-url URL] [--hash-type T]``."""
    p = argparse.ArgumentParser(prog="python -m hmn pack-bundle",
                                description="Zip a bundle with its trained model.pt and run record.")
    p.add_argument("name", choices=list(BUNDLES))
    p.add_argument("zip", help="output .zip")
    p.add_argument("--models-dir", default=None, help="folder holding model.pt and run.json (default: bundles/NAME/models)")
    p.add_argument("--bundles-dir", default="bundles")
    p.add_argument("--link-weights", action="store_true",
                   help="leave models/model.pt out of the zip and write large_files.yml (its URL, hash and hash type) "
                   "instead, as the MONAI model zoo wants for files over 25 MB")
    p.add_argument("--weights-url", default=None,
                   help="where model.pt will be downloaded from (implies --link-weights; without it large_files.yml "
                   "holds a placeholder that the loaders refuse until it is filled in)")
    p.add_argument("--hash-type", default="sha256", choices=HASH_TYPES,
                   help="digest of model.pt in large_files.yml (default: %(default)s; the zoo's own files use md5)")
    args = p.parse_args(argv)
    try:
        path = pack_bundle(args.name, args.zip, args.models_dir, args.bundles_dir, link_weights=args.link_weights,
                           weights_url=args.weights_url, hash_type=args.hash_type)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    md5 = file_hash(path, "md5")
    model = Path(args.models_dir or Path(args.bundles_dir) / args.name / "models") / "model.pt"
    print(f"wrote {path}")
    print(f"md5 {md5}: give it to the download, hmn.bundles.download_bundle(url, bundle_dir, {args.name!r}, hash_val={md5!r})")
    if args.link_weights or args.weights_url:
        where = args.weights_url or f"an address of your choice, then replace the placeholder url in {args.name}/{LARGE_FILES}"
        print(f"models/model.pt is linked, not included: upload {model} ({args.hash_type} in {LARGE_FILES}) to {where}")
    elif model.stat().st_size > ZOO_FILE_LIMIT:
        print(f"note: {model} is {model.stat().st_size / 1e6:.0f} MB; the MONAI model zoo takes files up to 25 MB: "
              "pack with --link-weights --weights-url URL for a zoo submission")
    return 0


def _large_files_path(bundle: Path) -> Path | None:
    # the zoo's CI looks for large_files with these suffixes, the last one found winning
    found = None
    for suffix in ("json", "yaml", "yml"):
        if (bundle / f"large_files.{suffix}").is_file():
            found = bundle / f"large_files.{suffix}"
    return found


def read_large_files(bundle: str | os.PathLike) -> list[dict[str, str]]:
    """The entries of the bundle folder's ``large_files.yml`` (or ``.yaml``, ``.json``), checked; [] without one.

    Raises:
        ValueError: the file is unreadable or not in the zoo's layout: a ``large_files`` list of entries with
            ``path`` (relative, inside the bundle) and ``url`` text, optional ``hash_val`` and ``hash_type``
            (one of :data:`HASH_TYPES`), and no other keys; the message names the file and what is accepted.
    """
    import yaml

    path = _large_files_path(Path(bundle))
    if path is None:
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is read as YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not readable YAML/JSON ({type(e).__name__}: {e})") from e
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no 'large_files' list; accepted: large_files: [{{path, url, hash_val, hash_type}}, ...]")
    accepted = {"path", "url", "hash_val", "hash_type"}
    for i, e in enumerate(entries):
        where = f"{path}, entry {i + 1}"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("url"), str):
            raise ValueError(f"{where}: needs 'path' and 'url' as text, got {e!r}")
        if set(e) - accepted:
            raise ValueError(f"{where}: unknown keys {sorted(set(e) - accepted)}; accepted: {', '.join(sorted(accepted))}")
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{where}: path {e['path']!r} must be relative to the bundle folder and stay inside it")
        if e.get("hash_type") and e["hash_type"] not in HASH_TYPES:
            raise ValueError(f"{where}: hash_type {e['hash_type']!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    return entries


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _large_file_target(bundle: Path, root: str, rel: str, listed: Path | None) -> Path:
    """``bundle/rel``, after checking that neither it nor any folder on the way leads out of the bundle.

    Each existing component is looked at in turn: a folder that is a symbolic link may point elsewhere inside the
    bundle (`root`, the bundle folder resolved), not outside it; the file itself may not be a link at all, nor
    anything but a regular file. The fully resolved path must lie inside `root`."""
    current = bundle
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        current = current / part
        last = i == len(parts) - 1
        if os.path.islink(current):
            where = os.path.realpath(current)
            if last:
                raise ValueError(f"{listed}: {rel}: {current} is a symbolic link to {os.readlink(current)} (resolving to "
                                 f"{where}); refused: a linked file must be a plain file inside the bundle folder {root}")
            if not _within(where, root):
                raise ValueError(f"{listed}: {rel}: {current} is a symbolic link to {os.readlink(current)} (resolving to "
                                 f"{where}), outside the bundle folder {root}; refused: the download would be written there")
        elif os.path.lexists(current) and not (current.is_file() if last else current.is_dir()):
            raise ValueError(f"{listed}: {rel}: {current} exists and is not a {'file' if last else 'folder'}")
    where = os.path.realpath(current)
    if not _within(where, root):
        raise ValueError(f"{listed}: {rel}: {current} resolves to {where}, outside the bundle folder {root}; refused")
    return current


def fetch_large_files(bundle: str | os.PathLike) -> list[str]:
    """Downloads the files the bundle folder's ``large_files.yml`` links (:func:`read_large_files`) to their
    ``path`` and checks each against its ``hash_val``; a file already there is checked, not downloaded
    again. Returns the files' paths ([] for a bundle without ``large_files.yml``).

    The ``hash_val`` of each entry is the trust anchor for its file (an entry without one is downloaded with a
    warning that nothing checks it). Every target is resolved before anything is written: a target that is a
    symbolic link, or a folder on its way that is a link leading out of the bundle folder (as ``unzip`` creates
    from a zip holding links), is refused, naming the entry and where the link points. A download goes to a
    temporary file beside its target, inside the bundle, and is renamed into place only once complete and
    checked, so an interrupted or refused download leaves no partial file.

    Raises:
        FileNotFoundError: `bundle` is not a folder.
        ValueError: the list is malformed; an entry's target or a folder on its way is a symbolic link (see above)
            or not a file/folder; or an entry's ``url`` is :data:`PLACEHOLDER_URL` (or any text that is no
            http(s), ftp or file URL) while its file is absent: the message names the file and says what to
            fill in.
        RuntimeError: a download failed, or a file's digest differs from ``hash_val`` (the message names both).
    """
    import logging
    import shutil
    import tempfile
    from urllib.parse import urlparse

    from monai.apps import download_url

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"{bundle} is not a folder: give the unpacked bundle's folder (the one holding configs/)")
    entries = read_large_files(bundle)
    listed = _large_files_path(bundle)
    root = os.path.realpath(bundle)
    out = []
    for e in entries:
        target = _large_file_target(bundle, root, e["path"], listed)
        hash_val, hash_type = e.get("hash_val") or None, e.get("hash_type") or "md5"
        if not target.is_file() and urlparse(e["url"]).scheme not in ("http", "https", "ftp", "file"):
            what = "the placeholder" if e["url"] == PLACEHOLDER_URL else "not a URL:"
            raise ValueError(
                f"{listed}: the url of {e['path']} is {what} {e['url']!r}, so {target} cannot be downloaded. Put the "
                f"file's download address in 'url' (the packer: python -m hmn pack-bundle ... --weights-url URL), or "
                f"copy the file to {target}" + (f" ({hash_type} {hash_val})" if hash_val else "")
            )
        if hash_val is None:
            logging.getLogger(__name__).warning(
                "%s lists no hash_val for %s: the file is not checked. The hash is the trust anchor: without it nothing "
                "shows that the file is the one the bundle was packed with", listed, e["path"])
        if target.is_file():
            got = file_hash(target, hash_type) if hash_val else None
            if got != hash_val:
                raise RuntimeError(
                    f"{listed}: {target} is there but its {hash_type} is {got}, not the {hash_val} listed for {e['path']}: "
                    f"it is not the file the bundle was packed with. Delete it to download it again, or copy in the right file"
                )
            out.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=target.parent)
        try:
            part = Path(tmp) / target.name
            try:
                download_url(url=e["url"], filepath=str(part), hash_val=hash_val, hash_type=hash_type, progress=False)
            except (RuntimeError, OSError, ValueError) as err:
                raise RuntimeError(f"{listed}: {e['path']} from {e['url']}: {err}") from err
            if not part.is_file():  # MONAI's download_url passes over a PermissionError in silence
                raise RuntimeError(f"{listed}: {e['path']} from {e['url']}: the download wrote no file")
            # checked again just before the rename (which replaces a link, never writes through one)
            _large_file_target(bundle, root, e["path"], listed)
            os.replace(part, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(str(target))
    return out


def fetch_main(argv: list[str] | None = None) -> int:
    """``python -m hmn fetch-large-files BUNDLE_FOLDER``: :func:`fetch_large_files`."""
    p = argparse.ArgumentParser(prog="python -m hmn fetch-large-files",
                                description="Download and check the files a bundle's large_files.yml links (model.pt).")
    p.add_argument("bundle", help="the unpacked bundle's folder (the one holding large_files.yml and configs/)")
    args = p.parse_args(argv)
    try:
        files = fetch_large_files(args.bundle)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(files)} file(s) present and checked" + "".join(f"\n  {f}" for f in files) if files
          else f"{args.bundle} links no large files (no large_files.yml)")
    return 0


def download_bundle(url: str, bundle_dir: str | os.PathLike, name: str, hash_val: str | None = None,
                    hash_type: str = "md5", large_files: bool = True, max_bytes: int | None = None) -> str:
    """Fetches a packed bundle zip from ``url`` into ``bundle_dir/<name>``, checking its hash when given, then
    (`large_files`) the files its ``large_files.yml`` links (:func:`fetch_large_files`: ``model.pt`` of a
    bundle packed with ``--link-weights``), each checked against its own hash.

    The hash is the trust anchor: a bundle's configs are code (MONAI evaluates their ``$`` expressions when it
    parses them), so loading a downloaded bundle runs whatever its author wrote, as unpickling does. Give the MD5
    that ``python -m hmn pack-bundle`` printed; a download without `hash_val` logs a warning saying so.
    The zip is downloaded with ``monai.apps.download_url`` (which refuses a file whose `hash_type` digest differs
    from `hash_val`) into a temporary folder inside `bundle_dir`, and extracted by
    :func:`hmn.archives.extract_bundle_zip`, which refuses, before writing anything, an entry outside ``<name>/``,
    an absolute path or ``..``, a symbolic link, device file or FIFO, a duplicate name, and absurd sizes (declared
    total over `max_bytes`, a decompression bomb), then writes into a temporary folder renamed into place, so a
    refused or damaged zip leaves no ``bundle_dir/<name>``. Afterwards ``monai.bundle.load(name,
    bundle_dir=...)`` finds the bundle locally. (``monai.bundle.download(url=...)`` in MONAI 1.6 takes no hash,
    fetches no large files, and extracts any path inside `bundle_dir`, not only ``<name>/``.)

    Args:
        url: the zip's address (http(s), ftp or file URL).
        bundle_dir: the folder to put ``<name>/`` in (created).
        name: the bundle's folder name inside the zip (a plain folder name, e.g. ``convnext_tiny``).
        hash_val: the zip's digest; None downloads unchecked, with a warning.
        hash_type: one of :data:`HASH_TYPES`.
        large_files: also fetch the files ``large_files.yml`` links.
        max_bytes: limit on the sum of the zip's declared uncompressed sizes, in bytes (default
            :data:`hmn.archives.MAX_BUNDLE_BYTES`, 8 GiB).

    Raises:
        FileExistsError: ``bundle_dir/<name>`` already exists (it is left as it is; a bundle whose linked files
            are missing is completed with ``python -m hmn fetch-large-files``).
        hmn.archives.ArchiveError: (a ValueError) the zip is refused; the message names the URL and the entry.
        ValueError: `name` is not a plain folder name, `hash_type` is unknown, the archive holds no
            ``<name>/configs/``, or its ``large_files.yml`` is malformed, links through a symbolic link or still
            has the placeholder URL (see :func:`fetch_large_files`).
        RuntimeError: a download failed or a digest differs.
    """
    import logging
    import shutil
    import tempfile

    from monai.apps import download_url

    from hmn.archives import MAX_BUNDLE_BYTES, check_bundle_name, extract_bundle_zip

    check_bundle_name(name)
    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / name
    if os.path.lexists(target):
        raise FileExistsError(f"{target} already exists: remove it to download {url} there again (a bundle whose linked "
                              f"files are missing is completed with: python -m hmn fetch-large-files {target})")
    if not hash_val:
        logging.getLogger(__name__).warning(
            "downloading %s without hash_val: nothing checks that it is the bundle that was packed. The hash is the "
            "trust anchor: a bundle's configs are code that runs when it is loaded. Pass the md5 that "
            "`python -m hmn pack-bundle` printed", url)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.download-", dir=bundle_dir)
    try:
        zip_path = Path(tmp) / f"{name}.zip"
        try:
            download_url(url=url, filepath=str(zip_path), hash_val=hash_val or None, hash_type=hash_type, progress=False)
        except (RuntimeError, OSError, ValueError) as err:
            raise RuntimeError(f"{url}: the download failed: {err}") from err
        if not zip_path.is_file():  # MONAI's download_url passes over a PermissionError in silence
            raise RuntimeError(f"{url}: the download wrote no file")
        extract_bundle_zip(zip_path, bundle_dir, name, archive=url,
                           max_bytes=MAX_BUNDLE_BYTES if max_bytes is None else max_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if large_files:
        fetch_large_files(target)
    return str(target)
