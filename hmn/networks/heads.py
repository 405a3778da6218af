"""Classification heads: multi-label, and hierarchical (coarse groups, then fine findings)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MultiLabelHead", "HierarchicalHead", "split_hierarchical"]


class MultiLabelHead(nn.Module):
    """Dropout and a linear layer giving one logit per class (sigmoid, not softmax, downstream)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class HierarchicalHead(nn.Module):
    """Coarse logits (finding groups) and fine logits (findings), the fine layer conditioned on the coarse one.

    The fine layer reads the fused features together with the coarse probabilities, so what a group
    predicts informs its members. The output is one tensor, ``N, num_classes + num_coarse_classes``:
    the fine logits first, then the coarse ones (use :func:`split_hierarchical`). One tensor keeps
    MONAI's engines, post-transforms and TorchScript export working unchanged; the metrics read the
    first ``num_classes`` columns.
    """

    def __init__(self, in_features: int, num_classes: int, num_coarse_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1 or num_coarse_classes < 1:
            raise ValueError(
                f"num_classes and num_coarse_classes must be >= 1, got {num_classes} and {num_coarse_classes}"
            )
        self.num_classes = num_classes
        self.num_coarse_classes = num_coarse_classes
        self.dropout = nn.Dropout(dropout)
        self.coarse = nn.Linear(in_features, num_coarse_classes)
        self.fine = nn.Linear(in_features + num_coarse_classes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x)
        coarse = self.coarse(x)
        fine = self.fine(torch.cat([x, torch.sigmoid(coarse)], dim=1))
        return torch.cat([fine, coarse], dim=1)


def split_hierarchical(logits: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits a :class:`HierarchicalHead` output into ``(fine, coarse)`` logits."""
    return logits[:, :num_classes], logits[:, num_classes:]
