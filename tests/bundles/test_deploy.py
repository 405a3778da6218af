"""DICOM in, DICOM out with a packed bundle: MONAI Deploy's stock ``MonaiBundleInferenceOperator`` on an in-memory
image, the ``python -m hmn.deploy`` application (bundle zip and ``model.ts``), and ``inference --dicom_sr``;
every probability checked against the project's own inference (``configs/inference.json``) of the same file.

The tests that run the SDK skip (saying why) where ``monai-deploy-app-sdk`` is not installed
(``pip install -e ".[deploy]"``); the ``--dicom_sr`` test needs only highdicom.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_SDK = importlib.util.find_spec("monai.deploy") is None or importlib.util.find_spec("holoscan") is None
needs_sdk = pytest.mark.skipif(NO_SDK, reason="monai-deploy-app-sdk is not installed (pip install -e \".[deploy]\")")
pytest.importorskip("highdicom", reason="highdicom is not installed (pip install -e \".[deploy]\")")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}

# the stock operator in a three-operator Holoscan application: an emitter of one SDK Image laid out as the SDK's
# DICOMSeriesToVolumeOperator gives it (modality values, depth first, its spacing and affine keys), the bundle
# operator exactly as MONAI Deploy ships it, and a sink that prints what the operator emitted
STOCK_APP = r'''
import json, sys
import numpy as np, pydicom
from monai.deploy.core import Application, Image, IOType, Operator
from monai.deploy.operators.monai_bundle_inference_operator import BundleConfigNames, IOMapping, MonaiBundleInferenceOperator
from holoscan.conditions import CountCondition

bundle, dcm, work = sys.argv[1], sys.argv[2], sys.argv[3]
got = []

def sdk_image(path):
    ds = pydicom.dcmread(path)
    px = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    r, c = (float(v) for v in ds.get("PixelSpacing", [1, 1]))
    affine = np.diag([r, c, 1.0, 1.0])
    return Image(px[None], metadata={"row_pixel_spacing": r, "col_pixel_spacing": c, "depth_pixel_spacing": 1.0,
                                     "nifti_affine_transform": affine, "dicom_affine_transform": affine})

class Source(Operator):
    def setup(self, spec):
        spec.output("image")
    def compute(self, op_input, op_output, context):
        op_output.emit(sdk_image(dcm), "image")

class Sink(Operator):
    def setup(self, spec):
        spec.input("pred")
    def compute(self, op_input, op_output, context):
        got.append(np.asarray(op_input.receive("pred")).reshape(-1).tolist())

class App(Application):
    def compose(self):
        context = Application.init_app_context(["stock", "-i", work, "-o", work])
        source = Source(self, CountCondition(self, 1), name="source")
        bundle_op = MonaiBundleInferenceOperator(
            self, app_context=context, bundle_path=bundle, name="bundle",
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", np.ndarray, IOType.IN_MEMORY)],
            bundle_config_names=BundleConfigNames(config_names=["inference"]))
        sink = Sink(self, name="sink")
        self.add_flow(source, bundle_op, {("image", "image")})
        self.add_flow(bundle_op, sink, {("pred", "pred")})

App().run()
print("PROBABILITIES " + json.dumps(got))
'''


def _run(cmd, cwd=ROOT, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def packed(trained, tmp_path_factory):
    """The session's trained convnext_tiny packed as ``python -m hmn pack-bundle`` packs it (in this process), and
    extracted."""
    from hmn.bundle import pack_bundle

    work = tmp_path_factory.mktemp("packed")
    zip_path = Path(pack_bundle("convnext_tiny", work / "convnext_tiny.zip", Path(trained) / "models", ROOT / "bundles"))
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(work)
    return zip_path, work / "convnext_tiny"


@pytest.fixture(scope="module")
def dicoms(demo_datalist, tmp_path_factory):
    """Three MONOCHROME1 and three MONOCHROME2 demo radiographs, each its own study, in one folder."""
    import pydicom

    folder = tmp_path_factory.mktemp("dicom_in")
    files = sorted(glob.glob(os.path.join(os.path.dirname(demo_datalist), "images", "*.dcm")))
    picked = {"MONOCHROME1": [], "MONOCHROME2": []}
    for f in files:
        pi = str(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation)
        if len(picked[pi]) < 3:
            picked[pi].append(f)
    assert all(len(v) == 3 for v in picked.values()), picked
    for f in picked["MONOCHROME1"] + picked["MONOCHROME2"]:
        shutil.copy(f, folder / os.path.basename(f))
    return folder


@pytest.fixture(scope="module")
def reference(packed, dicoms):
    """The project's own inference (``configs/inference.json`` of the packed bundle) of the DICOM folder:
    ``{SOPInstanceUID: (path, {class: probability})}``."""
    import hmn.api

    rows = hmn.api.predict(packed[1], dicoms, output_file=str(dicoms.parent / "reference.csv"), num_workers=0)
    classes = json.loads((packed[1] / "models" / "run.json").read_text())["settings"]["class_names"]
    assert len(rows) == 6 and all(r["error"] == "" and r["SOPInstanceUID"] for r in rows)
    return {r["SOPInstanceUID"]: (r["image"], {c: r[c] for c in classes}) for r in rows}


def _sr_probabilities(path) -> dict[str, dict[str, float]]:
    """``{referenced SOPInstanceUID: {finding code meaning or value: probability}}`` of a TID 1500 SR, read by walking
    its content tree with pydicom (measurement groups (125007, DCM), their finding (121071, DCM), the NUM item
    and the image it references)."""
    import pydicom

    ds = pydicom.dcmread(path)
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    out: dict[str, dict[str, float]] = {}

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER" and name is not None and name.CodeValue == "125007":
                children = item.ContentSequence
                finding = next(c.ConceptCodeSequence[0] for c in children if c.ValueType == "CODE"
                               and c.ConceptNameCodeSequence[0].CodeValue == "121071")
                value = next(float(c.MeasuredValueSequence[0].NumericValue) for c in children if c.ValueType == "NUM")
                sop = next(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in children
                           if c.ValueType == "IMAGE")
                out.setdefault(str(sop), {})[(str(finding.CodingSchemeDesignator), str(finding.CodeValue))] = value
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _check_reports(folder, reference, sources):
    """One SR per source study, each holding every class's probability of its image within 1e-4 of the
    reference, coded as :func:`hmn.deploy.sr.finding_code` codes it, in the source's study."""
    import pydicom

    from hmn.deploy.sr import finding_code

    reports = sorted(Path(folder).glob("*.dcm"))
    assert len(reports) == len(sources) == 6
    seen = set()
    for path in reports:
        ds = pydicom.dcmread(path)
        probs = _sr_probabilities(path)
        assert len(probs) == 1
        sop, values = next(iter(probs.items()))
        image, expected = reference[sop]
        src = pydicom.dcmread(image, stop_before_pixels=True)
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        want = {}
        for cls, p in expected.items():
            code = finding_code(cls)
            want[(code.scheme_designator, code.value)] = p
        assert set(values) == set(want)
        for key, p in want.items():
            assert abs(values[key] - p) <= 1e-4, (image, key, values[key], p)
        seen.add(sop)
    assert seen == set(reference)


@needs_sdk
def test_stock_bundle_operator_in_memory_monochrome2(packed, dicoms, reference, tmp_path):
    """MONAI Deploy's MonaiBundleInferenceOperator, unchanged, runs the packed bundle's inference config on an
    in-memory MONOCHROME2 image as the SDK hands it over (modality values, X/Y/Z order, no channel): the
    probabilities it emits are the project's inference of the file, within 1e-4."""
    import pydicom

    mono2 = [(sop, v) for sop, v in reference.items()
             if pydicom.dcmread(v[0], stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME2"]
    sop, (image, expected) = mono2[0]
    script = tmp_path / "stock_app.py"
    script.write_text(STOCK_APP)
    out = _run([sys.executable, script, packed[1], image, tmp_path], cwd=tmp_path)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBABILITIES ")]
    got = json.loads(line[-1].split(" ", 1)[1])
    assert len(got) == 1 and len(got[0]) == len(expected)
    np.testing.assert_allclose(got[0], list(expected.values()), atol=1e-4, rtol=0)
    assert all(0.0 <= p <= 1.0 for p in got[0])


@needs_sdk
@pytest.mark.parametrize("model", ["zip", "model.ts"])
def test_deploy_app_writes_one_sr_per_study(packed, dicoms, reference, tmp_path, model):
    """``python -m hmn.deploy -i DICOMS -o OUT -m MODEL`` over three MONOCHROME1 and three MONOCHROME2 radiographs
    (six studies), MODEL the packed zip or its models/model.ts: one SR per study whose numeric findings are the
    project's inference within 1e-4 (MONOCHROME1 included: the app reads the pixels with the project's reader)."""
    zip_path, folder = packed
    arg = zip_path if model == "zip" else folder / "models" / "model.ts"
    out = tmp_path / "out"
    _run([sys.executable, "-m", "hmn.deploy", "-i", dicoms, "-o", out, "-m", arg], cwd=tmp_path)
    _check_reports(out, reference, list(dicoms.glob("*.dcm")))


def test_inference_dicom_sr(trained, dicoms, tmp_path):
    """``inference --dicom_sr DIR`` (the repository's bundle, the session's trained model): one SR per DICOM study
    holding predictions.csv's probabilities; the CSV's UID columns are the files' own (read here with pydicom); a
    PNG in the folder gets a row with empty UIDs and no SR."""
    import pydicom
    from PIL import Image

    import hmn.api

    mixed = tmp_path / "mixed"
    shutil.copytree(dicoms, mixed)
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)).save(mixed / "plain.png")
    srs = tmp_path / "sr"
    rows = hmn.api.predict(ROOT / "bundles" / "convnext_tiny", mixed, bundle_root=str(trained), num_workers=0,
                           output_file=str(tmp_path / "predictions.csv"), dicom_sr=str(srs))
    assert len(rows) == 7 and all(r["error"] == "" for r in rows)
    classes = json.loads((Path(trained) / "models" / "run.json").read_text())["settings"]["class_names"]
    expected = {}
    for r in rows:
        if r["image"].endswith(".png"):
            assert r["StudyInstanceUID"] == r["SeriesInstanceUID"] == r["SOPInstanceUID"] == ""
            continue
        ds = pydicom.dcmread(r["image"], stop_before_pixels=True)
        assert (r["StudyInstanceUID"], r["SeriesInstanceUID"], r["SOPInstanceUID"]) == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        expected[r["SOPInstanceUID"]] = (r["image"], {c: r[c] for c in classes})
    _check_reports(srs, expected, list(dicoms.glob("*.dcm")))


@needs_sdk
def test_a_checkpoint_is_not_taken_for_a_model(tmp_path):
    """``-m model.pt`` (a torch.save zip, like TorchScript holding data.pkl) is refused naming the file and what is
    accepted, not handed to the SDK as TorchScript."""
    import torch

    from hmn.deploy.app import resolve_model

    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)
    with pytest.raises(ValueError, match=r"model\.pt: a PyTorch checkpoint .* models/model\.ts"):
        resolve_model(ckpt, tmp_path / "work")
    scripted = tmp_path / "model.ts"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    assert resolve_model(scripted, tmp_path / "work") == scripted.resolve()
