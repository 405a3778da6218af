"""``models/model.ts`` of a packed bundle: the trained network exported to TorchScript on the CPU by MONAI's own
``ckpt_export`` with the bundle's ``configs/export_torchscript.json``, from the packed ``inference.json`` and
``metadata.json`` (embedded in the file as its extra files ``inference.json`` and ``metadata.json``, as
``ckpt_export`` stores them), and checked against the PyTorch network before it is packed.

MONAI Deploy App SDK's ``MonaiBundleInferenceOperator`` loads ``models/model.ts`` with ``torch.jit.load`` first
and only falls back to ``model.pt`` and instantiating ``network_def`` (which needs the ``hmn`` package); the
MONAI model zoo's CI loads a provided ``model.ts`` too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["TORCHSCRIPT_ATOL", "TORCHSCRIPT_RTOL", "TS_EXTRA_FILES", "TorchScriptExportError",
           "export_packed_torchscript"]

logger = logging.getLogger(__name__)

TORCHSCRIPT_RTOL = 1e-4
TORCHSCRIPT_ATOL = 1e-5
"""``model.ts`` is accepted when every logit on the check input is within ``TORCHSCRIPT_ATOL + TORCHSCRIPT_RTOL *
|eager|`` of the PyTorch network's (the tolerance of the repository's export tests, tests/test_export.py). The
scripted or traced module calls the same ATen kernels as the eager network on the same CPU and input, so the logits
are bitwise equal but where the two sum in another order: Vim's scripted forward runs the selective scan as plain
tensor operations (``selective_scan_export``) where the eager network runs the chunked scan, and TorchScript's
graph optimizer may fuse element-wise operations. Measured on every bundle's untrained network at 64 px (Intel Xeon
with AVX-512 and AMX, 2 cores): 0 for all but Vim, 1.2e-7 (vim_tiny), 1.5e-7 (vim_small) and 2.4e-7 (vim_base) at
logits of order 1; 1.8e-7 for vim_tiny at its default 224 px. rtol 1e-4 is about 800 float32 ulps at 1, atol 1e-5
covers logits near 0; an export that runs another computation (a block or branch lost, a layer in training mode,
other weights) moves the logits by orders of magnitude more."""

# the extra files ckpt_export writes into the TorchScript archive (<archive>/extra/NAME), which MONAI Deploy reads
TS_EXTRA_FILES = ("metadata.json", "inference.json")


class TorchScriptExportError(RuntimeError):
    """``models/model.ts`` of a bundle could not be exported, or the exported file does not reproduce the PyTorch
    network (or does not hold the packed configs); the message names the bundle and what differed."""


@contextmanager
def _quiet_export() -> Iterator[None]:
    """ckpt_export's input summary (paths in a temporary folder, meaningless to the packer, logged at INFO) and
    PyTorch's notices that ``torch.jit`` is deprecated (MONAI Deploy's bundle operator and the zoo load TorchScript;
    nothing for the packer to do) left out; a traced bundle's warnings about the shape-dependent branches its trace
    fixes too (the docs say that a traced module keeps the image size it was exported at; the check runs it there)."""
    import torch

    monai_logger = logging.getLogger("monai.bundle.scripts")
    level = monai_logger.level
    monai_logger.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        monai_logger.setLevel(level)


def _state_dict(model: Path) -> dict:
    """``model.pt`` on the CPU (tensors saved on a GPU included): a bare state dict, or the one under ``"model"``."""
    from hmn.checkpoints import CheckpointReadError, load_checkpoint

    state = load_checkpoint(model, map_location="cpu")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointReadError(model, f"holds a {type(state).__name__}, not a state dict")
    return state


def _eager_network(work: Path, state: dict):
    """``network_def`` of the packed inference config in `work`, with the weights `state` (strict), eval mode, on
    the CPU: the network that MONAI Deploy's fallback and ``monai.bundle.load`` build from the same files."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(work / "configs" / "inference.json"))
    parser.read_meta(str(work / "configs" / "metadata.json"))
    parser["bundle_root"] = str(work)
    net = parser.get_parsed_content("network_def").to("cpu")
    net.load_state_dict(state, strict=True)
    for module in net.modules():
        # Vim trained with the mamba_ssm kernel ("cuda") or the fused C++ one ("cpu_kernel"): on this CPU the
        # reference runs the plain PyTorch scan, which computes the same function (tests/networks check them against
        # one another); the scripted module runs its own plain-operation scan whatever scan_impl says
        if isinstance(getattr(module, "scan_impl", None), str):
            module.scan_impl = "auto"
    return net.eval()


def _check_input(metadata: dict):
    """A fixed input of batch 2 at the packed metadata's channels and spatial shape (the trained image size), with
    values in [0, 1] like the bundles' preprocessed images, drawn without touching the global random state."""
    import torch

    image = metadata["network_data_format"]["inputs"]["image"]
    shape = (2, int(image.get("num_channels", 1)), *[int(s) for s in image["spatial_shape"]])
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def export_packed_torchscript(name: str, inference_text: str, metadata_text: str, args_file: str | os.PathLike,
                              model: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Writes ``model.ts`` of bundle `name` to `out`: MONAI's ``ckpt_export`` with the bundle's export argument
    file `args_file` (``configs/export_torchscript.json``: ``net_id``, scripted or traced), run on the CPU in a
    temporary bundle folder holding exactly `inference_text` and `metadata_text` (the packed
    ``configs/inference.json`` and ``configs/metadata.json``) and the weights of `model` (``model.pt``, loaded
    onto the CPU wherever it was saved). Then checks the written file: ``torch.jit.load`` with its extra files
    gives back the two configs unchanged, and the module's logits on a fixed input (batch 2 at the metadata's
    shape) are those of ``network_def`` built from the same files with the same weights, within
    :data:`TORCHSCRIPT_RTOL` / :data:`TORCHSCRIPT_ATOL`. `out` is written only once the check has passed.

    Raises:
        TorchScriptExportError: the export failed, or the check did (the message names the bundle and the
            largest difference).
        hmn.checkpoints.CheckpointReadError: `model` cannot be read.
    """
    import torch
    from monai.bundle import ckpt_export

    out = Path(out)
    metadata = json.loads(metadata_text)
    with tempfile.TemporaryDirectory(prefix=f"hmn-ts-{name}-") as tmp:
        work = Path(tmp)
        (work / "configs").mkdir()
        (work / "models").mkdir()
        (work / "configs" / "inference.json").write_text(inference_text)
        (work / "configs" / "metadata.json").write_text(metadata_text)
        state = _state_dict(Path(model))
        # ckpt_export loads the checkpoint with torch.load and no map_location: a CPU copy, so that weights saved
        # on a GPU export here too, and on the CPU
        torch.save(state, work / "models" / "model.pt")
        ts_file = work / "models" / "model.ts"
        # use_trace is also given as an argument: MONAI 1.6's ckpt_export derives the trace's example input from the
        # metadata only when use_trace is an argument, not when it comes from args_file alone (it tests the argument
        # where it means the merged value), and then a traced bundle's export stops with "Missing input data"
        use_trace = bool(json.loads(Path(args_file).read_text()).get("use_trace", False))
        try:
            with _quiet_export():
                ckpt_export(args_file=str(args_file), use_trace=use_trace, bundle_root=str(work), filepath=str(ts_file),
                            ckpt_file=str(work / "models" / "model.pt"),
                            config_file=str(work / "configs" / "inference.json"),
                            meta_file=str(work / "configs" / "metadata.json"))
        except Exception as e:  # noqa: BLE001 - scripting and tracing raise many types
            raise TorchScriptExportError(
                f"{name}: the TorchScript export of the trained network failed (monai.bundle.ckpt_export with "
                f"{args_file}): {type(e).__name__}: {' '.join(str(e).split())[:600]}") from e
        with _quiet_export():
            _check_torchscript(name, ts_file, work, state, inference_text, metadata)
        # beside `out` first, then renamed: an interrupted copy never leaves a partial model.ts
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(f".{out.name}.part")
        try:
            shutil.move(str(ts_file), str(part))
            os.replace(part, out)
        finally:
            if part.exists():
                part.unlink()
    return out


def _check_torchscript(name: str, ts_file: Path, work: Path, state: dict, inference_text: str, metadata: dict) -> None:
    """Raises :class:`TorchScriptExportError` unless `ts_file` loads, holds the packed configs and gives the eager
    network's logits (see :func:`export_packed_torchscript`)."""
    import torch

    extra = {k: "" for k in TS_EXTRA_FILES}
    try:
        module = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra)
    except Exception as e:  # noqa: BLE001
        raise TorchScriptExportError(f"{name}: the exported model.ts does not load with torch.jit.load "
                                     f"({type(e).__name__}: {e})") from e
    for key, want in (("inference.json", json.loads(inference_text)), ("metadata.json", metadata)):
        try:
            got = json.loads(extra[key])
        except ValueError:
            got = None
        if got != want:
            raise TorchScriptExportError(f"{name}: model.ts does not hold the packed configs/{key} as its extra "
                                         f"file {key} (MONAI's ckpt_export stores it there; this MONAI wrote "
                                         "something else)")
    x = _check_input(metadata)
    with torch.no_grad():
        try:
            want = _eager_network(work, state)(x)
        except Exception as e:  # noqa: BLE001
            raise TorchScriptExportError(f"{name}: the PyTorch network built from the packed configs (model.ts's "
                                         f"reference) fails on an input of shape {tuple(x.shape)} "
                                         f"({type(e).__name__}: {' '.join(str(e).split())[:400]})") from e
        try:
            got = module(x)
        except Exception as e:  # noqa: BLE001
            raise TorchScriptExportError(f"{name}: model.ts fails on an input of shape {tuple(x.shape)} "
                                         f"({type(e).__name__}: {' '.join(str(e).split())[:400]})") from e
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
        what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise TorchScriptExportError(f"{name}: model.ts gives {what} on an input of shape {tuple(x.shape)}, "
                                     f"the PyTorch network {tuple(want.shape)} {want.dtype}")
    diff = (got - want).abs()
    allowed = TORCHSCRIPT_ATOL + TORCHSCRIPT_RTOL * want.abs()
    if not bool(torch.isfinite(want).all()) or not bool((diff <= allowed).all()):
        worst = float(diff.nan_to_num(float("inf")).max())
        raise TorchScriptExportError(
            f"{name}: model.ts does not reproduce the PyTorch network: on a fixed input of shape {tuple(x.shape)} its "
            f"logits differ by up to {worst:.3g} (allowed {TORCHSCRIPT_ATOL:g} + {TORCHSCRIPT_RTOL:g} x |logit|"
            + ("; the PyTorch network's logits are not all finite" if not bool(torch.isfinite(want).all()) else "")
            + "); the bundle was not packed")
    logger.info("%s: model.ts checked: largest logit difference from the PyTorch network %.3g", name, float(diff.max()))
