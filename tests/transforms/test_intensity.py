"""Intensity transforms against hand-worked values and numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from hmn.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetNormalize,
    ImageNetNormalized,
    LoadXray,
    PercentileRescale,
    PercentileRescaled,
    WindowIntensity,
    WindowIntensityd,
    XRVScale,
    XRVScaled,
    ZScoreNormalize,
    ZScoreNormalized,
)


def test_percentile_rescale_hand_worked():
    # 0..100: the 10th percentile is 10, the 90th is 90 (numpy's linear interpolation)
    x = torch.arange(101, dtype=torch.float32).reshape(1, 1, 101)
    out = PercentileRescale(lower=10, upper=90)(x)
    assert out[0, 0, 10].item() == pytest.approx(0.0)
    assert out[0, 0, 50].item() == pytest.approx(0.5)
    assert out[0, 0, 90].item() == pytest.approx(1.0)
    assert out.min().item() == 0.0 and out.max().item() == 1.0  # clipped outside
    unclipped = PercentileRescale(lower=10, upper=90, clip=False)(x)
    assert unclipped[0, 0, 0].item() == pytest.approx(-10 / 80)


def test_percentile_rescale_matches_numpy_on_real_radiograph(realfile):
    img = LoadXray()(realfile("RG3_UNCI.dcm"))
    lo, hi = np.percentile(img.numpy(), [0.5, 99.5])
    expected = np.clip((img.numpy() - lo) / (hi - lo), 0, 1)
    out = PercentileRescale()(img)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == img.meta["filename_or_obj"]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_percentile_rescale_channel_wise_and_constant():
    x = np.stack([np.linspace(0, 10, 50), np.linspace(100, 300, 50)]).astype(np.float32)[:, None]
    out = PercentileRescale(0, 100, channel_wise=True)(x)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out[:, 0, [0, -1]], [[0, 1], [0, 1]], atol=1e-6)
    assert np.all(PercentileRescale()(np.full((1, 4, 4), 7.0)) == 0)


def test_window_hand_worked_and_preset():
    w = WindowIntensity(center=40, width=400)  # [-160, 240]
    x = torch.tensor([[-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0]])
    np.testing.assert_allclose(w(x).numpy(), [[0, 0, 0.5, 0.75, 1, 1]], atol=1e-6)
    lung = WindowIntensity(preset="lung", out_min=-1, out_max=1)  # (-600, 1500): [-1350, 150]
    np.testing.assert_allclose(lung(torch.tensor([-1350.0, -600.0, 150.0])).numpy(), [-1, 0, 1], atol=1e-6)
    with pytest.raises(ValueError, match="unknown window preset"):
        WindowIntensity(preset="lungs")
    with pytest.raises(ValueError, match="width must be > 0"):
        WindowIntensity(center=0, width=0)


def test_window_on_real_ct_hounsfield(realfile):
    ct = LoadXray(voi="ignore")(realfile("CT_small.dcm"))  # HU after RescaleIntercept -1024
    out = WindowIntensityd(keys="image", center=40, width=400)({"image": ct})["image"]
    expected = np.clip((ct.numpy() - (-160.0)) / 400.0, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_zscore_hand_worked():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # mean 2.5, population std sqrt(1.25)
    out = ZScoreNormalize()(x)
    np.testing.assert_allclose(out.numpy().ravel(), (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25), rtol=1e-6)
    nz = ZScoreNormalize(nonzero=True)(torch.tensor([[0.0, 2.0, 4.0, 0.0]]))  # stats over {2, 4}: mean 3, std 1
    np.testing.assert_allclose(nz.numpy(), [[0, -1, 1, 0]], atol=1e-6)
    cw = ZScoreNormalize(channel_wise=True)(np.array([[1.0, 3.0], [10.0, 30.0]]))
    np.testing.assert_allclose(cw, [[-1, 1], [-1, 1]], atol=1e-6)


def test_imagenet_normalize_one_to_three_channels():
    x = MetaTensor(torch.full((1, 2, 2), 0.5), meta={"filename_or_obj": "a.png"})
    out = ImageNetNormalize()(x)
    assert out.shape == (3, 2, 2) and out.meta["filename_or_obj"] == "a.png"
    for c in range(3):
        assert out[c, 0, 0].item() == pytest.approx((0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)
    grey = ImageNetNormalize(to_rgb=False)(torch.full((1, 2, 2), 0.5))
    assert grey.shape == (1, 2, 2)
    assert grey[0, 0, 0].item() == pytest.approx((0.5 - np.mean(IMAGENET_MEAN)) / np.mean(IMAGENET_STD), rel=1e-6)
    rgb = ImageNetNormalize()(torch.ones(3, 1, 1))
    np.testing.assert_allclose(rgb.numpy().ravel(), (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD), rtol=1e-6)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ImageNetNormalize()(torch.ones(2, 4, 4))


def test_xrv_scale_matches_torchxrayvision_formula():
    # TorchXRayVision: (2 * (img / maxval) - 1) * 1024
    img = np.array([0.0, 63.75, 127.5, 255.0], np.float32)
    expected = (2 * (img / 255.0) - 1.0) * 1024.0
    np.testing.assert_allclose(XRVScale(in_max=255.0)(img), expected, rtol=1e-6)
    np.testing.assert_allclose(XRVScale()(torch.tensor([0.0, 0.5, 1.0])).numpy(), [-1024, 0, 1024])
    assert XRVScale(clip=True)(torch.tensor([2.0])).item() == 1024.0


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"_target_": "hmn.transforms.PercentileRescaled", "lower": 0, "upper": 100}, [0.0, 0.5, 1.0]),
        ({"_target_": "hmn.transforms.WindowIntensityd", "center": 2, "width": 4}, [0.0, 0.5, 1.0]),
        ({"_target_": "hmn.transforms.ZScoreNormalized"}, [-1.2247449, 0.0, 1.2247449]),
        ({"_target_": "hmn.transforms.XRVScaled", "in_max": 4}, [-1024.0, 0.0, 1024.0]),
    ],
)
def test_selectable_from_bundle_config(config, expected):
    transform = ConfigParser({"t": {**config, "keys": ["image"], "allow_missing_keys": True}}).get_parsed_content("t")
    out = transform({"image": torch.tensor([[0.0, 2.0, 4.0]]), "label": [1]})
    np.testing.assert_allclose(out["image"].numpy().ravel(), expected, rtol=1e-5, atol=1e-5)
    assert transform({"label": [1]}) == {"label": [1]}  # allow_missing_keys


def test_imagenet_dict_wrapper():
    out = ImageNetNormalized(keys="image")({"image": torch.zeros(1, 3, 3)})["image"]
    assert out.shape == (3, 3, 3)
    assert isinstance(PercentileRescaled(keys="image").transform, PercentileRescale)
    assert isinstance(ZScoreNormalized(keys="image").transform, ZScoreNormalize)
    assert isinstance(XRVScaled(keys="image").transform, XRVScale)


@pytest.mark.parametrize(
    "transform",
    [PercentileRescale(), WindowIntensity(0, 10), ZScoreNormalize(), ImageNetNormalize(), XRVScale()],
)
def test_inputs_are_not_modified_and_meta_is_copied(transform):
    x = MetaTensor(torch.linspace(-5, 5, 16).reshape(1, 4, 4), meta={"filename_or_obj": "a.dcm"})
    before = x.clone()
    out = transform(x)
    assert torch.equal(x.as_tensor(), before.as_tensor())
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a.dcm"
    out.meta["filename_or_obj"] = "b.dcm"
    assert x.meta["filename_or_obj"] == "a.dcm"
