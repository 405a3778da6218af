"""The 3D (CT/MR volume) bundles end to end, as a user runs them: training on the synthetic demo volumes with
the README's command, resume, evaluation (also by sliding windows), inference over a folder of NIfTI files and
DICOM series, and a packed bundle rebuilt elsewhere with the user's own classes, size and spacing.

Runs use small volumes (``SMALL``: the demo's whole 96 mm field of view resampled to 32 x 32 x 16 voxels of
3 x 3 x 6 mm) and a few iterations.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hmn.bundle import VOLUME_BUNDLES

ROOT = Path(__file__).resolve().parents[2]
SIZE = [32, 32, 16]
SPACING = [3.0, 3.0, 6.0]
SMALL = ["--image_size", json.dumps(SIZE), "--spacing", json.dumps(SPACING), "--batch_size", "4", "--num_workers", "0"]


def _configs(name: str, *files: str) -> str:
    paths = [f"bundles/{name}/configs/{f}.json" for f in files]
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out


def _bundle(run_id: str, config: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo3d(demo3d_datalist):
    """40 demo volumes (conftest.py), shared with the zoo checks."""
    return demo3d_datalist


@pytest.fixture(scope="module")
def trained3d(tmp_path_factory, demo3d):
    """convnext3d_tiny trained for 2 epochs with the README's command on the demo volumes; its bundle_root."""
    root = tmp_path_factory.mktemp("convnext3d_tiny")
    _run(_bundle("training", _configs("convnext3d_tiny", "train"), "--datalist", demo3d, "--bundle_root", str(root),
                 "--max_epochs", "2", *SMALL))
    return root


def test_training_records_the_volume_settings_and_the_curve(trained3d, demo3d):
    record = json.load(open(trained3d / "models" / "run.json"))["settings"]
    assert record["image_size"] == SIZE and record["spacing"] == SPACING
    assert record["intensity"] == "ct" and record["window"] == [40, 400]
    assert "voi" not in record and "aspect" not in record
    assert record["backbone"] == "convnext3d_tiny"
    assert record["class_names"] == json.load(open(demo3d))["class_names"]
    history = _read_csv(trained3d / "runs" / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(0.0 <= float(r["val_auc"]) <= 1.0 for r in history)
    # the test-split report written after training
    assert (trained3d / "runs" / "eval" / "metrics.json").is_file()


@pytest.mark.slow  # 14 s; the 2D bundles' run-record checks run by default
def test_resume_with_a_changed_setting_warns_and_records_it(trained3d, demo3d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained3d, run)
    out = _run(_bundle("training", _configs("convnext3d_tiny", "train"), "--bundle_root", str(run), "--resume", "True",
                       "--max_epochs", "3", "--window", "[50, 350]", "--num_workers", "0"))
    log = out.stdout + out.stderr
    assert "window" in log and "WARNING" in log
    record = json.load(open(run / "models" / "run.json"))
    # the recorded size and spacing were used without being given again; the changed window is named
    assert record["settings"]["image_size"] == SIZE and record["settings"]["spacing"] == SPACING
    assert record["starts"][-1]["changed"] == {"max_epochs": [2, 3], "window": [[40, 400], [50, 350]]}
    assert [r["epoch"] for r in _read_csv(run / "runs" / "history.csv")] == ["1", "2", "3"]
    # model.pt is a model of the recorded window: epoch 3's, the one validation under it
    best = torch.load(run / "models" / "model.pt", weights_only=True)
    last = torch.load(run / "models" / "checkpoint_epoch=3.pt", weights_only=True)["model"]
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    assert "best-model choice starts again" in log


def test_evaluation_and_sliding_window_evaluation(trained3d, demo3d, tmp_path):
    evaluate = _configs("convnext3d_tiny", "train", "evaluate")
    _run(_bundle("evaluating", evaluate, "--bundle_root", str(trained3d), "--n_bootstrap", "0",
                 "--eval_dir", str(tmp_path / "crop")))
    _run(_bundle("evaluating", evaluate, "--bundle_root", str(trained3d), "--n_bootstrap", "0",
                 "--eval_dir", str(tmp_path / "sw"), "--sliding_window", "True", "--sliding_window_aggregate", "mean"))
    test = json.load(open(demo3d))["test"]
    classes = json.load(open(demo3d))["class_names"]
    for sub in ("crop", "sw"):
        rows = _read_csv(tmp_path / sub / "predictions.csv")
        assert sorted(r["image"] for r in rows) == sorted(os.path.join(os.path.dirname(demo3d), e["image"])
                                                           if not os.path.isabs(e["image"]) else e["image"] for e in test)
        assert all(0.0 <= float(r[f"{c}_prob"]) <= 1.0 for r in rows for c in classes)


def test_inference_over_a_folder_of_nifti_files_and_dicom_series(trained3d, demo3d, tmp_path):
    from hmn.data.datalist import find_volumes

    folder = os.path.dirname(demo3d)
    volumes = find_volumes(folder)
    series = [v for v in volumes if os.path.isdir(v)]
    assert series and len(volumes) == 40  # every study once: a DICOM series is one item, not one per slice
    out = tmp_path / "pred.csv"
    ran = _run(_bundle("inference", _configs("convnext3d_tiny", "inference"), "--bundle_root", str(trained3d),
                       "--input", folder, "--output_file", str(out), "--batch_size", "5"))
    rows = _read_csv(out)
    assert sorted(r["image"] for r in rows) == sorted(volumes)
    assert all(r["error"] == "" for r in rows)
    # progress in the log (issue 28): counts and the time left at 10, 25, 50 and 75 % (the first batch of 5 at or past
    # each), then the total
    log = ran.stdout + ran.stderr
    shares = [int(d) for d in re.findall(r"inference: (\d+)/40 volumes \(\d+%\), \d+ s so far, about \d+ (?:s|min) left "
                                         r"\(around \d\d:\d\d\)", log)]
    assert shares == [5, 10, 20, 30], log[-3000:]
    assert re.search(r"inference: 40 volumes in \d+ (?:s|min) \([\d.]+ volumes/s\)", log)
    bad = subprocess.run(_bundle("inference", _configs("convnext3d_tiny", "inference"), "--bundle_root", str(trained3d),
                                 "--input", folder, "--output_file", str(tmp_path / "h.csv"), "--heatmaps", "True"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "heatmaps" in bad.stderr.strip().splitlines()[-1]


def test_inference_gives_files_that_are_not_volumes_an_error_row(trained3d, demo3d, tmp_path):
    """A 4D NIfTI (nibabel's two-volume example) and a one-slice DICOM series among the studies: each gets an
    error row saying what it is; the run finishes and the real volumes are predicted."""
    import nibabel

    volumes = os.path.join(os.path.dirname(demo3d), "volumes")
    folder = tmp_path / "in"
    folder.mkdir()
    for name in [n for n in sorted(os.listdir(volumes)) if n.endswith(".nii.gz")][:2]:
        shutil.copy(os.path.join(volumes, name), folder / name)
    shutil.copy(os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "example4d.nii.gz"), folder / "fmri.nii.gz")
    series = next(os.path.join(volumes, n) for n in sorted(os.listdir(volumes)) if not n.endswith(".nii.gz"))
    (folder / "one_slice").mkdir()
    shutil.copy(os.path.join(series, sorted(os.listdir(series))[0]), folder / "one_slice" / "IM0001.dcm")
    out = tmp_path / "pred.csv"
    _run(_bundle("inference", _configs("convnext3d_tiny", "inference"), "--bundle_root", str(trained3d),
                 "--input", str(folder), "--output_file", str(out)))
    rows = {os.path.basename(r["image"]): r for r in _read_csv(out)}
    assert len(rows) == 4
    assert "is a 4D file of 2 volumes" in rows["fmri.nii.gz"]["error"]
    assert "is a single slice" in rows["one_slice"]["error"]
    assert sum(r["error"] == "" for r in rows.values()) == 2


@pytest.mark.slow  # about a minute; the 2D bundle's gloo training and torchrun inference run by default
def test_multi_process_training_and_inference_on_gloo(trained3d, demo3d, tmp_path):
    """The 3D bundle's multi_gpu_train.json and multi_gpu_inference.json under torchrun, two gloo processes on
    the CPU: the training saves an unwrapped model and one history; the inference's merged CSV equals a single
    process's predictions over the same folder of NIfTI files and DICOM series."""
    root = tmp_path / "ddp"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
          "-m", "monai.bundle", "run", "training", "--config_file", _configs("convnext3d_tiny", "train", "multi_gpu_train"),
          "--datalist", demo3d, "--bundle_root", str(root), "--max_epochs", "1", *SMALL])
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)
    assert [r["epoch"] for r in _read_csv(root / "runs" / "history.csv")] == ["1"]

    folder = tmp_path / "in"
    folder.mkdir()
    studies = sorted(os.listdir(os.path.join(os.path.dirname(demo3d), "volumes")))
    series = [s for s in studies if not s.endswith(".nii.gz")][:1]
    for name in [s for s in studies if s.endswith(".nii.gz")][:4] + series:
        src = os.path.join(os.path.dirname(demo3d), "volumes", name)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, folder / name)
    assert series
    single, merged = tmp_path / "single.csv", tmp_path / "merged.csv"
    common = ["--bundle_root", str(trained3d), "--input", str(folder)]
    _run(_bundle("inference", _configs("convnext3d_tiny", "inference"), *common, "--output_file", str(single)))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543",
          "-m", "monai.bundle", "run", "inference", "--config_file",
          _configs("convnext3d_tiny", "inference", "multi_gpu_inference"), *common, "--output_file", str(merged)])
    want, got = _read_csv(single), _read_csv(merged)
    assert len(want) == 5 and [r["image"] for r in got] == sorted(r["image"] for r in want)
    by_image = {r["image"]: r for r in want}
    classes = json.load(open(demo3d))["class_names"]
    for row in got:
        assert row["error"] == by_image[row["image"]]["error"] == ""
        # not bit-exact: each process predicts its share in batches of other shapes than the single run, and the CPU's
        # 3D convolution kernels (oneDNN, AVX-512 or AVX2, per batch shape and thread count) sum in other orders: a
        # stand-in convnext3d_tiny (pool stem, cbam, calibrated BatchNorm) moved by up to 5.8e-7 between batches of
        # 5, 3 + 2 and 1 (AVX2 kernels; 3.6e-7 with AVX-512). 1e-5 is about 170 float32 ulps at p = 0.5, far below
        # what another volume, preprocessing or weight would move.
        for c in classes:
            assert float(row[c]) == pytest.approx(float(by_image[row["image"]][c]), abs=1e-5), (row["image"], c)
    assert not [p.name for p in tmp_path.iterdir() if ".rank" in p.name]


def test_a_last_batch_of_one_volume_does_not_stop_training(demo3d, tmp_path):
    """9 training volumes at batch 4 leave one for the last batch; at 32 x 32 x 16 the last stage is one voxel,
    where BatchNorm (the from-scratch recipe) cannot normalize a single item in training mode ("Expected more
    than 1 value per channel when training" at the end of the epoch). That volume waits for another epoch."""
    from monai.bundle import run

    from hmn.data import load_datalist
    from hmn.workflows import drop_last_batch

    data = load_datalist(demo3d)
    nine = {"class_names": data["class_names"], "training": data["training"][:9], "validation": data["validation"],
            "test": data["test"]}
    datalist = tmp_path / "nine.json"
    datalist.write_text(json.dumps(nine))
    run("training", config_file=str(ROOT / _configs("convnext3d_tiny", "train")), datalist=str(datalist),
        bundle_root=str(tmp_path / "b"), max_epochs=1, image_size=SIZE, spacing=SPACING, batch_size=4, cache="none",
        num_workers=0, evaluate_after_training=False)
    state = torch.load(tmp_path / "b" / "models" / "checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["epoch_length"] == 2  # two full batches; the ninth volume is left for another epoch
    assert [drop_last_batch(n, 4, world_size=1) for n in (4, 5, 6, 8, 9, 1)] == [False, True, False, False, True, False]
    # a DistributedSampler gives each of 2 processes ceil(n / 2): 5 of 9 or 10, 3 of 6, 4 of 8
    assert [drop_last_batch(n, 4, world_size=2) for n in (9, 10, 6, 8)] == [True, True, False, False]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "swin3d_small" else n
                                  for n in VOLUME_BUNDLES if n != "convnext3d_tiny"])  # swin3d_small: 10 s
def test_every_other_volume_bundle_trains(name, demo3d, tmp_path):
    from monai.bundle import run

    run("training", config_file=str(ROOT / _configs(name, "train")), datalist=demo3d, bundle_root=str(tmp_path),
        max_epochs=1, image_size=SIZE, spacing=SPACING, batch_size=2, cache="none", num_workers=0,
        evaluate_after_training=False)
    assert (tmp_path / "models" / "model.pt").is_file()
    assert [r["epoch"] for r in _read_csv(tmp_path / "runs" / "history.csv")] == ["1"]


@pytest.mark.slow  # half a minute; the 2D bundle's reuse rehearsal runs by default
def test_reuse_rehearsal_packed_volume_bundle_rebuilds_the_trained_model(demo3d, tmp_path):
    """A user's run (two classes named otherwise than the demo's, in another order, their own size and spacing,
    MR-style percentile normalisation) is trained, packed, loaded with monai.bundle.load, and run for inference
    from the unpacked bundle with no setting given: every prediction equals the trained model's own, computed
    here from model.pt and the settings written out in this test; so do the logits of the packed models/model.ts."""
    import zipfile

    from monai.bundle import load
    from scipy.special import expit

    from hmn.data import load_datalist
    from hmn.networks import HybridMedNet
    from hmn.transforms import volume_compose

    data = load_datalist(demo3d)
    src = data["class_names"]
    picks = {"Liver enlarged": src.index("Hepatomegaly"), "Low-density lesion": src.index("Hypodense lesion")}
    user = {"class_names": list(picks)}
    for split in ("training", "validation", "test"):
        user[split] = [{"image": e["image"], "label": [e["label"][k] for k in picks.values()], "patient_id": e["patient_id"]}
                       for e in data[split]]
    datalist = tmp_path / "user.json"
    datalist.write_text(json.dumps(user))
    size, spacing = [32, 32, 16], [3.5, 3.5, 6.0]
    run = tmp_path / "run"
    _run(_bundle("training", _configs("convnext3d_tiny", "train"), "--datalist", str(datalist), "--bundle_root", str(run),
                 "--max_epochs", "1", "--image_size", json.dumps(size), "--spacing", json.dumps(spacing),
                 "--intensity", "mr", "--percentiles", "[2, 98]", "--batch_size", "4", "--num_workers", "0",
                 "--evaluate_after_training", "False"))
    out = subprocess.run([sys.executable, "-m", "hmn", "pack-bundle", "convnext3d_tiny", str(tmp_path / "p.zip"),
                          "--models-dir", str(run / "models")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        zf.extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / "convnext3d_tiny"
    meta = json.load(open(bundle / "configs" / "metadata.json"))["network_data_format"]
    assert meta["inputs"]["image"]["spatial_shape"] == size
    assert meta["outputs"]["pred"]["channel_def"] == {"0": "Liver enlarged", "1": "Low-density lesion"}

    net = load(name="convnext3d_tiny", bundle_dir=str(tmp_path / "unpacked"), workflow_type="inference", device="cpu")
    want = torch.load(run / "models" / "model.pt", weights_only=True)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)

    # the settings written out here, independently of the bundle's configs
    scratch = {"norm": "batch", "ls_init_value": 1.0, "stem": "pool", "stem_stride": [4, 4, 2]}
    ref = HybridMedNet("convnext3d_tiny", num_classes=2, in_channels=1, img_size=size, attention=["cbam"],
                       backbone_options=scratch).eval()
    ref.load_state_dict(want, strict=True)
    pre = volume_compose(spacing=spacing, spatial_size=size, intensity="mr", percentiles=(2, 98))
    root = os.path.dirname(demo3d)
    test = [e["image"] if os.path.isabs(e["image"]) else os.path.join(root, e["image"]) for e in user["test"]]
    with torch.no_grad():
        images = torch.stack([torch.as_tensor(pre({"image": p})["image"]) for p in test]).float()
        expected = expit(ref(images).double().numpy())
    _run(_bundle("inference", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                 "--input", str(datalist), "--output_file", str(tmp_path / "pred.csv")))
    rows = {r["image"]: r for r in _read_csv(tmp_path / "pred.csv")}
    # not bit-exact: the bundle predicts in batches of another composition than this one batch of the whole test
    # split (and in a process of its own thread count), and the CPU's 3D convolution kernels (oneDNN, AVX-512 or AVX2,
    # per batch shape and thread count) sum in other orders; a stand-in of this network moved by up to 5.8e-7 in
    # probability between batch compositions (see test_multi_process_training_and_inference_on_gloo). 1e-5 is about
    # 170 float32 ulps at p = 0.5, far below what a wrong size, spacing, intensity setting or weight would move.
    for path, p in zip(test, expected):
        np.testing.assert_allclose([float(rows[path][c]) for c in picks], p, rtol=0, atol=1e-5)

    # models/model.ts (scripted, for MONAI Deploy): the packed configs inside, and the logits of the network
    # monai.bundle.load built from them and model.pt, and of `ref`, on the same test volumes in this process (the
    # same kernels: equal but for summation order, hmn.bundle.TORCHSCRIPT_RTOL, far below a wrong export's effect)
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    for key in extra:
        assert json.loads(extra[key]) == json.load(open(bundle / "configs" / key)), key
    with torch.no_grad():
        got = scripted(images)
        torch.testing.assert_close(got, net.eval()(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, ref(images), rtol=1e-4, atol=1e-5)
