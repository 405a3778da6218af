"""Vision Mamba: the mixer against an independent float64 computation, the direction of each scan, the
class token's place, the three published sizes (parameter counts, forward and backward, every parameter
receiving a gradient), the pyramid the neck expects, and checkpoint loading."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from hmn.networks.backbones import BACKBONES, BackboneSpec, PretrainedWeightsError, backbone_names, build_backbone
from hmn.networks.vim import BiMambaMixer, VimBackbone, VisionMamba, build_vim, resample_pos_embed

F64 = torch.float64
VIM_NAMES = ["vim_tiny", "vim_small", "vim_base"]


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter away from its structured initial value (A, D, biases) so nothing cancels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.add_(0.3 * noise if "A" in name.split(".")[-1] else 0.1 * noise)
    return module


def mixer_by_hand(m: BiMambaMixer, x: torch.Tensor) -> torch.Tensor:
    """The bidirectional Mamba mixer written out from the equations, one token and one tap at a time."""
    w = {k: v.detach() for k, v in m.state_dict().items()}
    inner, n, r = m.d_inner, m.d_state, m.dt_rank
    xz = x @ w["in_proj.weight"].T  # (batch, L, 2 inner)
    length = x.shape[1]

    def direction(xz_seq, sfx):
        xs, zs = xz_seq[..., :inner], xz_seq[..., inner:]
        k = w[f"conv1d{sfx}.weight"][:, 0]  # (inner, taps); tap j sees token t - (taps - 1 - j)
        taps = k.shape[1]
        conv = torch.zeros_like(xs) + w[f"conv1d{sfx}.bias"]
        for t in range(length):
            for j in range(taps):
                s = t - (taps - 1 - j)
                if s >= 0:
                    conv[:, t] += k[:, j] * xs[:, s]
        u = F.silu(conv)
        proj = u @ w[f"x_proj{sfx}.weight"].T
        dt, B, C = proj[..., :r], proj[..., r : r + n], proj[..., r + n :]
        delta = F.softplus(dt @ w[f"dt_proj{sfx}.weight"].T + w[f"dt_proj{sfx}.bias"])
        A = -torch.exp(w[f"A{sfx}_log"])
        h = torch.zeros(x.shape[0], inner, n, dtype=x.dtype)
        ys = []
        for t in range(length):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
            y = (h * C[:, t, None, :]).sum(-1) + w[f"D{sfx}"] * u[:, t]
            ys.append(y * F.silu(zs[:, t]))
        return torch.stack(ys, 1)

    forward = direction(xz, "")
    backward = direction(xz.flip(1), "_b").flip(1)
    return ((forward + backward) / 2) @ w["out_proj.weight"].T


@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_mixer_matches_the_equations(impl):
    torch.manual_seed(0)
    m = randomize_(BiMambaMixer(dim=8, d_state=4, scan_impl=impl).double())
    x = torch.randn(2, 11, 8, dtype=F64)
    torch.testing.assert_close(m(x), mixer_by_hand(m, x), rtol=1e-10, atol=1e-10)


def test_each_direction_sees_only_its_side():
    torch.manual_seed(1)
    m = randomize_(BiMambaMixer(dim=8, d_state=4, scan_impl="chunked").double())
    x = torch.randn(1, 12, 8, dtype=F64)
    x2 = x.clone()
    x2[:, 6] += 1.0  # perturb token 6
    with torch.no_grad():
        xz, xz2 = (m.in_proj(v).transpose(1, 2) for v in (x, x2))
        fwd = m.scan_direction(xz2, backward=False) - m.scan_direction(xz, backward=False)
        bwd = (m.scan_direction(xz2, backward=True) - m.scan_direction(xz, backward=True)).flip(-1)
    assert fwd[..., :6].abs().max() == 0 and fwd[..., 6:].abs().amin(dim=1).min() > 0  # causal
    assert bwd[..., 7:].abs().max() == 0 and bwd[..., :7].abs().amin(dim=1).min() > 0  # anti-causal
    # the two directions have their own parameters
    assert m.conv1d.weight is not m.conv1d_b.weight and m.A_log is not m.A_b_log


def test_class_token_sits_in_the_middle():
    trunk = VisionMamba(embed_dim=8, depth=2, in_channels=1, img_size=(48, 80), scan_impl="chunked")
    with torch.no_grad():
        trunk.patch_embed.proj.weight.zero_()
        trunk.patch_embed.proj.bias.zero_()
        trunk.pos_embed.zero_()
        trunk.cls_token.fill_(1.0)
    seen = {}
    trunk.layers[0].register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    _, grid, mid = trunk.forward_features(torch.randn(2, 1, 48, 80))
    assert grid == (3, 5) and mid == 15 // 2
    x = seen["x"]
    assert x.shape == (2, 16, 8)
    nonzero = (x.abs().sum(-1) > 0).nonzero()[:, 1].unique().tolist()
    assert nonzero == [7]


def test_position_embeddings_resample_around_the_class_token():
    grid = torch.arange(12, dtype=F64).reshape(1, 12, 1)  # a 3x4 grid of its own row-major indices
    cls = torch.tensor([[[-1.0]]], dtype=F64)
    pe = torch.cat([grid[:, :6], cls, grid[:, 6:]], dim=1)
    assert resample_pos_embed(pe, (3, 4), (3, 4)) is pe
    up = resample_pos_embed(pe, (3, 4), (6, 8))
    assert up.shape == (1, 49, 1) and up[0, 24, 0] == -1.0  # the class entry moves to the new middle
    patches = torch.cat([up[:, :24], up[:, 25:]], dim=1).reshape(6, 8)
    expected = F.interpolate(grid.reshape(1, 1, 3, 4), size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(patches, expected[0, 0])
    const = resample_pos_embed(torch.full((1, 13, 2), 0.5), (3, 4), (5, 5))
    torch.testing.assert_close(const, torch.full((1, 26, 2), 0.5))
    with pytest.raises(ValueError, match=r"does not fit a 3x4 grid"):
        resample_pos_embed(torch.zeros(1, 12, 2), (3, 4), (5, 5))


@pytest.fixture(scope="module", params=VIM_NAMES)
def published_size(request):
    """Each registered size, built as published (RGB, 224 x 224) once for the module."""
    name = request.param
    return name, build_backbone(name, in_channels=3, img_size=224)


def test_parameter_counts_match_the_published_figures(published_size):
    # The published counts (Zhu et al., 2024: 7M, 26M, 98M) are of the ImageNet classifier: the trunk plus
    # a 1000-class head. Both the trunk alone (against the published figure less that head) and the trunk
    # plus such a head (against the figure itself) must lie within 10%; the pyramid adapters are ours and
    # are counted separately.
    name, net = published_size
    spec = BACKBONES[name]
    trunk = sum(p.numel() for p in net.trunk.parameters()) / 1e6
    head = (spec.head_in_features * 1000 + 1000) / 1e6
    adapters = sum(p.numel() for p in net.parameters()) / 1e6 - trunk
    print(f"{name}: trunk {trunk:.3f}M, trunk + 1000-class head {trunk + head:.3f}M (published {spec.params_m}M), "
          f"pyramid adapters {adapters:.3f}M")  # fmt: skip
    assert trunk + head == pytest.approx(spec.params_m, rel=0.10)
    assert trunk == pytest.approx(spec.bare_params_m, rel=0.10)
    assert net.trunk.embed_dim == spec.head_in_features and len(net.trunk.layers) == 24
    mixer = net.trunk.layers[0].mixer
    assert (mixer.d_state, mixer.d_inner) == (16, 2 * spec.head_in_features)


def test_forward_and_backward_reach_every_parameter(published_size):
    name, net = published_size
    net.train()
    x = torch.randn(2, 3, 32, 32)  # 2x2 patches: the 14x14 position embeddings are interpolated
    feats = net(x)
    d = net.trunk.embed_dim
    assert net.channels == [d // 4, d // 2, d, d] and net.strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(2, c, 32 // s, 32 // s) for c, s in zip(net.channels, net.strides)]
    g = torch.Generator().manual_seed(0)
    loss = sum((f * torch.randn(f.shape, generator=g)).sum() for f in feats)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"{name}: no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.zero_grad(set_to_none=True)


@pytest.mark.parametrize("size", [64, (64, 96)])
def test_pyramid_at_the_configured_size_for_the_neck(size):
    net = build_backbone("vim_tiny", in_channels=1, img_size=size).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        feats = net(torch.randn(1, 1, h, w))
    assert net.trunk.grid_size == (h // 16, w // 16)
    assert [tuple(f.shape) for f in feats] == [(1, c, h // s, w // s) for c, s in zip(net.channels, net.strides)]


def test_monai_metatensor_batches_are_accepted():
    """Evaluators hand the network a collated MetaTensor batch; its tokens are sliced, not its metadata."""
    from monai.data import MetaTensor, list_data_collate

    items = [{"image": MetaTensor(torch.randn(1, 64, 64), meta={"filename_or_obj": f"x{i}.dcm"})} for i in range(3)]
    batch = list_data_collate(items)["image"]
    net = small_backbone().eval()
    with torch.no_grad():
        feats = net(batch)
        expected = net(batch.as_tensor())
    for f, e in zip(feats, expected):
        assert type(f) is torch.Tensor
        torch.testing.assert_close(f, e)


def small_backbone(**kw) -> VimBackbone:
    args = dict(embed_dim=16, depth=4, in_channels=1, img_size=64, scan_impl="chunked")
    args.update(kw)
    return VimBackbone(**args)


def assert_scans_give_the_same_model(net: VimBackbone, impls: tuple[str, str]) -> None:
    """float64 features and every parameter gradient of ``net`` with each scan implementation agree."""
    x = torch.randn(2, 1, 64, 48, dtype=F64)
    results = []
    for impl in impls:
        net.trunk.set_scan_impl(impl)
        net.zero_grad(set_to_none=True)
        feats = net(x)
        sum(f.square().mean() for f in feats).backward()
        results.append([f.detach() for f in feats] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.numerics
def test_reference_and_chunked_scans_give_the_same_model():
    torch.manual_seed(3)
    assert_scans_give_the_same_model(randomize_(small_backbone(), seed=3).double(), ("ref", "chunked"))


def test_fused_cpu_kernel_gives_the_same_model_and_is_a_backbone_option():
    from hmn.networks import selective_scan as ss

    kernel, why = ss._load_cpu_kernel()
    if kernel is None:
        pytest.skip(why)
    torch.manual_seed(4)
    assert_scans_give_the_same_model(randomize_(small_backbone(), seed=4).double(), ("ref", "cpu_kernel"))
    built = build_backbone("vim_tiny", img_size=64, options={"scan_impl": "cpu_kernel"})
    assert {layer.mixer.scan_impl for layer in built.trunk.layers} == {"cpu_kernel"}
    with pytest.raises(ValueError, match="unknown scan_impl 'fused'"):
        build_backbone("vim_tiny", img_size=64, options={"scan_impl": "fused"})


def test_registry_rows():
    assert backbone_names("vim") == VIM_NAMES
    for name in VIM_NAMES:
        assert BACKBONES[name].builder == "hmn.networks.vim:build_vim"


def test_pretrained_true_explains_there_is_no_hub():
    with pytest.raises(PretrainedWeightsError, match="no model hub source.*pretrained='/path/to/checkpoint.pth'"):
        build_backbone("vim_tiny", pretrained=True)
    with pytest.raises(ValueError, match="in_channels must be 1 or 3 for a Vim backbone, got 2"):
        build_backbone("vim_tiny", in_channels=2)


SPEC = BackboneSpec("vim_test", "vim", "hmn.networks.vim:build_vim", 0.1, 16, extra={"embed_dim": 16, "depth": 4})


def test_hustvl_checkpoint_loads_into_a_one_channel_model(tmp_path, caplog):
    torch.manual_seed(4)
    src = randomize_(VisionMamba(embed_dim=16, depth=4, in_channels=3, img_size=32), seed=4)
    state = dict(src.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, 16), torch.randn(1000)
    path = tmp_path / "vim_t.pth"
    torch.save({"model": state, "epoch": 300}, path)

    with caplog.at_level(logging.WARNING, logger="hmn.networks.vim"):
        net = build_vim(SPEC, in_channels=1, img_size=64, pretrained=str(path))
    assert not caplog.records  # no trunk key missing, nothing unexpected: the head is dropped quietly
    torch.testing.assert_close(net.trunk.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(net.trunk.layers[3].mixer.A_b_log, src.layers[3].mixer.A_b_log)
    torch.testing.assert_close(net.trunk.norm_f.weight, src.norm_f.weight)
    torch.testing.assert_close(net.trunk.pos_embed, resample_pos_embed(src.pos_embed.detach(), (2, 2), (4, 4)))
    # the same weights with the same input give the same class-token features
    rgb = torch.randn(1, 3, 32, 32)
    ours = build_vim(SPEC, in_channels=3, img_size=32, pretrained=str(path))
    with torch.no_grad():
        torch.testing.assert_close(ours.trunk(rgb), src(rgb))


def test_own_checkpoint_round_trip_and_clear_errors(tmp_path, caplog):
    torch.manual_seed(5)
    net = randomize_(small_backbone(), seed=5)
    path = tmp_path / "own.pt"
    torch.save(net.state_dict(), path)
    loaded = build_vim(SPEC, in_channels=1, img_size=64, pretrained=path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), loaded(x)):
            torch.testing.assert_close(a, b)

    other = tmp_path / "wider.pt"
    torch.save(small_backbone(embed_dim=32).state_dict(), other)
    with pytest.raises(PretrainedWeightsError, match=r"does not fit this Vim backbone.*\(32,\) vs model \(16,\)"):
        build_vim(SPEC, in_channels=1, img_size=64, pretrained=other)

    partial = tmp_path / "partial.pt"
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("trunk.layers.3.")}
    state["trunk.extra_thing"] = torch.zeros(1)
    torch.save(state, partial)
    with caplog.at_level(logging.WARNING, logger="hmn.networks.vim"):
        build_vim(SPEC, in_channels=1, img_size=64, pretrained=partial)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "lacks" in text and "trunk.layers.3.mixer.A_log" in text and "trunk.extra_thing" in text

    unrelated = tmp_path / "unrelated.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, unrelated)
    with pytest.raises(PretrainedWeightsError, match="shares no parameter name"):
        build_vim(SPEC, pretrained=unrelated)
    with pytest.raises(PretrainedWeightsError, match="nope.pth.*does not exist"):
        build_vim(SPEC, pretrained=tmp_path / "nope.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vim_on_cuda_matches_cpu():
    torch.manual_seed(6)
    net = randomize_(small_backbone(scan_impl="auto"), seed=6)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        cpu = net(x)
        gpu = net.cuda()(x.cuda())  # the mamba_ssm kernel where it imports, else the chunked scan
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-3)


def test_export_scan_gives_the_same_model():
    torch.manual_seed(5)
    assert_scans_give_the_same_model(randomize_(small_backbone(), seed=5).double(), ("ref", "export"))


@pytest.mark.numerics
def test_scripted_and_traced_backbone_match_eager_whatever_the_scan_impl():
    """TorchScript compiles the backbone (the mixer takes the export scan, TorchScript leaves the dispatcher
    out); a trace follows the export scan and RMSNorm written out, the ops an ONNX export can write. Both equal
    the eager model run with the reference scan, at batch sizes other than the traced one; the state_dict is
    hustvl/Vim's plus the adapters (three tap norms, the fourth slot an Identity)."""
    torch.manual_seed(6)
    net = randomize_(small_backbone(scan_impl="ref"), seed=6).double().eval()
    assert sorted({k.split(".")[1] for k in net.state_dict() if k.startswith("tap_norms.")}) == ["0", "1", "2"]
    scripted = torch.jit.script(net)
    traced = torch.jit.trace(net, torch.randn(1, 1, 64, 64, dtype=F64))
    x = torch.randn(3, 1, 64, 64, dtype=F64)
    with torch.no_grad():
        want = net(x)
        for module in (scripted, traced):
            for got, expected in zip(module(x), want):
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert "selective_scan_export_state" in getattr(scripted.trunk.layers, "0").mixer._direction.code


@pytest.mark.numerics
def test_rms_norm_written_out_for_export_matches_torch():
    from hmn.networks.vim import RMSNorm

    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(2, 5, 8)
    traced = torch.jit.trace(norm, x)
    assert "rms_norm" not in str(traced.graph)  # basic operations only, which the ONNX exporter writes
    torch.testing.assert_close(traced(x), F.rms_norm(x, (8,), norm.weight, 1e-5))
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), norm.weight, 1e-5))
