"""Every registered backbone: the model it promises, its maps, strides and channels, and weight loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hmn.networks.backbones import (
    BACKBONES,
    PretrainedWeightsError,
    backbone_names,
    build_backbone,
    get_backbone_spec,
)

IMG = 64  # small inputs: every backbone reaches stride 32 with a 2x2 map

TIMM_NAMES = [n for n in backbone_names() if BACKBONES[n].timm_name]


def test_the_2d_names_users_know_are_registered():
    expected = {
        "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
        "swin_tiny", "swin_small", "swin_base",
        "efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l",
        "resnet34", "resnet50", "resnet101",
    }  # fmt: skip
    assert expected <= set(backbone_names())


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'convnext_tinny'; valid names: .*convnext_tiny.*swin_base"):
        get_backbone_spec("convnext_tinny")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet18")


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_backbone_maps_and_parameter_count(name, backbone_cache):
    spec = BACKBONES[name]
    net = backbone_cache(name)
    n_params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"{name}: {n_params:.2f}M bare, published classifier {spec.params_m}M -> expected {spec.bare_params_m:.2f}M")
    assert n_params == pytest.approx(spec.bare_params_m, rel=0.05)

    x = torch.randn(2, 1, IMG, IMG)
    with torch.no_grad():
        feats = net.eval()(x)
    assert net.strides == [4, 8, 16, 32]
    assert len(feats) == len(net.channels) == 4
    for f, c, s in zip(feats, net.channels, net.strides):
        assert tuple(f.shape) == (2, c, IMG // s, IMG // s)  # channel-first, Swin included


@pytest.mark.parametrize("size", [96, (128, 160)])
def test_swin_works_at_the_configured_size(size):
    net = build_backbone("swin_tiny", in_channels=1, img_size=size).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        feats = net(torch.randn(1, 1, h, w))
    assert tuple(feats[-1].shape) == (1, 768, h // 32, w // 32)


def test_three_channel_input():
    net = build_backbone("resnet34", in_channels=3).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, IMG, IMG))[0].shape[1] == net.channels[0]


def test_local_checkpoint_adapts_the_stem_to_one_channel(tmp_path):
    import timm

    full = timm.create_model("resnet34", pretrained=False)  # an RGB ImageNet-layout checkpoint
    path = tmp_path / "resnet34.pth"
    torch.save(full.state_dict(), path)
    net = build_backbone("resnet34", in_channels=1, pretrained=str(path))
    # timm folds RGB stem weights into one channel by summing them; the rest is copied as is.
    torch.testing.assert_close(net.model.conv1.weight, full.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(net.model.layer4[2].conv2.weight, full.layer4[2].conv2.weight)


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="nope.pth.*does not exist"):
        build_backbone("resnet34", pretrained=str(missing))


def test_unreachable_hub_gives_one_sentence(monkeypatch):
    # conftest sets HF_HUB_OFFLINE: nothing is cached here, so timm cannot find the weights.
    with pytest.raises(PretrainedWeightsError, match="cannot be reached.*pretrained='/path/to/checkpoint'"):
        build_backbone("resnet34", pretrained=True)


def test_bad_pretrained_value():
    with pytest.raises(ValueError, match="pretrained must be True, False or a checkpoint path"):
        build_backbone("resnet34", pretrained=3)


def test_convnext_batch_norm_option_replaces_every_layer_norm():
    from timm.layers import LayerNorm2d

    torch.manual_seed(0)
    published = build_backbone("convnext_tiny", img_size=64)
    scratch = build_backbone("convnext_tiny", img_size=64, options={"norm": "batch", "ls_init_value": 1.0})
    n_ln = sum(isinstance(m, (nn.LayerNorm, LayerNorm2d)) for m in published.modules())
    assert n_ln > 0 and not any(isinstance(m, (nn.LayerNorm, LayerNorm2d)) for m in scratch.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in scratch.modules()) == n_ln
    # same parameters (a BatchNorm's affine pair replaces a LayerNorm's), so the size stays the published one
    assert sum(p.numel() for p in scratch.parameters()) == sum(p.numel() for p in published.parameters())
    gammas = [m.gamma for m in scratch.modules() if isinstance(getattr(m, "gamma", None), nn.Parameter)]
    assert gammas and all(torch.all(g == 1.0) for g in gammas)
    scratch.train()
    x = torch.randn(4, 1, 64, 64)
    out = scratch(x)
    assert [tuple(o.shape[1:]) for o in out] == [(c, 64 // s, 64 // s) for c, s in zip(scratch.channels, scratch.strides)]
    # a channels-last BatchNorm normalizes each channel over batch and positions, as BatchNorm2d does on NCHW
    bn = next(m for m in scratch.modules() if type(m).__name__ == "_BatchNormLast")
    y = torch.randn(3, 5, 6, bn.bn.num_features)
    torch.testing.assert_close(bn(y).mean((0, 1, 2)), torch.zeros(bn.bn.num_features), atol=1e-5, rtol=0)


def test_backbone_options_are_checked():
    with pytest.raises(ValueError, match=r"'resnet34' does not take the option\(s\) \['norm'\]; it takes no options"):
        build_backbone("resnet34", options={"norm": "batch"})
    with pytest.raises(ValueError, match=r"'vim_tiny' does not take the option\(s\) \['norm'\]; it accepts \['scan_impl'\]"):
        build_backbone("vim_tiny", options={"norm": "batch"})
    with pytest.raises(ValueError, match=r"does not take the option\(s\) \['depth'\]; it accepts \['ls_init_value', 'norm', 'stem'\]"):
        build_backbone("convnext_tiny", options={"depth": 3})
    with pytest.raises(ValueError, match=r"norm='group' is not one of \('layer', 'batch'\)"):
        build_backbone("convnext_tiny", options={"norm": "group"})
    with pytest.raises(ValueError, match=r"norm='batch' is for training 'convnext_tiny' from scratch"):
        build_backbone("convnext_tiny", pretrained=True, options={"norm": "batch"})
    with pytest.raises(ValueError, match=r"stem='deep' is not one of \('patch', 'conv'\)"):
        build_backbone("convnext_tiny", options={"stem": "deep"})
    with pytest.raises(ValueError, match=r"stem='conv' is for training 'convnext_tiny' from scratch"):
        build_backbone("convnext_tiny", pretrained=True, options={"stem": "conv"})


def test_convnext_conv_stem_option_overlaps_and_keeps_the_output_grid():
    torch.manual_seed(0)
    published = build_backbone("convnext_tiny", img_size=64)
    conv = build_backbone("convnext_tiny", img_size=64, options={"stem": "conv", "norm": "batch"})
    stem = conv.model.stem_0
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 48, (3, 3), (2, 2)),
        (48, 96, (3, 3), (2, 2)),
    ]
    # parameters: the 4x4 patchify (1*96*16 + 96) replaced by two convs and a BatchNorm, counted by hand
    added = (1 * 48 * 9 + 48) + 2 * 48 + (48 * 96 * 9 + 96) - (1 * 96 * 16 + 96)
    assert sum(p.numel() for p in conv.parameters()) - sum(p.numel() for p in published.parameters()) == added
    x = torch.randn(2, 1, 64, 64)
    assert [o.shape for o in conv(x)] == [o.shape for o in published(x)]
    # one bright pixel: the patchify stem moves exactly one output position, the overlapping stem several
    conv.eval()
    impulse = torch.zeros(1, 1, 64, 64)
    impulse[0, 0, 30, 30] = 1.0
    with torch.no_grad():
        moved_patch = (published.model.stem_0(impulse) - published.model.stem_0(torch.zeros_like(impulse))).abs().sum(1)
        moved_conv = (stem(impulse) - stem(torch.zeros_like(impulse))).abs().sum(1)
    assert int((moved_patch > 0).sum()) == 1
    assert int((moved_conv > 1e-7).sum()) >= 4
    conv.train()
    sum(o.float().mean() for o in conv(x)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
