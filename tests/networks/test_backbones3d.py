"""The 3D backbones (ConvNeXt3d, MONAI's 3D Swin) and HybridMedNet over them: maps, strides, gradients,
the 2D -> 3D weight inflation and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hmn.networks import HybridMedNet, backbone_names
from hmn.networks._utils import pool_to_at_most
from hmn.networks.backbones import BACKBONE_OPTIONS, BACKBONES, PretrainedWeightsError, build_backbone
from hmn.networks.convnext3d import ConvNeXt3d, LayerNormChannelsFirst, inflate_2d_state_dict

VOL = 32  # 32^3: every 3D backbone reaches stride 32 with a 1x1x1 map
NAMES_3D = ["convnext3d_tiny", "convnext3d_small", "convnext3d_base", "swin3d_tiny", "swin3d_small", "swin3d_base"]
CONVNEXT3D = [n for n in NAMES_3D if n.startswith("convnext3d")]
TINY = dict(dims=(4, 8, 8, 8), depths=(1, 1, 1, 1))  # a ConvNeXt small enough to reason about, 2D and 3D


def _twin_2d(in_chans: int = 3, ls_init_value: float = 1e-6):
    """timm's 2D ConvNeXt with the TINY widths and depths (and a 5-class head, dropped by the inflation)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(in_chans=in_chans, num_classes=5, ls_init_value=ls_init_value, **TINY)


def _grads_finite_and_present(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    assert not bad, f"parameters with non-finite gradient: {bad[:10]}"
    assert sum(p.grad.abs().sum() for p in module.parameters()) > 0


def test_the_3d_rows_of_the_table():
    assert backbone_names(spatial_dims=3) == NAMES_3D
    assert not set(NAMES_3D) & set(backbone_names(spatial_dims=2))
    for name in NAMES_3D:
        spec = BACKBONES[name]
        assert spec.spatial_dims == 3 and not spec.fixed_size and spec.timm_name is None
        # no published ImageNet figure exists for a 3D architecture, so none is claimed
        assert spec.params_m is None and spec.bare_params_m is None
    assert BACKBONES["convnext_tiny"].spatial_dims == 2 and BACKBONES["convnext_tiny"].bare_params_m > 27
    assert set(BACKBONE_OPTIONS["swin3d"]) == {"drop_path_rate"}
    assert {"norm", "ls_init_value", "stem", "stem_stride", "downsample_stride", "drop_path_rate"} <= set(
        BACKBONE_OPTIONS["convnext3d"]
    )


@pytest.mark.parametrize("name", NAMES_3D)
def test_backbone_maps_strides_and_gradients(name):
    torch.manual_seed(0)
    net = build_backbone(name, img_size=VOL).train()
    # the published widths of the T, S and B variants (ConvNeXt and Swin alike)
    assert net.channels == ([128, 256, 512, 1024] if name.endswith("base") else [96, 192, 384, 768])
    assert net.strides == [4, 8, 16, 32]
    assert net.axis_strides == [(s, s, s) for s in (4, 8, 16, 32)]
    x = torch.randn(2, 1, VOL, VOL, VOL)
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, VOL // s, VOL // s, VOL // s) for c, s in zip(net.channels, net.strides)]
    # contiguous NCDHW, as every convolution inside sees it: on a channels-last map oneDNN's backward of a
    # depthwise 7^3 convolution over a 2^3 map took 12 s a call on 2 threads (0.09 s channels-first)
    assert all(f.is_contiguous() for f in feats)
    sum(f.square().mean() for f in feats).backward()
    _grads_finite_and_present(net)


@pytest.mark.parametrize("name", CONVNEXT3D)
def test_convnext3d_is_its_2d_twin_name_for_name_with_depth(name):
    """The 3D parameter count from the 2D twin's own parameters: each conv kernel times its depth (depthwise 7,
    stem 4, downsampling 2), the rest unchanged; the names are the 2D names, classifier aside."""
    import timm

    spec = BACKBONES[name]
    twin = timm.create_model(spec.extra["inflate_from"], pretrained=False, in_chans=1, num_classes=0)
    depth = {"conv_dw.weight": 7, "stem.0.weight": 4, "downsample.1.weight": 2}
    expected = {}
    for key, p in twin.named_parameters():
        if key.startswith("head."):
            continue
        factor = [f for suffix, f in depth.items() if key.endswith(suffix)]
        assert (p.dim() == 4) == bool(factor), key
        expected[key] = p.numel() * (factor[0] if factor else 1)
    net = build_backbone(name, img_size=VOL)
    assert {k: p.numel() for k, p in net.named_parameters()} == expected
    print(f"{name}: {sum(expected.values()) / 1e6:.2f}M (2D twin without head: "
          f"{sum(p.numel() for k, p in twin.named_parameters() if not k.startswith('head.')) / 1e6:.2f}M)")  # fmt: skip


def test_anisotropic_strides_keep_the_depth_of_thick_slices():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 32, 32)
    net = build_backbone("convnext3d_tiny", img_size=(16, 32, 32), options={"stem_stride": (1, 4, 4)})
    assert net.axis_strides == [(1, 4, 4), (2, 8, 8), (4, 16, 16), (8, 32, 32)] and net.strides == [4, 8, 16, 32]
    assert [tuple(f.shape[2:]) for f in net(x)] == [(16, 8, 8), (8, 4, 4), (4, 2, 2), (2, 1, 1)]
    flat = build_backbone("convnext3d_tiny", img_size=(16, 32, 32), options={"stem_stride": [1, 4, 4], "downsample_stride": [1, 2, 2]})
    assert [tuple(f.shape[2:]) for f in flat(x)] == [(16, 8, 8), (16, 4, 4), (16, 2, 2), (16, 1, 1)]
    # MONAI's loaders give X, Y, Z volumes, the thick axis last: the strides are per axis, in the tensor's order
    last = build_backbone("convnext3d_tiny", img_size=(32, 32, 16), options={"stem_stride": (4, 4, 2)})
    assert [tuple(f.shape[2:]) for f in last(torch.randn(1, 1, 32, 32, 16))] == [(8, 8, 8), (4, 4, 4), (2, 2, 2), (1, 1, 1)]
    # MONAI's Swin pads an axis that does not divide: ceil(size / stride) positions
    swin = build_backbone("swin3d_tiny")
    assert [tuple(f.shape[2:]) for f in swin(torch.randn(1, 1, 16, 36, 28))] == [(4, 9, 7), (2, 5, 4), (1, 3, 2), (1, 2, 1)]


def test_convnext3d_batch_norm_conv_stem_and_drop_path_options():
    published = build_backbone("convnext3d_tiny", img_size=VOL)
    scratch = build_backbone(
        "convnext3d_tiny", img_size=VOL,
        options={"norm": "batch", "stem": "conv", "ls_init_value": 1.0, "drop_path_rate": 0.2},
    )  # fmt: skip
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in published.modules())
    assert n_ln == 1 + 3 + 18  # stem, three downsamplings, 18 blocks
    assert not any(isinstance(m, nn.LayerNorm) for m in scratch.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in scratch.modules()) == n_ln + 1  # + the conv stem's own
    convs = [m for m in scratch.stem[0] if isinstance(m, nn.Conv3d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((3, 3, 3), (2, 2, 2)), ((3, 3, 3), (2, 2, 2))]
    assert all(torch.all(b.gamma == 1.0) for s in scratch.stages for b in s.blocks)
    # stochastic depth rising linearly over the 18 blocks, from 0 (no DropPath at all) to 0.2
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in scratch.stages for b in s.blocks]
    assert isinstance(scratch.stages[0].blocks[0].drop_path, nn.Identity)
    assert rates == pytest.approx([0.2 * i / 17 for i in range(18)])
    x = torch.randn(2, 1, VOL, VOL, VOL)
    feats = scratch.train()(x)
    assert [f.shape for f in feats] == [f.shape for f in published(x)]
    sum(f.square().mean() for f in feats).backward()
    _grads_finite_and_present(scratch)
    anisotropic = ConvNeXt3d(stem="conv", stem_stride=(1, 4, 4), **TINY)
    assert [c.stride for c in anisotropic.stem[0] if isinstance(c, nn.Conv3d)] == [(1, 2, 2), (1, 2, 2)]


def test_convnext3d_pool_stem_convolves_at_full_resolution_and_max_pools_the_stride():
    """stem='pool': 3x3x3 convolutions at the input resolution, max pooling by 2 then by the rest of the stride,
    a 1x1x1 convolution to the first stage's width; the levels have the patchify stem's shapes."""
    size = (36, 32, 20)  # not multiples of the strides along every axis: floor, as the patchify stem
    published = build_backbone("convnext3d_tiny", img_size=size, options={"stem_stride": [4, 4, 2]})
    pool = build_backbone("convnext3d_tiny", img_size=size, options={"norm": "batch", "stem": "pool", "stem_stride": [4, 4, 2]})
    layers = list(pool.stem[0])
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in layers if isinstance(m, nn.Conv3d)]
    assert convs == [(1, 16, (3,) * 3, (1,) * 3), (16, 16, (3,) * 3, (1,) * 3), (16, 48, (3,) * 3, (1,) * 3),
                     (48, 96, (1,) * 3, (1,) * 3)]  # fmt: skip
    pools = [m.kernel_size for m in layers if isinstance(m, nn.MaxPool3d)]
    assert pools == [(2, 2, 2), (2, 2, 1)]
    assert pool.axis_strides == published.axis_strides
    x = torch.randn(2, 1, *size)
    feats = pool.train()(x)
    assert [f.shape for f in feats] == [f.shape for f in published(x)]
    assert [tuple(f.shape[2:]) for f in feats][0] == (9, 8, 10)
    sum(f.square().mean() for f in feats).backward()
    _grads_finite_and_present(pool)
    # a stride of 1 along an axis pools nothing along it; no stride at all, no pooling layer
    assert [m.kernel_size for m in ConvNeXt3d(stem="pool", stem_stride=(1, 4, 4), **TINY).stem[0]
            if isinstance(m, nn.MaxPool3d)] == [(1, 2, 2), (1, 2, 2)]  # fmt: skip
    assert not any(isinstance(m, nn.MaxPool3d) for m in ConvNeXt3d(stem="pool", stem_stride=1, **TINY).stem[0])
    net, x = ConvNeXt3d(stem="pool", norm="batch", **TINY).eval(), torch.randn(1, 1, VOL, VOL, VOL)
    with torch.no_grad():
        for a, b in zip(torch.jit.script(net)(x), net(x)):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Inflation of 2D ImageNet weights.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_inflation_of_hand_worked_kernels():
    sd = _twin_2d().state_dict()
    sd["stages.1.downsample.1.weight"][0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r, g, b = torch.ones(4, 4), 2 * torch.ones(4, 4), torch.arange(16.0).reshape(4, 4)
    sd["stem.0.weight"][0] = torch.stack([r, g, b])
    net = ConvNeXt3d(in_channels=1, stem_stride=(1, 4, 4), **TINY)
    out = inflate_2d_state_dict({"model": sd}, net)  # wrapped as the facebookresearch/timm training scripts save it
    assert not any(k.startswith("head.") for k in out)
    # downsampling 2x2 -> 2x2x2, two copies along depth (axis 0 of D, H, W), each halved
    torch.testing.assert_close(
        out["stages.1.downsample.1.weight"][0, 0],
        torch.tensor([[[0.5, 1.0], [1.5, 2.0]], [[0.5, 1.0], [1.5, 2.0]]]),
    )
    # stem with depth stride 1: one copy; one input channel: R + G + B
    torch.testing.assert_close(out["stem.0.weight"][0], (3.0 + torch.arange(16.0)).reshape(1, 1, 4, 4))
    # depthwise 7x7 -> seven copies of it / 7
    dw = sd["stages.0.blocks.0.conv_dw.weight"]
    assert out["stages.0.blocks.0.conv_dw.weight"].shape == (4, 1, 7, 7, 7)
    for k in range(7):
        torch.testing.assert_close(out["stages.0.blocks.0.conv_dw.weight"][:, :, k], dw / 7)
    torch.testing.assert_close(out["stages.2.blocks.0.mlp.fc1.weight"], sd["stages.2.blocks.0.mlp.fc1.weight"])
    net.load_state_dict(out, strict=True)

    # the inflation axis: the one whose strides stand out, else 2 (Z of the pipeline's X, Y, Z), unless given
    inferred = {(1, 4, 4): 0, (4, 4, 2): 2, (4, 1, 4): 1, (4, 4, 4): 2, (2, 4, 8): 2}
    assert {s: ConvNeXt3d(stem_stride=s, **TINY).depth_axis for s in inferred} == inferred
    assert ConvNeXt3d(downsample_stride=(2, 2, 1), **TINY).depth_axis == 2
    assert ConvNeXt3d(depth_axis=1, **TINY).depth_axis == 1
    # inflated along the last axis (MONAI's X, Y, Z with Z the slice axis): the 2D (kh, kw) on the first two axes
    last = ConvNeXt3d(in_channels=1, stem_stride=(4, 4, 1), depth_axis=2, **TINY)
    out = inflate_2d_state_dict(sd, last)
    torch.testing.assert_close(
        out["stages.1.downsample.1.weight"][0, 0],
        torch.tensor([[[0.5, 0.5], [1.0, 1.0]], [[1.5, 1.5], [2.0, 2.0]]]),
    )
    last.load_state_dict(out, strict=True)


def _randomized_twin():
    """The 2D twin with every norm, bias and layer scale moved off its initial value, so each matters."""
    torch.manual_seed(0)
    twin = _twin_2d(in_chans=1, ls_init_value=1.0).eval()
    with torch.no_grad():
        for key, p in twin.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if key.endswith("bias") else 1.0))
    return twin


def _twin_levels(twin, img):
    feats, x = [], twin.stem(img)
    for stage in twin.stages:
        x = stage(x)
        feats.append(x)
    return feats


def test_a_depth_constant_volume_gives_the_2d_response_away_from_the_padded_ends():
    """Inflated kernels sum over depth to the 2D kernel, so a volume constant along depth gives the 2D maps,
    except where a depthwise 7x7x7 convolution's zero padding enters: each block reaches 3 slices further in
    from either end. With one block per stage and no depth stride, 27 slices leave slices 12 to 14 exact after
    the fourth block; the first slice is checked to differ, so the comparison is not vacuous."""
    twin = _randomized_twin()
    net = ConvNeXt3d(in_channels=1, ls_init_value=1.0, stem_stride=(1, 4, 4), downsample_stride=(1, 2, 2), **TINY).eval()
    net.load_state_dict(inflate_2d_state_dict(twin.state_dict(), net), strict=True)
    img = torch.randn(1, 1, 32, 32)
    depth = 27
    with torch.no_grad():
        want = _twin_levels(twin, img)
        got = net(img.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous())
    for level, (g, w) in enumerate(zip(got, want)):
        reach = 3 * (level + 1)  # blocks so far x kernel half-width
        interior = g[:, :, reach : depth - reach]
        torch.testing.assert_close(interior, w.unsqueeze(2).expand_as(interior), rtol=1e-5, atol=1e-5)
    assert (got[0][:, :, 0] - want[0]).abs().max() > 1e-3  # the first block's padded end differs (100x atol)


@pytest.mark.numerics
@pytest.mark.parametrize("depth_axis", [0, 2])
def test_inflated_stem_and_downsampling_are_exact_on_every_slice(depth_axis):
    """No padding in a kernel = stride convolution: a depth-constant input gives the 2D output on every slice,
    with the depth strides of the published ConvNeXt inflated (4 and 2), along axis 0 or 2."""
    twin = _randomized_twin()
    strides = dict(stem_stride=4, downsample_stride=2)
    net = ConvNeXt3d(in_channels=1, depth_axis=depth_axis, **strides, **TINY).eval()
    net.load_state_dict(inflate_2d_state_dict(twin.state_dict(), net), strict=True)
    img = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        vol = img.unsqueeze(2 + depth_axis).expand(*[8 if a == 2 + depth_axis else -1 for a in range(5)])
        stem = net.stem(vol.contiguous())
        assert stem.shape[2 + depth_axis] == 2
        want = twin.stem(img)
        torch.testing.assert_close(stem, want.unsqueeze(2 + depth_axis).expand_as(stem), rtol=1e-5, atol=1e-5)
        down = net.stages[1].downsample(stem)
        want = twin.stages[1].downsample(want)
        torch.testing.assert_close(down, want.unsqueeze(2 + depth_axis).expand_as(down), rtol=1e-5, atol=1e-5)


def test_facebook_and_features_only_layouts_inflate_like_timm_names():
    sd = _twin_2d().state_dict()
    net = ConvNeXt3d(in_channels=1, **TINY)
    want = inflate_2d_state_dict(sd, net)

    def facebook(key: str) -> str:  # the facebookresearch/ConvNeXt release's names
        key = key.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        for i in range(4):
            key = key.replace(f"stages.{i}.downsample.", f"downsample_layers.{i}.").replace(f"stages.{i}.blocks.", f"stages.{i}.")
        return key

    fb = {facebook(k): v for k, v in sd.items()}
    assert "downsample_layers.0.0.weight" in fb and "stages.1.0.pwconv1.weight" in fb
    got = inflate_2d_state_dict({"model": fb}, net)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    features_only = {k.replace("stem.", "stem_", 1).replace("stages.", "stages_", 1): v for k, v in sd.items()}
    got = inflate_2d_state_dict({"state_dict": features_only}, net)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_inflation_names_what_does_not_fit():
    net = ConvNeXt3d(in_channels=1, **TINY)
    sd = _twin_2d().state_dict()
    del sd["stages.2.blocks.0.gamma"]
    sd["stages.0.blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(PretrainedWeightsError, match=r"missing \['stages.2.blocks.0.gamma'\]; unexpected \['stages.0.blocks.0.extra.weight'\]"):
        inflate_2d_state_dict(sd, net)
    from timm.models.convnext import ConvNeXt

    wider = ConvNeXt(in_chans=1, num_classes=0, dims=(4, 8, 8, 16), depths=(1, 1, 1, 1)).state_dict()
    with pytest.raises(PretrainedWeightsError, match=r"stages.3.downsample.1.weight: the 2D checkpoint's tensor \(16, 8, 2, 2\)"):
        inflate_2d_state_dict(wider, net)
    with pytest.raises(PretrainedWeightsError, match="must be a state_dict"):
        inflate_2d_state_dict({"model": {"a": 1}}, net)


@pytest.mark.parametrize("fmt, stem_stride", [("pth", 4), ("safetensors", [4, 4, 2])])
def test_a_2d_checkpoint_file_is_inflated_by_the_builder(tmp_path, fmt, stem_stride):
    """``.pth`` (wrapped) and ``.safetensors`` files; with a thick-slice stem on MONAI's X, Y, Z layout the
    kernels are inflated along the last axis, the one whose stride stands out."""
    import timm

    sd = timm.create_model("convnext_tiny", pretrained=False).state_dict()  # an RGB ImageNet classifier's layout
    path = tmp_path / f"convnext_tiny.{fmt}"
    if fmt == "pth":
        torch.save({"model": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    net = build_backbone("convnext3d_tiny", in_channels=1, pretrained=str(path), options={"stem_stride": stem_stride})
    axis, kd = (2, 4) if stem_stride == 4 else (2, 2)  # Z either way: isotropic strides single out no axis
    assert net.depth_axis == axis and net.stem[0].weight.shape[2 + axis] == kd
    stem = sd["stem.0.weight"].sum(1, keepdim=True)  # RGB summed for one channel, as the 2D backbones do
    for k in range(kd):
        torch.testing.assert_close(net.stem[0].weight.select(2 + axis, k), stem / kd)
    dw = net.stages[2].blocks[5].conv_dw.weight
    torch.testing.assert_close(dw.select(2 + axis, 6), sd["stages.2.blocks.5.conv_dw.weight"] / 7)
    torch.testing.assert_close(net.stages[3].blocks[2].mlp.fc2.weight, sd["stages.3.blocks.2.mlp.fc2.weight"])
    torch.testing.assert_close(net.stages[3].blocks[2].gamma, sd["stages.3.blocks.2.gamma"])


def test_pretrained_errors():
    with pytest.raises(PretrainedWeightsError, match=r"nope.pth.*does not exist"):
        build_backbone("convnext3d_tiny", pretrained="/nonexistent/nope.pth")
    # conftest sets HF_HUB_OFFLINE: timm's 2D weights are not cached here
    with pytest.raises(PretrainedWeightsError, match=r"inflated from timm convnext_tiny.*cannot be reached"):
        build_backbone("convnext3d_tiny", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="no pretrained 3D Swin weights"):
        build_backbone("swin3d_tiny", pretrained=True)
    with pytest.raises(ValueError, match="pretrained must be True, False or a checkpoint path"):
        build_backbone("convnext3d_tiny", pretrained=3)


def test_option_errors_are_named():
    def raises(match, name="convnext3d_tiny", **kwargs):
        with pytest.raises(ValueError, match=match):
            build_backbone(name, **kwargs)

    raises(r"'convnext3d_tiny' does not take the option\(s\) \['depth'\]; it accepts \['depth_axis', 'downsample_stride', "
           r"'drop_path_rate', 'ls_init_value', 'norm', 'stem', 'stem_stride'\]", options={"depth": 3})  # fmt: skip
    raises(r"'swin3d_tiny' does not take the option\(s\) \['norm'\]; it accepts \['drop_path_rate'\]", "swin3d_tiny",
           options={"norm": "batch"})  # fmt: skip
    for bad in (0, (4, 4), (4, 4, 0), "4", 2.0, (4, 4, True)):
        raises(rf"stem_stride={bad!r} must be a positive int or three positive ints".replace("(", r"\(").replace(")", r"\)"),
               options={"stem_stride": bad})  # fmt: skip
    raises(r"downsample_stride=\(2, 2\) must be", options={"downsample_stride": (2, 2)})
    raises(r"norm='group' is not one of \('layer', 'batch'\)", options={"norm": "group"})
    raises(r"norm='batch' is for training 'convnext3d_tiny' from scratch", pretrained=True, options={"norm": "batch"})
    raises(r"stem='conv' is for training 'convnext3d_tiny' from scratch", pretrained="x.pth", options={"stem": "conv"})
    raises(r"stem='conv' takes a stem_stride of 1, 2 or 4 per axis", options={"stem": "conv", "stem_stride": 8})
    raises(r"stem='pool' takes a stem_stride of 1, 2 or 4 per axis", options={"stem": "pool", "stem_stride": [4, 4, 3]})
    raises(r"stem='pool' is for training 'convnext3d_tiny' from scratch", pretrained="x.pth", options={"stem": "pool"})
    raises(r"backbone option stem='Pool' is not one of \('patch', 'conv', 'pool'\)", options={"stem": "Pool"})
    raises(r"pretrained 2D ConvNeXt kernels fit .* on the axes \[1, 2\] beside depth_axis=0; got stem_stride=\(4, 4, 2\)",
           pretrained=True, options={"stem_stride": (4, 4, 2), "depth_axis": 0})  # fmt: skip
    raises(r"on the axes \[0, 1\] beside depth_axis=2; got stem_stride=\(2, 2, 4\)", pretrained=True,
           options={"stem_stride": (2, 2, 4)})  # fmt: skip
    raises(r"depth_axis=3 is not one of \(None, 0, 1, 2\)", options={"depth_axis": 3})
    raises(r"drop_path_rate=1.5 must be", options={"drop_path_rate": 1.5})
    raises(r"drop_path_rate=-0.1 must be a number in \[0, 1\)", "swin3d_tiny", options={"drop_path_rate": -0.1})
    raises(r"img_size must be a positive int or three positive ints \(D, H, W\)", img_size=(64, 64))
    raises(r"img_size \(16, 64, 64\) is smaller than the coarsest stride \(32, 32, 32\)", img_size=(16, 64, 64))
    net = ConvNeXt3d(**TINY)
    with pytest.raises(ValueError, match=r"takes N, C, D, H, W volumes, got a tensor of shape \[1, 1, 32, 32\]"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"spatial axis 0 needs at least 32 voxels"):
        net(torch.randn(1, 1, 16, 32, 32))
    with pytest.raises(ValueError, match=r"takes N, 1, D, H, W volumes, got a tensor of shape \[1, 3, 32, 32, 32\]"):
        build_backbone("swin3d_tiny")(torch.randn(1, 3, 32, 32, 32))


# ---------------------------------------------------------------------------------------------------------
# Swin 3D specifics, exports.
# ---------------------------------------------------------------------------------------------------------


def test_swin3d_outputs_are_stage_outputs_before_merging_normalized_over_channels(tmp_path):
    from monai.networks.nets.swin_unetr import PatchMerging

    net = build_backbone("swin3d_tiny", options={"drop_path_rate": 0.1})
    merges = [m for m in net.modules() if isinstance(m, PatchMerging)]
    assert len(merges) == 3 and all(stage.downsample is None for stage in net.stages)  # none after the last stage
    assert [m.reduction.in_features for m in merges] == [8 * c for c in net.channels[:3]]
    with torch.no_grad():
        feats = net.eval()(torch.randn(1, 1, VOL, VOL, VOL))
    for f in feats:
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f[:, 0]), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.var(1, unbiased=False), torch.ones_like(f[:, 0]), atol=1e-3, rtol=0)
    # a state_dict of this backbone loads back (strictly); another one is refused by name
    path = tmp_path / "swin3d.pth"
    torch.save(net.state_dict(), path)
    again = build_backbone("swin3d_tiny", pretrained=str(path)).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(again(torch.ones(1, 1, VOL, VOL, VOL)), net(torch.ones(1, 1, VOL, VOL, VOL))))
    with pytest.raises(PretrainedWeightsError, match=r"does not fit backbone 'swin3d_small': missing \['stages.2.blocks.6"):
        build_backbone("swin3d_small", pretrained=str(path))


def test_convnext3d_scripts_and_swin3d_traces_as_their_rows_say():
    assert BACKBONES["convnext3d_tiny"].torchscript == "script" and BACKBONES["swin3d_tiny"].torchscript == "trace"
    x = torch.randn(1, 1, 32, 32, 48)
    net = ConvNeXt3d(in_channels=1, **TINY).eval()
    scripted = torch.jit.script(net)
    swin = build_backbone("swin3d_tiny").eval()
    traced = torch.jit.trace(swin, x, check_trace=False)
    with torch.no_grad():
        for a, b in zip(scripted(x), net(x)):
            torch.testing.assert_close(a, b)
        for a, b in zip(traced(x), swin(x)):
            torch.testing.assert_close(a, b)


def test_pool_to_at_most_in_3d_is_adaptive_average_pooling():
    x = torch.randn(2, 3, 5, 9, 2)
    torch.testing.assert_close(pool_to_at_most(x, 2), F.adaptive_avg_pool3d(x, (2, 2, 2)))
    torch.testing.assert_close(pool_to_at_most(x, 4), F.adaptive_avg_pool3d(x, (4, 4, 2)))
    assert pool_to_at_most(x, None) is x


def test_layer_norm_channels_first_normalizes_each_voxel():
    norm = LayerNormChannelsFirst(6)
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    torch.testing.assert_close(norm(x), F.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), eps=1e-6).permute(0, 4, 1, 2, 3))


# ---------------------------------------------------------------------------------------------------------
# HybridMedNet in 3D.
# ---------------------------------------------------------------------------------------------------------

MODES_3D = [("none", 2), ("cbam", 2), ("self", 2), ("cross_scale", 2), (["self", "cross_scale"], None)]
# two positions at stride 32: self-attention over a single token has a constant softmax, so its query
# projection would get an exact zero gradient at 32^3
HYB = (32, 32, 64)


def _mode_id(case):
    mode, context = case
    return ("+".join(mode) if isinstance(mode, list) else mode) + ("-full" if context is None else "")


@pytest.mark.parametrize("case", MODES_3D, ids=_mode_id)
@pytest.mark.parametrize("backbone", ["convnext3d_tiny", "swin3d_tiny"])
def test_hybrid_3d_trains_with_every_attention_mode(backbone, case, cached_backbones):
    mode, context = case
    torch.manual_seed(0)
    model = HybridMedNet(
        backbone, num_classes=3, img_size=HYB, attention=mode, fpn_channels=32, fusion_channels=16, num_heads=4,
        context_size=context, hierarchical=mode == "cbam", num_coarse_classes=2,
    )  # fmt: skip
    assert model.spatial_dims == 3
    assert all(isinstance(m, nn.Conv3d) for m in model.neck.lateral)
    out = model.train()(torch.randn(2, 1, *HYB))
    assert out.shape == (2, 3 + (2 if mode == "cbam" else 0))
    out.square().sum().backward()
    _grads_finite_and_present(model)
    zero = [n for n, p in model.named_parameters() if not n.startswith("backbone.") and p.grad.abs().sum() == 0]
    assert not zero, f"parameters with an all-zero gradient: {zero[:10]}"


def test_hybrid_3d_over_thick_slices():
    model = HybridMedNet(
        "convnext3d_tiny", num_classes=2, img_size=(16, 32, 32), attention="cross_scale", fpn_channels=16,
        fusion_channels=8, num_heads=2, feature_strides=None, backbone_options={"stem_stride": (1, 4, 4)},
    )  # fmt: skip
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        feats = model.neck(model.backbone(x))
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 8, 8), (16, 8, 4, 4), (16, 4, 2, 2), (16, 2, 1, 1)]
        assert model.eval()(x).shape == (1, 2)


def test_spatial_dims_must_be_the_backbones(cached_backbones):
    assert HybridMedNet("convnext3d_tiny", img_size=VOL, fpn_channels=16, fusion_channels=8).spatial_dims == 3
    assert HybridMedNet("resnet34", img_size=64, fpn_channels=16, fusion_channels=8).spatial_dims == 2
    assert HybridMedNet("swin3d_tiny", spatial_dims=3, fpn_channels=16, fusion_channels=8).spatial_dims == 3
    with pytest.raises(ValueError, match=r"backbone 'convnext3d_tiny' is 3D; spatial_dims=2 needs a 2D backbone "
                                         r"\(convnext_tiny, .*\), or pass spatial_dims=3 \(or None\)"):  # fmt: skip
        HybridMedNet("convnext3d_tiny", spatial_dims=2)
    with pytest.raises(ValueError, match=r"backbone 'resnet34' is 2D; spatial_dims=3 needs a 3D backbone "
                                         r"\(convnext3d_tiny, .*swin3d_base\), or pass spatial_dims=2"):  # fmt: skip
        HybridMedNet("resnet34", spatial_dims=3)
    with pytest.raises(ValueError, match=r"spatial_dims=1 needs a 1D backbone, and none is registered"):
        HybridMedNet("swin3d_tiny", spatial_dims=1)
    with pytest.raises(ValueError, match=r"spatial_dims must be 1, 2 or 3, got 4"):
        HybridMedNet("swin3d_tiny", spatial_dims=4)
    model = HybridMedNet("convnext3d_tiny", img_size=VOL, fpn_channels=16, fusion_channels=8)
    with pytest.raises(ValueError, match=r"takes N, C, D, H, W volumes, got a tensor of shape \[1, 1, 64, 64\]"):
        model(torch.randn(1, 1, 64, 64))


# ---- the depthwise convolution with a CPU backward made of forward convolutions ----

DW_CASES = [  # (input shape, kernel, bias): anisotropic, a map smaller than the kernel, batch 1, kernel 3
    ((1, 2, 9, 6, 5), 7, True),
    ((1, 3, 2, 3, 4), 7, True),
    ((3, 2, 5, 5, 5), 3, False),
]


@pytest.mark.parametrize("shape,kernel,bias", DW_CASES)
def test_depthwise_conv3d_gradients_pass_gradcheck(shape, kernel, bias):
    from hmn.networks.convnext3d import DepthwiseConv3d

    torch.manual_seed(0)
    conv = DepthwiseConv3d(shape[1], kernel, bias=bias).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert "DepthwiseConv3d" in conv(x).grad_fn.name()  # the custom backward is the one checked
    params = (conv.weight, conv.bias) if bias else (conv.weight,)
    # gradcheck perturbs the parameters in place, so conv(x) sees each perturbation
    assert torch.autograd.gradcheck(lambda x, *p: conv(x), (x, *params))


@pytest.mark.numerics
def test_depthwise_conv3d_equals_pytorchs_convolution_forward_and_backward():
    """At a ConvNeXt stage's size: in float32 against nn.Conv3d's own autograd; in bfloat16 autocast against float64
    arithmetic on the bfloat16 operands autocast gives the convolution. nn.Conv3d is no reference there: where oneDNN
    has no bfloat16 kernels for the CPU (x86 without AVX-512 or AVX-NE-CONVERT: PyTorch then takes slow_conv3d), its
    bfloat16 input gradient is 4.5e-2 off the float64 one here, relative to the largest value (DepthwiseConv3d's:
    3.6e-3, and nn.Conv3d's through oneDNN 2.9e-3), so it only gives the dtypes to match."""
    from hmn.networks.convnext3d import DepthwiseConv3d

    torch.manual_seed(0)
    conv = DepthwiseConv3d(16, 7)
    ref = nn.Conv3d(16, 16, 7, padding=3, groups=16)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 12, 10, 6)
    g = torch.randn(2, 16, 12, 10, 6)
    for autocast, dtype in ((False, torch.float32), (True, torch.float32), (True, torch.bfloat16)):
        outs = []
        for module in (conv, ref):
            module.zero_grad()
            xi = x.to(dtype).clone().requires_grad_()  # bfloat16 in: a previous layer's output under autocast
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(xi)
            (y.float() * g).sum().backward()
            outs.append((y, xi.grad, module.weight.grad, module.bias.grad))
        assert outs[0][1].dtype == dtype and outs[0][2].dtype == torch.float32
        assert outs[0][0].dtype == outs[1][0].dtype == (torch.bfloat16 if autocast else torch.float32)
        want = outs[1]
        if autocast:  # input, weight, bias and the output's gradient (y is bfloat16) rounded to bfloat16, then float64
            xd, wd, bd = (t.detach().to(torch.bfloat16).double().requires_grad_() for t in (x, conv.weight, conv.bias))
            yd = F.conv3d(xd, wd, bd, padding=3, groups=16)
            (yd * g.to(torch.bfloat16).double()).sum().backward()
            want = (yd.detach(), xd.grad, wd.grad, bd.grad)
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-4)
        for mine, theirs, expected in zip(outs[0], outs[1], want):
            assert mine.dtype == theirs.dtype
            scale = expected.double().abs().max()
            torch.testing.assert_close(mine.double() / scale, expected.double() / scale, **tol)


@pytest.mark.numerics
def test_depthwise_conv3d_is_a_plain_convolution_without_gradients_and_when_scripted():
    from hmn.networks.convnext3d import DepthwiseConv3d

    conv = DepthwiseConv3d(4, 7)
    x = torch.randn(1, 4, 8, 8, 8)
    assert "DepthwiseConv3d" in conv(x).grad_fn.name()  # the weight's gradient alone takes the fast backward
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=3, groups=4))
    conv.requires_grad_(False)
    assert conv(x).grad_fn is None
    conv.requires_grad_(True)
    scripted = torch.jit.script(conv)
    torch.testing.assert_close(scripted(x), F.conv3d(x, conv.weight, conv.bias, padding=3, groups=4))
    assert state_dict_keys(conv) == ["bias", "weight"]  # nn.Conv3d's, so checkpoints keep their names
    with pytest.raises(ValueError, match="kernel_size=4"):
        DepthwiseConv3d(4, 4)


def state_dict_keys(module: nn.Module) -> list:
    return sorted(module.state_dict())


def test_convnext3d_blocks_use_the_depthwise_convolution():
    from hmn.networks.convnext3d import DepthwiseConv3d

    net = ConvNeXt3d(in_channels=1, **TINY)
    dws = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.groups > 1]
    assert dws and all(isinstance(m, DepthwiseConv3d) for m in dws)
