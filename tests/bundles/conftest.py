"""Fixtures shared by the bundle tests: the synthetic demo datalist and a bundle trained on it once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # the image size of the demo data and of every bundle run in these tests


@pytest.fixture(scope="session")
def demo_datalist(tmp_path_factory):
    from hmn.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=80, image_size=SIZE, seed=3)


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
