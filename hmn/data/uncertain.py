"""Uncertainty policies for CheXpert-style observation tables (CheXpert, MIMIC-CXR-JPG).

The CheXpert labeller (Irvin et al., AAAI 2019) and NegBio write each observation as 1 (positive), 0
(negative), -1 (uncertain) or blank (not mentioned). A policy turns -1 into a training label per class:
``"ones"`` (U-Ones: positive), ``"zeros"`` (U-Zeros: negative) or ``"ignore"`` (U-Ignore: label 0 with
``label_mask`` 0, so that a masked loss leaves it out). Blank is read as negative, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .datalist import DatalistError

__all__ = ["UNCERTAIN_POLICIES", "apply_uncertainty", "uncertainty_policies"]

UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")


def uncertainty_policies(classes: Sequence[str], uncertain: str | Mapping[str, str]) -> dict[str, str]:
    """The policy of each class.

    Args:
        classes: the class names.
        uncertain: one policy for all classes (``"ones"``, ``"zeros"`` or ``"ignore"``), or a mapping
            class -> policy (classes not in it get ``"ones"``).

    Returns:
        ``{class: policy}`` in `classes` order.

    Raises:
        DatalistError: the mapping names a class not among `classes`, or a policy is not one of
            :data:`UNCERTAIN_POLICIES`.
    """
    classes = list(classes)
    if isinstance(uncertain, str):
        policies = {c: uncertain for c in classes}
    else:
        policies = {c: uncertain.get(c, "ones") for c in classes}
        extra = [c for c in uncertain if c not in classes]
        if extra:
            raise DatalistError(f"uncertain policy given for {extra}, which are not among classes {classes}")
    bad = {c: p for c, p in policies.items() if p not in UNCERTAIN_POLICIES}
    if bad:
        raise DatalistError(f"unknown uncertainty policy {bad}; accepted: {list(UNCERTAIN_POLICIES)}")
    return policies


def apply_uncertainty(
    values: np.ndarray, columns: Sequence[str], policies: Mapping[str, str], table: str
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and masks from observation values under per-column policies.

    Args:
        values: (N, K) floats, one column per name in `columns`: 1, 0, -1 or NaN (blank, read as 0).
        columns: the K column names (keys of `policies`).
        policies: column -> ``"ones"`` | ``"zeros"`` | ``"ignore"``.
        table: the file the values come from, for error messages (row ``r`` of `values` is reported as
            line ``r + 2`` of it, below the header).

    Returns:
        ``(labels, mask)``: two (N, K) int arrays; `mask` is 0 exactly where the value was -1 under ``"ignore"``.

    Raises:
        DatalistError: a value other than 1, 0, -1 or blank, naming the file, column and row.
    """
    values = np.asarray(values, dtype=np.float64)
    values = np.where(np.isnan(values), 0.0, values)
    odd = ~np.isin(values, (-1.0, 0.0, 1.0))
    if odd.any():
        r, c = np.argwhere(odd)[0]
        raise DatalistError(
            f"{table}: value {values[r, c]} in column {columns[c]!r} (row {r + 2}); accepted: 1, 0, -1 or blank"
        )
    labels = values.copy()
    mask = np.ones_like(values)
    for j, c in enumerate(columns):
        unc = values[:, j] == -1
        p = policies[c]
        labels[unc, j] = 1.0 if p == "ones" else 0.0
        if p == "ignore":
            mask[unc, j] = 0.0
    return labels.astype(int), mask.astype(int)
