"""Losses against hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from hmn.losses import (
    CHESTXRAY14_HIERARCHY,
    HierarchicalLoss,
    MultiLabelBCELoss,
    coarse_targets,
    fine_to_coarse_indices,
    pos_weight_from_labels,
)


def _bce(z, y, w=1.0):
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_bce_with_pos_weight_and_mask_by_hand():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # -1: uncertain label, ignored
    loss = MultiLabelBCELoss(pos_weight=[2.0, 3.0])(logits, target)
    want = (_bce(0.5, 1, 2.0) + _bce(-1.0, 0) + _bce(0.0, 1, 3.0)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    assert logits.grad[1, 0] == 0  # masked entry gets no gradient


def test_pos_weight_from_labels():
    labels = [[1, 0, -1], [0, 0, 1], [0, 0, 0], [1, 0, 0]]
    w = pos_weight_from_labels(labels, max_weight=50)
    assert w.tolist() == pytest.approx([1.0, 50.0, 2.0])


def test_coarse_targets_and_hierarchical_loss_by_hand():
    names = ["Nodule", "Mass", "Effusion"]
    parent, groups = fine_to_coarse_indices(names)
    assert parent == [0, 0, 1] and groups == ["nodule or mass", "pleural"]
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    ct = coarse_targets(target, parent, 2)
    assert ct.tolist() == [[1.0, 0.0], [-1.0, 0.0]]  # unknown member, no positive -> masked group

    logits = torch.tensor([[0.2, 1.0, -0.5, 0.3, -2.0], [1.5, 0.0, 0.4, -0.1, 0.7]])
    loss = HierarchicalLoss(3, parent, fine_weight=1.0, coarse_weight=0.5, consistency_weight=2.0)(logits, target)
    fine = (_bce(0.2, 0) + _bce(1.0, 1) + _bce(-0.5, 0) + _bce(1.5, 0) + _bce(0.4, 0)) / 5
    coarse = (_bce(0.3, 1) + _bce(-2.0, 0) + _bce(0.7, 0)) / 3
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    gaps = [sig(f) - sig(c) for f, c in [(0.2, 0.3), (1.0, 0.3), (-0.5, -2.0), (1.5, -0.1), (0.0, -0.1), (0.4, 0.7)]]
    consistency = sum(max(g, 0) for g in gaps) / 6
    assert loss.item() == pytest.approx(fine + 0.5 * coarse + 2.0 * consistency, rel=1e-6)


def test_hierarchy_covers_chestxray14_and_rejects_unknown():
    parent, groups = fine_to_coarse_indices(list(CHESTXRAY14_HIERARCHY))
    assert len(parent) == 14 and len(groups) == 4
    with pytest.raises(ValueError, match="Covid"):
        fine_to_coarse_indices(["Covid"])
