"""Runs ``python -m monai.bundle ...`` and stops the process at a chosen point of writing a chosen file, so
that a test can kill it there with SIGKILL: no sleeps, no timing.

    python stop_at.py FD POINT FILE_REGEX OCCURRENCE -- <monai.bundle arguments>

The steps of every write the project makes (``hmn.durable._write_partial`` then ``hmn.durable._commit``,
see :mod:`hmn.durable`) are wrapped. When the OCCURRENCE-th write (1-based) whose target file name matches
FILE_REGEX (``re.fullmatch``) reaches POINT, the process writes ``stopped <target>`` to the inherited file
descriptor FD and waits forever for the test's SIGKILL. POINT is one of:

* ``mid-write``: half of the file's bytes are in the temporary file (flushed and synced), the rest not;
* ``before-rename``: the temporary file is complete and synced, not yet renamed over the target;
* ``after-rename``: the target is in place; what the saver does after it (removing the previous
  checkpoint, promoting the staged best model) is not done.

A rename of one existing file onto another (the promotion of a staged best model to ``model.pt``) is a
commit without a write: only ``before-rename`` and ``after-rename`` apply to it.
"""

from __future__ import annotations

import io
import os
import re
import runpy
import sys
import threading

POINTS = ("mid-write", "before-rename", "after-rename")


def main() -> None:
    sep = sys.argv.index("--")
    fd, point, pattern, occurrence = sys.argv[1:sep]
    fd, occurrence = int(fd), int(occurrence)
    if point not in POINTS:
        raise SystemExit(f"POINT must be one of {POINTS}, got {point!r}")
    regex = re.compile(pattern)

    from hmn import durable

    original_write, original_commit = durable._write_partial, durable._commit
    seen = {"n": 0}
    armed: dict[str, bool] = {}

    def stop(target: str) -> None:
        os.write(fd, f"stopped {target}\n".encode())
        os.close(fd)
        threading.Event().wait()  # until SIGKILL

    def target_of_partial(tmp: str) -> str:
        folder, name = os.path.split(tmp)
        return os.path.join(folder, name[1 : -len(durable.PARTIAL_SUFFIX)])

    def chosen(target: str) -> bool:
        if not regex.fullmatch(os.path.basename(target)):
            return False
        seen["n"] += 1
        return seen["n"] == occurrence

    def write_partial(tmp, write, binary):
        target = target_of_partial(tmp)
        if point == "mid-write" and chosen(target):
            buf = io.BytesIO() if binary else io.StringIO()
            write(buf)
            data = buf.getvalue()
            with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            stop(target)
        original_write(tmp, write, binary)

    def commit(tmp, path):
        if point != "mid-write" and chosen(path):
            armed[path] = True
        if point == "before-rename" and armed.get(path):
            stop(path)
        original_commit(tmp, path)
        if point == "after-rename" and armed.get(path):
            stop(path)

    durable._write_partial, durable._commit = write_partial, commit
    sys.argv = ["monai.bundle", *sys.argv[sep + 1 :]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
