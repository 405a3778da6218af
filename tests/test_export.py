"""TorchScript and ONNX export of every bundle's network, as its export argument files say.

For each bundle (random weights, eval mode, 64x64 inputs, the bundle's attention and backbone options):
the TorchScript conversion its ``configs/export_torchscript.json`` names (scripted, or traced where the
backbone table says so) gives the eager network's logits at other batch sizes (and, scripted, other image
sizes where the backbone allows) after a save and load; the ONNX file written the way
``configs/export_onnx.json`` says (MONAI's ``convert_to_onnx``, which ``onnx_export`` calls) runs in
onnxruntime at batch 1 and 4, and at another image size where its spatial axes are dynamic, within
:data:`hmn.bundle.ONNX_ATOL` of the eager logits. The export commands themselves run end to end on a
trained bundle in tests/bundles/test_bundles.py (test_export_commands_of_the_docs_match_eager).
"""

from __future__ import annotations

import copy
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hmn.bundle import BUNDLES, EXPORT_ARGS, ONNX_ATOL, export_args
from hmn.networks import HybridMedNet, get_backbone_spec

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
OTHER = (96, 80)  # another image size, for the backbones that take any
SIZE_3D, OTHER_3D = (32, 32, 16), (64, 32, 16)  # the same for the volume bundles (X, Y, Z)


def _base(name: str) -> tuple[int, ...]:
    return SIZE_3D if get_backbone_spec(name).spatial_dims == 3 else (SIZE, SIZE)


def _other(name: str) -> tuple[int, ...]:
    return OTHER_3D if get_backbone_spec(name).spatial_dims == 3 else OTHER
# the largest backbones take tens of seconds each to build, script and export on 2 cores
# the larger members of each family: the smaller ones (convnext_tiny/small, swin_tiny, efficientnetv2_s, vim_tiny,
# resnet50 and the 3D bundles) export the same code by default
SLOW = {"convnext_base", "convnext_large", "swin_small", "swin_base", "efficientnetv2_m", "efficientnetv2_l",
        "vim_small", "vim_base",
        # 16 s for both formats; convnext3d_tiny exports a 3D network by default
        "swin3d_small"}
# single formats in the slow run (CI's time budget): vim_tiny's TorchScript export stays in the default run, and
# pack-bundle's model.ts check covers TorchScript for the trained bundle
SLOW_CASES = {("vim_tiny", "onnx")}


def _args(name: str, fmt: str) -> dict:
    args = json.loads((ROOT / "bundles" / name / EXPORT_ARGS[fmt]).read_text())
    assert args == export_args(name, fmt), f"bundles/{name}/{EXPORT_ARGS[fmt]} differs from the generator's"
    return args


def _calibrate_batch_norms(net: torch.nn.Module, sizes=((SIZE, SIZE),)) -> None:
    """Sets every BatchNorm's running statistics to those of 32 random images of each of ``sizes``, as training
    would.

    With freshly initialised statistics (mean 0, variance 1) an eval-mode network normalises nothing: the
    activations of a deep random EfficientNetV2-L grow to about 1e6 by stride 32, where float32 itself differs
    from float64 by 100% (measured), so no two correct float32 implementations could agree. Statistics of 4
    images still left it so (2x2 maps at stride 32: a channel's variance from 16 values); of 32, its float32
    and float64 logits agree to 1e-5. The statistics hold for the image sizes they were taken at: the network
    calibrated at 64x64 alone differs from itself in float64 by 0.2 at 96x80, so the other size tested is
    calibrated too.
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:  # Swin, Vim: nothing to calibrate
        net.eval()
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches seen: here the one batch
    net.train()
    with torch.no_grad():
        for size in sizes:
            net(torch.rand(32, 1, *size, generator=torch.Generator().manual_seed(7)))
    net.eval()


@functools.lru_cache(maxsize=1)
def _network(name: str) -> HybridMedNet:
    """The bundle's network (its attention and backbone options, 5 classes) at SIZE, random weights with
    calibrated BatchNorm statistics, eval mode; kept for the next test, which exports the same bundle to the
    other format."""
    row = BUNDLES[name]
    torch.manual_seed(0)
    net = HybridMedNet(name, num_classes=5, img_size=_base(name), attention=list(row.attention),
                       backbone_options=dict(row.backbone_options))
    _calibrate_batch_norms(net, [_base(name)] + ([] if get_backbone_spec(name).fixed_size else [_other(name)]))
    return net


def _inputs(name: str, batch: int, size: tuple[int, ...] | None = None) -> torch.Tensor:
    size = size or _base(name)
    return torch.rand(batch, 1, *size, generator=torch.Generator().manual_seed(batch * 1000 + size[0] + size[1]))


def _check_torchscript(name: str) -> None:
    from monai.networks.utils import convert_to_torchscript

    args = _args(name, "torchscript")
    spec = get_backbone_spec(name)
    assert args["use_trace"] is (spec.torchscript == "trace")
    net = _network(name)
    # what ckpt_export does with these arguments: traced at the input shape, or scripted without one
    inputs = [_inputs(name, 1)] if args["use_trace"] else None
    module = convert_to_torchscript(net, inputs=inputs, use_trace=args["use_trace"])
    assert isinstance(module, torch.jit.ScriptModule)
    if not args["use_trace"]:
        assert isinstance(module, torch.jit.RecursiveScriptModule) and "forward" in module.code
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    cases = [(1, _base(name)), (3, _base(name))]
    if not spec.fixed_size and not args["use_trace"]:
        cases.append((2, _other(name)))  # a scripted module takes other sizes as the network does
    with torch.no_grad():
        for batch, size in cases:
            x = _inputs(name, batch, size)
            torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {batch}x{size}: {m}")


def _check_onnx(name: str, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from monai.networks.utils import convert_to_onnx

    args = _args(name, "onnx")
    spec = get_backbone_spec(name)
    kwargs = dict(args["converter_kwargs"])
    assert kwargs["atol"] == ONNX_ATOL and kwargs["rtol"] == 0 and kwargs["verify"] and kwargs["use_ort"]
    net = _network(name)
    path = tmp_path / "model.onnx"
    # what onnx_export does with these arguments (it also checks batch 1 in onnxruntime, within ONNX_ATOL)
    convert_to_onnx(net, inputs=[_inputs(name, 1)], filename=str(path), use_trace=args["use_trace"], **kwargs)
    graph = onnx.load(str(path)).graph
    (image,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 1, dims  # a named (dynamic) batch axis, one channel
    if spec.fixed_size or spec.torchscript == "trace":  # built for one size, or its size baked in by the trace
        assert dims[2:] == list(_base(name)), dims
    else:
        assert all(isinstance(d, str) for d in dims[2:]), dims
    assert [o.name for o in graph.output] == ["pred"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = [(1, _base(name)), (4, _base(name))]
    if not spec.fixed_size and spec.torchscript != "trace":
        cases.append((2, _other(name)))
    with torch.no_grad():
        for batch, size in cases:
            x = _inputs(name, batch, size)
            (out,) = session.run(None, {"image": x.numpy()})
            want = net(x).numpy()
            assert out.shape == want.shape == (batch, 5)
            if size != _base(name) and np.abs(out - want).max() > ONNX_ATOL:
                _assert_as_exact_as_eager(out, want, net, x, f"{name} batch {batch} {size}")
                continue
            np.testing.assert_allclose(out, want, rtol=0, atol=ONNX_ATOL, err_msg=f"{name} batch {batch} {size}")


def _assert_as_exact_as_eager(out: np.ndarray, want: np.ndarray, net: torch.nn.Module, x: torch.Tensor, what: str) -> None:
    """ONNX logits ``out`` at least as close to the float64 network's as the float32 network's ``want`` are, plus
    ONNX_ATOL. For the other image size: a random network whose BatchNorm statistics were taken partly at another
    size can be ill-conditioned there, its float32 logits differing from its float64 ones (EfficientNetV2-M by
    3e-3 and -L by 2e-2 at 96x80, measured), and then no two float32 implementations agree within ONNX_ATOL.
    Their errors are of one order but not of one size, and PyTorch's depends on its kernels' summation order
    (thread count, instruction set): with one thread EfficientNetV2-M's was 1.8e-4 and onnxruntime's 4.9e-4, a
    ratio of 2.7 that an allowance of twice PyTorch's error refused. Four times it still refuses a wrong graph,
    which moves these logits by more than 1e-1."""
    exact = copy.deepcopy(net).double()(x.double()).numpy()
    own = np.abs(want - exact).max()
    assert np.abs(out - exact).max() <= ONNX_ATOL + 4 * own, (
        f"{what}: onnxruntime {np.abs(out - exact).max():.2e} from the float64 network, float32 PyTorch {own:.2e}")


CASES = [pytest.param(name, fmt, marks=[pytest.mark.slow] if name in SLOW or (name, fmt) in SLOW_CASES else [],
                      id=f"{name}-{fmt}")
         for name in BUNDLES for fmt in EXPORT_ARGS]


@pytest.mark.parametrize("name,fmt", CASES)
def test_export_matches_eager(name, fmt, tmp_path):
    if fmt == "torchscript":
        _check_torchscript(name)
    else:
        _check_onnx(name, tmp_path)


def test_export_args_cover_every_bundle_and_refuse_other_formats():
    for name in BUNDLES:
        for fmt in EXPORT_ARGS:
            assert (ROOT / "bundles" / name / EXPORT_ARGS[fmt]).is_file()
    with pytest.raises(ValueError, match="unknown export format 'tflite'; valid: torchscript, onnx"):
        export_args("convnext_tiny", "tflite")


@pytest.mark.numerics
def test_hierarchical_head_and_every_attention_mode_script_and_export(tmp_path):
    """The parts the bundles' defaults leave out: the hierarchical head and attention 'self' alone, and
    'none', scripted and in ONNX with dynamic spatial axes (the pooled attention context follows the size)."""
    import onnxruntime as ort
    from monai.networks.utils import convert_to_onnx

    for attention, hierarchical in ((["self"], True), (["none"], False), (["cbam", "self", "cross_scale"], False)):
        torch.manual_seed(0)
        net = HybridMedNet("resnet50", num_classes=6, img_size=SIZE, attention=attention, hierarchical=hierarchical,
                           num_coarse_classes=2, fpn_channels=64, fusion_channels=64, num_heads=4)
        _calibrate_batch_norms(net)
        scripted = torch.jit.script(net)
        path = tmp_path / f"{'-'.join(attention)}.onnx"
        kwargs = dict(export_args("resnet50", "onnx")["converter_kwargs"])
        convert_to_onnx(net, inputs=[_inputs("resnet50", 1)], filename=str(path), use_trace=True, **kwargs)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            for batch, size in ((1, (SIZE, SIZE)), (3, (320, 256))):  # 320/8 = 40: pooled to 7 by uneven bins
                x = _inputs("resnet50", batch, size)
                want = net(x)
                assert want.shape == (batch, 8 if hierarchical else 6)
                torch.testing.assert_close(scripted(x), want, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], want.numpy(), rtol=0, atol=ONNX_ATOL)
