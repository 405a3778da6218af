"""Ignite handlers the bundles use that MONAI lacks: the evaluation report and the inference CSV.

Both read what a :class:`monai.engines.SupervisedEvaluator` leaves on its state after each iteration:
with ``decollate=True`` (the default) ``engine.state.output`` is a list of per-image dicts holding
``"pred"`` (after the evaluator's postprocessing) and ``"label"``, and ``engine.state.batch`` the list
of per-image input dicts, whose ``"image"`` MetaTensor carries the source path in
``meta["filename_or_obj"]``; with ``decollate=False`` both are batched dicts and are split here.

* :class:`EvaluationReportHandler` (evaluate.json) collects predictions, labels and paths and, when
  the run completes, writes the report of :func:`hmn.evaluation.write_report`.
* :class:`PredictionCSVWriter` (inference.json) appends one row per image after every iteration.
* :class:`HeatmapWriter` (inference.json, ``heatmaps``) writes Grad-CAM overlays and maps per image and finding.
* :class:`StructuredReportWriter` (inference.json, ``dicom_sr``) writes one DICOM Structured Report per study.

Under ``torchrun`` the report handler gathers every rank's predictions and rank 0 writes the report
(use a sampler that does not pad, e.g. ``monai.data.DistributedSampler(even_divisible=False)``, or
padded images are counted twice; predictions.csv then lists rank 0's images first, then rank 1's, ...);
the CSV writer writes one file per rank (``<name>.rank<r>.csv``).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import EpochMetric
from monai.data import MetaTensor, decollate_batch
from scipy.special import expit

from hmn.durable import PATH_ERRORS, portable_text
from hmn.evaluation import atomic_write, compute_report, macro_auc, write_report
from hmn.evaluation.metrics import class_aucs
from hmn.inference import DICOM_UID_COLUMNS, rank_file, read_prediction_rows
from hmn.run_lock import RunLock
from hmn.workflows.devices import rank_world

__all__ = ["EvaluationReportHandler", "HeatmapWriter", "MacroROCAUC", "PredictionCSVWriter", "StructuredReportWriter",
           "ValidationThresholds", "stack_pred_label"]

logger = logging.getLogger(__name__)


def _all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (Python objects, so shares of different sizes are fine)."""
    parts: list[Any] = [None] * rank_world()[1]
    torch.distributed.all_gather_object(parts, obj)
    return parts


def _iteration_items(engine: Any) -> list[tuple[Mapping | None, Mapping]]:
    """(input item or None, output item) per image of the engine's current iteration."""
    output, batch = engine.state.output, engine.state.batch
    if isinstance(output, Mapping):
        output = decollate_batch(dict(output), detach=True)
    if isinstance(batch, Mapping):
        batch = decollate_batch(dict(batch), detach=True)
    if not isinstance(output, list) or not all(isinstance(o, Mapping) for o in output):
        raise TypeError(
            f"engine.state.output must be a dict or a list of per-image dicts (as SupervisedEvaluator gives), "
            f"got {type(output).__name__}"
        )
    if not isinstance(batch, list) or len(batch) != len(output):
        batch = [None] * len(output)
    return list(zip(batch, output))


def _image_path(items: Sequence[Mapping | None], key: str, fallback: str) -> str:
    for item in items:
        if item is None:
            continue
        value = item.get(key)
        if isinstance(value, MetaTensor):
            name = value.meta.get("filename_or_obj")
            if isinstance(name, (list, tuple)) and len(name) == 1:
                name = name[0]
            if name:
                return str(name)
        elif isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return fallback


def _image_meta(items: Sequence[Mapping | None], key: str, names: Sequence[str]) -> list[str]:
    """The values of meta keys `names` of the image under `key` (``""`` where absent), e.g. the DICOM UIDs."""
    for item in items:
        value = item.get(key) if item is not None else None
        if isinstance(value, MetaTensor):
            out = []
            for name in names:
                v = value.meta.get(name, "")
                v = v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v
                out.append("" if v is None else str(v))
            return out
    return [""] * len(names)


def _text(items: Sequence[Mapping | None], key: str) -> str:
    for item in items:
        if item is not None and item.get(key):
            value = item[key]
            return str(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value)
    return ""


def _vector(x: Any) -> np.ndarray:
    """A tensor, array or (nested) list of numbers as a flat float64 array."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if isinstance(x, (list, tuple)):
        return np.concatenate([_vector(v) for v in x]) if len(x) else np.zeros(0)
    return np.asarray(x, dtype=np.float64).reshape(-1)


class _PredictionReader:
    """Shared pred-to-probability logic: slicing, width check, sigmoid."""

    def __init__(self, class_names: Sequence[str], pred_key: str, apply_sigmoid: bool, num_classes: int | None):
        self.class_names = [str(c) for c in class_names]
        if not self.class_names:
            raise ValueError("class_names is empty; give the names of the classes in the network's output order")
        if num_classes is not None and int(num_classes) != len(self.class_names):
            raise ValueError(f"num_classes={num_classes} but {len(self.class_names)} class_names {self.class_names}")
        self.pred_key, self.apply_sigmoid = pred_key, bool(apply_sigmoid)
        self.num_classes = None if num_classes is None else int(num_classes)

    def probabilities(self, output: Mapping, image: str) -> np.ndarray:
        if output.get(self.pred_key) is None:
            raise KeyError(f"no {self.pred_key!r} in the engine output for {image}; output keys: {list(output)}")
        pred = _vector(output[self.pred_key])
        if self.num_classes is not None:
            pred = pred[: self.num_classes]
        if pred.size != len(self.class_names):
            raise ValueError(
                f"the prediction for {image} has {pred.size} values but there are {len(self.class_names)} "
                f"class_names; set num_classes={len(self.class_names)} if the network also outputs other "
                "(e.g. coarse, hierarchical) logits after the class logits"
            )
        return expit(pred) if self.apply_sigmoid else pred


def stack_pred_label(
    output: Any, num_classes: int | None = None, finding_match: Mapping[str, Any] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred, label)`` as two ``N x K`` float tensors from an evaluator's output (a list of per-image
    dicts, or one batched dict), keeping the first `num_classes` columns; the output transform of
    :class:`MacroROCAUC` in the bundles. With a `finding_match` (:func:`hmn.evaluation.external.match_for_evaluation`)
    the prediction columns ``model_index`` are paired with the label columns ``data_index``."""
    if isinstance(output, Mapping):
        output = decollate_batch(dict(output), detach=True)
    preds = torch.stack([torch.as_tensor(o["pred"]).reshape(-1) for o in output]).float()
    labels = torch.stack([torch.as_tensor(o["label"]).reshape(-1) for o in output]).float()
    if finding_match:
        return preds[:, list(finding_match["model_index"])], labels[:, list(finding_match["data_index"])]
    if num_classes is not None:
        preds, labels = preds[:, : int(num_classes)], labels[:, : int(num_classes)]
    return preds, labels


class MacroROCAUC(EpochMetric):
    """The bundles' validation key metric (model selection, early stopping): the macro ROC AUC with the
    evaluation report's definition (:func:`hmn.evaluation.macro_auc`), so that the model kept as best is
    judged by the number the report will print.

    Per class over its known labels (a label below 0, the bundles' mark of a masked or uncertain label, is
    left out, not counted as negative), averaged over the classes with at least one positive and one
    negative label in the split; the others are left out (MONAI's ``ROCAUC(average="macro")`` averages an
    undefined class in and gives NaN for the whole epoch). NaN only when no class is defined (the bundles
    check the validation split before training, see :func:`hmn.workflows.check_validation_split`).

    Built on ignite's ``EpochMetric``: predictions are collected over the epoch and, under torchrun, every
    process's share is gathered (as Python objects, so shares of different sizes, as
    ``DistributedSampler(even_divisible=False)`` gives them, are fine; ignite's own tensor gather needs equal
    sizes); every process computes the same value. The output transform must give ``(pred, label)`` as
    ``N x K`` or ``N`` tensors, e.g. :func:`stack_pred_label`.
    """

    def __init__(self, output_transform: Callable[[Any], Any] = stack_pred_label, device: str | torch.device = "cpu") -> None:
        super().__init__(self._compute, output_transform=output_transform, check_compute_fn=False, device=device)
        # the last computation's per-class AUCs, {class index: AUC} (hmn.workflows.tracking.PerFindingAUC logs them)
        self.per_class: dict[int, float] = {}

    @staticmethod
    def _compute(pred: Any, label: Any) -> float:
        value, _ = macro_auc(pred, label)
        return float("nan") if value is None else value

    def compute(self) -> float:
        from ignite.exceptions import NotComputableError

        if not self._predictions:
            raise NotComputableError("MacroROCAUC needs at least one image before it can be computed")
        pred = torch.cat(self._predictions).detach().cpu().double().numpy()
        label = torch.cat(self._targets).detach().cpu().double().numpy()
        if rank_world()[1] > 1:
            parts = _all_gather((pred, label))
            pred = np.concatenate([p[0] for p in parts])
            label = np.concatenate([p[1] for p in parts])
        self.per_class = class_aucs(pred, label)
        return float(np.mean(list(self.per_class.values()))) if self.per_class else float("nan")


def _thresholds_for_findings(path: str | os.PathLike, finding_match: Mapping[str, Any]) -> dict[str, Any]:
    """A thresholds file of the model's classes (``thresholds.json``, ``metrics.json``) as a thresholds record of
    the findings an external evaluation compares (:func:`hmn.evaluation.external.match_for_evaluation`): each
    finding takes its model class's thresholds. Classes the file does not name are left for compute_report to
    refuse by name."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = json.load(f)
        per_class = {str(e["class"]): e.get("threshold") for e in data["per_class"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a metrics.json or thresholds.json with per-class thresholds "
                         f"({type(e).__name__}: {e})") from None
    to_finding = {str(c["model_class"]): str(c["finding"]) for c in finding_match["compared"]}
    return {
        "path": path,
        "source": data.get("source"),
        "per_class": [{"class": f, "threshold": per_class[m]} for m, f in to_finding.items() if m in per_class],
        "operating_points": [{**r, "class": to_finding[r["class"]]} for r in data.get("operating_points") or []
                             if r.get("class") in to_finding],
    }


class EvaluationReportHandler:
    """Writes the evaluation report (per-class ROC AUC with bootstrap intervals, thresholds, predictions,
    ROC plot; see :mod:`hmn.evaluation.report`) when a ``SupervisedEvaluator`` run completes.

    Every iteration the handler stores each image's probabilities, labels, source path and patient id (the
    datalist's ``patient_id``: the report's intervals then resample patients); items with a non-empty
    `error_key` (placeholders of :class:`hmn.inference.InferenceDataset`, and unreadable files of
    :class:`hmn.data.SkipBadFilesDataset` in ``"leave_out"`` mode) are left out of every number and listed in
    the report's ``skipped_images``. On completion it calls
    :func:`hmn.evaluation.compute_report` and :func:`hmn.evaluation.write_report`, keeps the report on
    ``self.report`` and the file paths on ``self.paths``, puts ``<metric_prefix>macro_auc`` and
    ``<metric_prefix>micro_auc`` into ``engine.state.metrics`` (when defined) and logs them.

    Args:
        output_dir: the report folder.
        class_names: the class names, in the order of the network's outputs and the labels.
        pred_key, label_key, image_key: keys of the prediction and label (in the engine output) and of
            the image (in the input batch, or the output) whose ``meta["filename_or_obj"]`` is the path.
        mask_key: optional per-image 0/1 mask beside the label (the datalist's ``label_mask``): labels
            whose mask is 0 count as unknown. Ignored when the items have no such key.
        error_key: items with a non-empty value under this key are skipped.
        thresholds, fixed_threshold, n_bootstrap, ci, seed, min_positives: as in
            :func:`hmn.evaluation.compute_report` (the bundles give the validation split's ``models/thresholds.json``
            when training recorded one, see :func:`hmn.evaluation.model_thresholds`). `thresholds` may also be a
            function of no arguments returning one of those, called when the report is computed (the test report
            that ends a training run reads the thresholds that run recorded).
        patient_key: the key of the patient id in the input items (None or missing: images are the unit).
        apply_sigmoid: the predictions are logits (True: a sigmoid is applied here) or already
            probabilities (False, e.g. after an ``Activationsd(sigmoid=True)`` postprocessing).
        num_classes: use only the first `num_classes` prediction (and label) values, for networks that
            output more (the hierarchical head's fine logits followed by coarse logits).
        metric_prefix: prefix of the names put into ``engine.state.metrics``.
        metadata: ``{image path: {"age", "sex", "view"}}`` (:func:`hmn.data.datalist_metadata`): the
            predictions CSV gets those columns and the report its subgroup section. None: neither.
        temperature: ``None``/``""``/``"none"``, or the path of a ``metrics.json`` (the validation split's)
            whose fitted per-finding temperatures are applied to the probabilities before everything else
            (:mod:`hmn.evaluation.calibration`).
        finding_match: for a datalist with other classes than the model's, the pairing of
            :func:`hmn.evaluation.external.match_for_evaluation`; the report is then over the shared findings.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        mask_key: str | None = "label_mask",
        error_key: str = "error",
        thresholds: Any = "fixed",
        fixed_threshold: float = 0.5,
        n_bootstrap: int = 1000,
        ci: float = 0.95,
        seed: int = 0,
        min_positives: int | None = None,
        patient_key: str | None = "patient_id",
        apply_sigmoid: bool = True,
        num_classes: int | None = None,
        metric_prefix: str = "",
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        temperature: str | os.PathLike | None = None,
        finding_match: Mapping[str, Any] | None = None,
    ) -> None:
        self.reader = _PredictionReader(class_names, pred_key, apply_sigmoid, num_classes)
        self.metadata = dict(metadata) if metadata else None
        self.temperature = None if temperature in (None, "", "none", "None") else os.fspath(temperature)
        if self.temperature is not None and not os.path.isfile(self.temperature):
            raise FileNotFoundError(
                f"temperature={self.temperature!r}: no such file; give the metrics.json of an evaluation on the "
                "validation split (its calibration section holds the fitted temperatures), or 'none'"
            )
        self.finding_match = dict(finding_match) if finding_match else None
        self.class_names = self.reader.class_names
        self.output_dir = os.fspath(output_dir)
        self.label_key, self.image_key, self.mask_key, self.error_key = label_key, image_key, mask_key, error_key
        self.thresholds, self.fixed_threshold = thresholds, fixed_threshold
        self.n_bootstrap, self.ci, self.seed = int(n_bootstrap), float(ci), int(seed)
        from hmn.evaluation import DEFAULT_MIN_POSITIVES

        self.min_positives = DEFAULT_MIN_POSITIVES if min_positives in (None, "") else int(min_positives)
        self.patient_key = patient_key
        self.metric_prefix = metric_prefix
        self.report: dict | None = None
        self.paths: dict[str, str] | None = None
        self.reset()

    def attach(self, engine: Any) -> None:
        """Registers the handler on `engine` (STARTED: reset, ITERATION_COMPLETED: collect, COMPLETED: write)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.finalize)

    def reset(self, engine: Any = None) -> None:
        """Forgets what was collected (every run of the engine starts afresh)."""
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._images: list[str] = []
        self._patients: list[str] = []
        self._skipped: list[dict[str, str]] = []
        self._seen = 0

    def _label(self, items: Sequence[Mapping | None], image: str) -> np.ndarray:
        label = next((i[self.label_key] for i in items if i is not None and i.get(self.label_key) is not None), None)
        if label is None:
            raise ValueError(
                f"no {self.label_key!r} for {image}: the evaluation report needs labels "
                "(is the datalist split labelled?)"
            )
        k = len(self.class_names)
        y = _vector(label)
        if self.finding_match:
            k = int(self.finding_match["n_data_classes"])
        elif self.reader.num_classes is not None:
            y = y[:k]
        if y.size != k:
            raise ValueError(
                f"the label of {image} has {y.size} values but there are {k} "
                + ("class_names in the datalist" if self.finding_match else f"class_names {self.class_names}")
            )
        if self.mask_key:
            mask = next((i[self.mask_key] for i in items if i is not None and i.get(self.mask_key) is not None), None)
            if mask is not None:
                m = _vector(mask)[:k]
                if m.size != k:
                    raise ValueError(f"the {self.mask_key!r} of {image} has {m.size} values, expected {k}")
                y = np.where(m > 0, y, np.nan)
        return y

    def collect(self, engine: Any) -> None:
        """Stores the current iteration's probabilities, labels and image paths."""
        for batch_item, output_item in _iteration_items(engine):
            items = (batch_item, output_item)
            image = _image_path(items, self.image_key, f"item_{self._seen}")
            self._seen += 1
            error = _text(items, self.error_key)
            if error:
                self._skipped.append({"image": image, "error": error})
                continue
            self._probs.append(self.reader.probabilities(output_item, image))
            self._labels.append(self._label(items, image))
            self._images.append(image)
            self._patients.append(_text(items, self.patient_key) if self.patient_key else "")

    def _gathered(self) -> tuple[np.ndarray, np.ndarray, list[str], list[dict[str, str]], list[str]] | None:
        k = len(self.class_names)
        local = (
            np.stack(self._probs) if self._probs else np.zeros((0, k)),
            np.stack(self._labels) if self._labels else np.zeros((0, k)),
            list(self._images),
            list(self._skipped),
            list(self._patients),
        )
        rank, world = rank_world()
        if world == 1:
            return local
        parts = _all_gather(local)
        if rank != 0:
            return None
        return (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            [i for p in parts for i in p[2]],
            [s for p in parts for s in p[3]],
            [i for p in parts for i in p[4]],
        )

    def finalize(self, engine: Any = None) -> dict[str, str] | None:
        """Computes and writes the report (on rank 0); returns the paths written, or None."""
        gathered = self._gathered()
        if gathered is None:
            return None
        probs, labels, images, skipped, patients = gathered
        patient_ids = patients if any(patients) else None
        names = self.class_names
        if self.finding_match:
            probs = probs[:, list(self.finding_match["model_index"])]
            labels = labels[:, list(self.finding_match["data_index"])]
            names = [c["finding"] for c in self.finding_match["compared"]]
        temps, raw = None, None
        if self.temperature is not None:
            from hmn.evaluation import apply_temperature, load_temperatures

            temps, raw = load_temperatures(self.temperature, names), probs
            probs = apply_temperature(probs, temps)
            logger.info("temperatures from %s applied: %s", self.temperature,
                        ", ".join(f"{n} {t:.3g}" for n, t in zip(names, temps) if np.isfinite(t)))
        if skipped:
            logger.warning("%d images were left out of the evaluation report (unreadable; not replaced, not "
                           "counted): %s", len(skipped), "; ".join(s["error"] for s in skipped[:5]))
        if not images:
            logger.warning("no images were evaluated; no report written to %s", self.output_dir)
            return None
        from hmn.evaluation.subgroups import groups_from_metadata

        thresholds = self.thresholds() if callable(self.thresholds) else self.thresholds
        if self.finding_match and isinstance(thresholds, (str, os.PathLike)) and os.path.isfile(thresholds):
            thresholds = _thresholds_for_findings(thresholds, self.finding_match)
        report = compute_report(
            probs, labels, names, thresholds=thresholds, fixed_threshold=self.fixed_threshold,
            n_bootstrap=self.n_bootstrap, ci=self.ci, seed=self.seed,
            groups=groups_from_metadata(images, self.metadata), temperatures=temps,
            temperatures_from=self.temperature, uncalibrated=raw, patient_ids=patient_ids,
            min_positives=self.min_positives,
        )
        if self.finding_match:
            report["findings"] = {k: v for k, v in self.finding_match.items() if k not in ("model_index", "data_index")}
        if skipped:
            report["skipped_images"] = skipped
        self.paths = write_report(report, probs, labels, images, names, self.output_dir, metadata=self.metadata,
                                  patient_ids=patient_ids)
        self.report = report
        macro, micro = report["macro"], report["micro"]
        if engine is not None:
            for name, entry in (("macro_auc", macro), ("micro_auc", micro)):
                if entry["auc"] is not None:
                    engine.state.metrics[self.metric_prefix + name] = entry["auc"]

        def fmt(e: Mapping[str, Any]) -> str:
            if e["auc"] is None:
                return "undefined"
            ci = e.get("auc_ci")
            return f"{e['auc']:.4f}" + (f" ({self.ci:.0%} CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")

        unit = (f"{report['n_patients']} patients" if report["settings"]["ci_unit"] == "patient"
                else "no patient ids: images as the unit")
        logger.info("evaluated %d images (%s, %d left out as unreadable): macro AUC %s, micro AUC %s; thresholds: "
                    "%s; report in %s", len(images), unit, len(skipped), fmt(macro), fmt(micro),
                    report["settings"]["threshold_source"], self.output_dir)
        return self.paths


class ValidationThresholds:
    """Records, with the best model, the operating thresholds fitted on the validation split, so that the test
    report (and any later evaluation) applies thresholds that were not fitted on the data it reports.

    Attached to the bundles' validation evaluator. Each validation it collects the probabilities and labels
    (items with a non-empty `error_key`, unreadable files, are left out); when the validation is the
    evaluator's new best (``state.best_metric_epoch == state.epoch``, the criterion by which ``model.pt`` is
    kept) it fits Youden's J threshold and the operating points' thresholds per finding
    (:func:`hmn.evaluation.fit_operating_thresholds`) and writes them as a staged
    ``.thresholds.json.epoch=N.staged`` in `ckpt_dir`, which the full-state checkpoint saver promotes to
    ``thresholds.json`` together with ``model.pt`` (:data:`hmn.checkpoints.BEST_MODEL_COMPANIONS`), so the two
    always belong to the same epoch. Under torchrun every process's share is gathered and rank 0 writes.

    Args:
        ckpt_dir: the folder of ``model.pt``.
        class_names: the class names, in the order of the network's outputs.
        pred_key, label_key, error_key: keys of the probabilities (after the validation postprocessing's
            sigmoid) and labels in the evaluator's output, and of the error message in its input.
        specificities, sensitivities: the operating points' targets.
        staged: write the staged file (True, for the bundles' checkpoint saver to promote) or ``thresholds.json``
            itself.

    The file: ``{"source": "validation split", "epoch", "val_metric", "n_images", "n_left_out", "class_names",
    "per_class": [{"class", "threshold"}], "operating_points": [...]}``; :func:`hmn.evaluation.load_thresholds`
    reads it as it reads a ``metrics.json``.
    """

    FILENAME = "thresholds.json"

    def __init__(
        self,
        ckpt_dir: str | os.PathLike,
        class_names: Sequence[str],
        pred_key: str = "pred",
        label_key: str = "label",
        error_key: str = "error",
        specificities: Sequence[float] = (0.90, 0.95),
        sensitivities: Sequence[float] = (0.90, 0.95),
        staged: bool = True,
    ) -> None:
        self.ckpt_dir = os.fspath(ckpt_dir)
        self.class_names = [str(c) for c in class_names]
        self.pred_key, self.label_key, self.error_key = pred_key, label_key, error_key
        self.specificities, self.sensitivities = tuple(specificities), tuple(sensitivities)
        self.staged = bool(staged)
        self.path: str | None = None
        self.reset()

    def attach(self, engine: Any) -> None:
        """Registers the handler on the validation evaluator (STARTED, ITERATION_COMPLETED, EPOCH_COMPLETED)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record)

    def reset(self, engine: Any = None) -> None:
        """Forgets what was collected (each validation starts afresh)."""
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._left_out = 0

    def collect(self, engine: Any) -> None:
        """Stores the current iteration's probabilities and labels."""
        k = len(self.class_names)
        for batch_item, output_item in _iteration_items(engine):
            if _text((batch_item, output_item), self.error_key):
                self._left_out += 1
                continue
            label = output_item.get(self.label_key)
            if label is None and batch_item is not None:
                label = batch_item.get(self.label_key)
            self._probs.append(_vector(output_item[self.pred_key])[:k])
            self._labels.append(_vector(label)[:k])

    def record(self, engine: Any) -> str | None:
        """Writes the thresholds when this validation is the best so far; returns the path written, or None."""
        k = len(self.class_names)
        local = (np.stack(self._probs) if self._probs else np.zeros((0, k)),
                 np.stack(self._labels) if self._labels else np.zeros((0, k)), self._left_out)
        rank, world = rank_world()
        if world > 1:
            parts = _all_gather(local)
            local = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                     sum(p[2] for p in parts))
        state = engine.state
        if rank != 0 or getattr(state, "best_metric_epoch", -1) != state.epoch or local[0].shape[0] == 0:
            return None
        from hmn.checkpoints import staged_name
        from hmn.evaluation import fit_operating_thresholds

        probs, labels, left_out = local
        labels = np.where(labels < 0, np.nan, labels)
        record = {"source": "validation split", "epoch": int(state.epoch),
                  "val_metric": float(state.best_metric) if np.isfinite(state.best_metric) else None,
                  "n_images": int(probs.shape[0]), "n_left_out": int(left_out),
                  **fit_operating_thresholds(probs, labels, self.class_names, self.specificities, self.sensitivities)}
        os.makedirs(self.ckpt_dir, exist_ok=True)
        name = staged_name(self.FILENAME, int(state.epoch)) if self.staged else self.FILENAME
        text = json.dumps(record, indent=2, allow_nan=False)
        self.path = atomic_write(os.path.join(self.ckpt_dir, name), lambda f: f.write(text + "\n"))
        return self.path


class PredictionCSVWriter:
    """Appends one CSV row per image after every iteration of an inference run, so that a crash loses
    nothing already written (each iteration's rows are flushed and fsync'ed).

    Columns: ``image`` (the source path), ``error`` (empty, or the one-line reason the file could not be
    used, from :class:`hmn.inference.InferenceDataset`), ``StudyInstanceUID``, ``SeriesInstanceUID``,
    ``SOPInstanceUID`` (:data:`hmn.inference.DICOM_UID_COLUMNS`, from the image's meta as ``LoadXrayd(dicom_tags=...)``
    reads them: empty for a file that is not DICOM, SOPInstanceUID empty for a series folder), then one column per
    class name holding the predicted probability (empty on an error row). Rows follow the order of the data loader.

    When the run starts, an existing file is rewritten from scratch (header only), unless `resume`:
    then its complete error-free rows are kept (a row cut off by a crash and error rows are dropped,
    so failed images are tried again), its header must match, and images that already have a row are
    not written again. Pair it with ``hmn.inference.inference_items(..., skip_done=<this file>)`` so
    that those images are not even computed.

    The file is locked (:class:`hmn.run_lock.RunLock`) from the start of the run until it completes: a second
    inference writing the same file stops at once (:class:`hmn.run_lock.RunInUseError`, naming the holder's
    process) instead of interleaving rows with this one. A file name that is not UTF-8 is written with its
    undecodable bytes as ``\\xNN`` (:func:`hmn.durable.portable_text`), with a warning naming it.

    Args:
        output_file: the CSV path (folders are created). Under torchrun with several ranks each rank
            writes ``<stem>.rank<r><suffix>``.
        class_names: the class names, in the network's output order.
        pred_key, image_key, error_key: keys in the engine output / input batch.
        apply_sigmoid: the predictions are logits (a sigmoid is applied) or already probabilities.
        num_classes: write only the first `num_classes` outputs (hierarchical heads add coarse logits).
        resume: keep the rows of an interrupted run (see above).
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        class_names: Sequence[str],
        pred_key: str = "pred",
        image_key: str = "image",
        error_key: str = "error",
        apply_sigmoid: bool = True,
        num_classes: int | None = None,
        resume: bool = False,
    ) -> None:
        self.reader = _PredictionReader(class_names, pred_key, apply_sigmoid, num_classes)
        self.class_names = self.reader.class_names
        self.output_file = os.fspath(output_file)
        self.image_key, self.error_key, self.resume = image_key, error_key, bool(resume)
        self.header = ["image", "error", *DICOM_UID_COLUMNS, *self.class_names]
        self.path: str | None = None
        self.lock = RunLock(self.output_file, "inference", file=True, all_ranks=True)
        self.rows_written = 0
        self.errors = 0
        self._done: set[str] = set()
        self._seen = 0

    def attach(self, engine: Any) -> None:
        """Registers the handler on `engine` (STARTED: start the file, ITERATION_COMPLETED: append, COMPLETED: log)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def start(self, engine: Any = None) -> None:
        """Creates (or, with `resume`, cleans up) the CSV with its header."""
        path = rank_file(self.output_file)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.lock.release()
        self.lock = RunLock(path, "inference", file=True, all_ranks=True).acquire()  # one writer per file, held until COMPLETED
        kept: list[list[str]] = []
        if self.resume and os.path.exists(path):
            header, rows = read_prediction_rows(path)
            if header is not None and header != self.header:
                raise ValueError(
                    f"{path} has columns {header}, not {self.header}: it was written for other classes (or by a "
                    "version without the DICOM UID columns); remove it or write to another file"
                )
            kept = [r for r in rows if r[1] == ""]
            logger.info("resuming %s: %d predictions kept, %d rows dropped (errors or cut off, tried again)",
                        path, len(kept), len(rows) - len(kept))
        elif os.path.exists(path):
            _, earlier = read_prediction_rows(path)
            logger.warning("overwriting %s and its %d rows from an earlier run (--resume True would keep its error-free "
                           "rows and predict only the other images)", path, len(earlier))

        def write(f: Any) -> None:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(self.header)
            w.writerows(kept)

        atomic_write(path, write)
        self.path = path
        self._done = {r[0] for r in kept}
        self.rows_written, self.errors, self._seen = len(kept), 0, 0

    def write(self, engine: Any) -> None:
        """Appends the current iteration's rows and syncs them to disk."""
        if self.path is None:
            self.start(engine)
        rows = []
        for batch_item, output_item in _iteration_items(engine):
            items = (batch_item, output_item)
            image = _image_path(items, self.image_key, f"item_{self._seen}")
            self._seen += 1
            written = portable_text(image)
            if written != image:
                logger.warning("a file name that is not UTF-8, written with its other bytes as \\xNN: %s", written)
                image = written
            if self.resume and image in self._done:
                continue
            error = portable_text(_text(items, self.error_key))
            uids = _image_meta(items, self.image_key, DICOM_UID_COLUMNS)
            if error:
                rows.append([image, " ".join(error.split()), *uids] + [""] * len(self.class_names))
                self.errors += 1
            else:
                rows.append([image, "", *uids] + [repr(float(p)) for p in self.reader.probabilities(output_item, image)])
            if self.resume:
                self._done.add(image)
        if not rows:
            return
        with open(self.path, "a", newline="", encoding="utf-8", errors=PATH_ERRORS) as f:  # type: ignore[arg-type]
            csv.writer(f, lineterminator="\n").writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        self.rows_written += len(rows)

    def finish(self, engine: Any = None) -> None:
        """Logs how many rows (and error rows) the file holds."""
        level = logging.WARNING if self.errors else logging.INFO
        logger.log(level, "%s: %d rows, %d of this run's images could not be read", self.path, self.rows_written,
                   self.errors)
        self.lock.release()


class StructuredReportWriter:
    """Writes one DICOM Structured Report (TID 1500 Measurement Report, :mod:`hmn.deploy.sr`) per study of the
    DICOM images in a predictions CSV when an inference run completes: the run's own rows and those of an
    earlier run that ``--resume`` kept, so that a study's report covers every image of it that was predicted.

    Reads :class:`PredictionCSVWriter`'s file (under torchrun every rank's share, after a barrier; rank 0 writes),
    and each DICOM image's header again (patient and study attributes go into the SR, never into a log). Rows
    with an error and files that are not DICOM (an empty ``SOPInstanceUID``: PNG/JPEG, a 3D series folder) get no
    report; the log says how many.

    Args:
        output_dir: the folder of the SRs (created); ``""``/None: nothing is attached (the bundles' default).
        predictions_file: the CSV :class:`PredictionCSVWriter` writes (its ``output_file``).
        class_names: the class names, the CSV's class columns.
        algorithm_name, algorithm_version: the model's identification in the SR (the bundle's metadata.json
            ``name`` and ``version``).

    Raises:
        ImportError: `output_dir` is given and highdicom is not installed (``pip install -e ".[deploy]"``);
            raised when the handler is built, before anything is predicted.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None,
        predictions_file: str | os.PathLike,
        class_names: Sequence[str],
        algorithm_name: str,
        algorithm_version: str,
    ) -> None:
        self.output_dir = os.fspath(output_dir) if output_dir else ""
        self.predictions_file = os.fspath(predictions_file)
        self.class_names = [str(c) for c in class_names]
        self.algorithm_name, self.algorithm_version = str(algorithm_name), str(algorithm_version)
        self.written: list[str] = []
        if self.output_dir:
            try:
                import highdicom  # noqa: F401
            except ImportError as e:
                raise ImportError(f"dicom_sr={self.output_dir!r} needs highdicom: pip install -e \".[deploy]\" "
                                  "(or pip install highdicom)") from e

    def attach(self, engine: Any) -> None:
        """Registers :meth:`write` on COMPLETED (nothing when there is no `output_dir`)."""
        from ignite.engine import Events

        if self.output_dir:
            engine.add_event_handler(Events.COMPLETED, self.write)

    def rows(self) -> list[tuple[str, list[float]]]:
        """(DICOM path, probabilities) of every error-free row with a SOPInstanceUID in the predictions file(s)."""
        from hmn.inference import run_outputs

        items: dict[str, list[float]] = {}
        for path in run_outputs(self.predictions_file):
            if not os.path.exists(path):
                continue
            header, rows = read_prediction_rows(path)
            if not header:
                continue
            missing = [c for c in ("image", "error", "SOPInstanceUID", *self.class_names) if c not in header]
            if missing:
                raise ValueError(f"{path}: no {missing} column(s) in its header {header}; it was not written by this "
                                 "inference (PredictionCSVWriter with these classes)")
            i_img, i_err, i_sop = header.index("image"), header.index("error"), header.index("SOPInstanceUID")
            cols = [header.index(c) for c in self.class_names]
            for r in rows:
                if r[i_err] == "" and r[i_sop] != "":
                    items[r[i_img]] = [float(r[k]) for k in cols]
        return list(items.items())

    def write(self, engine: Any = None) -> list[str]:
        """Writes the SRs (rank 0, after every rank's rows are on disk); returns their paths."""
        rank, world = rank_world()
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return []
        from hmn.deploy.sr import write_study_reports

        items = self.rows()
        self.written = write_study_reports(items, self.output_dir, self.class_names,
                                           algorithm_name=self.algorithm_name,
                                           algorithm_version=self.algorithm_version, skip_bad_studies=True)
        logger.info("%d DICOM Structured Report(s) of %d DICOM image(s) written to %s", len(self.written), len(items),
                    self.output_dir)
        return self.written


class HeatmapWriter:
    """Writes Grad-CAM heatmaps during an inference run (:mod:`hmn.explain`): for every readable image, one
    overlay PNG and one ``.npy`` per chosen finding whose probability is at or above its threshold, under
    ``output_dir/<id>/<finding>.png|.npy`` with ``<id>`` a hash of the image's path (no DICOM attribute, and
    nothing readable from the path, goes into a name or a picture), and one row per file pair in
    ``output_dir/heatmaps.csv`` (columns :data:`hmn.explain.HEATMAP_INDEX_COLUMNS`: the image's path and id, its
    DICOM ``StudyInstanceUID``, ``SeriesInstanceUID`` and ``SOPInstanceUID`` from the image's meta as
    ``LoadXrayd(dicom_tags=...)`` reads them, empty for a file that is not DICOM, then the finding, its probability
    and threshold, the geometry and the two files), appended and synced after each iteration.

    Geometry: ``"input"`` (default) writes the maps and overlays at the network input's size, as the network saw
    the image after the loader's resize (with ``aspect`` ``stretch``, ``pad`` or ``crop``). ``"source"`` takes
    each map back to the source file's own rows x columns (:class:`hmn.explain.SourceGeometry`,
    :func:`hmn.explain.maps_to_source`: the file is read again at its own size with the preprocessing's loader,
    and the resize and pad or crop are undone as the loader's affines record them), so that ``map[r, c]`` refers
    to pixel ``(r, c)`` of the DICOM/PNG file: a pad's border is left out, and with ``crop`` the margins the
    network never saw are **NaN** (not 0, which would say "no evidence" where there was no view). The overlay is
    then drawn on the source image at its own size (one pixel per pixel, its unseen margins uncoloured inside a
    dashed frame). Source maps are float32 at the file's size (about 36 MB per finding for a 3000 x 3000
    radiograph), and each explained file is read a second time.

    Attach it before :class:`PredictionCSVWriter`: an iteration's heatmaps are then on disk before its CSV
    rows, so a run stopped in between leaves those images without rows, and a resumed run (which skips
    images with rows) computes both again. Each file is written atomically.

    Args:
        output_dir: the heatmap folder (created).
        network: the evaluator's network (a HybridMedNet, or one wrapped with ``.module``).
        class_names: the class names, in the network's output order.
        enabled: False (the bundles' default, ``heatmaps``) attaches nothing.
        findings: ``"all"`` or a list of class names to explain.
        thresholds: a probability for every finding, a ``{class: threshold}`` mapping, or the path of an
            evaluation ``metrics.json`` with per-finding thresholds (:func:`hmn.explain.resolve_thresholds`).
        levels: Grad-CAM pyramid levels, ``"finest"`` or ``"all"`` (:func:`hmn.explain.gradcam_pairs`).
        pred_key, image_key, error_key: keys in the engine output / input batch.
        num_classes: the first `num_classes` outputs are the classes (hierarchical heads add coarse logits).
        batch_size: (image, finding) pairs per Grad-CAM pass.
        resume: keep the index of an earlier run (pair with ``PredictionCSVWriter(resume=True)``); by default
            the index starts afresh (heatmap files already there stay until overwritten).
        apply_sigmoid: the evaluator's ``pred`` are logits (True: a sigmoid gives the probabilities compared
            with the thresholds) or already probabilities (False: the bundles' inference postprocessing).
        geometry: ``"input"`` or ``"source"`` (:data:`hmn.explain.HEATMAP_GEOMETRIES`; above).
        loader: for ``"source"``, the preprocessing that made the network's input (a MONAI ``Compose`` holding an
            :class:`hmn.transforms.LoadXrayd`, the ``LoadXrayd`` or its ``LoadXray``); None takes the
            transform of the engine's dataset when the run starts.

    Raises:
        ValueError: an unknown `levels` or `geometry`, finding or threshold; when the run starts, a `loader` (or
            dataset transform) without a ``LoadXray`` for ``"source"``, or with `resume` an index of an older
            version (without the DICOM UID and geometry columns, :func:`hmn.explain.check_index`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        class_names: Sequence[str],
        enabled: Any = False,
        findings: str | Sequence[str] = "all",
        thresholds: Any = 0.5,
        levels: str = "finest",
        pred_key: str = "pred",
        image_key: str = "image",
        error_key: str = "error",
        num_classes: int | None = None,
        batch_size: int = 8,
        resume: bool = False,
        apply_sigmoid: bool = True,
        geometry: str = "input",
        loader: Any = None,
    ) -> None:
        from hmn.explain import GRADCAM_LEVELS, HEATMAP_GEOMETRIES, resolve_findings, resolve_thresholds
        from hmn.workflows.devices import as_bool

        self.enabled = as_bool(enabled, "heatmaps")
        self.reader = _PredictionReader(class_names, pred_key, apply_sigmoid, num_classes)
        self.class_names = self.reader.class_names
        self.output_dir = os.fspath(output_dir)
        self.network = getattr(network, "module", network)
        self.image_key, self.error_key = image_key, error_key
        if levels not in GRADCAM_LEVELS:
            raise ValueError(f"heatmap levels must be one of {GRADCAM_LEVELS}, got {levels!r}")
        self.levels, self.batch_size, self.resume = levels, int(batch_size), as_bool(resume, "resume")
        self.findings = resolve_findings(findings, self.class_names)
        self.thresholds = resolve_thresholds(thresholds, self.class_names)
        if geometry not in HEATMAP_GEOMETRIES:
            raise ValueError(f"heatmap geometry must be one of {HEATMAP_GEOMETRIES}, got {geometry!r}")
        self.geometry, self.loader = geometry, loader
        self.source = None  # the hmn.explain.SourceGeometry of "source", built when the run starts
        self.files_written = 0
        self._seen = 0

    @property
    def index_file(self) -> str:
        return rank_file(os.path.join(self.output_dir, "heatmaps.csv"))

    def attach(self, engine: Any) -> None:
        """Registers the handler on `engine` (STARTED: start the index, ITERATION_COMPLETED: write); nothing when
        not `enabled`."""
        if not self.enabled:
            return
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def start(self, engine: Any = None) -> None:
        """Starts the index afresh unless `resume` (the files of an earlier run stay until overwritten); with
        `resume`, first refuses an index of an older version (this rank's and the merged one of a torchrun run,
        which the end of the run merges into), before anything is computed. For ``"source"``, finds the loader."""
        from hmn.explain import check_index
        from hmn.inference import run_outputs

        if self.geometry == "source":
            self._source_geometry(engine)
        if self.resume:
            merged = os.path.join(self.output_dir, "heatmaps.csv")
            for path in dict.fromkeys([self.index_file, merged, *run_outputs(merged)[1:]]):
                check_index(path)
        os.makedirs(self.output_dir, exist_ok=True)
        if not self.resume and os.path.exists(self.index_file):
            os.remove(self.index_file)
        self.files_written, self._seen = 0, 0
        logger.info("heatmaps of %s at or above %s into %s (%s geometry)",
                    ", ".join(self.class_names[k] for k in self.findings),
                    ", ".join(f"{self.thresholds[k]:.3g}" for k in self.findings), self.output_dir, self.geometry)

    def _source_geometry(self, engine: Any) -> Any:
        """The :class:`hmn.explain.SourceGeometry` of `loader`, or of the engine's dataset's transform."""
        from hmn.explain import SourceGeometry

        if self.source is None:
            loader = self.loader
            if loader is None:
                loader = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "transform", None)
            self.source = SourceGeometry(loader)
        return self.source

    def write(self, engine: Any) -> None:
        """Computes and writes the current iteration's heatmaps, then appends their index rows."""
        from hmn.explain import append_index, gradcam_pairs, maps_to_source, write_heatmaps

        device = next(self.network.parameters()).device
        images, paths, probs, pairs, uids = [], [], [], [], []
        for batch_item, output_item in _iteration_items(engine):
            items = (batch_item, output_item)
            path = _image_path(items, self.image_key, f"item_{self._seen}")
            self._seen += 1
            if _text(items, self.error_key):
                continue
            p = self.reader.probabilities(output_item, path)
            chosen = [k for k in self.findings if p[k] >= self.thresholds[k]]
            if not chosen:
                continue
            x = next(item[self.image_key] for item in (output_item, batch_item)
                     if item is not None and isinstance(item.get(self.image_key), torch.Tensor))
            x = x.as_tensor() if isinstance(x, MetaTensor) else x
            pairs += [(len(images), k) for k in chosen]
            images.append(x.detach().to(device, torch.float32))
            paths.append(path)
            probs.append(p)
            uids.append(_image_meta(items, self.image_key, DICOM_UID_COLUMNS))
        if not pairs:
            return
        x = torch.stack(images)
        maps = gradcam_pairs(self.network, x, [i for i, _ in pairs], [k for _, k in pairs], self.levels,
                             self.batch_size).cpu()
        source = self._source_geometry(engine) if self.geometry == "source" else None
        rows = []
        for i, path in enumerate(paths):
            sel = [j for j, (img, _) in enumerate(pairs) if img == i]
            ks = [pairs[j][1] for j in sel]
            picture, image_maps = x[i].cpu().numpy(), maps[sel].numpy()
            if self.geometry == "source":
                # the file read again at its own size; a file gone since it was predicted stops the run here,
                # before its CSV row, so a resumed run tries it again
                picture, scale, offset = source.load(path, x.shape[2:])
                image_maps = maps_to_source(image_maps, picture.shape[1:], scale, offset)
            rows += write_heatmaps(self.output_dir, path, picture, image_maps, [self.class_names[k] for k in ks],
                                   probs[i][ks], self.thresholds[ks], uids=uids[i], geometry=self.geometry)
        append_index(self.index_file, rows)
        self.files_written += 2 * len(rows)

    def finish(self, engine: Any = None) -> None:
        """Logs how many heatmaps were written; with `resume`, leaves one index row per image and finding
        (an image explained again after a stop has a row from each run; the newer is kept)."""
        if self.resume and os.path.exists(self.index_file):
            from hmn.inference import merge_csv_files

            merge_csv_files(self.index_file, [self.index_file], ("image", "finding"), error_column=None)
        logger.info("%d heatmaps (PNG and .npy) written to %s, listed in %s", self.files_written // 2,
                    self.output_dir, self.index_file)
