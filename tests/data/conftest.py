"""Fixtures for the data tests: the committed real label tables and a small synthetic demo dataset."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")

FILES = os.path.join(os.path.dirname(__file__), "files")


@pytest.fixture(scope="session")
def nih_csv() -> str:
    return os.path.join(FILES, "Data_Entry_2017_v2020.csv.gz")


@pytest.fixture(scope="session")
def chexpert_csv() -> str:
    return os.path.join(FILES, "chexpert_train_excerpt.csv")


@pytest.fixture(scope="session")
def demo_default(tmp_path_factory) -> str:
    """The demo dataset at its default size (generated once per test session)."""
    from hmn.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo_default"))


@pytest.fixture
def write_dicom():
    """Writes a tiny synthetic DICOM (4x4 pixels, no real person) with the given header attributes
    (``PatientAge="061Y"``, ``PatientSex="F"``, ``ViewPosition="PA"``, ...; None leaves one out)."""
    import numpy as np
    import pydicom
    from pydicom.config import IGNORE
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path, **attributes) -> str:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.ComputedRadiographyImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
        ds.PatientName = "Synthetic^Test"
        ds.PatientID = "SYNTH-1"
        for key, value in attributes.items():
            if value is not None:  # unchecked: RSNA-style ages without a unit ("51") are not valid AS values
                ds[key] = DataElement(tag_for_keyword(key), dictionary_VR(key), value, validation_mode=IGNORE)
        pixels = np.arange(16, dtype=np.uint16).reshape(4, 4)
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels.tobytes()
        os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
        ds.save_as(os.fspath(path), enforce_file_format=True)
        return os.fspath(path)

    return write
