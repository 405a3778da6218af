"""One run per folder (hmn.run_lock): a second process is refused naming the holder, a lock left by a killed run
is taken over, and the inference CSV writer holds its file for the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from hmn.handlers import PredictionCSVWriter
from hmn.run_lock import LOCK_NAME, RunInUseError, RunLock, lock_path

HOLD = textwrap.dedent("""
    import sys, time
    from hmn.run_lock import RunLock
    lock = RunLock(sys.argv[1], sys.argv[2], file=sys.argv[2] == "inference").acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(path, purpose="training"):
    """A child process holding the lock on `path`, returned once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), purpose], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_naming_the_holder_until_it_ends(tmp_path):
    folder = tmp_path / "models"
    proc = _holder(folder)
    try:
        with pytest.raises(RunInUseError) as info:
            RunLock(folder).acquire()
        message = str(info.value)
        assert f"{folder} is in use by training in process {proc.pid} on " in message
        assert "give this run another folder" in message and str(folder / LOCK_NAME) in message
        assert info.value.holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # killed without releasing: the file (and its record) is still there, the lock is not
    record = json.loads((folder / LOCK_NAME).read_text())
    assert record["pid"] == proc.pid and record["purpose"] == "training"
    lock = RunLock(folder).acquire()
    assert lock.held and json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_NAME).exists() and not lock.held


def test_a_run_that_ends_with_an_error_leaves_no_lock_file(tmp_path):
    folder = tmp_path / "models"
    code = "import sys; from hmn.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); raise SystemExit('stopped')"
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "stopped" in out.stderr
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "models"
    proc = _holder(folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level("WARNING", logger="hmn.run_lock"):
        with RunLock(folder) as lock:
            assert lock.held
    assert f"took over the run lock {folder / LOCK_NAME} left by training in process {proc.pid}" in caplog.text
    assert not (folder / LOCK_NAME).exists()


def test_acquire_is_idempotent_and_a_later_object_of_the_process_takes_over(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert first.acquire() is first and first.held  # the bundle's "run" step, then the trainer's STARTED
    second = RunLock(tmp_path).acquire()  # e.g. a workflow created again from Python after one that raised
    assert second.held and not first.held
    second.release()
    assert lock_path(tmp_path) == str(tmp_path / LOCK_NAME)
    assert lock_path(tmp_path / "out" / "predictions.csv", file=True) == str(tmp_path / "out" / ".predictions.csv.lock")


def test_the_inference_writer_holds_its_csv_for_the_run(tmp_path):
    out = tmp_path / "predictions.csv"
    proc = _holder(out, "inference")
    try:
        with pytest.raises(RunInUseError, match=f"in use by inference in process {proc.pid}"):
            PredictionCSVWriter(out, ["A"]).start()
        assert not out.exists()  # refused before anything was written
    finally:
        proc.kill()
        proc.wait()
    writer = PredictionCSVWriter(out, ["A"])
    writer.start()
    assert writer.lock.held and os.path.exists(lock_path(out, file=True))
    other = subprocess.run([sys.executable, "-c", HOLD, str(out), "inference"], capture_output=True, text=True,
                           timeout=60)  # another process, while this run goes on
    assert other.returncode != 0 and f"RunInUseError: {out} is in use by inference in process {os.getpid()}" in other.stderr
    writer.finish()
    assert not writer.lock.held and not os.path.exists(lock_path(out, file=True))
