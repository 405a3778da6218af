"""Stopping a training run from outside without losing it: SIGINT (Ctrl-C) and SIGTERM (a cluster preempting the
job, which sends SIGKILL after a grace period) ask :class:`hmn.workflows.TrainingRun` to stop at the next point
where it can save a checkpoint; a second signal exits at once.

Python runs a signal handler only between bytecodes, so a handler alone would react after the current backward
pass (minutes for a large network on a CPU). :class:`StopSignals` therefore also registers a wakeup file
descriptor (``signal.set_wakeup_fd``) that the C-level handler writes the signal's number to at once; a watcher
thread reads it, so the first signal is acknowledged and a second one exits the process while the main thread is
still inside a long computation.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any, Callable

__all__ = ["STOP_SIGNALS", "StopSignals", "TrainingStopped", "continue_command"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_INSTALLED: list["StopSignals"] = []  # this process's installed catchers (a forked child gives them up)


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) inherits the handlers and the wakeup fd but not the watcher thread: a
    # signal reaching it would be written into the parent's pipe and read there as one more Ctrl-C. The child gets
    # the handlers that were there before, and no wakeup fd.
    for catcher in _INSTALLED:
        catcher.installed = False
        try:
            signal.set_wakeup_fd(-1)
            for signum, handler in catcher._previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        except ValueError:  # pragma: no cover - forked from a thread other than the main one
            pass
        if catcher._write_fd is not None:  # the parent's watcher ends when the parent closes its own end
            try:
                os.close(catcher._write_fd)
            except OSError:
                pass
            catcher._write_fd = None
    _INSTALLED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TrainingStopped(SystemExit):
    """Raised after the trainer returned from a graceful stop (``train#run.exit_if_stopped()``, the last step of the
    bundles' ``training`` step list): the process exits with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM), the
    shells' convention, so that ``train && evaluate`` does not go on to evaluate a run that did not finish.

    Attributes:
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        checkpoint: the complete checkpoint a resume continues from (None: none was written yet).
        command: the command that continues the run (None when it cannot be told from this process's arguments).
    """

    def __init__(self, signum: int, checkpoint: str | None, command: str | None) -> None:
        super().__init__(128 + int(signum))
        self.signal_name = signal.Signals(signum).name
        self.checkpoint, self.command = checkpoint, command


def continue_command(argv: list[str] | None = None) -> str | None:
    """The command line that resumes this process's training: its own arguments with ``--resume True`` when it was
    started as ``python -m monai.bundle ...`` (under ``torchrun`` too: the torchrun options are not visible here, so
    None is returned then), else None."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or "LOCAL_RANK" in os.environ:
        return None
    main = os.path.normpath(argv[0])
    if not main.endswith(os.path.join("monai", "bundle", "__main__.py")) and argv[0] not in ("monai.bundle", "-m"):
        return None
    args, rest = [], argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--resume":
            i += 2
            continue
        if arg.startswith("--resume="):
            i += 1
            continue
        args.append(arg)
        i += 1
    return shlex.join(["python", "-m", "monai.bundle", *args, "--resume", "True"])


class StopSignals:
    """SIGINT and SIGTERM caught while installed (between :meth:`install` and :meth:`uninstall`, both from the main
    thread).

    The first signal sets :attr:`requested` (its number) and calls ``on_first(signum)`` at once, from a watcher
    thread; the run polls :attr:`requested` where it can stop. A second signal calls ``on_second(signum)`` and ends
    the process at once with exit status ``128 + signum`` (``os._exit``: nothing else runs; files the project writes
    are atomic, so every complete checkpoint stays complete).

    Outside the main thread (a driver running the trainer in a thread) nothing is installed and the process's own
    handling applies. A signal that arrives after :meth:`uninstall` goes to the handler that was there before.
    """

    def __init__(self, on_first: Callable[[int], None], on_second: Callable[[int], None]) -> None:
        self.on_first, self.on_second = on_first, on_second
        self.requested: int | None = None
        self.installed = False
        self._previous: dict[int, Any] = {}
        self._old_wakeup_fd = -1
        self._write_fd: int | None = None
        self._count = 0

    def install(self) -> bool:
        """Starts catching the signals; False (and nothing changed) outside the main thread."""
        if self.installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            logger.info("the trainer runs outside the main thread: Ctrl-C and SIGTERM are not caught for a graceful stop")
            return False
        self.requested, self._count = None, 0
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            self._old_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except ValueError:  # pragma: no cover - only raised outside the main thread
            os.close(read_fd)
            os.close(write_fd)
            return False
        self._write_fd = write_fd
        self._previous = {s: signal.signal(s, self._python_handler) for s in STOP_SIGNALS}
        self.installed = True
        _INSTALLED.append(self)
        threading.Thread(target=self._watch, args=(read_fd,), name="hmn-stop-signals", daemon=True).start()
        return True

    def uninstall(self) -> None:
        """Gives the signals back to the handlers that had them before :meth:`install`."""
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        self.installed = False
        if self in _INSTALLED:
            _INSTALLED.remove(self)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(self._old_wakeup_fd)
        if self._write_fd is not None:
            os.close(self._write_fd)  # the watcher's read returns end-of-file and it ends
            self._write_fd = None

    def _python_handler(self, signum: int, frame: Any) -> None:
        # The watcher thread has acted on the signal already (it read its number from the wakeup fd); this runs in
        # the main thread between bytecodes. Only a signal caught after uninstall() began goes on to the old handler.
        if self.installed:
            return
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action (end the process) as if never caught
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _watch(self, read_fd: int) -> None:
        try:
            while True:
                try:
                    data = os.read(read_fd, 64)
                except InterruptedError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                for signum in data:
                    if signum not in STOP_SIGNALS or not self.installed:
                        continue
                    self._count += 1
                    if self._count == 1:
                        self.requested = signum
                        self._safely(self.on_first, signum)
                    else:
                        self._safely(self.on_second, signum)
                        _flush_logs()
                        os._exit(128 + signum)
        finally:
            os.close(read_fd)

    @staticmethod
    def _safely(callback: Callable[[int], None], signum: int) -> None:
        try:
            callback(signum)
        except Exception:  # noqa: BLE001 - a message that fails must not keep the run from stopping
            logger.exception("while reporting %s", signal.Signals(signum).name)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers + [h for lg in logging.Logger.manager.loggerDict.values()
                                                  if isinstance(lg, logging.Logger) for h in lg.handlers]:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
