"""HybridMedNet over every registered backbone, attention mode and head."""

from __future__ import annotations

import io

import pytest
import torch

from hmn.networks import HybridMedNet, backbone_names

IMG = 64
MODES = ["cbam", "self", "cross_scale", ["self", "cross_scale"]]
ALL_NAMES = backbone_names(spatial_dims=2)  # the timm backbones and Vision Mamba (3D: test_backbones3d.py)


def _mode_id(mode):
    return mode if isinstance(mode, str) else "+".join(mode)


def _check_gradients(model):
    """Every trainable parameter has a finite gradient; every one of the project's own stages a non-zero one.

    Some backbone parameters legitimately get an exact zero at initialisation (timm's ResNets start
    each residual branch with a zero-initialised last BatchNorm), so the backbone is held to a
    non-zero total only.
    """
    missing, bad, zero = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            bad.append(name)
        elif not name.startswith("backbone.") and p.grad.abs().sum() == 0:
            zero.append(name)
    assert not missing, f"parameters without gradient: {missing[:10]}"
    assert not bad, f"parameters with non-finite gradient: {bad[:10]}"
    assert not zero, f"parameters with an all-zero gradient: {zero[:10]}"
    assert sum(p.grad.abs().sum() for p in model.backbone.parameters()) > 0


def _round_trip(model, x):
    """Loading a saved state_dict into the perturbed model restores identical outputs."""
    model.eval()
    with torch.no_grad():
        want = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
        assert not torch.allclose(model(x), want)
    buf.seek(0)
    model.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def _build(backbone, mode, hierarchical):
    return HybridMedNet(
        backbone, num_classes=5, img_size=IMG, attention=mode, hierarchical=hierarchical, num_coarse_classes=2,
        fpn_channels=32, fusion_channels=24, num_heads=4, context_size=2,
    )


def _training_step_checks(model):
    torch.manual_seed(0)
    x = torch.randn(2, 1, IMG, IMG)
    out = model.train()(x)
    assert out.shape == (2, model.num_classes + model.num_coarse_classes)
    out.square().sum().backward()
    _check_gradients(model)
    model.zero_grad(set_to_none=True)
    _round_trip(model, x)


# the largest of each family in the slow run (12 s of the default run): their smaller siblings build the same code
@pytest.mark.parametrize("backbone", [pytest.param(n, marks=pytest.mark.slow)
                                      if n in ("convnext_large", "efficientnetv2_l", "vim_base", "swin_base") else n
                                      for n in ALL_NAMES])
def test_every_backbone_with_every_mode_and_head(backbone, shared_backbones):
    """Builds and runs each (attention mode, head) over the backbone, then one full training-step check
    (gradients, state_dict round trip) with the mode and head varying along the table; the mode and
    head checks on a small backbone are below. The shared backbone comes back with its weights intact."""
    x = torch.randn(1, 1, IMG, IMG)
    for mode in MODES:
        for hierarchical in (False, True):
            model = _build(backbone, mode, hierarchical).eval()
            assert model.modes == ([mode] if isinstance(mode, str) else mode)
            with torch.no_grad():
                assert model(x).shape == (1, 5 + (2 if hierarchical else 0))
    i = ALL_NAMES.index(backbone)
    _training_step_checks(_build(backbone, MODES[i % len(MODES)], hierarchical=bool(i % 2)))


@pytest.mark.parametrize("hierarchical", [False, True], ids=["multilabel", "hierarchical"])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_every_mode_and_head_trains_and_round_trips(mode, hierarchical, shared_backbones):
    _training_step_checks(_build("resnet34", mode, hierarchical))


def test_default_configuration_uses_strides_8_to_32():
    model = HybridMedNet("resnet34", img_size=IMG)
    assert [model.backbone.strides[i] for i in model.levels] == [8, 16, 32]
    assert model.modes == ["cbam"]
    every = HybridMedNet("resnet34", img_size=IMG, feature_strides=None)
    assert len(every.levels) == 4
    assert every(torch.randn(1, 1, IMG, IMG)).shape == (1, 14)
    with pytest.raises(ValueError, match=r"feature_strides \[2\] not available.*\[4, 8, 16, 32\]"):
        HybridMedNet("resnet34", feature_strides=[2])


def test_original_config_keys():
    config = {
        "backbone": "resnet34", "pretrained": False, "num_classes": 14, "num_coarse_classes": 4,
        "hierarchical": True, "fpn_channels": 64, "fusion_channels": 32, "dropout": 0.3,
        "use_modern_attention": True, "use_cross_scale_attention": True, "num_heads": 4,
    }  # fmt: skip
    model = HybridMedNet.from_config(config)
    assert model.modes == ["self", "cross_scale"]
    assert model.eval()(torch.randn(1, 1, IMG, IMG)).shape == (1, 18)
    with pytest.raises(TypeError, match="fpn_chanels"):
        HybridMedNet.from_config({"backbone": "resnet34", "fpn_chanels": 64})


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        HybridMedNet("vgg16")
    with pytest.raises(ValueError, match="spatial_dims=3 needs a 3D backbone"):
        HybridMedNet("resnet34", spatial_dims=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        HybridMedNet("resnet34", num_classes=0)
    with pytest.raises(ValueError, match=r"channels \(30\) must be divisible by num_heads \(4\)"):
        HybridMedNet("resnet34", attention="self", fpn_channels=30, num_heads=4)


def test_three_channel_input_and_non_square_images():
    model = HybridMedNet("convnext_tiny", in_channels=3, img_size=(64, 96), attention="cross_scale").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 14)
