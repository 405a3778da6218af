"""LoadXray on images already in memory (MONAI Deploy's bundle operator hands the preprocessing an array, not a
path): the project's own loaded MetaTensor, and the SDK's layout (modality values, X/Y/Z, no channel)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from hmn.transforms import ImageReadError, LoadXray, PercentileRescale


@pytest.fixture(scope="module")
def demo_dicoms(tmp_path_factory):
    """{photometric interpretation: [paths]} of a small demo set's DICOM radiographs."""
    from hmn.data import make_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, n_images=16, image_size=48, seed=2)
    out: dict[str, list[str]] = {}
    for f in sorted(glob.glob(os.path.join(root, "images", "*.dcm"))):
        out.setdefault(str(pydicom.dcmread(f, stop_before_pixels=True).PhotometricInterpretation), []).append(f)
    assert set(out) == {"MONOCHROME1", "MONOCHROME2"}
    return out


def _sdk_layout(path: str, say_mono1: bool = False) -> MetaTensor:
    """What MONAI Deploy's DICOMSeriesToVolumeOperator + bundle operator give for a radiograph: the stored values
    through the Modality LUT (pydicom's apply_modality_lut, independent of the project's reader), columns first
    (X, Y, Z=1), no channel axis, the spacing in X/Y/Z order."""
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    meta = {"original_channel_dim": "no_channel", "spacing": np.array([0.7, 0.5, 1.0]), "filename_or_obj": ""}
    if say_mono1:
        meta["photometric_interpretation"] = "MONOCHROME1"
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(values.T[..., None])), meta=meta)


@pytest.mark.parametrize("aspect", ["stretch", "pad", "crop"])
def test_the_projects_loaded_image_gives_the_file_paths_result(demo_dicoms, aspect):
    """An image LoadXray loaded (full size, both photometric interpretations, VOI applied) and handed back in memory
    is only resized: pixels, affine and the photometric meta equal loading the file at that size."""
    for pi, files in demo_dicoms.items():
        path = files[0]
        full = LoadXray()(path)
        got = LoadXray(spatial_size=(40, 24), aspect=aspect)(full)
        want = LoadXray(spatial_size=(40, 24), aspect=aspect)(path)
        assert torch.equal(got.as_tensor(), want.as_tensor()), pi
        assert torch.allclose(got.affine, want.affine), pi
        for key in ("photometric_interpretation", "voi", "inverted", "spacing", "resized_from", "filename_or_obj"):
            assert got.meta[key] == want.meta[key], (pi, key)


def test_the_sdk_layout_of_a_monochrome2_image_gives_the_file_paths_network_input(demo_dicoms):
    """MONOCHROME2, window wider than the data (no clipping): after the bundles' percentile normalization the
    in-memory SDK image and the file give the same network input; the spacing is read in X/Y order."""
    rescale = PercentileRescale(0.5, 99.5)
    for path in demo_dicoms["MONOCHROME2"][:3]:
        got = LoadXray(spatial_size=32)(_sdk_layout(path))
        want = LoadXray(spatial_size=32)(path)
        assert got.shape == want.shape == (1, 32, 32)
        np.testing.assert_allclose(rescale(got).numpy(), rescale(want).numpy(), atol=1e-5)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert got.meta["resized_from"] == want.meta["resized_from"] == (ds.Rows, ds.Columns)
        assert got.meta["voi"] == "none" and got.meta["format"] == "in_memory"
    one = LoadXray()(_sdk_layout(demo_dicoms["MONOCHROME2"][0]))
    assert one.meta["spacing"] == (0.5, 0.7)  # (row spacing, column spacing) = (Y, X)


def test_monochrome1_in_memory_is_inverted_only_when_its_meta_says_so(demo_dicoms):
    rescale = PercentileRescale(0.5, 99.5)
    path = demo_dicoms["MONOCHROME1"][0]
    want = rescale(LoadXray(spatial_size=32)(path)).numpy()
    said = rescale(LoadXray(spatial_size=32)(_sdk_layout(path, say_mono1=True))).numpy()
    np.testing.assert_allclose(said, want, atol=1e-5)
    unsaid = rescale(LoadXray(spatial_size=32)(_sdk_layout(path))).numpy()
    np.testing.assert_allclose(unsaid, 1.0 - want, atol=1e-5)  # the stock path's limit: air comes out bright


def test_bad_in_memory_images_are_refused_naming_them():
    with pytest.raises(ImageReadError, match="in-memory image of dtype object"):
        LoadXray()(np.array([[None, 1]], dtype=object))
    with pytest.raises(ImageReadError, match="<in-memory image>.*accepted are 2D or 3D"):
        LoadXray()(np.zeros((2, 3, 4, 5, 6), dtype=np.float32))
    with pytest.raises(ImageReadError, match="over max_pixels=10"):
        LoadXray(max_pixels=10)(np.zeros((4, 4), dtype=np.float32))
    named = MetaTensor(torch.full((4, 4), float("nan")), meta={"filename_or_obj": "series 1.2.3"})
    with pytest.raises(ImageReadError, match="series 1.2.3.*NaN"):
        LoadXray()(named)
    with pytest.raises(TypeError, match="file path or an in-memory image"):
        LoadXray()(3)
