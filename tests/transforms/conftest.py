"""Real test images from installed wheels (pydicom, pydicom-data, nibabel), found on disk: nothing downloads."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin) if spec and spec.origin else None


def real_file(name: str) -> str:
    """Path of a test file shipped in pydicom's wheel, the pydicom-data wheel or nibabel's tests, by exact name.

    Looks in the installed folders directly (pydicom's get_testdata_file may try the network for names
    it does not find); fails with an install hint when the dev extras are missing.
    """
    roots = []
    if (d := _package_dir("pydicom")) is not None:
        roots.append(os.path.join(d, "data", "test_files"))
    if (d := _package_dir("data_store")) is not None:  # the pydicom-data wheel
        roots.append(os.path.join(d, "data"))
    if (d := _package_dir("nibabel")) is not None:
        roots.append(os.path.join(d, "tests", "data"))
    for root in roots:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    pytest.fail(f"test file {name!r} not found in {roots}; install the dev extras: pip install -e '.[dev]'")


@pytest.fixture
def realfile():
    return real_file
