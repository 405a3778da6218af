"""The built-in 3D demo dataset: SYNTHETIC CT-like abdominal phantoms for the 3D HybridMedNet bundles.

Nothing here is a real patient or a real CT scan. Each volume is drawn by a deterministic generator in
Hounsfield units (HU): air (-1000), an elliptic-cylinder body with subcutaneous fat (-85 to -115) and an
abdominal wall of muscle (35 to 60), a cavity of bowel (15 to 45) and mesenteric fat, a vertebral
column (cancellous bone 150 to 280 in a cortical rim of 500 to 900, discs between the vertebrae), ribs
(350 to 700), paraspinal muscles, aorta (110 to 260) and inferior vena cava (80 to 170), their
contrast enhancement varying per scan, kidneys (110 to 200) with a renal sinus, a spleen-like organ,
tiny calcifications on the aortic wall in half the patients, and a liver-like organ (45 to 70) whose
size, shape, position and orientation vary per patient. Scans carry correlated voxel noise (5 to 13 HU),
a smooth low-frequency shading and a calibration error (HU scale 0.96 to 1.04, offset -20 to +20), as
scanners differ.

Four findings, all in the liver-like organ, are labelled (multi-label, independent prevalences 0.25 to 0.3):

* ``Calcification``: one to four tiny very bright spots (Gaussian, 0.8 to 1.3 mm standard deviation,
  +350 to +900 HU at the centre, each centred on a slice so that thick slices do not hide it);
* ``Hepatomegaly``: the organ enlarged relative to the body, a shape relation, not an intensity. The
  organ index (geometric mean of the organ's semi-axes over that of the body's cross-section) is drawn
  per patient, normal 0.36 to 0.46, enlarged 0.54 to 0.64; the label is ``organ index > 0.5``
  (:data:`HEPATOMEGALY_THRESHOLD`). Body size varies by a factor of 1.5, so the organ's voxel count
  alone does not give the label away, and the spleen-like organ (same density range) varies in size
  independently;
* ``Hyperdense lesion``: one or two spheres brighter than the organ (+60 to +110 HU);
* ``Hypodense lesion``: one to three spheres darker than the organ (-55 to -105 HU).

Lesion radii are drawn from 4.5 to 9 mm at the default 96 mm field of view (3 to 6 voxels in-plane, 1.5
to 3 slices), at most half the organ's smallest semi-axis and smaller where the organ holds no room
(3 mm at the least), so the lesions of a volume fill a median 8 % of the organ (17 % at most in the
default dataset). Every density a finding adds is also found elsewhere in the body in amounts that vary
more than the finding's (bowel and fat for the hypodense lesions; vessels, kidneys and cancellous
bone for the hyperdense ones; cortical bone, ribs and aortic calcifications for calcifications), so a
classifier on a volume's intensity histogram stays near chance (the tests check macro AUROC < 0.70 for
a logistic regression) while a small 3D CNN learns the findings.

Volumes are arrays in MONAI's ``(X, Y, Z)`` order: X runs to the patient's left, Y to the posterior,
Z to the head (DICOM's LPS axes), with anisotropic voxels (default 1.5 x 1.5 x 3.0 mm, thick slices);
the affine is :func:`volume_affine`. Files are real: most volumes are gzipped NIfTI (``int16`` HU,
``scl_slope`` 1, ``scl_inter`` 0, qform and sform the affine in RAS millimetres), every tenth is a
DICOM series folder (CT Image Storage, one file per slice, 12 bits stored with RescaleIntercept -1024,
an abdominal window W400/L40), both read by :class:`hmn.transforms.LoadXray` to the same array and
affine: with ``voi="ignore"`` a DICOM series gives HU as a NIfTI does, while the default
``voi="apply"`` applies the series' window, so a pipeline mixing the two loads CT with ``voi="ignore"``.
Synthetic patients have one to three scans each, sharing their anatomy and organ index; lesions are
drawn per scan; splits are patient-wise. The datalist (this project's format, :mod:`hmn.data.datalist`)
has ``class_names`` = :data:`DEMO3D_CLASSES` and made-up ``age`` and ``sex`` drawn independently of
the findings; ``manifest.csv`` beside it lists what was drawn in each volume.

Public entry points:

* :data:`DEMO3D_CLASSES` - the labelled findings.
* :func:`make_demo3d_dataset` ``(root, n_volumes=600, size=(64, 64, 32), spacing=(1.5, 1.5, 3.0), seed=0, ...)
  -> path of datalist.json``; a second call with the same arguments reuses the files already there.
* :func:`render_ct_phantom` - one volume (float32 HU) from an anatomy and a generator, without files.
* :func:`render_demo_volume` - one volume of a written dataset rendered again, exactly as stored in its
  file, with its label and the masks of the body, the organ and each lesion finding.
* ``python -m hmn demo3d-data --root DIR`` on the command line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .datalist import patient_split
from .demo import render_patients, write_demo_files

__all__ = [
    "DEMO3D_CLASSES",
    "DEMO3D_VERSION",
    "DEFAULT_SIZE",
    "DEFAULT_SPACING",
    "DETAIL_KEYS",
    "HEPATOMEGALY_THRESHOLD",
    "PatientAnatomy3D",
    "make_demo3d_dataset",
    "parse_volume_name",
    "render_ct_phantom",
    "render_demo_volume",
    "volume_affine",
]

logger = logging.getLogger(__name__)

DEMO3D_CLASSES = ("Calcification", "Hepatomegaly", "Hyperdense lesion", "Hypodense lesion")
DEMO3D_VERSION = 1
DEFAULT_SIZE = (64, 64, 32)
DEFAULT_SPACING = (1.5, 1.5, 3.0)
HEPATOMEGALY_THRESHOLD = 0.5
_PREVALENCE = {"Hypodense lesion": 0.3, "Hyperdense lesion": 0.25, "Calcification": 0.25}
_P_HEPATOMEGALY = 0.3
# manifest.csv columns describing each drawn finding (the class-name columns hold the 0/1 labels)
DETAIL_KEYS = {"Hypodense lesion": "hypodense_lesions", "Hyperdense lesion": "hyperdense_lesions",
               "Calcification": "calcifications"}
_DICOM_EVERY = 10  # volumes 0, 10, 20, ... (counted over the whole dataset) are written as DICOM series
_HU_MIN, _HU_MAX = -1024, 3071  # what 12 stored bits hold with RescaleIntercept -1024
_WINDOW = (40.0, 400.0)  # abdominal soft-tissue window (centre, width) written in the DICOM headers
# Lesion sizes are anatomical, in units of half the in-plane field of view like the anatomy: multiples of
# one default voxel (1.5 mm of the default 96 mm field), so other sizes sample the same phantom
_MM = 1.0 / 32.0


def _ramp(d: np.ndarray, eps: float) -> np.ndarray:
    """Soft step of a signed distance (positive inside): 0 outside, 1 inside, linear over 2*eps."""
    return np.clip(0.5 + d / (2.0 * eps), 0.0, 1.0)


def _rotation(theta: float, phi: float) -> np.ndarray:
    """Rotation about Z by `theta`, then about the (new) Y axis by `phi` (radians): organ axes -> patient axes."""
    c, s = np.cos(theta), np.sin(theta)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    c, s = np.cos(phi), np.sin(phi)
    ry = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return rz @ ry


def _projected_ellipse(rot: np.ndarray, semi: np.ndarray, n: int = 48) -> np.ndarray:
    """Boundary points (n x 2, relative to the centre) of an ellipsoid's shadow on the axial (X, Y) plane."""
    m = rot @ np.diag(1.0 / semi**2) @ rot.T
    shadow = m[:2, :2] - np.outer(m[:2, 2], m[2, :2]) / m[2, 2]  # Schur complement: the projection's quadric
    w, v = np.linalg.eigh(shadow)
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return (v @ (np.stack([np.cos(t), np.sin(t)]) / np.sqrt(w)[:, None])).T


@dataclass
class PatientAnatomy3D:
    """One synthetic patient's anatomy, shared by all of the patient's scans.

    Lengths are in units of half the in-plane field of view (the volume spans -1 to 1 in X and Y);
    X points to the patient's left, Y to the posterior, Z to the head. Densities are in HU.
    """

    body_a: float  # body semi-axis, right-left
    body_b: float  # body semi-axis, anterior-posterior
    fat: float  # subcutaneous fat thickness
    wall: float  # abdominal wall muscle thickness
    fat_hu: float
    muscle_hu: float
    bowel_hu: float
    visceral_fat: float  # threshold on a smooth field: higher, less mesenteric fat
    spine_r: float
    spine_y: float
    vertebra_period: float
    cancellous_hu: float
    cortical_hu: float
    rib_period: float
    rib_slope: float
    rib_top: float  # ribs are present above this Z
    rib_hu: float
    paraspinal: tuple[float, float]  # semi-axes of the paraspinal muscles
    aorta_r: float
    aortic_calcifications: tuple[tuple[float, float, float, float], ...]  # (angle, z, size, peak HU) on the aortic wall
    ivc_r: float
    kidney_semi: tuple[float, float, float]
    kidney_z: float
    spleen_semi: tuple[float, float, float]
    spleen_centre: tuple[float, float, float]
    spleen_dhu: float  # spleen density relative to the organ's
    organ_index: float
    organ_semi: tuple[float, float, float]  # along the organ's own axes (right-left, anterior-posterior, head-foot)
    organ_centre: tuple[float, float, float]
    organ_angles: tuple[float, float]  # (theta, phi) of :func:`_rotation`
    organ_hu: float

    @property
    def body_scale(self) -> float:
        """Geometric mean of the body's cross-section semi-axes."""
        return float(np.sqrt(self.body_a * self.body_b))

    @property
    def organ_rotation(self) -> np.ndarray:
        return _rotation(*self.organ_angles)

    @classmethod
    def draw(cls, rng: np.random.Generator, hepatomegaly: bool) -> PatientAnatomy3D:
        """Draws a patient; with `hepatomegaly` the organ index is in [0.54, 0.64], else in [0.36, 0.46]."""
        a = rng.uniform(0.66, 0.93)
        b = a * rng.uniform(0.72, 0.86)
        fat = b * rng.uniform(0.05, 0.14)
        wall = a * rng.uniform(0.03, 0.06)
        ca, cb = a - fat - wall, b - fat - wall  # the cavity
        spine_r = a * rng.uniform(0.11, 0.14)
        spine_y = cb - spine_r - 0.025 * a
        index = rng.uniform(0.54, 0.64) if hepatomegaly else rng.uniform(0.36, 0.46)
        g = index * np.sqrt(a * b)
        organ_hu = rng.uniform(45.0, 70.0)
        # organ shape and place: a shape and orientation are drawn until some place in the cavity holds the
        # organ clear of the spine; among those places, one near the right wall (lengths scale with the body,
        # so whether an organ fits does not depend on the body's size)
        grid = np.meshgrid(np.linspace(-ca, ca, 33), np.linspace(-cb, cb, 33), indexing="ij")
        cand = np.stack(grid, -1).reshape(-1, 2)  # candidate centres (X, Y)
        for attempt in range(300):
            calm = float(np.clip(2.0 - attempt / 100.0, 0.0, 1.0))  # after 100 failures, ever less rotation
            margin, gap = (0.035 * a, 0.045 * a) if attempt < 200 else (0.015 * a, 0.02 * a)
            cavity_in = np.array([ca - margin, cb - margin])
            e1 = rng.uniform(1.0, 1.25)
            e2 = rng.uniform(0.72, 0.9)
            semi = g * np.array([e1, e2, 1.0 / (e1 * e2)])
            theta = rng.uniform(-0.45, 0.45) * calm
            phi = rng.uniform(-0.25, 0.25) * calm
            rot = _rotation(theta, phi)
            rim = _projected_ellipse(rot, semi)
            ez = float(np.sqrt(((rot[2] * semi) ** 2).sum()))
            pts = cand[:, None, :] + rim[None]
            ok = (((pts / cavity_in) ** 2).sum(-1) <= 1.0).all(1)
            ok &= (np.hypot(pts[..., 0], pts[..., 1] - spine_y) > spine_r + gap).all(1)
            if ok.any() and ez < 0.95:
                right = cand[ok, 0].min()
                near = np.flatnonzero(ok & (cand[:, 0] <= right + 0.1 * ca))
                cx, cy = cand[near[int(rng.integers(len(near)))]]
                step = np.array([ca, cb]) / 16.0
                moved = np.array([cx, cy]) + rng.uniform(-0.5, 0.5, 2) * step  # off the grid of candidates
                pts = moved + rim
                if (((pts / cavity_in) ** 2).sum(-1) <= 1.0).all() and \
                        (np.hypot(pts[:, 0], pts[:, 1] - spine_y) > spine_r + gap).all():
                    cx, cy = moved
                break
        else:  # pragma: no cover - unreachable with the ranges above (none in 20,000 patients with an enlarged organ)
            raise RuntimeError("could not place the synthetic organ; the anatomy ranges are inconsistent")
        cz = rng.uniform(-1.0, 1.0) * max(0.0, min(0.15, 0.95 - ez))
        spleen_g = np.sqrt(a * b) * rng.uniform(0.2, 0.45)
        spleen_semi = spleen_g * np.array([rng.uniform(0.8, 1.0), rng.uniform(0.6, 0.8), 1.3])
        spleen_semi = spleen_semi / np.cbrt(spleen_semi.prod() / spleen_g**3)
        spleen_centre = (ca - spleen_semi[0] - rng.uniform(0.02, 0.06), cb * rng.uniform(0.1, 0.35),
                         rng.uniform(-0.2, 0.3))
        return cls(
            body_a=float(a), body_b=float(b), fat=float(fat), wall=float(wall),
            fat_hu=rng.uniform(-115.0, -85.0), muscle_hu=rng.uniform(35.0, 60.0), bowel_hu=rng.uniform(15.0, 45.0),
            visceral_fat=rng.uniform(-0.2, 1.2),
            spine_r=float(spine_r), spine_y=float(spine_y), vertebra_period=rng.uniform(0.26, 0.34),
            cancellous_hu=rng.uniform(150.0, 280.0), cortical_hu=rng.uniform(500.0, 900.0),
            rib_period=rng.uniform(0.3, 0.4), rib_slope=rng.uniform(0.1, 0.25), rib_top=rng.uniform(-0.8, 0.3),
            rib_hu=rng.uniform(350.0, 700.0),
            paraspinal=(a * rng.uniform(0.1, 0.16), a * rng.uniform(0.08, 0.12)),
            aorta_r=a * rng.uniform(0.06, 0.09), ivc_r=a * rng.uniform(0.06, 0.09),
            aortic_calcifications=tuple(
                (rng.uniform(0, 2 * np.pi), rng.uniform(-0.9, 0.9), rng.uniform(0.55, 0.85), rng.uniform(350.0, 900.0))
                for _ in range(int(rng.integers(1, 7)) if rng.random() < 0.5 else 0)
            ),
            kidney_semi=(a * rng.uniform(0.12, 0.17), a * rng.uniform(0.1, 0.14), rng.uniform(0.3, 0.45)),
            kidney_z=rng.uniform(-0.75, -0.25),
            spleen_semi=tuple(float(s) for s in spleen_semi), spleen_centre=tuple(float(c) for c in spleen_centre),
            spleen_dhu=rng.uniform(-15.0, 10.0),
            organ_index=float(index), organ_semi=tuple(float(s) for s in semi),
            organ_centre=(float(cx), float(cy), float(cz)), organ_angles=(float(theta), float(phi)),
            organ_hu=float(organ_hu),
        )


_INTERP: dict[tuple[int, int], np.ndarray] = {}


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """(n x cells+1) normalized Gaussian weights: a smooth interpolation from a coarse grid to n samples."""
    key = (n, cells)
    if key not in _INTERP:
        centres = np.arange(cells + 1) / cells
        x = (np.arange(n) + 0.5) / n
        w = np.exp(-(((x[:, None] - centres[None, :]) * cells / 0.75) ** 2))
        _INTERP[key] = (w / w.sum(1, keepdims=True)).astype(np.float32)
    return _INTERP[key]


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: Sequence[int]) -> np.ndarray:
    """Smooth random texture of unit standard deviation with about `cells` bumps along each axis."""
    coarse = rng.standard_normal(tuple(c + 1 for c in cells), dtype=np.float32)
    mats = [_interp_matrix(n, c) for n, c in zip(shape, cells)]
    out = np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True)
    return out / max(float(out.std()), 1e-6)


def _grid(size: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Voxel-centre coordinates (broadcastable X, Y, Z arrays) in units of half the in-plane field of view."""
    half = 0.5 * min(size[0] * spacing[0], size[1] * spacing[1])
    axes = [((np.arange(n) - (n - 1) / 2.0) * s / half).astype(np.float32) for n, s in zip(size, spacing)]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :], half


def _check_geometry(
    size: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """`size` and `spacing` as three ints >= 16 and three positive floats; ValueError naming the bad one otherwise."""
    try:
        sz = tuple(int(s) for s in size)
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"size={size!r} / spacing={spacing!r}: expected three voxel counts (X, Y, Z) and three "
                         "voxel spacings in mm") from None
    if len(sz) != 3 or any(s != float(v) for s, v in zip(sz, size)) or min(sz) < 16:
        raise ValueError(f"size={size!r}: accepted are three integers (X, Y, Z voxels), each >= 16")
    if len(sp) != 3 or not all(np.isfinite(sp)) or min(sp) <= 0:
        raise ValueError(f"spacing={spacing!r}: accepted are three positive voxel spacings in mm (X, Y, Z)")
    return sz, sp  # type: ignore[return-value]


def render_ct_phantom(
    anatomy: PatientAnatomy3D,
    rng: np.random.Generator,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    findings: Sequence[str] = (),
    masks: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Renders one synthetic CT-like volume.

    Args:
        anatomy: the patient's anatomy (:meth:`PatientAnatomy3D.draw`).
        rng: generator for everything that varies between scans of a patient.
        size: voxels along (X, Y, Z), each >= 16.
        spacing: voxel spacing in mm along (X, Y, Z); the phantom fills the in-plane field of view.
        findings: which of "Hypodense lesion", "Hyperdense lesion", "Calcification" to draw
            (Hepatomegaly follows from ``anatomy.organ_index``).
        masks: a dict to fill with boolean ``size`` masks: ``"body"``, ``"organ"`` (the liver-like organ's
            ellipsoid, lesions included) and one per lesion class of :data:`DEMO3D_CLASSES` (the voxels a
            lesion changed by at least half its contrast, or for a calcification by at least half as much as
            its brightest voxel; empty when not drawn). The volume and the random draws are the same with
            or without it.

    Returns:
        (volume as float32 HU in ``(X, Y, Z)`` order, before quantization to the files' int16; details of
        what was drawn, as written to ``manifest.csv``: lesion centres as voxel indices, radii in mm).

    Raises:
        ValueError: `size` or `spacing` is not three positive numbers, or `findings` names an unknown class.
    """
    size, spacing = _check_geometry(size, spacing)
    unknown = [f for f in findings if f not in _PREVALENCE]
    if unknown:
        raise ValueError(f"findings {unknown} are not drawable; accepted: {sorted(_PREVALENCE)}")
    a = anatomy
    x0, y0, z0, half = _grid(size, spacing)
    eps = spacing[0] / half  # one in-plane voxel: the width of every soft edge
    shape = size
    # per-scan positioning on the table
    dx, dy, dz = rng.normal(0.0, 0.015), rng.normal(0.0, 0.015), rng.uniform(-0.06, 0.06)
    x, y, z = x0 - dx, y0 - dy, z0 - dz
    # contrast phase and scanner of this scan
    aorta_hu = rng.uniform(110.0, 260.0)
    ivc_hu = rng.uniform(80.0, 170.0)
    kidney_hu = rng.uniform(110.0, 200.0)
    noise_hu = rng.uniform(5.0, 13.0)
    cal_slope, cal_offset = rng.uniform(0.96, 1.04), rng.uniform(-20.0, 20.0)
    details: dict[str, str] = {"organ_index": f"{a.organ_index:.4f}"}

    def ellipse(cx: float, cy: float, sa: float, sb: float) -> np.ndarray:
        r = np.sqrt(((x - cx) / sa) ** 2 + ((y - cy) / sb) ** 2)
        return _ramp((1.0 - r) * min(sa, sb), eps)

    def paint(hu: np.ndarray, m: np.ndarray, value) -> np.ndarray:
        return hu + (value - hu) * m

    def to_voxel(p: np.ndarray) -> str:
        idx = [p[i] * half / spacing[i] + (size[i] - 1) / 2.0 for i in range(3)]
        return "/".join(f"{v:.2f}" for v in idx)

    def snap_z(p: np.ndarray) -> np.ndarray:
        """`p` moved along Z onto the nearest slice centre: thick slices would otherwise hide part of a tiny spot."""
        step = spacing[2] / half
        p[2] = (np.round(p[2] / step + (size[2] - 1) / 2.0) - (size[2] - 1) / 2.0) * step
        return p

    def window(p: np.ndarray, reach) -> tuple[slice, slice, slice]:
        """The voxels within `reach` (one value, or one per axis) of `p` (grid coordinates), and one more."""
        reach = np.broadcast_to(np.asarray(reach, dtype=float), (3,))
        out = []
        for i, axis in enumerate((x0[:, 0, 0], y0[0, :, 0], z0[0, 0, :])):
            lo = int(np.searchsorted(axis, p[i] - reach[i])) - 1
            hi = int(np.searchsorted(axis, p[i] + reach[i])) + 1
            out.append(slice(max(lo, 0), min(hi, size[i])))
        return tuple(out)  # type: ignore[return-value]

    def distance(p: np.ndarray, win: tuple[slice, slice, slice]) -> np.ndarray:
        return np.sqrt((x0[win[0]] - p[0]) ** 2 + (y0[:, win[1]] - p[1]) ** 2 + (z0[:, :, win[2]] - p[2]) ** 2)

    def ellipsoid(c: Sequence[float], semi: Sequence[float], rot: np.ndarray | None = None) -> tuple:
        """(window, soft mask, normalized radius) of an ellipsoid centred at `c` (patient coordinates), computed
        over the window of the grid it touches; `rot` turns the ellipsoid's own axes into the patient's."""
        semi = np.asarray(semi, dtype=float)
        turn = np.eye(3) if rot is None else rot
        pc = np.asarray(c, dtype=float) + [dx, dy, dz]
        # half-extents along the patient's axes, and the margin where the soft edge reaches 0
        win = window(pc, np.sqrt(((turn * semi) ** 2).sum(1)) + eps * (semi.max() / semi.min() + 1.0))
        px, py, pz = x0[win[0]] - pc[0], y0[:, win[1]] - pc[1], z0[:, :, win[2]] - pc[2]
        if rot is not None:  # into the ellipsoid's own axes: rot.T @ (p - c)
            px, py, pz = (rot[0, 0] * px + rot[1, 0] * py + rot[2, 0] * pz,
                          rot[0, 1] * px + rot[1, 1] * py + rot[2, 1] * pz,
                          rot[0, 2] * px + rot[1, 2] * py + rot[2, 2] * pz)
        r = np.sqrt((px / semi[0]) ** 2 + (py / semi[1]) ** 2 + (pz / semi[2]) ** 2)
        return win, _ramp((1.0 - r) * semi.min(), eps), r

    # body: air, subcutaneous fat, abdominal wall muscle, cavity of bowel and mesenteric fat
    body = ellipse(0.0, 0.0, a.body_a, a.body_b)
    inner = ellipse(0.0, 0.0, a.body_a - a.fat, a.body_b - a.fat)
    cavity = ellipse(0.0, 0.0, a.body_a - a.fat - a.wall, a.body_b - a.fat - a.wall)
    cells = [max(2, round(6 * n * s / (2 * half))) for n, s in zip(size, spacing)]
    fat_field = 1.0 / (1.0 + np.exp(-(_smooth_field(rng, shape, cells) - a.visceral_fat) / 0.25))
    visceral = a.fat_hu * fat_field + a.bowel_hu * (1.0 - fat_field)
    hu = np.full(shape, -1000.0, np.float32)
    hu = paint(hu, body, a.fat_hu)
    hu = paint(hu, inner, a.muscle_hu)
    hu = paint(hu, cavity, visceral)
    # ribs: bony bands in the wall, descending from the spine towards the front, above a patient-specific level
    ang = np.arctan2(y / a.body_b, x / a.body_a)  # +pi/2 at the back (spine), -pi/2 at the front
    from_back = np.abs((ang - np.pi / 2.0 + np.pi) % (2.0 * np.pi) - np.pi)  # 0 at the spine, pi at the front
    phase = (z + a.rib_slope * from_back) / a.rib_period
    z_eps = 0.5 * spacing[2] / half
    band = _ramp(0.045 - np.abs(phase - np.floor(phase) - 0.5) * a.rib_period, z_eps)
    mid_a, mid_b = a.body_a - a.fat - 0.5 * a.wall, a.body_b - a.fat - 0.5 * a.wall
    ring = np.sqrt((x / mid_a) ** 2 + (y / mid_b) ** 2)
    shell = _ramp(0.016 - np.abs(ring - 1.0) * min(mid_a, mid_b), eps)
    arc = _ramp(np.minimum(from_back - 0.45, 2.5 - from_back), eps)  # neither over the spine nor at the front
    ribs = band * shell * arc * _ramp(z - a.rib_top, z_eps)
    hu = paint(hu, ribs, a.rib_hu)
    # kidneys, spleen, vessels, paraspinal muscles
    for side in (-1.0, 1.0):
        kc = (side * (a.spine_r + a.kidney_semi[0] + 0.06), a.spine_y - 0.02, a.kidney_z)
        win, kid, _ = ellipsoid(kc, a.kidney_semi)
        hu[win] = paint(hu[win], kid, kidney_hu)
        win, sinus, _ = ellipsoid((kc[0] - side * 0.3 * a.kidney_semi[0], kc[1], kc[2]),
                                  (0.45 * a.kidney_semi[0], 0.4 * a.kidney_semi[1], 0.6 * a.kidney_semi[2]))
        hu[win] = paint(hu[win], sinus, a.fat_hu + 60.0)  # the renal sinus: fat and urine
        hu = paint(hu, ellipse(side * (a.spine_r + a.paraspinal[0] * 0.8), a.spine_y + a.spine_r * 0.6,
                               a.paraspinal[0], a.paraspinal[1]), a.muscle_hu)
    win, spleen, _ = ellipsoid(a.spleen_centre, a.spleen_semi)
    hu[win] = paint(hu[win], spleen, a.organ_hu + a.spleen_dhu)
    aorta_c = (0.25 * a.spine_r, a.spine_y - a.spine_r - a.aorta_r - 0.01)
    hu = paint(hu, ellipse(*aorta_c, a.aorta_r, a.aorta_r), aorta_hu)
    # atherosclerotic calcifications on the aortic wall: the same tiny bright spots as the finding, outside the organ
    for angle, zc, width, peak in a.aortic_calcifications:
        sigma = width * _MM
        p = snap_z(np.array([aorta_c[0] + dx + a.aorta_r * np.cos(angle),
                             aorta_c[1] + dy + a.aorta_r * np.sin(angle), zc]))
        win = window(p, 4 * sigma)
        hu[win] += peak * np.exp(-0.5 * (distance(p, win) / sigma) ** 2)
    hu = paint(hu, ellipse(-1.3 * a.spine_r, a.spine_y - a.spine_r - a.ivc_r, a.ivc_r, 0.8 * a.ivc_r), ivc_hu)
    # spine: vertebral bodies (cancellous core, cortical rim) and discs
    vert = ellipse(0.0, a.spine_y, a.spine_r, a.spine_r)
    core = ellipse(0.0, a.spine_y, a.spine_r - 1.5 * eps, a.spine_r - 1.5 * eps)
    vphase = (z / a.vertebra_period) % 1.0
    disc = _ramp(0.1 - np.abs(vphase - 0.5), eps / a.vertebra_period)
    hu = paint(hu, vert, a.cortical_hu * (1.0 - disc) + 80.0 * disc)
    hu = paint(hu, core * (1.0 - disc), a.cancellous_hu)
    # the liver-like organ, with a faint texture
    rot = a.organ_rotation
    win, soft, organ_r = ellipsoid(a.organ_centre, a.organ_semi, rot)
    organ = np.zeros(shape, np.float32)
    organ[win] = soft
    texture = _smooth_field(rng, shape, [c + 2 for c in cells]) * rng.uniform(2.0, 5.0)
    hu[win] = paint(hu[win], soft, a.organ_hu + texture[win])
    if masks is not None:
        masks["body"] = np.broadcast_to(body >= 0.5, shape).copy()
        masks["organ"] = np.zeros(shape, bool)
        masks["organ"][win] = organ_r < 1.0
        for name in _PREVALENCE:
            masks[name] = np.zeros(shape, bool)

    # lesions inside the organ
    taken: list[tuple[np.ndarray, float]] = []
    z_half = float(z0.max()) + 0.5 * spacing[2] / half
    semi = np.asarray(a.organ_semi)
    centre = np.asarray(a.organ_centre) + [dx, dy, dz]

    # 26 directions: a sphere fits in the organ when these points of its (slightly grown) surface do
    grid = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), -1).reshape(-1, 3)
    directions = grid[np.abs(grid).sum(1) > 0] / np.linalg.norm(grid[np.abs(grid).sum(1) > 0], axis=1, keepdims=True)

    def place(radius: float) -> np.ndarray | None:
        """A centre (coordinates of this scan's grid) where a sphere of `radius` lies inside the organ and the
        field of view, apart from the lesions already placed; None when 100 tries find none."""
        for _ in range(100):
            q = rng.normal(size=3)
            q *= rng.uniform() ** (1.0 / 3.0) / np.linalg.norm(q)
            p = centre + rot @ (q * semi)
            if abs(p[2]) > z_half - radius - spacing[2] / half:
                continue
            local = (p - centre + (radius + eps) * directions) @ rot / semi
            if (local**2).sum(1).max() >= 1.0:
                continue
            if all(np.linalg.norm(p - o) > radius + r + 2 * eps for o, r in taken):
                return p
        return None

    # (finding, how many, contrast to the organ in HU)
    for name, count, contrast in (("Hypodense lesion", (1, 3), (-105.0, -55.0)),
                                  ("Hyperdense lesion", (1, 2), (60.0, 110.0))):
        if name not in findings:
            continue
        spots = []
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            r = min(rng.uniform(3.0, 6.0) * _MM, 0.5 * semi.min())
            p = place(r)
            while p is None and r > 2.5 * _MM:  # no room left for this size: a smaller lesion
                r *= 0.85
                p = place(r)
            if p is None:
                continue
            taken.append((p, r))
            c = rng.uniform(*contrast)
            soft = rng.uniform(0.3, 1.0) * eps
            win = window(p, r + 2 * soft)
            d = distance(p, win)
            prof = _ramp(r - d, soft)
            hu[win] += c * prof * organ[win]
            if masks is not None:
                masks[name][win] |= (prof * organ[win]) >= 0.5
            spots.append(f"{to_voxel(p)}/{r * half:.2f}/{c:.0f}")
        if not spots:  # a labelled finding is always drawn: one smallest lesion, at the organ's centre if need be
            r = 2.0 * _MM
            p = place(r)
            p = centre if p is None else p
            c = float(np.mean(contrast))
            win = window(p, r + 2 * eps)
            prof = _ramp(r - distance(p, win), eps)
            hu[win] += c * prof * organ[win]
            if masks is not None:
                masks[name][win] |= (prof * organ[win]) >= 0.5
            spots.append(f"{to_voxel(p)}/{r * half:.2f}/{c:.0f}")
        details[DETAIL_KEYS[name]] = ";".join(spots)
    if "Calcification" in findings:
        spots = []
        for _ in range(int(rng.integers(1, 5))):
            sigma = rng.uniform(0.55, 0.85) * _MM
            p = place(3 * sigma)
            if p is None:
                continue
            p = snap_z(p)
            taken.append((p, 3 * sigma))
            peak = rng.uniform(350.0, 900.0)
            win = window(p, 4 * sigma)
            blob = np.exp(-0.5 * (distance(p, win) / sigma) ** 2)
            hu[win] += peak * blob
            if masks is not None:
                masks["Calcification"][win] |= blob >= 0.5 * float(blob.max())
            spots.append(f"{to_voxel(p)}/{sigma * half:.2f}/{peak:.0f}")
        if not spots:  # a labelled finding is always drawn
            p = snap_z(centre.copy())
            win = window(p, 4 * 0.7 * _MM)
            blob = np.exp(-0.5 * (distance(p, win) / (0.7 * _MM)) ** 2)
            hu[win] += 600.0 * blob
            if masks is not None:
                masks["Calcification"][win] |= blob >= 0.5 * float(blob.max())
            spots.append(f"{to_voxel(p)}/{0.7 * _MM * half:.2f}/600")
        details[DETAIL_KEYS["Calcification"]] = ";".join(spots)

    # scanner: correlated voxel noise, low-frequency shading, calibration error
    noise = rng.standard_normal(shape, dtype=np.float32)
    for axis in (0, 1):
        noise = 0.5 * noise + 0.25 * (np.roll(noise, 1, axis) + np.roll(noise, -1, axis))
    hu += noise * (noise_hu / 0.375)
    hu += _smooth_field(rng, shape, [2, 2, 2]) * rng.uniform(2.0, 8.0) * body
    hu = hu * cal_slope + cal_offset
    details.update(noise_hu=f"{noise_hu:.1f}", calibration=f"{cal_slope:.3f}/{cal_offset:.1f}")
    return hu.astype(np.float32), details


def volume_affine(size: Sequence[int] = DEFAULT_SIZE, spacing: Sequence[float] = DEFAULT_SPACING) -> np.ndarray:
    """The 4 x 4 RAS affine (mm) of the demo volumes: voxel (i, j, k) -> RAS, centred on the origin.

    The array's X axis runs to the patient's left, Y to the posterior, Z to the head (DICOM's LPS axes,
    as :class:`hmn.transforms.LoadXray` returns a DICOM series), so the affine is
    ``diag(-sx, -sy, sz)`` with the translation that puts the volume's centre at (0, 0, 0).
    """
    size, spacing = _check_geometry(size, spacing)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [(size[0] - 1) / 2.0 * spacing[0], (size[1] - 1) / 2.0 * spacing[1], -(size[2] - 1) / 2.0 * spacing[2]]
    return aff


def _quantize(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)


def _uid(seed_bytes: bytes) -> str:
    """A deterministic DICOM UID under the 2.25 (UUID-derived) root."""
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed_bytes).digest()[:16], "big"))


def _write_nifti(path: str, vol: np.ndarray, affine: np.ndarray) -> None:
    """int16 HU with scl_slope 1 and scl_inter 0, qform and sform both the scanner affine (as converters write CT)."""
    import nibabel as nib
    from nibabel.openers import Opener

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(vol.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0  # nibabel's own save would write NaN (no scaling) here
    hdr["descrip"] = b"SYNTHETIC hmn demo3d CT phantom"
    hdr.set_data_offset(352)
    tmp = os.path.join(os.path.dirname(path), ".part-" + os.path.basename(path))  # still ends in .gz
    with Opener(tmp, "wb") as f:  # nibabel's gzip writer stores no time stamp: the bytes are reproducible
        hdr.write_to(f)
        f.write(np.asfortranarray(vol).tobytes(order="F"))
    os.replace(tmp, path)


def _write_dicom_series(folder: str, vol: np.ndarray, spacing: Sequence[float], pid: str, stem: str) -> None:
    """One CT Image Storage file per axial slice: rows run along Y, columns along X, slices along Z."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    if os.path.isdir(folder):
        shutil.rmtree(folder)  # slices of another geometry must not stay beside the new ones
    tmp = folder + ".part"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    nx, ny, nz = vol.shape
    sx, sy, sz = spacing
    origin = [-(nx - 1) / 2.0 * sx, -(ny - 1) / 2.0 * sy, -(nz - 1) / 2.0 * sz]  # LPS of voxel (0, 0, 0)
    study, series, frame = (_uid(f"{pid}/{stem}/{what}".encode()) for what in ("study", "series", "frame"))
    stored = (vol.astype(np.int32) - _HU_MIN).astype(np.uint16)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = _uid(f"{pid}/{stem}/{k}".encode())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
        # Synthetic identifiers (no real person): they let tests check that loaders keep them out of meta/logs.
        ds.PatientName = f"Synthetic^Phantom3D{pid}"
        ds.PatientID = pid
        ds.PatientBirthDate = "19000101"
        ds.AccessionNumber = f"D3{stem.replace('_', '')}"[:16]
        ds.StudyDescription = "SYNTHETIC CT PHANTOM - not a real patient"
        ds.SeriesDescription = "SYNTHETIC abdomen phantom"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.PatientPosition = "FFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = origin[2] + k * sz
        ds.ImagePositionPatient = [round(origin[0], 4), round(origin[1], 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.SliceThickness = sz
        ds.PixelSpacing = [sy, sx]  # row spacing (between rows, along Y), column spacing (along X)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _HU_MIN, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = _WINDOW
        ds.KVP = 120
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(os.path.join(tmp, f"slice_{k:04d}.dcm"), enforce_file_format=True)
    os.replace(tmp, folder)


def _config(n_volumes: int, size, spacing, seed: int, fractions: Sequence[float], volumes_per_patient) -> dict:
    return {
        "version": DEMO3D_VERSION,
        "n_volumes": int(n_volumes),
        "size": [int(s) for s in size],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
        "fractions": [float(f) for f in fractions],
        "volumes_per_patient": [int(volumes_per_patient[0]), int(volumes_per_patient[1])],
        "class_names": list(DEMO3D_CLASSES),
    }


def make_demo3d_dataset(
    root: str | os.PathLike,
    n_volumes: int = 600,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    volumes_per_patient: tuple[int, int] = (1, 3),
    overwrite: bool = False,
    workers: int | None = None,
) -> str:
    """Writes the synthetic 3D demo dataset under `root` and returns the path of its datalist JSON.

    The result is deterministic in the arguments. If `root` already holds a complete dataset made
    with the same arguments, nothing is regenerated (unless `overwrite`). The volumes are SYNTHETIC
    phantoms, not scans of people; see the module docstring.

    Args:
        root: output folder (e.g. a cache folder); created if needed.
        n_volumes: number of volumes (>= 1).
        size: voxels along (X, Y, Z), each >= 16; the default is what the 3D bundles train on.
        spacing: voxel spacing in mm along (X, Y, Z); the default has 2x thicker slices than pixels.
        seed: master seed.
        fractions: patient-wise (training, validation, test) fractions.
        volumes_per_patient: inclusive range of scans per synthetic patient.
        overwrite: regenerate even when a matching dataset exists.
        workers: processes rendering in parallel (default: up to 2); the result does not depend on it.

    Returns:
        path of ``datalist.json`` (``class_names`` = :data:`DEMO3D_CLASSES`; images are relative paths
        of ``volumes/P<patient>_<scan>.nii.gz`` files and, for every tenth volume, of DICOM series folders
        ``volumes/P<patient>_<scan>/``).

    Raises:
        ValueError: a count, `size`, `spacing`, `fractions` or `volumes_per_patient` is out of range.
    """
    size, spacing = _check_geometry(size, spacing)
    if int(n_volumes) != n_volumes or n_volumes < 1:
        raise ValueError(f"n_volumes={n_volumes!r}: accepted is an integer >= 1")
    try:
        lo_n, hi_n = (int(v) for v in volumes_per_patient)
    except (TypeError, ValueError):
        raise ValueError(f"volumes_per_patient={volumes_per_patient!r}: accepted is (low, high) "
                         "with 1 <= low <= high") from None
    if not 1 <= lo_n <= hi_n:
        raise ValueError(f"volumes_per_patient={volumes_per_patient!r}: accepted is (low, high) with 1 <= low <= high")
    patient_split(["p"], fractions, seed)  # checks the fractions before anything is written
    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    cfg = _config(n_volumes, size, spacing, seed, fractions, (lo_n, hi_n))
    datalist_path = os.path.join(root, "datalist.json")
    cfg_path = os.path.join(root, "demo_config.json")
    if not overwrite and os.path.isfile(datalist_path) and os.path.isfile(cfg_path):
        try:
            with open(cfg_path) as f:
                same = json.load(f) == cfg
        except (OSError, ValueError):
            same = False
        if same and _complete(datalist_path, size[2]):
            logger.info("reusing the 3D demo dataset in %s", root)
            return datalist_path
    for stale in (datalist_path, cfg_path):
        if os.path.exists(stale):
            os.remove(stale)  # the datalist is written last: its presence marks a complete dataset

    vol_dir = os.path.join(root, "volumes")
    os.makedirs(vol_dir, exist_ok=True)
    master = np.random.default_rng(seed)
    counts: list[int] = []
    while sum(counts) < n_volumes:
        counts.append(int(master.integers(lo_n, hi_n + 1)))
    counts[-1] -= sum(counts) - n_volumes
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    tasks = [(seed, p, count, int(start), size, spacing, vol_dir)
             for p, (count, start) in enumerate(zip(counts, starts))]
    results = render_patients(_make_patient, tasks, counts, root, workers, "synthetic 3D demo volumes")
    write_demo_files(root, results, fractions, seed, cfg, cfg_path, DEMO3D_CLASSES, "hmn-demo3d-synthetic",
                     "SYNTHETIC CT-like abdominal phantoms generated by hmn.data.demo3d; not real patients",
                     datalist_path)
    logger.info("wrote %d synthetic 3D demo volumes to %s", n_volumes, root)
    return datalist_path


def _patient_anatomy(seed: int, p: int) -> tuple[PatientAnatomy3D, bool]:
    prng = np.random.default_rng([seed, p, 0])
    big = bool(prng.random() < _P_HEPATOMEGALY)
    return PatientAnatomy3D.draw(prng, big), big


def _patient_volume(seed: int, p: int, k: int, anatomy: PatientAnatomy3D, size, spacing,
                    masks: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, str], list[int]]:
    vrng = np.random.default_rng([seed, p, k + 1])
    present = [name for name, prob in _PREVALENCE.items() if vrng.random() < prob]
    hu, details = render_ct_phantom(anatomy, vrng, size, spacing, present, masks=masks)
    big = anatomy.organ_index > HEPATOMEGALY_THRESHOLD
    label = [int((c == "Hepatomegaly" and big) or c in present) for c in DEMO3D_CLASSES]
    return _quantize(hu), details, label


def render_demo_volume(
    seed: int,
    patient: int,
    index: int,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
) -> tuple[np.ndarray, list[int], dict[str, np.ndarray]]:
    """Renders again one volume of a dataset made by :func:`make_demo3d_dataset` with `seed`, `size` and `spacing`.

    Args:
        seed: the dataset's seed.
        patient: the synthetic patient's number (``P00012_01``: patient 12).
        index: the scan's number within the patient (``P00012_01``: scan 1), from 0.
        size, spacing: the dataset's.

    Returns:
        (the volume exactly as stored in its file: int16 HU in ``(X, Y, Z)`` order, which is also the array
        :class:`hmn.transforms.LoadXray` returns from the NIfTI file or, with ``voi="ignore"``, from the DICOM
        series; its label, one 0/1 per :data:`DEMO3D_CLASSES`; the masks of :func:`render_ct_phantom`).

    Raises:
        ValueError: a negative patient or scan number, or a bad `size` / `spacing`.
    """
    if int(patient) < 0 or int(index) < 0:
        raise ValueError(f"patient={patient!r}, index={index!r}: accepted are integers >= 0")
    masks: dict[str, np.ndarray] = {}
    anatomy, _ = _patient_anatomy(int(seed), int(patient))
    vol, _, label = _patient_volume(int(seed), int(patient), int(index), anatomy, size, spacing, masks)
    return vol, label, masks


def parse_volume_name(name: str | os.PathLike) -> tuple[int, int]:
    """(patient, scan) of a demo volume's file or folder name (``P00012_01.nii.gz`` or ``P00012_01/``).

    Raises:
        ValueError: the name is not one the demo writes.
    """
    base = os.path.basename(os.path.normpath(os.fspath(name)))
    m = re.fullmatch(r"P(\d{5})_(\d{2})(\.nii\.gz)?", base)
    if m is None:
        raise ValueError(f"{name!r} is not a 3D demo volume name (P<5 digits>_<2 digits>.nii.gz or a folder P<5>_<2>)")
    return int(m.group(1)), int(m.group(2))


def _make_patient(task: tuple) -> tuple[list[dict], list[dict]]:
    """Renders and writes all volumes of one synthetic patient (a module-level function, for worker processes)."""
    seed, p, count, start, size, spacing, vol_dir = task
    pid = f"P{p:05d}"
    mrng = np.random.default_rng([seed, p, 1_000_000])
    sex, age = ("F", "M")[int(mrng.integers(2))], int(mrng.integers(18, 91))
    anatomy, _ = _patient_anatomy(seed, p)
    affine = volume_affine(size, spacing)
    entries, rows = [], []
    for k in range(count):
        vol, details, label = _patient_volume(seed, p, k, anatomy, size, spacing)
        stem = f"{pid}_{k:02d}"
        if (start + k) % _DICOM_EVERY == 0:
            fmt, path = "dicom_series", os.path.join(vol_dir, stem)
            _write_dicom_series(path, vol, spacing, pid, stem)
            rel = f"volumes/{stem}"
        else:
            fmt, path = "nifti", os.path.join(vol_dir, stem + ".nii.gz")
            _write_nifti(path, vol, affine)
            rel = f"volumes/{stem}.nii.gz"
        entries.append({"image": path, "label": label, "patient_id": pid, "age": age, "sex": sex})
        rows.append({"image": rel, "patient_id": pid, "format": fmt, **dict(zip(DEMO3D_CLASSES, label)), **details})
    return entries, rows


def _complete(datalist_path: str, n_slices: int) -> bool:
    """Every listed volume is there: a NIfTI file, or a series folder holding all of its slices."""
    try:
        with open(datalist_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    base = os.path.dirname(datalist_path)
    for s in ("training", "validation", "test"):
        for e in data.get(s, []):
            path = os.path.join(base, e["image"])
            if os.path.isdir(path):
                if sum(n.endswith(".dcm") for n in os.listdir(path)) != n_slices:
                    return False
            elif not os.path.isfile(path):
                return False
    return True
