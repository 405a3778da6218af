"""One run per folder: an advisory lock a training run holds on its models folder (and an inference on its
predictions CSV) for as long as it runs.

Two trainings started on one ``models/`` folder both pass the "folder already holds a run" check (neither has
written yet) and then destroy each other's files: one removes the other's temporary checkpoint as left by a
stopped writer, both promote best models over each other. :class:`RunLock` makes the second one stop at once,
naming the process that holds the folder.

The lock is a file beside what it guards (``.hmn.lock`` in a folder, ``.<name>.lock`` beside a file) locked
with ``flock(2)`` (``fcntl.flock``). The operating system releases that lock when the holder's process ends,
however it ends (``SIGKILL``, out-of-memory kill, power loss on a local disk), so a lock left by a killed run is
never mistaken for a live one: the next run takes it over and logs whose it was. The file holds the holder's
process id, host, purpose, start time and command line (JSON), which the refusal quotes. It is removed when the
holder releases it, and when the holder's interpreter exits (an error that ends the program included). On NFS,
Linux implements ``flock`` with byte-range locks that the server arbitrates (NFSv4), so runs on two machines
sharing a folder exclude each other too.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from typing import Any

__all__ = ["LOCK_NAME", "RunInUseError", "RunLock", "lock_path"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".hmn.lock"
# the locks this process holds, by lock file: a new RunLock in the same process (a run driven again from Python
# after one that raised) takes the lock over from the earlier object instead of refusing its own process
_HELD: dict[str, RunLock] = {}


def _release_held() -> None:
    """At interpreter exit (a normal end, or an exception that ends the program) every lock this process still
    holds is released and its file removed, so a run that stopped with an error leaves no lock file behind."""
    for lock in list(_HELD.values()):
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - the OS releases the flock when the process ends anyway
            pass


atexit.register(_release_held)


class RunInUseError(RuntimeError):
    """The folder (or file) is held by another run. Attributes: ``path`` (the guarded folder or file),
    ``lock_file``, ``holder`` (the holder's record: ``pid``, ``host``, ``purpose``, ``started``, ``argv``; {}
    when it could not be read)."""

    def __init__(self, path: str, lock_file: str, holder: dict[str, Any]) -> None:
        self.path, self.lock_file, self.holder = path, lock_file, holder
        if holder.get("pid"):
            who = f"{holder.get('purpose', 'a run')} in process {holder['pid']} on {holder.get('host', '?')}"
            if holder.get("started"):
                who += f", started {holder['started']}"
            if holder.get("argv"):
                who += f" ({' '.join(map(str, holder['argv']))[:300]})"
        else:
            who = "another process (its record in the lock file is not readable yet)"
        super().__init__(
            f"{path} is in use by {who}. Two runs on one folder overwrite each other's checkpoints and results: "
            f"wait for that run to end (or stop it), or give this run another folder. The lock is {lock_file}; "
            "the system releases it when its holder's process ends, however it ends"
        )


def lock_path(path: str | os.PathLike, file: bool = False) -> str:
    """The lock file guarding `path`: ``<path>/.hmn.lock`` for a folder, ``<dir>/.<name>.lock`` for a `file`."""
    path = os.fspath(path)
    if not file:
        return os.path.join(path, LOCK_NAME)
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}.lock")


def _rank() -> int:
    """This process's rank: torch.distributed's when it is initialized, else torchrun's ``RANK`` (0 alone)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536)
        record = json.loads(data.decode("utf-8")) if data.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on a run's folder (or output file), held from :meth:`acquire` until :meth:`release`
    or the end of the process.

    Use it as a context manager, call :meth:`acquire` / :meth:`release`, or attach it to an ignite engine as
    a handler (:meth:`attach`: acquired when the engine starts, if not held already). Acquiring a lock this
    object already holds does nothing, so a bundle may acquire it before its checks and the engine again
    when it starts. A lock held by another object of the same process is taken over from it (a workflow run
    again from Python after one that raised): the lock excludes other processes, not threads of one. Under
    ``torchrun`` only rank 0 takes the lock (the other ranks share rank 0's run).

    Args:
        path: the folder (``models/``) or, with `file`, the file (``predictions.csv``) to guard; the folder (the
            file's folder) is created if missing.
        purpose: what the holder does, quoted to a refused run (``"training"``, ``"inference"``).
        file: `path` is a file (locked through ``.<name>.lock`` beside it), not a folder.
        all_ranks: take the lock in every process (e.g. each rank writing its own file), not only on rank 0.

    Raises (from :meth:`acquire`):
        RunInUseError: another process holds the lock; the message names its process id, host, purpose, start
            time and command line.
        OSError: the lock file cannot be created (e.g. a read-only folder); the message names it.
    """

    def __init__(self, path: str | os.PathLike, purpose: str = "training", file: bool = False,
                 all_ranks: bool = False) -> None:
        self.path = os.fspath(path)
        self.purpose = str(purpose)
        self.file = bool(file)
        self.all_ranks = bool(all_ranks)
        self.lock_file: str | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Takes the lock (see the class docstring); returns self."""
        if self._fd is not None:
            return self
        if not self.all_ranks and _rank() != 0:
            return self
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the run goes on unguarded, and says so
            logger.warning("no file locking on this platform: nothing stops a second run from using %s", self.path)
            return self
        lock_file = lock_path(self.path, self.file)
        os.makedirs(os.path.dirname(os.path.abspath(lock_file)), exist_ok=True)
        earlier = _HELD.get(os.path.realpath(lock_file))
        if earlier is not None and earlier is not self:
            logger.info("%s: taking the run lock over from an earlier run of this process", lock_file)
            earlier.release()
        while True:
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise OSError(e.errno, f"cannot create the run lock {lock_file} ({e.strerror})") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunInUseError(self.path, lock_file, holder) from None
            except OSError:
                os.close(fd)
                raise
            # the holder before us may have removed the file between our open and our flock: then we hold a
            # lock on a file nobody else will ever open; start again on the file now at that path
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        if previous.get("pid") and previous["pid"] != os.getpid():
            logger.warning("took over the run lock %s left by %s in process %s on %s (started %s), which ended without "
                           "releasing it", lock_file, previous.get("purpose", "a run"), previous["pid"],
                           previous.get("host", "?"), previous.get("started", "?"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": list(sys.argv)}
        text = json.dumps(record).encode("utf-8")  # ASCII: file names that are not UTF-8 as \udcXX escapes
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, text + b"\n")
        self._fd, self.lock_file = fd, lock_file
        _HELD[os.path.realpath(lock_file)] = self
        return self

    def release(self, engine: Any = None) -> None:
        """Removes the lock file and releases the lock (nothing when not held). `engine` is ignored (so that it
        can be an ignite event handler)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.lock_file and _HELD.get(os.path.realpath(self.lock_file)) is self:
            del _HELD[os.path.realpath(self.lock_file)]
        try:
            if self.lock_file and os.path.exists(self.lock_file):
                os.remove(self.lock_file)  # while still holding it, so no one takes the old file over
        except OSError as e:
            logger.warning("could not remove the run lock %s (%s); the next run takes it over", self.lock_file, e)
        finally:
            os.close(fd)

    def attach(self, engine: Any) -> None:
        """Acquires the lock when `engine` starts (a run driven without the bundle's ``run`` steps still takes
        it); the lock is kept until :meth:`release` or the end of the process."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda _engine: self.acquire())

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # an object dropped while holding it releases it
        if getattr(self, "_fd", None) is not None:
            try:
                self.release()
            except Exception:  # noqa: BLE001 - at interpreter shutdown modules may be gone; the OS releases it
                pass
