"""Issue 28: Ctrl-C (SIGINT) and preemption (SIGTERM) during training keep the work and say how to continue.

A training subprocess is sent the signal in the middle of epoch 1; it must exit within a bounded time with one line
saying where it stopped, what is saved and the command that continues it; the mid-epoch checkpoint must be complete;
the run continued with that command must train exactly the iterations left in the epoch and end with as many
optimizer steps as an uninterrupted run (counted from the datalist and the batch size, not from our code).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # the bundle tests' image size (tests/bundles/conftest.py)

BATCH = 8
MAX_EPOCHS = 1
STOP_BOUND_S = 60  # from the signal to the process's exit: the rest of one iteration (~1 s here) and a checkpoint


def _cmd(root, datalist, *extra):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
            "bundles/convnext_tiny/configs/train.json", "--datalist", str(datalist), "--bundle_root", str(root),
            "--max_epochs", str(MAX_EPOCHS), "--image_size", str(SIZE), "--batch_size", str(BATCH),
            "--num_workers", "0", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _iterations_per_epoch(datalist) -> int:
    """From the datalist and the batch size alone: the training split in batches, a last batch of one item left out
    (BatchNorm cannot train on it; the bundles drop it, as their docs say)."""
    n = sum(1 for e in json.load(open(datalist))["training"])
    return n // BATCH if n % BATCH == 1 else math.ceil(n / BATCH)


def _train_until(cmd, sig, after_line):
    """Starts `cmd`, sends `sig` once a line of its output matches `after_line`, and returns (output, returncode,
    seconds from the signal to the exit)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, sent = [], []
    killer = threading.Timer(600, proc.kill)
    killer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and re.search(after_line, line):
                proc.send_signal(sig)
                sent.append(time.monotonic())
        proc.wait()
    finally:
        killer.cancel()
    assert sent, "".join(lines[-60:])
    return "".join(lines), proc.returncode, time.monotonic() - sent[0]


def _stop_line(out, name):
    found = [line for line in out.splitlines() if f"stopped by {name}" in line]
    assert len(found) == 1, out[-4000:]
    return found[0]


def test_ctrl_c_mid_epoch_saves_a_checkpoint_and_the_printed_command_trains_exactly_the_rest(tmp_path, demo_datalist):
    root = tmp_path / "run"
    per_epoch = _iterations_per_epoch(demo_datalist)
    assert per_epoch >= 5  # room to stop in the middle
    out, rc, took = _train_until(_cmd(root, demo_datalist), signal.SIGINT, r"Epoch: 1/1, Iter: 3/")
    assert rc == 128 + signal.SIGINT, out[-4000:]
    assert took < STOP_BOUND_S
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-4000:]
    line = _stop_line(out, "SIGINT")
    # the first whole-run estimate came within the bound: after 3 iterations (the first 2 minutes are not over)
    first = next(i for i, text in enumerate(out.splitlines()) if "first estimate after" in text)
    assert "first estimate after 3 iteration(s)" in out.splitlines()[first]
    assert not any(f"Iter: {k}/" in text for text in out.splitlines()[:first] for k in range(4, per_epoch + 1))

    m = re.search(r"at epoch 1/1, iteration (\d+)/(\d+): .* saved in (\S+checkpoint_iteration=(\d+)\.pt); "
                  r"continue with: (.+)$", line)
    assert m, line
    stopped_at, length, path, file_iteration, command = int(m[1]), int(m[2]), m[3], int(m[4]), m[5]
    assert length == per_epoch and 3 <= stopped_at < per_epoch and file_iteration == stopped_at
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == [f"checkpoint_iteration={stopped_at}.pt", "run.json"]
    state = torch.load(path, weights_only=True)  # complete: it loads
    assert dict(state["trainer"]) == {"epoch_length": per_epoch, "iteration": stopped_at, "max_epochs": MAX_EPOCHS}
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {stopped_at}
    assert state["epoch_loss"]["count"] == stopped_at

    # the exact command printed continues the run
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "monai.bundle"] and args[-2:] == ["--resume", "True"]
    resumed = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    trained = re.findall(r"Epoch: (\d)/1, Iter: (\d+)/", log)
    assert [int(i) for e, i in trained] == list(range(stopped_at + 1, per_epoch + 1))  # the rest of the epoch, once
    final = torch.load(models / f"checkpoint_epoch={MAX_EPOCHS}.pt", weights_only=True)
    steps = MAX_EPOCHS * per_epoch  # an uninterrupted run's optimizer steps
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {steps}
    assert final["lr_scheduler"]["last_epoch"] == steps
    assert not list(models.glob("checkpoint_iteration=*"))  # superseded by the epoch checkpoints
    rows = (root / "runs" / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1"]
    # the epoch's mean loss covers all its iterations, those of the stopped run too (the log prints each to 4 places)
    losses = {int(i): float(v) for i, v in re.findall(r"Epoch: 1/1, Iter: (\d+)/\d+ -- train_loss: ([\d.]+)", out)
              if int(i) <= stopped_at}
    losses.update({int(i): float(v) for i, v in re.findall(r"Epoch: 1/1, Iter: (\d+)/\d+ -- train_loss: ([\d.]+)", log)})
    assert sorted(losses) == list(range(1, per_epoch + 1))
    assert float(rows[1].split(",")[2]) == pytest.approx(sum(losses.values()) / per_epoch, abs=1e-4)


def test_sigterm_in_the_last_epoch_stops_after_its_checkpoint_and_the_resume_does_the_end_of_training(tmp_path, demo_datalist):
    """A preemption (SIGTERM) during the last epoch's last iteration: the run stops after that epoch's validation
    and checkpoint (exit 143) without the end-of-training steps, and the continued run trains nothing and does them."""
    root = tmp_path / "run"
    per_epoch = _iterations_per_epoch(demo_datalist)
    out, rc, took = _train_until(_cmd(root, demo_datalist), signal.SIGTERM, rf"Epoch: 1/1, Iter: {per_epoch}/")
    assert rc == 128 + signal.SIGTERM, out[-4000:]
    assert took < STOP_BOUND_S
    line = _stop_line(out, "SIGTERM")
    m = re.search(r"every epoch is trained and saved in (\S+checkpoint_epoch=1\.pt); the end-of-training steps "
                  r"\(model_final\.pt and the test report\) are left.*continue with: (.+)$", line)
    assert m, line
    models = root / "models"
    assert {"checkpoint_epoch=1.pt", "model.pt"} <= {p.name for p in models.iterdir()}
    assert not (models / "model_final.pt").exists() and not (root / "runs" / "eval" / "metrics.json").exists()
    assert not list(models.glob(".*.partial"))
    resumed = subprocess.run([sys.executable, *shlex.split(m[2])[1:]], cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=600)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-4000:]
    assert not re.search(r"Epoch: \d/1, Iter:", log)  # nothing trained again
    assert (models / "model_final.pt").is_file() and (root / "runs" / "eval" / "metrics.json").is_file()


_SECOND_SIGNAL = r"""
import sys, time
from hmn.workflows.stop import StopSignals
import os, signal
signals = StopSignals(lambda s: print("first", s, flush=True), lambda s: print("second", s, flush=True))
assert signals.install()
child = os.fork()  # a forked child (a loader worker) gets the old handlers and no wakeup fd
if child == 0:
    os._exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.set_wakeup_fd(-1) == -1 else 1)
assert os.waitpid(child, 0)[1] == 0
print("ready", flush=True)
time.sleep(300)  # the main thread inside a long call; a first signal alone must not end it
"""


def test_a_second_signal_exits_at_once_and_the_first_does_not():
    proc = subprocess.Popen([sys.executable, "-c", _SECOND_SIGNAL], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline().strip() == f"first {int(signal.SIGINT)}"
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)  # still running
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
        assert time.monotonic() - start < 30
        assert proc.stdout.read().strip() == f"second {int(signal.SIGINT)}"
    finally:
        proc.kill()


def test_after_uninstall_ctrl_c_is_a_keyboard_interrupt_again():
    from hmn.workflows.stop import StopSignals

    previous = signal.getsignal(signal.SIGINT)
    signals = StopSignals(lambda s: None, lambda s: None)
    assert signals.install()
    assert signal.getsignal(signal.SIGINT) is not previous
    signals.uninstall()
    assert signal.getsignal(signal.SIGINT) is previous
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_the_continue_command_replaces_resume_and_keeps_every_other_argument(monkeypatch):
    from hmn.workflows.stop import continue_command

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    main = os.path.join("site-packages", "monai", "bundle", "__main__.py")
    argv = [main, "run", "training", "--config_file", "a b/train.json", "--resume", "False", "--max_epochs", "3"]
    assert shlex.split(continue_command(argv)) == ["python", "-m", "monai.bundle", "run", "training", "--config_file",
                                                   "a b/train.json", "--max_epochs", "3", "--resume", "True"]
    assert continue_command(["script.py", "--x"]) is None  # not the bundle command line: none is made up
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun: its own options are not visible here
    assert continue_command(argv) is None


def test_every_loader_a_training_run_iterates_leaves_the_signals_to_the_trainer():
    """Loader workers ignore SIGINT/SIGTERM (a terminal's Ctrl-C reaches the whole process group): a worker that
    took it would end and fail the iteration the graceful stop is finishing; the test split's loader runs inside
    the trainer's run too (the end-of-training evaluation, which a stop also ends)."""
    for config in sorted(ROOT.glob("bundles/*/configs/train.json")):
        data = json.loads(config.read_text())
        for split in ("train", "validate", "test"):
            assert data[split]["dataloader"].get("worker_init_fn") == "$hmn.workflows.worker_ignores_stop_signals", (
                config, split)
