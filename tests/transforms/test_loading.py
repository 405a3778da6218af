"""LoadXray / LoadXrayd on real files, each checked against pydicom / PIL / nibabel computed independently."""

from __future__ import annotations

import logging
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing

from hmn.transforms import ImageReadError, LoadXray, LoadXrayd, sniff_format

LUMA = np.array([0.299, 0.587, 0.114])


def reference(path: str, frame: int | None = None) -> tuple[np.ndarray, pydicom.Dataset]:
    """Stored pixels -> pydicom's own Modality LUT, the way a pydicom user would do it."""
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    return apply_modality_lut(arr, ds).astype(np.float64), ds


def nominal_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The Modality LUT output range of PS3.3 C.11.2.1.2 (what pydicom's apply_windowing maps to)."""
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation == 1 else (0, 2**bits - 1)
    slope, icpt = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return lo * slope + icpt, hi * slope + icpt


# --------------------------------------------------------------------------------------------------
# MONOCHROME1 chest radiographs


def test_monochrome1_cr_is_mirrored_about_its_range(realfile):
    path = realfile("RG1_UNCI.dcm")  # real CR chest X-ray, MONOCHROME1, 15 bits stored
    values, ds = reference(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    lo, hi = nominal_range(ds)
    assert (lo, hi) == (0.0, 32767.0)
    out = LoadXray(voi="ignore")(path)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(out[0].numpy(), (lo + hi) - values)
    assert out.meta["inverted"] is True and out.meta["voi"] == "none"
    assert out.meta["filename_or_obj"] == path and out.meta["photometric_interpretation"] == "MONOCHROME1"
    # not inverting gives the modality values themselves
    np.testing.assert_array_equal(LoadXray(voi="ignore", invert_monochrome1=False)(path)[0].numpy(), values)


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCI.dcm"])
def test_monochrome1_window_matches_pydicom_then_mirrored(realfile, name):
    path = realfile(name)  # RG3: 10-bit CR
    values, ds = reference(path)
    lo, hi = nominal_range(ds)
    expected = (lo + hi) - apply_voi_lut(values, ds)
    out = LoadXray()(path)
    assert out.meta["voi"] == "window"
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5 * (hi - lo))
    if name == "RG1_UNCI.dcm":  # chest PA: air in the lungs is darker than the spine and mediastinum
        img = out[0].numpy()
        h, w = img.shape
        band = img[int(0.3 * h) : int(0.45 * h)]
        mediastinum = band[:, int(0.46 * w) : int(0.54 * w)].mean()
        assert band[:, int(0.25 * w) : int(0.35 * w)].mean() < mediastinum
        assert band[:, int(0.65 * w) : int(0.75 * w)].mean() < mediastinum


def test_jpeg2000_lossless_cr_equals_uncompressed(realfile):
    a = LoadXray(voi="ignore")(realfile("RG1_J2KR.dcm"))
    b = LoadXray(voi="ignore")(realfile("RG1_UNCR.dcm"))
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_jpeg2000_lossy_cr_is_close_to_uncompressed(realfile):
    a = LoadXray()(realfile("RG1_J2KI.dcm"))[0].numpy()
    b = LoadXray()(realfile("RG1_UNCI.dcm"))[0].numpy()
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 0.01 * (b.max() - b.min())


# --------------------------------------------------------------------------------------------------
# transfer syntaxes and VOI against pydicom's LUT functions


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",  # explicit VR little endian, window 600/1600
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "JPEG-LL.dcm",  # JPEG lossless process 14
        "JPGExtended.dcm",  # JPEG extended 12-bit
        "JPEG2000.dcm",
        "JPEGLSNearLossless_16.dcm",  # JPEG-LS near lossless
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # 8-bit US, window
        "CT_small.dcm",  # rescale -1024, no window
        "693_UNCR.dcm",  # CT, rescale + window 40/100
        "693_J2KR.dcm",
        "MR2_UNCR.dcm",  # rescale slope 3.77 + window
        "vlut_04.dcm",  # VOI LUT Sequence
    ],
)
@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input")
def test_voi_apply_matches_pydicom(realfile, name):
    path = realfile(name)
    values, ds = reference(path)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    out = LoadXray(voi="apply")(path)
    if has_voi:
        expected = apply_voi_lut(values, ds)
        assert out.meta["voi"] in ("window", "voi_lut")
    else:  # no VOI in the file: the full range min..max window over pydicom's nominal output range
        lo, hi = nominal_range(ds)
        expected = (values - values.min()) / (values.max() - values.min()) * (hi - lo) + lo
        assert out.meta["voi"] == "full_range"
    span = max(float(np.ptp(expected)), 1.0)
    np.testing.assert_allclose(out[0].numpy(), expected, atol=2e-5 * span)
    # voi="ignore" gives pydicom's modality values exactly
    np.testing.assert_allclose(LoadXray(voi="ignore")(path)[0].numpy(), values, rtol=1e-6, atol=1e-3)


def test_modality_lut_sequence_matches_pydicom(realfile):
    path = realfile("mlut_18.dcm")
    values, ds = reference(path)
    assert "ModalityLUTSequence" in ds
    np.testing.assert_array_equal(LoadXray(voi="ignore")(path)[0].numpy(), values)


@pytest.mark.parametrize("index", [0, 1])
def test_second_window_is_selectable(realfile, index):
    path = realfile("MR-SIEMENS-DICOM-WithOverlays.dcm")  # two windows: [450, 200] / [790, 443]
    values, ds = reference(path)
    expected = apply_windowing(values, ds, index=index)
    np.testing.assert_allclose(LoadXray(voi_index=index)(path)[0].numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(realfile, tmp_path, function):
    ds = pydicom.dcmread(realfile("MR_small.dcm"))
    ds.VOILUTFunction = function
    path = str(tmp_path / "mr.dcm")
    ds.save_as(path)
    values, ds2 = reference(path)
    expected = apply_windowing(values, ds2)
    np.testing.assert_allclose(LoadXray()(path)[0].numpy(), expected, atol=0.05)


def test_full_range_ignores_the_file_window(realfile):
    path = realfile("MR_small.dcm")
    values, ds = reference(path)
    lo, hi = nominal_range(ds)
    out = LoadXray(voi="full_range")(path)[0].numpy()
    np.testing.assert_allclose(out, (values - values.min()) / np.ptp(values) * (hi - lo) + lo, atol=0.05)
    assert out.min() == pytest.approx(lo) and out.max() == pytest.approx(hi)


def test_broken_jpeg_is_a_clear_error(realfile):
    path = realfile("JPEG-lossy.dcm")  # deliberately broken JPEG stream
    with pytest.raises(ImageReadError, match="cannot be decoded") as e:
        LoadXray()(path)
    assert e.value.path == path and path in str(e.value)


# --------------------------------------------------------------------------------------------------
# multi-frame


def test_multiframe_rejected_by_default(realfile):
    path = realfile("emri_small.dcm")  # 10 frames
    with pytest.raises(ImageReadError, match="10 frames"):
        LoadXray()(path)


@pytest.mark.parametrize("frame,expected_index", [(3, 3), (-1, 9), (0, 0)])
def test_multiframe_frame_selection(realfile, frame, expected_index):
    path = realfile("emri_small.dcm")
    pixels = pydicom.dcmread(path).pixel_array
    out = LoadXray(voi="ignore", frame=frame)(path)
    assert out.shape == (1, 64, 64)
    np.testing.assert_array_equal(out[0].numpy(), pixels[expected_index])
    assert out.meta["frame"] == expected_index


def test_multiframe_all_frames_as_volume(realfile):
    path = realfile("emri_small.dcm")  # no PixelSpacing: a volume needs assume_spacing (test_dicom_geometry.py)
    pixels = pydicom.dcmread(path).pixel_array
    out = LoadXray(voi="ignore", frame="all", assume_spacing=1.0)(path)
    assert out.shape == (1, 64, 64, 10)
    for k in (0, 4, 9):
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), pixels[k].T)


def test_multiframe_out_of_range(realfile):
    with pytest.raises(ImageReadError, match="out of range"):
        LoadXray(frame=10)(realfile("emri_small.dcm"))


# --------------------------------------------------------------------------------------------------
# colour DICOM


@pytest.mark.parametrize("name", ["US1_UNCR.dcm", "US1_J2KR.dcm", "SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm"])
def test_colour_dicom_to_grey(realfile, name):
    path = realfile(name)
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)  # pydicom converts YBR to RGB
    out = LoadXray(color="grey")(path)
    assert out.shape == (1,) + rgb.shape[:2]
    np.testing.assert_allclose(out[0].numpy(), rgb @ LUMA, atol=1e-3)
    kept = LoadXray(color="rgb")(path)
    np.testing.assert_array_equal(kept.numpy(), np.moveaxis(rgb, -1, 0))


def test_colour_dicom_reject(realfile):
    with pytest.raises(ImageReadError, match="RGB.*color='reject'"):
        LoadXray(color="reject")(realfile("US1_UNCR.dcm"))


def test_palette_colour_dicom_without_preamble(realfile):
    path = realfile("OT-PAL-8-face.dcm")  # PALETTE COLOR, no 128-byte preamble
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    np.testing.assert_allclose(LoadXray()(path)[0].numpy(), rgb @ LUMA, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# privacy


def _identified_dicom(realfile, tmp_path) -> str:
    ds = pydicom.dcmread(realfile("CT_small.dcm"))
    ds.PatientName = "Doe^Janet"
    ds.PatientID = "MRN-8675309"
    ds.PatientBirthDate = "19610203"
    ds.AccessionNumber = "ACC-424242"
    path = str(tmp_path / "identified.dcm")
    ds.save_as(path)
    return path


def test_no_patient_identifiers_in_meta_or_logs(realfile, tmp_path, caplog):
    path = _identified_dicom(realfile, tmp_path)
    caplog.set_level(logging.DEBUG)
    out = LoadXray()(path)
    text = repr(out.meta) + caplog.text
    for secret in ("Doe", "Janet", "8675309", "19610203", "424242"):
        assert secret not in text
    assert not any(k.startswith("Patient") or k == "AccessionNumber" for k in out.meta)


def test_listed_dicom_tags_are_added(realfile, tmp_path):
    path = _identified_dicom(realfile, tmp_path)
    out = LoadXray(dicom_tags=["PatientID", "StudyDate"])(path)
    assert out.meta["PatientID"] == "MRN-8675309"
    assert out.meta["StudyDate"] == str(pydicom.dcmread(path).StudyDate)
    assert "PatientName" not in out.meta
    with pytest.raises(ValueError, match="not DICOM keywords"):
        LoadXray(dicom_tags=["PatientNmae"])


# --------------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_8bit_rows_first(tmp_path):
    arr = (np.arange(30 * 50).reshape(30, 50) % 251).astype(np.uint8)  # non-square: a transposition shows
    path = str(tmp_path / "a.png")
    Image.fromarray(arr).save(path)
    out = LoadXray()(path)
    assert out.shape == (1, 30, 50)
    np.testing.assert_array_equal(out[0].numpy(), arr)
    assert out.meta["format"] == "png" and out.meta["bits_stored"] == 8


def test_png_16bit_keeps_precision(realfile, tmp_path):
    values = pydicom.dcmread(realfile("RG1_UNCR.dcm")).pixel_array[::8, ::8]  # real CR data, > 8 bits
    arr = (values.astype(np.uint32) * 2).astype(np.uint16)
    assert arr.max() > 255
    path = str(tmp_path / "cr16.png")
    Image.fromarray(arr).save(path)
    out = LoadXray()(path)
    np.testing.assert_array_equal(out[0].numpy(), arr.astype(np.float32))
    assert out.meta["bits_stored"] == 16


def test_rgb_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 36, 3), dtype=np.uint8)
    png = str(tmp_path / "c.png")
    Image.fromarray(rgb).save(png)
    np.testing.assert_allclose(LoadXray()(png)[0].numpy(), rgb.astype(np.float64) @ LUMA, atol=1e-3)
    np.testing.assert_array_equal(LoadXray(color="rgb")(png).numpy(), np.moveaxis(rgb, -1, 0))
    with pytest.raises(ImageReadError, match="colour"):
        LoadXray(color="reject")(png)
    grey = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (40, 1))
    jpg = str(tmp_path / "g.jpg")
    Image.fromarray(grey).save(jpg, quality=95)
    out = LoadXray()(jpg)
    assert out.shape == (1, 40, 64) and out.meta["format"] == "jpeg"
    assert np.abs(out[0].numpy() - grey).mean() < 2.0


def test_content_not_extension_decides(realfile, tmp_path):
    arr = np.full((8, 9), 7, np.uint8)
    fake_dcm = str(tmp_path / "really_a_png.dcm")
    Image.fromarray(arr).save(fake_dcm, format="PNG")
    assert sniff_format(fake_dcm) == "pil"
    np.testing.assert_array_equal(LoadXray()(fake_dcm)[0].numpy(), arr)
    fake_png = str(tmp_path / "really_a_dicom.png")
    shutil.copy(realfile("CT_small.dcm"), fake_png)
    assert LoadXray()(fake_png).meta["format"] == "dicom"


# --------------------------------------------------------------------------------------------------
# NIfTI and DICOM series


@pytest.mark.parametrize("name", ["anatomical.nii", "example_nifti2.nii.gz", "standard.nii.gz"])
def test_nifti_keeps_affine_and_spacing(realfile, name):
    path = realfile(name)
    img = nib.load(path)
    data = np.asarray(img.get_fdata(dtype=np.float32))
    out = LoadXray()(path)
    if data.ndim == 3:
        np.testing.assert_array_equal(out[0].numpy(), data)
    else:
        np.testing.assert_array_equal(out.numpy(), np.moveaxis(data, -1, 0))
    np.testing.assert_allclose(out.affine.numpy(), img.affine)
    np.testing.assert_allclose(out.meta["spacing"], img.header.get_zooms()[:3])
    assert out.meta["format"] == "nifti"


def test_nifti_4d_time_becomes_channels(realfile):
    path = realfile("example4d.nii.gz")
    img = nib.load(path)
    out = LoadXray()(path)
    assert out.shape == (img.shape[3],) + img.shape[:3]
    np.testing.assert_allclose(out[1].numpy(), img.get_fdata()[..., 1], rtol=1e-6)


def test_dicom_series_folder(realfile, tmp_path):
    base = pydicom.dcmread(realfile("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    origin = [float(v) for v in base.ImagePositionPatient]
    for k, name in zip(range(3), ["c.dcm", "a.dcm", "b.dcm"]):  # names in the wrong order on purpose
        ds = pydicom.dcmread(realfile("CT_small.dcm"))
        ds.SOPInstanceUID, ds.InstanceNumber = pydicom.uid.generate_uid(), k + 1  # three images, not one copied
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + 5.0 * k]
        ds.PixelData = (ds.pixel_array + 100 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(str(folder / name))
    out = LoadXray(voi="ignore")(str(folder))
    ref = apply_modality_lut(base.pixel_array, base)
    assert out.shape == (1, base.Columns, base.Rows, 3)
    for k in range(3):
        np.testing.assert_allclose(out[0, :, :, k].numpy(), (ref + 100 * k).T)
    sp = [float(v) for v in base.PixelSpacing]
    # LPS -> RAS: x and y flip sign; z steps 5 mm
    np.testing.assert_allclose(out.affine.numpy()[:3, :3], np.diag([-sp[1], -sp[0], 5.0]), atol=1e-6)
    np.testing.assert_allclose(out.affine.numpy()[:3, 3], [-origin[0], -origin[1], origin[2]], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# bad input


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_bad_inputs_give_clear_errors(realfile, tmp_path):
    ct = realfile("CT_small.dcm")
    raw = open(ct, "rb").read()
    png_bytes = tmp_path / "ok.png"
    Image.fromarray(np.zeros((64, 64), np.uint8) + 3).save(png_bytes)
    cases = {
        "missing": (str(tmp_path / "nope.dcm"), "not found"),
        "empty": (_write(tmp_path / "empty.dcm", b""), "empty"),
        "text": (_write(tmp_path / "notes.png", b"patient list\nrow,col\n" * 20), "not a recognised image"),
        "truncated dicom pixels": (realfile("MR_truncated.dcm"), "truncated"),
        "truncated dicom header": (_write(tmp_path / "cut.dcm", raw[:600]), "truncated"),
        "truncated png": (_write(tmp_path / "cut.png", png_bytes.read_bytes()[:60]), "truncated|corrupt|cannot be read"),
        "no pixel data": (realfile("rtplan.dcm"), "no pixel data"),
        "empty after meta": (realfile("emri_small_jpeg_2k_lossless_too_short.dcm"), "truncated or corrupt"),
    }
    for what, (path, pattern) in cases.items():
        with pytest.raises(ImageReadError, match=pattern) as e:
            LoadXray()(path)
        assert path in str(e.value), what


def test_unsupported_photometric_and_empty_pixels(realfile, tmp_path):
    ds = pydicom.dcmread(realfile("MR_small.dcm"))
    ds.PhotometricInterpretation = "HSV"
    hsv = str(tmp_path / "hsv.dcm")
    ds.save_as(hsv)
    with pytest.raises(ImageReadError, match="unsupported photometric interpretation 'HSV'"):
        LoadXray()(hsv)
    ds = pydicom.dcmread(realfile("MR_small.dcm"))
    ds.Rows = 0
    ds.PixelData = b""
    empty = str(tmp_path / "empty_pixels.dcm")
    ds.save_as(empty)
    with pytest.raises(ImageReadError, match="empty"):
        LoadXray()(empty)


def test_nan_pixels_rejected(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    path = str(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ImageReadError, match="2 of 120 pixels are NaN or infinite"):
        LoadXray()(path)
    tif = str(tmp_path / "nan.tif")
    Image.fromarray(np.array([[1.0, np.nan]], np.float32)).save(tif)
    with pytest.raises(ImageReadError, match="NaN"):
        LoadXray()(tif)


def test_errors_pickle_for_worker_processes():
    import pickle

    e = pickle.loads(pickle.dumps(ImageReadError("/x/y.dcm", "truncated")))
    assert (e.path, e.reason, str(e)) == ("/x/y.dcm", "truncated", "/x/y.dcm: truncated")


# --------------------------------------------------------------------------------------------------
# dictionary transform, bundle config, collation


def test_dictionary_transform_from_bundle_config(realfile, tmp_path):
    parser = ConfigParser(
        {"load": {"_target_": "hmn.transforms.LoadXrayd", "keys": ["image", "extra"], "voi": "ignore",
                  "allow_missing_keys": True}}
    )
    load = parser.get_parsed_content("load")
    assert isinstance(load, LoadXrayd)
    path = realfile("CT_small.dcm")
    out = load({"image": path, "label": [1, 0]})
    values, _ = reference(path)
    np.testing.assert_allclose(out["image"][0].numpy(), values)
    assert out["label"] == [1, 0]
    with pytest.raises(KeyError):
        LoadXrayd(keys=["image", "extra"])({"image": path})


def test_mixed_formats_collate(realfile, tmp_path):
    from monai.transforms import Compose, Resized

    png = str(tmp_path / "p.png")
    Image.fromarray(np.zeros((40, 30), np.uint16) + 500).save(png)
    pipeline = Compose([LoadXrayd(keys="image"), Resized(keys="image", spatial_size=(32, 32))])
    items = [pipeline({"image": p}) for p in (realfile("RG3_UNCI.dcm"), png, realfile("MR_small.dcm"))]
    batch = list_data_collate(items)
    assert batch["image"].shape == (3, 1, 32, 32)
    assert list(batch["image"].meta["format"]) == ["dicom", "png", "dicom"]


def test_errors_from_inside_pydicom_are_ours(realfile):
    # whatever went wrong inside pydicom, the caller sees an ImageReadError naming the file and the reason
    for name, reason in (("JPEG-lossy.dcm", "JPEG Extended"), ("MR_truncated.dcm", "truncated")):
        with pytest.raises(ImageReadError) as e:
            LoadXray()(realfile(name))
        assert reason in e.value.reason and os.path.basename(e.value.path) == name


# --------------------------------------------------------------------------------------------------
# resizing while loading


@pytest.mark.parametrize(
    "name, mode",
    [("RG1_UNCI.dcm", m) for m in ("area", "bilinear", "bicubic", "nearest")]
    + [("anatomical.nii", m) for m in ("area", "trilinear", "nearest")],
)
@pytest.mark.numerics
def test_resize_at_load_equals_monai_resized(realfile, name, mode):
    from monai.transforms import Resized

    path = realfile(name)
    plain = LoadXrayd("image")({"image": path})["image"]
    size = (64, 48) if plain.ndim == 3 else (24, 20, 16)
    expected = Resized("image", size, mode=mode)({"image": plain})["image"]
    got = LoadXrayd("image", spatial_size=size, resize_mode=mode)({"image": path})["image"]
    assert tuple(got.shape[1:]) == size
    torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(got.affine, expected.affine.to(got.affine.dtype))
    orig = tuple(plain.shape[1:])
    assert tuple(got.meta["resized_from"]) == orig
    np.testing.assert_allclose(got.meta["spacing"], [s * o / n for s, o, n in zip(plain.meta["spacing"], orig, size)])
    np.testing.assert_array_equal(got.meta["spatial_shape"], orig)


def test_resize_at_load_int_size_and_bad_values(realfile, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray((np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)).save(path)
    assert tuple(LoadXray(spatial_size=16)(path).shape) == (1, 16, 16)
    assert tuple(LoadXray(spatial_size=(40, 30))(path).shape) == (1, 40, 30)  # same size: unchanged
    for bad in (0, (16, -1), "224", 2.5, ()):
        with pytest.raises(ValueError, match=r"spatial_size=.*accepted are None, a positive int"):
            LoadXray(spatial_size=bad)
    with pytest.raises(ValueError, match=r"resize_mode='linear' is not one of"):
        LoadXray(spatial_size=16, resize_mode="linear")
    with pytest.raises(ImageReadError, match=r"a\.png.*spatial_size=\(8, 8, 8\) has 3 axes but the image has 2"):
        LoadXray(spatial_size=(8, 8, 8))(path)
    # the linear mode follows the image's dimension, whichever of the two names is given
    tri = LoadXray(spatial_size=16, resize_mode="trilinear")(path)
    torch.testing.assert_close(tri, LoadXray(spatial_size=16, resize_mode="bilinear")(path))


@pytest.mark.numerics
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])
@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_aspect_preserving_resize_equals_monai_resize_then_pad_or_crop(realfile, aspect, size):
    """The real 1955x1841 CR (not square): pixels and affine as MONAI's Resize to the fitting (pad) or
    covering (crop) size, then ResizeWithPadOrCrop / CenterSpatialCrop, padding with the image minimum."""
    from monai.transforms import CenterSpatialCrop, Resize, ResizeWithPadOrCrop

    path = realfile("RG1_UNCI.dcm")
    plain = LoadXray()(path)
    orig = tuple(plain.shape[1:])
    assert orig[0] != orig[1]
    factor = (min if aspect == "pad" else max)(s / o for s, o in zip(size, orig))
    fitted = tuple(int(round(o * factor)) for o in orig)
    resized = Resize(fitted, mode="area")(plain)
    if aspect == "pad":
        expected = ResizeWithPadOrCrop(size, value=float(resized.min()))(resized)
    else:
        expected = CenterSpatialCrop(size)(resized)
    got = LoadXray(spatial_size=size, aspect=aspect)(path)
    assert tuple(got.shape[1:]) == size and got.meta["aspect"] == aspect
    torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(got.affine, expected.affine.to(got.affine.dtype))
    # the anatomy keeps its proportions: one pixel covers the same distance along both axes
    assert got.meta["spacing"][0] == pytest.approx(got.meta["spacing"][1] * plain.meta["spacing"][0] / plain.meta["spacing"][1], rel=0.02)
    with pytest.raises(ValueError, match=r"aspect='squash' is not one of"):
        LoadXray(spatial_size=size, aspect="squash")


def _png_bytes(arr: np.ndarray, colour_type: int) -> bytes:
    """A PNG written by hand (PNG spec: IHDR, one IDAT of filter-0 rows, IEND), for the 16-bit colour and
    grey+alpha files PIL cannot write."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_alpha_is_dropped_when_opaque_and_refused_when_not(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    opaque = np.full((12, 10), 255, np.uint8)
    Image.fromarray(np.dstack([grey, opaque]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([rgb, opaque]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(LoadXray()(tmp_path / "la.png")[0].numpy(), grey.astype(np.float32))
    torch.testing.assert_close(LoadXray()(tmp_path / "rgba.png").as_tensor(), LoadXray()(tmp_path / "rgb.png").as_tensor())
    see_through = opaque.copy()
    see_through[3, 4] = 0
    Image.fromarray(np.dstack([rgb, see_through]), "RGBA").save(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match=r"cut\.png.*transparent pixels \(mode RGBA, 1 of 120 not opaque\)"):
        LoadXray()(tmp_path / "cut.png")


@pytest.mark.parametrize("colour_type, channels", [(2, 3), (4, 2), (6, 4)])
def test_16_bit_colour_png_is_refused_not_truncated(tmp_path, colour_type, channels):
    arr = np.random.default_rng(1).integers(0, 65536, (6, 5, channels), dtype=np.uint16)
    arr[..., -1] = 65535 if colour_type in (4, 6) else arr[..., -1]
    path = tmp_path / "deep.png"
    path.write_bytes(_png_bytes(arr, colour_type))
    assert Image.open(path).size == (5, 6)  # a valid PNG that PIL opens
    with pytest.raises(ImageReadError, match=r"deep\.png.*stores 16-bit colour or grey\+alpha samples"):
        LoadXray()(path)
    # 16-bit greyscale keeps every bit (colour type 0)
    path.write_bytes(_png_bytes(arr[..., 0], 0))
    np.testing.assert_array_equal(LoadXray()(path)[0].numpy(), arr[..., 0].astype(np.float32))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_gives_the_displayed_image(tmp_path, fmt):
    stored = np.zeros((8, 12), np.uint8)
    stored[:2, :3] = 255  # a bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: the viewer rotates 90 degrees clockwise to display it
    path = tmp_path / f"rot.{fmt}"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), **({"quality": 100} if fmt == "jpeg" else {}))
    got = LoadXray()(path)[0].numpy()
    displayed = np.rot90(stored, k=-1)  # clockwise
    assert got.shape == displayed.shape == (12, 8)
    np.testing.assert_allclose(got, displayed.astype(np.float32), atol=40 if fmt == "jpeg" else 0)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_a_transparency_key_is_refused_when_a_pixel_matches_it(tmp_path, mode):
    arr = np.random.default_rng(2).integers(1, 200, (8, 6, 3) if mode == "RGB" else (8, 6)).astype(
        np.uint16 if mode == "I;16" else np.uint8)
    key = (7, 7, 7) if mode == "RGB" else 7
    Image.fromarray(arr).save(tmp_path / "keyed.png", transparency=key)
    LoadXray()(tmp_path / "keyed.png")  # no pixel has the key: nothing is transparent
    arr[2, 3] = key
    Image.fromarray(arr).save(tmp_path / "keyed.png", transparency=key)
    with pytest.raises(ImageReadError, match=r"keyed\.png.*transparent pixels \(1 of 48 match its transparency key"):
        LoadXray()(tmp_path / "keyed.png")
