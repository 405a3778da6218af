"""The synthetic 3D demo dataset: labels, splits, determinism, caching, NIfTI/DICOM agreement, no histogram shortcut."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pydicom
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import hmn.data.demo3d as demo3d
from hmn.data import DEMO3D_CLASSES, load_datalist, make_demo3d_dataset, patient_overlap, render_demo_volume
from hmn.transforms import LoadXray, LoadXrayd

_SMALL = {"size": (40, 36, 20), "spacing": (1.5, 1.2, 3.0)}  # X != Y in voxels and in mm: a transposition shows


def _manifest(datalist_path: str) -> dict[str, dict]:
    with open(os.path.join(os.path.dirname(datalist_path), "manifest.csv")) as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def _all(d: dict) -> list[dict]:
    return d["training"] + d["validation"] + d["test"]


@pytest.fixture(scope="module")
def default3d(tmp_path_factory) -> str:
    """The 3D demo dataset at its default size and count (generated once for this module)."""
    return make_demo3d_dataset(tmp_path_factory.mktemp("demo3d_default"))


@pytest.fixture(scope="module")
def loaded_default(default3d) -> dict[str, np.ndarray]:
    """Every default volume as LoadXray reads it in HU (NIfTI as stored, DICOM series with voi='ignore')."""
    load = LoadXray(voi="ignore")
    return {e["image"]: load(e["image"]).numpy()[0] for e in _all(load_datalist(default3d))}


def _histograms(entries, loaded, bins: int) -> tuple[np.ndarray, np.ndarray]:
    feats = [np.histogram(loaded[e["image"]], bins=bins, range=(-1100.0, 1500.0))[0] for e in entries]
    return np.asarray([f / f.sum() for f in feats]), np.asarray([e["label"] for e in entries])


@pytest.mark.parametrize("bins", [32, 64])
def test_no_histogram_shortcut(default3d, loaded_default, bins):
    """A logistic regression on each volume's global HU histogram stays below 0.70 macro AUROC on the test split."""
    d = load_datalist(default3d)
    x_tr, y_tr = _histograms(d["training"] + d["validation"], loaded_default, bins)
    x_te, y_te = _histograms(d["test"], loaded_default, bins)
    aucs = []
    for c in range(len(DEMO3D_CLASSES)):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(x_tr, y_tr[:, c])
        aucs.append(roc_auc_score(y_te[:, c], model.predict_proba(x_te)[:, 1]))
    assert np.mean(aucs) < 0.70, dict(zip(DEMO3D_CLASSES, np.round(aucs, 3)))


def test_default_dataset_contents(default3d, loaded_default):
    raw = json.loads(open(default3d).read())
    assert raw["class_names"] == list(DEMO3D_CLASSES) == ["Calcification", "Hepatomegaly", "Hyperdense lesion",
                                                          "Hypodense lesion"]
    assert raw["source"] == "hmn-demo3d-synthetic" and "SYNTHETIC" in raw["description"]
    cfg = json.loads(open(os.path.join(os.path.dirname(default3d), "demo_config.json")).read())
    assert cfg["size"] == [64, 64, 32] and cfg["spacing"] == [1.5, 1.5, 3.0] and cfg["n_volumes"] == 600
    d = load_datalist(default3d)  # every file and folder exists
    entries = _all(d)
    assert len(entries) == 600
    assert patient_overlap(d) == {}  # patient-wise splits
    split_of = {}
    for s in ("training", "validation", "test"):
        assert abs(len(d[s]) / 600 - {"training": 0.7, "validation": 0.15, "test": 0.15}[s]) < 0.03
        for e in d[s]:
            assert split_of.setdefault(e["patient_id"], s) == s
    counts = np.unique([e["patient_id"] for e in entries], return_counts=True)[1]
    assert counts.min() == 1 and counts.max() == 3
    labels = np.array([e["label"] for e in entries])
    assert np.all(labels.mean(0) > 0.15) and np.all(labels.mean(0) < 0.45)
    assert 0.15 < (labels.sum(1) == 0).mean() < 0.45 and (labels.sum(1) >= 2).any()
    for s in ("validation", "test"):  # every class has positives and negatives where AUROC is measured
        y = np.array([e["label"] for e in d[s]])
        assert np.all(y.sum(0) >= 15) and np.all(y.sum(0) <= len(y) - 15)
    manifest = _manifest(default3d)
    formats = [row["format"] for row in manifest.values()]
    assert set(formats) == {"nifti", "dicom_series"} and formats.count("dicom_series") == 60
    for e in entries:
        vol = loaded_default[e["image"]]
        assert vol.shape == (64, 64, 32)
        assert vol.min() >= -1024 and np.percentile(vol, 1) < -900 and vol.max() > 300  # air, and bone
    assert all(os.path.isdir(e["image"]) != e["image"].endswith(".nii.gz") for e in entries)


def test_labels_follow_what_was_drawn(default3d):
    """The manifest, the masks of the render and the rule organ index > 0.5 all agree with every label."""
    d = load_datalist(default3d)
    manifest = _manifest(default3d)
    base = os.path.dirname(default3d)
    index = []
    for e in _all(d):
        row = manifest[os.path.relpath(e["image"], base).replace(os.sep, "/")]
        lab = dict(zip(DEMO3D_CLASSES, e["label"]))
        index.append(float(row["organ_index"]))
        assert lab["Hepatomegaly"] == int(float(row["organ_index"]) > demo3d.HEPATOMEGALY_THRESHOLD)
        for name in ("Calcification", "Hyperdense lesion", "Hypodense lesion"):
            assert lab[name] == int(bool(row[demo3d.DETAIL_KEYS[name]])), (row["image"], name)
    index = np.array(index)
    assert len(np.unique(np.round(index, 3))) > 100  # a continuous spread over the patients, not two values
    assert not np.any((index > 0.46) & (index < 0.54))  # a gap around the threshold

    # render a few volumes again: the masks are non-empty exactly for the positive lesion classes, lie in the
    # organ, and the organ index measured on the masks gives the Hepatomegaly label
    voxel = 1.5 * 1.5 * 3.0
    checked = 0
    load = LoadXray(voi="ignore")
    for e in _all(d)[:40]:
        p, k = demo3d.parse_volume_name(e["image"])
        vol, label, masks = render_demo_volume(0, p, k)
        assert label == e["label"]
        assert np.array_equal(load(e["image"]).numpy()[0], vol)  # the file holds exactly the rendered volume
        organ = masks["organ"]
        for name in ("Calcification", "Hyperdense lesion", "Hypodense lesion"):
            m = masks[name]
            assert m.dtype == bool and m.shape == vol.shape
            assert m.any() == bool(label[DEMO3D_CLASSES.index(name)]), (e["image"], name)
            assert organ[m].all()
            if name == "Hypodense lesion" and m.any():
                assert np.median(vol[m]) < np.median(vol[organ & ~m]) - 20
            if name != "Hypodense lesion" and m.any():
                assert np.median(vol[m]) > np.median(vol[organ & ~m]) + 20
        lesions = masks["Hyperdense lesion"] | masks["Hypodense lesion"]
        assert lesions.sum() < 0.2 * organ.sum()  # lesions are small relative to the organ
        organ_r = np.cbrt(3.0 * organ.sum() * voxel / (4.0 * np.pi))
        body_r = np.sqrt(masks["body"][:, :, 16].sum() * 1.5 * 1.5 / np.pi)
        measured = organ_r / body_r
        row = manifest[os.path.relpath(e["image"], os.path.dirname(default3d)).replace(os.sep, "/")]
        assert abs(measured - float(row["organ_index"])) < 0.03, (e["image"], measured, row["organ_index"])
        assert int(measured > 0.5) == label[DEMO3D_CLASSES.index("Hepatomegaly")]
        checked += 1
    assert checked == 40


def test_nifti_and_dicom_copies_load_identically(tmp_path):
    """One volume written both ways loads through LoadXrayd to the same HU array, spacing and affine, in the
    documented (X, Y, Z) order; the organ lies on the patient's right and the spine posterior in world space."""
    size, spacing = _SMALL["size"], _SMALL["spacing"]
    vol, _, masks = render_demo_volume(3, 5, 1, **_SMALL)
    assert vol.shape == size and vol.dtype == np.int16
    affine = demo3d.volume_affine(size, spacing)
    demo3d._write_nifti(str(tmp_path / "v.nii.gz"), vol, affine)
    demo3d._write_dicom_series(str(tmp_path / "v"), vol, spacing, "P00005", "P00005_01")
    assert len(os.listdir(tmp_path / "v")) == size[2]

    load = LoadXrayd(keys="image", voi="ignore")
    nii = load({"image": str(tmp_path / "v.nii.gz")})["image"]
    dcm = load({"image": str(tmp_path / "v")})["image"]
    for img, fmt in ((nii, "nifti"), (dcm, "dicom_series")):
        assert img.meta["format"] == fmt
        assert tuple(img.shape) == (1, *size)
        assert np.array_equal(img.numpy()[0], vol.astype(np.float32))
        assert np.allclose(img.meta["spacing"], spacing)
        assert np.allclose(img.affine.numpy(), affine, atol=1e-4)
        # orientation from anatomy: RAS world coordinates of the organ's and the spine's centroids
        world = lambda ijk: (img.affine.numpy() @ np.append(ijk, 1.0))[:3]  # noqa: E731
        organ = world(np.argwhere(masks["organ"]).mean(0))
        column = (img.numpy()[0] > 300).sum(2)  # bone in every slice: the vertebral column, not ribs or spots
        spine = world([*np.unravel_index(np.argmax(column), column.shape), size[2] // 2])
        assert abs(spine[0]) < 5.0 and spine[1] < -5.0  # central and posterior (RAS: +x right, +y anterior)
        assert organ[0] > spine[0] + 2.0 and organ[1] > spine[1]  # the liver-like organ: right of and before it
    assert "Synthetic^Phantom" not in repr(dcm.meta) and "PatientName" not in dcm.meta

    # the headers, read with pydicom and nibabel themselves
    import nibabel as nib

    hdr = nib.load(str(tmp_path / "v.nii.gz")).header
    assert hdr.get_data_dtype() == np.int16 and np.allclose(hdr.get_zooms(), spacing)
    assert int(hdr["qform_code"]) == int(hdr["sform_code"]) == 1 and hdr.get_xyzt_units()[0] == "mm"
    slices = sorted((pydicom.dcmread(str(tmp_path / "v" / n)) for n in os.listdir(tmp_path / "v")),
                    key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = slices[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
    assert [float(v) for v in first.PixelSpacing] == [spacing[1], spacing[0]]  # row spacing (Y), column spacing (X)
    assert (first.Rows, first.Columns) == (size[1], size[0]) and float(first.SliceThickness) == spacing[2]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert np.allclose(np.diff([float(ds.ImagePositionPatient[2]) for ds in slices]), spacing[2])
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1 and len({ds.SOPInstanceUID for ds in slices}) == size[2]
    assert float(first.RescaleIntercept) == -1024 and first.RescaleType == "HU"
    k = 7
    assert np.array_equal(slices[k].pixel_array.astype(np.int32) - 1024, vol[:, :, k].T)  # rows along Y


def test_deterministic_cached_and_regenerated(tmp_path):
    args = {"n_volumes": 12, "size": (32, 32, 16), "seed": 3}
    a = make_demo3d_dataset(tmp_path / "a", workers=1, **args)
    b = make_demo3d_dataset(tmp_path / "b", workers=2, **args)  # same files, whatever the worker count
    assert open(a).read() == open(b).read()
    files = sorted(os.path.relpath(os.path.join(r, n), tmp_path / "a" / "volumes")
                   for r, _, names in os.walk(tmp_path / "a" / "volumes") for n in names)
    assert sum(f.endswith(".nii.gz") for f in files) == 10 and sum(f.endswith(".dcm") for f in files) == 2 * 16
    for f in files:
        assert (tmp_path / "a" / "volumes" / f).read_bytes() == (tmp_path / "b" / "volumes" / f).read_bytes(), f
    stamp = {f: os.path.getmtime(tmp_path / "a" / "volumes" / f) for f in files}
    assert make_demo3d_dataset(tmp_path / "a", **args) == a  # reused: nothing rewritten
    assert stamp == {f: os.path.getmtime(tmp_path / "a" / "volumes" / f) for f in files}
    series = next(f for f in files if f.endswith(".dcm"))
    os.remove(tmp_path / "b" / "volumes" / series)  # an incomplete series: regenerated
    make_demo3d_dataset(tmp_path / "b", **args)
    assert (tmp_path / "b" / "volumes" / series).read_bytes() == (tmp_path / "a" / "volumes" / series).read_bytes()
    assert len(os.listdir((tmp_path / "b" / "volumes" / series).parent)) == 16
    c = make_demo3d_dataset(tmp_path / "a", **{**args, "seed": 4})  # other arguments: regenerated
    assert open(c).read() != open(b).read()
    assert json.load(open(tmp_path / "a" / "demo_config.json"))["seed"] == 4


def test_render_is_the_same_with_or_without_masks():
    anatomy = demo3d.PatientAnatomy3D.draw(np.random.default_rng(0), hepatomegaly=True)
    findings = ["Hypodense lesion", "Hyperdense lesion", "Calcification"]
    plain, details = demo3d.render_ct_phantom(anatomy, np.random.default_rng(2), findings=findings)
    masks: dict[str, np.ndarray] = {}
    again, details2 = demo3d.render_ct_phantom(anatomy, np.random.default_rng(2), findings=findings, masks=masks)
    assert np.array_equal(plain, again) and details == details2 and plain.dtype == np.float32
    assert set(masks) == {"body", "organ", *findings} and all(m.shape == (64, 64, 32) for m in masks.values())
    assert anatomy.organ_index > 0.5 and all(details[demo3d.DETAIL_KEYS[f]] for f in findings)
    # the manifest's lesion centres (voxel indices) lie in the masks
    for spot in details["hyperdense_lesions"].split(";"):
        i, j, k = (int(round(float(v))) for v in spot.split("/")[:3])
        assert masks["Hyperdense lesion"][i, j, k]
    assert "SYNTHETIC" in demo3d.__doc__


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"size=\(8, 8, 8\).*>= 16"):
        make_demo3d_dataset(tmp_path, size=(8, 8, 8))
    with pytest.raises(ValueError, match="spacing"):
        make_demo3d_dataset(tmp_path, spacing=(1.5, -1.0, 3.0))
    with pytest.raises(ValueError, match="n_volumes=0"):
        make_demo3d_dataset(tmp_path, n_volumes=0)
    with pytest.raises(ValueError, match="volumes_per_patient"):
        make_demo3d_dataset(tmp_path, volumes_per_patient=(3, 1))
    with pytest.raises(ValueError, match="not drawable"):
        demo3d.render_ct_phantom(demo3d.PatientAnatomy3D.draw(np.random.default_rng(0), False),
                                 np.random.default_rng(0), findings=["Nodule"])
    with pytest.raises(ValueError, match="not a 3D demo volume name"):
        demo3d.parse_volume_name("scan.nii.gz")
    assert not os.listdir(tmp_path)  # nothing written before the arguments were checked


def test_command_line(tmp_path, monkeypatch, capsys):
    from hmn.__main__ import main
    from hmn.data.cli import default_demo3d_root

    monkeypatch.setenv("HMN_CACHE", str(tmp_path / "cache"))
    assert default_demo3d_root() == str(tmp_path / "cache" / "demo3d")
    assert main(["demo3d-data", "--n-volumes", "3", "--size", "24,24,16", "--spacing", "2,2,4"]) == 0
    out = capsys.readouterr().out
    assert "datalist:" in out and os.path.isfile(tmp_path / "cache" / "demo3d" / "datalist.json")
    assert json.load(open(tmp_path / "cache" / "demo3d" / "demo_config.json"))["spacing"] == [2.0, 2.0, 4.0]
    with pytest.raises(SystemExit) as err:
        main(["demo3d-data", "--size", "64,64"])
    assert err.value.code == 2 and "three positive numbers" in capsys.readouterr().err
