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
