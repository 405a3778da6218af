"""SlidingWindowClassifier: study-level logits from per-window logits, checked on hand-worked volumes."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator

from hmn.inferers import SlidingWindowClassifier


class MeanMax(torch.nn.Module):
    """Toy classifier: the logits of a window are (its mean, its max); records the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        flat = x.flatten(1)
        return torch.stack([flat.mean(1), flat.amax(1)], dim=1)


def _slabs(n_x: int = 5) -> torch.Tensor:
    """(1, 1, n_x, 4, 4) volume whose slab x holds 16 x .. 16 x + 15: mean 16 x + 7.5, max 16 x + 15."""
    return torch.arange(n_x * 16, dtype=torch.float32).reshape(1, 1, n_x, 4, 4)


# Windows of 2 along X over 5 slabs with overlap 0: starts 0, 2 and 3 (the last one shifted back inside).
# Window means 15.5, 47.5, 63.5; maxima 31, 63, 79.
@pytest.mark.parametrize(
    "aggregate, expected",
    [("mean", [(15.5 + 47.5 + 63.5) / 3, (31 + 63 + 79) / 3]), ("max", [63.5, 79.0])],
)
def test_mean_and_max_over_windows(aggregate, expected):
    net = MeanMax()
    out = SlidingWindowClassifier((2, 4, 4), overlap=0.0, aggregate=aggregate, sw_batch_size=2)(_slabs(), net)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([expected]))
    assert net.batches == [2, 1]


def test_overlap_sets_the_stride_and_batches_cross_inputs():
    # roi 2, overlap 0.5 -> stride 1: windows at 0, 1, 2, 3 with means 15.5, 31.5, 47.5, 63.5
    x = torch.cat([_slabs(), _slabs() + 100])
    net = MeanMax()
    out = SlidingWindowClassifier((2, 4, 4), overlap=0.5, aggregate="mean", sw_batch_size=3)(MetaTensor(x), net)
    torch.testing.assert_close(out, torch.tensor([[39.5, 55.0], [139.5, 155.0]]))
    assert net.batches == [3, 3, 2] and type(out) is torch.Tensor


def test_volume_smaller_than_the_roi_is_padded():
    x = -torch.ones(1, 1, 2, 3, 4)  # 24 voxels of -1 padded with 0 to 4 x 4 x 4 = 64
    out = SlidingWindowClassifier(4, aggregate="max")(x, MeanMax())
    torch.testing.assert_close(out, torch.tensor([[-24 / 64, 0.0]]))
    out = SlidingWindowClassifier(4, aggregate="max", cval=-1.0)(x, MeanMax())
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0]]))
    pad, slices = SlidingWindowClassifier((4, 4, 4)).windows((2, 3, 4))
    assert pad == [0, 0, 0, 1, 1, 1] and slices == [(slice(0, 4), slice(0, 4), slice(0, 4))]


def test_2d_input():
    # 4 x 6 image of value 6 r + c; windows of 4 x 3: columns 0-2 (mean 10, max 20) and 3-5 (mean 13, max 23)
    x = torch.arange(24, dtype=torch.float32).reshape(1, 1, 4, 6)
    classifier = SlidingWindowClassifier((4, 3), overlap=0.0, aggregate="mean")
    torch.testing.assert_close(classifier(x, MeanMax()), torch.tensor([[11.5, 21.5]]))


def test_plugs_into_supervised_evaluator():
    x = torch.cat([_slabs(), _slabs() * 2])
    classifier = SlidingWindowClassifier((2, 4, 4), overlap=0.0, aggregate="max")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": x, "label": torch.zeros(2, 2)}],
        network=MeanMax(),
        inferer=classifier,
        decollate=False,
    )
    evaluator.run()
    torch.testing.assert_close(evaluator.state.output["pred"], torch.tensor([[63.5, 79.0], [127.0, 158.0]]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"roi_size": 0}, "roi_size=0"),
        ({"roi_size": (2.5, 2)}, "positive int"),
        ({"roi_size": ()}, "positive int"),
        ({"roi_size": 2, "overlap": 1.0}, r"overlap=1.0.*\[0, 1\)"),
        ({"roi_size": 2, "overlap": -0.1}, r"\[0, 1\)"),
        ({"roi_size": 2, "aggregate": "median"}, r"aggregate='median' is not one of \('mean', 'max'\)"),
        ({"roi_size": 2, "sw_batch_size": 0}, "sw_batch_size=0"),
        ({"roi_size": 2, "padding_mode": "edge"}, "padding_mode='edge'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowClassifier(**kwargs)


def test_bad_inputs_and_outputs():
    with pytest.raises(ValueError, match=r"roi_size=\(2, 2\) has 2 axes but the input \(5, 4, 4\) has 3"):
        SlidingWindowClassifier((2, 2))(_slabs(), MeanMax())
    with pytest.raises(ValueError, match=r"overlap=\(0.1, 0.2\) has 2 axes"):
        SlidingWindowClassifier(2, overlap=(0.1, 0.2))(_slabs(), MeanMax())
    with pytest.raises(ValueError, match=r"inputs of shape \(1, 1, 8\)"):
        SlidingWindowClassifier(2)(torch.zeros(1, 1, 8), MeanMax())
    with pytest.raises(ValueError, match="for dense outputs use monai.inferers.SlidingWindowInferer"):
        SlidingWindowClassifier(2)(_slabs(), lambda w: w)
    with pytest.raises(TypeError, match="returned tuple"):
        SlidingWindowClassifier(2)(_slabs(), lambda w: (w.flatten(1)[:, :2],))
