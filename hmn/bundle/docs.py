"""Text of the generated bundle files that are not configuration: ``docs/README.md`` and ``LICENSE``."""

from __future__ import annotations

import json

from typing import Any

from hmn.bundle.table import EXPORT_ARGS, ONNX_ATOL, ONNX_OPSET, VOLUME_DEFAULTS
from hmn.bundle.torchscript import TORCHSCRIPT_ATOL, TORCHSCRIPT_RTOL
from hmn.networks.backbones import get_backbone_spec

__all__ = ["bundle_readme", "export_section", "history_columns", "license_text", "volume_bundle_readme"]


def license_text() -> str:
    """The Apache-2.0 notice the bundles are distributed under."""
    return (
        "Copyright (c) HybridMedNet developers\n\n"
        'Licensed under the Apache License, Version 2.0 (the "License");\n'
        "you may not use the files of this bundle except in compliance with the License.\n"
        "You may obtain a copy of the License at\n\n"
        "    http://www.apache.org/licenses/LICENSE-2.0\n\n"
        "Unless required by applicable law or agreed to in writing, software\n"
        'distributed under the License is distributed on an "AS IS" BASIS,\n'
        "WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.\n"
        "See the License for the specific language governing permissions and\n"
        "limitations under the License.\n"
    )


def _sci(x: float) -> str:
    """A tolerance as the docs write it: ``1e-5``, not Python's ``1e-05``."""
    return f"{x:.0e}".replace("e-0", "e-")


def export_section(name: str) -> str:
    """The bundle docs' section on TorchScript and ONNX export, from the backbone table's row for ``name``
    (``torchscript``, ``fixed_size``, ``family``) and the argument files of :func:`hmn.bundle.export_args`."""
    import textwrap

    spec = get_backbone_spec(name)
    family = {"swin": "Swin", "swin3d": "the 3D Swin", "vim": "Vision Mamba"}.get(spec.family, spec.family)
    if spec.torchscript == "script":
        how = ("The TorchScript module is scripted (`torch.jit.script`, as the MONAI model zoo's CI exports): it keeps "
               "the network's control flow and takes any batch size" + (
                   f" (and the image size it was built for: {family} is built for one)" if spec.fixed_size
                   else " and image size"))
    else:
        how = ("The TorchScript module is traced (`torch.jit.trace`; TorchScript cannot compile this backbone's "
               "code) at the metadata's input shape, whose image size it keeps. Add `--use_trace True` to the "
               "`ckpt_export` command: MONAI 1.6 takes the trace's example input from the metadata only when "
               "`use_trace` is given on the command line, and with the argument file alone stops with \"Missing "
               "input data for tracing convert\" (`pack-bundle` passes it)")
    sides = "the three spatial axes" if spec.spatial_dims == 3 else "height and width"
    if spec.fixed_size:
        axes = (f"a dynamic batch axis; {sides} stay those it was exported at, since {family} is built "
                "for one input size")
    elif spec.torchscript == "trace":
        axes = (f"a dynamic batch axis; {sides} stay those it was exported at, since the trace fixes the "
                "backbone's window arithmetic to that size")
    else:
        axes = f"dynamic batch axis and {sides}" if spec.spatial_dims == 3 else "dynamic batch, height and width axes"
    shape = "`[1, 1, 64, 64, 32]`" if spec.spatial_dims == 3 else "`[1, 1, 224, 224]`"
    other = "`--input_shape \"[1, 1, X, Y, Z]\"`" if spec.spatial_dims == 3 else "`--input_shape \"[1, 1, SIZE, SIZE]\"`"
    paragraphs = [
        "Both commands build the network from the run record (`models/run.json`) through `configs/inference.json`, "
        "load `models/model.pt` and write `models/model.ts` or `models/model.onnx`; for a model kept elsewhere add "
        "`--bundle_root DIR --ckpt_file DIR/models/model.pt --filepath OUT`. The network's output is one logit per "
        f"class (`N, classes`; sigmoid for probabilities). {how}. It embeds `configs/metadata.json` and the config "
        "(this template's metadata describes the demo model, a packed bundle's the trained one). A packed bundle "
        "already holds `models/model.ts`: `pack-bundle` runs this TorchScript export from the packed configs and "
        "checks it (see \"Sharing and the MONAI model zoo\").",
        "ONNX (needs `pip install onnx onnxruntime`, or the project's `export` extra): traced by PyTorch's "
        f"TorchScript-based exporter, opset {ONNX_OPSET}, input `image`, output `pred`, with {axes}. It is traced at "
        f"the metadata's input shape, {shape} in this template (a packed bundle's metadata has the "
        f"trained size); for a model trained at another size add {other}. The "
        "command then runs the file in onnxruntime at batch 1 and stops with an error if any logit differs from "
        f"the PyTorch network's by more than {ONNX_ATOL:g} (absolute); the repository's tests "
        "(`tests/test_export.py`) check batch 1 and 4 for every backbone.",
    ]
    if spec.family == "vim":
        paragraphs.append(
            "Both exports run the selective scan as plain tensor operations "
            "(`hmn.networks.selective_scan.selective_scan_export`: the chunked scan's blocked recurrence without "
            "its autograd function and reused buffers, which the tracer and the exporter cannot follow), whatever "
            "`scan_impl` the model was trained with; the outputs match the PyTorch network's to about 1e-6."
        )
    body = "\n\n".join(textwrap.fill(p, 110, break_on_hyphens=False, break_long_words=False) for p in paragraphs)
    return f"""## Export

TorchScript and ONNX, one command each, from the bundle's folder (the same commands for every bundle, and in
a packed bundle). MONAI reads the arguments from `{EXPORT_ARGS['torchscript']}` and `{EXPORT_ARGS['onnx']}`
(`--args_file`; an argument given on the command line wins):

    cd bundles/{name}
    python -m monai.bundle ckpt_export --args_file {EXPORT_ARGS['torchscript']}
    python -m monai.bundle onnx_export --args_file {EXPORT_ARGS['onnx']}

{body}
"""


_HISTORY_COLUMN_NOTES = {
    "epoch": "the epoch validated",
    "elapsed_s": "training time in seconds, summed over resumes",
    "train_loss": "the epoch's mean training loss",
}


def drivers_section(name: str) -> str:
    """The bundle docs' section on running the bundle from other tools (Python, MONAI FL, MLflow)."""
    return f"""## From Python, federated learning and tracking

A training run's behaviour (the lock on its models folder, the run-record and validation checks, resuming,
`run.json`, checkpoints, best-model promotion, early stopping, `model_final.pt` and the test report) is
attached to the trainer (`hmn.workflows.TrainingRun`, the first of `train#handlers`): whatever calls
`train#trainer.run()` gets all of it.

- Python: `hmn.api.train("bundles/{name}", datalist=..., bundle_root=...)`, `hmn.api.evaluate(...)` (returns
  the dict `metrics.json` holds) and `hmn.api.predict(..., input=...)` (returns the CSV's rows); or MONAI's
  `create_workflow(config_file=..., workflow_type="train" | "eval" | "infer")`.
- Federated learning: `monai.fl.client.MonaiAlgo(bundle_root=<a copy of this folder>, ...)` trains, returns
  weights or weight differences, and serves `ModelType.BEST_MODEL` (`models/model.pt`) and
  `ModelType.FINAL_MODEL` (`models/model_final.pt`); the repository's `examples/nvflare/` runs it in NVFlare.
- Tracking: `--tracking mlflow` (the `tracking` extra) records the run's settings, the epoch's loss and
  learning rate, `val_auc` and `val_auc/<finding>`, the test metrics and the model and report files; the
  same scalars go to TensorBoard in `runs/`.

"""


def history_columns(train: dict) -> list[str]:
    """The columns of the bundle's ``runs/history.csv``, in the file's order: the leading columns
    :class:`hmn.workflows.MetricHistory` writes (:data:`hmn.workflows.history.HISTORY_COLUMNS`), then the
    validator's metrics as the train config `train` names them (``validate#evaluator``'s ``key_val_metric``, then
    its ``additional_metrics``). Raises ValueError when a metric entry is neither a mapping nor a
    ``@validate#...`` reference to one (the columns could not be known)."""
    from hmn.workflows.history import HISTORY_COLUMNS

    validate = train["validate"]
    metrics: list[str] = []
    for key in ("key_val_metric", "additional_metrics"):
        value = validate["evaluator"].get(key)
        if isinstance(value, str) and value.startswith("@validate#"):
            value = validate.get(value[len("@validate#"):])
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"validate#evaluator#{key} is {value!r}: expected a mapping of metric names")
        metrics += [str(m) for m in value]
    return [*HISTORY_COLUMNS, *metrics]


def _history_text(train: dict) -> str:
    columns = history_columns(train)
    described = ", ".join(f"`{c}`" + (f" ({_HISTORY_COLUMN_NOTES[c]})" if c in _HISTORY_COLUMN_NOTES else "")
                          for c in columns)
    return f"`runs/history.csv` (one row per validation, header `{','.join(columns)}`: {described})"


def bundle_readme(name: str, row: Any, train: dict) -> str:
    """``docs/README.md`` of bundle ``name``."""
    spec = get_backbone_spec(name)
    history = _history_text(train)
    root = f"bundles/{name}"
    cfg = f"{root}/configs"
    attention = " + ".join(row.attention)
    options = dict(getattr(row, "backbone_options", ()) or ())
    scratch = ""
    if options:
        scratch = (
            "\n\nTrained from scratch by default, the backbone is built with `backbone_options` "
            f"`{json.dumps(options)}`: BatchNorm in place of ConvNeXt's LayerNorms, layer scale starting at 1 and "
            "a stem of two overlapping 3x3 stride-2 convolutions in place of the 4x4 patchify. "
            "With the published LayerNorms and layer scale 1e-6, a ConvNeXt trained from scratch did not learn "
            "the demo data at all (the repository's BENCHMARKS.md). With pretrained weights "
            "(`--pretrained True` or `--pretrained PATH`) the published ConvNeXt they fit is built instead "
            "(`backbone_options` `{}`), and the run record carries that to evaluation and inference."
        )
    source = f"timm `{spec.timm_name}`" if spec.timm_name else "the project's own implementation, `hmn.networks.vim`"
    if spec.family == "vim":
        scratch += (
            "\n\nThe selective scan runs through `mamba_ssm`'s kernel on a GPU where it is installed, otherwise "
            "through the project's chunked PyTorch scan. On a CPU with a C++ compiler, "
            "`--backbone_options '{\"scan_impl\": \"cpu_kernel\"}'` uses the project's fused C++ scan instead "
            "(compiled on first use, about half a minute; a Vim-tiny training step about 2x faster in the "
            "repository's BENCHMARKS.md); where it cannot be built, the run stops and says why."
        )
    return f"""# HybridMedNet bundle: `{name}`

Multi-label classification of chest radiographs with HybridMedNet over a {spec.description or name}
backbone ({source}, {spec.params_m}M parameters as an ImageNet classifier), a feature
pyramid at strides 8, 16 and 32 (256 channels), `{attention}` attention,
adaptive multi-scale fusion and a multi-label head (one logit per class). Research use only: this is
not a medical device.{scratch}

This bundle was generated by `python -m hmn bundles` from the template in `hmn/bundle/template.py`; edit the
template, not these files. It needs the `hybridmednet` package installed (`pip install -e .` in the
repository; it is on no package index, see "Sharing and the MONAI model zoo"); its configs name `hmn.*`
targets, so no `scripts/` folder or `PYTHONPATH` is involved.

## Data

By default the bundle trains on the project's **synthetic** demo dataset (phantom radiographs with
rendered Cardiomegaly, Effusion, Mass, Nodule and Pneumothorax; no real patient), which it writes on
first use into `~/.cache/hmn/demo` (or `$HMN_CACHE/demo`). For real data, make a datalist with
`python -m hmn datalist nih|chexpert|folder|json ...` and pass `--datalist path/to/datalist.json`
(its `class_names` set the number of outputs). Images are DICOM (MONOCHROME1 inverted, rescale and
VOI window applied) or 8/16-bit PNG/JPEG, read by `hmn.transforms.LoadXrayd` and resized to
`image_size` (224 by default) as they are read (area averaging), then rescaled to [0, 1] between
the 0.5 and 99.5 percentiles.

## Commands (from the repository root)

Train (checkpoints in `{root}/models`, TensorBoard logs and `history.csv` in `{root}/runs`):

    python -m monai.bundle run training --config_file {cfg}/train.json

Common overrides: `--max_epochs 10`, `--image_size 256`, `--aspect pad` (keep the radiograph's proportions,
padding to a square; `crop` keeps the centre; default `stretch`), `--batch_size 8`, `--learning_rate 1e-4`,
`--datalist DATALIST.json`, `--cache none|memory|persistent`, `--amp True`, `--compile True`,
`--accumulation_steps 4`, `--pretrained /path/to/timm_checkpoint.pth`, `--hierarchical True`
(ChestX-ray14 class names only), `--bundle_root DIR` when running from another folder. Network settings
are under `network_def` (`--network_def#backbone swin_tiny`); an override that names no setting of the
bundle (`--backbone ...`, `--imagesize ...`) changes nothing, so the run logs a warning naming it and the
closest setting (`hmn.bundle.check_overrides`). When a run stops on an error of the project's own (a
misspelt backbone, a missing datalist, an unreadable file), the last line of the output says what is
wrong, after MONAI's traceback (`hmn.bundle.install_error_summary`).

Mixed precision: `amp` (default: on when CUDA is available) autocasts the training and validation
forward passes on a GPU. On a CPU, `cpu_bf16` (default: on when the CPU computes bfloat16 natively,
`avx512_bf16`/`amx_bf16`/Arm `bf16` in `/proc/cpuinfo`) runs the training forward pass under bfloat16
autocast through `hmn.workflows.CPUAutocastInferer`; the loss, optimizer, validation, evaluation and
inference stay float32. `--cpu_bf16 False` turns it off.

The GPU fast path, on by default when CUDA is available, each switch off with `False`: `amp_dtype`
(`bfloat16` where the GPU computes it, Ampere and later, else `float16`: the training autocast's type),
`channels_last` (the network's weights in NHWC, the layout of the tensor-core convolution kernels; a saved
`model.pt` loads into a contiguous network as before) and `fused_optimizer` (AdamW's fused kernel).
`--compile True` adds `torch.compile` (its compile time falls in the first iterations). `num_workers`
(DataLoader worker processes) is 0 on the CPU, where the model and not loading limits training, and with
CUDA the node's CPUs shared among its torchrun processes, one left to each main process, at most 8
(`hmn.workflows.default_num_workers`).

What a run records: `models/run.json` (`hmn.runs`) holds the settings that define the trained network
and its preprocessing (class names, channels, image size, VOI, aspect, backbone and options, attention,
pyramid, head), the datalist and the schedule. Evaluation, inference and a resume take them from it (a
resume and evaluation default to the recorded datalist); an override that contradicts it is honoured with
a warning for the image size, VOI and (on a resume) the schedule, and refused for the classes and the
architecture; a resume or evaluation on a datalist whose classes differ from the model's is refused. `python -m hmn pack-bundle` packs it with `model.pt` and bakes it into the
packed `inference.json` and `metadata.json`.

Resume a run that was stopped (it continues from its newest complete checkpoint: `models/checkpoint_epoch=N.pt`
after the last finished epoch, or `models/checkpoint_iteration=I.pt` in the middle of an epoch; each holds the
network, optimizer, scheduler and trainer state, the best validation score so far, so that `model.pt` is only
replaced by a better model, and the early-stopping count; the resumed run's first checkpoint replaces the one it
started from):

    python -m monai.bundle run training --config_file {cfg}/train.json --resume True

Stopping on purpose: Ctrl-C (SIGINT) or SIGTERM (a cluster preempting the job) during training is acknowledged
at once in the log; the run finishes the current iteration (with `accumulation_steps` > 1, the optimizer step),
writes `models/checkpoint_iteration=I.pt`, prints one line saying where it stopped, what is saved and the exact
command that continues it, and exits with status 130 (SIGINT) or 143 (SIGTERM). A signal during an epoch's
validation stops after that epoch's own checkpoint. The continued run trains the rest of that epoch (each
epoch's order of images is drawn from `seed` and the epoch, `hmn.workflows.ResumableSampler`), so it ends with
the optimizer steps of an uninterrupted run; the random augmentations of those batches are drawn anew. A second
Ctrl-C exits at once, keeping the checkpoints already complete. `--checkpoint_every N` also writes the mid-epoch
checkpoint every N iterations (for clusters that kill without a signal); `--graceful_stop False` leaves the
signals to Python (a KeyboardInterrupt).

What a stop cannot break (`hmn.checkpoints`): a run stopped at any moment (`kill -9`, an out-of-memory kill,
a power cut, a second Ctrl-C) resumes from its last complete checkpoint, with nothing of the finished epochs
lost. Every file of the run (`checkpoint_epoch=N.pt`,
`model.pt`, `history.csv`, the evaluation report) is written to a temporary `.NAME.partial` beside it,
synced to disk and renamed into place, so it is complete or absent, never cut off. The previous
checkpoint is removed only once the next one is complete. A new best model is staged as
`.model.pt.epoch=N.staged` and becomes `model.pt` only once epoch N's checkpoint is complete; the resume
discards staged models and `history.csv` rows of the epochs it trains again, so from then on `model.pt`,
the best score in the checkpoint and `history.csv` describe the same epochs. A new run without
`--resume` refuses a models folder that already holds a run. A checkpoint that cannot be read (damaged on disk,
or cut off by an older version of the project) is renamed to `NAME.unreadable` with a warning and the
next older one is used; with none readable the run starts from scratch and says why. A full disk stops
the run with an error naming the folder, the space needed and the space free, before the checkpoint is
written, leaving the last complete one as it was.

Several GPUs (or, for testing, several CPU processes on the gloo backend):

    torchrun --nproc_per_node=2 -m monai.bundle run training \\
        --config_file "['{cfg}/train.json','{cfg}/multi_gpu_train.json']"

Evaluate `models/model.pt` (the best validation checkpoint) on the test split:

    python -m monai.bundle run evaluating \\
        --config_file "['{cfg}/train.json','{cfg}/evaluate.json']"

Nothing in the report is tuned on the data it reports. Operating thresholds come from the validation split:
with each new best model, training fits Youden's J threshold and the thresholds of the operating points
(sensitivity at 90% and 95% specificity and the reverse) on the validation split and keeps them beside
`model.pt` as `models/thresholds.json`; the test report after training and `evaluating` use them
(`--thresholds validation`, the default). A model without that file (trained before it was recorded) is
reported at a fixed 0.5, and the files say so; `--thresholds FILE` takes a `metrics.json` or
`thresholds.json` fitted elsewhere, and `--thresholds youden` fits them on the evaluated split itself, which
is optimistic and marked so in every file (`threshold_source`). For a model without `thresholds.json`:

    python -m monai.bundle run evaluating --config_file "['{cfg}/train.json','{cfg}/evaluate.json']" \\
        --eval_split validation --thresholds youden --eval_dir {root}/runs/eval_validation
    python -m monai.bundle run evaluating --config_file "['{cfg}/train.json','{cfg}/evaluate.json']" \\
        --thresholds {root}/runs/eval_validation/metrics.json

Intervals resample patients (the datalist's `patient_id`; every image of a drawn patient is taken), so
several images of one patient count as one observation; without patient ids they resample images and the
report says so (`ci_unit`). A finding with fewer than 20 positive (or negative) patients gets its AUC but no
interval and is left out of the macro mean, named (`--min_positives N`). An unreadable test image is left
out and listed under `skipped_images`, never replaced by another.

The validation report also holds per-finding temperatures fitted to its probabilities (temperature scaling,
Guo et al. 2017); `--temperature {root}/runs/eval_validation/metrics.json` applies them to the test split
before everything else (ROC AUC unchanged; calibration, thresholds' operating points and the
probabilities in `predictions.csv` change). Both options can be given together.

External validation: a model evaluated on another source's datalist (e.g. trained on ChestX-ray14, tested on
CheXpert) is refused while the class names differ; `--findings shared` pairs the model's outputs with the
datalist's label columns through the finding vocabulary (`hmn.data.vocabulary`: NIH `Effusion` is CheXpert's
`Pleural Effusion`; CheXpert's `Pleural Other` is not `Pleural Thickening`), evaluates those findings and
names the classes of either side left out in `metrics.json` (`findings`):

    python -m hmn datalist chexpert --train-csv CheXpert-v1.0-small/train.csv \
        --valid-csv CheXpert-v1.0-small/valid.csv --vocabulary --out chexpert.json
    python -m monai.bundle run evaluating --config_file "['{cfg}/train.json','{cfg}/evaluate.json']" \
        --datalist chexpert.json --eval_split validation --findings shared --eval_dir {root}/runs/eval_chexpert

Compare two models' predictions on the same images (per-finding ROC AUC difference, DeLong's test and a
paired bootstrap, both over patients when the files have a `patient_id` column; DeLong's variance then
clustered as in Obuchowski 1997): `python -m hmn compare A/predictions.csv B/predictions.csv --out comparison/`.
Any model's predictions in that CSV format get the same report: `python -m hmn report predictions.csv --out report/`.

Predict over a folder (searched recursively; DICOM, PNG, JPEG) or a datalist JSON:

    python -m monai.bundle run inference --config_file {cfg}/inference.json \\
        --input /path/to/folder --output_file predictions.csv

The class names, image size and network come from the model's run record (`models/run.json`); a model
without one (trained before run records) gets the demo's classes unless `--class_names` is given.

Rows are appended and synced as the run goes. After a stop, `--resume True` keeps the CSV's complete
error-free rows and predicts only the other images (failed ones are tried again); the heatmap index keeps one
row per image and finding. On several GPUs (or CPU processes on gloo), each process predicts every
world-size-th image into `<stem>.rank<r>.csv`, and when all are done rank 0 merges them into the one
`--output_file`, sorted by path (and the heatmap indexes into `heatmaps.csv`), and removes the shares;
`--resume True` works the same way under torchrun:

    torchrun --nproc_per_node=2 -m monai.bundle run inference \\
        --config_file "['{cfg}/inference.json','{cfg}/multi_gpu_inference.json']" --input /path/to/folder

Heatmaps (Grad-CAM, `hmn.explain`): `--heatmaps True` also writes, per image, one overlay PNG (the map over
the grey network input, the finding and its probability in the title) and the raw map (`.npy`) for each
finding at or above its threshold. `--heatmap_findings` is `all` or a list (`"['Mass','Nodule']"`);
`--heatmap_thresholds` a probability for every finding (default 0.5) or an evaluation `metrics.json`, whose
per-finding thresholds are then used; `--heatmap_levels` `finest` (the stride-8 pyramid level after
attention, the default) or `all` (every level, about three times the cost); `--heatmap_dir` the folder
(default `runs/heatmaps`); `--heatmap_geometry` `input` (the default: maps and overlays at the network input's
size, as the network saw the image after the loader's resize, pad or crop) or `source` (each map taken back to
the file's own rows x columns, the resize and the `aspect` pad or crop undone, so that `map[r, c]` is about pixel
`(r, c)` of the DICOM or PNG, and the overlay drawn on the file's image at its own size; with `--aspect crop` the
margins the network never saw are NaN, not 0, and left uncoloured inside a dashed frame; each explained file is
read a second time, and a map is float32 at the file's size, about 36 MB for 3000 x 3000). Grad-CAM needs a
backward pass per image and finding. One image from the command line: `python -m hmn explain IMAGE --bundle-root
{root} [--findings Mass Nodule] [--out DIR] [--thresholds metrics.json] [--geometry source] [--rollout]`
(`--rollout`: the attention rollout, for models with `self` or `cross_scale` attention; CBAM moves nothing between
positions and has none).

{export_section(name)}
{drivers_section(name)}## Sharing and the MONAI model zoo

Share a trained bundle: `python -m hmn pack-bundle {name} {name}.zip` zips the configs, docs, `LICENSE`,
`models/model.pt`, `models/model.ts` and `models/run.json` under one folder `{name}/` (the layout of the MONAI
model zoo's `models/{name}/`), with the recorded settings written into the packed configs and `metadata.json`,
and prints the MD5; `hmn.bundle.download_bundle(url, bundle_dir, "{name}", hash_val=MD5)` fetches and checks
it, and `monai.bundle.load("{name}", bundle_dir=bundle_dir, workflow_type="inference")` returns the trained
network (the inference config needs no datalist). A packed bundle's `bundle_root` is `.`: run its workflows
from its folder or pass `--bundle_root`; its evaluation and inference refuse any `model.pt` but the one
packed (its SHA-256 is in the packed configs' `model_sha256`).

`models/model.ts` is the trained network in TorchScript, for runtimes that load a bundle without building
its network: MONAI Deploy's `MonaiBundleInferenceOperator` loads it first (`torch.jit.load`), and falls back to
`model.pt` and `network_def` only without it. `pack-bundle` writes it with MONAI's `ckpt_export` and
`{EXPORT_ARGS['torchscript']}` (see "Export"), on the CPU, from exactly the packed `inference.json` and
`metadata.json`, which it embeds (`torch.jit.load(path, _extra_files={{"metadata.json": "", "inference.json":
""}})` gives them back). Before anything is written, the file is loaded back and its logits on a fixed input
(batch 2 at the metadata's input shape) are compared with those of the PyTorch network built from the packed
configs and `model.pt`: a logit differing by more than {_sci(TORCHSCRIPT_ATOL)} + {_sci(TORCHSCRIPT_RTOL)} x |logit|, or configs that do not come
back unchanged, stop the packing with an error naming the bundle. Like `network_def`, it gives logits; the
configs' `postprocessing` turns them into probabilities.

A bundle's configs are code: MONAI evaluates their `$` expressions when it parses them, so load bundles only
from people you trust, and take the zip's digest from its author by another channel: the hash is the trust
anchor (a download without one warns). `download_bundle` extracts only entries under `{name}/` and refuses
links, devices, `..` and absolute paths before writing anything (see the repository's README).

Linked weights: the model zoo keeps files over 25 MB out of its repository (every bundle's `model.pt` and
`model.ts` are larger) and links them from `large_files.yml` at the bundle's root, as its own bundles link
both. `--link-weights` leaves `model.pt` and `model.ts` out of the zip and writes that file: one entry per
file with `path` (`models/model.pt`, `models/model.ts`), `url`, `hash_val` and `hash_type` (`sha256` by
default, `--hash-type md5` as the zoo's own bundles use), the digest computed from the file. `model.ts` is
exported and checked as above and written beside `model.pt` in the models folder (replacing any earlier
`model.ts` there): upload both files and give their addresses as `--weights-url URL` and `--ts-url URL`
(either implies `--link-weights`). Without `--ts-url`, `model.ts` is taken to lie beside `model.pt`: a
`--weights-url` ending in `/model.pt` with `model.ts` in its place. A `url` not given is a placeholder,
`<upload models/model.pt and put its download URL here>` or `<upload models/model.ts and put its download
URL here>`, to be replaced before sharing:

    python -m hmn pack-bundle {name} {name}.zip --models-dir {root}/models \\
        --weights-url https://example.org/{name}/model.pt --hash-type md5

`download_bundle` then downloads `model.pt` and `model.ts` from their `url` after the zip and checks their
digests, and
`python -m hmn fetch-large-files BUNDLE_FOLDER` does the same for a bundle unpacked otherwise (e.g. by
`monai.bundle.download`, which fetches no large files). Both refuse a placeholder, naming the file and
what to fill in, and refuse a file whose digest differs; a file copied in by hand is checked against the
listed digest, and a missing `model.pt` makes evaluation and inference say to fetch it.

Requirements: `metadata.json` names exact versions (`monai_version`, `pytorch_version`, `numpy_version` and
`required_packages_version`: `pydicom`, `timm`, `pytorch-ignite`), because the zoo's CI writes each entry as
the pip line `name==value`. The generated bundle names the versions it was tested with; a packed bundle
names those installed where it was packed. The `hybridmednet` package that the configs' `hmn.*` targets
need is not listed there: no package index has it, and a line pip cannot satisfy would stop the whole
install. Install it from the project's source first (`pip install PATH_OR_GIT_URL_OF_HYBRIDMEDNET`, or
`pip install -e .` in a clone; for the zoo's CI, an install script as its `ci/install_scripts/` hold for
such packages), then the bundle's pinned packages if you want the exact tested set. (`model.ts` alone runs
the network without `hmn`; the configs' preprocessing and postprocessing still name `hmn.*` transforms.)

The repository's tests (`tests/bundles/test_zoo.py`) run the zoo's checks on every bundle, packed: the
linked weights fetched and hash-checked, the required files (`configs/metadata.json`, `LICENSE`,
`models/model.pt`, `configs/inference.json`), `version` in `changelog`, the metadata against MONAI's schema,
valid pip lines, `verify_net_in_out`, the train+evaluate and inference workflows' properties, and the zoo's
own TorchScript export beside the packed `model.ts`.

## Output files

Training: `models/run.json` (the run record: `format`, `hmn_version`, `created`, `settings` with the model's
and the schedule's settings, `starts` with one entry per start or resume: `time`, `resume`, `changed` as
`{{setting: [recorded, used]}}`), `models/model.pt` (state dict of the best validation macro ROC AUC),
`models/thresholds.json` (the validation split's operating thresholds for that model: Youden's J and the
operating points, with the epoch they belong to), `models/checkpoint_epoch=N.pt`
(full state of the last finished epoch), `models/model_final.pt` (state dict of the network when training
ended),
{history},
TensorBoard event files in `runs/`.
`val_auc`, which picks `model.pt` and drives early stopping, is the evaluation report's macro ROC AUC
without the report's minimum of positives (`hmn.handlers.MacroROCAUC`): per class over its known labels (masked, uncertain labels are left out, not
counted as negatives), averaged over the classes with a positive and a negative label in the validation
split. Before training, the log names the classes left out (a rare finding without a positive in a small
validation split), and a validation split where no class qualifies stops the run, saying why.

Evaluation, in `runs/eval/`:

- `metrics.json`: the whole report: settings (bootstrap resamples, confidence level, seed, where the
  thresholds came from, `ci_unit`: patient or image, `min_positives`), the numbers of images and patients,
  per class and for the macro and micro averages: number of images with a known label, positives (images and
  patients), ROC AUC with its 95% bootstrap interval, average precision, the operating threshold (the
  validation split's by default), sensitivity, specificity, PPV and NPV at it (per class with their
  intervals);
  `skipped_images` lists unreadable files left out.
- `metrics.csv`: the same, one row per class plus `macro` and `micro` rows; columns `class, n,
  positives, auc, auc_ci_low, auc_ci_high, average_precision, ap_ci_low, ap_ci_high, threshold,
  sensitivity, specificity, ppv, npv, sensitivity_ci_low, sensitivity_ci_high, specificity_ci_low,
  specificity_ci_high, threshold_source, ci_unit, reason`.
- `predictions.csv`: one row per test image: `image`; `patient_id` when the datalist has patient ids (as
  written there: pseudonymize before sharing); `age`, `sex`, `view` when the datalist carries them
  (empty where unknown); then `<class>_prob` and `<class>_label` for each class.
- `roc.png`: ROC curves per class and micro-averaged, with AUCs in the legend.
- `operating_points.csv`: columns `class, target, target_value, threshold, sensitivity, specificity,
  threshold_source`: at the thresholds fitted on the validation split for a specificity of at least 0.90 and
  0.95 with the highest sensitivity (`target` `specificity`), and the reverse (`target` `sensitivity`), the
  sensitivity and specificity reached on the evaluated split (empty without validation thresholds).
- `calibration.csv`: columns `class, n, ece, mce, brier, temperature_applied, temperature_fitted,
  ece_before_temperature` (expected and maximum calibration error over 10 equal-width bins, Brier score,
  the temperature applied with `--temperature`, the one fitted on this split, the ECE before the applied
  one), then a `macro` row; `reliability.png`: a reliability diagram per finding.
- With metadata in the datalist (age, sex, view; the public-source builders and the demo write them):
  `subgroups.csv`, columns `attribute, group, class, n, positives, auc, auc_ci_low, auc_ci_high,
  average_precision, ap_ci_low, ap_ci_high, threshold, sensitivity, specificity, threshold_source, reason`
  per `sex`, `age_band`
  (0-19, 20-39, 40-59, 60-79, 80+) and `view` group, at the whole split's thresholds;
  `subgroup_gaps.csv`, columns `attribute, class, auc_gap, highest_group, highest_auc, lowest_group,
  lowest_auc, groups_compared` (the largest AUC difference between an attribute's groups that have at least
  20 positive and negative patients for the finding); and
  `subgroups.png`, a forest plot of each group's AUC and interval. The demo's metadata is made up
  independently of its images: its gaps are chance.

Inference: one CSV (`--output_file`), one row per image: `image, error, <class>...` (probabilities).
Rows are written as the run goes, so a stopped run keeps what it wrote; an unreadable file gets a row
with its error message and empty probabilities, and the run continues.
With `--heatmaps True`, in `heatmap_dir`: `<id>/<finding>.png` and `<id>/<finding>.npy` (float32, values in
[0, 1], each map divided by its maximum at the network's resolution; the network input's height and width, or
with `--heatmap_geometry source` the file's rows and columns, NaN where a crop hid the file from the network) per
image and finding at or above its threshold, where `<id>` is the first 16 hex digits of the SHA-256 of the image's
path: no DICOM attribute and nothing readable from the path goes into a file name or a picture, and the PNGs carry
no text chunks. `heatmaps.csv` lists them, one row per finding: `image, id, StudyInstanceUID, SeriesInstanceUID,
SOPInstanceUID, finding, probability, threshold, geometry, png, npy` (the UIDs empty for a file that is not DICOM;
`geometry` `input` or `source`). An index written before the UID columns existed is refused by `--resume True`
(move it away: its heatmap files stay valid). An iteration's heatmaps are written (each file atomically) before its
CSV rows, so a stopped run never has a predictions row whose heatmaps are missing.

## Figures

No accuracy on real radiographs is claimed for this bundle: none was measured. See the repository's
README and BENCHMARKS.md for what was measured, on which machine.
"""


def volume_bundle_readme(name: str, row: Any, train: dict) -> str:
    """``docs/README.md`` of the 3D (CT/MR volume) bundle ``name``."""
    from hmn.data.demo3d import DEMO3D_CLASSES

    spec = get_backbone_spec(name)
    root = f"bundles/{name}"
    cfg = f"{root}/configs"
    attention = " + ".join(row.attention)
    options = dict(getattr(row, "backbone_options", ()) or ())
    size = " x ".join(str(v) for v in VOLUME_DEFAULTS["image_size"])
    spacing = " x ".join(f"{v:g}" for v in VOLUME_DEFAULTS["spacing"])
    center, width = VOLUME_DEFAULTS["window"]
    lo, hi = VOLUME_DEFAULTS["percentiles"]
    if spec.family == "convnext3d":
        source = "the project's own 3D ConvNeXt, `hmn.networks.convnext3d`"
        stem = {
            "conv": "a stem of two overlapping 3x3x3 convolutions",
            "pool": "a stem of 3x3x3 convolutions at the input resolution with max pooling for its stride (it keeps "
            "lesions a few voxels wide that a strided stem averages away)",
        }.get(options.get("stem"), "ConvNeXt's patchify stem")
        scratch = (
            "\n\nTrained from scratch by default, the backbone is built with `backbone_options` "
            f"`{json.dumps(options)}`: BatchNorm in place of ConvNeXt's LayerNorms, layer scale starting at 1, {stem}"
            ", and a stem stride of 4 x 4 x 2 voxels, so that the demo's "
            "1.5 x 1.5 x 3 mm voxels become 6 mm cubes. With `--pretrained PATH` (a 2D timm ConvNeXt checkpoint, "
            "inflated into 3D: each kernel repeated along the third axis and divided by its depth) the published "
            "architecture the weights fit is built instead (`backbone_options` `{}`, stride 4 on every axis); add "
            "`--backbone_options '{\"stem_stride\": [4, 4, 2]}'` to keep the anisotropic stem."
        )
    else:
        source = "MONAI's 3D Swin Transformer, the encoder of `monai.networks.nets.SwinUNETR`"
        scratch = ""
    classes = ", ".join(DEMO3D_CLASSES)
    return f"""# HybridMedNet bundle: `{name}` (CT and MR volumes)

Multi-label classification of findings on CT and MR volumes with HybridMedNet over a {spec.description or name}
backbone ({source}), a feature pyramid at strides 8, 16 and 32 (256 channels), `{attention}` attention
(self and cross-scale attention over a pooled context of at most 7 x 7 x 7 positions per scale), adaptive
multi-scale fusion and a multi-label head (one logit per class). Research use only: this is not a medical
device.{scratch}

This bundle was generated by `python -m hmn bundles` from the template in `hmn/bundle/template.py`; edit the
template, not these files. It needs the `hybridmednet` package installed (`pip install -e .` in the
repository); its configs name `hmn.*` targets.

## Data

By default the bundle trains on the project's **synthetic** 3D demo dataset (CT-like phantoms, no real
patient; findings {classes}), which it writes on first use into `~/.cache/hmn/demo3d` (or
`$HMN_CACHE/demo3d`): NIfTI files and a few DICOM series. For your own studies, write a datalist JSON
(`{{"class_names": [...], "training": [{{"image": PATH, "label": [...], "patient_id": ...}}], "validation": [...],
"test": [...]}}`, or `python -m hmn datalist json ...`) whose `image` entries are NIfTI files (`.nii`, `.nii.gz`)
or folders holding one DICOM series each, and pass `--datalist path/to/datalist.json`.

Every volume is read by `hmn.transforms.LoadXrayd` (modality values: Hounsfield units for CT), oriented to
RAS (`Orientationd`), resampled to `spacing` ({spacing} mm along X, Y, Z by default; `Spacingd`), mapped to
[0, 1] by `intensity` (`ct`: the window `window` = [center, width] in HU, {center:g}/{width:g} by default;
`mr`: the `percentiles` {lo:g} and {hi:g} of each volume) and centre-cropped or padded to `image_size`
({size} voxels, X, Y, Z, by default). The network sees `N, 1, X, Y, Z`. All of these are in the run record.

## Commands (from the repository root)

Train (checkpoints in `{root}/models`, TensorBoard logs and `history.csv` in `{root}/runs`):

    python -m monai.bundle run training --config_file {cfg}/train.json

Common overrides: `--max_epochs 10`, `--image_size "[96, 96, 48]"`, `--spacing "[1.0, 1.0, 2.0]"`,
`--intensity mr`, `--window "[-600, 1500]"`, `--batch_size 4`, `--learning_rate 1e-4`,
`--datalist DATALIST.json`, `--cache none|memory|persistent`, `--pretrained /path/to/convnext_2d.pth`
(3D ConvNeXt only). The mixed-precision, GPU fast-path, caching and run-record settings are those of the 2D
bundles (see `bundles/convnext_tiny/docs/README.md`); the run record also holds `spacing`, `intensity`,
`window` and `percentiles`.

Resume a stopped run (from its newest complete checkpoint; Ctrl-C or SIGTERM stops with a mid-epoch checkpoint,
as in the 2D bundles): add `--resume True`. Several GPUs:

    torchrun --nproc_per_node=2 -m monai.bundle run training \\
        --config_file "['{cfg}/train.json','{cfg}/multi_gpu_train.json']"

Evaluate `models/model.pt` on the test split (the report of the 2D bundles, in `{root}/runs/eval/`):

    python -m monai.bundle run evaluating \\
        --config_file "['{cfg}/train.json','{cfg}/evaluate.json']"

Predict over a folder (NIfTI files and DICOM series folders, searched recursively) or a datalist JSON:

    python -m monai.bundle run inference --config_file {cfg}/inference.json \\
        --input /path/to/folder --output_file predictions.csv

Whole studies larger than `image_size`: `--sliding_window True` (evaluation, inference, and validation during
training) pads each resampled study to at least `image_size` instead of cropping it, classifies it by
windows of `image_size` overlapping by `sliding_window_overlap` (0.25), and aggregates their logits into one
row per study by `sliding_window_aggregate`: `max` (default; a finding in one place, such as a lesion) or
`mean` (diffuse findings) (`hmn.inferers.SlidingWindowClassifier`). Studies then differ in size, so they
are classified one at a time. Heatmaps (`--heatmaps True`) are for radiographs only and are refused here.

{export_section(name)}
{drivers_section(name)}## Sharing and the MONAI model zoo

`python -m hmn pack-bundle {name} {name}.zip` packs the trained bundle as for the 2D bundles, its
TorchScript export `models/model.ts` included (exported by `ckpt_export` as "Export" says, from the packed
configs, and checked against the PyTorch network; with `--link-weights` / `--weights-url` / `--ts-url` both
`model.pt` and `model.ts` are linked from the MONAI model zoo's `large_files.yml`), and
`monai.bundle.load("{name}", bundle_dir=..., workflow_type="inference")` returns the trained network.
A bundle's configs are code (MONAI evaluates their `$` expressions when it parses them): fetch it with
`hmn.bundle.download_bundle(..., hash_val=...)`, whose hash is the trust anchor and whose extraction stays
under `{name}/`.

## Figures

No accuracy on real CT or MR studies is claimed for this bundle: none was measured. See the repository's
README and BENCHMARKS.md for what was measured on the synthetic volumes, on which machine.
"""
