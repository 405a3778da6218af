"""Heatmaps (hmn.explain): Grad-CAM shapes and range, a network whose findings live in known regions, attention
rollout against a direct computation, the inference handler's files and thresholds with a DICOM that carries
identifiers, and ``python -m hmn explain`` end to end."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from PIL import Image

from hmn.data.demo import _write_dicom
from hmn.explain import (
    attention_rollout,
    explain_main,
    gradcam,
    gradcam_pairs,
    heatmap_id,
    resolve_findings,
    resolve_thresholds,
)
from hmn.handlers import HeatmapWriter, PredictionCSVWriter
from hmn.inference import InferenceDataset
from hmn.networks import HybridMedNet
from hmn.networks.attention import AttentionStack
from hmn.transforms import LoadXrayd, PercentileRescaled

SMALL = {"fpn_channels": 32, "fusion_channels": 32, "num_heads": 4, "dropout": 0.0}
SCRATCH = {"norm": "batch", "ls_init_value": 1.0, "stem": "conv"}
PATIENT_ID, PATIENT_NAME = "ZZ99887", "Phantom"  # the demo writer names the patient Synthetic^Phantom<ID>


class _RegionNet(nn.Module):
    """A network shaped like HybridMedNet whose class 0 is the amount of bright (> 0.5) and class 1 the amount
    of dark (< 0.5) image, pooled at strides 8, 16 and 32: each finding lives where its pixels are."""

    def __init__(self) -> None:
        super().__init__()
        self.levels = [0, 1, 2]
        self.backbone = nn.Module()
        self.backbone.strides = [8, 16, 32]
        self.attention = AttentionStack([], [])
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(2))
            self.head.bias.zero_()
        self.num_classes = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1]
        detectors = torch.cat([F.relu(x - 0.5), F.relu(0.5 - x)], dim=1)
        feats = self.attention([F.avg_pool2d(detectors, s) for s in self.backbone.strides])
        return self.head(sum(f.mean((2, 3)) for f in feats)) * 20.0 - 1.0


def _region_image(size: int = 64) -> torch.Tensor:
    x = torch.full((1, 1, size, size), 0.5)
    x[..., 8:24, 40:56] = 1.0  # bright square, top right
    x[..., 40:56, 8:24] = 0.0  # dark square, bottom left
    return x


@pytest.fixture(scope="module")
def attn_net():
    torch.manual_seed(0)
    return HybridMedNet("convnext_tiny", num_classes=3, img_size=64, attention=["self", "cross_scale"],
                        backbone_options=SCRATCH, **SMALL).eval()


def test_gradcam_shapes_range_and_the_network_left_as_it_was(attn_net):
    x = torch.rand(2, 1, 64, 48)
    attn_net.train()
    for levels in ("finest", "all"):
        maps = gradcam(attn_net, x, [0, 2], levels=levels)
        assert maps.shape == (2, 2, 64, 48) and maps.dtype == torch.float32
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
        peaks = maps.flatten(2).amax(-1)
        assert torch.all((peaks == 1.0) | (peaks == 0.0))
    assert gradcam(attn_net, x).shape == (2, 3, 64, 48)  # every class by default
    assert attn_net.training  # the mode is restored, the hooks removed, no gradients left behind
    assert not attn_net.attention._forward_hooks
    assert all(p.grad is None for p in attn_net.parameters())
    attn_net.eval()
    pairs = gradcam_pairs(attn_net, x, [1, 0], [2, 2])
    torch.testing.assert_close(pairs, torch.stack([gradcam(attn_net, x[1:], [2])[0, 0], gradcam(attn_net, x[:1], [2])[0, 0]]))


def test_gradcam_refuses_what_it_cannot_explain(attn_net):
    x = torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match="N, C, H, W"):
        gradcam(attn_net, x[0])
    with pytest.raises(ValueError, match=r"class_index values must lie in \[0, 3\)"):
        gradcam(attn_net, x, [3])
    with pytest.raises(ValueError, match="levels must be one of"):
        gradcam(attn_net, x, [0], levels="coarsest")
    with pytest.raises(TypeError, match="HybridMedNet"):
        gradcam(nn.Sequential(nn.Flatten(), nn.Linear(64 * 64, 2)), x)


@pytest.mark.numerics
@pytest.mark.parametrize("levels", ["finest", "all"])
def test_gradcam_peaks_where_the_finding_is(levels):
    net, x = _RegionNet().eval(), _region_image()
    maps = gradcam(net, x, levels=levels)[0]
    for k, (rows, cols) in enumerate([(slice(8, 24), slice(40, 56)), (slice(40, 56), slice(8, 24))]):
        r, c = np.unravel_index(int(maps[k].argmax()), maps[k].shape)
        assert rows.start <= r < rows.stop and cols.start <= c < cols.stop, (k, r, c)
    if levels == "finest":
        # the fusion reads every level through its mean, so the gradient is the same at each position and the
        # finest level's Grad-CAM is that level's detector map itself, upsampled and scaled to its maximum
        for k, detector in enumerate([F.relu(x - 0.5), F.relu(0.5 - x)]):
            want = F.interpolate(F.avg_pool2d(detector, 8), size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
            torch.testing.assert_close(maps[k], want / want.max(), atol=1e-5, rtol=1e-5)


@pytest.mark.numerics
def test_attention_rollout_matches_a_direct_computation():
    torch.manual_seed(1)
    net = HybridMedNet("convnext_tiny", num_classes=2, img_size=128, attention="self", feature_strides=(32,),
                       context_size=None, backbone_options=SCRATCH, fpn_channels=32, fusion_channels=32,
                       num_heads=1).eval()
    x = torch.rand(1, 1, 128, 128)
    attn = net.attention.stages[0].blocks[0].attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, i, o: seen.update(q=i[0], ctx=i[1], out=o))
    with torch.no_grad():
        net(x)
    handle.remove()
    # the attention matrix, written out, reproduces the module's own (scaled_dot_product_attention) output
    q, kv = attn.q(seen["q"]), attn.kv(seen["ctx"])
    k, v = kv[..., :32], kv[..., 32:]
    probs = torch.softmax(q @ k.transpose(1, 2) / np.sqrt(32), dim=-1)
    torch.testing.assert_close(attn.proj(probs @ v), seen["out"], atol=1e-5, rtol=1e-4)
    # rollout of one residual stage (Abnar & Zuidema: 0.5 A + 0.5 I), read out by the fusion's mean over the
    # 4 x 4 positions, each covering 32 x 32 pixels
    t = probs.shape[1]
    relevance = torch.full((1, t), 1.0 / t) @ (0.5 * probs[0] + 0.5 * torch.eye(t))
    want = F.interpolate(relevance.view(1, 1, 4, 4), size=(128, 128), mode="bilinear", align_corners=False)
    torch.testing.assert_close(attention_rollout(net, x), want / want.max(), atol=1e-5, rtol=1e-4)


def test_attention_rollout_shape_and_where_it_has_no_meaning(attn_net):
    maps = attention_rollout(attn_net, torch.rand(2, 1, 64, 48))
    assert maps.shape == (2, 1, 64, 48) and float(maps.min()) >= 0.0 and float(maps.max()) == 1.0
    cbam = HybridMedNet("convnext_tiny", num_classes=2, img_size=64, attention="cbam", **SMALL)
    with pytest.raises(ValueError, match="CBAM gates each position"):
        attention_rollout(cbam, torch.rand(1, 1, 64, 64))



def test_explain_refuses_a_rollout_before_writing_anything(tmp_path):
    from hmn.explain import explain_image

    torch.manual_seed(0)
    cbam = HybridMedNet("convnext_tiny", num_classes=2, img_size=64, attention="cbam", **SMALL).eval()
    bundle = {"network": cbam, "class_names": ["Effusion", "Mass"],
              "preprocessing": lambda item: {"image": torch.rand(1, 64, 64)}}
    with pytest.raises(ValueError, match=r"Use Grad-CAM instead \(hmn.explain.gradcam; python -m hmn explain without --rollout\)"):
        explain_image(bundle, tmp_path / "a.png", tmp_path / "out", thresholds=0.0, rollout=True)
    assert not (tmp_path / "out").exists()
    result = explain_image(bundle, tmp_path / "a.png", tmp_path / "out", thresholds=0.0)  # Grad-CAM alone works
    assert len(result["rows"]) == 2 and result["rollout"] is None


def test_findings_and_thresholds(tmp_path):
    names = ["Effusion", "Mass", "Nodule"]
    assert resolve_findings("all", names) == [0, 1, 2] and resolve_findings(["Nodule", "Mass"], names) == [1, 2]
    with pytest.raises(ValueError, match="'Nodul'.*its classes"):
        resolve_findings(["Nodul"], names)
    assert resolve_thresholds(0.3, names).tolist() == [0.3] * 3
    assert resolve_thresholds("0.7", names).tolist() == [0.7] * 3
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"per_class": [{"class": "Effusion", "threshold": 0.2}, {"class": "Mass", "threshold": null},'
                       ' {"class": "Nodule", "threshold": 0.9}]}')
    assert resolve_thresholds(str(metrics), names).tolist() == [0.2, 0.5, 0.9]  # no threshold: the default
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        resolve_thresholds({"Effusion": 2, "Mass": 0.5, "Nodule": 0.5}, names)
    with pytest.raises(ValueError, match="no such metrics.json"):
        resolve_thresholds(str(tmp_path / "missing.json"), names)


def _png_text_chunks(path) -> list[bytes]:
    data, chunks, i = open(path, "rb").read(), [], 8
    while i < len(data):
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            chunks.append(data[i + 8 : i + 8 + length])
        i += 12 + length
    return chunks


def _identified_dicom(path, pattern: np.ndarray) -> str:
    """A DICOM whose header carries a synthetic PatientName, PatientID and AccessionNumber (as the demo's do)."""
    _write_dicom(str(path), pattern, np.random.default_rng(0), False, PATIENT_ID, f"{PATIENT_ID}_00")
    return str(path)


def _assert_nothing_identifying(folder) -> list[str]:
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    for f in files:
        rel = os.path.relpath(f, folder)
        assert PATIENT_ID not in rel and PATIENT_NAME not in rel and "scan" not in rel, rel
        if f.endswith(".png"):
            assert _png_text_chunks(f) == [] and not Image.open(f).text
            raw = open(f, "rb").read()
            assert PATIENT_ID.encode() not in raw and PATIENT_NAME.encode() not in raw
    return files


@pytest.mark.numerics
def test_heatmap_writer_one_png_per_finding_at_or_above_threshold(tmp_path):
    bright = np.full((64, 64), 0.5, np.float32)
    bright[8:24, 40:56], bright[40:56, 8:24] = 1.0, 0.0
    faint = np.full((64, 64), 0.5, np.float32)  # the same range, far fewer bright and dark pixels
    faint[40:44, 40:44], faint[0:4, 0:4] = 1.0, 0.0
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [_identified_dicom(folder / "scan_a.dcm", bright), _identified_dicom(folder / "scan_b.dcm", faint)]
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    paths.append(str(folder / "broken.dcm"))
    pre = Compose([LoadXrayd("image"), PercentileRescaled("image", lower=0.0, upper=100.0)])
    net, classes = _RegionNet().eval(), ["Bright", "Dark"]
    x = torch.stack([pre({"image": p})["image"].as_tensor() for p in paths[:2]])
    with torch.no_grad():
        p = torch.sigmoid(net(x)).numpy()
    assert p[0, 0] > p[1, 0] and p[:, 1].max() < 0.999
    # Bright: between the two images (one PNG); Dark: above both (none)
    thresholds = {"Bright": float(p[:, 0].mean()), "Dark": 0.999}
    out, csv_path = tmp_path / "heatmaps", tmp_path / "pred.csv"
    handlers = [HeatmapWriter(out, net, classes, enabled=True, thresholds=thresholds),
                PredictionCSVWriter(csv_path, classes)]
    ds = InferenceDataset([{"image": q} for q in paths], pre, placeholder_shape=(1, 64, 64))
    SupervisedEvaluator(device="cpu", val_data_loader=DataLoader(ds, batch_size=3, num_workers=0), network=net,
                        val_handlers=handlers).run()

    files = _assert_nothing_identifying(out)
    hid = heatmap_id(paths[0])
    assert sorted(os.path.relpath(f, out) for f in files) == sorted(
        ["heatmaps.csv", f"{hid}/Bright.png", f"{hid}/Bright.npy"])
    want = gradcam_pairs(net, x, [0], [0])[0].numpy()
    np.testing.assert_allclose(np.load(out / hid / "Bright.npy"), want, atol=1e-6)
    assert Image.open(out / hid / "Bright.png").mode in ("RGBA", "RGB")
    index = list(csv.DictReader(open(out / "heatmaps.csv")))
    assert [(r["image"], r["id"], r["finding"], r["png"]) for r in index] == [(paths[0], hid, "Bright", f"{hid}/Bright.png")]
    assert float(index[0]["probability"]) == pytest.approx(p[0, 0], abs=1e-6)
    rows = list(csv.DictReader(open(csv_path)))  # the CSV rows are written as before, the broken file's too
    assert [r["image"] for r in rows] == paths and rows[2]["error"] and rows[0]["error"] == ""

    # not enabled (the bundles' default): nothing attached, nothing written
    off = tmp_path / "off"
    SupervisedEvaluator(device="cpu", val_data_loader=DataLoader(ds, batch_size=3), network=net,
                        val_handlers=[HeatmapWriter(off, net, classes)]).run()
    assert not off.exists()


def test_explain_cli_end_to_end(tmp_path, capsys):
    from hmn.runs import write_run_record

    settings = {"class_names": ["Effusion", "Mass", "Nodule"], "in_channels": 1, "image_size": 32, "voi": "apply",
                "aspect": "stretch", "backbone": "convnext_tiny", "backbone_options": SCRATCH,
                "attention": ["self", "cross_scale"], "fpn_channels": 32, "fusion_channels": 32, "num_heads": 4,
                "context_size": 7, "dropout": 0.0, "hierarchical": False, "num_coarse_classes": 0,
                "label_vocabulary": None}
    kwargs = {k: settings[k] for k in ("in_channels", "backbone_options", "attention", "fpn_channels",
                                       "fusion_channels", "num_heads", "context_size", "dropout")}
    torch.manual_seed(2)
    net = HybridMedNet("convnext_tiny", num_classes=3, img_size=32, **kwargs).eval()
    (tmp_path / "b" / "models").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "b" / "models" / "model.pt")
    write_run_record(tmp_path / "b" / "models", settings)
    image = np.random.default_rng(1).uniform(0.2, 0.8, (48, 40)).astype(np.float32)
    dicom = _identified_dicom(tmp_path / "scan.dcm", image)
    out = tmp_path / "out"

    code = explain_main([dicom, "--bundle-root", str(tmp_path / "b"), "--out", str(out), "--findings", "Nodule",
                         "Effusion", "--thresholds", "0", "--rollout"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    hid = heatmap_id(dicom)
    assert f"{hid}/Nodule.png" in printed and f"{hid}/Effusion.png" in printed and "Mass.png" not in printed
    files = _assert_nothing_identifying(out)
    assert sorted(os.path.relpath(f, out) for f in files) == sorted(
        ["heatmaps.csv"] + [f"{hid}/{n}" for n in ("Effusion.png", "Effusion.npy", "Nodule.png", "Nodule.npy",
                                                    "attention_rollout.png", "attention_rollout.npy")])
    # the maps are those of the recorded network on the bundle's preprocessing, rebuilt here independently
    x = Compose([LoadXrayd("image", spatial_size=(32, 32), resize_mode="area"), PercentileRescaled("image")])(
        {"image": dicom})["image"].as_tensor()[None]
    want = gradcam(net, x, [0, 2])[0].numpy()
    np.testing.assert_allclose(np.load(out / hid / "Effusion.npy"), want[0], atol=1e-5)
    np.testing.assert_allclose(np.load(out / hid / "Nodule.npy"), want[1], atol=1e-5)

    assert explain_main([dicom, "--bundle-root", str(tmp_path / "b"), "--findings", "Nodul"]) == 1
    assert "'Nodul'" in capsys.readouterr().err
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)
    assert explain_main([str(tmp_path / "broken.dcm"), "--bundle-root", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "broken.dcm" in err and len(err.strip().splitlines()) == 1


def test_a_3d_bundle_is_refused_with_what_heatmaps_are_for(tmp_path):
    """Grad-CAM overlays are drawn on radiographs; a volume bundle gets a one-line reason, before any file is read."""
    from hmn.explain import explain_image

    net = HybridMedNet("convnext3d_tiny", num_classes=2, img_size=[32, 32, 32], attention=["none"]).eval()
    bundle = {"network": net, "preprocessing": lambda d: pytest.fail("the volume was read"), "class_names": ["a", "b"],
              "image_size": [32, 32, 32]}
    with pytest.raises(ValueError, match="3D bundle.*radiographs"):
        explain_image(bundle, tmp_path / "ct.nii.gz", tmp_path / "out")
    assert not (tmp_path / "out").exists()
