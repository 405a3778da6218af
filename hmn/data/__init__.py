"""Datalists (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG, PadChest, VinDr-CXR, RSNA Pneumonia, folder per class,
MONAI JSON), one finding vocabulary across them (:mod:`hmn.data.vocabulary`), patient-wise splits, the
synthetic demo datasets (2D radiographs, 3D CT-like volumes), and a dataset wrapper that skips unreadable files.

Every builder returns MONAI's datalist form with the class names beside the splits:
``{"class_names": [...], "training": [{"image", "label" (multi-hot), "patient_id"}], "validation": [...], "test": [...]}``;
entries may also carry ``age``, ``sex`` and ``view`` (:data:`~hmn.data.vocabulary.METADATA_KEYS`). The
public-source builders also record ``"rows"``: how many rows they read, kept and left out per filter and
reason, and the patients two splits share (:class:`~hmn.data.datalist.RowAccounting`).
"""

from __future__ import annotations

from .chexpert import CHEXPERT_CLASSES, UNCERTAIN_POLICIES, chexpert_datalist
from .datalist import (
    SPLITS,
    DatalistError,
    RowAccounting,
    check_patient_overlap,
    classes_without_positives,
    datalist_metadata,
    load_datalist,
    make_datalist,
    patient_overlap,
    patient_split,
    read_datalist,
    split_entries,
    summarize,
    write_datalist,
)
from .dataset import SkipBadFilesDataset, SkippedFilesReport, find_read_error
from .demo import DEMO_CLASSES, make_demo_dataset
from .demo3d import DEMO3D_CLASSES, make_demo3d_dataset, render_demo_volume
from .folder import folder_datalist, json_datalist
from .mimic import mimic_cxr_datalist
from .nih import NIH_CLASSES, nih_datalist
from .padchest import PADCHEST_CLASSES, padchest_datalist
from .rsna import rsna_pneumonia_datalist
from .vindr import VINDR_CXR_CLASSES, vindr_cxr_datalist
from .vocabulary import CANONICAL_FINDINGS, METADATA_KEYS, SOURCE_VOCABULARIES, VOCABULARY_VERSION, match_findings

__all__ = [
    "CANONICAL_FINDINGS",
    "CHEXPERT_CLASSES",
    "METADATA_KEYS",
    "SOURCE_VOCABULARIES",
    "VOCABULARY_VERSION",
    "DEMO_CLASSES",
    "DEMO3D_CLASSES",
    "NIH_CLASSES",
    "PADCHEST_CLASSES",
    "SPLITS",
    "UNCERTAIN_POLICIES",
    "VINDR_CXR_CLASSES",
    "DatalistError",
    "RowAccounting",
    "SkipBadFilesDataset",
    "SkippedFilesReport",
    "check_patient_overlap",
    "chexpert_datalist",
    "classes_without_positives",
    "datalist_metadata",
    "find_read_error",
    "folder_datalist",
    "json_datalist",
    "load_datalist",
    "make_datalist",
    "make_demo_dataset",
    "make_demo3d_dataset",
    "match_findings",
    "mimic_cxr_datalist",
    "nih_datalist",
    "padchest_datalist",
    "patient_overlap",
    "patient_split",
    "read_datalist",
    "render_demo_volume",
    "rsna_pneumonia_datalist",
    "split_entries",
    "summarize",
    "vindr_cxr_datalist",
    "write_datalist",
]
