"""The MONAI Deploy application: DICOM studies in, one DICOM Structured Report per study out.

``python -m hmn.deploy -i INPUT -o OUTPUT -m MODEL`` (MONAI Deploy App SDK's ``-i/-o/-m`` convention) runs a
Holoscan application of four operators:

1. ``DICOMDataLoaderOperator`` (the SDK's): every DICOM file under INPUT, grouped into studies and series;
2. ``DICOMSeriesSelectorOperator`` (the SDK's): the series to classify, by :data:`XRAY_SELECTION_RULES`
   (projection radiographs: Modality CR, DX or DR) unless ``--rules`` gives others (the SDK's JSON rules);
3. :class:`XrayInferenceOperator`, the SDK's ``MonaiBundleInferenceOperator`` (its bundle parsing, model
   loading, ``preprocessing``/``inferer``/``postprocessing`` of the bundle's ``configs/inference.json``) run over
   every instance of every selected series, each image read by the project's DICOM reader
   (:class:`hmn.transforms.LoadXray`: Modality LUT, VOI window or LUT, MONOCHROME1 inverted, one-image series),
   which the SDK's ``DICOMSeriesToVolumeOperator`` does not do for radiographs (it applies no VOI, does not invert
   MONOCHROME1 and gives a one-image series no affine);
4. :class:`StructuredReportOperator`: one TID 1500 Measurement Report per study into OUTPUT
   (:func:`hmn.deploy.sr.write_study_reports`).

MODEL is a packed bundle zip (``python -m hmn pack-bundle``; extracted safely into a temporary folder), a bundle
folder, or a ``model.ts`` whose embedded configs (``configs/inference.json``, ``configs/metadata.json``, as
``pack-bundle`` and MONAI's ``ckpt_export`` write them) the SDK reads. Without ``-m`` the SDK's
``HOLOSCAN_MODEL_PATH`` is used, as inside a MONAI Application Package.

Why the stock bundle operator is subclassed: it classifies one image per run of the application graph, while a
study may hold several radiographs (PA and lateral) and an input folder several studies; the subclass calls its
pre-processing, prediction and post-processing for each image in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from monai.deploy.core import AppContext, Application, ConditionType, Fragment, Image, Operator, OperatorSpec

from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
    _load_model_from_directory_bundle,
)

__all__ = ["XRAY_SELECTION_RULES", "HybridMedNetDeployApp", "StructuredReportOperator", "XrayInferenceOperator",
           "main", "resolve_model"]

logger = logging.getLogger(__name__)

# the SDK's series selection rules (JSON): projection radiographs
XRAY_SELECTION_RULES = json.dumps(
    {"selections": [{"name": "Projection radiograph", "conditions": {"Modality": "(?i)^(CR|DX|DR)$"}}]}
)


def resolve_model(model: str | os.PathLike, work_dir: str | os.PathLike) -> Path:
    """The bundle path the inference operator reads: a bundle folder or ``model.ts`` as given, a packed bundle
    zip extracted under `work_dir` (:func:`hmn.bundle.extract_bundle_zip`: no entry written outside it, sizes
    checked).

    Raises:
        FileNotFoundError: `model` does not exist.
        ValueError: a folder without ``configs/inference.json``, a file that is neither a zip nor TorchScript, or a
            ``torch.save`` checkpoint (``model.pt``: the network cannot be rebuilt without the bundle's configs).
    """
    import zipfile

    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"-m {model}: no such file or folder; give a packed bundle zip, a bundle folder or "
                                "a model.ts")
    if path.is_dir():
        if not (path / "configs" / "inference.json").is_file():
            raise ValueError(f"-m {path}: a folder must be a bundle (configs/inference.json not found)")
        return path
    if not zipfile.is_zipfile(path):
        raise ValueError(f"-m {path}: neither a zip (packed bundle, TorchScript) nor a folder")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and not any(
            n.endswith("configs/inference.json") and "/extra/" not in n for n in names):
        if not any("/code/" in n or n.startswith("code/") for n in names):
            raise ValueError(f"-m {path}: a PyTorch checkpoint (torch.save), not TorchScript; give the packed bundle "
                             "zip (python -m hmn pack-bundle), its folder, or its models/model.ts")
        return path  # TorchScript (its configs are extra files)
    from hmn.bundle import extract_bundle_zip

    tops = {n.split("/", 1)[0] for n in names if n.strip("/")}
    if len(tops) != 1:
        raise ValueError(f"-m {path}: a packed bundle zip holds one bundle folder; this one has {sorted(tops)[:5]}")
    return Path(extract_bundle_zip(path, work_dir, tops.pop()))


def _one_image(path: str, loader: Any) -> Image:
    """The SDK Image of one DICOM file as :class:`hmn.transforms.LoadXray` reads it (``(C, rows, columns)``, its
    meta with ``spacing`` and ``original_affine``, so the bundle operator hands it on unchanged)."""
    import numpy as np

    image = loader(path)
    meta = {k: v for k, v in image.meta.items()}
    meta["affine"] = np.asarray(image.affine)
    meta["original_affine"] = np.asarray(meta["original_affine"])
    return Image(image.as_tensor().numpy(), metadata=meta)


class XrayInferenceOperator(MonaiBundleInferenceOperator):
    """MONAI Deploy's ``MonaiBundleInferenceOperator`` over every image of the selected series.

    Input ``study_selected_series_list`` (``DICOMSeriesSelectorOperator``'s); output ``predictions``: a list of
    ``{"path", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "probabilities"}`` (one float in [0, 1]
    per class, the bundle's postprocessing output) per image, and ``errors`` for the files that could not be read
    (each ``{"path", "error"}``; a bad file is logged by name and the others go on).

    Args:
        fragment: the application.
        app_context: the SDK's application context (model path).
        bundle_path: the bundle folder or ``model.ts`` (:func:`resolve_model`).
    """

    def __init__(self, fragment: Fragment, *args: Any, app_context: AppContext, bundle_path: str | os.PathLike,
                 **kwargs: Any) -> None:
        super().__init__(
            fragment, *args, app_context=app_context, bundle_path=bundle_path,
            input_mapping=[IOMapping("image", Image, _in_memory())],
            output_mapping=[IOMapping("pred", dict, _in_memory())],
            bundle_config_names=BundleConfigNames(config_names=["inference"]), **kwargs,
        )

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("predictions").condition(ConditionType.NONE)

    def _ensure_model(self) -> None:
        import torch

        if self._model_network is not None:
            return
        if not self._init_completed:
            self._init_config(self._bundle_config_names.config_names)
            self._init_completed = True
        if not hasattr(self, "_device"):
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.bundle_path.is_dir():
            self._model_network = _load_model_from_directory_bundle(self.bundle_path, self._device, self._parser)
        else:
            self._model_network = torch.jit.load(str(self.bundle_path), map_location=self._device).eval()

    def classify(self, image: Image) -> list[float]:
        """The bundle's probabilities for one image, by the stock operator's steps (its conversion of the SDK
        Image, ``pre_process``, ``predict``, ``post_process``)."""
        import torch
        from monai.data import MetaTensor
        from monai.utils import convert_to_dst_type

        value, meta = self._convert_from_image(image)
        value = convert_to_dst_type(value, dst=value)[0]
        value = MetaTensor.ensure_torch_and_prune_meta(value, dict(meta or {}))
        with torch.no_grad():
            inputs = self.pre_process({"image": value})
            first = inputs.pop("image")
            outputs = self.predict(data=first[None].to(self._device))
            inputs["image"] = first
            out = self.post_process(outputs, preprocessed_inputs=inputs)
        pred = out["pred"] if isinstance(out, dict) else out
        return [float(v) for v in torch.as_tensor(pred).reshape(-1).cpu()]

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from hmn.transforms import ImageReadError, LoadXray

        selections = op_input.receive("study_selected_series_list") or []
        self._ensure_model()
        voi = self._parser.get_parsed_content("voi") if self._parser.get("voi") is not None else "apply"
        loader = LoadXray(voi=voi, dicom_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        predictions, errors, seen = [], [], set()
        for selection in selections:
            for selected in selection.selected_series:
                for instance in selected.series.get_sop_instances():
                    ds = instance.get_native_sop_instance()
                    path = str(getattr(ds, "filename", "") or "")
                    uid = str(ds.get("SOPInstanceUID", ""))
                    if not path or uid in seen:
                        continue
                    seen.add(uid)
                    try:
                        probs = self.classify(_one_image(path, loader))
                    except ImageReadError as e:
                        logger.error("%s", e)
                        errors.append({"path": path, "error": str(e)})
                        continue
                    predictions.append({"path": path, "StudyInstanceUID": str(ds.get("StudyInstanceUID", "")),
                                        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "")),
                                        "SOPInstanceUID": uid, "probabilities": probs})
        logger.info("%d image(s) classified, %d could not be read", len(predictions), len(errors))
        op_output.emit({"predictions": predictions, "errors": errors}, "predictions")


def _in_memory() -> Any:
    from monai.deploy.core import IOType

    return IOType.IN_MEMORY


class StructuredReportOperator(Operator):
    """Writes one DICOM Structured Report per study (:func:`hmn.deploy.sr.write_study_reports`) of
    :class:`XrayInferenceOperator`'s ``predictions`` into `output_folder`.

    Args:
        fragment: the application.
        output_folder: the folder of the SRs (created).
        class_names: the classes, in the order of the probabilities.
        algorithm_name, algorithm_version: the model's identification in the SRs.
    """

    def __init__(self, fragment: Fragment, *args: Any, output_folder: str | os.PathLike, class_names: list[str],
                 algorithm_name: str, algorithm_version: str, **kwargs: Any) -> None:
        self.output_folder = Path(output_folder)
        self.class_names = list(class_names)
        self.algorithm_name, self.algorithm_version = algorithm_name, algorithm_version
        self.written: list[str] = []
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("predictions")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from hmn.deploy.sr import write_study_reports

        result = op_input.receive("predictions")
        items = [(p["path"], p["probabilities"]) for p in result["predictions"]]
        self.written = write_study_reports(items, self.output_folder, self.class_names,
                                           algorithm_name=self.algorithm_name,
                                           algorithm_version=self.algorithm_version, skip_bad_studies=True)
        logger.info("%d DICOM Structured Report(s) written to %s", len(self.written), self.output_folder)


def _bundle_info(bundle_path: Path) -> tuple[list[str], str, str]:
    """(class names, name, version) of the bundle at `bundle_path` (folder or model.ts)."""
    from monai.deploy.operators.monai_bundle_inference_operator import get_bundle_config

    parser = get_bundle_config(str(bundle_path), ["inference"])
    meta = parser.get("_meta_") or {}
    classes = parser.get_parsed_content("class_names")
    return [str(c) for c in classes], str(meta.get("name") or bundle_path.stem), str(meta.get("version") or "0")


class HybridMedNetDeployApp(Application):
    """The application of the module docstring.

    Args:
        input_folder, output_folder: the DICOM folder read and the SR folder written.
        bundle_path: the bundle folder or model.ts (:func:`resolve_model`).
        rules: the SDK's series selection rules (JSON), default :data:`XRAY_SELECTION_RULES`.
    """

    def __init__(self, input_folder: str | os.PathLike, output_folder: str | os.PathLike, bundle_path: Path,
                 rules: str = XRAY_SELECTION_RULES) -> None:
        self.input_folder, self.output_folder = Path(input_folder), Path(output_folder)
        self.bundle_path, self.rules = Path(bundle_path), rules
        self.report_operator: StructuredReportOperator | None = None
        super().__init__()

    def compose(self) -> None:
        from holoscan.conditions import CountCondition

        # the SDK's argument parsing sees only the input and output folders: the model is this class's choice
        app_context = Application.init_app_context(["hmn.deploy", "-i", str(self.input_folder),
                                                    "-o", str(self.output_folder)])
        classes, name, version = _bundle_info(self.bundle_path)
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=self.input_folder,
                                         name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=self.rules, all_matched=True, name="series_selector")
        inference = XrayInferenceOperator(self, app_context=app_context, bundle_path=self.bundle_path,
                                          name="bundle_inference")
        report = StructuredReportOperator(self, output_folder=self.output_folder, class_names=classes,
                                          algorithm_name=name, algorithm_version=version, name="sr_writer")
        self.report_operator = report
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, inference, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(inference, report, {("predictions", "predictions")})


def main(argv: list[str] | None = None) -> int:
    """``python -m hmn.deploy -i INPUT -o OUTPUT -m MODEL [--rules JSON]``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m hmn.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("-i", "--input", default=os.environ.get("HOLOSCAN_INPUT_PATH", "input"),
                        help="folder of DICOM files (default: $HOLOSCAN_INPUT_PATH or ./input)")
    parser.add_argument("-o", "--output", default=os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"),
                        help="folder for the Structured Reports (default: $HOLOSCAN_OUTPUT_PATH or ./output)")
    parser.add_argument("-m", "--model", default=os.environ.get("HOLOSCAN_MODEL_PATH", "models"),
                        help="packed bundle zip, bundle folder or model.ts (default: $HOLOSCAN_MODEL_PATH or ./models)")
    parser.add_argument("--rules", default=XRAY_SELECTION_RULES,
                        help="the SDK's series selection rules as JSON (default: Modality CR, DX or DR)")
    parser.add_argument("-l", "--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # highdicom logs every module it copies per report at INFO
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
    if not Path(args.input).is_dir():
        parser.error(f"-i {args.input}: no such folder")
    os.makedirs(args.output, exist_ok=True)
    work = tempfile.mkdtemp(prefix="hmn-deploy-")
    try:
        bundle = resolve_model(args.model, work)
        app = HybridMedNetDeployApp(args.input, args.output, bundle, rules=args.rules)
        app.run()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0
