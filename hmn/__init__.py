"""HybridMedNet: multi-label medical image classification on MONAI, timm and ignite.

The import package ``hmn`` holds the networks, losses, data and evaluation code; the repository's
top-level ``transforms/`` folder is installed as ``hmn.transforms``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE_TRANSFORMS = os.path.join(os.path.dirname(_HERE), "transforms")


class _SourceTransformsFinder(importlib.abc.MetaPathFinder):
    """Resolves ``hmn.transforms`` to the repository's ``transforms/`` folder when ``hmn`` is imported
    from a source checkout.

    An installed copy has ``hmn/transforms`` inside the package and never needs this. From the
    repository root, however, the source folder ``hmn/`` comes first on ``sys.path`` (with a plain
    install as well as an editable one) and has no ``transforms`` inside; the sibling folder is the
    one that belongs to it.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname != "hmn.transforms":
            return None  # submodules resolve through the package's __path__ given below
        init = os.path.join(_SOURCE_TRANSFORMS, "__init__.py")
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[_SOURCE_TRANSFORMS]
        )


if not os.path.isdir(os.path.join(_HERE, "transforms")) and os.path.isfile(
    os.path.join(_SOURCE_TRANSFORMS, "__init__.py")
):
    sys.meta_path.insert(0, _SourceTransformsFinder())
