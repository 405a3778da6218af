"""The one template every bundle's configs come from: ``train.json``, ``evaluate.json``, ``inference.json``, the
``torchrun`` overrides and the export argument files, with the 3D bundles' differences. The configs name
``hmn.*`` targets only, so a downloaded bundle needs the installed package and nothing else.
"""

from __future__ import annotations

from hmn.bundle.table import BUNDLES, EXPORT_ARGS, ONNX_ATOL, ONNX_OPSET, VOLUME_DEFAULTS, BundleRow, is_volume_bundle
from hmn.data.demo import DEMO_CLASSES
from hmn.inference import DICOM_UID_COLUMNS
from hmn.networks.backbones import get_backbone_spec
from hmn.runs import MODEL_SETTINGS, SCHEDULE_SETTINGS, VOLUME_SETTINGS

__all__ = ["evaluate_config", "export_args", "inference_config", "multi_gpu_config", "multi_gpu_inference_config",
           "train_config"]

_LOSS = "$monai.handlers.from_engine(['loss'], first=True)"
_RANK0_TRAIN_HANDLERS = 4  # the last entries of train#handlers run on rank 0 only (see multi_gpu_train.json)
_RANK0_VAL_HANDLERS = 4
# `python -m monai.bundle run training` runs the id "training"; a plain `run` runs "run".
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
                   "$hmn.inference.merge_rank_outputs(@output_file, @heatmap_dir if hmn.workflows.as_bool(@heatmaps) else None, "
                   "keep_existing=hmn.workflows.as_bool(@resume))"]
# A training run's behaviour (lock, checks, resume, run record, checkpoints, best model, final model, the test
# report) is attached to the trainer by hmn.workflows.TrainingRun (train#handlers#0), so that any driver calling
# train#trainer.run() (MONAI FL, create_workflow, a user's Python) gets all of it: the step list only starts it.
# The models folder is locked (hmn.run_lock) first, before the trainer and its handlers are built (they create
# runs/): a second run on the folder stops there, naming the first. Not in "initialize": MONAI FL's MonaiAlgo
# initializes the workflow once before it sets bundle_root. TrainingRun takes the same lock when the trainer
# starts, for a driver that calls train#trainer.run() itself.
_TRAIN_RUN = ["$@train#run_lock.acquire()", "$@train#trainer.run()", "$@train#run.exit_if_stopped()"]


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


def _with_uids(transforms: list[dict]) -> list[dict]:
    """`transforms` with the loader (the first) reading the DICOM UIDs (:data:`hmn.inference.DICOM_UID_COLUMNS`)
    into the image's meta."""
    first = dict(transforms[0])
    assert first["_target_"] == "hmn.transforms.LoadXrayd", first
    first["dicom_tags"] = list(DICOM_UID_COLUMNS)
    return [first, *transforms[1:]]


def _label_transform() -> dict:
    return {"_target_": "Lambda", "func": "$hmn.workflows.label_tensor"}


def _dataset(split: str, transform: str) -> dict:
    return {
        "_target_": "hmn.workflows.make_dataset",
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
            {"_target_": "Lambdad", "keys": "pred", "func": "$lambda x: x[..., : @num_classes]"},
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        ],
    }


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
    return f"{{}} if hmn.workflows.pretrained_given(@pretrained) else {dict(row.backbone_options)!r}"


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

    mode = "crop_or_pad" if training else "$'pad' if hmn.workflows.as_bool(@sliding_window) else 'crop_or_pad'"
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
            "aggregate=@sliding_window_aggregate) if hmn.workflows.as_bool(@sliding_window) else monai.inferers.SimpleInferer()")


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
    return "$1 if hmn.workflows.as_bool(@sliding_window) else @batch_size"


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
        "$hmn.runs.trained(@ckpt_dir, 'datalist', None, @use_run_record) or hmn.workflows.resolve_datalist(@dataset_dir, "
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
    # (the trainer's own state is added as "trainer" by hmn.workflows.TrainingRun when it starts: the config cannot
    # name the trainer inside its own handlers)
    save_dict = {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                 "best_model": "$hmn.workflows.BestModelRecord(@validate#best_saver, @validate#evaluator)",
                 "early_stop": "$hmn.workflows.EarlyStopRecord(@validate#early_stop)"}
    config = {
        "imports": [
            "$import os",
            "$import torch",
            "$import monai",
            "$import ignite",
            "$import hmn",
            "$import hmn.bundle",
            "$import hmn.checkpoints",
            "$import hmn.evaluation",
            "$import hmn.evaluation.external",
            "$import hmn.data",
            "$import hmn.data.cli",
            "$import hmn.handlers",
            "$import hmn.losses",
            "$import hmn.networks",
            "$import hmn.runs",
            "$import hmn.workflows",
            "$import hmn.transforms",
        ],
        "bundle_root": f"bundles/{name}",
        "ckpt_dir": "$os.path.join(@bundle_root, 'models')",
        "output_dir": "$os.path.join(@bundle_root, 'runs')",
        "dataset_dir": "$hmn.data.cli.default_demo_root()",
        "demo": {"n_images": 900, "image_size": 256, "seed": 0},
        # a resume, evaluation and inference default to the datalist the model was trained on (run record)
        "datalist": "$hmn.runs.trained(@ckpt_dir, 'datalist', None, @use_run_record) or hmn.workflows.resolve_datalist(@dataset_dir, demo=@demo if @dataset_dir == hmn.data.cli.default_demo_root() else None)",
        # evaluation, inference and a resume take the model's settings from its run record (hmn.runs)
        "use_run_record": "$hmn.workflows.as_bool(@resume)",
        # a packed bundle names its model.pt here (sha256); evaluation and inference refuse other weights
        "model_sha256": "",
        "class_names": _trained("class_names", "hmn.workflows.class_names(@datalist)"),
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
        # benchmarks/bench_data.py), the node's CPUs shared among its processes with CUDA (hmn.workflows.default_num_workers)
        "num_workers": "$hmn.workflows.default_num_workers()",
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
        "cpu_bf16": "$hmn.workflows.cpu_bf16_supported()",
        "compile": False,
        "use_pos_weight": True,
        "resume": False,
        # Ctrl-C / SIGTERM: stop at the end of the iteration with a mid-epoch checkpoint (hmn.workflows.TrainingRun);
        # checkpoint_every N > 0 also writes one every N iterations (for clusters that preempt without a signal)
        "graceful_stop": True,
        "checkpoint_every": 0,
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
        "network": "$hmn.workflows.to_device(@network_def, @device, @channels_last)",
        "loss": "$hmn.losses.MultiLabelBCELoss(pos_weight=hmn.workflows.pos_weight(@train#dataset#data, @use_pos_weight)).to(@device) if not @hierarchical else hmn.losses.HierarchicalLoss(@num_classes, hmn.losses.fine_to_coarse_indices(@class_names)[0], pos_weight=hmn.workflows.pos_weight(@train#dataset#data, @use_pos_weight)).to(@device)",
        "optimizer": {
            "_target_": "torch.optim.AdamW",
            "params": "$@network.parameters()",
            "lr": "@learning_rate",
            "weight_decay": "@weight_decay",
            "fused": "$hmn.workflows.as_bool(@fused_optimizer) or None",
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
            # each epoch's order from the seed and the epoch alone, so that a run stopped mid-epoch continues it
            "sampler": {"_target_": "hmn.workflows.ResumableSampler", "dataset": "@train#dataset", "shuffle": True,
                        "seed": "$int(@seed)"},
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@train#dataset",
                "batch_size": "@batch_size",
                "sampler": "@train#sampler",
                "shuffle": False,
                "num_workers": "@num_workers",
                # loader workers leave Ctrl-C and SIGTERM to the training process (hmn.workflows.TrainingRun)
                "worker_init_fn": "$hmn.workflows.worker_ignores_stop_signals",
                # a last batch of one item would stop BatchNorm in training mode: it waits for another epoch
                "drop_last": "$hmn.workflows.drop_last_batch(len(@train#dataset), @batch_size)",
            },
            "inferer": {"_target_": "hmn.workflows.CPUAutocastInferer", "enabled": "@cpu_bf16"},
            "postprocessing": {"_target_": "Compose", "transforms": []},
            # These two are started by train#run (hmn.workflows.TrainingRun) when the trainer starts.
            "resume": {
                "_target_": "hmn.workflows.ResumeFromLatest",
                "ckpt_dir": "@ckpt_dir",
                "enabled": "@resume",
                "load_dict": save_dict,
                "map_location": "@device",
                "saver": "@train#checkpoint",
                "history": "$os.path.join(@output_dir, 'history.csv')",
                # read before this run's start is recorded (TrainingRun restores before it writes run.json)
                "input_changes": "$hmn.runs.input_changes(@ckpt_dir, @run_settings, @use_run_record)",
            },
            # Crash-safe (hmn.checkpoints): atomic writes, the previous checkpoint kept until the next is
            # complete, and the staged best model promoted to model.pt once its epoch's checkpoint is complete.
            "checkpoint": {"_target_": "hmn.checkpoints.AtomicCheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": save_dict,
                           "save_interval": 1, "n_saved": 1, "best_model_saver": "@validate#best_saver"},
            # inline in the handler list, named here by reference: MONAI's check_properties reads every entry of
            # train#handlers as a dict (a "@..." entry there stops it with a TypeError, so the zoo's checks fail)
            "run": "@train#handlers#0",
            "epoch_loss": "@train#handlers#1",
            # one run per models folder (hmn.run_lock): taken by train#run first thing when the trainer starts
            "run_lock": {"_target_": "hmn.run_lock.RunLock", "path": "@ckpt_dir", "purpose": "training"},
            "handlers": [
                # first: its start (checks, resume, run record) precedes every other handler's, and the per-epoch
                # checkpoint it attaches then follows every other handler's (after validation has staged the best model)
                {"_target_": "hmn.workflows.TrainingRun", "ckpt_dir": "@ckpt_dir", "run_settings": "@run_settings",
                 "use_run_record": "@use_run_record", "datalist": "@datalist", "class_names": "@class_names",
                 "validation_data": "@validate#dataset#data", "run_lock": "@train#run_lock",
                 "early_stop": "@validate#early_stop", "resume": "@train#resume", "checkpoint": "@train#checkpoint",
                 "test_evaluator": "@test#evaluator", "evaluate_after_training": "@evaluate_after_training",
                 "epoch_loss": "@train#epoch_loss", "graceful_stop": "@graceful_stop", "checkpoint_every": "@checkpoint_every"},
                {"_target_": "hmn.workflows.EpochLoss"},
                # the epoch's mean training loss and learning rate as epoch metrics (console, TensorBoard, MLflow)
                {"_target_": "hmn.workflows.tracking.EpochScalars", "epoch_loss": "@train#epoch_loss"},
                # with --tracking mlflow: the run record as params, the test metrics and the run's files (after train#run)
                {"_target_": "hmn.workflows.tracking.TrackTraining", "ckpt_dir": "@ckpt_dir", "output_dir": "@output_dir",
                 "validator": "@validate#evaluator"},
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "epoch_level": False, "print_lr": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True, "interval": "@val_interval"},
                {"_target_": "hmn.data.SkippedFilesReport", "dataset": "@train#dataset"},
                # rank 0 only from here on (multi_gpu_train.json drops the last entries on other ranks)
                {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": _LOSS},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss", "output_transform": _LOSS},
                {"_target_": "hmn.workflows.RunTimeEstimate"},
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
                "amp_kwargs": "$hmn.workflows.amp_kwargs(@amp_dtype)",
                "compile": "@compile",
                "accumulation_steps": "@accumulation_steps",
            },
        },
        # after training: the best model on the test split (hmn.workflows.evaluate_after_training)
        "evaluate_after_training": True,
        # the fewest positive (and negative) patients a finding needs for intervals and the macro means
        "min_positives": "$hmn.evaluation.DEFAULT_MIN_POSITIVES",
        "test": {
            "dataset": {
                "_target_": "hmn.workflows.make_dataset",
                "data": "$hmn.data.load_datalist(@datalist, 'test')",
                "transform": "@validate#preprocessing",
                "cache": "none",
                "skip_bad_files": "@skip_bad_files",
                "bad_files": "leave_out",
                "item_shape": "$[@network_def#in_channels, @image_size, @image_size]",
            },
            "dataloader": {"_target_": "DataLoader", "dataset": "@test#dataset", "batch_size": "@batch_size",
                           "shuffle": False, "num_workers": "@num_workers",
                           "worker_init_fn": "$hmn.workflows.worker_ignores_stop_signals"},
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
                    {"_target_": "hmn.workflows.ProgressLog", "what": "evaluation of the best model on the test split",
                     "unit": _unit(name)},
                    # thresholds: the validation split's, recorded with model.pt (models/thresholds.json), read when the report is computed
                    {"_target_": "hmn.handlers.EvaluationReportHandler", "output_dir": "$os.path.join(@output_dir, 'eval')",
                     "class_names": "@class_names", "num_classes": "@num_classes",
                     "thresholds": "$lambda: hmn.evaluation.model_thresholds(@ckpt_dir)",
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
                "worker_init_fn": "$hmn.workflows.worker_ignores_stop_signals",
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
                # each finding's validation AUC as val_auc/<finding> (console, TensorBoard, MLflow; not history.csv)
                {"_target_": "hmn.workflows.tracking.PerFindingAUC", "metric": "@validate#key_metric#val_auc",
                 "class_names": "@class_names"},
                # with each new best model, the validation split's operating thresholds (models/thresholds.json)
                {"_target_": "hmn.handlers.ValidationThresholds", "ckpt_dir": "@ckpt_dir", "class_names": "@class_names"},
                # rank 0 only from here on
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
                "@validate#best_saver",
                {"_target_": "hmn.workflows.MetricHistory", "filename": "$os.path.join(@output_dir, 'history.csv')",
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
        "initialize": ["$hmn.bundle.install_error_summary()", "$hmn.bundle.check_overrides()",
                       "$monai.utils.set_determinism(seed=@seed)"],
        "run": _TRAIN_RUN,
        "training": _TRAIN_RUN,
        # a run driven from Python (monai.bundle.run, create_workflow) leaves the models folder free for the next
        "finalize": ["$@train#run_lock.release()"],
    }
    return _volume_train_config(config) if is_volume_bundle(name) else config


def _unit(name: str) -> str:
    """What a bundle's evaluators count in their progress lines (hmn.workflows.ProgressLog)."""
    return "volumes" if is_volume_bundle(name) else "images"


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
            # progress with counts and the time left, in the log
            {"_target_": "hmn.workflows.ProgressLog", "what": "$'evaluation of the ' + @eval_split + ' split'", "unit": _unit(name)},
            {
                "_target_": "hmn.handlers.EvaluationReportHandler",
                "output_dir": "@eval_dir",
                "class_names": "@class_names",
                # "validation": models/thresholds.json read when the report is computed (under MONAI FL the evaluator
                # is built before training records it); any other value is checked now
                "thresholds": "$(lambda: hmn.evaluation.model_thresholds(@ckpt_dir)) if @thresholds == 'validation' "
                              "else hmn.evaluation.model_thresholds(@ckpt_dir, @thresholds)",
                "fixed_threshold": "@fixed_threshold",
                "n_bootstrap": "@n_bootstrap",
                "min_positives": "@min_positives",
                "num_classes": "@num_classes",
                "metadata": "$hmn.data.datalist_metadata(@datalist, @eval_split)",
                "temperature": "@temperature",
                "finding_match": "@finding_match",
            },
            # after the report, so that the log line shows this evaluation's metrics (micro AUC, ...)
            {"_target_": "StatsHandler", "iteration_log": False},
            # with --tracking mlflow: the report's metrics and files, and the MLflow run closed
            {"_target_": "hmn.workflows.tracking.TrackEvaluation", "report_dir": "@eval_dir"},
        ],
        # the properties MONAI's "eval" workflow type names (create_workflow(workflow_type="eval").check_properties())
        "dataset": "@validate#dataset",
        "evaluator": "@validate#evaluator",
        "inferer": "@validate#inferer",
        # where MONAI's --tracking appends its "evaluator" handler (it needs a list when "evaluator" exists); the
        # evaluation runs validate#handlers, which get MONAI's "validator" handler
        "handlers": [],
        "initialize": ["$hmn.bundle.install_error_summary()", "$hmn.bundle.check_overrides()",
                       "$monai.utils.set_determinism(seed=@seed)"],
        "run": _EVAL_RUN,
        "evaluating": _EVAL_RUN,
    }


def inference_config(name: str) -> dict:
    """``configs/inference.json``: a folder or datalist of unlabelled images to a predictions CSV (standalone)."""
    train = train_config(name)
    config = {
        "imports": ["$import os", "$import torch", "$import monai", "$import hmn", "$import hmn.bundle", "$import hmn.data.cli", "$import hmn.inference", "$import hmn.networks", "$import hmn.handlers", "$import hmn.losses", "$import hmn.runs", "$import hmn.workflows", "$import hmn.transforms"],
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
        # "input": maps and overlays at the network's input size; "source": at each file's own rows x columns
        "heatmap_geometry": "input",
        # a folder: one DICOM Structured Report per study of the DICOM inputs (needs highdicom, the [deploy] extra)
        "dicom_sr": "",
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
        "num_workers": "$hmn.workflows.default_num_workers()",
        "pretrained": False,
        "backbone_options": train["backbone_options"],
        "hierarchical": train["hierarchical"],
        # the hierarchical head's coarse groups are those of the run's classes (4 for ChestX-ray14's 14)
        "num_coarse_classes": "$len(hmn.losses.fine_to_coarse_indices(@class_names)[1]) if @hierarchical else 0",
        "network_def": train["network_def"],
        "model_settings": dict(_MODEL_SETTINGS),
        "network": "$@network_def.to(@device)",
        # the DICOM UIDs go into the image's meta, and from there into predictions.csv, heatmaps.csv and the SRs
        "preprocessing": {"_target_": "Compose", "transforms": _with_uids(_load_transforms())},
        "dataset": {
            "_target_": "hmn.inference.InferenceDataset",
            "data": "$hmn.inference.inference_items(@input, skip_done=@output_file if hmn.workflows.as_bool(@resume) else None)",
            "transform": "@preprocessing",
            "placeholder_shape": [1, "@image_size", "@image_size"],
            "keep_meta": ["filename_or_obj", *DICOM_UID_COLUMNS],
        },
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": "@batch_size", "shuffle": False, "num_workers": "@num_workers"},
        "inferer": {"_target_": "SimpleInferer"},
        # "pred" leaves as probabilities, one per class (a hierarchical head's coarse logits dropped), for every
        # consumer: the writers below and any other driver of this config (MONAI Deploy's bundle operator)
        "postprocessing": _val_postprocessing(),
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
                "resume": "$hmn.workflows.as_bool(@resume)",
                "apply_sigmoid": False,
                "geometry": "@heatmap_geometry",
                "loader": "@preprocessing",
            },
            {
                "_target_": "hmn.handlers.PredictionCSVWriter",
                "output_file": "@output_file",
                "class_names": "@class_names",
                "num_classes": "@num_classes",
                "resume": "$hmn.workflows.as_bool(@resume)",
                "apply_sigmoid": False,
            },
            # --dicom_sr DIR: one DICOM Structured Report (TID 1500) per study of the DICOM inputs, from the rows of
            # output_file (those of an earlier run kept by --resume included) when the run completes
            {
                "_target_": "hmn.handlers.StructuredReportWriter",
                "output_dir": "@dicom_sr",
                "predictions_file": "@output_file",
                "class_names": "@class_names",
                "algorithm_name": "$hmn.bundle.bundle_name(@bundle_root)",
                "algorithm_version": "$hmn.bundle.bundle_version(@bundle_root)",
            },
            # progress with counts and the time left, in the log
            {"_target_": "hmn.workflows.ProgressLog", "what": "$'inference' + (' with heatmaps' if hmn.workflows.as_bool(@heatmaps) else '')",
             "unit": _unit(name)},
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
        "initialize": ["$hmn.bundle.install_error_summary()", "$hmn.bundle.check_overrides()"],
        "run": _INFER_RUN,
        "inference": _INFER_RUN,
    }
    return _volume_inference_config(config) if is_volume_bundle(name) else config


def _volume_inference_config(config: dict) -> dict:
    from hmn.data.demo3d import DEMO3D_CLASSES

    config = _volume_common(config)
    config["class_names"] = _trained("class_names", repr(list(DEMO3D_CLASSES)))
    config["preprocessing"]["transforms"] = _with_uids(_volume_load_transforms())
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
    "$hmn.bundle.install_error_summary()",
    "$dist.is_initialized() or dist.init_process_group(backend=@backend)",
    "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
    "$hmn.bundle.check_overrides() if dist.get_rank() == 0 else None",
]


def multi_gpu_config(name: str) -> dict:
    """``configs/multi_gpu_train.json``: overrides ``train.json`` for ``torchrun`` (DDP, DistributedSampler)."""
    return {
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() else torch.device('cpu')",
        "backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "network": {
            "_target_": "torch.nn.parallel.DistributedDataParallel",
            "module": "$hmn.workflows.to_device(@network_def, @device, @channels_last)",
            "device_ids": "$[@device] if torch.cuda.is_available() else None",
        },
        # train#sampler (hmn.workflows.ResumableSampler) gives each rank its share under torchrun by itself
        "train#trainer#train_handlers": f"$@train#handlers[: -{_RANK0_TRAIN_HANDLERS} if dist.get_rank() > 0 else None]",
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False, "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#val_handlers": f"$@validate#handlers[: -{_RANK0_VAL_HANDLERS} if dist.get_rank() > 0 else None]",
        "initialize": [*_DIST_INIT, "$monai.utils.set_determinism(seed=@seed)"],
        # under torchrun the test split is evaluated by evaluate.json afterwards, not by the trainer
        "train#handlers#0#evaluate_after_training": False,
        "run": _TRAIN_RUN,
        "training": _TRAIN_RUN,
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
                        + "skip_done=hmn.inference.run_outputs(@output_file) if hmn.workflows.as_bool(@resume) else None))",
        "initialize": _DIST_INIT,
        "run": run,
        "inference": run,
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }


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
