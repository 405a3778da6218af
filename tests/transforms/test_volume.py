"""The CT/MR volume pipeline (hmn.transforms.volume) on real NIfTI and DICOM series, against nibabel and pydicom."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor, PydicomReader
from monai.transforms import Compose, LoadImage, Orientation, ScaleIntensityRange
from pydicom.pixels import apply_modality_lut

from hmn.transforms import (
    WINDOW_PRESETS,
    CropOrPadd,
    ImageReadError,
    LoadXray,
    PercentileRescale,
    WindowIntensity,
    volume_compose,
    volume_transforms,
)

CT_SERIES = "dicomdirtests/98892001/CT5N"  # five 16x16 axial CT slices of one series, in pydicom's wheel


def _run(compose: Compose, data: dict, upto: int) -> dict:
    """The data after the compose's first `upto` steps."""
    for step in compose.transforms[:upto]:
        data = step(data)
    return data


# --------------------------------------------------------------------------------------------------
# NIfTI


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])  # LAS 3D; oblique 4D (2 channels)
def test_nifti_through_the_pipeline(realfile, name):
    path = realfile(name)
    img = nib.load(path)
    canonical = nib.as_closest_canonical(img)  # nibabel's own reorientation to RAS
    compose = volume_compose(spacing=3.0, spatial_size=(24, 20, 16), intensity="mr")
    channels = 1 if img.ndim == 3 else img.shape[3]

    loaded = _run(compose, {"image": path}, 1)["image"]
    assert isinstance(loaded, MetaTensor)
    np.testing.assert_allclose(loaded.meta["spacing"], img.header.get_zooms()[:3])
    np.testing.assert_allclose(loaded.affine.numpy(), img.affine, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = LoadImage(reader="NibabelReader", ensure_channel_first=True, image_only=True)(path)
    if img.ndim == 3:  # MONAI reads a 4D NIfTI as channel-last spatial data; ours makes its last axis channels
        np.testing.assert_array_equal(loaded.numpy(), monai.numpy())
        np.testing.assert_allclose(loaded.affine.numpy(), monai.affine.numpy())

    oriented = _run(compose, {"image": path}, 2)["image"]
    assert nib.aff2axcodes(oriented.affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(oriented.affine.numpy(), canonical.affine, atol=1e-5)
    expected = np.asarray(canonical.dataobj, dtype=np.float32)
    expected = expected[None] if expected.ndim == 3 else np.moveaxis(expected, -1, 0)
    np.testing.assert_array_equal(oriented.numpy(), expected)

    resampled = _run(compose, {"image": path}, 3)["image"]
    affine = resampled.affine.numpy()
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [3.0, 3.0, 3.0], atol=1e-5)
    # MONAI keeps voxel centres: the first voxel stays put and n voxels of z mm span (n - 1) * z mm
    zooms = np.asarray(canonical.header.get_zooms()[:3], dtype=float)
    n = np.asarray(canonical.shape[:3])
    assert resampled.shape == (channels, *np.round((n - 1) * zooms / 3.0 + 1).astype(int))
    np.testing.assert_allclose(affine[:3, 3], canonical.affine[:3, 3], atol=1e-4)
    directions = canonical.affine[:3, :3] / zooms
    np.testing.assert_allclose(affine[:3, :3] / 3.0, directions, atol=1e-5)

    out = compose({"image": path})["image"]
    assert out.shape == (channels, 24, 20, 16) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) < float(out.max()) <= 1.0
    assert nib.aff2axcodes(out.affine.numpy()) == ("R", "A", "S")


# --------------------------------------------------------------------------------------------------
# DICOM series


@pytest.fixture
def ct_series(realfile, tmp_path):
    """The CT series copied to a folder; its files' names sort in the reverse of their slice order."""
    first = realfile(f"{CT_SERIES}/2062")
    folder = tmp_path / "ct"
    shutil.copytree(first.rsplit("/", 1)[0], folder)
    return folder


def _expected_geometry(folder):
    """(HU slices, RAS affine, spacing) computed from the headers alone, by the DICOM standard (PS3.3 C.7.6.2.1.1)."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    row_dir = np.array([float(v) for v in datasets[0].ImageOrientationPatient[:3]])
    col_dir = np.array([float(v) for v in datasets[0].ImageOrientationPatient[3:]])
    normal = np.cross(row_dir, col_dir)
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)  # between rows, between columns
    step = positions[1] - positions[0]
    np.testing.assert_allclose(np.diff(positions, axis=0), np.tile(step, (len(datasets) - 1, 1)), atol=1e-4)
    # voxel (i = column, j = row, k = slice) -> LPS; RAS flips the first two axes
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dc, col_dir * dr, step, positions[0]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    hu = [apply_modality_lut(ds.pixel_array, ds).astype(np.float32) for ds in datasets]
    return hu, ras, (dc, dr, float(np.linalg.norm(step)))


def test_dicom_series_geometry_and_hu(ct_series):
    hu, ras, spacing = _expected_geometry(ct_series)
    out = LoadXray(voi="ignore")(str(ct_series))
    assert isinstance(out, MetaTensor) and out.shape == (1, 16, 16, 5)
    np.testing.assert_allclose(out.affine.numpy(), ras, atol=1e-4)
    np.testing.assert_allclose(out.meta["spacing"], spacing, atol=1e-5)
    assert spacing[2] == pytest.approx(2.5)
    for k, ref in enumerate(hu):  # (X = columns, Y = rows): the slice transposed
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), ref.T)
    assert float(out.min()) < -800  # HU (air near -1000), not stored values or a display range

    # MONAI's PydicomReader stacks the slices in the other order; in RAS both are the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = LoadImage(reader=PydicomReader(), ensure_channel_first=True, image_only=True)(str(ct_series))
    to_ras = Orientation(axcodes="RAS", labels=None)
    ours, theirs = to_ras(out), to_ras(theirs)
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_dicom_series_through_the_ct_pipeline(ct_series):
    hu, ras, _ = _expected_geometry(ct_series)
    compose = volume_compose(spacing=None, spatial_size=(16, 16, 5), intensity="ct", window=(40, 400))
    out = compose({"image": str(ct_series)})["image"]
    affine = out.affine.numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), nib.affines.voxel_sizes(ras), atol=1e-5)
    # every output voxel holds the soft-tissue window (-160..240 HU -> 0..1) of the HU at its world point
    volume = np.stack([s.T for s in hu], axis=-1)
    to_source = np.linalg.inv(ras) @ affine
    for index in [(0, 0, 0), (3, 11, 2), (15, 15, 4), (8, 2, 1)]:
        i, j, k = np.rint(to_source @ [*index, 1.0])[:3].astype(int)
        expected = np.clip((volume[i, j, k] + 160.0) / 400.0, 0.0, 1.0)
        assert float(out[(0, *index)]) == pytest.approx(expected, abs=1e-6)

    resampled = _run(volume_compose(spacing=(1.0, 1.0, 2.0), spatial_size=8), {"image": str(ct_series)}, 3)["image"]
    np.testing.assert_allclose(nib.affines.voxel_sizes(resampled.affine.numpy()), [1.0, 1.0, 2.0], atol=1e-6)
    extent = (np.array([16, 16, 5]) - 1) * nib.affines.voxel_sizes(ras)
    assert resampled.shape[1:] == tuple(np.round(extent / [1.0, 1.0, 2.0] + 1).astype(int))


def test_series_slices_at_one_position_or_of_two_orientations_are_refused(ct_series):
    files = sorted(ct_series.iterdir())
    ds = pydicom.dcmread(files[0])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[0])
    with pytest.raises(ImageReadError, match="same position along the slice normal"):
        LoadXray(voi="ignore")(str(ct_series))
    ds.ImagePositionPatient = [-72.2, -143.0, 20.0]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[0])
    with pytest.raises(ImageReadError, match="ImageOrientationPatient .* differs"):
        LoadXray(voi="ignore")(str(ct_series))


def test_series_with_a_missing_slice_is_refused(ct_series):
    middle = sorted(ct_series.iterdir())[2]  # z = 3.7625 of -1.24 .. 8.76 mm: gaps 2.5, 5, 2.5
    middle.unlink()
    with pytest.raises(ImageReadError, match="5 mm apart along the slice normal where the others are 2.5 mm apart: "
                                             "1 slice missing"):
        LoadXray(voi="ignore")(str(ct_series))


# --------------------------------------------------------------------------------------------------
# intensity on 3D arrays, hand-worked


def test_ct_window_on_a_volume():
    hu = np.array([-1000, -160, -60, 40, 140, 240, 1000, 0], dtype=np.float32).reshape(1, 2, 2, 2)
    expected = np.array([0, 0, 0.25, 0.5, 0.75, 1, 1, 0.4], dtype=np.float32).reshape(1, 2, 2, 2)
    step = next(t for t in volume_compose(window=(40, 400)).transforms if type(t).__name__ == "VolumeIntensityd")
    out = step({"image": MetaTensor(torch.from_numpy(hu), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))})["image"]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-7)
    assert isinstance(out, MetaTensor) and out.affine[0, 0] == 2.0
    np.testing.assert_allclose(WindowIntensity(preset="soft_tissue")(hu), expected, atol=1e-7)
    monai = ScaleIntensityRange(a_min=-160, a_max=240, b_min=0.0, b_max=1.0, clip=True)(hu)
    np.testing.assert_allclose(np.asarray(monai), expected, atol=1e-7)


def test_mr_percentiles_on_a_volume():
    # 27 values 0, 10, ..., 260: numpy's linear percentile 1 lies at rank 0.26 (2.6), 99 at rank 25.74 (257.4)
    values = np.arange(27, dtype=np.float32).reshape(1, 3, 3, 3) * 10
    out = PercentileRescale(1, 99)(values)
    assert out[0, 0, 0, 0] == 0.0 and out[0, 2, 2, 2] == 1.0  # 0 and 260 clip
    assert out.flat[13] == pytest.approx((130 - 2.6) / 254.8)  # 0.5
    assert out.flat[1] == pytest.approx((10 - 2.6) / 254.8)
    # the pipeline's MR step normalises each channel (sequence) on its own scale
    step = next(t for t in volume_compose(intensity="mr").transforms if type(t).__name__ == "VolumeIntensityd")
    two = np.concatenate([values, values * 7 + 100])
    both = step({"image": two})["image"]
    np.testing.assert_allclose(both[0], out[0], atol=1e-6)
    np.testing.assert_allclose(both[1], out[0], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# the config list


def test_config_list_names_the_steps_and_is_json():
    ct = volume_transforms(keys=["image"], spacing=(1.5, 1.5, 2.0), spatial_size=(96, 96, 64), window="lung")
    assert [s["_target_"] for s in ct] == [
        "hmn.transforms.LoadXrayd",
        "monai.transforms.Orientationd",
        "monai.transforms.Spacingd",
        "hmn.transforms.VolumeIntensityd",
        "hmn.transforms.CropOrPadd",
        "monai.transforms.EnsureTyped",
    ]
    assert ct[0]["voi"] == "ignore" and ct[1]["axcodes"] == "RAS"
    assert ct[3]["intensity"] == "ct" and ct[3]["window"] == list(WINDOW_PRESETS["lung"])
    assert ct[2]["pixdim"] == [1.5, 1.5, 2.0] and ct[2]["mode"] == "bilinear" and ct[4]["spatial_size"] == [96, 96, 64]
    assert ct[4]["mode"] == "crop_or_pad"
    assert json.loads(json.dumps(ct)) == ct
    mr = volume_transforms(spacing=None, intensity="mr", percentiles=(0.5, 99.5))
    assert "monai.transforms.Spacingd" not in [s["_target_"] for s in mr]
    assert (mr[2]["intensity"], mr[2]["percentiles"], mr[2]["keys"]) == ("mr", [0.5, 99.5], ["image"])


def test_config_references_pass_through_and_are_checked_when_parsed():
    """What the 3D bundles write: every setting a reference, resolved (and checked) by MONAI's parser."""
    from monai.bundle import ConfigParser

    steps = volume_transforms(spacing="@spacing", spatial_size="@image_size", intensity="@intensity", window="@window",
                              percentiles="@percentiles", crop_mode="@mode")
    assert steps[2]["pixdim"] == "@spacing" and steps[3]["intensity"] == "@intensity" and steps[4]["mode"] == "@mode"
    config = {"spacing": [2.0, 2.0, 4.0], "image_size": [8, 8, 4], "intensity": "mr", "window": [40, 400],
              "percentiles": [1, 99], "mode": "pad", "steps": steps}
    parsed = ConfigParser(config).get_parsed_content("steps")
    assert type(parsed[3].transform).__name__ == "PercentileRescale" and parsed[4].mode == "pad"
    bad = ConfigParser({**config, "intensity": "pet"})
    with pytest.raises(RuntimeError) as err:
        bad.get_parsed_content("steps")
    assert "intensity='pet' is not one of ('ct', 'mr')" in str(err.value.__cause__)


def test_crop_or_pad_modes():
    x = torch.arange(2 * 10 * 4 * 6, dtype=torch.float32).reshape(2, 10, 4, 6)
    cropped = CropOrPadd("image", [6, 6, 6])({"image": x})["image"]
    assert tuple(cropped.shape) == (2, 6, 6, 6)
    torch.testing.assert_close(torch.as_tensor(cropped)[:, :, 1:5], x[:, 2:8])  # centred crop on X, pad on Y
    assert float(torch.as_tensor(cropped)[:, :, 0].abs().sum()) == 0.0
    padded = CropOrPadd("image", [6, 6, 6], mode="pad")({"image": x})["image"]
    assert tuple(padded.shape) == (2, 10, 6, 6)  # only padded: X keeps its 10
    torch.testing.assert_close(torch.as_tensor(padded)[:, :, 1:5], x)
    with pytest.raises(ValueError, match="mode='crop' is not one of"):
        CropOrPadd("image", [6, 6, 6], mode="crop")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"intensity": "pet"}, r"intensity='pet' is not one of \('ct', 'mr'\)"),
        ({"window": (40, 0)}, "width must be > 0"),
        ({"window": "lungs"}, "unknown preset"),
        ({"window": 40}, r"\(center, width\)"),
        ({"intensity": "mr", "percentiles": (99, 1)}, "0 <= lower < upper <= 100"),
        ({"spatial_size": (96, 96)}, r"spatial_size=\(96, 96\).*three positive ints"),
        ({"spatial_size": (96, 96, 0)}, "three positive ints"),
        ({"spacing": (1.0, -1.0, 1.0)}, "three positive numbers"),
        ({"axcodes": "RAR"}, "one of L/R, one of A/P and one of S/I"),
        ({"keys": []}, "keys=\\[\\]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        volume_transforms(**kwargs)


# --------------------------------------------------------------------------------------------------
# files that are not volumes of the model's channels


def test_what_is_not_a_volume_of_the_models_channels_is_a_named_read_error(realfile, ct_series, tmp_path):
    """A 4D NIfTI (two volumes), a 2D image and a one-slice DICOM series: each an ImageReadError naming the file
    and what it holds, from the pipeline's first step; a 3D volume and the 4D file with channels=2 go through."""
    from PIL import Image

    from hmn.data.dataset import find_read_error

    four_d = realfile("example4d.nii.gz")  # 128 x 96 x 24 voxels, 2 volumes
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(png)
    one = tmp_path / "one_slice"
    one.mkdir()
    shutil.copy(sorted(ct_series.iterdir())[0], one / "IM0001")
    pipeline = volume_compose(spacing=None, spatial_size=(16, 16, 8), intensity="mr", channels=1)
    cases = [(four_d, "is a 4D file of 2 volumes"), (png, "has 2 spatial axes"), (one, "is a single slice")]
    for path, says in cases:
        with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps what a step raises
            pipeline({"image": str(path)})
        error = find_read_error(info.value)
        assert error is not None and error.path == str(path) and says in error.reason, info.value
    assert pipeline({"image": realfile("anatomical.nii")})["image"].shape == (1, 16, 16, 8)
    assert pipeline({"image": str(ct_series)})["image"].shape == (1, 16, 16, 8)
    two = volume_compose(spacing=None, spatial_size=(16, 16, 8), intensity="mr", channels=2)
    assert two({"image": four_d})["image"].shape == (2, 16, 16, 8)
    with pytest.raises(ValueError, match="channels=0"):
        LoadXray(channels=0)
