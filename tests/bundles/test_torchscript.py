"""A packed bundle's ``models/model.ts`` (hmn/bundle/torchscript.py): exported by MONAI's ``ckpt_export`` from the
packed configs and checked before the packing writes anything.

By default: the trained convnext_tiny (the session's ``trained`` fixture) packed: the zip holds ``model.ts``, whose
extra files are the zip's configs and whose logits are those of the network built from those configs and
``model.pt``, and of one built here from the settings written out; the check's tolerance on a stand-in network
(within it accepted, beyond it refused); the packing stopped with an error naming the bundle when the export fails,
when the written file gives other logits, or when it does not hold the packed configs (``ckpt_export`` replaced by
stand-ins; nothing written); and where a linked ``model.ts`` is taken to be downloaded from. The linked export of
the command line is checked in tests/bundles/test_zoo.py (test_placeholder_url_is_refused_and_downloads_are_hash_checked).
Slow: every other bundle (Vim, Swin, EfficientNetV2, ResNet and the traced and scripted 3D bundles) packed with its
untrained network at the tests' size, and a linked ``model.ts`` downloaded from beside ``model.pt``; the reuse
rehearsals (tests/bundles/test_bundles.py, test_bundles3d.py) check the packed ``model.ts`` of a user's run.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from hmn.bundle import (
    BUNDLES,
    TORCHSCRIPT_ATOL,
    TORCHSCRIPT_RTOL,
    TorchScriptExportError,
    download_bundle,
    pack_bundle,
    pack_main,
    read_large_files,
    ts_url_beside,
)
from hmn.bundle import torchscript as ts_module

ROOT = Path(__file__).resolve().parents[2]
EXTRA = ("metadata.json", "inference.json")
SIZE = 64  # the trained fixture's image size (tests/bundles/conftest.py)
# what the ConvNeXt bundles build when trained from scratch (hmn/bundle/table.py), written out here independently
SCRATCH = {"norm": "batch", "ls_init_value": 1.0, "stem": "conv"}


def _models_copy(trained: Path, tmp_path: Path) -> Path:
    """A models folder of the trained convnext_tiny's files (links), so that a linked pack writes nothing into the
    session's trained bundle."""
    models = tmp_path / "models"
    models.mkdir()
    for f in ("model.pt", "run.json", "thresholds.json"):
        if (trained / "models" / f).is_file():
            (models / f).symlink_to(trained / "models" / f)
    return models


def _config_network(bundle: Path) -> torch.nn.Module:
    """``network_def`` of the bundle folder's inference config with its ``models/model.pt`` (strict), eval mode:
    what monai.bundle.load and MONAI Deploy's fallback build."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle)})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


def test_packed_bundle_holds_a_model_ts_that_reproduces_the_trained_network(trained, tmp_path):
    """pack_bundle on the trained convnext_tiny (scripted, on the CPU): the zip holds models/model.ts (stored: it is
    a zip itself) beside model.pt; torch.jit.load gives back the zip's inference.json and metadata.json as its extra
    files, and logits equal to those of network_def built from those configs and model.pt, and of HybridMedNet built
    here from the settings the trained bundle was run with, at batch 1 and 3 (the packing's own check ran batch 2).
    The scripted module runs the same kernels on the same input in this process: equal but for summation order
    (TORCHSCRIPT_RTOL / TORCHSCRIPT_ATOL), far below what a lost block, a layer in training mode or other weights
    would move."""
    from hmn.networks import HybridMedNet

    zip_path = Path(pack_bundle("convnext_tiny", tmp_path / "convnext_tiny.zip", trained / "models", ROOT / "bundles"))
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.getinfo("convnext_tiny/models/model.ts").compress_type == zipfile.ZIP_STORED
        assert "convnext_tiny/models/model.pt" in zf.namelist() and "convnext_tiny/large_files.yml" not in zf.namelist()
        zf.extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / "convnext_tiny"
    extra = {k: "" for k in EXTRA}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert isinstance(scripted, torch.jit.RecursiveScriptModule)
    for key in EXTRA:
        assert json.loads(extra[key]) == json.loads((bundle / "configs" / key).read_text()), key
    packed = json.loads(extra["inference.json"])
    assert packed["use_run_record"] is False and packed["model_sha256"]  # the packed config, not the template's
    classes = json.loads((bundle / "models" / "run.json").read_text())["settings"]["class_names"]
    ref = HybridMedNet("convnext_tiny", num_classes=len(classes), img_size=SIZE, attention=["cbam"],
                       backbone_options=SCRATCH).eval()
    ref.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True), strict=True)
    config_net = _config_network(bundle)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
            got = scripted(x)
            assert got.shape == (batch, len(classes))
            torch.testing.assert_close(got, config_net(x), rtol=TORCHSCRIPT_RTOL, atol=TORCHSCRIPT_ATOL)
            torch.testing.assert_close(got, ref(x), rtol=TORCHSCRIPT_RTOL, atol=TORCHSCRIPT_ATOL)


def test_linked_model_ts_is_taken_to_lie_beside_model_pt():
    assert ts_url_beside("https://example.org/hmn/v1/model.pt") == "https://example.org/hmn/v1/model.ts"
    assert ts_url_beside("file:///srv/models/model.pt") == "file:///srv/models/model.ts"
    # a share link or any other name says nothing about where model.ts will be: the placeholder then
    for url in ("https://drive.example.com/file/d/123/view?usp=share_link", "https://example.org/model.pt?dl=1",
                "https://example.org/weights.pt", "https://example.org/model.pt#x", None):
        assert ts_url_beside(url) is None, url


class _Affine(torch.nn.Module):
    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, 3) "logits" of sizes 0.1 to 10, so that the relative tolerance matters
        return x.flatten(1)[:, :3] * torch.tensor([0.1, 1.0, 10.0]) + self.shift


def test_check_accepts_float_rounding_and_refuses_more(tmp_path, monkeypatch):
    """The check compares the loaded file with the eager network within TORCHSCRIPT_ATOL + TORCHSCRIPT_RTOL x
    |logit|: a file whose logits sit half that far off passes, one twice as far is refused naming the bundle and
    the difference (a stand-in network, so that the numbers are known exactly)."""
    inference, metadata = {"network_def": {"_target_": "x"}}, {"network_data_format": {"inputs": {"image": {
        "num_channels": 1, "spatial_shape": [2, 2]}}}}
    monkeypatch.setattr(ts_module, "_eager_network", lambda work, state: _Affine().eval())
    x = ts_module._check_input(metadata)
    worst = float((TORCHSCRIPT_ATOL + TORCHSCRIPT_RTOL * _Affine()(x).abs()).min())
    extra = {"inference.json": json.dumps(inference), "metadata.json": json.dumps(metadata)}
    for factor, ok in ((0.5, True), (2.0, False)):
        path = tmp_path / f"shift{factor}.ts"
        torch.jit.save(torch.jit.script(_Affine(factor * worst)), str(path), _extra_files=extra)
        if ok:
            ts_module._check_torchscript("stand_in", path, tmp_path, {}, json.dumps(inference), metadata)
        else:
            with pytest.raises(TorchScriptExportError, match=r"^stand_in: model.ts does not reproduce the PyTorch "
                               r"network: .* differ by up to [0-9.e-]+ \(allowed 1e-05 \+ 0.0001 x \|logit\|"):
                ts_module._check_torchscript("stand_in", path, tmp_path, {}, json.dumps(inference), metadata)


class _Zeros(torch.nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.classes)


def test_pack_bundle_stops_naming_the_bundle_when_the_export_is_wrong(trained, tmp_path, monkeypatch, capsys):
    """The command line packs nothing, and says which bundle and why, when ckpt_export fails, when the file it writes
    gives other logits than the network built from the packed configs and model.pt (here: zeros), and when it does
    not hold the packed configs. Linked, no model.ts is left beside model.pt either."""
    import monai.bundle

    models = _models_copy(trained, tmp_path)
    classes = len(json.loads((models / "run.json").read_text())["settings"]["class_names"])

    def fails(**kwargs):
        raise RuntimeError("Module 'HybridMedNet' has no attribute 'x' (stand-in)")

    def zeros(with_extra: bool):
        def export(**kwargs):
            files = ("config_file", "meta_file") if with_extra else ()
            extra = {Path(kwargs[k]).name: Path(kwargs[k]).read_text() for k in files}
            torch.jit.save(torch.jit.script(_Zeros(classes)), kwargs["filepath"], _extra_files=extra)
        return export

    zip_path = tmp_path / "out" / "convnext_tiny.zip"
    args = ["convnext_tiny", str(zip_path), "--models-dir", str(models), "--bundles-dir", str(ROOT / "bundles")]
    cases = [
        (fails, [], "convnext_tiny: the TorchScript export of the trained network failed (monai.bundle.ckpt_export with "
         f"{ROOT / 'bundles' / 'convnext_tiny' / 'configs' / 'export_torchscript.json'}): RuntimeError: Module "
         "'HybridMedNet' has no attribute 'x' (stand-in)"),
        (zeros(True), ["--link-weights"], "convnext_tiny: model.ts does not reproduce the PyTorch network: on a fixed "
         "input of shape (2, 1, 64, 64) its logits differ by up to"),
        (zeros(False), [], "convnext_tiny: model.ts does not hold the packed configs/inference.json as its extra file"),
    ]
    for export, more, message in cases:
        monkeypatch.setattr(monai.bundle, "ckpt_export", export)
        assert pack_main([*args, *more]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}"), err
        assert not zip_path.exists() and not (models / "model.ts").exists()


def _untrained(name: str, models: Path, datalist: str, size) -> torch.nn.Module:
    """model.pt and run.json of the bundle's untrained network (as tests/bundles/test_zoo.py writes them); returns
    the network itself, eval mode: the expectation, built from the repository's train.json, not the packed configs."""
    from monai.bundle import ConfigParser

    from hmn.runs import write_run_record

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / name / "configs" / "train.json"))
    parser.update({"datalist": datalist, "image_size": size, "bundle_root": str(models.parent)})
    models.mkdir(parents=True)
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    torch.save(net.state_dict(), models / "model.pt")
    write_run_record(models, parser.get_parsed_content("run_settings"))
    return net.eval()


def _check_model_ts(path: Path, bundle: Path, net: torch.nn.Module, shape: list[int]) -> None:
    """The file holds the bundle's (packed) configs, and its logits at batch 1 and 3 are the network's. Scripted
    or traced, it runs the same kernels as the network, but for Vim's scan, whose exported form sums in another
    order (about 1e-7 apart): TORCHSCRIPT_RTOL / TORCHSCRIPT_ATOL, as the packing's own check."""
    extra = {k: "" for k in EXTRA}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    for key in EXTRA:
        assert json.loads(extra[key]) == json.loads((bundle / "configs" / key).read_text()), key
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.rand(batch, 1, *shape, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(module(x), net(x), rtol=TORCHSCRIPT_RTOL, atol=TORCHSCRIPT_ATOL)


@pytest.mark.slow  # 20 s to a minute each on 2 cores; convnext_tiny's packed model.ts is checked by default
@pytest.mark.parametrize("name", [n for n in BUNDLES if n != "convnext_tiny"])
def test_every_bundle_packs_a_model_ts_that_reproduces_its_network(name, datalist_for, size_for, tmp_path):
    models = tmp_path / "run" / "models"
    size = size_for(name)
    net = _untrained(name, models, datalist_for(name), size)
    zip_path = Path(pack_bundle(name, tmp_path / f"{name}.zip", models, ROOT / "bundles"))
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.getinfo(f"{name}/models/model.ts").compress_type == zipfile.ZIP_STORED
        zf.extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / name
    _check_model_ts(bundle / "models" / "model.ts", bundle, net, size if isinstance(size, list) else [size, size])


@pytest.mark.slow  # half a minute
def test_linked_model_ts_is_downloaded_from_beside_model_pt(demo_datalist, tmp_path):
    """vim_tiny (the smallest files) packed with --weights-url only: large_files.yml links model.ts beside model.pt
    with its digest, model.ts is written there, and download_bundle fetches both and checks them."""
    models = tmp_path / "served" / "models"
    net = _untrained("vim_tiny", models, demo_datalist, 64)
    zip_path = Path(pack_bundle("vim_tiny", tmp_path / "served" / "vim_tiny.zip", models, ROOT / "bundles",
                                weights_url=(models / "model.pt").as_uri()))
    got = Path(download_bundle(zip_path.as_uri(), tmp_path / "dl", "vim_tiny"))
    entries = read_large_files(got)
    assert [e["path"] for e in entries] == ["models/model.pt", "models/model.ts"]
    assert entries[1]["url"] == (models / "model.ts").as_uri() and entries[1]["hash_type"] == "sha256"
    assert (got / "models" / "model.ts").read_bytes() == (models / "model.ts").read_bytes()
    _check_model_ts(got / "models" / "model.ts", got, net, [64, 64])
