"""DICOM geometry: Enhanced (multi-frame) functional groups, missing pixel spacing, and series whose slices are
duplicated, missing or inconsistent. Every file is built here with pydicom; expectations are worked out from the
attributes written (PS3.3 C.7.6.2.1.1 for the voxel-to-patient mapping, C.7.6.16 for functional groups,
C.11.2.1.2 for the window), independently of the reader."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_windowing
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian

from hmn.transforms import ImageReadError, LoadXray, volume_compose

# hostile values ('inf', 'nan') are written on purpose; pydicom warns as it writes them
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR DS")

CT_SERIES = "dicomdirtests/98892001/CT5N"  # five 16x16 axial CT slices of one real series, in pydicom's wheel
ROOT = "1.2.826.0.1.3680043.8.498.7"  # UIDs of the files made here


def _uid(*parts: object) -> str:
    return ".".join([ROOT, *(str(p) for p in parts)])


def _image(ds: Dataset, stored: np.ndarray) -> None:
    """Unsigned 16-bit MONOCHROME2 pixels (frames first when 3D)."""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()


def _save(ds: Dataset, sop_class: str, path) -> str:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta, ds.SOPClassUID = meta, sop_class
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


_DEFAULT = object()


def _ct_slice(path, k: int, stored: np.ndarray | None = None, *, z: float | None = None, instance=_DEFAULT,
              sop=_DEFAULT, ipp=_DEFAULT, iop=(1, 0, 0, 0, 1, 0), spacing=(0.5, 0.5), intercept=-1024, slope=1,
              for_uid=_DEFAULT, **extra) -> str:
    """Slice `k` of a CT Image Storage series at z = 2.5 k mm (origin (-10, -20)); None drops an attribute."""
    ds = Dataset()
    ds.SOPInstanceUID = _uid(1, k) if sop is _DEFAULT else sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(2), _uid(3)
    ds.FrameOfReferenceUID = _uid(4) if for_uid is _DEFAULT else for_uid
    ds.Modality = "CT"
    ds.InstanceNumber = k + 1 if instance is _DEFAULT else instance
    z = 2.5 * k if z is None else z
    ds.ImagePositionPatient = [-10.0, -20.0, z] if ipp is _DEFAULT else ipp
    ds.ImageOrientationPatient = list(iop) if iop is not None else None
    ds.PixelSpacing = list(spacing) if spacing is not None else None
    ds.SliceThickness = 2.5
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
    if stored is None:
        stored = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 7 + 100 * k) % 4096
    _image(ds, stored)
    for key, value in extra.items():
        setattr(ds, key, value)
    for key in [key for key in ds.dir() if ds.get(key, 0) is None]:
        del ds[key]
    return _save(ds, CTImageStorage, path)


def _series(folder, n: int = 5, changes: dict | None = None) -> list[str]:
    """`n` regular slices in `folder`, named so that their names sort against their slice order;
    ``changes={k: {attribute: value}}`` alters slice k."""
    folder.mkdir(exist_ok=True)
    return [_ct_slice(folder / f"IM{n - k:04d}", k, **(changes or {}).get(k, {})) for k in range(n)]


def _read_error(folder, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        LoadXray(voi="ignore", **kwargs)(str(folder))
    return info.value


def _names(error: ImageReadError, *paths: str) -> bool:
    """Whether the error names every file in `paths` (its path or, for the others, their file names)."""
    text = str(error)
    return all(p in text or p.rsplit("/", 1)[-1] in text for p in paths)


# --------------------------------------------------------------------------------------------------
# 1. Enhanced CT: rescale, spacing, orientation and position in the functional groups (PS3.3 C.7.6.16)


def _item(**attributes) -> DicomSequence:
    item = Dataset()
    for key, value in attributes.items():
        setattr(item, key, value)
    return DicomSequence([item])


def _enhanced_ct(path, stored: np.ndarray, shared: dict, per_frame: list[dict]) -> str:
    """An Enhanced CT Image Storage file: `shared` and each of `per_frame` map macro sequence keywords
    (PixelMeasuresSequence, ...) to the attributes of their one item."""
    ds = Dataset()
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(5, 1), _uid(5, 2), _uid(5, 3)
    ds.FrameOfReferenceUID, ds.Modality = _uid(5, 4), "CT"
    ds.InstanceNumber, ds.NumberOfFrames = 1, stored.shape[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    group = Dataset()
    for macro, attributes in shared.items():
        setattr(group, macro, _item(**attributes))
    ds.SharedFunctionalGroupsSequence = DicomSequence([group])
    frames = []
    for attributes_of_frame in per_frame:
        group = Dataset()
        for macro, attributes in attributes_of_frame.items():
            setattr(group, macro, _item(**attributes))
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    _image(ds, stored)
    return _save(ds, EnhancedCTImageStorage, path)


# stored 24 / 1024 / 2024 with intercept -1024: -1000 (air), 0 (water), 1000 HU (bone)
STORED = np.stack([np.full((6, 8), v, np.uint16) for v in (24, 1024, 2024, 1024)])
STORED[:, 0, :3] = [24, 1024, 2024]
GEOMETRY = {
    "PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.5], "SliceThickness": 2.5},
    "PlaneOrientationSequence": {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
}


def _positions(n: int, step: float = 2.5) -> list[dict]:
    return [{"PlanePositionSequence": {"ImagePositionPatient": [-30.0, -40.0, 100.0 + step * k]}} for k in range(n)]


@pytest.fixture
def enhanced_ct(tmp_path):
    shared = {**GEOMETRY, "PixelValueTransformationSequence":
              {"RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU"}}
    return _enhanced_ct(tmp_path / "enhanced.dcm", STORED, shared, _positions(4))


@pytest.mark.parametrize("frame", [0, 2, -1])
def test_enhanced_ct_frame_is_read_in_hu_at_its_pixel_spacing(enhanced_ct, frame):
    out = LoadXray(voi="ignore", frame=frame)(enhanced_ct)
    expected = STORED[frame].astype(np.float64) - 1024  # the shared Pixel Value Transformation
    np.testing.assert_array_equal(out[0].numpy(), expected)
    assert list(out[0, 0, :3].numpy()) == [-1000.0, 0.0, 1000.0]
    assert out.meta["spacing"] == (0.5, 0.5) and out.meta["spacing_source"] == "PixelSpacing"


def test_enhanced_ct_all_frames_are_a_volume_in_patient_space(enhanced_ct):
    out = LoadXray(voi="ignore", frame="all")(enhanced_ct)
    assert out.shape == (1, 8, 6, 4)  # (C, X = columns, Y = rows, Z = frames)
    for k in range(4):
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), (STORED[k].astype(np.float64) - 1024).T)
    np.testing.assert_allclose(out.meta["spacing"], (0.5, 0.5, 2.5))
    # LPS of voxel (i, j, k) = (-30, -40, 100) + i * 0.5 x + j * 0.5 y + k * 2.5 z; RAS flips x and y
    ras = np.array([[-0.5, 0, 0, 30.0], [0, -0.5, 0, 40.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(out.affine.numpy(), ras, atol=1e-6)


def test_enhanced_frames_stored_in_reverse_are_sorted_along_the_normal(tmp_path):
    shared = {**GEOMETRY, "PixelValueTransformationSequence": {"RescaleIntercept": -1024, "RescaleSlope": 1}}
    path = _enhanced_ct(tmp_path / "reverse.dcm", STORED, shared, _positions(4)[::-1])  # frame 0 at z = 107.5
    out = LoadXray(voi="ignore", frame="all")(path)
    for k in range(4):
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), (STORED[3 - k].astype(np.float64) - 1024).T)
    np.testing.assert_allclose(out.affine.numpy()[:3, 2:], [[0, 30.0], [0, 40.0], [2.5, 100.0]], atol=1e-6)


def test_per_frame_groups_override_shared_and_each_frame_keeps_its_rescale(tmp_path):
    shared = {**GEOMETRY, "PixelMeasuresSequence": {"PixelSpacing": [0.7, 0.9], "SliceThickness": 2.5},
              "PixelValueTransformationSequence": {"RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU"}}
    per_frame = _positions(4)
    rescale = [(1.0, -1024.0), (2.0, -2048.0), (0.5, -512.0), (1.0, -1000.0)]
    for k in (1, 2, 3):  # frames 1..3 carry their own Pixel Value Transformation, overriding the shared one
        slope, intercept = rescale[k]
        per_frame[k]["PixelValueTransformationSequence"] = {"RescaleSlope": slope, "RescaleIntercept": intercept,
                                                            "RescaleType": "HU"}
    for k in range(4):
        per_frame[k]["PixelMeasuresSequence"] = {"PixelSpacing": [0.5, 0.6], "SliceThickness": 2.5}
    path = _enhanced_ct(tmp_path / "per_frame.dcm", STORED, shared, per_frame)
    expected = [STORED[k] * slope + intercept for k, (slope, intercept) in enumerate(rescale)]
    for k in range(4):
        single = LoadXray(voi="ignore", frame=k)(path)
        np.testing.assert_allclose(single[0].numpy(), expected[k])
        assert single.meta["spacing"] == (0.5, 0.6)  # per-frame Pixel Measures, not the shared 0.7 x 0.9
    volume = LoadXray(voi="ignore", frame="all")(path)
    for k in range(4):
        np.testing.assert_allclose(volume[0, :, :, k].numpy(), expected[k].T)
    np.testing.assert_allclose(volume.meta["spacing"], (0.6, 0.5, 2.5))  # X = column spacing, Y = row spacing


def test_frame_voi_window_is_the_frames_own(tmp_path):
    shared = {**GEOMETRY, "PixelValueTransformationSequence":
              {"RescaleIntercept": -1024, "RescaleSlope": 1, "RescaleType": "HU"}}
    per_frame = _positions(4)
    windows = [(40.0, 400.0), (-600.0, 1500.0), (300.0, 1500.0), (40.0, 80.0)]
    for k, (center, width) in enumerate(windows):
        per_frame[k]["FrameVOILUTSequence"] = {"WindowCenter": center, "WindowWidth": width}
    stored = np.stack([(np.arange(48, dtype=np.uint16).reshape(6, 8) * 50) for _ in range(4)])
    path = _enhanced_ct(tmp_path / "windows.dcm", stored, shared, per_frame)
    for k, (center, width) in enumerate(windows):
        reference = Dataset()  # what the frame's attributes mean as a single-frame image, windowed by pydicom
        reference.BitsStored, reference.PixelRepresentation, reference.PhotometricInterpretation = 12, 0, "MONOCHROME2"
        reference.RescaleSlope, reference.RescaleIntercept = 1, -1024
        reference.WindowCenter, reference.WindowWidth = center, width
        expected = apply_windowing(stored[k].astype(np.float64) - 1024, reference)
        out = LoadXray(voi="apply", frame=k)(path)
        np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-3)
        assert out.meta["voi"] == "window"
        volume = LoadXray(voi="apply", frame="all")(path)
        np.testing.assert_allclose(volume[0, :, :, k].numpy(), expected.T, atol=1e-3)


def test_per_frame_groups_of_the_wrong_count_are_refused(tmp_path):
    path = _enhanced_ct(tmp_path / "short.dcm", STORED, GEOMETRY, _positions(3))  # 3 items for 4 frames
    with pytest.raises(ImageReadError, match="Per-frame Functional Groups Sequence holds 3 items for 4 frames") as info:
        LoadXray(voi="ignore", frame=1)(path)
    assert info.value.path == path


def test_enhanced_frames_at_one_position_or_irregular_are_refused(tmp_path):
    per_frame = _positions(4)
    per_frame[2] = per_frame[1]
    path = _enhanced_ct(tmp_path / "dup.dcm", STORED, GEOMETRY, per_frame)
    with pytest.raises(ImageReadError, match="frames 1 and 2 .*same position") as info:
        LoadXray(voi="ignore", frame="all")(path)
    assert info.value.path == path
    LoadXray(voi="ignore", frame=2)(path)  # one frame is still a valid image
    per_frame = _positions(4)
    per_frame[3] = _positions(5)[4]  # 100, 102.5, 105, 110: the frame at 107.5 is missing
    path = _enhanced_ct(tmp_path / "gap.dcm", STORED, GEOMETRY, per_frame)
    with pytest.raises(ImageReadError, match="frames 2 and 3 .*5 mm .*2.5 mm"):
        LoadXray(voi="ignore", frame="all")(path)


# --------------------------------------------------------------------------------------------------
# 2. pixel spacing: refused when missing from a volume, unless the user gives it; 2D keeps its fallback


def _object_series(folder, spacing) -> None:
    """16 slices of 48x48 pixels holding a 32-pixel-wide bone block: 22.4 mm wide at 0.7 mm pixels (one air
    pixel per slice differs, as noise would: identical slices are refused as duplicates)."""
    folder.mkdir()
    for k in range(16):
        stored = np.full((48, 48), 24, np.uint16)
        stored[8:40, 8:40] = 2024
        stored[0, k] = 30
        _ct_slice(folder / f"s{k:02d}", k, stored, z=1.5 * k, spacing=spacing)


def _width_after_resampling(folder, **kwargs) -> int:
    pipeline = volume_compose(spacing=1.5, spatial_size=(48, 48, 16), intensity="ct", window=(0, 1000), **kwargs)
    out = pipeline({"image": str(folder)})["image"][0].numpy()
    middle = out[:, :, out.shape[2] // 2]
    return int((middle[:, middle.shape[1] // 2] > 0.5).sum())


def test_series_without_pixel_spacing_is_refused_unless_given(tmp_path):
    given = tmp_path / "given"
    _object_series(given, spacing=(0.7, 0.7))
    assert abs(_width_after_resampling(given) - 22.4 / 1.5) <= 1  # 15 voxels of 1.5 mm (21 at an assumed 1 mm)

    missing = tmp_path / "missing"
    _object_series(missing, spacing=None)
    error = _read_error(missing)
    assert error.path == str(missing) and "PixelSpacing" in error.reason and "assume_spacing" in error.reason
    assert abs(_width_after_resampling(missing, assume_spacing=(0.7, 0.7, 1.5)) - 22.4 / 1.5) <= 1
    out = LoadXray(voi="ignore", assume_spacing=(0.7, 0.7, 9.0))(str(missing))
    np.testing.assert_allclose(out.meta["spacing"], (0.7, 0.7, 1.5))  # z comes from the positions, not assumed
    assert out.meta["spacing_source"] == "assume_spacing/ImagePositionPatient"
    assert LoadXray(voi="ignore")(str(given)).meta["spacing_source"] == "PixelSpacing/ImagePositionPatient"


def test_multiframe_volume_without_pixel_spacing_is_refused_unless_given(realfile):
    path = realfile("emri_small.dcm")  # Enhanced MR, 10 frames, no Pixel Spacing, Spacing Between Slices 1.2
    with pytest.raises(ImageReadError, match="PixelSpacing.*assume_spacing"):
        LoadXray(voi="ignore", frame="all")(path)
    out = LoadXray(voi="ignore", frame="all", assume_spacing=(0.8, 0.9, 5.0))(path)
    np.testing.assert_allclose(out.meta["spacing"], (0.8, 0.9, 1.2))
    assert out.meta["spacing_source"] == "assume_spacing/SpacingBetweenSlices"
    assert LoadXray(voi="ignore", frame=3)(path).meta["spacing_source"] == "default"  # one frame: 2D


@pytest.mark.parametrize("attributes,spacing,source", [
    ({"PixelSpacing": [0.2, 0.3], "ImagerPixelSpacing": [0.25, 0.35]}, (0.2, 0.3), "PixelSpacing"),
    ({"ImagerPixelSpacing": [0.25, 0.35]}, (0.25, 0.35), "ImagerPixelSpacing"),
    ({"PixelSpacing": [0.0, 0.3], "ImagerPixelSpacing": [0.25, 0.35]}, (0.25, 0.35), "ImagerPixelSpacing"),
    ({"PixelSpacing": ["inf", 0.3]}, (1.0, 1.0), "default"),
    ({}, (1.0, 1.0), "default"),
])
def test_radiograph_spacing_prefers_pixel_spacing_then_imager_then_a_documented_default(tmp_path, attributes,
                                                                                         spacing, source):
    ds = Dataset()
    ds.SOPInstanceUID, ds.Modality = _uid(6, 1), "DX"
    for key, value in attributes.items():
        setattr(ds, key, value)
    _image(ds, np.arange(20, dtype=np.uint16).reshape(4, 5))
    path = _save(ds, "1.2.840.10008.5.1.4.1.1.1.1", tmp_path / "dx.dcm")
    out = LoadXray(voi="ignore")(path)
    assert out.meta["spacing"] == spacing and out.meta["spacing_source"] == source
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:2], spacing)


def test_assume_spacing_is_checked():
    for bad in (0, (1.0, 2.0), (1.0, -1.0, 1.0), "1"):
        with pytest.raises(ValueError, match="assume_spacing"):
            LoadXray(assume_spacing=bad)


# --------------------------------------------------------------------------------------------------
# 3. series of duplicated, missing or inconsistent slices


def test_a_regular_series_reads_in_slice_order(tmp_path):
    files = _series(tmp_path / "ok")
    out = LoadXray(voi="ignore")(str(tmp_path / "ok"))
    for k in range(5):
        np.testing.assert_array_equal(out[0, :, :, k].numpy(), pydicom.dcmread(files[k]).pixel_array.T - 1024.0)
    np.testing.assert_allclose(out.affine.numpy(), [[-0.5, 0, 0, 10], [0, -0.5, 0, 20], [0, 0, 2.5, 0], [0, 0, 0, 1]])


def test_duplicate_sop_instance_uid_names_both_files(tmp_path):
    files = _series(tmp_path / "s", changes={3: {"sop": _uid(1, 1)}})
    error = _read_error(tmp_path / "s")
    assert "SOPInstanceUID" in error.reason and _names(error, files[1], files[3])


def test_duplicate_instance_number_names_both_files(tmp_path):
    files = _series(tmp_path / "s", changes={2: {"instance": 2}})
    error = _read_error(tmp_path / "s")
    assert "InstanceNumber 2" in error.reason and _names(error, files[1], files[2])


def test_duplicate_position_names_both_files(tmp_path):
    files = _series(tmp_path / "s", changes={3: {"z": 5.0}})
    error = _read_error(tmp_path / "s")
    assert "same position along the slice normal" in error.reason and _names(error, files[2], files[3])


def test_identical_pixel_data_names_both_files(tmp_path):
    same = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 11) % 4096
    files = _series(tmp_path / "s", changes={1: {"stored": same}, 4: {"stored": same}})
    error = _read_error(tmp_path / "s")
    assert "pixel data identical to" in error.reason and _names(error, files[1], files[4])
    flat = np.full((8, 8), 24, np.uint16)  # uniform slices (air beyond the body) may well repeat
    _series(tmp_path / "flat", changes={1: {"stored": flat}, 4: {"stored": flat}})
    LoadXray(voi="ignore")(str(tmp_path / "flat"))


def test_missing_slice_is_refused_naming_the_files_either_side(tmp_path):
    files = _series(tmp_path / "s", 6)
    os.remove(files[3])
    error = _read_error(tmp_path / "s")
    assert "5 mm" in error.reason and "2.5 mm" in error.reason and _names(error, files[2], files[4])
    assert "1 slice missing" in error.reason and "InstanceNumber 3 to 5" in error.reason


def test_irregular_spacing_is_refused(tmp_path):
    files = _series(tmp_path / "s", 6, changes={3: {"z": 8.2}})  # 0, 2.5, 5, 8.2, 10, 12.5
    error = _read_error(tmp_path / "s")
    assert "irregular" in error.reason and _names(error, files[2], files[3])


def test_instance_number_gap_is_refused_when_positions_cannot_tell(tmp_path):
    no_geometry = {"ipp": None, "iop": None, "SliceThickness": None}
    files = _series(tmp_path / "s", 5, changes={k: no_geometry for k in range(5)})
    os.remove(files[2])
    error = _read_error(tmp_path / "s", assume_spacing=(0.5, 0.5, 2.5))
    assert "InstanceNumber" in error.reason and _names(error, files[1], files[3])
    os.remove(files[4])  # InstanceNumbers 1, 2, 4 -> 1, 2 left: contiguous again
    os.remove(files[3])
    out = LoadXray(voi="ignore", assume_spacing=(0.5, 0.5, 2.5))(str(tmp_path / "s"))
    assert out.shape == (1, 8, 8, 2) and out.meta["spacing_source"] == "PixelSpacing/assume_spacing"
    error = _read_error(tmp_path / "s")  # no positions and nothing else giving the slice spacing
    assert error.path == str(tmp_path / "s") and "assume_spacing" in error.reason


@pytest.mark.parametrize("k,change,says", [
    (3, {"iop": (0, 1, 0, 0, 0, -1)}, "ImageOrientationPatient"),
    (3, {"spacing": (0.6, 0.6)}, "PixelSpacing"),
    (3, {"spacing": None}, "PixelSpacing"),
    (3, {"stored": np.zeros((8, 9), np.uint16)}, "Columns"),
    (3, {"stored": np.zeros((7, 8), np.uint16)}, "Rows"),
    (3, {"for_uid": _uid(4, 9)}, "FrameOfReferenceUID"),
    (3, {"for_uid": None}, "FrameOfReferenceUID"),
    (3, {"intercept": -1000}, "RescaleIntercept"),
    (3, {"slope": 2}, "RescaleSlope"),
    (3, {"RescaleType": "US"}, "RescaleType"),
    (3, {"PhotometricInterpretation": "MONOCHROME1"}, "PhotometricInterpretation"),
    (3, {"Modality": "PT"}, "Modality"),
    (3, {"ipp": None}, "ImagePositionPatient"),
    (0, {"iop": (1, 0, 0, 0, 0.5, 0)}, "ImageOrientationPatient"),
    (3, {"ipp": [-10.0, -14.0, 7.5]}, "off the line"),
    (3, {"NumberOfFrames": 2, "stored": np.zeros((2, 8, 8), np.uint16)}, "multi-frame"),
    (3, {"SliceThickness": 5.0}, "SliceThickness"),
    (3, {"EchoNumbers": 2}, "EchoNumbers"),
    (3, {"TemporalPositionIdentifier": 2}, "TemporalPositionIdentifier"),
    (3, {"StudyInstanceUID": _uid(2, 9)}, "StudyInstanceUID"),
    (3, {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "LOCALIZER"),
    (3, {"ipp": [-10.0, -20.0, "nan"]}, "ImagePositionPatient"),
])
def test_inconsistent_slices_name_the_files_involved(tmp_path, k, change, says):
    """Each names the odd file and, where the fault is a difference, a file it differs from."""
    files = _series(tmp_path / "s", changes={k: change})
    error = _read_error(tmp_path / "s")
    assert says in error.reason and error.path == files[k], error
    other = [f for f in files if f != files[k] and f.rsplit("/", 1)[-1] in error.reason]
    alone = says == "multi-frame" or "finite numbers" in error.reason or "unit vectors" in error.reason
    assert other or alone, error  # a file at fault on its own has no other to name


def test_per_slice_rescale_of_pet_is_applied_per_slice(tmp_path, caplog):
    """PET and MR scale each image on its own (per-slice Rescale Slope): those are read, slice by slice."""
    folder = tmp_path / "pt"
    files = _series(folder, 3, changes={k: {"Modality": "PT", "slope": 0.5 * (k + 1), "intercept": 0,
                                      "RescaleType": "BQML"} for k in range(3)})
    with caplog.at_level(logging.WARNING, logger="hmn.transforms.loading"):
        out = LoadXray(voi="ignore")(str(folder))
    for k in range(3):
        np.testing.assert_allclose(out[0, :, :, k].numpy(), pydicom.dcmread(files[k]).pixel_array.T * 0.5 * (k + 1))
    assert "RescaleSlope" in caplog.text


def test_pet_slices_missing_at_an_end_are_found_by_number_of_slices(tmp_path):
    """PET numbers its slices (ImageIndex) and states their count (NumberOfSlices, PS3.3 C.8.9.4): a slice
    missing at either end, which no spacing shows, is found."""
    pet = {k: {"Modality": "PT", "intercept": 0, "RescaleType": "BQML", "NumberOfSlices": 5, "ImageIndex": k + 1}
           for k in range(5)}
    files = _series(tmp_path / "pt", 5, changes=pet)
    assert LoadXray(voi="ignore")(str(tmp_path / "pt")).shape == (1, 8, 8, 5)
    os.remove(files[4])
    error = _read_error(tmp_path / "pt")
    assert error.path == str(tmp_path / "pt") and "NumberOfSlices says 5" in error.reason
    assert "ImageIndex 5 missing" in error.reason


def test_full_range_on_a_series_is_one_window_for_the_volume(tmp_path):
    """voi='full_range' maps the volume's minimum..maximum, not each slice's own (which would erase the
    differences between slices)."""
    files = _series(tmp_path / "s", 3)
    hu = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float64) - 1024 for f in files], axis=-1)
    out = LoadXray(voi="full_range")(str(tmp_path / "s"))
    lo, hi = out.meta["output_range"]
    expected = (hu - hu.min()) / (hu.max() - hu.min()) * (hi - lo) + lo
    np.testing.assert_allclose(out[0].numpy(), np.transpose(expected, (1, 0, 2)), rtol=1e-5, atol=1e-3)


def test_real_series_reads_and_a_localizer_beside_it_is_refused(realfile, tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(realfile(f"{CT_SERIES}/2062").rsplit("/", 1)[0], folder)
    assert LoadXray(voi="ignore")(str(folder)).shape == (1, 16, 16, 5)
    files = sorted(folder.iterdir())
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(files[0])
    error = _read_error(folder)
    assert "ImageOrientationPatient" in error.reason and _names(error, str(files[0]), str(files[1]))
