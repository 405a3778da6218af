"""Heatmaps in the source file's geometry (hmn.explain.SourceGeometry, maps_to_source, HeatmapWriter(geometry=
"source")) and the DICOM UIDs of heatmaps.csv.

The expectations are worked by hand from the loader's documented resize: a 48 x 96 (rows x columns) image loaded at
32 x 32 is scaled by 2/3 and 1/3 (``stretch``); by 1/3 to 16 x 32 and padded with 8 rows above and below
(``pad``); by 2/3 to 32 x 64 with the centre 32 columns kept, source columns 24 to 71 (``crop``). Taken back, the
network's input must equal torch's own bilinear resampling (``align_corners=False``) of its image part to the
source's size, and a bright square drawn in the file must come back where it was drawn."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pydicom
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
    HEATMAP_INDEX_COLUMNS,
    SourceGeometry,
    _native_layout,
    append_index,
    explain_image,
    gradcam_pairs,
    heatmap_id,
    index_to_source,
    maps_to_source,
    render_overlay,
)
from hmn.handlers import HeatmapWriter, PredictionCSVWriter
from hmn.inference import DICOM_UID_COLUMNS, InferenceDataset
from hmn.networks.attention import AttentionStack
from hmn.transforms import LoadXray, LoadXrayd, PercentileRescaled

ROWS, COLS, SIZE = 48, 96, 32
SQUARE = (slice(12, 36), slice(32, 56))  # inside every view, the crop's included
LEFT = (slice(20, 28), slice(4, 16))  # in the columns the crop cuts off
OLD_COLUMNS = ["image", "id", "finding", "probability", "threshold", "png", "npy"]  # heatmaps.csv before the UIDs


def _source() -> np.ndarray:
    img = np.zeros((ROWS, COLS), np.float32)
    img[SQUARE] = 1.0
    img[LEFT] = 1.0
    return img


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("png") / "square.png"
    Image.fromarray((_source() * 200).astype(np.uint8)).save(path)
    return str(path)


def _reference(x: torch.Tensor, aspect: str) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The input taken back by hand: its image part resampled by torch to the part of the source it shows."""
    x = x[None].float()

    def resample(part: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        return F.interpolate(part, size, mode="bilinear", align_corners=False)[0, 0].numpy()

    if aspect == "stretch":
        return resample(x, (ROWS, COLS)), (slice(None), slice(None))
    if aspect == "pad":  # rows 8..23 of the input hold the image
        return resample(x[:, :, 8:24], (ROWS, COLS)), (slice(None), slice(None))
    # crop: the input shows source columns 24..71, all rows
    return resample(x, (ROWS, 48)), (slice(None), slice(24, 72))


@pytest.mark.parametrize("aspect", ["stretch", "pad", "crop"])
def test_the_network_input_taken_back_lands_on_the_source_pixels(png, aspect):
    loader = LoadXrayd("image", spatial_size=(SIZE, SIZE), aspect=aspect, resize_mode="area")
    x = loader({"image": png})["image"]
    assert tuple(x.shape) == (1, SIZE, SIZE)
    source, scale, offset = SourceGeometry(Compose([loader])).load(png, x.shape[1:])
    assert source.shape == (1, ROWS, COLS)
    np.testing.assert_array_equal(source[0], _source() * 200)  # the file's own pixels, for the overlay

    back = maps_to_source(x[0].numpy(), (ROWS, COLS), scale, offset)  # a "heatmap" that is the input itself
    assert back.shape == (ROWS, COLS) and back.dtype == np.float32
    want, seen = _reference(x.as_tensor(), aspect)
    np.testing.assert_allclose(back[seen], want, rtol=1e-5, atol=1e-3)
    nan = np.isnan(back)
    if aspect == "crop":  # the columns the crop cut off have no value, the others all have one
        assert nan[:, :24].all() and nan[:, 72:].all() and not nan[:, 24:72].any()
    else:
        assert not nan.any()

    # the square comes back where it was drawn: half the bright value as the edge, within a source pixel or two
    bright = np.nan_to_num(back, nan=0.0) > 100.0
    drawn = np.zeros((ROWS, COLS), bool)
    drawn[SQUARE] = True
    seen_square = bright[SQUARE]
    assert seen_square.mean() > 0.75
    rr, cc = np.nonzero(bright[:, 24:72])
    assert abs(rr.mean() - 23.5) < 1.0 and abs(cc.mean() + 24 - 43.5) < 1.0
    outside = bright & ~drawn
    outside[LEFT] = False
    assert outside.sum() <= 0.25 * drawn.sum()
    # the square the crop cuts off: seen (bright) after stretch and pad, no value after crop
    assert np.isnan(back[LEFT]).all() if aspect == "crop" else bright[LEFT].mean() > 0.5


def test_index_to_source_reads_scale_and_shift_and_refuses_a_rotation():
    src = np.diag([0.2, 0.3, 1.0, 1.0])
    src[:2, 3] = [5.0, -2.0]
    step = np.diag([3.0, -1.5, 1.0, 1.0])  # input index -> source index: scaled, the columns flipped, then shifted
    step[:2, 3] = [-1.0, 95.25]
    scale, offset = index_to_source(src @ step, src)
    np.testing.assert_allclose(scale, [3.0, -1.5])
    np.testing.assert_allclose(offset, [-1.0, 95.25])
    # a flipped axis is taken back pixel for pixel: input column j sits at source column 95.25 - 1.5 j
    back = maps_to_source(np.tile(np.arange(64, dtype=np.float32), (16, 1)), (48, 96), scale, offset)
    c = np.arange(96)
    j = (c - 95.25) / -1.5
    ok = (j >= -0.5) & (j <= 63.5)
    np.testing.assert_allclose(back[5, ok], np.clip(j[ok], 0, 63), atol=1e-4)
    assert np.isnan(back[:, ~ok]).all()
    rot = np.eye(4)
    rot[:2, :2] = [[0.0, 1.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match="scaled and shifted"):
        index_to_source(src @ rot, src)


def test_a_preprocessing_that_resizes_after_the_loader_is_refused(png):
    loader = LoadXrayd("image", spatial_size=(SIZE, SIZE))
    with pytest.raises(ValueError, match="after LoadXrayd"):
        SourceGeometry(Compose([loader])).load(png, (16, 16))
    with pytest.raises(ValueError, match="LoadXray"):
        SourceGeometry(Compose([PercentileRescaled("image")]))


def test_the_native_overlay_shows_the_source_pixel_for_pixel():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, (40, 70)).astype(np.float32)
    heat = np.zeros((40, 70), np.float32)
    heat[:, :10] = np.nan  # not seen by the network
    heat[:, 60:] = np.nan
    heat[10:20, 30:40] = 1.0
    data = render_overlay(image, heat, "Bright   p = 0.90", native=True)
    png = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    lay = _native_layout(40, 70)
    assert png.shape[:2] == (lay["height"], lay["width"])
    shown = png[lay["top"] : lay["top"] + 40, lay["left"] : lay["left"] + 70].astype(int)
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.rint(np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(int)
    plain = heat == 0.0  # no colour: the image's own grey, at the same pixel
    plain[[0, -1], :] = False  # the dashed frame of the view runs along columns 10 and 59 and rows 0 and 39
    plain[:, [10, 59]] = False
    for ch in range(3):  # within one grey level (rounding)
        np.testing.assert_allclose(shown[..., ch][plain], grey[plain], atol=1)
    unseen = np.isnan(heat)
    unseen[[0, -1], :] = False
    np.testing.assert_allclose(shown[..., 0][unseen], grey[unseen], atol=1)  # NaN: uncoloured too
    assert (shown[0, 10] == 255).all() and (shown[5, 59] == 255).all()  # the frame's first dashes
    hot = shown[12:18, 32:38]
    assert (np.abs(hot[..., 0] - hot[..., 2]) > 60).all()  # coloured where the map is high


class _BrightNet(nn.Module):
    """A network shaped like HybridMedNet whose class 0 is the amount of bright (> 0.5) image and class 1 that of
    dark image, pooled at strides 8, 16 and 32: Grad-CAM of class 0 lives on the bright pixels."""

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


def _dicom(path) -> str:
    img = np.full((ROWS, COLS), 0.2, np.float32)
    img[SQUARE] = 0.9
    _write_dicom(str(path), img, np.random.default_rng(3), False, "ZZ1", "ZZ1_00")
    return str(path)


def _preprocessing(aspect: str = "pad") -> Compose:
    return Compose([LoadXrayd("image", spatial_size=(SIZE, SIZE), aspect=aspect, dicom_tags=list(DICOM_UID_COLUMNS)),
                    PercentileRescaled("image", lower=0.0, upper=100.0)])


def test_heatmap_writer_in_the_source_geometry_with_dicom_uids(tmp_path, png):
    dicom = _dicom(tmp_path / "a.dcm")
    pre, net = _preprocessing("pad"), _BrightNet().eval()
    ds = InferenceDataset([{"image": dicom}, {"image": png}], pre, placeholder_shape=(1, SIZE, SIZE),
                          keep_meta=["filename_or_obj", *DICOM_UID_COLUMNS])
    out = tmp_path / "heatmaps"
    handlers = [HeatmapWriter(out, net, ["Bright", "Dark"], enabled=True, findings=["Bright"], thresholds=0.0,
                              geometry="source"),  # the loader: the engine's dataset's transform
                PredictionCSVWriter(tmp_path / "pred.csv", ["Bright", "Dark"])]
    SupervisedEvaluator(device="cpu", val_data_loader=DataLoader(ds, batch_size=2, num_workers=0), network=net,
                        val_handlers=handlers).run()

    index = list(csv.DictReader(open(out / "heatmaps.csv")))
    assert list(index[0]) == list(HEATMAP_INDEX_COLUMNS)
    assert [r["image"] for r in index] == [dicom, png] and {r["geometry"] for r in index} == {"source"}
    ds_file = pydicom.dcmread(dicom)
    assert [index[0][c] for c in DICOM_UID_COLUMNS] == [str(ds_file.StudyInstanceUID), str(ds_file.SeriesInstanceUID),
                                                        str(ds_file.SOPInstanceUID)]
    assert [index[1][c] for c in DICOM_UID_COLUMNS] == ["", "", ""]  # a PNG has none

    x = pre({"image": dicom})["image"].as_tensor()
    m = np.load(out / heatmap_id(dicom) / "Bright.npy")
    assert m.shape == (ROWS, COLS) and not np.isnan(m).any()
    # the input-geometry map's image rows (8..23 after the pad), resampled by torch to the file's size
    cam = gradcam_pairs(net, x[None], [0], [0])[0]
    want = F.interpolate(cam[None, None, 8:24], (ROWS, COLS), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(m, want, atol=1e-5)
    r, c = np.unravel_index(np.argmax(m), m.shape)
    assert SQUARE[0].start <= r < SQUARE[0].stop and SQUARE[1].start <= c < SQUARE[1].stop
    drawn = np.zeros((ROWS, COLS), bool)
    drawn[SQUARE] = True
    assert m[drawn].mean() > 3 * m[~drawn].mean()

    # the overlay: the file's own pixels (as the loader reads them, VOI applied) at its own size where the map is 0
    shown = np.asarray(Image.open(out / heatmap_id(dicom) / "Bright.png").convert("RGB")).astype(int)
    lay = _native_layout(ROWS, COLS)
    assert shown.shape[:2] == (lay["height"], lay["width"])
    src = LoadXray()(dicom)[0].numpy()
    lo, hi = np.percentile(src, [0.5, 99.5])
    grey = np.rint(np.clip((src - lo) / (hi - lo), 0, 1) * 255).astype(int)
    zero = m == 0.0
    assert zero.sum() > 200
    region = shown[lay["top"] : lay["top"] + ROWS, lay["left"] : lay["left"] + COLS, 1]
    np.testing.assert_allclose(region[zero], grey[zero], atol=1)
    text = open(out / "heatmaps.csv").read() + "".join(os.listdir(out))
    assert "ZZ1" not in text  # the synthetic PatientID: in no name and no index


def test_explain_image_in_the_source_geometry_with_a_crop(tmp_path):
    dicom = _dicom(tmp_path / "b.dcm")
    bundle = {"network": _BrightNet().eval(), "preprocessing": _preprocessing("crop"),
              "class_names": ["Bright", "Dark"], "image_size": SIZE}
    result = explain_image(bundle, dicom, tmp_path / "out", findings=["Bright"], thresholds=0.0, geometry="source")
    m = np.load(tmp_path / "out" / heatmap_id(dicom) / "Bright.npy")
    assert m.shape == (ROWS, COLS)
    assert np.isnan(m[:, :24]).all() and np.isnan(m[:, 72:]).all() and not np.isnan(m[:, 24:72]).any()
    r, c = np.unravel_index(np.nanargmax(m), m.shape)
    assert SQUARE[0].start <= r < SQUARE[0].stop and SQUARE[1].start <= c < SQUARE[1].stop
    row = result["rows"][0]
    assert row["geometry"] == "source"
    assert row["SOPInstanceUID"] == str(pydicom.dcmread(dicom).SOPInstanceUID)


def test_an_index_of_an_older_version_is_refused_on_resume_and_replaced_otherwise(tmp_path):
    out = tmp_path / "heatmaps"
    out.mkdir()
    old = out / "heatmaps.csv"
    old.write_text(",".join(OLD_COLUMNS) + "\n/data/a.dcm,0123,Bright,0.9,0.5,0123/Bright.png,0123/Bright.npy\n")
    net = _BrightNet().eval()
    writer = HeatmapWriter(out, net, ["Bright", "Dark"], enabled=True, resume=True)
    with pytest.raises(ValueError, match=r"heatmaps\.csv has columns .*DICOM UID.*move it away"):
        writer.start()
    with pytest.raises(ValueError, match="DICOM UID"):
        append_index(old, [])
    assert old.read_text().startswith(",".join(OLD_COLUMNS))  # left as it was
    HeatmapWriter(out, net, ["Bright", "Dark"], enabled=True).start()  # a fresh run starts a new index
    assert not old.exists()
    with pytest.raises(ValueError, match="geometry must be one of"):
        HeatmapWriter(out, net, ["Bright", "Dark"], geometry="native")
