"""DICOM Structured Reports of the model's per-finding probabilities, one report per study, that a PACS stores
beside the images.

Standard implemented (DICOM PS3.16 templates, built with highdicom's :mod:`highdicom.sr`):

* **TID 1500 Measurement Report**, title (126000, DCM, "Imaging Measurement Report"), in a *Comprehensive SR*
  instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.33; the report has no 3D coordinates, and Comprehensive SR is
  the SR storage class PACS have accepted the longest). The root container names its template in
  ContentTemplateSequence (DCMR, TemplateIdentifier ``1500``). Content tree::

      CONTAINER (126000, DCM, "Imaging Measurement Report")                       TID 1500
        HAS CONCEPT MOD  Language of Content Item and Descendants (en-US)          TID 1204
        HAS OBS CONTEXT  Observer Type = Device; Device Observer UID, Name, Manufacturer   TID 1001/1002/1004
        HAS CONCEPT MOD  Procedure reported = (363679005, SCT, "Imaging procedure")   CID 100
        CONTAINS CONTAINER Image Library                                           TID 1600
          CONTAINS CONTAINER Image Library Group, one per source image             TID 1601
            CONTAINS IMAGE (260753009, SCT, "Source") -> the source image, with descriptors   TID 1602/1603
        CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
          CONTAINS CONTAINER (125007, DCM, "Measurement Group"), one per (image, finding)   TID 1501
            HAS OBS CONTEXT  Tracking Identifier "<class name>, image <k>", Tracking Unique Identifier  TID 4108
            CONTAINS CODE    (121071, DCM, "Finding") = the finding's code (table below)
            HAS CONCEPT MOD  Algorithm Name, Algorithm Version                     TID 4019
            CONTAINS NUM     (111012, DCM, "Certainty of Finding") = the probability   TID 300
                             unit ("1", UCUM, "no units")
            CONTAINS IMAGE   (121112, DCM, "Source of Measurement") -> the image the probability is of

* **Grouping**: one measurement group per (source image, finding), each referencing its own image, in the
  order of `sources` and, within an image, of `class_names`. The model classifies each image on its own
  (a PA and a lateral view of one study get two independent sets of probabilities), so every probability is
  tied to the image it was computed from; a group per finding holding several images' values would lose
  which value belongs to which view.
* **The probability** is a NUM content item (TID 300) named (111012, DCM, "Certainty of Finding"), which DICOM
  defines as "the likelihood that the finding detected is in fact the type of finding identified", holding the
  model's sigmoid output as it is, a float in [0, 1], with the dimensionless UCUM unit ("1", UCUM, "no units")
  of CID 7181. The value is stored twice, as Numeric Value (DS, at most 16 characters: about 14 significant
  digits) and exactly as Floating Point Value (FD, the float64 given). Note: DICOM's CAD SR templates
  (Mammography / Chest CAD) express this concept in percent (0-100); a TID 1500 measurement has no such
  constraint and the value here is the probability itself, unscaled.
* **Algorithm identification** (TID 4019): `algorithm_name` and `algorithm_version` in every measurement
  group, and as the SR's Manufacturer's Model Name and Software Versions; `manufacturer` as Manufacturer and
  as the device observer's manufacturer. The Device Observer UID is `device_observer_uid`, or else a UID
  derived from the algorithm name and version (``2.25.<UUID-5>``), the same for every report of that model
  version.
* **References**: every source image is listed in the evidence (CurrentRequestedProcedureEvidenceSequence:
  study, series, SOP class and instance UIDs), in the Image Library, and in each of its measurement groups.
* **Patient and study**: the SR joins the sources' study (same StudyInstanceUID; a new series and a new SOP
  instance, with fresh UIDs from highdicom's generator). highdicom copies the Patient, Clinical Trial Subject,
  General Study, Patient Study and Clinical Trial Study attributes from the first source, only those the
  source has; the Type 2 attributes the SR must carry (PatientName, PatientID, PatientBirthDate, PatientSex,
  AccessionNumber, StudyID, StudyDate, StudyTime, ReferringPhysicianName) are left empty when the source lacks
  them: no value is invented. A PatientSex, PatientBirthDate, StudyDate or StudyTime value that highdicom
  refuses to parse is copied as the source has it. No patient attribute is logged or put in an error message:
  while the sources are read and copied, the warnings of pydicom and highdicom that quote a value (a value
  invalid for its VR, a PatientName without ``^``) are withheld, and one warning of this module gives their
  number.
* **Document flags**: CompletionFlag COMPLETE (every class of every image is reported), VerificationFlag
  UNVERIFIED and PreliminaryFlag PRELIMINARY (a machine's output, no person has verified it); Series
  Description "AI findings (probabilities), not for diagnosis"; Series Number 9001 unless given.
* **Image Library entries** use highdicom's TID 1602/1603/1604 descriptors (modality, rows, columns, and for
  projection radiographs patient orientation and imager pixel spacing). highdicom needs PatientOrientation
  (0020,0020) and ImagerPixelSpacing (0018,1164) to describe a CR/DX image and many radiographs leave
  PatientOrientation empty; such an entry gets only the descriptors the image has (modality, frame of
  reference, rows, columns, and whichever of orientation and spacing is present).

Codes of the findings (:data:`FINDING_CODES`): the class names are the canonical findings of
:mod:`hmn.data.vocabulary` or NIH ChestX-ray14 label names (``Effusion`` -> ``Pleural Effusion``,
``Pleural_Thickening`` -> ``Pleural Thickening``; the demo classes are NIH names). SNOMED CT (SCT) concept ids,
each checked against public terminology references (and, where marked, against the DICOM standard's own
context groups):

    ==========================  ===========  =======================================================
    class                       SCT id       code meaning
    ==========================  ===========  =======================================================
    Atelectasis                 46621007     Atelectasis
    Calcification               18115005     Pathologic calcification (also in DICOM CID 6335-6338)
    Cardiomegaly                8186001      Cardiomegaly
    Consolidation               95436008     Lung consolidation
    Edema                       19242006     Pulmonary edema (also in DICOM CID 3700; the edema label
                                             of chest radiograph sets, NIH and CheXpert, is pulmonary)
    Emphysema                   87433001     Pulmonary emphysema
    Fibrosis                    51615001     Fibrosis of lung
    Fracture                    125605004    Fracture of bone
    Infiltration                409609008    Radiologic infiltrate of lung
    Interstitial Lung Disease   233703007    Interstitial lung disease
    Mass                        4147007      Mass (also in DICOM CID 6102/6104, chest CAD findings)
    Nodule                      27925004     Nodule (also in DICOM CID 6102/6104)
    Pleural Effusion            60046008     Pleural effusion (also in DICOM CID 645)
    Pneumonia                   233604007    Pneumonia
    Pneumothorax                36118008     Pneumothorax (also in DICOM CID 6102/6105)
    Tuberculosis                56717001     Tuberculosis
    ==========================  ===========  =======================================================

Every other class, including the canonical findings that have no single SNOMED CT concept or whose concept
id could not be verified (No Finding, Enlarged Cardiomediastinum, Hernia, Lung Lesion, Lung Opacity,
Nodule/Mass, Pleural Other, Pleural Thickening, Support Devices, Aortic Enlargement), and any class name not in
the vocabulary, gets a code of the private coding scheme ``99HMN`` (:data:`PRIVATE_CODING_SCHEME`, declared in
the SR's CodingSchemeIdentificationSequence): code value = code meaning = the canonical name (the class name
itself when it has none). A class is never given another finding's code.

File names (:func:`write_study_reports`): ``sr-<first 32 hex digits of SHA-256(StudyInstanceUID)>.dcm``, one per
study, so a rerun replaces a study's report instead of adding one (each run's SR is a new SOP instance, as
DICOM requires for new content; a PACS that already stored the earlier one keeps both).

Needs the optional extra ``pip install "hybridmednet[deploy]"`` (highdicom >= 0.22).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID
from pydicom.valuerep import DA, TM

try:
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        AlgorithmIdentification,
        CodeContentItem,
        CodedConcept,
        ComprehensiveSR,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        ImageContentItem,
        ImageLibraryEntryDescriptors,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        NumContentItem,
        ObservationContext,
        ObserverContext,
        RelationshipTypeValues,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
        UIDRefContentItem,
    )
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "hmn.deploy.sr writes DICOM SR with highdicom, which is not installed: "
        'pip install "hybridmednet[deploy]" (or pip install "highdicom>=0.22")'
    ) from e

from hmn.data.vocabulary import canonical_name
from hmn.durable import atomic_write

__all__ = [
    "CERTAINTY_OF_FINDING",
    "FINDING_CODES",
    "PRIVATE_CODING_SCHEME",
    "PROBABILITY_UNIT",
    "finding_code",
    "structured_report",
    "study_report_name",
    "write_study_reports",
]

logger = logging.getLogger(__name__)

PRIVATE_CODING_SCHEME = "99HMN"

# canonical finding -> (SNOMED CT concept id, code meaning); see the module docstring for the sources
FINDING_CODES: dict[str, tuple[str, str]] = {
    "Atelectasis": ("46621007", "Atelectasis"),
    "Calcification": ("18115005", "Pathologic calcification"),
    "Cardiomegaly": ("8186001", "Cardiomegaly"),
    "Consolidation": ("95436008", "Lung consolidation"),
    "Edema": ("19242006", "Pulmonary edema"),
    "Emphysema": ("87433001", "Pulmonary emphysema"),
    "Fibrosis": ("51615001", "Fibrosis of lung"),
    "Fracture": ("125605004", "Fracture of bone"),
    "Infiltration": ("409609008", "Radiologic infiltrate of lung"),
    "Interstitial Lung Disease": ("233703007", "Interstitial lung disease"),
    "Mass": ("4147007", "Mass"),
    "Nodule": ("27925004", "Nodule"),
    "Pleural Effusion": ("60046008", "Pleural effusion"),
    "Pneumonia": ("233604007", "Pneumonia"),
    "Pneumothorax": ("36118008", "Pneumothorax"),
    "Tuberculosis": ("56717001", "Tuberculosis"),
}

CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")
PROBABILITY_UNIT = CodedConcept("1", "UCUM", "no units")

_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# Type 2 attributes highdicom reads from the first source with attribute access (an absent one would raise)
_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
)
_SERIES_DESCRIPTION = "AI findings (probabilities), not for diagnosis"
_UID_NAMESPACE = uuid.UUID("0b6f7d44-5d3a-5c1e-9a51-6c1f4f3a8d21")  # this module's, for name-based UIDs


def _derived_uid(*parts: str) -> str:
    """A UID that is a function of `parts` (ITU-T X.667 ``2.25.<integer of a name-based UUID>``)."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, "\x00".join(parts)).int)


def _label(ds: Any, index: int) -> str:
    name = getattr(ds, "filename", None)
    if isinstance(name, (str, os.PathLike)) and os.fspath(name):
        return os.fspath(name)
    return f"sources[{index}]"


def _check_text(value: Any, what: str, limit: int = 64) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    value = value.strip()
    if len(value) > limit or "\\" in value or not value.isprintable():
        raise ValueError(
            f"{what} {value!r} cannot be written to DICOM: at most {limit} printable characters, no backslash"
        )
    return value


def _canonical(class_name: str) -> str | None:
    """The canonical finding a class name stands for: a canonical name, or an NIH ChestX-ray14 label."""
    return canonical_name(None, class_name) or canonical_name("nih-chestxray14", class_name)


def finding_code(class_name: str) -> CodedConcept:
    """The code of a class as the SR writes it (its finding type): the SNOMED CT code of :data:`FINDING_CODES`
    for the canonical finding the name stands for (a canonical name of :mod:`hmn.data.vocabulary` or an NIH
    ChestX-ray14 label, case-insensitive), otherwise a code of the private scheme ``99HMN`` whose value and
    meaning are the canonical name, or the class name itself when it has none.

    Raises:
        ValueError: the name is empty, longer than 64 characters (a code meaning's limit) or holds a backslash
            or a control character.
    """
    name = _check_text(class_name, "class name")
    canon = _canonical(name)
    if canon in FINDING_CODES:
        value, meaning = FINDING_CODES[canon]
        return CodedConcept(value, "SCT", meaning)
    text = canon or name
    return CodedConcept(text, PRIVATE_CODING_SCHEME, text)


def study_report_name(study_instance_uid: str) -> str:
    """The file name :func:`write_study_reports` gives a study's report: ``sr-<32 hex digits>.dcm`` from the
    SHA-256 of the StudyInstanceUID (no patient attribute is part of it)."""
    digest = hashlib.sha256(str(study_instance_uid).strip().encode("ascii", "replace")).hexdigest()
    return f"sr-{digest[:32]}.dcm"


def _probability(value: Any, where: str, class_name: str) -> float:
    bad = isinstance(value, (str, bytes, bool))
    try:
        p = float(value) if not bad else math.nan
    except (TypeError, ValueError):
        bad, p = True, math.nan
    if bad or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(
            f"{where}: the probability of {class_name!r} is {value!r}; accepted: a finite number in [0, 1]"
        )
    return p


def _check_sources(sources: Sequence[Dataset]) -> list[str]:
    """Labels of the sources, after checking their UIDs, that they are one study and one image each."""
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence) or len(sources) == 0:
        raise ValueError("sources must be a non-empty sequence of pydicom datasets (the images of one study)")
    labels = [_label(ds, i) for i, ds in enumerate(sources)]
    for ds, label in zip(sources, labels):
        if not isinstance(ds, Dataset):
            raise ValueError(f"{label}: not a pydicom Dataset ({type(ds).__name__})")
        missing = [kw for kw in _REQUIRED_UIDS if not str(ds.get(kw, "") or "").strip()]
        if missing:
            raise ValueError(
                f"{label}: the DICOM header has no {', '.join(missing)}; a structured report references its "
                f"sources by {', '.join(_REQUIRED_UIDS)}"
            )
    first_study = str(sources[0].StudyInstanceUID)
    first_patient = sources[0].get("PatientID")
    seen: dict[str, str] = {}
    for ds, label in zip(sources, labels):
        if str(ds.StudyInstanceUID) != first_study:
            raise ValueError(
                f"{label} belongs to another study than {labels[0]} (StudyInstanceUID differs): a structured "
                "report covers one study; write_study_reports groups files by study"
            )
        if ds.get("PatientID") != first_patient:
            raise ValueError(f"{label} and {labels[0]} are of one study but their PatientID differs")
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            raise ValueError(f"{label} and {seen[sop]} are the same image (same SOPInstanceUID)")
        seen[sop] = label
    return labels


def _first_evidence(ds: Dataset) -> tuple[Dataset, list[str]]:
    """The first source as highdicom gets it: a shallow copy in which the Type 2 attributes the source lacks
    are present and empty, and values highdicom would refuse to parse are empty (their keywords are returned,
    to be copied into the SR as the source has them). The source itself is not changed: the copy has a
    dictionary of its own and blanked attributes are new elements, never the source's element objects (which
    the copy shares; pydicom's ``Dataset.copy`` would share the dictionary too)."""
    out = Dataset()
    for elem in ds:
        out.add(elem)
    restore = []

    def blank(kw: str) -> None:
        out.add_new(kw, dictionary_VR(kw), None)

    for kw in _TYPE2:
        if kw not in ds:
            blank(kw)
    if ds.get("PatientSex") not in (None, "", "M", "F", "O"):
        blank("PatientSex")
        restore.append("PatientSex")
    for kw, vr in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        value = ds.get(kw)
        if value not in (None, ""):
            try:
                vr(value)
            except (TypeError, ValueError):
                blank(kw)
                restore.append(kw)
    return out, restore


class _Withhold(logging.Filter):
    """Withholds (and counts) the log records of pydicom and highdicom that can quote a source's attribute
    values: pydicom's warnings about a value invalid for its VR, highdicom's about a PatientName without ``^``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        quoting = record.levelno >= logging.WARNING if record.name == "pydicom" else "patient_name" in str(record.msg)
        self.count += quoting
        return not quoting


@contextmanager
def _source_values_unlogged() -> Iterator[None]:
    """While highdicom copies the sources' attributes: no warning (Python's or a logger's) that could quote a
    patient attribute gets out; their number is logged instead."""
    withhold = _Withhold()
    loggers = [logging.getLogger("pydicom"), logging.getLogger("highdicom.base")]
    for lg in loggers:
        lg.addFilter(withhold)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(withhold)
    quoting = [w for w in caught if issubclass(w.category, UserWarning)]
    for w in caught:  # the others (deprecations and the like) are not about values: shown as usual
        if not issubclass(w.category, UserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    withheld = max(withhold.count, len(quoting))
    if withheld:
        logger.warning(
            "%d warning(s) of pydicom/highdicom about the sources' attribute values were withheld, as they can "
            "quote patient attributes (e.g. a value too long or invalid for its VR); the values are copied into "
            "the report as the source has them", withheld,
        )


# CID 29 Acquisition Modality, by Modality (0008,0060) value: (CR, DCM, "Computed Radiography"), ...
_CID29 = {c.value: c for c in (getattr(codes.cid29, n) for n in dir(codes.cid29) if n[:1].isupper())
          if isinstance(c, Code)}
_LIBRARY_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError)


def _basic_descriptors(ds: Dataset) -> list[Any]:
    """TID 1602/1603 descriptors of an image highdicom cannot describe: only those the image has."""
    acq = RelationshipTypeValues.HAS_ACQ_CONTEXT
    out: list[Any] = []
    modality = _CID29.get(str(ds.get("Modality", "") or ""))
    if modality is not None:
        out.append(CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=acq))
    if ds.get("FrameOfReferenceUID"):
        out.append(UIDRefContentItem(name=codes.DCM.FrameOfReferenceUID, value=ds.FrameOfReferenceUID,
                                     relationship_type=acq))
    pixels = CodedConcept("{pixels}", "UCUM", "Pixels")
    for kw, name in (("Rows", codes.DCM.PixelDataRows), ("Columns", codes.DCM.PixelDataColumns)):
        if ds.get(kw):
            out.append(NumContentItem(name=name, value=int(ds.get(kw)), unit=pixels, relationship_type=acq))
    orientation = ds.get("PatientOrientation")
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2 and all(orientation):
        out.append(TextContentItem(name=codes.DCM.PatientOrientationRow, value=str(orientation[0]),
                                   relationship_type=acq))
        out.append(TextContentItem(name=codes.DCM.PatientOrientationColumn, value=str(orientation[1]),
                                   relationship_type=acq))
    spacing = ds.get("ImagerPixelSpacing")
    if spacing is not None and not isinstance(spacing, (str, float, int)) and len(spacing) == 2:
        out.append(NumContentItem(name=codes.DCM.HorizontalPixelSpacing, value=float(spacing[1]),
                                  unit=codes.UCUM.Millimeter, relationship_type=acq))
        out.append(NumContentItem(name=codes.DCM.VerticalPixelSpacing, value=float(spacing[0]),
                                  unit=codes.UCUM.Millimeter, relationship_type=acq))
    return out


def _image_library(sources: Sequence[Dataset], labels: Sequence[str]) -> ContainerContentItem:
    """TID 1600 Image Library: one Image Library Group (TID 1601) per source, its image with its descriptors."""
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    for ds, label in zip(sources, labels):
        try:
            descriptors = list(ImageLibraryEntryDescriptors(ds))
        except _LIBRARY_ERRORS as e:
            logger.debug("%s: image library entry with the descriptors the header has (highdicom: %s)",
                         label, type(e).__name__)
            descriptors = _basic_descriptors(ds)
        image = ImageContentItem(
            name=CodedConcept("260753009", "SCT", "Source"),
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        if descriptors:
            image.ContentSequence = hd.sr.ContentSequence(descriptors)
        group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence([image])
        library.ContentSequence.append(group)
    return library


def structured_report(
    sources: Sequence[Dataset],
    probabilities: Sequence[Sequence[float]],
    class_names: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "HybridMedNet",
    device_observer_uid: str | None = None,
) -> ComprehensiveSR:
    """A DICOM SR (TID 1500 Measurement Report, Comprehensive SR) of the model's probabilities for the images of
    one study (see the module docstring for the content tree, codes and units).

    Args:
        sources: the source image datasets of ONE study, in any order; headers are enough
            (``pydicom.dcmread(path, stop_before_pixels=True)``). Each needs StudyInstanceUID, SeriesInstanceUID,
            SOPInstanceUID and SOPClassUID; patient and study attributes are copied from the first.
        probabilities: ``probabilities[i]`` are the probabilities of ``sources[i]``, one per class in
            `class_names` order: finite numbers in [0, 1] (Python, NumPy or 0-d tensor scalars).
        class_names: the model's class names (canonical findings or NIH ChestX-ray14 labels are coded in
            SNOMED CT, others in the private scheme ``99HMN``; see :func:`finding_code`); unique, non-empty.
        algorithm_name: the model's name (TID 4019 Algorithm Name; Manufacturer's Model Name), <= 64 characters.
        algorithm_version: the model's version (TID 4019 Algorithm Version; Software Versions), <= 64 characters.
        series_number: Series Number of the SR's new series (default 9001: listed after the acquired series).
        instance_number: Instance Number of the SR.
        manufacturer: Manufacturer of the SR and of its device observer.
        device_observer_uid: Device Observer UID (TID 1004); default: a UID derived from the algorithm name and
            version, the same for every report of that model version.

    Returns:
        the SR as a :class:`highdicom.sr.ComprehensiveSR` (a pydicom Dataset with its file meta;
        ``sr.save_as(path, enforce_file_format=True)`` writes it).

    Raises:
        ValueError: naming the source (its file name where known, else ``sources[i]``) or the value, when the
            sources are of different studies or of different PatientIDs, a source has no StudyInstanceUID,
            SeriesInstanceUID, SOPInstanceUID or SOPClassUID, an image is given twice, the number of probability
            rows differs from the number of sources or a row's length from the number of classes, a probability
            is not a finite number in [0, 1], a class name is empty, repeated, longer than 64 characters or holds
            a backslash, or an argument is out of range.
    """
    with _source_values_unlogged():
        return _build_report(
            sources, probabilities, class_names, algorithm_name=algorithm_name,
            algorithm_version=algorithm_version, series_number=series_number, instance_number=instance_number,
            manufacturer=manufacturer, device_observer_uid=device_observer_uid,
        )


def _build_report(
    sources: Sequence[Dataset],
    probabilities: Sequence[Sequence[float]],
    class_names: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 9001,
    instance_number: int = 1,
    manufacturer: str = "HybridMedNet",
    device_observer_uid: str | None = None,
) -> ComprehensiveSR:
    """:func:`structured_report` without the guard on the logs (the caller holds it)."""
    labels = _check_sources(sources)
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
    names = [_check_text(c, "class name") for c in class_names]
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise ValueError(f"class_names repeats {repeated}; each class must be named once")
    algorithm_name = _check_text(algorithm_name, "algorithm_name")
    algorithm_version = _check_text(algorithm_version, "algorithm_version")
    manufacturer = _check_text(manufacturer, "manufacturer")
    for value, what in ((series_number, "series_number"), (instance_number, "instance_number")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if device_observer_uid is None:
        device_observer_uid = _derived_uid("hmn-device-observer", algorithm_name, algorithm_version)
    elif not UID(str(device_observer_uid)).is_valid:
        raise ValueError(f"device_observer_uid {device_observer_uid!r} is not a valid DICOM UID")
    if isinstance(probabilities, (str, bytes)) or not hasattr(probabilities, "__len__"):
        raise ValueError(f"probabilities must be a sequence of rows, one per source image, got {probabilities!r}")
    if len(probabilities) != len(sources):
        raise ValueError(
            f"probabilities has {len(probabilities)} rows for {len(sources)} sources; one row per source image"
        )
    rows: list[list[float]] = []
    for row, label in zip(probabilities, labels):
        if isinstance(row, (str, bytes)) or not hasattr(row, "__len__") or len(row) != len(names):
            n = len(row) if hasattr(row, "__len__") else "no sequence of"
            raise ValueError(f"{label}: {n} probabilities for {len(names)} classes {names}")
        rows.append([_probability(p, label, c) for p, c in zip(row, names)])

    finding_codes = [finding_code(c) for c in names]
    groups = []
    for k, (ds, row) in enumerate(zip(sources, rows), start=1):
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        for name, code, p in zip(names, finding_codes, row):
            tracking = TrackingIdentifier(
                uid=_derived_uid("hmn-tracking", algorithm_name, algorithm_version, sop_instance,
                                 code.scheme_designator, code.value),
                identifier=f"{name}, image {k}",
            )
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                finding_type=code,
                algorithm_id=AlgorithmIdentification(name=algorithm_name, version=algorithm_version),
                measurements=[Measurement(name=CERTAINTY_OF_FINDING, value=p, unit=PROBABILITY_UNIT)],
                source_images=[SourceImageForMeasurementGroup(sop_class, sop_instance)],
            ))
    observer = ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid, name=algorithm_name, manufacturer_name=manufacturer
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    # TID 1500 row 5 (Image Library) before the Imaging Measurements container, highdicom's order
    root_items = report[0].ContentSequence
    root_items.insert(len(root_items) - 1, _image_library(sources, labels))

    private = [c for c in finding_codes if c.scheme_designator == PRIVATE_CODING_SCHEME]
    schemes = None
    if private:
        schemes = [CodingSchemeIdentificationItem(
            designator=PRIVATE_CODING_SCHEME,
            name="HybridMedNet finding names",
            responsible_organization=manufacturer,
        )]
    evidence0, restore = _first_evidence(sources[0])
    sr = ComprehensiveSR(
        evidence=[evidence0, *sources[1:]],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        series_description=_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        coding_schemes=schemes,
    )
    for kw in restore:  # values highdicom could not parse: copied as the source has them
        sr[kw] = copy.deepcopy(sources[0][kw])  # an element of its own, not shared with the source
    logger.debug("built a TID 1500 report: %d image(s) x %d finding(s), %d private code(s)",
                 len(sources), len(names), len(private))
    return sr


def _read_header(path: str) -> Dataset:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        # force=True (DICOM written without the preamble) reads any file as some data set
        is_dicom = bool(getattr(ds, "file_meta", None)) or "SOPClassUID" in ds
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # pydicom raises many types on a file that is not DICOM
        raise ValueError(f"{path}: DICOM header cannot be read ({type(e).__name__}); a structured report needs "
                         "DICOM source images") from None
    if not is_dicom:
        raise ValueError(f"{path}: not a DICOM file; structured reports reference DICOM source images, so "
                         "PNG/JPEG/NIfTI inputs cannot have one (leave them out of the items)")
    return ds


def write_study_reports(
    items: Iterable[tuple[str | os.PathLike, Sequence[float]]],
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    *,
    algorithm_name: str,
    algorithm_version: str,
    skip_bad_studies: bool = False,
) -> list[str]:
    """Writes one DICOM SR per study (:func:`structured_report`) of the predictions of DICOM images.

    Every header is read (``stop_before_pixels``), the images are grouped by StudyInstanceUID (in the order
    they come), and all reports are built before the first is written, so a bad item leaves `output_dir` as it
    was. Each report goes to ``output_dir/`` :func:`study_report_name` ``(StudyInstanceUID)`` through
    :func:`hmn.durable.atomic_write` (a temporary file renamed over the target): a rerun replaces a study's
    report, a reader never sees half a file.

    Args:
        items: ``(path of a DICOM image, its probabilities in class_names order)`` pairs.
        output_dir: the folder to write to; created if missing.
        class_names, algorithm_name, algorithm_version: as in :func:`structured_report`.
        skip_bad_studies: a study whose report cannot be built (its images disagree on PatientID, a source
            lacks a UID, ...) is logged as an error naming its files and left without a report, and the other
            studies' reports are written (what a batch over a PACS folder needs: ``python -m hmn.deploy`` and
            ``inference --dicom_sr``); by default (False) it raises before anything is written.

    Returns:
        the paths written, one per study, in the order the studies first appear in `items`.

    Raises:
        ValueError: a path is not DICOM (e.g. a PNG of a mixed folder: the caller leaves such items out; a
            report cannot reference a file that has no DICOM identity), a header cannot be read, or as
            :func:`structured_report` raises.
        FileNotFoundError: a path does not exist.
    """
    studies: dict[str, tuple[list[Dataset], list[Sequence[float]]]] = {}
    with _source_values_unlogged():  # reading a header can warn quoting its values, too
        for entry in items:
            try:
                path, probs = entry
            except (TypeError, ValueError):
                raise ValueError(f"items must be (path, probabilities) pairs, got {entry!r}") from None
            path = os.fspath(path)
            ds = _read_header(path)
            study = str(ds.get("StudyInstanceUID", "") or "").strip()
            if not study:
                raise ValueError(f"{path}: the DICOM header has no StudyInstanceUID; reports are written per study")
            sources, rows = studies.setdefault(study, ([], []))
            sources.append(ds)
            rows.append(probs)
        reports = []
        for study, (sources, rows) in studies.items():
            try:
                reports.append((study, _build_report(sources, rows, class_names, algorithm_name=algorithm_name,
                                                     algorithm_version=algorithm_version)))
            except ValueError as e:
                if not skip_bad_studies:
                    raise
                logger.error("no structured report for the study of %s: %s",
                             ", ".join(str(getattr(d, "filename", "?")) for d in sources), e)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for study, sr in reports:
        path = os.path.join(output_dir, study_report_name(study))
        atomic_write(path, lambda f, sr=sr: sr.save_as(f, enforce_file_format=True), binary=True)
        written.append(path)
        logger.info("wrote the structured report of a study (%d image(s)) to %s",
                    len(studies[study][0]), path)
    logger.info("wrote %d structured report(s) to %s", len(written), output_dir)
    return written
