"""The synthetic demo dataset: files, labels, determinism, caching and no histogram shortcut."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import hmn.data.demo as demo
from hmn.data import DEMO_CLASSES, load_datalist, make_demo_dataset, patient_overlap
from hmn.transforms import LoadXray


def _manifest(datalist_path: str) -> dict[str, dict]:
    with open(os.path.join(os.path.dirname(datalist_path), "manifest.csv")) as f:
        return {row["image"]: row for row in csv.DictReader(f)}


def _histograms(entries, bins: int, percentile: bool) -> tuple[np.ndarray, np.ndarray]:
    load = LoadXray()
    feats, labels = [], []
    for e in entries:
        x = load(e["image"]).numpy().ravel()
        lo, hi = np.percentile(x, [0.5, 99.5]) if percentile else (x.min(), x.max())
        h, _ = np.histogram(np.clip((x - lo) / (hi - lo), 0, 1), bins=bins, range=(0, 1))
        feats.append(h / h.sum())
        labels.append(e["label"])
    return np.asarray(feats), np.asarray(labels)


@pytest.mark.parametrize("bins,percentile", [(32, False), (64, True)])
def test_no_histogram_shortcut(demo_default, bins, percentile):
    """A logistic regression on each image's global intensity histogram stays below 0.70 macro AUROC."""
    d = load_datalist(demo_default)
    x_tr, y_tr = _histograms(d["training"] + d["validation"], bins, percentile)
    x_te, y_te = _histograms(d["test"], bins, percentile)
    aucs = []
    for c in range(len(DEMO_CLASSES)):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(x_tr, y_tr[:, c])
        aucs.append(roc_auc_score(y_te[:, c], model.predict_proba(x_te)[:, 1]))
    assert np.mean(aucs) < 0.70, dict(zip(DEMO_CLASSES, np.round(aucs, 3)))


def test_default_dataset_contents(demo_default):
    raw = json.loads(open(demo_default).read())
    assert raw["class_names"] == list(DEMO_CLASSES) == ["Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax"]
    assert "SYNTHETIC" in raw["description"]
    d = load_datalist(demo_default)  # every file exists
    entries = d["training"] + d["validation"] + d["test"]
    assert len(entries) == 900
    assert patient_overlap(d) == {}
    for s, target in (("training", 0.7), ("validation", 0.15), ("test", 0.15)):
        assert abs(len(d[s]) / 900 - target) < 0.03
    per_patient = {}
    for e in entries:
        per_patient[e["patient_id"]] = per_patient.get(e["patient_id"], 0) + 1
    assert max(per_patient.values()) > 1 and len(per_patient) < len(entries)
    labels = np.array([e["label"] for e in entries])
    prevalence = labels.mean(0)
    assert np.all(prevalence > 0.1) and np.all(prevalence < 0.4)
    assert 0.2 < (labels.sum(1) == 0).mean() < 0.45  # "No Finding" cases
    assert (labels.sum(1) >= 2).any()  # multi-label
    for s in ("validation", "test"):  # every class has positives and negatives in the evaluation splits
        y = np.array([e["label"] for e in d[s]])
        assert np.all(y.sum(0) > 5) and np.all(y.sum(0) < len(y) - 5)


def test_labels_follow_what_was_drawn(demo_default):
    d = load_datalist(demo_default)
    manifest = _manifest(demo_default)
    base = os.path.dirname(demo_default)
    for e in d["training"] + d["validation"] + d["test"]:
        row = manifest[os.path.relpath(e["image"], base)]
        lab = dict(zip(DEMO_CLASSES, e["label"]))
        assert lab["Cardiomegaly"] == int(float(row["ctr"]) > 0.5)  # the cardiothoracic ratio rule
        assert lab["Nodule"] == int(bool(row.get("nodules")))
        assert lab["Mass"] == int(bool(row.get("mass")))
        assert lab["Effusion"] == int(bool(row.get("effusion_sides")))
        assert lab["Pneumothorax"] == int(bool(row.get("pneumothorax")))
    ctr = np.array([float(r["ctr"]) for r in manifest.values()])
    assert len(np.unique(np.round(ctr, 3))) > 100  # a continuous spread, not two values


def test_file_formats_mix(demo_default):
    manifest = _manifest(demo_default)
    base = os.path.dirname(demo_default)
    formats = {r["format"] for r in manifest.values()}
    assert formats == {"dicom_mono1", "dicom_mono2", "png16", "png8"}
    bits, rescaled = set(), False
    for rel, row in list(manifest.items())[:80]:
        path = os.path.join(base, rel)
        if row["format"].startswith("dicom"):
            ds = pydicom.dcmread(path)
            assert ds.PhotometricInterpretation == ("MONOCHROME1" if row["format"] == "dicom_mono1" else "MONOCHROME2")
            bits.add(int(ds.BitsStored))
            rescaled |= float(ds.RescaleSlope) != 1.0 or float(ds.RescaleIntercept) != 0.0
        else:
            mode = Image.open(path).mode
            assert mode == ("L" if row["format"] == "png8" else "I;16")
    assert bits <= {12, 14, 16} and len(bits) >= 2 and rescaled


def test_air_is_dark_in_every_format(demo_default):
    """Whatever the file format and photometric interpretation, the loaded lungs are darker than the spine."""
    manifest = _manifest(demo_default)
    base = os.path.dirname(demo_default)
    seen = set()
    load = LoadXray()
    for rel, row in manifest.items():
        if row["format"] in seen:
            continue
        seen.add(row["format"])
        img = load(os.path.join(base, rel))[0].numpy()
        s = img.shape[0]
        corner = img[: s // 16, : s // 16].mean()  # air outside the body
        spine = img[int(0.45 * s) : int(0.55 * s), int(0.49 * s) : int(0.51 * s)].mean()
        assert corner < spine, row["format"]
    assert len(seen) == 4


def test_demo_dicoms_leak_no_identifiers(demo_default):
    manifest = _manifest(demo_default)
    base = os.path.dirname(demo_default)
    rel = next(r for r, row in manifest.items() if row["format"].startswith("dicom"))
    meta = LoadXray()(os.path.join(base, rel)).meta
    assert "Synthetic^Phantom" not in repr(meta) and "PatientName" not in meta


def test_deterministic_and_cached(tmp_path):
    a = make_demo_dataset(tmp_path / "a", n_images=12, image_size=64, seed=3, workers=1)
    b = make_demo_dataset(tmp_path / "b", n_images=12, image_size=64, seed=3, workers=2)  # same files
    assert open(a).read() == open(b).read()
    for name in sorted(os.listdir(tmp_path / "a" / "images")):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    stamp = {n: os.path.getmtime(tmp_path / "a" / "images" / n) for n in os.listdir(tmp_path / "a" / "images")}
    assert make_demo_dataset(tmp_path / "a", n_images=12, image_size=64, seed=3) == a  # reused
    assert stamp == {n: os.path.getmtime(tmp_path / "a" / "images" / n) for n in stamp}
    c = make_demo_dataset(tmp_path / "a", n_images=12, image_size=64, seed=4)  # other arguments: regenerated
    assert open(c).read() != open(b).read()
    os.remove(tmp_path / "b" / "images" / sorted(os.listdir(tmp_path / "b" / "images"))[0])
    make_demo_dataset(tmp_path / "b", n_images=12, image_size=64, seed=3)  # incomplete: regenerated
    assert len(os.listdir(tmp_path / "b" / "images")) == 12


def test_render_phantom_shapes():
    """Hand-checkable geometry: a larger cardiothoracic ratio gives a wider bright heart band at the same anatomy."""
    rng = np.random.default_rng(0)
    anatomy = demo.PatientAnatomy.draw(rng, cardiomegaly=False)
    img, details = demo.render_phantom(anatomy, np.random.default_rng(1), 128, [])
    assert img.shape == (128, 128) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert set(details) == {"ctr"}
    _, with_all = demo.render_phantom(anatomy, np.random.default_rng(1), 128, ["Nodule", "Mass", "Effusion", "Pneumothorax"])
    assert {"nodules", "mass", "effusion_sides", "pneumothorax"} <= set(with_all)
    assert "SYNTHETIC" in demo.__doc__


def test_lesion_masks_match_the_manifest_and_change_nothing(tmp_path):
    """The masks of render_phantom (used by the heatmap benchmark) lie where the manifest says the lesions are,
    the images and draws are the same with or without them, and render_demo_image gives a written image again."""
    anatomy = demo.PatientAnatomy.draw(np.random.default_rng(0), cardiomegaly=False)
    findings = ["Nodule", "Mass"]
    plain, details = demo.render_phantom(anatomy, np.random.default_rng(5), 128, findings)
    masks = {}
    img, details2 = demo.render_phantom(anatomy, np.random.default_rng(5), 128, findings, masks=masks)
    assert np.array_equal(img, plain) and details == details2
    assert set(masks) == {"lung", "Nodule", "Mass"} and all(m.shape == (128, 128) and m.dtype == bool for m in masks.values())
    yy, xx = (np.mgrid[0:128, 0:128] + 0.5) / 128
    near = np.zeros((128, 128), bool)
    for spot in details["nodules"].split(";"):
        u, v, r = map(float, spot.split("/"))
        disk = (xx - u) ** 2 + (yy - v) ** 2 < (r * 0.95) ** 2  # the manifest rounds to 3 decimals
        assert masks["Nodule"][disk].all()
        near |= (xx - u) ** 2 + (yy - v) ** 2 <= (r * 1.05) ** 2
    assert not masks["Nodule"][~near].any()
    u, v, r = map(float, details["mass"].split("/"))
    mass_r = np.sqrt((xx - u) ** 2 + (yy - v) ** 2)[masks["Mass"]]
    assert mass_r.min() < 1.0 / 128 and mass_r.max() < 1.6 * r  # lobulated around the recorded centre
    assert masks["lung"][masks["Mass"]].mean() > 0.9 and 0.1 < masks["lung"].mean() < 0.6

    datalist = make_demo_dataset(tmp_path, n_images=6, image_size=64, seed=3, workers=1)
    for row in _manifest(datalist).values():
        again, det, _ = demo.render_demo_image(row["image"], seed=3, image_size=64)
        assert det and all(row[k] == v for k, v in det.items())  # ctr, and the lesions where drawn
        if row["format"] == "png8":
            written = np.asarray(Image.open(tmp_path / row["image"]), dtype=np.float32) / 255
            assert np.abs(written - again).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="not a demo image name"):
        demo.render_demo_image("chest.png")
