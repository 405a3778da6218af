"""Compatibility shim: the former ``hmn.training``, now :mod:`hmn.workflows`.

This module exists only so that bundles packed before the split (whose configs name ``hmn.training.X`` in
``_target_`` and ``$`` expressions) still load. New code imports from :mod:`hmn.workflows`; nothing here
but re-exports of the names the module had.
"""

from hmn.workflows import (  # noqa: F401 - re-exports for bundles packed before hmn.workflows
    AMP_DTYPES,
    AUTO_CACHE_SHARE,
    CACHE_MODES,
    CACHE_RESIDENT_FACTOR,
    BestModelRecord,
    CPUAutocastInferer,
    EarlyStopRecord,
    EpochLoss,
    MetricHistory,
    ResumeFromLatest,
    RunTimeEstimate,
    amp_kwargs,
    as_bool,
    available_memory,
    cache_plan,
    check_validation_split,
    checkpoints_by_epoch,
    class_names,
    cpu_bf16_supported,
    default_num_workers,
    drop_last_batch,
    evaluate_after_training,
    label_tensor,
    latest_checkpoint,
    make_dataset,
    plot_history,
    pos_weight,
    pretrained_given,
    resolve_datalist,
    set_aside,
    to_device,
    trim_history,
)
