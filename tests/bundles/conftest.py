"""Fixtures shared by the bundle tests: the synthetic demo datalist and a bundle trained on it once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # the image size of the demo data and of every bundle run in these tests
SIZE_3D = [32, 32, 16]  # the volume size (X, Y, Z) of the 3D bundle runs in these tests
SPACING_3D = [3.0, 3.0, 6.0]  # the demo volumes' 96 mm field of view at SIZE_3D


def is_3d(name: str) -> bool:
    from hmn.bundle import is_volume_bundle

    return is_volume_bundle(name)


def run_size(name: str):
    """The image size the tests run bundle ``name`` at: SIZE (radiographs) or SIZE_3D (volumes)."""
    return list(SIZE_3D) if is_3d(name) else SIZE


@pytest.fixture(scope="session")
def demo_datalist(tmp_path_factory):
    from hmn.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=80, image_size=SIZE, seed=3)


@pytest.fixture(scope="session")
def demo3d_datalist(tmp_path_factory):
    """40 synthetic demo volumes (NIfTI files and DICOM series) at the demo's 64 x 64 x 32 voxels."""
    from hmn.data import make_demo3d_dataset

    return make_demo3d_dataset(tmp_path_factory.mktemp("demo3d"), n_volumes=40, seed=5)


@pytest.fixture(scope="session")
def size_for():
    """``size_for(name)``: :func:`run_size` as a fixture, for the test modules (conftest is not importable)."""
    return run_size


@pytest.fixture(scope="session")
def datalist_for(request):
    """``datalist_for(name)``: the demo datalist (radiographs or volumes) that bundle ``name`` takes."""
    return lambda name: request.getfixturevalue("demo3d_datalist" if is_3d(name) else "demo_datalist")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_datalist):
    """convnext_tiny trained for 2 epochs with the README's command; its bundle_root."""
    root = tmp_path_factory.mktemp("convnext_tiny")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           "bundles/convnext_tiny/configs/train.json", "--datalist", demo_datalist, "--bundle_root", str(root),
           "--max_epochs", "2", "--image_size", str(SIZE), "--batch_size", "8", "--num_workers", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return root
