"""The MONAI bundles: the table of bundles, the one template their configs come from, their docs, and packing,
sharing and downloading them (formerly ``hmn.bundles``, ``hmn.bundle_docs`` and ``hmn.archives``).

* :mod:`hmn.bundle.table` -> one row per bundle (:data:`BUNDLES`) and the constants the other modules share.
* :mod:`hmn.bundle.template` -> the config builders: ``train.json``, ``evaluate.json``, ``inference.json``, ...
* :mod:`hmn.bundle.metadata` -> ``configs/metadata.json`` (MONAI's bundle specification).
* :mod:`hmn.bundle.docs` -> ``docs/README.md`` and ``LICENSE`` of a bundle.
* :mod:`hmn.bundle.files` -> writes or checks ``bundles/<name>/`` (``python -m hmn bundles [--check]``).
* :mod:`hmn.bundle.errors` -> a bundle run's one-line error summary and its check of command-line overrides.
* :mod:`hmn.bundle.packing` -> zips a trained bundle for sharing (``python -m hmn pack-bundle``).
* :mod:`hmn.bundle.torchscript` -> a packed bundle's ``models/model.ts`` (MONAI's ``ckpt_export``, checked).
* :mod:`hmn.bundle.distribution` -> downloads a packed bundle and its linked large files, hash-checked.
* :mod:`hmn.bundle.archives` -> the checked extraction of a bundle zip (no path outside ``<name>/``, no links).

The function ``metadata`` is not re-exported here: its name is that of its module; import it from
:mod:`hmn.bundle.metadata`.
"""

from __future__ import annotations

from .archives import (
    MAX_BUNDLE_BYTES,
    MAX_ENTRIES,
    MAX_RATIO,
    ArchiveError,
    check_bundle_name,
    check_zip_entries,
    extract_bundle_zip,
)
from .distribution import download_bundle, fetch_large_files, fetch_main, read_large_files
from .docs import bundle_readme, export_section, license_text, volume_bundle_readme
from .errors import check_overrides, error_summary, install_error_summary
from .files import LOGGING_CONF, bundle_files, check_bundles, main, write_bundles
from .metadata import INSTALL_NOTE, SCHEMA_URL, bundle_name, bundle_version
from .packing import (
    LARGE_FILES,
    ZOO_FILE_LIMIT,
    file_hash,
    installed_versions,
    large_files_text,
    pack_bundle,
    pack_main,
    packed_config,
    packed_inference_config,
    packed_metadata,
    ts_url_beside,
)
from .table import (
    BUNDLES,
    EXPORT_ARGS,
    HASH_TYPES,
    ONNX_ATOL,
    ONNX_OPSET,
    PLACEHOLDER_URL,
    REQUIRED_PACKAGES,
    SELF_CROSS,
    TESTED_WITH,
    TS_PLACEHOLDER_URL,
    VOLUME_BUNDLES,
    VOLUME_DEFAULTS,
    BundleRow,
    is_volume_bundle,
)
from .template import (
    evaluate_config,
    export_args,
    inference_config,
    multi_gpu_config,
    multi_gpu_inference_config,
    train_config,
)
from .torchscript import (
    TORCHSCRIPT_ATOL,
    TORCHSCRIPT_RTOL,
    TS_EXTRA_FILES,
    TorchScriptExportError,
    export_packed_torchscript,
)

__all__ = [
    "ArchiveError",
    "BUNDLES",
    "BundleRow",
    "EXPORT_ARGS",
    "HASH_TYPES",
    "INSTALL_NOTE",
    "LARGE_FILES",
    "LOGGING_CONF",
    "MAX_BUNDLE_BYTES",
    "MAX_ENTRIES",
    "MAX_RATIO",
    "ONNX_ATOL",
    "ONNX_OPSET",
    "PLACEHOLDER_URL",
    "REQUIRED_PACKAGES",
    "SCHEMA_URL",
    "SELF_CROSS",
    "TESTED_WITH",
    "TORCHSCRIPT_ATOL",
    "TORCHSCRIPT_RTOL",
    "TS_EXTRA_FILES",
    "TS_PLACEHOLDER_URL",
    "TorchScriptExportError",
    "VOLUME_BUNDLES",
    "VOLUME_DEFAULTS",
    "ZOO_FILE_LIMIT",
    "bundle_files",
    "bundle_name",
    "bundle_version",
    "bundle_readme",
    "check_bundle_name",
    "check_bundles",
    "check_overrides",
    "check_zip_entries",
    "download_bundle",
    "error_summary",
    "evaluate_config",
    "export_args",
    "export_packed_torchscript",
    "export_section",
    "extract_bundle_zip",
    "fetch_large_files",
    "fetch_main",
    "file_hash",
    "inference_config",
    "install_error_summary",
    "installed_versions",
    "is_volume_bundle",
    "large_files_text",
    "license_text",
    "main",
    "multi_gpu_config",
    "multi_gpu_inference_config",
    "pack_bundle",
    "pack_main",
    "packed_config",
    "packed_inference_config",
    "packed_metadata",
    "read_large_files",
    "train_config",
    "ts_url_beside",
    "volume_bundle_readme",
    "write_bundles",
]
