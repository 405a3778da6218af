"""The top-level ``transforms/`` folder is importable as ``hmn.transforms`` however the package is installed.

A plain (non-editable) install run from the repository root is the trap: the source folder ``hmn/``
comes first on ``sys.path`` and has no ``transforms`` inside.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import hmn, hmn.transforms, os; print(os.path.realpath(hmn.__file__)); print(os.path.realpath(hmn.transforms.__file__))"


def _probe(cwd: Path, env_path: str | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory):
    """A wheel built from this checkout, unpacked into a folder that is put on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("plain")
    wheel_dir = tmp / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        capture_output=True, text=True,
    )
    if build.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{build.stdout[-2000:]}\n{build.stderr[-2000:]}")
    (wheel,) = wheel_dir.glob("hybridmednet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hmn/transforms/__init__.py" in names
    assert not any(n.startswith("transforms/") for n in names)
    site = tmp / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_plain_install_from_elsewhere(plain_install, tmp_path):
    hmn_file, transforms_file = _probe(tmp_path, str(plain_install))
    assert hmn_file == os.path.realpath(plain_install / "hmn" / "__init__.py")
    assert transforms_file == os.path.realpath(plain_install / "hmn" / "transforms" / "__init__.py")


def test_plain_install_from_repository_root(plain_install):
    hmn_file, transforms_file = _probe(ROOT, str(plain_install))
    # the source tree wins on sys.path, and its transforms/ is the one that belongs to it
    assert hmn_file == os.path.realpath(ROOT / "hmn" / "__init__.py")
    assert transforms_file == os.path.realpath(ROOT / "transforms" / "__init__.py")


def test_current_install_from_elsewhere(tmp_path):
    """The environment running the tests (an editable install in the README's setup) works outside the root."""
    hmn_file, transforms_file = _probe(tmp_path)
    assert Path(transforms_file).parent.name == "transforms"
    assert Path(hmn_file).parent.name == "hmn"


def test_transforms_submodules_resolve_from_the_source_tree():
    code = "import pkgutil, hmn.transforms as t; print(sorted(m.name for m in pkgutil.iter_modules(t.__path__)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = sorted(p.stem for p in (ROOT / "transforms").glob("*.py") if p.stem != "__init__")
    assert eval(out.stdout) == expected
