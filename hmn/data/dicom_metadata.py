"""Age, sex and view of a datalist entry read from its DICOM header, for the sources whose label tables do
not carry them (VinDr-CXR, RSNA Pneumonia Detection).

Only three attributes are read as values: PatientAge (0010,1010), PatientSex (0010,0040) and ViewPosition
(0018,5101), parsed into the metadata keys of :mod:`hmn.data.vocabulary` (``age`` in years, ``sex``
``"M"``/``"F"``/``"O"``, ``view``); SOPClassUID and Rows are looked for only to tell a DICOM file from
another. No other attribute is read into memory, and nothing read is logged or written beside those
three keys; the values themselves are never logged (only counts).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any

# the age rule (and the DICOM Age String parser) live with the other metadata rules; re-exported here
from .vocabulary import MAX_PLAUSIBLE_AGE, normalize_age, normalize_sex, normalize_view, parse_dicom_age

__all__ = ["MAX_PLAUSIBLE_AGE", "add_dicom_metadata", "normalize_age", "parse_dicom_age", "read_dicom_metadata"]

logger = logging.getLogger(__name__)

_TAGS = ["PatientAge", "PatientSex", "ViewPosition"]
_CHECK = ["SOPClassUID", "Rows"]  # only to tell a DICOM file from another file; never carried


def read_dicom_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``{"age", "sex", "view"}`` of one DICOM file, from its header only (``stop_before_pixels``).

    A key is left out when the header lacks the attribute, leaves it blank, or holds a value that is not
    an age / sex / view. PatientAge goes through the project's age rule,
    :func:`hmn.data.vocabulary.normalize_age`, as every builder's ages do: an age of 0 (``"000D"``,
    ``"000Y"``, ``"0"``) or above :data:`MAX_PLAUSIBLE_AGE` is unknown.

    Raises:
        ValueError: the file cannot be parsed as DICOM (the message names the file and the reason).
        FileNotFoundError: the file does not exist.
    """
    import pydicom

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-conformant AS values ("51") make pydicom warn
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=list(_TAGS) + _CHECK)
            raw = {tag: ds.get(tag) for tag in _TAGS}
            # force=True (files without the DICM preamble) reads anything as an empty data set
            is_dicom = bool(getattr(ds, "file_meta", None)) or any(tag in ds for tag in _CHECK)
    except FileNotFoundError:
        raise
    except Exception as e:  # pydicom raises many types on a file that is not DICOM
        raise ValueError(f"{path}: DICOM header cannot be read ({type(e).__name__})") from None
    if not is_dicom:
        raise ValueError(f"{path}: not a DICOM file (no file meta, no SOPClassUID or Rows)")
    out: dict[str, Any] = {}
    age = normalize_age(raw["PatientAge"])
    if age is not None:
        out["age"] = age
    sex = normalize_sex(raw["PatientSex"])
    if sex is not None:
        out["sex"] = sex
    view = normalize_view(raw["ViewPosition"])
    if view is not None:
        out["view"] = view
    return out


def add_dicom_metadata(entries: Sequence[dict[str, Any]], source: str = "") -> None:
    """Adds ``age``/``sex``/``view`` in place to every entry whose ``image`` exists, from its DICOM header.

    Entries whose file is missing or unreadable are left as they are; one warning per kind of problem
    gives the count and up to three files. Values are never logged.

    Args:
        entries: datalist entries (dicts with ``image``).
        source: the data set's name, for the log messages.
    """
    missing: list[str] = []
    unreadable: list[str] = []
    counts = {"age": 0, "sex": 0, "view": 0}
    for e in entries:
        path = str(e["image"])
        if not os.path.isfile(path):
            missing.append(path)
            continue
        try:
            meta = read_dicom_metadata(path)
        except (ValueError, OSError):
            unreadable.append(path)
            continue
        for key in meta:
            counts[key] += 1
        e.update(meta)
    what = f"{source} " if source else ""
    if missing:
        logger.warning("%d %simage file(s) do not exist, so their age/sex/view are unknown, e.g. %s",
                       len(missing), what, missing[:3])
    if unreadable:
        logger.warning("%d %simage file(s) have no readable DICOM header, so their age/sex/view are unknown, e.g. %s",
                       len(unreadable), what, unreadable[:3])
    logger.info("%sDICOM headers of %d image(s): age known for %d, sex for %d, view for %d",
                what, len(entries), counts["age"], counts["sex"], counts["view"])
