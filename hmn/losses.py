"""Losses for multi-label findings: BCE with ``pos_weight`` and label masks, and the hierarchical loss.

Targets are multi-hot float tensors ``N, num_classes``. An entry below zero (the ``-1`` an "ignore"
policy leaves for an uncertain CheXpert label) or NaN is masked: it adds nothing to the loss and its
gradient is zero.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmn.networks.heads import split_hierarchical

__all__ = [
    "CHESTXRAY14_HIERARCHY",
    "MultiLabelBCELoss",
    "HierarchicalLoss",
    "coarse_targets",
    "fine_to_coarse_indices",
    "pos_weight_from_labels",
]

# The project's grouping of the ChestX-ray14 findings for the hierarchical head (4 coarse groups).
CHESTXRAY14_HIERARCHY: dict[str, str] = {
    "Atelectasis": "parenchymal opacity",
    "Consolidation": "parenchymal opacity",
    "Infiltration": "parenchymal opacity",
    "Pneumonia": "parenchymal opacity",
    "Edema": "parenchymal opacity",
    "Nodule": "nodule or mass",
    "Mass": "nodule or mass",
    "Effusion": "pleural",
    "Pleural_Thickening": "pleural",
    "Pneumothorax": "pleural",
    "Cardiomegaly": "cardiac, airway and other",
    "Emphysema": "cardiac, airway and other",
    "Fibrosis": "cardiac, airway and other",
    "Hernia": "cardiac, airway and other",
}


def fine_to_coarse_indices(
    class_names: Sequence[str], hierarchy: Mapping[str, str] = CHESTXRAY14_HIERARCHY
) -> tuple[list[int], list[str]]:
    """Maps each class to the index of its group; returns ``(indices, group names in first-seen order)``."""
    missing = [c for c in class_names if c not in hierarchy]
    if missing:
        raise ValueError(f"classes {missing} have no group in the hierarchy; known: {sorted(hierarchy)}")
    groups: list[str] = []
    for c in class_names:
        if hierarchy[c] not in groups:
            groups.append(hierarchy[c])
    return [groups.index(hierarchy[c]) for c in class_names], groups


def _mask(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    valid = (target >= 0) & ~torch.isnan(target)
    return torch.where(valid, target, torch.zeros_like(target)), valid.to(target.dtype)


def _masked_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor | None) -> torch.Tensor:
    target, valid = _mask(target.to(logits.dtype))
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


def pos_weight_from_labels(labels: np.ndarray | torch.Tensor | Sequence[Sequence[float]], max_weight: float = 100.0) -> torch.Tensor:
    """``negatives / positives`` per class over the training labels (masked entries not counted).

    A class with no positive gets ``max_weight``; every weight is clipped to ``[1 / max_weight, max_weight]``.
    """
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    if y.ndim != 2:
        raise ValueError(f"labels must be a 2D (samples x classes) array, got shape {tuple(y.shape)}")
    y, valid = _mask(y)
    pos = (y * valid).sum(0)
    neg = ((1 - y) * valid).sum(0)
    weight = torch.where(pos > 0, neg / pos.clamp_min(1e-12), torch.full_like(pos, max_weight))
    return weight.clamp(1.0 / max_weight, max_weight).float()


class MultiLabelBCELoss(nn.Module):
    """Binary cross-entropy over the findings, with optional ``pos_weight`` and masked (``< 0``) targets.

    Args:
        pos_weight: one weight per class for the positive term (see :func:`pos_weight_from_labels`).
    """

    def __init__(self, pos_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} shapes differ")
        return _masked_bce(logits, target, self.pos_weight)


def coarse_targets(target: torch.Tensor, fine_to_coarse: Sequence[int], num_coarse: int) -> torch.Tensor:
    """Group labels from finding labels: 1 if any member is positive, 0 if all are known negative,
    otherwise ``-1`` (masked)."""
    target = target.float()
    out = torch.empty(target.shape[0], num_coarse, dtype=target.dtype, device=target.device)
    index = torch.as_tensor(list(fine_to_coarse), device=target.device)
    for g in range(num_coarse):
        members = target[:, index == g]
        if members.shape[1] == 0:
            out[:, g] = -1
            continue
        positive = (members > 0.5).any(1)
        known = ((members >= 0) & ~torch.isnan(members)).all(1)
        out[:, g] = torch.where(positive, 1.0, torch.where(known, 0.0, -1.0))
    return out


class HierarchicalLoss(nn.Module):
    """Loss for :class:`~hmn.networks.heads.HierarchicalHead` outputs (fine logits, then coarse logits).

    ``fine_weight * BCE(fine) + coarse_weight * BCE(coarse) + consistency_weight * consistency``, where
    the coarse targets are derived from the fine ones through ``fine_to_coarse`` and the consistency
    term penalizes a finding predicted more likely than its group: ``mean(relu(p_fine - p_group))``.

    Args:
        num_classes: number of fine classes (the first columns of the logits).
        fine_to_coarse: group index of each fine class (see :func:`fine_to_coarse_indices`).
        fine_weight, coarse_weight, consistency_weight: the three terms' weights.
        pos_weight: optional per-class weights for the fine BCE.
    """

    def __init__(
        self,
        num_classes: int,
        fine_to_coarse: Sequence[int],
        fine_weight: float = 1.0,
        coarse_weight: float = 0.5,
        consistency_weight: float = 0.1,
        pos_weight: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if len(fine_to_coarse) != num_classes:
            raise ValueError(f"fine_to_coarse has {len(fine_to_coarse)} entries, expected num_classes={num_classes}")
        self.num_classes = num_classes
        self.num_coarse = max(fine_to_coarse) + 1
        self.register_buffer("parent", torch.as_tensor(list(fine_to_coarse), dtype=torch.long))
        self.weights = (fine_weight, coarse_weight, consistency_weight)
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_classes + self.num_coarse:
            raise ValueError(
                f"expected {self.num_classes} fine + {self.num_coarse} coarse logits, got {logits.shape[1]} columns"
            )
        fine, coarse = split_hierarchical(logits, self.num_classes)
        fine_loss = _masked_bce(fine, target, self.pos_weight)
        coarse_loss = _masked_bce(coarse, coarse_targets(target, self.parent.tolist(), self.num_coarse), None)
        consistency = F.relu(torch.sigmoid(fine) - torch.sigmoid(coarse)[:, self.parent]).mean()
        wf, wc, wk = self.weights
        return wf * fine_loss + wc * coarse_loss + wk * consistency
