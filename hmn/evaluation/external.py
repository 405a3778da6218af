"""External validation: a model trained on one source evaluated on another source's datalist, over the
findings both name (through :mod:`hmn.data.vocabulary`).

The bundles' ``evaluate.json`` calls :func:`match_for_evaluation` before it runs. With ``findings="same"``
(the default) the datalist must have the model's classes in the model's order, as before; with
``findings="shared"`` the model's outputs and the datalist's label columns are paired by canonical
finding, the report's classes become those findings, and the report's ``findings`` section names the
pairs and the classes of either side left out::

    python -m monai.bundle run evaluating --config_file bundles/convnext_tiny/configs/evaluate.json \\
        --datalist chexpert.json --findings shared
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from hmn.data.vocabulary import SOURCE_VOCABULARIES, match_findings

__all__ = ["FINDINGS_MODES", "datalist_vocabulary", "match_for_evaluation"]

logger = logging.getLogger(__name__)

FINDINGS_MODES = ("same", "shared")


def datalist_vocabulary(datalist: Any) -> str | None:
    """How a datalist's class names are to be read: :data:`~hmn.data.vocabulary.VOCABULARY_VERSION` when it
    was built with the vocabulary (canonical names), its ``source`` when that source has a table in
    :data:`~hmn.data.vocabulary.SOURCE_VOCABULARIES`, else None (the user's own names).

    Args:
        datalist: the datalist JSON's path, or its dict.
    """
    if isinstance(datalist, (str, os.PathLike)):
        from hmn.data import read_datalist

        datalist = read_datalist(datalist)
    if not isinstance(datalist, dict):
        return None
    if datalist.get("vocabulary"):
        return str(datalist["vocabulary"])
    source = datalist.get("source")
    return source if source in SOURCE_VOCABULARIES else None


def match_for_evaluation(
    model_classes: Sequence[str],
    datalist: Any,
    findings: str = "same",
    model_vocabulary: str | None = None,
) -> dict[str, Any] | None:
    """Pairs a model's outputs with a datalist's label columns for evaluation.

    Args:
        model_classes: the model's class names, in output order (its run record's).
        datalist: the evaluated datalist (path or dict).
        findings: ``"same"``: the datalist must have exactly the model's classes in order; ``"shared"``:
            evaluate the findings both map to.
        model_vocabulary: the vocabulary of the model's class names (its run record's ``label_vocabulary``:
            a source name, the canonical vocabulary, or None).

    Returns:
        None when the classes are the same, in the same order (nothing to map); else ``{"compared":
        [{"finding", "model_class", "data_class"}], "model_index", "data_index", "model_only", "data_only",
        "n_data_classes", "model_vocabulary", "data_vocabulary"}``.

    Raises:
        ValueError: `findings` is not one of :data:`FINDINGS_MODES`.
        hmn.runs.RunRecordMismatchError: the classes differ and `findings` is ``"same"`` (the message says how
            to evaluate the shared findings), or no finding is shared.
    """
    from hmn.data import read_datalist
    from hmn.runs import RunRecordMismatchError

    if findings not in FINDINGS_MODES:
        raise ValueError(f"findings={findings!r}; accepted: {list(FINDINGS_MODES)}")
    data = read_datalist(datalist) if isinstance(datalist, (str, os.PathLike)) else datalist
    where = os.fspath(datalist) if isinstance(datalist, (str, os.PathLike)) else "the datalist"
    data_classes = [str(c) for c in data.get("class_names") or []]
    if not data_classes:
        raise ValueError(f"{where} has no 'class_names'; write it with `python -m hmn datalist`")
    model_classes = [str(c) for c in model_classes]
    if model_classes == data_classes:
        return None
    data_vocabulary = datalist_vocabulary(data)
    if findings == "same":
        raise RunRecordMismatchError(
            f"the model predicts {model_classes} but {where} has class_names {data_classes}: labels and predictions "
            "would be paired wrongly. To evaluate the findings both share (external validation through the finding "
            "vocabulary), pass --findings shared; otherwise use a datalist with the model's classes, in its order"
        )
    m = match_findings(model_classes, data_classes, model_vocabulary, data_vocabulary)
    if not m["pairs"]:
        raise RunRecordMismatchError(
            f"the model's classes {model_classes} (vocabulary {model_vocabulary or 'own names'}) and {where}'s "
            f"{data_classes} (vocabulary {data_vocabulary or 'own names'}) share no finding. Build the datalist "
            "with --vocabulary, or name its classes as the model does"
        )
    out = {
        "compared": [{"finding": f, "model_class": model_classes[i], "data_class": data_classes[j]} for i, j, f in m["pairs"]],
        "model_index": [i for i, _, _ in m["pairs"]],
        "data_index": [j for _, j, _ in m["pairs"]],
        "model_only": m["model_only"],
        "data_only": m["data_only"],
        "n_data_classes": len(data_classes),
        "model_vocabulary": model_vocabulary,
        "data_vocabulary": data_vocabulary,
    }
    logger.info("evaluating %d shared finding(s): %s; the model's %s and the datalist's %s are left out",
                len(m["pairs"]), ", ".join(f"{c['finding']} ({c['model_class']} / {c['data_class']})" for c in out["compared"]),
                m["model_only"] or "none", m["data_only"] or "none")
    return out
