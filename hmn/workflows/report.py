"""The end of a training run: the best model evaluated on the test split, so the run ends with its report."""

from __future__ import annotations

import logging
import os
from typing import Any

from hmn.workflows.devices import as_bool, rank_world

__all__ = ["evaluate_after_training"]

logger = logging.getLogger(__name__)


def evaluate_after_training(evaluator: Any, ckpt_dir: str, enabled: Any = True) -> bool:
    """After training, evaluates the best model (``<ckpt_dir>/model.pt``, loaded by the evaluator's
    ``CheckpointLoader``) on the test split, so the run ends with its report (the bundles' ``test#evaluator``
    writes ``runs/eval/``). Skipped, with a log line, when disabled, on other ranks than 0, without a
    ``model.pt`` (no validation ran) or with an empty test split. Returns whether it ran."""
    if not as_bool(enabled, "evaluate_after_training") or rank_world()[0] != 0:
        return False
    if not os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        logger.info("no %s: the test split is not evaluated", os.path.join(ckpt_dir, "model.pt"))
        return False
    n = len(evaluator.data_loader.dataset)
    if n == 0:
        logger.info("the datalist has no test split: nothing evaluated after training")
        return False
    logger.info("training done: evaluating the best model (%s) on the %d test images",
                os.path.join(ckpt_dir, "model.pt"), n)
    evaluator.run()
    return True
