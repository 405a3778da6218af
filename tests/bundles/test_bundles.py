"""The MONAI bundles end to end: generation, MONAI's own tooling, training (every bundle), resume after a
kill, multi-process training, evaluation and inference files checked for content, export, download and load.

Runs use the synthetic demo data at 64x64 with a few iterations, from the repository root, through
``python -m monai.bundle`` exactly as the README says (with overrides).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hmn.bundle import BUNDLES, VOLUME_BUNDLES, check_bundles, download_bundle, pack_bundle

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
SMALL = ["--image_size", str(SIZE), "--batch_size", "8", "--num_workers", "0"]
# what the ConvNeXt bundles build when trained from scratch (hmn/bundle/table.py), written out here independently
SCRATCH = {"norm": "batch", "ls_init_value": 1.0, "stem": "conv"}


def _configs(name: str, *files: str) -> str:
    paths = [f"bundles/{name}/configs/{f}.json" for f in files]
    return paths[0] if len(paths) == 1 else "[" + ",".join(f"'{p}'" for p in paths) + "]"


def _bundle_cmd(run_id: str, config: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# demo_datalist (80 demo images at SIZE) and trained (convnext_tiny, 2 epochs) are in conftest.py


@pytest.fixture(scope="session")
def tiny_datalist(demo_datalist, tmp_path_factory):
    """8 training and 4 validation images of the demo set: two iterations per epoch at batch 4."""
    from hmn.data import load_datalist

    data = load_datalist(demo_datalist)
    small = {"class_names": data["class_names"], "training": data["training"][:8],
             "validation": data["validation"][:4], "test": data["test"][:4]}
    path = tmp_path_factory.mktemp("tiny") / "datalist.json"
    path.write_text(json.dumps(small))
    return str(path)


def test_committed_bundles_match_the_generator():
    assert check_bundles(ROOT / "bundles") == []
    assert sorted(p.name for p in (ROOT / "bundles").iterdir() if p.is_dir()) == sorted(BUNDLES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("convnext_large", "efficientnetv2_l")
                                  else n for n in BUNDLES])  # the two largest: 5 s
def test_bundle_is_valid_for_monai_tooling(name, datalist_for, size_for):
    from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata

    datalist, size = datalist_for(name), size_for(name)
    for f in (ROOT / "bundles" / name / "configs").glob("*.json"):
        ConfigParser.load_config_file(f)  # valid JSON that MONAI reads
    verify_metadata(meta_file=str(ROOT / f"bundles/{name}/configs/metadata.json"),
                    filepath=str(ROOT / "bundles/meta_schema.json"))
    for wtype, cfg in (("train", "train"), ("infer", "inference")):
        # the inference default input is the demo folder in the user's cache, which a fresh machine lacks
        overrides = ({"datalist": datalist, "image_size": size} if wtype == "train"
                     else {"image_size": size, "input": os.path.dirname(datalist)})
        workflow = ConfigWorkflow(config_file=str(ROOT / f"bundles/{name}/configs/{cfg}.json"), workflow_type=wtype,
                                  meta_file=str(ROOT / f"bundles/{name}/configs/metadata.json"), **overrides)
        workflow.initialize()
        assert workflow.check_properties() == [], f"{name} {cfg}.json"


def test_overrides_that_name_no_key_are_reported_with_the_closest_key(caplog):
    from hmn.bundle import check_overrides

    train = "bundles/convnext_tiny/configs/train.json"
    both = f"['{train}','bundles/convnext_tiny/configs/evaluate.json']"
    argv = ["run", "training", "--config_file", train, "--backbone", "convnext_tinyy", "--image_size", "128",
            "--imagesize=96", "--network_def#backbone", "swin_tiny", "--validate#best_saver#key_metric_n_saved", "2",
            "--learning_rat", "1e-3", "--meta_file", "m.json", "--amp", "--seed", "1"]
    with caplog.at_level("WARNING"):
        warnings = check_overrides(argv)
    assert [w.split(" ")[0] for w in warnings] == ["--backbone", "--imagesize", "--learning_rat"]
    assert warnings[0].endswith("did you mean --network_def#backbone?")
    assert warnings[1].endswith("did you mean --image_size?") and warnings[2].endswith("did you mean --learning_rate?")
    assert "--backbone is not a setting of this bundle" in caplog.text
    # keys that only the second config file defines are keys too
    assert check_overrides(["run", "evaluating", "--config_file", both, "--eval_split", "validation"]) == []
    assert check_overrides(["run", "evaluating", "--config_file", train, "--eval_split", "validation"])[0].startswith("--eval_split")
    # the settings MONAI's --tracking adds are read (they were warned about as unknown); without --tracking they are not
    tracking = ["--tracking_uri", "sqlite:///m.db", "--experiment_name", "x", "--run_name", "y"]
    assert check_overrides(["run", "training", "--config_file", train, "--tracking", "mlflow", *tracking]) == []
    assert [w.split(" ")[0] for w in check_overrides(["run", "training", "--config_file", train, *tracking])] == [
        "--tracking_uri", "--experiment_name", "--run_name"]
    # run from a Python program (not `python -m monai.bundle`): its command line is not the bundle's
    assert check_overrides() == []


@pytest.mark.parametrize("pretrained,expected", [(False, SCRATCH), (True, {}), ("/weights/convnext_tiny.pth", {}), ("false", SCRATCH)])
def test_pretrained_alone_builds_the_published_architecture(demo_datalist, pretrained, expected):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "convnext_tiny" / "configs" / "train.json"))
    parser.update({"datalist": demo_datalist, "pretrained": pretrained})
    assert parser.get_parsed_content("backbone_options") == expected


@pytest.mark.slow  # 39 s; resuming a run is checked by default in tests/bundles/test_graceful_stop.py
def test_resume_continues_the_recorded_run_at_its_image_size(demo_datalist, tmp_path):
    """Trained at 48 px for 1 epoch, resumed with only --max_epochs 2: the resumed run uses the recorded 48 px
    (the bundle's default is 224), and the record names what changed."""
    base = _bundle_cmd("training", _configs("convnext_tiny", "train"), "--datalist", demo_datalist, "--bundle_root",
                       str(tmp_path), "--batch_size", "8")
    _run(base + ["--max_epochs", "1", "--image_size", "48"])
    out = _run(base + ["--max_epochs", "2", "--resume", "True"])
    log = out.stdout + out.stderr
    assert "image_size" not in [line.split("=")[0].split()[-1] for line in log.splitlines() if "WARNING" in line]
    record = json.load(open(tmp_path / "models" / "run.json"))
    assert record["settings"]["image_size"] == 48 and record["settings"]["max_epochs"] == 2
    assert [s["changed"] for s in record["starts"]] == [{}, {"max_epochs": [1, 2]}]
    assert [r["epoch"] for r in _read_csv(tmp_path / "runs" / "history.csv")] == ["1", "2"]
    # a contradicting architecture on resume is refused, naming both values
    bad = subprocess.run(base + ["--max_epochs", "3", "--resume", "True", "--network_def#fpn_channels", "128"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode != 0 and "trained with fpn_channels=256, not 128" in bad.stderr
    # a resume on a datalist whose classes are in another order would pair labels and outputs wrongly
    data = json.load(open(demo_datalist))
    order = list(reversed(range(len(data["class_names"]))))
    swapped = {"class_names": [data["class_names"][i] for i in order]}
    for split in ("training", "validation", "test"):
        swapped[split] = [{**e, "label": [e["label"][i] for i in order]} for e in data[split]]
    other = Path(demo_datalist).parent / "swapped.json"
    other.write_text(json.dumps(swapped))
    bad = subprocess.run(base + ["--max_epochs", "3", "--resume", "True", "--datalist", str(other)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert bad.returncode != 0 and "error: RunRecordMismatchError: the model predicts" in bad.stderr


def test_a_misspelt_setting_ends_the_output_with_one_readable_line(demo_datalist, tmp_path):
    """A misspelt backbone under network_def and a missing datalist: MONAI's traceback ends with "Failed to
    instantiate component ..."; the last line is now the project's own sentence."""
    for overrides, expected in (
        (["--datalist", demo_datalist, "--network_def#backbone", "convnext_tinyy"],
         "error: ValueError: unknown backbone 'convnext_tinyy'; valid names: convnext_tiny,"),
        (["--datalist", str(tmp_path / "missing.json")], f"error: DatalistError: {tmp_path / 'missing.json'}: datalist file not found"),
    ):
        out = subprocess.run(_bundle_cmd("training", _configs("convnext_tiny", "train"), "--bundle_root", str(tmp_path / "run"),
                                         *overrides, *SMALL), cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode != 0
        assert out.stderr.strip().splitlines()[-1].startswith(expected)


def test_error_summary_picks_the_projects_own_sentence():
    from hmn.bundle import error_summary
    from hmn.networks.backbones import get_backbone_spec

    try:
        try:
            get_backbone_spec("resnet5")  # the project's ValueError, raised while handling a KeyError
        except ValueError as e:
            raise RuntimeError("Failed to instantiate component 'hmn.networks.HybridMedNet'") from e
    except RuntimeError as wrapped:
        assert error_summary(wrapped).startswith("error: ValueError: unknown backbone 'resnet5'; valid names:")
    assert error_summary(RuntimeError("outside the project")) is None


def test_cpu_bf16_switch_reaches_the_training_inferer_only():
    from monai.bundle import ConfigParser

    from hmn.workflows import CPUAutocastInferer, cpu_bf16_supported

    for override, expected in ((None, cpu_bf16_supported()), ("False", False), ("True", True)):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles/convnext_tiny/configs/train.json"))
        if override is not None:
            parser["cpu_bf16"] = override  # as `--cpu_bf16 False` sets it
        inferer = parser.get_parsed_content("train#inferer")
        assert isinstance(inferer, CPUAutocastInferer) and inferer.enabled is expected, override
        assert type(parser.get_parsed_content("validate#inferer")).__name__ == "SimpleInferer"


def test_readme_command_trains_and_records_the_curve(trained):
    models = sorted(p.name for p in (trained / "models").iterdir())
    assert models == ["checkpoint_epoch=2.pt", "model.pt", "model_final.pt", "run.json", "thresholds.json"]
    history = _read_csv(trained / "runs" / "history.csv")
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(0.0 <= float(r["val_auc"]) <= 1.0 for r in history)
    assert all(float(r["train_loss"]) > 0 for r in history)  # the epoch's mean training loss
    assert (trained / "runs" / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(trained / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model", "early_stop"}
    assert state["trainer"]["epoch_length"] > 0
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
    # model_final.pt: the network's weights at the end of training (MONAI FL's FINAL_MODEL), those of the last
    # epoch's checkpoint, not the best model (which the test report loaded into the same network afterwards)
    final = torch.load(trained / "models" / "model_final.pt", weights_only=True)
    assert final.keys() == state["model"].keys()
    assert all(torch.equal(final[k], state["model"][k]) for k in final)


# the 3D bundles' counterpart is test_bundles3d.py's test_every_other_volume_bundle_trains
RADIOGRAPH_BUNDLES = [n for n in BUNDLES if n not in VOLUME_BUNDLES]


# the larger variants of each family are left to the slow run (5-19 s each); the smaller siblings share their code
# (convnext_base, the main job's bundle, stays in the default run)
LARGEST = {"convnext_large", "efficientnetv2_m", "efficientnetv2_l", "swin_base", "vim_base",
           # the middle sizes too (CI's time budget): the smallest of each family, and convnext_base, train by default
           "convnext_small", "swin_small", "vim_small"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGEST else n
                                  for n in RADIOGRAPH_BUNDLES if n != "convnext_tiny"])
def test_every_other_bundle_trains(name, tiny_datalist, tmp_path):
    from monai.bundle import run

    run("training", config_file=str(ROOT / _configs(name, "train")), datalist=tiny_datalist,
        bundle_root=str(tmp_path), max_epochs=1, image_size=SIZE, batch_size=4, cache="none")
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
    assert (tmp_path / "models" / "model.pt").is_file()
    assert [r["epoch"] for r in _read_csv(tmp_path / "runs" / "history.csv")] == ["1"]


def test_accumulation_hierarchical_head_and_persistent_cache(tiny_datalist, tmp_path):
    """The train.json options the other runs leave at their defaults, through the bundle itself."""
    from monai.bundle import run

    from hmn.losses import fine_to_coarse_indices

    run("training", config_file=str(ROOT / _configs("convnext_tiny", "train")), datalist=tiny_datalist,
        bundle_root=str(tmp_path), max_epochs=2, image_size=SIZE, batch_size=2, cache="persistent",
        accumulation_steps=3, hierarchical=True)
    state = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    iterations = state["trainer"]["epoch_length"]
    assert iterations == 4  # 8 training images at batch 2
    # an optimizer step every 3 iterations and at the end of each epoch: 2 per epoch, not 4
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {2 * math.ceil(iterations / 3)}
    # the persistent cache holds one file per training image and per validation image
    cached = list((tmp_path / "runs" / "cache").rglob("*.pt"))
    assert len(cached) == 8 + 4
    # the hierarchical head: one logit per class, then one per coarse group
    classes = json.load(open(tiny_datalist))["class_names"]
    n_groups = len(fine_to_coarse_indices(classes)[1])
    head_bias = [v for k, v in state["model"].items() if k.startswith("head.") and k.endswith("bias")]
    assert sorted(b.numel() for b in head_bias) == sorted([len(classes), n_groups])


STOP_AT = ROOT / "tests" / "bundles" / "stop_at.py"

# (point, file, occurrence, the last finished epoch the resumed run must start after): a SIGKILL at each
# point of writing each kind of file a training run saves (see stop_at.py). Epoch 1's validation always
# stages a best model; its promotion to model.pt follows epoch 1's checkpoint.
KILL_POINTS = [
    ("mid-write", r"checkpoint_epoch=2\.pt", 1, 1),
    ("before-rename", r"checkpoint_epoch=2\.pt", 1, 1),
    ("after-rename", r"checkpoint_epoch=2\.pt", 1, 2),  # the old checkpoint still there, its best model not promoted
    ("mid-write", r"history\.csv", 2, 1),
    ("mid-write", r"\.model\.pt\.epoch=1\.staged", 1, 0),  # no epoch finished yet: starts from scratch
    ("before-rename", r"model\.pt", 1, 1),  # epoch 1's checkpoint is complete, its best model not yet model.pt
    # the validation thresholds staged with the best model, and their promotion right after model.pt's
    ("mid-write", r"\.thresholds\.json\.epoch=1\.staged", 1, 0),
    ("before-rename", r"thresholds\.json", 1, 1),
]


def _stopped_run(args: list[str], point: str, pattern: str, occurrence: int, log: Path) -> str:
    """Runs the bundle command until it reaches `point` of writing the chosen file, then SIGKILLs it there."""
    read_end, write_end = os.pipe()
    cmd = [sys.executable, str(STOP_AT), str(write_end), point, pattern, str(occurrence), "--", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(write_end,))
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 900)  # a deadline against a hang, not a timing assumption
        message = os.read(read_end, 4096).decode() if ready else ""
    finally:
        os.close(read_end)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert message.startswith("stopped "), f"the run never reached {point} of {pattern} #{occurrence}:\n{log.read_text()[-4000:]}"
    return message.split(" ", 1)[1].strip()


def _model_validation_auc(bundle_root: Path, datalist: str) -> float:
    """model.pt evaluated on the validation split with the bundle's evaluate workflow: its macro ROC AUC (over every
    class with both labels, as the validation metric averages: --min_positives 1)."""
    _run(_bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", datalist,
                     "--bundle_root", str(bundle_root), "--eval_split", "validation", "--n_bootstrap", "0",
                     "--min_positives", "1", "--eval_dir", str(bundle_root / "val_eval"), *SMALL))
    return json.load(open(bundle_root / "val_eval" / "metrics.json"))["macro"]["auc"]


@pytest.mark.slow
@pytest.mark.parametrize("point,pattern,occurrence,finished", KILL_POINTS,
                         ids=[f"{p}-{f.replace(chr(92), '')}-{n}" for p, f, n, _ in KILL_POINTS])
def test_killed_training_resumes_from_its_last_finished_epoch(demo_datalist, tmp_path, point, pattern, occurrence, finished):
    args = ["run", "training", "--config_file", _configs("convnext_tiny", "train"), "--datalist", demo_datalist,
            "--bundle_root", str(tmp_path), "--max_epochs", "3", *SMALL]
    models = tmp_path / "models"
    _stopped_run(args, point, pattern, occurrence, tmp_path / "killed.log")

    # what the kill left: every checkpoint and model.pt on disk is complete; the finished epoch's checkpoint is there
    complete = {p.name: torch.load(p, weights_only=True) for p in models.glob("*.pt")}
    if finished:
        assert complete[f"checkpoint_epoch={finished}.pt"]["trainer"]["iteration"] == finished * complete[
            f"checkpoint_epoch={finished}.pt"]["trainer"]["epoch_length"]
    history_path = tmp_path / "runs" / "history.csv"
    before = _read_csv(history_path) if history_path.exists() else []
    assert [int(r["epoch"]) for r in before] == list(range(1, len(before) + 1))  # whole rows only

    out = _run([sys.executable, "-m", "monai.bundle", *args, "--resume", "True"])
    log = out.stdout + out.stderr
    if finished:
        assert f"resuming from {models / f'checkpoint_epoch={finished}.pt'} (epoch {finished})" in log
    else:
        assert "starting from scratch" in log
    final = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 3 * final["trainer"]["epoch_length"]
    # nothing left over: no older checkpoint, no partial or staged file
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=3.pt", "model.pt", "run.json", "thresholds.json"]
    history = _read_csv(history_path)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert history[:finished] == before[:finished]  # the finished epochs' rows, unchanged
    elapsed = [float(r["elapsed_s"]) for r in history]
    assert elapsed == sorted(elapsed)  # training time goes on across the resume
    # model.pt is the best validated model: its record is the best score in the history, and evaluating
    # model.pt on the validation split gives that score
    best = max(float(r["val_auc"]) for r in history)
    (record,) = [v for k, v in final["best_model"].items() if k != "evaluator_best"]
    assert len(record) == 1 and record[0][0] == pytest.approx(best, abs=1e-12)
    # the evaluator's best across the resume is the same: its "Got new best metric" log agrees with model.pt
    aucs = [float(r["val_auc"]) for r in history]
    assert final["best_model"]["evaluator_best"] == [pytest.approx(best, abs=1e-12), 1 + aucs.index(best)]
    # the validation thresholds beside model.pt are those of model.pt's epoch, whatever the kill interrupted
    assert json.load(open(models / "thresholds.json"))["epoch"] == 1 + aucs.index(best)
    assert _model_validation_auc(tmp_path, demo_datalist) == pytest.approx(best, abs=1e-6)


def test_model_selection_with_a_class_absent_from_validation_and_masked_labels(demo_datalist, tmp_path):
    """Classes Effusion, Mass, Hernia: Hernia has 4 positives in training and none in validation, and some
    validation Effusion labels are masked (uncertain). MONAI's macro ROCAUC gave NaN every epoch and kept
    the epoch-1 model; the bundles' metric leaves Hernia and the masked labels out, as the report does."""
    from hmn.data import load_datalist

    data = load_datalist(demo_datalist)
    src = data["class_names"]
    keep = [src.index("Effusion"), src.index("Mass")]

    def entry(e, i, split):
        label = [e["label"][k] for k in keep] + [int(split == "training" and i < 4)]
        out = {"image": e["image"], "label": label, "patient_id": e["patient_id"]}
        if split == "validation":
            out["label_mask"] = [0 if i % 3 == 0 else 1, 1, 1]
        return out

    small = {"class_names": ["Effusion", "Mass", "Hernia"]}
    for split in ("training", "validation", "test"):
        small[split] = [entry(e, i, split) for i, e in enumerate(data[split])]
    datalist = tmp_path / "hernia.json"
    datalist.write_text(json.dumps(small))
    out = _run(_bundle_cmd("training", _configs("convnext_tiny", "train"), "--datalist", str(datalist),
                           "--bundle_root", str(tmp_path), "--max_epochs", "2", *SMALL))
    log = out.stdout + out.stderr
    assert "1 of 3 classes are left out of the validation macro ROC AUC" in log and "Hernia (no positive labels)" in log
    history = _read_csv(tmp_path / "runs" / "history.csv")
    scores = [float(r["val_auc"]) for r in history]
    assert len(scores) == 2 and all(math.isfinite(v) for v in scores)
    # the stored best is the best validated score, and model.pt evaluated by the report gives exactly it
    best = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=True)["best_model"]
    (record,) = [v for k, v in best.items() if k != "evaluator_best"]  # the saver's, ignite's key name
    assert record[0][0] == pytest.approx(max(scores), abs=1e-12)
    # the evaluator's own best (its "Got new best metric" log after a resume) is the same score, at its epoch
    assert best["evaluator_best"] == [pytest.approx(max(scores), abs=1e-12), 1 + scores.index(max(scores))]
    assert _model_validation_auc(tmp_path, str(datalist)) == pytest.approx(max(scores), abs=1e-6)
    report = json.load(open(tmp_path / "val_eval" / "metrics.json"))
    assert report["macro"]["classes"] == ["Effusion", "Mass"]


def test_training_stops_before_it_starts_when_no_validation_class_is_defined(demo_datalist, tmp_path):
    from hmn.data import load_datalist

    data = load_datalist(demo_datalist)
    data["validation"] = [{**e, "label": [0] * len(e["label"])} for e in data["validation"]]
    datalist = tmp_path / "no_positives.json"
    datalist.write_text(json.dumps(data))
    cmd = _bundle_cmd("training", _configs("convnext_tiny", "train"), "--datalist", str(datalist),
                      "--bundle_root", str(tmp_path), "--max_epochs", "1", *SMALL)
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "no class has both a positive and a negative label among the" in out.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_multi_process_training_on_gloo(demo_datalist, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "monai.bundle", "run", "training", "--config_file", _configs("convnext_tiny", "train", "multi_gpu_train"),
           "--datalist", demo_datalist, "--bundle_root", str(tmp_path), "--max_epochs", "1", *SMALL]
    _run(cmd)
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped: loads without DDP
    # one history row: the handlers that write files ran on rank 0 only
    assert [r["epoch"] for r in _read_csv(tmp_path / "runs" / "history.csv")] == ["1"]


def test_training_ends_with_the_best_model_evaluated_on_the_test_split(trained, demo_datalist):
    """The README's command leaves the report of model.pt on the test split in runs/eval/, written before the
    evaluate workflow ever runs (the fixture only trains)."""
    report = json.load(open(trained / "runs" / "eval" / "metrics.json"))
    assert report["n_images"] == len(json.load(open(demo_datalist))["test"])
    preds = _read_csv(trained / "runs" / "eval" / "predictions.csv")
    assert len(preds) == report["n_images"] and "age" in preds[0]
    # its thresholds are the validation split's, recorded with model.pt by training, not fitted on the test split
    recorded = json.load(open(trained / "models" / "thresholds.json"))
    assert recorded["source"] == "validation split" and recorded["epoch"] >= 1
    assert report["settings"]["threshold_method"] == "given"
    assert report["settings"]["thresholds_from"] == str(trained / "models" / "thresholds.json")
    assert not report["settings"]["thresholds_fitted_on_evaluated_data"]
    assert [c["threshold"] for c in report["per_class"]] == [c["threshold"] for c in recorded["per_class"]]
    assert not list((trained / "models").glob(".thresholds.json.*"))  # promoted with model.pt, nothing left staged
    # the patient is the unit of the intervals: the demo datalist carries patient ids
    assert report["settings"]["ci_unit"] == "patient" and "patient_id" in preds[0]


def test_recorded_thresholds_are_youden_on_the_validation_split(trained, demo_datalist):
    """models/thresholds.json holds Youden's thresholds of model.pt on the validation split: the same as an
    evaluation of model.pt on that split with --thresholds youden (fitted there, and marked optimistic)."""
    val_dir = trained / "runs" / "eval_val_youden"
    _run(_bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", demo_datalist,
                     "--bundle_root", str(trained), "--n_bootstrap", "0", "--eval_split", "validation",
                     "--thresholds", "youden", "--eval_dir", str(val_dir), *SMALL))
    val = json.load(open(val_dir / "metrics.json"))
    recorded = json.load(open(trained / "models" / "thresholds.json"))
    assert val["settings"]["thresholds_fitted_on_evaluated_data"]
    assert {r["threshold_source"] for r in _read_csv(val_dir / "metrics.csv")} == {"fitted on the evaluated data (optimistic)"}
    for got, want in zip(recorded["per_class"], val["per_class"]):
        # the same model on the same images, in another process: equal scores up to float32 rounding (see the
        # reuse rehearsal), so equal Youden thresholds up to that rounding
        assert (got["threshold"] is None) == (want["threshold"] is None)
        if got["threshold"] is not None:
            assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-5)


def test_an_unreadable_test_image_is_left_out_and_named_never_replaced(trained, demo_datalist, tmp_path):
    """A truncated PNG in the test split: each readable image is evaluated once, the bad one is listed under
    skipped_images with its error, and n_images counts what was evaluated (the wrapper used to put the next
    image in its place, counting that one twice)."""
    data = json.load(open(demo_datalist))
    root = Path(demo_datalist).parent  # the demo datalist's paths are relative to its folder
    for split in ("training", "validation", "test"):
        data[split] = [{**e, "image": str(root / e["image"])} for e in data[split]]
    png = next(i for i, e in enumerate(data["test"]) if e["image"].endswith(".png"))
    bad = tmp_path / "truncated.png"
    bad.write_bytes(Path(data["test"][png]["image"]).read_bytes()[:300])
    data["test"][png] = {**data["test"][png], "image": str(bad)}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(data))
    out = tmp_path / "eval"
    _run(_bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", str(datalist),
                     "--bundle_root", str(trained), "--n_bootstrap", "0", "--eval_dir", str(out), *SMALL))
    report = json.load(open(out / "metrics.json"))
    images = [r["image"] for r in _read_csv(out / "predictions.csv")]
    good = [e["image"] for e in data["test"] if e["image"] != str(bad)]
    assert sorted(images) == sorted(good) and len(set(images)) == len(images)
    assert report["n_images"] == len(good) == len(data["test"]) - 1
    assert [s["image"] for s in report["skipped_images"]] == [str(bad)]
    assert "truncated.png" in report["skipped_images"][0]["error"]


def test_evaluation_report_files(trained, demo_datalist):
    from sklearn.metrics import roc_auc_score

    from hmn.data import load_datalist

    # --min_positives 1: the 16-image test split has fewer than 10 positives of every finding, and this test
    # checks each number the report computes
    ran = _run(_bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", demo_datalist,
                           "--bundle_root", str(trained), "--n_bootstrap", "200", "--min_positives", "1", *SMALL))
    # progress in the log (issue 28): after the first of the split's batches of 8, its count and the time left
    n_test = len(load_datalist(demo_datalist, "test"))
    log = ran.stdout + ran.stderr
    assert re.search(rf"evaluation of the test split: 8/{n_test} images \(\d+%\), \d+ s so far, about \d+ s left "
                     r"\(around \d\d:\d\d\)", log), log[-3000:]
    assert re.search(rf"evaluation of the test split: {n_test} images in \d+ s \([\d.]+ images/s\)", log)
    out = trained / "runs" / "eval"
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.csv", "metrics.csv", "metrics.json", "operating_points.csv", "predictions.csv", "reliability.png",
        "roc.png", "subgroup_gaps.csv", "subgroups.csv", "subgroups.png"]
    test = load_datalist(demo_datalist, "test", metadata=True)
    classes = json.load(open(demo_datalist))["class_names"]
    preds = _read_csv(out / "predictions.csv")
    assert sorted(r["image"] for r in preds) == sorted(e["image"] for e in test)
    # the datalist's (synthetic) metadata reaches the predictions and the subgroup tables
    meta = {e["image"]: e for e in test}
    for r in preds:
        assert (int(float(r["age"])), r["sex"], r["view"]) == tuple(meta[r["image"]][k] for k in ("age", "sex", "view"))
    sub = _read_csv(out / "subgroups.csv")
    women = [r for r in preds if r["sex"] == "F"]
    row = next(x for x in sub if (x["attribute"], x["group"], x["class"]) == ("sex", "F", classes[0]))
    assert int(row["n"]) == len(women) and int(row["positives"]) == sum(float(r[f"{classes[0]}_label"]) == 1 for r in women)
    by_image = {e["image"]: e["label"] for e in test}
    for r in preds:
        assert [int(float(r[f"{c}_label"])) for c in classes] == by_image[r["image"]]
    rows = {r["class"]: r for r in _read_csv(out / "metrics.csv")}
    assert set(rows) == set(classes) | {"macro", "micro"}
    aucs = []
    for c in classes:
        y = np.array([float(r[f"{c}_label"]) for r in preds])
        p = np.array([float(r[f"{c}_prob"]) for r in preds])
        if 0 < y.sum() < len(y):
            want = roc_auc_score(y, p)
            aucs.append(want)
            assert float(rows[c]["auc"]) == pytest.approx(want, abs=1e-9)
            assert float(rows[c]["auc_ci_low"]) <= want <= float(rows[c]["auc_ci_high"])
            sens, spec, thr = (float(rows[c][k]) for k in ("sensitivity", "specificity", "threshold"))
            assert sens == pytest.approx(((p >= thr) & (y == 1)).sum() / (y == 1).sum())
            assert spec == pytest.approx(((p < thr) & (y == 0)).sum() / (y == 0).sum())
    assert aucs, "no class with both labels in the test split"
    assert float(rows["macro"]["auc"]) == pytest.approx(np.mean(aucs), abs=1e-9)
    assert json.load(open(out / "metrics.json"))["settings"]["n_bootstrap"] == 200
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_chosen_on_validation_are_applied_to_test(trained, demo_datalist):
    """The two-step workflow of the bundle README: Youden thresholds on the validation split, then the
    test split evaluated at exactly those thresholds."""
    cmd = _bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", demo_datalist,
                      "--bundle_root", str(trained), "--n_bootstrap", "10", *SMALL)
    val_dir, test_dir = trained / "runs" / "eval_validation", trained / "runs" / "eval_given"
    _run(cmd + ["--eval_split", "validation", "--thresholds", "youden", "--eval_dir", str(val_dir)])
    _run(cmd + ["--thresholds", str(val_dir / "metrics.json"), "--eval_dir", str(test_dir)])
    val = json.load(open(val_dir / "metrics.json"))
    test = json.load(open(test_dir / "metrics.json"))
    assert val["settings"]["threshold_method"] == "youden" and test["settings"]["threshold_method"] == "given"
    assert test["settings"]["thresholds_from"] == str(val_dir / "metrics.json")
    splits = json.load(open(demo_datalist))
    assert (val["n_images"], test["n_images"]) == (len(splits["validation"]), len(splits["test"]))
    thresholds = {c["class"]: c["threshold"] for c in val["per_class"]}
    assert {c["class"]: c["threshold"] for c in test["per_class"]} == thresholds
    preds = _read_csv(test_dir / "predictions.csv")
    for c in test["per_class"]:  # the confusion counts are those of the given threshold on the test predictions
        t, name = thresholds[c["class"]], c["class"]
        if t is None:
            continue
        known = [r for r in preds if r[f"{name}_label"] not in ("", "-1", "-1.0")]
        tp = sum(float(r[f"{name}_prob"]) >= t and float(r[f"{name}_label"]) == 1 for r in known)
        fp = sum(float(r[f"{name}_prob"]) >= t and float(r[f"{name}_label"]) == 0 for r in known)
        assert (c["tp"], c["fp"]) == (tp, fp), name


def test_temperature_fitted_on_validation_is_applied_to_test(trained, demo_datalist):
    """Temperature scaling as the bundle docs give it: fitted on the validation split's report, applied to
    the test split's probabilities (AUC unchanged, probabilities sigmoid(logit(p) / T))."""
    from scipy.special import expit, logit

    cmd = _bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", demo_datalist,
                      "--bundle_root", str(trained), "--n_bootstrap", "0", *SMALL)
    val_dir, raw_dir, cal_dir = (trained / "runs" / d for d in ("t_val", "t_raw", "t_cal"))
    _run(cmd + ["--eval_split", "validation", "--eval_dir", str(val_dir)])
    _run(cmd + ["--eval_dir", str(raw_dir)])
    _run(cmd + ["--temperature", str(val_dir / "metrics.json"), "--eval_dir", str(cal_dir)])
    fitted = {c["class"]: c["temperature_fitted"] for c in json.load(open(val_dir / "metrics.json"))["calibration"]["per_class"]}
    cal = json.load(open(cal_dir / "metrics.json"))
    assert cal["calibration"]["temperature_applied_from"] == str(val_dir / "metrics.json")
    assert {c["class"]: c["temperature_applied"] for c in cal["calibration"]["per_class"]} == fitted
    raw = {r["image"]: r for r in _read_csv(raw_dir / "predictions.csv")}
    done = 0
    for r in _read_csv(cal_dir / "predictions.csv"):
        for c, t in fitted.items():
            if t is not None:
                want = expit(logit(np.clip(float(raw[r["image"]][f"{c}_prob"]), 1e-12, 1 - 1e-12)) / t)
                assert float(r[f"{c}_prob"]) == pytest.approx(want, rel=1e-9, abs=1e-12)
                done += 1
    assert done
    raw_auc = {c["class"]: c["auc"] for c in json.load(open(raw_dir / "metrics.json"))["per_class"]}
    for c in cal["per_class"]:
        assert c["auc"] == pytest.approx(raw_auc[c["class"]], abs=1e-12) if c["auc"] is not None else raw_auc[c["class"]] is None


def test_external_validation_on_a_datalist_with_other_classes(trained, demo_datalist, tmp_path):
    """A model evaluated on another source's datalist: refused by default, the shared findings compared with
    --findings shared (demo 'Effusion' is CheXpert's 'Pleural Effusion'), the rest named in the report."""
    from sklearn.metrics import roc_auc_score

    data = json.load(open(demo_datalist))
    demo = data["class_names"]
    other = ["Fracture", "Pleural Effusion", "Cardiomegaly"]  # CheXpert names, another order, one unshared
    base = os.path.dirname(demo_datalist)
    rng = np.random.default_rng(0)
    test = [{**e, "image": os.path.join(base, e["image"]),
             "label": [int(rng.integers(2)), e["label"][demo.index("Effusion")], e["label"][demo.index("Cardiomegaly")]]}
            for e in data["test"]]
    path = tmp_path / "chexpert_like.json"
    path.write_text(json.dumps({"class_names": other, "source": "chexpert", "training": [], "validation": [], "test": test}))
    cmd = _bundle_cmd("evaluating", _configs("convnext_tiny", "train", "evaluate"), "--datalist", str(path),
                      "--bundle_root", str(trained), "--n_bootstrap", "0", *SMALL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--findings shared" in refused.stderr
    out = tmp_path / "external"
    _run(cmd + ["--findings", "shared", "--eval_dir", str(out)])
    report = json.load(open(out / "metrics.json"))
    assert report["class_names"] == ["Cardiomegaly", "Pleural Effusion"]  # in the model's output order
    assert report["findings"]["compared"] == [
        {"finding": "Cardiomegaly", "model_class": "Cardiomegaly", "data_class": "Cardiomegaly"},
        {"finding": "Pleural Effusion", "model_class": "Effusion", "data_class": "Pleural Effusion"}]
    assert set(report["findings"]["model_only"]) == {"Mass", "Nodule", "Pneumothorax"}
    assert report["findings"]["data_only"] == ["Fracture"]
    # each finding at its model class's threshold from the validation split (models/thresholds.json)
    recorded = {c["class"]: c["threshold"] for c in json.load(open(trained / "models" / "thresholds.json"))["per_class"]}
    assert [c["threshold"] for c in report["per_class"]] == [recorded["Cardiomegaly"], recorded["Effusion"]]
    assert report["settings"]["thresholds_from"] == str(trained / "models" / "thresholds.json")
    # the predictions paired with the right labels: the same AUC as the model's own report on the demo labels
    own = _read_csv(trained / "runs" / "t_raw" / "predictions.csv") if (trained / "runs" / "t_raw").exists() else None
    preds = _read_csv(out / "predictions.csv")
    truth = {os.path.normpath(e["image"]): e["label"] for e in test}
    y = np.array([truth[os.path.normpath(r["image"])][1] for r in preds])
    assert [float(r["Pleural Effusion_label"]) for r in preds] == list(y)
    p = np.array([float(r["Pleural Effusion_prob"]) for r in preds])
    if 0 < y.sum() < len(y):
        assert report["per_class"][1]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    if own is not None:
        by = {os.path.normpath(r["image"]): float(r["Effusion_prob"]) for r in own}
        assert [by[os.path.normpath(r["image"])] for r in preds] == pytest.approx(list(p), abs=1e-6)


def test_inference_csv_rows_and_bad_file(trained, demo_datalist, tmp_path):
    from monai.transforms import Compose, Resized

    from hmn.data import load_datalist
    from hmn.networks import HybridMedNet
    from hmn.transforms import LoadXrayd, PercentileRescaled

    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    images = [e["image"] for e in load_datalist(demo_datalist, "test")[:3]]
    for img in images:
        shutil.copy(img, folder / Path(img).name)
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    out_csv = tmp_path / "pred.csv"
    _run(_bundle_cmd("inference", _configs("convnext_tiny", "inference"), "--input", str(tmp_path / "in"),
                     "--output_file", str(out_csv), "--bundle_root", str(trained), *SMALL))
    rows = _read_csv(out_csv)
    assert len(rows) == 4
    broken = [r for r in rows if r["image"].endswith("broken.dcm")]
    assert len(broken) == 1 and "broken.dcm" in broken[0]["error"] and broken[0]["Mass"] == ""

    # the probabilities equal the trained network's, computed here without the bundle machinery
    classes = json.load(open(demo_datalist))["class_names"]
    net = HybridMedNet("convnext_tiny", num_classes=len(classes), img_size=SIZE, attention="cbam", backbone_options=SCRATCH).eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    pre = Compose([LoadXrayd("image"), Resized("image", (SIZE, SIZE), mode="area"), PercentileRescaled("image")])
    for r in rows:
        if r["error"]:
            continue
        x = pre({"image": r["image"]})["image"].as_tensor()[None]
        with torch.no_grad():
            want = torch.sigmoid(net(x))[0].numpy()
        np.testing.assert_allclose([float(r[c]) for c in classes], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 21 s; the same exports run by default in tests/test_export.py and pack-bundle's model.ts check
def test_export_commands_of_the_docs_match_eager(trained, tmp_path):
    """The two export commands of the bundle docs, run as written from a bundle folder holding the trained
    convnext_tiny (configs, models/model.pt, models/run.json): TorchScript scripted, as its export_torchscript.json
    says, with the metadata and config inside; ONNX with dynamic batch and spatial axes, checked by the command
    itself at batch 1 (224x224, the metadata's shape) and here at batch 1 and 4 (64x64) in onnxruntime."""
    import onnxruntime as ort

    from hmn.bundle import ONNX_ATOL
    from hmn.networks import HybridMedNet

    folder = tmp_path / "convnext_tiny"
    shutil.copytree(ROOT / "bundles" / "convnext_tiny" / "configs", folder / "configs")
    (folder / "models").mkdir()
    for f in ("model.pt", "run.json"):
        (folder / "models" / f).symlink_to(trained / "models" / f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    for command, args in (("ckpt_export", "configs/export_torchscript.json"), ("onnx_export", "configs/export_onnx.json")):
        cmd = [sys.executable, "-m", "monai.bundle", command, "--args_file", args]
        out = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-6000:]}"

    net = HybridMedNet("convnext_tiny", num_classes=5, img_size=SIZE, attention="cbam", backbone_options=SCRATCH).eval()
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    extra = {"metadata.json": "", "inference.json": ""}
    module = torch.jit.load(str(folder / "models" / "model.ts"), _extra_files=extra)
    assert "FeaturePyramid expects" in module.neck.code  # scripted: the checks and control flow are kept
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["type"] == "tabular"
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "hmn.networks.HybridMedNet"
    session = ort.InferenceSession(str(folder / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batch in (1, 4):
            x = torch.rand(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
            want = net(x)
            torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], want.numpy(), rtol=0, atol=ONNX_ATOL)


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.numerics
@pytest.mark.slow  # 41 s (and ran again in both numerics reruns); a packed bundle's inference runs in test_deploy.py
def test_reuse_rehearsal_packed_bundle_rebuilds_the_trained_model(demo_datalist, tmp_path):
    """A user's run (two classes named otherwise than the demo's, in another order, 48 px) is trained, packed,
    served over loopback HTTP, downloaded with the hash check, loaded with monai.bundle.load, and run
    for evaluation and inference from the downloaded bundle with no setting overridden: every prediction
    equals the trained model's own, computed here independently from model.pt. The packed models/model.ts
    (TorchScript, for MONAI Deploy) gives the logits of the network monai.bundle.load builds from the packed
    configs and model.pt, and of the one built here, and holds the packed inference.json and metadata.json."""
    from monai.bundle import download, load
    from scipy.special import expit

    from hmn.data import load_datalist
    from hmn.networks import HybridMedNet
    from hmn.transforms import LoadXray, PercentileRescale

    data = load_datalist(demo_datalist)
    src = data["class_names"]
    picks = {"Pleural effusion": src.index("Effusion"), "Enlarged heart": src.index("Cardiomegaly")}
    user = {"class_names": list(picks)}
    for split in ("training", "validation", "test"):
        user[split] = [{"image": e["image"], "label": [e["label"][k] for k in picks.values()], "patient_id": e["patient_id"]}
                       for e in data[split]]
    datalist = tmp_path / "user.json"
    datalist.write_text(json.dumps(user))
    run = tmp_path / "run"
    _run(_bundle_cmd("training", _configs("convnext_tiny", "train"), "--datalist", str(datalist), "--bundle_root", str(run),
                     "--max_epochs", "1", "--image_size", "48", "--batch_size", "8"))
    record = json.load(open(run / "models" / "run.json"))["settings"]
    assert record["class_names"] == list(picks) and record["image_size"] == 48

    # pack (the command prints the hash), serve, download with the hash check
    served = tmp_path / "served"
    out = subprocess.run([sys.executable, "-m", "hmn", "pack-bundle", "convnext_tiny", str(served / "convnext_tiny.zip"),
                          "--models-dir", str(run / "models")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    zip_path = served / "convnext_tiny.zip"
    md5 = hashlib.md5(zip_path.read_bytes()).hexdigest()
    assert f"md5 {md5}" in out.stdout
    with zipfile.ZipFile(zip_path) as zf:  # model.ts packed, not linked, and stored as it is (itself a zip)
        assert zf.getinfo("convnext_tiny/models/model.ts").compress_type == zipfile.ZIP_STORED
        assert "convnext_tiny/large_files.yml" not in zf.namelist()
    server = _serve(served)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/convnext_tiny.zip"
        target = tmp_path / "downloaded"
        download_bundle(url, target, "convnext_tiny", hash_val=md5)
        with pytest.raises(Exception, match="(?i)md5|hash"):
            download_bundle(url, tmp_path / "bad", "convnext_tiny", hash_val="0" * 32)
        plain = tmp_path / "plain"  # MONAI's own download (which takes no hash in MONAI 1.6)
        download(name="convnext_tiny", url=url, bundle_dir=str(plain))
        assert (plain / "convnext_tiny" / "models" / "run.json").is_file()
    finally:
        server.shutdown()
    bundle = target / "convnext_tiny"
    meta = json.load(open(bundle / "configs" / "metadata.json"))["network_data_format"]
    assert meta["outputs"]["pred"]["channel_def"] == {"0": "Pleural effusion", "1": "Enlarged heart"}
    assert meta["inputs"]["image"]["spatial_shape"] == [48, 48]
    shared = json.load(open(bundle / "models" / "run.json"))["settings"]  # the packer's local datalist path stays home
    assert "datalist" not in shared and shared["class_names"] == list(picks)

    # monai.bundle.load: the trained network, every tensor equal (nothing freshly initialised)
    net = load(name="convnext_tiny", bundle_dir=str(target), workflow_type="inference", device="cpu")
    want = torch.load(run / "models" / "model.pt", weights_only=True)
    got = net.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)

    # the trained model's own predictions, built here from the settings written out, not from the bundle
    ref = HybridMedNet("convnext_tiny", num_classes=2, in_channels=1, img_size=48, attention=["cbam"],
                       backbone_options=SCRATCH).eval()
    ref.load_state_dict(want, strict=True)
    loader, scale = LoadXray(voi="apply", spatial_size=(48, 48), resize_mode="area"), PercentileRescale(0.5, 99.5)
    test = user["test"]
    with torch.no_grad():
        images = torch.stack([torch.as_tensor(scale(loader(e["image"]))) for e in test]).float()
        expected = expit(ref(images).double().numpy())  # the writers' sigmoid: float64 of the float32 logits

    # inference and evaluation from the downloaded bundle, no setting given
    inference = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                 str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                 "--input", str(datalist), "--output_file", str(tmp_path / "pred.csv")]
    _run(inference)
    rows = {r["image"]: r for r in _read_csv(tmp_path / "pred.csv")}
    evaluation = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
                  f"['{bundle}/configs/train.json','{bundle}/configs/evaluate.json']", "--bundle_root", str(bundle),
                  "--datalist", str(datalist), "--n_bootstrap", "0"]
    _run(evaluation)
    report = {r["image"]: r for r in _read_csv(bundle / "runs" / "eval" / "predictions.csv")}
    # the validation thresholds of the user's own classes travel in the packed bundle and drive its evaluation
    packed = json.load(open(bundle / "models" / "thresholds.json"))
    assert packed["class_names"] == list(picks) and packed["source"] == "validation split"
    metrics = json.load(open(bundle / "runs" / "eval" / "metrics.json"))
    assert metrics["settings"]["thresholds_from"] == str(bundle / "models" / "thresholds.json")
    assert [c["threshold"] for c in metrics["per_class"]] == [c["threshold"] for c in packed["per_class"]]
    # Not bit-exact: the bundle predicts in batches of another composition than this one batch of the whole test
    # split, and the CPU's convolution kernels (oneDNN, AVX-512 or AVX2, per batch shape and thread count) sum in
    # other orders, so each float32 logit may move by a few ulps of the terms it sums (7.5e-9 in probability was
    # seen on an AVX-512/AMX Xeon). 1e-5 is about 170 float32 ulps at p = 0.5, far below what a wrong image size,
    # VOI, normalization or weight would move (> 1e-3 here).
    for e, p in zip(test, expected):
        np.testing.assert_allclose([float(rows[e["image"]][c]) for c in picks], p, rtol=0, atol=1e-5)
        np.testing.assert_allclose([float(report[e["image"]][f"{c}_prob"]) for c in picks], p, rtol=0, atol=1e-5)

    # models/model.ts: what MONAI Deploy's bundle operator loads first. Its extra files are the packed configs
    # (those of the downloaded zip), and its logits on the test images are those of the eager network that
    # monai.bundle.load built above from the same configs and model.pt, and of `ref`. Scripted, it runs the same
    # kernels on the same input, in the same process: equal but for summation order (hmn.bundle.TORCHSCRIPT_RTOL),
    # far below what a lost block, a layer in training mode or other weights would move.
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(bundle / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["inference.json"]) == json.load(open(bundle / "configs" / "inference.json"))
    assert json.loads(extra["metadata.json"]) == json.load(open(bundle / "configs" / "metadata.json"))
    sha = hashlib.sha256((run / "models" / "model.pt").read_bytes()).hexdigest()
    assert json.loads(extra["inference.json"])["model_sha256"] == sha  # the config of these weights
    with torch.no_grad():
        got = scripted(images)
        torch.testing.assert_close(got, net.eval()(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, ref(images), rtol=1e-4, atol=1e-5)


def test_inference_logs_progress_with_the_time_left(trained, demo_datalist, tmp_path):
    """Issue 28: inference over a folder was silent for minutes; the log (not only a terminal) now shows counts and
    an estimate at 10, 25, 50 and 75 % and the total at the end."""
    folder = os.path.dirname(demo_datalist)
    ran = _run(_bundle_cmd("inference", _configs("convnext_tiny", "inference"), "--input", folder,
                           "--output_file", str(tmp_path / "pred.csv"), "--bundle_root", str(trained), *SMALL))
    n = len(_read_csv(tmp_path / "pred.csv"))
    log = ran.stdout + ran.stderr
    found = [(int(d), int(t)) for d, t in re.findall(r"inference: (\d+)/(\d+) images \(\d+%\), \d+ s so far, about "
                                                     r"\d+ s left \(around \d\d:\d\d\)", log)]
    # after each batch of 8 the images done; a line at the first of them at or past each share (none at the end)
    done = [min(n, 8 * k) for k in range(1, -(-n // 8) + 1)]
    expected = sorted({next(d for d in done if d / n >= f) for f in (0.1, 0.25, 0.5, 0.75)} - {n})
    assert found == [(d, n) for d in expected], log[-3000:]
    assert re.search(rf"inference: {n} images in \d+ s \([\d.]+ images/s\)", log)


def test_inference_heatmaps_on_demo_dicoms(trained, demo_datalist, tmp_path):
    """--heatmaps True: per image, a PNG and a .npy per finding at or above its threshold, listed in heatmaps.csv
    and named by a hash of the path. The demo's DICOMs carry a synthetic PatientName and PatientID, and their
    file names hold the ID: neither reaches a heatmap file name or a picture."""
    import pydicom
    from PIL import Image

    from hmn.data import load_datalist
    from hmn.explain import heatmap_id

    dicoms = [e["image"] for e in load_datalist(demo_datalist, "test") if e["image"].endswith(".dcm")][:2]
    ids = {str(pydicom.dcmread(d).PatientID) for d in dicoms} | {str(pydicom.dcmread(d).PatientName) for d in dicoms}
    heat = tmp_path / "heat"
    _run(_bundle_cmd("inference", _configs("convnext_tiny", "inference"), "--input", f"{dicoms!r}",
                     "--output_file", str(tmp_path / "pred.csv"), "--bundle_root", str(trained), *SMALL,
                     "--heatmaps", "True", "--heatmap_dir", str(heat), "--heatmap_findings", "['Mass','Nodule']",
                     "--heatmap_thresholds", "0"))
    assert [r["image"] for r in _read_csv(tmp_path / "pred.csv")] == sorted(dicoms)
    index = _read_csv(heat / "heatmaps.csv")
    assert sorted((r["image"], r["finding"]) for r in index) == sorted((d, f) for d in dicoms for f in ("Mass", "Nodule"))
    names = sorted(str(p.relative_to(heat)) for p in heat.rglob("*") if p.is_file())
    assert names == sorted(["heatmaps.csv"] + [f"{heatmap_id(d)}/{f}.{x}" for d in dicoms for f in ("Mass", "Nodule")
                                               for x in ("png", "npy")])
    for r in index:
        m = np.load(heat / r["npy"])
        assert m.shape == (SIZE, SIZE) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
        png = Image.open(heat / r["png"])
        assert not png.text and not any(i in (heat / r["png"]).read_bytes().decode("latin-1") for i in ids)
    assert not any(i in n for i in ids for n in names)


def test_gpu_fast_path_switches_reach_the_network_optimizer_and_trainer(demo_datalist):
    """amp_dtype, channels_last and fused_optimizer (on by default only with CUDA) as the trainer gets them; a
    training step with channels_last weights and the fused AdamW kernel gives the default step's loss and
    weights (float32, CPU)."""
    from monai.bundle import ConfigParser

    def parsed(**overrides):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / "convnext_tiny" / "configs" / "train.json"))
        parser.update({"datalist": demo_datalist, "image_size": SIZE, "bundle_root": "/nonexistent", **overrides})
        return parser

    default = parsed()
    cuda = torch.cuda.is_available()
    assert default.get_parsed_content("channels_last") is cuda and default.get_parsed_content("fused_optimizer") is cuda
    assert default.get_parsed_content("train#trainer#amp_kwargs")["dtype"] in (torch.bfloat16, torch.float16)
    fast = parsed(channels_last=True, fused_optimizer="True", amp_dtype="float16")
    assert fast.get_parsed_content("train#trainer#amp_kwargs") == {"dtype": torch.float16}
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the expression's error; ours is its cause
        parsed(amp_dtype="int8").get_parsed_content("train#trainer#amp_kwargs")
    assert "amp_dtype='int8' is not accepted; use one of ('bfloat16', 'float16')" in str(err.value.__cause__)

    torch.manual_seed(0)
    x, y = torch.randn(2, 1, SIZE, SIZE), torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    runs = []
    for p in (default, fast):
        torch.manual_seed(0)
        net, opt = p.get_parsed_content("network"), p.get_parsed_content("optimizer")
        # a weight with only one stride order of each layout (more than one input channel per group, not 1x1)
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[1] > 1 and m.kernel_size != (1, 1))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) is (p is fast or cuda)
        assert bool(opt.defaults["fused"]) is (p is fast or cuda)
        net.train()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        runs.append((net, opt, loss.item()))
    (net0, opt0, loss0), (net1, opt1, loss1) = runs
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    scale = max(p.grad.abs().max().item() for p in net0.parameters() if p.grad is not None)
    for (k, p0), p1 in zip(net0.named_parameters(), net1.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-3, atol=1e-5 * scale, msg=lambda m, k=k: f"{k}: {m}")
        p1.grad.copy_(p0.grad)  # the same gradients, in the layout autograd gave: the fused step must give the same weights
    opt0.step()
    opt1.step()
    for (k, p0), p1 in zip(net0.named_parameters(), net1.parameters()):
        torch.testing.assert_close(p1.detach(), p0.detach(), rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def _same_predictions(got, want, demo_datalist):
    """The same rows (image, error) and probabilities within 1e-5. Not bit-exact: each process predicts its share in
    batches of other shapes (and the resumed run the images left), and the CPU's convolution kernels (oneDNN,
    AVX-512 or AVX2, per batch shape and thread count) sum in other orders; a stand-in convnext_tiny (cbam, scratch
    options, calibrated BatchNorm) moved by up to 2.2e-7 between batches of 6, 3 and 1 (AVX2 kernels; 1.5e-7 with
    AVX-512). 1e-5 is about 170 float32 ulps at p = 0.5, far below what another image or weight would move."""
    assert [(r["image"], r["error"]) for r in got] == [(r["image"], r["error"]) for r in want]
    for g, w in zip(got, want):
        for c in json.load(open(demo_datalist))["class_names"]:
            assert (g[c] == w[c] == "") or float(g[c]) == pytest.approx(float(w[c]), abs=1e-5)


@pytest.mark.slow  # 35 s; torchrun itself runs by default in test_multi_process_training_on_gloo
def test_inference_under_torchrun_writes_one_merged_csv_and_resumes(trained, demo_datalist, tmp_path):
    """Two gloo processes: each predicts its share, and the run ends with the one CSV (and heatmap index) a
    single process writes, sorted by path, with no per-rank file left. A single-process run cut off after two
    rows resumes with --resume True: the other images are predicted, the two kept, the file the same."""
    from hmn.data import load_datalist

    folder = tmp_path / "in"
    folder.mkdir()
    for e in load_datalist(demo_datalist, "test")[:5]:
        shutil.copy(e["image"], folder / Path(e["image"]).name)
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    common = ["--input", str(folder), "--bundle_root", str(trained), *SMALL, "--heatmaps", "True",
              "--heatmap_findings", "['Mass']", "--heatmap_thresholds", "0"]
    single, merged = tmp_path / "single.csv", tmp_path / "merged.csv"
    _run(_bundle_cmd("inference", _configs("convnext_tiny", "inference"), *common, "--output_file", str(single),
                     "--heatmap_dir", str(tmp_path / "heat1")))
    want = _read_csv(single)
    assert len(want) == 6 and sum(bool(r["error"]) for r in want) == 1

    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
          "-m", "monai.bundle", "run", "inference", "--config_file", _configs("convnext_tiny", "inference", "multi_gpu_inference"),
          *common, "--output_file", str(merged), "--heatmap_dir", str(tmp_path / "heat2")])
    got = _read_csv(merged)
    assert [r["image"] for r in got] == sorted(r["image"] for r in want)
    _same_predictions(got, want, demo_datalist)
    assert sorted(p.name for p in tmp_path.iterdir() if ".rank" in p.name) == []
    index = lambda d: sorted((r["image"], r["finding"]) for r in _read_csv(tmp_path / d / "heatmaps.csv"))  # noqa: E731
    assert index("heat2") == index("heat1") and len(index("heat1")) == 5
    assert not list((tmp_path / "heat2").glob("heatmaps.rank*"))

    lines = single.read_text().splitlines(keepends=True)
    single.write_text("".join(lines[:3]) + lines[3][:20])  # header, two rows, a row cut off mid-write
    out = _run(_bundle_cmd("inference", _configs("convnext_tiny", "inference"), *common, "--output_file", str(single),
                           "--heatmap_dir", str(tmp_path / "heat1"), "--resume", "True"))
    assert "2 of 6 images already have predictions" in out.stdout + out.stderr
    _same_predictions(sorted(_read_csv(single), key=lambda r: r["image"]), want, demo_datalist)
    assert index("heat1") == sorted({(r["image"], "Mass") for r in want if not r["error"]})


def test_a_training_on_a_models_folder_in_use_stops_before_writing(demo_datalist, tmp_path):
    """Two trainings on one folder once both passed the "already holds a run" check and then destroyed each
    other's checkpoints. Now the second stops first thing, naming the process that holds the folder."""
    from hmn.run_lock import RunLock

    models = tmp_path / "models"
    with RunLock(models, "training"):  # this test process plays the first run
        out = subprocess.run(_bundle_cmd("training", _configs("convnext_tiny", "train"), "--datalist", demo_datalist,
                                         "--bundle_root", str(tmp_path), *SMALL), cwd=ROOT, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode != 0
        assert out.stderr.strip().splitlines()[-1].startswith(
            f"error: RunInUseError: {models} is in use by training in process {os.getpid()} on ")
        assert sorted(p.name for p in models.iterdir()) == [".hmn.lock"]  # nothing of the second run written
        assert not (tmp_path / "runs").exists()
    assert not models.joinpath(".hmn.lock").exists()


@pytest.mark.parametrize("damage", ["truncated", pytest.param("code", marks=pytest.mark.slow)])  # 15 s each
def test_an_unreadable_model_is_refused_naming_its_path(damage, trained, demo_datalist, tmp_path):
    """A damaged model.pt once stopped evaluation and inference with torch's own message, naming no file; a
    pickle that would run code is refused by weights_only loading, and named the same way."""
    import pickle

    from hmn.data import load_datalist

    root = tmp_path / "bundle"
    shutil.copytree(trained, root, ignore=shutil.ignore_patterns("runs"))
    model = root / "models" / "model.pt"
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:4096])
    else:
        model.write_bytes(pickle.dumps(os.system))  # a plain pickle of a callable: weights_only refuses it
    image = load_datalist(demo_datalist, "test")[0]["image"]
    for run_id, config, extra in (("evaluating", ("train", "evaluate"), ["--datalist", demo_datalist]),
                                  ("inference", ("inference",), ["--input", image, "--output_file", str(tmp_path / "p.csv")])):
        out = subprocess.run(_bundle_cmd(run_id, _configs("convnext_tiny", *config), "--bundle_root", str(root), *extra, *SMALL),
                             cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert out.returncode != 0
        assert out.stderr.strip().splitlines()[-1].startswith(
            f"error: CheckpointReadError: {model}: cannot be read as a PyTorch checkpoint ("), (run_id, out.stderr[-2000:])
