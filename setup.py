"""Package layout that pyproject.toml cannot express: the top-level folder ``transforms/`` installs as ``hmn.transforms``."""

from setuptools import find_packages, setup

core = find_packages(include=["hmn", "hmn.*"])
transforms = ["hmn." + name for name in find_packages(include=["transforms", "transforms.*"])]

setup(packages=core + transforms, package_dir={"hmn.transforms": "transforms"})
