"""Compatibility shim: the former ``hmn.bundles``, now :mod:`hmn.bundle`.

This module exists only so that bundles packed before the split (whose configs name ``hmn.bundles.X``, e.g.
``$hmn.bundles.install_error_summary()``) still load. New code imports from :mod:`hmn.bundle`; nothing here
but re-exports of the names the module had.
"""

from hmn.bundle import (  # noqa: F401 - re-exports for bundles packed before hmn.bundle
    BUNDLES,
    EXPORT_ARGS,
    HASH_TYPES,
    INSTALL_NOTE,
    LARGE_FILES,
    LOGGING_CONF,
    ONNX_ATOL,
    ONNX_OPSET,
    PLACEHOLDER_URL,
    REQUIRED_PACKAGES,
    SCHEMA_URL,
    SELF_CROSS,
    TESTED_WITH,
    VOLUME_BUNDLES,
    VOLUME_DEFAULTS,
    ZOO_FILE_LIMIT,
    BundleRow,
    bundle_files,
    check_bundles,
    check_overrides,
    download_bundle,
    error_summary,
    evaluate_config,
    export_args,
    fetch_large_files,
    fetch_main,
    file_hash,
    inference_config,
    install_error_summary,
    installed_versions,
    is_volume_bundle,
    large_files_text,
    main,
    multi_gpu_config,
    multi_gpu_inference_config,
    pack_bundle,
    pack_main,
    packed_config,
    packed_inference_config,
    packed_metadata,
    read_large_files,
    train_config,
    write_bundles,
)
from hmn.bundle.metadata import metadata  # noqa: F401
