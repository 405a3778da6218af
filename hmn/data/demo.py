"""The built-in demo dataset: SYNTHETIC chest-radiograph phantoms, so the main job runs on a fresh machine with no data.

Nothing here is a real patient or a real radiograph. Each image is drawn by a deterministic generator:
a thorax with soft tissue, two lung fields with vascular markings, mediastinum, trachea and spine,
heart silhouette, ribs and clavicles, detector response and noise, and varied anatomy (body habitus,
lung height, diaphragm, heart size, exposure, contrast). Five ChestX-ray14 findings are rendered so
that a network can learn them, and each is a shape, not a brightness, so that a classifier on the
image's intensity histogram stays near chance (the tests check macro AUROC < 0.70):

* ``Nodule``: one to three small round opacities at random places in the lungs;
* ``Mass``: a larger, lobulated opacity in a lung;
* ``Cardiomegaly``: a cardiothoracic ratio (heart width / inner thoracic width) above 0.5. The
  ratio is drawn from a continuous distribution per patient (normal 0.36-0.48, enlarged 0.52-0.65)
  and thorax widths vary, so the label is the relation between two widths;
* ``Effusion``: fluid in a lung base with a meniscus rising laterally, blunting the costophrenic angle;
* ``Pneumothorax``: the lung edge pulled away from the chest wall, a thin visceral pleural line and no
  lung markings beyond it.

Labels are multi-label (several findings can co-occur) and about 30 % of images have none ("No
Finding": an all-zero label). Synthetic patients have one to five images each, sharing their anatomy
and their heart size; the splits are patient-wise. Files are real: a mix of DICOM (MONOCHROME1 and
MONOCHROME2, 12 to 16 bits stored, with rescale slope/intercept and a window) and 8- or 16-bit PNG,
with a datalist JSON in this project's format (:mod:`hmn.data.datalist`) whose ``class_names`` is
:data:`DEMO_CLASSES`. Each entry also carries made-up metadata drawn independently of the images and
findings (a synthetic patient's ``sex`` and ``age``, each image's ``view``, PA or AP), so that the
evaluation report's subgroup tables can be tried on the demo; any gap they show is chance.

Public entry points:

* :data:`DEMO_CLASSES` - the rendered findings, in ChestX-ray14 order and spelling.
* :func:`make_demo_dataset` ``(root, n_images=900, image_size=256, seed=0, ...) -> path of datalist.json``;
  a second call with the same arguments reuses the files already there.
* :func:`render_phantom` - one image (float array in [0, 1]) and its findings, without writing files,
  optionally with masks of the lung fields and of each nodule and mass drawn.
* :func:`render_demo_image` - one image of a written demo dataset rendered again, with those masks
  (the heatmap benchmark checks where the network looked against them).
* ``python -m hmn demo-data --root DIR`` on the command line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .datalist import make_datalist, patient_split, write_datalist

__all__ = ["DEMO_CLASSES", "DEMO_VERSION", "make_demo_dataset", "render_demo_image", "render_phantom", "PatientAnatomy"]

logger = logging.getLogger(__name__)

DEMO_CLASSES = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")
DEMO_VERSION = 2  # 2: synthetic age, sex and view in the datalist (the images are those of version 1)
_PREVALENCE = {"Effusion": 0.2, "Mass": 0.18, "Nodule": 0.22, "Pneumothorax": 0.18}
_P_CARDIOMEGALY = 0.25
_FORMATS = ("dicom_mono1", "dicom_mono2", "png16", "png8")


def _ramp(d: np.ndarray, eps: float) -> np.ndarray:
    """Soft step of a signed distance (positive inside): 0 outside, 1 inside, linear over 2*eps."""
    return np.clip(0.5 + d / (2.0 * eps), 0.0, 1.0)


@dataclass
class PatientAnatomy:
    """One synthetic patient's anatomy, shared by all of the patient's images (normalized image units)."""

    cx: float
    lung_w: float  # inner half-width of the thorax at the lung bases (midline to lateral lung edge)
    med_w: float  # mediastinum half-width
    v_top: float  # lung apices
    v_base: float  # lateral costophrenic angles
    dome: float  # diaphragm dome height
    right_higher: float  # the right hemidiaphragm sits higher
    body_extra: float  # soft tissue beyond the ribs
    soft: float  # soft-tissue density
    ctr: float  # cardiothoracic ratio
    heart_half_height: float  # independent of the width, so a large heart is not simply a larger bright area
    rib_spacing: float
    rib_density: float
    breast: float  # breast-shadow density (0: none)

    @classmethod
    def draw(cls, rng: np.random.Generator, cardiomegaly: bool) -> PatientAnatomy:
        return cls(
            cx=0.5 + rng.normal(0, 0.012),
            lung_w=rng.uniform(0.30, 0.40),
            med_w=rng.uniform(0.05, 0.075),
            v_top=rng.uniform(0.12, 0.19),
            v_base=rng.uniform(0.68, 0.82),
            dome=rng.uniform(0.05, 0.10),
            right_higher=rng.uniform(0.0, 0.03),
            body_extra=rng.uniform(0.03, 0.09),
            soft=rng.uniform(0.75, 1.05),
            ctr=rng.uniform(0.52, 0.65) if cardiomegaly else rng.uniform(0.36, 0.48),
            heart_half_height=rng.uniform(0.085, 0.13),
            rib_spacing=rng.uniform(0.062, 0.075),
            rib_density=rng.uniform(0.08, 0.14),
            breast=rng.uniform(0.06, 0.16) if rng.random() < 0.35 else 0.0,
        )


@dataclass
class _Findings:
    labels: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        _GRIDS[size] = (c[None, :].repeat(size, 0), c[:, None].repeat(size, 1))
    return _GRIDS[size]


_INTERP: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Gaussian noise on a coarse grid, smoothly interpolated: random texture with about `cells` bumps a side.

    The interpolation is a fixed (size x cells) matrix of normalized Gaussian weights applied to both
    axes, two small matrix products instead of an image resize.
    """
    key = (size, cells)
    if key not in _INTERP:
        centres = (np.arange(cells + 1) + 0.0) / cells
        x = (np.arange(size) + 0.5) / size
        w = np.exp(-(((x[:, None] - centres[None, :]) * cells / 0.75) ** 2))
        w = (w / w.sum(1, keepdims=True)).astype(np.float32)
        _INTERP[key] = (w, np.ascontiguousarray(w.T))
    m, mt = _INTERP[key]
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    out = (m @ coarse) @ mt  # a contiguous transpose: numpy's matmul with m.T here is 100x slower
    return out / max(float(out.std()), 1e-6)


def _lung_distance(t, v, a: PatientAnatomy, lat_w: float, top: float, base: float, med: float) -> np.ndarray:
    """Approximate signed distance (positive inside) to one lung in (t = lateral distance from midline, v)."""
    apex_h = 0.3 * (base - top)
    f = np.sqrt(np.clip((v - top) / apex_h, 0.0, 1.0))
    tc = 0.5 * (med + lat_w)
    t_out = tc + (lat_w - tc) * f
    t_in = tc - (tc - med) * f
    s = np.clip((t - med) / max(lat_w - med, 1e-3), 0.0, 1.0)
    dia = base - a.dome * np.clip(np.sin(np.pi * s), 0.0, 1.0) ** 0.7 * (1.0 - 0.6 * s**3)
    return np.minimum.reduce([t - t_in, t_out - t, v - top + 0.002, dia - v])


def render_phantom(
    anatomy: PatientAnatomy,
    rng: np.random.Generator,
    size: int = 256,
    findings: Sequence[str] = (),
    masks: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Renders one synthetic frontal chest radiograph.

    Args:
        anatomy: the patient's anatomy (:meth:`PatientAnatomy.draw`).
        rng: generator for everything that varies between images of a patient.
        size: image side in pixels.
        findings: which of "Effusion", "Mass", "Nodule", "Pneumothorax" to draw (cardiomegaly follows
            from ``anatomy.ctr``).
        masks: a dict to fill with ``size x size`` boolean masks of what was drawn: ``"lung"`` (aerated
            lung, where nodules and masses are placed), ``"Nodule"`` and ``"Mass"`` (the pixels a lesion
            made denser; present when drawn). The image and the random draws are the same with or without it.

    Returns:
        (image as float32 in [0, 1], air dark; details of what was drawn, for the manifest).
    """
    u, v = _grid(size)
    px = 1.0 / size
    eps = max(px, 0.0025)
    a = anatomy
    details: dict[str, str] = {}
    # positioning and breathing vary between images of one patient
    cx = a.cx + rng.normal(0, 0.008)
    dv = rng.normal(0, 0.012)
    top, base = a.v_top + dv * 0.3, a.v_base + dv
    lung_w = a.lung_w * rng.uniform(0.98, 1.02)
    x = u - cx
    absx = np.abs(x)

    # body: cylinder-like soft-tissue thickness, narrow neck widening into the shoulders
    body_w = lung_w + 0.035 + a.body_extra
    shoulder = np.clip((v - 0.02) / 0.12, 0.0, 1.0)
    half = 0.09 + (body_w - 0.09) * np.sqrt(shoulder)
    prof = np.sqrt(np.clip(1.0 - (absx / half) ** 2, 0.0, 1.0))
    body = _ramp(half - absx, eps)
    dens = a.soft * prof * body

    # lungs (side -1: image left = patient's right)
    lungs = np.zeros_like(u)
    per_side = {}
    for side in (-1, 1):
        t = side * x
        b = base - (a.right_higher if side == -1 else 0.0)
        d = _lung_distance(t, v, a, lung_w, top, b, a.med_w)
        m = _ramp(d, eps) * (t > 0)
        per_side[side] = (t, b, m)
        lungs = np.maximum(lungs, m)

    # heart: an ellipse whose width is ctr * inner thoracic width, sitting on the left hemidiaphragm
    thorax = 2.0 * lung_w
    ctr = float(np.clip(a.ctr + rng.normal(0, 0.004), 0.3, 0.7))
    hw = ctr * thorax
    hx0 = cx + hw * (0.5 - 0.36)  # 36 % of the heart lies right of the midline
    hry = a.heart_half_height
    hcy = base - a.dome * 0.6 - 0.55 * hry
    heart_r = np.sqrt(((u - hx0) / (0.5 * hw)) ** 2 + ((v - hcy) / hry) ** 2)
    heart = _ramp((1.0 - heart_r) * 0.5 * hw, eps)
    details["ctr"] = f"{ctr:.3f}"

    # vascular markings: ridges of smooth noise, denser towards the hila
    n1 = _smooth_noise(rng, size, 10)
    n2 = _smooth_noise(rng, size, 22)
    ridges = np.exp(-((n1 / 0.3) ** 2)) * 0.65 + np.exp(-((n2 / 0.3) ** 2)) * 0.35
    hil = np.exp(-np.sqrt((absx - a.med_w - 0.03) ** 2 + ((v - 0.45) * 0.8) ** 2) / 0.22)
    marking_strength = rng.uniform(0.13, 0.19)
    markings = ridges * (0.35 + hil) * marking_strength
    mean_markings = float(ridges.mean()) * (0.35 + hil) * marking_strength

    aerated = lungs * (1.0 - heart)
    no_marks = np.zeros_like(u)
    extra_air = np.zeros_like(u)
    fluid = np.zeros_like(u)
    pleural_line = np.zeros_like(u)
    denser = np.zeros_like(u)

    if "Effusion" in findings:
        r = rng.random()
        sides = (-1,) if r < 0.4 else (1,) if r < 0.8 else (-1, 1)
        for side in sides:
            t, b, m = per_side[side]
            height = rng.uniform(0.06, 0.16) * (b - top)
            men = rng.uniform(0.025, 0.06)
            s = np.clip((t - a.med_w) / (lung_w - a.med_w), 0.0, 1.0)
            level = b - a.dome * 0.5 - height - men * s**2
            e = _ramp(v - level, 1.8 * eps) * m
            fluid = np.maximum(fluid, e * np.clip(0.8 + (v - level) * 3.0, 0.8, 1.0))
        details["effusion_sides"] = ",".join("R" if s == -1 else "L" for s in sides)

    if "Pneumothorax" in findings:
        side = int(rng.choice([-1, 1]))
        t, b, m = per_side[side]
        frac = rng.uniform(0.25, 0.45)
        w2 = lung_w - frac * (lung_w - a.med_w)
        top2 = top + frac * 0.35 * (b - top)
        d2 = _lung_distance(t, v, a, w2, top2, b + 0.05, a.med_w)
        collapsed = _ramp(d2, eps)
        upper = _ramp((b - 0.06 - v), 0.03)
        region = m * (1.0 - collapsed) * upper
        no_marks = np.maximum(no_marks, region)
        denser = np.maximum(denser, m * collapsed * 0.5)  # the collapsed lung holds its vessels closer together
        extra_air = np.maximum(extra_air, region)
        line_w = max(0.7 * px, 0.0022)
        pleural_line = np.maximum(pleural_line, np.exp(-((d2 / line_w) ** 2)) * m * upper)
        details["pneumothorax"] = f"{'R' if side == -1 else 'L'}:{frac:.2f}"

    aerated = aerated * (1.0 - fluid)
    dens = dens - 0.62 * a.soft * aerated * (0.55 + 0.45 * prof)
    # beyond a pneumothorax's pleural line: no markings, but about the same mean density as aerated lung,
    # so that the finding is the texture and the line, not a dark patch
    dens = dens + markings * aerated * (1.0 - no_marks) * (1.0 + denser) + mean_markings * aerated * no_marks
    dens = dens - 0.02 * extra_air * aerated + 0.3 * pleural_line * aerated
    dens = dens + 0.18 * fluid * lungs

    # mediastinum, trachea, spine with vertebrae
    spine_w = 0.028
    spine = _ramp(spine_w - absx, eps) * _ramp(v - 0.02, 0.02) * body
    vert = 0.75 + 0.25 * np.cos(2 * np.pi * (v - 0.05) / 0.045) ** 2
    dens = dens + 0.22 * spine * vert
    trachea = _ramp(0.016 - np.abs(x + 0.15 * (v - 0.3) * 0.05), eps) * _ramp(0.36 - v, 0.02) * _ramp(v - 0.04, 0.02)
    dens = dens - 0.18 * trachea

    # posterior ribs: arcs from the spine curving down laterally, one phase field per side
    ribs = np.zeros_like(u)
    thickness = rng.uniform(0.30, 0.38)
    for side in (-1, 1):
        t = side * x
        base_curve = top - 0.06 + 1.3 * np.clip(t - 0.02, 0, None) ** 1.8
        phase = (v - base_curve) / a.rib_spacing
        k = np.floor(phase)
        frac = phase - k
        band = np.clip(1.0 - np.abs(frac - 0.5 * thickness) / (0.5 * thickness), 0.0, 1.0) ** 0.6
        inside = (k >= 0) & (k < 10) & (t > 0.015) & (t < lung_w + 0.03)
        ribs = np.maximum(ribs, band * inside)
        # anterior ribs: fainter, sloping the other way
        ant = (v - (top + 0.02 + 0.25 * np.clip(lung_w - t, 0, None))) / (a.rib_spacing * 1.25)
        ka = np.floor(ant)
        fa = ant - ka
        band_a = np.clip(1.0 - np.abs(fa - 0.15) / 0.15, 0.0, 1.0)
        ribs = np.maximum(ribs, 0.45 * band_a * ((ka >= 0) & (ka < 6) & (t > 0.08) & (t < lung_w)))
    dens = dens + a.rib_density * ribs * body
    # clavicles
    for side in (-1, 1):
        t = side * x
        cv = 0.14 - 0.1 * np.clip(t, 0, None) + 0.25 * np.clip(t - 0.15, 0, None) ** 2
        clav = _ramp(0.012 - np.abs(v - cv), eps) * (t > 0.03) * (t < lung_w + 0.05)
        dens = dens + 0.16 * clav * body
    if a.breast > 0:
        for side in (-1, 1):
            br = np.sqrt(((side * x - 0.6 * lung_w) / (0.55 * lung_w)) ** 2 + ((v - base + 0.02) / 0.16) ** 2)
            dens = dens + a.breast * _ramp(1.0 - br, 0.15) * body

    # nodules and masses: projected spheres (lobulated for masses) inside the aerated lung
    candidates = np.nonzero(aerated > 0.95)
    if masks is not None:
        masks["lung"] = aerated > 0.5

    def place(radius: float) -> tuple[float, float] | None:
        ys, xs = candidates
        if len(ys) == 0:
            return None
        for _ in range(40):
            i = int(rng.integers(len(ys)))
            cu, cv_ = (xs[i] + 0.5) / size, (ys[i] + 0.5) / size
            if np.all([aerated[int(np.clip((cv_ + dy) * size, 0, size - 1)), int(np.clip((cu + dx) * size, 0, size - 1))] > 0.5
                       for dx, dy in ((radius, 0), (-radius, 0), (0, radius), (0, -radius))]):
                return cu, cv_
        return (xs[i] + 0.5) / size, (ys[i] + 0.5) / size

    def window(cu: float, cv_: float, reach: float) -> tuple[slice, slice]:
        """The pixels within `reach` of (cu, cv_): blobs are computed there only."""
        r0, r1 = max(int((cv_ - reach) * size) - 1, 0), min(int((cv_ + reach) * size) + 2, size)
        c0, c1 = max(int((cu - reach) * size) - 1, 0), min(int((cu + reach) * size) + 2, size)
        return slice(r0, r1), slice(c0, c1)

    if "Nodule" in findings:
        spots = []
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.016, 0.026)
            where = place(r)
            if where is None:
                continue
            win = window(where[0], where[1], r * 1.05)
            rr = np.sqrt((u[win] - where[0]) ** 2 + (v[win] - where[1]) ** 2) / r
            dens[win] += rng.uniform(0.26, 0.38) * np.sqrt(np.clip(1.0 - rr**2, 0.0, 1.0)) ** 0.7
            if masks is not None:
                masks.setdefault("Nodule", np.zeros((size, size), bool))[win] |= rr < 1.0
            spots.append(f"{where[0]:.3f}/{where[1]:.3f}/{r:.3f}")
        details["nodules"] = ";".join(spots)
    if "Mass" in findings:
        r = rng.uniform(0.065, 0.1)
        where = place(r * 0.7)
        if where is not None:
            win = window(where[0], where[1], r * 1.6)
            uu, vv = u[win], v[win]
            ang = np.arctan2(vv - where[1], uu - where[0])
            lob = 1.0 + sum(rng.uniform(0.05, 0.14) * np.cos(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
            lob = lob + 0.06 * np.cos(11 * ang + rng.uniform(0, 2 * np.pi))  # an irregular, spiculated edge
            rr = np.sqrt((uu - where[0]) ** 2 + (vv - where[1]) ** 2) / (r * lob)
            dens[win] += rng.uniform(0.3, 0.45) * np.sqrt(np.clip(1.0 - rr**2, 0.0, 1.0)) ** 0.6
            if masks is not None:
                masks.setdefault("Mass", np.zeros((size, size), bool))[win] |= rr < 1.0
            details["mass"] = f"{where[0]:.3f}/{where[1]:.3f}/{r:.3f}"

    # detector: exponential attenuation, random exposure, gamma, heel effect, noise
    dens = np.clip(dens, 0.0, None)
    k_exp = rng.uniform(1.2, 2.6)
    img = (1.0 - np.exp(-k_exp * dens)) / (1.0 - np.exp(-k_exp * 1.3))
    img = np.clip(img, 0.0, 1.0) ** np.exp(rng.uniform(-0.3, 0.3))
    # a random monotone tone curve (processing differs between detectors and sites)
    knots = np.sort(np.clip(np.array([0.25, 0.5, 0.75]) + rng.uniform(-0.08, 0.08, 3), 0.02, 0.98))
    img = np.interp(img, [0.0, 0.25, 0.5, 0.75, 1.0], np.concatenate([[0.0], knots, [1.0]])).astype(np.float32)
    img = img * (1.0 + rng.uniform(-0.08, 0.08) * (v - 0.5) + rng.uniform(-0.05, 0.05) * (u - 0.5))
    img = img + rng.uniform(0.0, 0.06)  # detector offset / scatter
    img = img + rng.normal(0.0, rng.uniform(0.006, 0.02), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), details


def _uid(seed_bytes: bytes) -> str:
    """A deterministic DICOM UID under the 2.25 (UUID-derived) root."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed_bytes).digest()[:16], "big"))


def _write_dicom(path: str, img: np.ndarray, rng: np.random.Generator, mono1: bool, pid: str, idx: str) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    bits = int(rng.choice([12, 14, 16]))
    top = 2**bits - 1
    gain = rng.uniform(0.7, 0.95) * top
    offset = rng.uniform(0.0, 0.04) * top
    stored = np.rint(img * gain + offset).astype(np.int64)
    if mono1:
        stored = top - stored
    stored = np.clip(stored, 0, top).astype(np.uint16)
    slope, intercept = [(1.0, 0.0), (0.5, 0.0), (2.0, -1024.0), (1.0, 100.0)][int(rng.integers(4))]
    modality = stored.astype(np.float64) * slope + intercept
    lo, hi = float(modality.min()), float(modality.max())

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(f"{pid}/{idx}/sop".encode())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(f"{pid}/{idx}/study".encode())
    ds.SeriesInstanceUID = _uid(f"{pid}/{idx}/series".encode())
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    # Synthetic identifiers (no real person): they let tests check that loaders keep them out of meta/logs.
    ds.PatientName = f"Synthetic^Phantom{pid}"
    ds.PatientID = pid
    ds.PatientBirthDate = "19000101"
    ds.AccessionNumber = f"DEMO{idx.replace('_', '')}"[:16]
    ds.StudyDescription = "SYNTHETIC PHANTOM - not a real radiograph"
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.WindowCenter = round((lo + hi) / 2.0, 2)
    ds.WindowWidth = round(max((hi - lo) * 1.05, 2.0), 2)
    spacing = round(400.0 / img.shape[0], 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_png(path: str, img: np.ndarray, rng: np.random.Generator, bits16: bool) -> None:
    from PIL import Image

    if bits16:
        scale = rng.uniform(0.25, 1.0) * 65535  # 12-bit data in a 16-bit container is common
        Image.fromarray(np.rint(img * scale).astype(np.uint16)).save(path, compress_level=1)
    else:
        Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(path, compress_level=1)


def _config(n_images: int, image_size: int, seed: int, fractions: Sequence[float], images_per_patient) -> dict:
    return {
        "version": DEMO_VERSION,
        "n_images": int(n_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "images_per_patient": [int(images_per_patient[0]), int(images_per_patient[1])],
        "class_names": list(DEMO_CLASSES),
    }


def make_demo_dataset(
    root: str | os.PathLike,
    n_images: int = 900,
    image_size: int = 256,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    images_per_patient: tuple[int, int] = (1, 5),
    overwrite: bool = False,
    workers: int | None = None,
) -> str:
    """Writes the synthetic demo dataset under `root` and returns the path of its datalist JSON.

    The result is deterministic in the arguments. If `root` already holds a complete dataset made
    with the same arguments, nothing is regenerated (unless `overwrite`). The images are SYNTHETIC
    phantoms, not radiographs of people; see the module docstring.

    Args:
        root: output folder (e.g. a cache folder); created if needed.
        n_images: number of images.
        image_size: side of the square images in pixels.
        seed: master seed.
        fractions: patient-wise (training, validation, test) fractions.
        images_per_patient: inclusive range of images per synthetic patient.
        overwrite: regenerate even when a matching dataset exists.
        workers: processes rendering in parallel (default: up to 2); the result does not depend on it.

    Returns:
        path of ``datalist.json`` (``class_names`` = :data:`DEMO_CLASSES`, relative image paths).
    """
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    cfg = _config(n_images, image_size, seed, fractions, images_per_patient)
    datalist_path = os.path.join(root, "datalist.json")
    cfg_path = os.path.join(root, "demo_config.json")
    if not overwrite and os.path.isfile(datalist_path) and os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                same = json.load(f) == cfg
        except (OSError, ValueError):
            same = False
        if same and _complete(datalist_path):
            logger.info("reusing the demo dataset in %s", root)
            return datalist_path
    if os.path.exists(datalist_path):
        os.remove(datalist_path)  # the datalist is written last: its presence marks a complete dataset

    img_dir = os.path.join(root, "images")
    os.makedirs(img_dir, exist_ok=True)
    master = np.random.default_rng(seed)
    lo_n, hi_n = images_per_patient
    counts: list[int] = []
    while sum(counts) < n_images:
        counts.append(int(master.integers(lo_n, hi_n + 1)))
    counts[-1] -= sum(counts) - n_images
    tasks = [(seed, p, count, int(image_size), img_dir) for p, count in enumerate(counts)]
    results = render_patients(_make_patient, tasks, counts, root, workers, "synthetic demo images")
    write_demo_files(root, results, fractions, seed, cfg, cfg_path, DEMO_CLASSES, "hmn-demo-synthetic",
                     "SYNTHETIC chest radiograph phantoms generated by hmn.data.demo; not real patients", datalist_path)
    logger.info("wrote %d synthetic demo images to %s", n_images, root)
    return datalist_path


def _patient_anatomy(seed: int, p: int) -> tuple[PatientAnatomy, bool]:
    prng = np.random.default_rng([seed, p, 0])
    cardio = bool(prng.random() < _P_CARDIOMEGALY)
    return PatientAnatomy.draw(prng, cardio), cardio


def _patient_image(seed: int, p: int, k: int, anatomy: PatientAnatomy, image_size: int,
                   masks: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, str], list[str], np.random.Generator]:
    irng = np.random.default_rng([seed, p, k + 1])
    present = [name for name, prob in _PREVALENCE.items() if irng.random() < prob]
    img, details = render_phantom(anatomy, irng, image_size, present, masks=masks)
    return img, details, present, irng


def render_demo_image(
    image: str, seed: int = 0, image_size: int = 256
) -> tuple[np.ndarray, dict[str, str], dict[str, np.ndarray]]:
    """Renders again one image of a demo dataset made by :func:`make_demo_dataset` with `seed` and
    `image_size`, with the masks of what was drawn (see :func:`render_phantom`).

    Args:
        image: the image's file name or path (``P00012_03.png`` / ``.dcm``: patient 12, image 3).

    Returns:
        (image as float32 in [0, 1] before the file's quantization, details as in ``manifest.csv``, masks).

    Raises:
        ValueError: the name is not one the demo writes.
    """
    m = re.fullmatch(r"P(\d{5})_(\d{2})", os.path.splitext(os.path.basename(os.fspath(image)))[0])
    if m is None:
        raise ValueError(f"{image!r} is not a demo image name (P<5 digits>_<2 digits>.png or .dcm)")
    p, k = int(m.group(1)), int(m.group(2))
    masks: dict[str, np.ndarray] = {}
    img, details, _, _ = _patient_image(int(seed), p, k, _patient_anatomy(int(seed), p)[0], int(image_size), masks)
    return img, details, masks


def _with_progress(results, counts: list[int], root: str, what: str = "synthetic demo images") -> list:
    """Collects the patients' results, logging how many images (``what``) are written, with the time left, every
    ~10 % or 30 s and at the end (:class:`hmn.workflows.ProgressReport`; writing the default set takes a minute or
    two on a small machine: the user sees it move)."""
    from hmn.workflows.estimate import ProgressReport

    total, done, out = sum(counts), 0, []
    logger.info("writing %d %s to %s ...", total, what, root)
    unit = what.split()[-1]
    progress = ProgressReport("writing the demo set", total, unit, fractions=[k / 10 for k in range(1, 10)])
    for count, r in zip(counts, results):
        out.append(r)
        done += count
        progress.update(done)
    progress.finish()
    return out


def render_patients(make_patient, tasks: list, counts: list[int], root: str, workers: int | None, what: str) -> list:
    """``make_patient(task)`` for every patient's task, in up to `workers` processes (default: up to 2), in
    order, with progress logged; shared by the 2D and 3D demo generators (the result does not depend on
    `workers`)."""
    workers = max(1, min(int(workers if workers is not None else min(2, os.cpu_count() or 1)), len(tasks)))
    if workers > 1:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers) as pool:
            return _with_progress(pool.imap(make_patient, tasks, chunksize=4), counts, root, what)
    return _with_progress(map(make_patient, tasks), counts, root, what)


def write_demo_files(root: str, results: list, fractions: Sequence[float], seed: int, cfg: dict, cfg_path: str,
                     classes: Sequence[str], source: str, description: str, datalist_path: str) -> None:
    """Patient-wise splits, ``manifest.csv``, the config and, last (its presence marks a complete dataset), the
    datalist of a demo generator's per-patient ``(entries, manifest rows)`` results."""
    entries = [e for r in results for e in r[0]]
    rows = [row for r in results for row in r[1]]
    splits = patient_split([e["patient_id"] for e in entries], fractions, seed)
    out: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for e, s in zip(entries, splits):
        out[s].append(e)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("image", "patient_id", "format"), k))
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    write_datalist(make_datalist(out, classes, source=source, description=description), datalist_path)


def _make_patient(task: tuple) -> tuple[list[dict], list[dict]]:
    """Renders and writes all images of one synthetic patient (a module-level function, for worker processes)."""
    seed, p, count, image_size, img_dir = task
    pid = f"P{p:05d}"
    # metadata from streams of their own, so the images and findings stay those of demo version 1
    mrng = np.random.default_rng([seed, p, 1_000_000])
    sex, age = ("F", "M")[int(mrng.integers(2))], int(mrng.integers(18, 91))
    anatomy, cardio = _patient_anatomy(seed, p)
    entries, rows = [], []
    for k in range(count):
        img, details, present, irng = _patient_image(seed, p, k, anatomy, image_size)
        fmt = _FORMATS[int(irng.integers(len(_FORMATS)))]
        stem = f"{pid}_{k:02d}"
        name = stem + (".dcm" if fmt.startswith("dicom") else ".png")
        path = os.path.join(img_dir, name)
        if fmt.startswith("dicom"):
            _write_dicom(path, img, irng, fmt == "dicom_mono1", pid, stem)
        else:
            _write_png(path, img, irng, fmt == "png16")
        label = [int((c == "Cardiomegaly" and cardio) or c in present) for c in DEMO_CLASSES]
        view = ("PA", "AP")[int(np.random.default_rng([seed, p, 1_000_001 + k]).random() < 0.35)]
        entries.append({"image": path, "label": label, "patient_id": pid, "age": age, "sex": sex, "view": view})
        rows.append({"image": f"images/{name}", "patient_id": pid, "format": fmt,
                     **dict(zip(DEMO_CLASSES, label)), **details})
    return entries, rows


def _complete(datalist_path: str) -> bool:
    try:
        with open(datalist_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    base = os.path.dirname(datalist_path)
    return all(os.path.isfile(os.path.join(base, e["image"])) for s in ("training", "validation", "test") for e in data.get(s, []))
