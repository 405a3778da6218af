"""MONAI dictionary transforms for medical image loading and intensity normalization (installed as ``hmn.transforms``)."""

from __future__ import annotations
