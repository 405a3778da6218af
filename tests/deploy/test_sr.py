"""DICOM Structured Reports of the predictions (hmn.deploy.sr): the TID 1500 content read back with pydicom and
walked by hand (codes, probabilities, units, algorithm, references), patient and study attributes against the
source's (none invented), one file per study, the errors, and highdicom's own reading of the files."""

from __future__ import annotations

import copy
import glob
import hashlib
import logging
import math
import os
import warnings

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom is an optional extra: pip install -e '.[deploy]'")

import pydicom  # noqa: E402
from pydicom.config import IGNORE  # noqa: E402
from pydicom.datadict import dictionary_VR, tag_for_keyword  # noqa: E402
from pydicom.dataelem import DataElement  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from hmn.data.demo import DEMO_CLASSES, make_demo_dataset  # noqa: E402
from hmn.data.vocabulary import CANONICAL_FINDINGS  # noqa: E402
from hmn.deploy.sr import finding_code, structured_report, study_report_name, write_study_reports  # noqa: E402

ALGORITHM = {"algorithm_name": "HybridMedNet convnext_tiny", "algorithm_version": "0.1.0+test"}

# Expected codes, checked by hand against SNOMED CT references (see hmn/deploy/sr.py): (code value, scheme, meaning)
EXPECTED_SCT = {
    "Atelectasis": "46621007",
    "Calcification": "18115005",
    "Cardiomegaly": "8186001",
    "Consolidation": "95436008",
    "Edema": "19242006",
    "Emphysema": "87433001",
    "Fibrosis": "51615001",
    "Fracture": "125605004",
    "Infiltration": "409609008",
    "Interstitial Lung Disease": "233703007",
    "Mass": "4147007",
    "Nodule": "27925004",
    "Pleural Effusion": "60046008",
    "Pneumonia": "233604007",
    "Pneumothorax": "36118008",
    "Tuberculosis": "56717001",
}
# the demo classes are NIH ChestX-ray14 names: "Effusion" is the NIH label of pleural effusion
DEMO_EXPECTED = {
    "Cardiomegaly": ("8186001", "SCT", "Cardiomegaly"),
    "Effusion": ("60046008", "SCT", "Pleural effusion"),
    "Mass": ("4147007", "SCT", "Mass"),
    "Nodule": ("27925004", "SCT", "Nodule"),
    "Pneumothorax": ("36118008", "SCT", "Pneumothorax"),
}

# Patient, General Study and Patient Study attributes a report could carry
PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight", "PatientSize",
    "IssuerOfPatientID", "OtherPatientIDsSequence", "EthnicGroup", "PatientComments",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    "PhysiciansOfRecord", "AdmittingDiagnosesDescription",
)


# ------------------------------------------------------------------------------------------------ sources


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The project's synthetic demo set, small: DICOM radiographs (MONOCHROME1 and 2, one study each) and PNGs."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, n_images=12, image_size=32, seed=0, workers=1)
    dicoms = sorted(glob.glob(os.path.join(root, "images", "*.dcm")))
    pngs = sorted(glob.glob(os.path.join(root, "images", "*.png")))
    photometric = {p: pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation for p in dicoms}
    assert {"MONOCHROME1", "MONOCHROME2"} <= set(photometric.values()) and pngs, "demo set changed"
    return {"dicoms": dicoms, "pngs": pngs, "photometric": photometric}


def _dx(study, view, series=None, **attributes):
    """A DX header (no pixels needed) with the given attributes (None leaves one out); values unchecked."""
    ds = pydicom.Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = view
    ds.Rows, ds.Columns = 24, 20
    for key, value in attributes.items():
        if value is not None:
            ds[key] = DataElement(tag_for_keyword(key), dictionary_VR(key), value, validation_mode=IGNORE)
    return ds


def _save(ds, path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return str(path)


def _header(path):
    return pydicom.dcmread(path, stop_before_pixels=True)


def _written(sr, tmp_path, name="sr.dcm"):
    path = tmp_path / name
    sr.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), str(path)


# ------------------------------------------------------------------------ walking the content by hand


def _code(item_code):
    value = item_code.get("CodeValue") or item_code.get("LongCodeValue")
    return str(value), str(item_code.CodingSchemeDesignator), str(item_code.CodeMeaning)


def _name(item):
    return _code(item.ConceptNameCodeSequence[0])[:2]


def _children(item, name=None, value_type=None):
    return [c for c in item.get("ContentSequence", [])
            if (name is None or _name(c) == name) and (value_type is None or c.ValueType == value_type)]


def _groups(sr):
    """The Measurement Groups (125007, DCM) of the Imaging Measurements container (126010, DCM)."""
    (measurements,) = _children(sr, ("126010", "DCM"), "CONTAINER")
    return _children(measurements, ("125007", "DCM"), "CONTAINER")


def _group(group):
    (finding,) = _children(group, ("121071", "DCM"), "CODE")
    (num,) = _children(group, value_type="NUM")
    (image,) = _children(group, value_type="IMAGE")
    (tracking,) = _children(group, ("112039", "DCM"), "TEXT")
    (tracking_uid,) = _children(group, ("112040", "DCM"), "UIDREF")
    (alg_name,) = _children(group, ("111001", "DCM"), "TEXT")
    (alg_version,) = _children(group, ("111003", "DCM"), "TEXT")
    value = num.MeasuredValueSequence[0]
    ref = image.ReferencedSOPSequence[0]
    return {
        "finding": _code(finding.ConceptCodeSequence[0]),
        "measure": _name(num),
        "numeric": float(value.NumericValue),
        "float": float(value.FloatingPointValue),
        "unit": _code(value.MeasurementUnitsCodeSequence[0])[:2],
        "image": (str(ref.ReferencedSOPClassUID), str(ref.ReferencedSOPInstanceUID)),
        "tracking": str(tracking.TextValue),
        "tracking_uid": str(tracking_uid.UID),
        "algorithm": (str(alg_name.TextValue), str(alg_version.TextValue)),
    }


def _evidence(sr):
    """{(study, series, SOP class, SOP instance)} of CurrentRequestedProcedureEvidenceSequence."""
    out = set()
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            for sop in series.ReferencedSOPSequence:
                out.add((study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID,
                         sop.ReferencedSOPInstanceUID))
    return out


def _library(sr):
    """{SOP instance UID: {descriptor concept name: value}} of the TID 1600 Image Library."""
    (library,) = _children(sr, ("111028", "DCM"), "CONTAINER")
    out = {}
    for group in _children(library, ("126200", "DCM"), "CONTAINER"):
        for image in _children(group, value_type="IMAGE"):
            descriptors = {}
            for d in _children(image):
                if d.ValueType == "NUM":
                    descriptors[_name(d)] = float(d.MeasuredValueSequence[0].NumericValue)
                elif d.ValueType == "TEXT":
                    descriptors[_name(d)] = str(d.TextValue)
                elif d.ValueType == "CODE":
                    descriptors[_name(d)] = _code(d.ConceptCodeSequence[0])[:2]
            out[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)] = descriptors
    return out


def _empty(ds, keyword):
    """Absent, or present with an empty value (a Type 2 attribute the SR must carry)."""
    value = ds[keyword].value if keyword in ds else None
    if value is None:
        return True
    try:
        return len(value) == 0
    except TypeError:  # PersonName, numbers
        return str(value) == ""


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_one_image_report_content(demo, tmp_path, photometric):
    path = next(p for p in demo["dicoms"] if demo["photometric"][p] == photometric)
    source = _header(path)
    probs = np.random.default_rng(0).random(len(DEMO_CLASSES))  # float64 with all their digits
    sr, _ = _written(structured_report([source], [probs], DEMO_CLASSES, **ALGORITHM), tmp_path)

    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    template = sr.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")
    assert _name(sr) == ("126000", "DCM")  # Imaging Measurement Report
    assert _code(_children(sr, ("121058", "DCM"), "CODE")[0].ConceptCodeSequence[0])[:2] == ("363679005", "SCT")

    groups = [_group(g) for g in _groups(sr)]
    assert [g["finding"] for g in groups] == [DEMO_EXPECTED[c] for c in DEMO_CLASSES]
    for g, p, c in zip(groups, probs, DEMO_CLASSES):
        assert g["measure"] == ("111012", "DCM")  # Certainty of Finding
        assert g["unit"] == ("1", "UCUM")
        assert g["float"] == float(p)  # FD: the float64 exactly
        assert g["numeric"] == pytest.approx(float(p), abs=1e-13)  # DS: 16 characters
        assert g["image"] == (source.SOPClassUID, source.SOPInstanceUID)
        assert g["algorithm"] == (ALGORITHM["algorithm_name"], ALGORITHM["algorithm_version"])
        assert g["tracking"] == f"{c}, image 1"
    assert len({g["tracking_uid"] for g in groups}) == len(groups)

    assert (sr.Manufacturer, sr.ManufacturerModelName, sr.SoftwareVersions) == (
        "HybridMedNet", ALGORITHM["algorithm_name"], ALGORITHM["algorithm_version"])
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SOPInstanceUID != source.SOPInstanceUID
    assert _evidence(sr) == {(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPClassUID,
                              source.SOPInstanceUID)}
    library = _library(sr)
    assert list(library) == [source.SOPInstanceUID]
    # the demo has no PatientOrientation: the entry keeps what the header has, nothing more
    descriptors = library[source.SOPInstanceUID]
    assert descriptors[("121139", "DCM")] == ("CR", "DCM")  # Modality
    assert descriptors[("110910", "DCM")] == source.Rows and descriptors[("110911", "DCM")] == source.Columns
    assert descriptors[("111026", "DCM")] == pytest.approx(float(source.ImagerPixelSpacing[1]))
    assert ("111044", "DCM") not in descriptors  # Patient Orientation Row


def test_patient_and_study_attributes_are_the_sources_and_none_is_invented(demo, tmp_path):
    demo_source = _header(demo["dicoms"][0])
    sparse = _dx(generate_uid(), "PA", PatientName="Synthetic^Sparse", PatientID="SYN-2", StudyDescription="CHEST")
    for source in (demo_source, sparse):
        before = copy.deepcopy(source)
        sr, _ = _written(structured_report([source], [[0.5] * 5], DEMO_CLASSES, **ALGORITHM), tmp_path)
        assert source == before  # the caller's dataset is not changed
        for keyword in PATIENT_STUDY:
            if _empty(source, keyword):
                assert _empty(sr, keyword), keyword
            else:
                assert sr[keyword].value == source[keyword].value, keyword
    # the sparse source has no birth date, sex, accession number, study date: present empty (Type 2) or absent
    assert all(_empty(sr, k) for k in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate", "StudyID"))


def test_values_highdicom_cannot_parse_are_copied_as_they_are(tmp_path):
    source = _dx(generate_uid(), "PA", PatientName="Synthetic^Odd", PatientID="SYN-3", PatientSex="U",
                 StudyDate="20201301")
    sr, _ = _written(structured_report([source], [[0.1]], ["Mass"], **ALGORITHM), tmp_path)
    assert (sr.PatientSex, sr.StudyDate) == ("U", "20201301")


def test_two_views_of_one_study(tmp_path):
    study = generate_uid()
    pa = _dx(study, "PA", PatientName="Synthetic^Two", PatientID="SYN-4", PatientOrientation=["P", "F"],
             ImagerPixelSpacing=[0.15, 0.2])
    lateral = _dx(study, "LL", PatientName="Synthetic^Two", PatientID="SYN-4")
    classes = ["Cardiomegaly", "Effusion", "Support Devices"]
    probs = [[0.9, 0.25, 0.0], [0.125, 1.0, 0.5]]
    sr, _ = _written(structured_report([pa, lateral], probs, classes, **ALGORITHM), tmp_path)

    groups = [_group(g) for g in _groups(sr)]
    assert len(groups) == 2 * len(classes)  # one group per (image, finding)
    for k, (source, row) in enumerate(zip([pa, lateral], probs)):
        mine = groups[k * len(classes):(k + 1) * len(classes)]
        assert [g["image"] for g in mine] == [(source.SOPClassUID, source.SOPInstanceUID)] * len(classes)
        assert [g["float"] for g in mine] == row
        assert [g["tracking"] for g in mine] == [f"{c}, image {k + 1}" for c in classes]
    assert _evidence(sr) == {(study, s.SeriesInstanceUID, s.SOPClassUID, s.SOPInstanceUID) for s in (pa, lateral)}
    library = _library(sr)
    assert set(library) == {pa.SOPInstanceUID, lateral.SOPInstanceUID}
    # highdicom describes the PA (TID 1603: orientation, spacing); the lateral has neither
    assert library[pa.SOPInstanceUID][("111044", "DCM")] == "P"  # Patient Orientation Row
    assert library[pa.SOPInstanceUID][("111026", "DCM")] == pytest.approx(0.2)  # Horizontal Pixel Spacing
    assert library[pa.SOPInstanceUID][("121139", "DCM")] == ("DX", "DCM")
    assert ("111044", "DCM") not in library[lateral.SOPInstanceUID]
    assert library[lateral.SOPInstanceUID][("110910", "DCM")] == 24


def test_highdicom_reads_the_report_back(tmp_path):
    study = generate_uid()
    sources = [_dx(study, v, PatientName="Synthetic^Read", PatientID="SYN-5") for v in ("PA", "LL")]
    classes = ["Pneumothorax", "No Finding"]
    probs = [[0.75, 0.0625], [0.5, 0.25]]
    _, path = _written(structured_report(sources, probs, classes, **ALGORITHM), tmp_path)

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 4
    expected_codes = [("36118008", "SCT"), ("No Finding", "99HMN")] * 2
    for group, code, p, source in zip(groups, expected_codes, [p for row in probs for p in row],
                                      [s for s in sources for _ in classes]):
        assert (group.finding_type.value, group.finding_type.scheme_designator) == code
        (measurement,) = group.get_measurements()
        assert measurement.name == hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
        assert measurement.value == p and measurement.unit.value == "1"
        (image,) = group.source_images
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
    assert set(sr.get_evidence()) == {(study, s.SeriesInstanceUID, s.SOPInstanceUID, s.SOPClassUID) for s in sources}
    (device,) = sr.content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    attributes = device.observer_identifying_attributes
    assert (attributes.name, attributes.manufacturer_name) == (ALGORITHM["algorithm_name"], "HybridMedNet")
    assert pydicom.uid.UID(attributes.uid).is_valid


def test_device_observer_uid_is_stable_per_model_version():
    source = _dx(generate_uid(), "PA", PatientID="SYN-6")

    def device_uid(**kwargs):
        sr = structured_report([source], [[0.5]], ["Mass"], **kwargs)
        (item,) = [i for i in sr.ContentSequence if _name(i) == ("121012", "DCM")]
        return item.UID

    first = device_uid(**ALGORITHM)
    assert first == device_uid(**ALGORITHM)
    assert first != device_uid(algorithm_name=ALGORITHM["algorithm_name"], algorithm_version="0.2.0")
    assert device_uid(**ALGORITHM, device_observer_uid="1.2.3.4") == "1.2.3.4"
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        device_uid(**ALGORITHM, device_observer_uid="not-a-uid")


def test_finding_codes_of_the_vocabulary():
    for name in CANONICAL_FINDINGS:
        code = finding_code(name)
        if name in EXPECTED_SCT:
            assert (code.value, code.scheme_designator) == (EXPECTED_SCT[name], "SCT"), name
        else:  # no verified SNOMED CT concept: a private code named after the finding, never another's code
            assert (code.value, code.scheme_designator, code.meaning) == (name, "99HMN", name), name
    # NIH ChestX-ray14 labels go through the project's vocabulary; case and blanks do not matter
    assert finding_code("Effusion").value == "60046008"
    assert finding_code(" pneumothorax ").value == "36118008"
    assert (finding_code("Pleural_Thickening").value, finding_code("Pleural_Thickening").scheme_designator) == (
        "Pleural Thickening", "99HMN")
    assert (finding_code("Lung nodule (left)").value, finding_code("Lung nodule (left)").scheme_designator) == (
        "Lung nodule (left)", "99HMN")


def test_private_codes_are_declared(tmp_path):
    source = _dx(generate_uid(), "PA", PatientID="SYN-7")
    classes = ["Enlarged Cardiomediastinum", "Cardiomegaly"]
    sr, _ = _written(structured_report([source], [[0.3, 0.7]], classes, **ALGORITHM), tmp_path)
    findings = [_group(g)["finding"] for g in _groups(sr)]
    assert findings == [("Enlarged Cardiomediastinum", "99HMN", "Enlarged Cardiomediastinum"),
                        ("8186001", "SCT", "Cardiomegaly")]
    assert [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence] == ["99HMN"]
    only_sct, _ = _written(structured_report([source], [[0.3]], ["Cardiomegaly"], **ALGORITHM), tmp_path, "b.dcm")
    assert "CodingSchemeIdentificationSequence" not in only_sct


def test_write_study_reports_one_file_per_study(demo, tmp_path):
    paths = demo["dicoms"][:3]
    studies = [_header(p).StudyInstanceUID for p in paths]
    assert len(set(studies)) >= 2  # the demo writes one study per image
    rng = np.random.default_rng(1)
    items = [(p, rng.random(len(DEMO_CLASSES)).astype(np.float32)) for p in paths]
    out = tmp_path / "sr"

    written = write_study_reports(items, out, DEMO_CLASSES, **ALGORITHM)
    expected = [str(out / f"sr-{hashlib.sha256(s.encode()).hexdigest()[:32]}.dcm") for s in dict.fromkeys(studies)]
    assert written == expected
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in expected)
    by_study = {s: (p, probs) for (p, probs), s in zip(items, studies)}
    first_uids = {}
    for path in written:
        sr = pydicom.dcmread(path)
        source_path, probs = by_study[sr.StudyInstanceUID]
        source = _header(source_path)
        assert _evidence(sr) == {(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPClassUID,
                                  source.SOPInstanceUID)}
        assert [_group(g)["float"] for g in _groups(sr)] == [float(p) for p in probs]  # float32 -> float64 exactly
        first_uids[path] = sr.SOPInstanceUID

    # a rerun replaces the reports (new SOP instances), it does not add files
    assert write_study_reports(items, out, DEMO_CLASSES, **ALGORITHM) == expected
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in expected)
    assert all(pydicom.dcmread(p).SOPInstanceUID != first_uids[p] for p in expected)


def test_write_study_reports_refuses_a_non_dicom_file_and_writes_nothing(demo, tmp_path):
    out = tmp_path / "sr"
    items = [(demo["dicoms"][0], [0.5] * 5), (demo["pngs"][0], [0.5] * 5)]
    with pytest.raises(ValueError, match="not a DICOM file") as e:
        write_study_reports(items, out, DEMO_CLASSES, **ALGORITHM)
    assert demo["pngs"][0] in str(e.value)
    assert not out.exists() or os.listdir(out) == []


def test_write_study_reports_groups_the_views_of_a_study(tmp_path):
    study = generate_uid()
    files = [_save(_dx(study, v, PatientID="SYN-8"), tmp_path / f"{v}.dcm") for v in ("PA", "LL")]
    other = _save(_dx(generate_uid(), "PA", PatientID="SYN-9"), tmp_path / "other.dcm")
    written = write_study_reports([(files[0], [0.1]), (other, [0.2]), (files[1], [0.3])], tmp_path / "sr",
                                  ["Nodule"], **ALGORITHM)
    assert len(written) == 2
    sr = pydicom.dcmread(written[0])
    assert [_group(g)["float"] for g in _groups(sr)] == [0.1, 0.3]
    assert [_group(g)["image"][1] for g in _groups(sr)] == [_header(f).SOPInstanceUID for f in files]


def test_a_bad_study_is_skipped_by_name_when_asked_and_the_others_are_written(tmp_path, caplog):
    """A study whose images disagree on PatientID (as real PACS exports do) gets no report; by default nothing is
    written, with skip_bad_studies (the batch callers: hmn.deploy, inference --dicom_sr) the others are."""
    study = generate_uid()
    clash = [_save(_dx(study, "PA", PatientID="SYN-10"), tmp_path / "a.dcm"),
             _save(_dx(study, "LL", PatientID="SYN-11"), tmp_path / "b.dcm")]
    good = _save(_dx(generate_uid(), "PA", PatientID="SYN-12"), tmp_path / "good.dcm")
    items = [(clash[0], [0.1]), (good, [0.2]), (clash[1], [0.3])]
    with pytest.raises(ValueError, match="PatientID"):
        write_study_reports(items, tmp_path / "strict", ["Nodule"], **ALGORITHM)
    assert not (tmp_path / "strict").exists() or not any((tmp_path / "strict").iterdir())
    with caplog.at_level("ERROR", logger="hmn.deploy.sr"):
        written = write_study_reports(items, tmp_path / "batch", ["Nodule"], **ALGORITHM, skip_bad_studies=True)
    assert [os.path.basename(w) for w in written] == [study_report_name(_header(good).StudyInstanceUID)]
    assert [_group(g)["float"] for g in _groups(pydicom.dcmread(written[0]))] == [0.2]
    assert "a.dcm" in caplog.text and "b.dcm" in caplog.text and "SYN-1" not in caplog.text


def _demo_pair(demo):
    a, b = (_header(p) for p in demo["dicoms"][:2])
    assert a.StudyInstanceUID != b.StudyInstanceUID
    return a, b


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_a_source_without_a_uid_is_refused_by_name(demo, keyword):
    source = _header(demo["dicoms"][0])
    del source[keyword]
    with pytest.raises(ValueError, match=keyword) as e:
        structured_report([source], [[0.5] * 5], DEMO_CLASSES, **ALGORITHM)
    assert demo["dicoms"][0] in str(e.value)


def test_sources_of_two_studies_are_refused(demo):
    a, b = _demo_pair(demo)
    with pytest.raises(ValueError, match="another study") as e:
        structured_report([a, b], [[0.5] * 5] * 2, DEMO_CLASSES, **ALGORITHM)
    assert demo["dicoms"][1] in str(e.value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01, 1.0001, "0.5", None, True, [0.5]])
def test_a_bad_probability_is_refused_naming_the_file_and_value(demo, value):
    source = _header(demo["dicoms"][0])
    row = [0.5, 0.5, value, 0.5, 0.5]
    with pytest.raises(ValueError, match="in \\[0, 1\\]") as e:
        structured_report([source], [row], DEMO_CLASSES, **ALGORITHM)
    assert demo["dicoms"][0] in str(e.value) and repr(value) in str(e.value) and "'Mass'" in str(e.value)


def test_accepted_probabilities(tmp_path):
    source = _dx(generate_uid(), "PA", PatientID="SYN-10")
    row = [0, 1, np.float32(0.25), np.float64(0.5), 0.75]
    sr, _ = _written(structured_report([source], [row], DEMO_CLASSES, **ALGORITHM), tmp_path)
    assert [_group(g)["float"] for g in _groups(sr)] == [0.0, 1.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("case, match", [
    ("short_row", "4 probabilities for 5 classes"),
    ("rows", "2 rows for 1 sources"),
    ("classes", "repeats"),
    ("empty_class", "non-empty string"),
    ("same_image", "same image"),
    ("algorithm", "algorithm_name"),
    ("series_number", "series_number"),
])
def test_other_errors(demo, case, match):
    source = _header(demo["dicoms"][0])
    sources, rows, classes, kwargs = [source], [[0.5] * 5], list(DEMO_CLASSES), dict(ALGORITHM)
    if case == "short_row":
        rows = [[0.5] * 4]
    elif case == "rows":
        rows = [[0.5] * 5] * 2
    elif case == "classes":
        classes[1] = classes[0]
    elif case == "empty_class":
        classes[1] = " "
    elif case == "same_image":
        sources, rows = [source, _header(demo["dicoms"][0])], [[0.5] * 5] * 2
    elif case == "algorithm":
        kwargs["algorithm_name"] = ""
    elif case == "series_number":
        kwargs["series_number"] = 0
    with pytest.raises(ValueError, match=match):
        structured_report(sources, rows, classes, **kwargs)


def test_no_patient_attribute_reaches_the_logs_or_warnings(tmp_path, caplog):
    # a name without "^" (highdicom warns quoting it), an age that is not an Age String (pydicom warns quoting
    # it), a too long accession number, a date that does not exist
    secrets = {"PatientName": "SYNTHETIC SECRETNAME", "PatientID": "SECRETID42", "PatientBirthDate": "19990231",
               "PatientAge": "Q7Z9", "AccessionNumber": "SECRETACCESSION0123"}
    path = _save(_dx(generate_uid(), "PA", **secrets), tmp_path / "secret.dcm")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_study_reports([(path, [0.5])], tmp_path / "sr", ["Mass"], **ALGORITHM)
    shown = caplog.text + "\n".join(str(w.message) for w in caught)
    for value in secrets.values():
        assert value not in shown
    assert "withheld" in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sr = pydicom.dcmread(written[0])
        assert [str(sr[k].value) for k in secrets] == list(secrets.values())  # copied as the source has them


def test_the_guard_withholds_warnings_that_quote_values(caplog):
    """pydicom (warning and log record: a value invalid for its VR) and highdicom (log record: a PatientName
    without "^") quote values; inside the guard neither gets out, and their number is logged instead."""
    from pydicom.misc import warn_and_log

    from hmn.deploy.sr import _source_values_unlogged

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _source_values_unlogged():
            warn_and_log("Invalid value for VR AS: 'Q7Z9'.")
            logging.getLogger("highdicom.base").warning('value of argument "patient_name" is potentially invalid: '
                                                        '"SECRET NAME"')
            warnings.warn("a deprecation is not about values", DeprecationWarning)
    assert "Q7Z9" not in caplog.text and "SECRET NAME" not in caplog.text
    assert [w.category for w in caught] == [DeprecationWarning]  # shown as usual
    assert "2 warning(s)" in caplog.text
