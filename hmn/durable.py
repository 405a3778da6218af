"""Atomic, durable file writes for everything a run saves (checkpoints, the best model, history, reports).

A file is written to a temporary file beside it (``.<name>.partial``, in the same folder so that the
rename cannot cross file systems), flushed and ``fsync``'ed, renamed over the target with
:func:`os.replace` (atomic on POSIX and Windows), and the folder is ``fsync``'ed so that the rename itself
survives a power cut. A reader therefore sees either the old complete file or the new complete file,
never a part of one, whenever the writer is stopped (``SIGKILL``, out-of-memory kill, preemption, power
loss). The file gets the permissions an ordinary ``open(path, "w")`` would give it (``0o666`` less the
umask: usually group and others may read, as MONAI's checkpoint saver wants), not the owner-only mode of
:func:`tempfile.mkstemp`.

A full disk (``ENOSPC``, or ``EDQUOT`` over a quota) raises :class:`InsufficientDiskSpaceError`, which names
the folder, the space needed and the space free; the temporary file is removed and the target is left as
it was. :func:`atomic_torch_save` also checks the free space before it writes, from the size of the
tensors it is given, so that a checkpoint that cannot fit is refused before any byte is written.

Text files are UTF-8. A file name that is not valid UTF-8 (Linux allows any bytes; Python hands such a name
over with each undecodable byte as a lone surrogate, PEP 383) cannot be encoded as such, so text writers use
the error handler :data:`PATH_ERRORS`, which writes each such byte as ``\\xNN`` (``caf\\xe9.png`` for the
Latin-1 name ``café.png``): the file stays valid UTF-8, and :func:`portable_text` gives the same text for
comparing a path with what a file holds.
"""

from __future__ import annotations

import errno
import logging
import os
import codecs
import shutil
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "InsufficientDiskSpaceError",
    "PARTIAL_SUFFIX",
    "PATH_ERRORS",
    "atomic_torch_save",
    "atomic_write",
    "estimated_size",
    "fsync_dir",
    "partial_path",
    "portable_text",
]

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
# what torch.save adds to the tensors' bytes: the pickled structure and the zip records (measured: under
# 100 KB for a ConvNeXt-L full-state checkpoint); the margin keeps the free-space check on the safe side
_SAVE_OVERHEAD = 1 << 20
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


# the codec error handler text writers use (see the module docstring)
PATH_ERRORS = "hmn.path_bytes"


def _path_bytes(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start:error.end]
    # U+DC80..U+DCFF: a byte 0x80..0xFF the OS gave that was not UTF-8 (PEP 383 surrogateescape); any
    # other code point that cannot be encoded (a lone surrogate from elsewhere) as its \uXXXX escape
    out = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else f"\\u{ord(c):04x}" for c in bad)
    return out, error.end


codecs.register_error(PATH_ERRORS, _path_bytes)


def portable_text(text: str) -> str:
    """`text` as a UTF-8 text file written by this project holds it: unchanged when it is valid Unicode;
    otherwise each byte of a file name that was not UTF-8 as ``\\xNN`` (see :data:`PATH_ERRORS`)."""
    return text.encode("utf-8", PATH_ERRORS).decode("utf-8")


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


class InsufficientDiskSpaceError(OSError):
    """The disk (or quota) holding `folder` has no room for `path`.

    Attributes: ``folder``, ``path``, ``needed`` (bytes, estimated; None when unknown), ``free`` (bytes).
    It is an ``OSError`` with ``errno.ENOSPC``, so handlers of a full disk catch it as they would the
    operating system's own error.
    """

    def __init__(self, folder: str, path: str, needed: int | None, free: int | None) -> None:
        self.folder, self.path, self.needed, self.free = folder, path, needed, free
        need = f"about {_mb(needed)}" if needed else "more space"
        have = f"{_mb(free)} free" if free is not None else "free space unknown"
        super().__init__(
            errno.ENOSPC,
            f"not enough disk space in {folder} to write {os.path.basename(path)}: it needs {need}, {have}. "
            "Nothing there was changed (every complete file, the last checkpoint included, is as it was); "
            "free some space or write elsewhere (bundles: --ckpt_dir / --output_dir), then resume",
        )


def partial_path(path: str | os.PathLike) -> str:
    """The temporary file :func:`atomic_write` writes before renaming it to `path`: ``<folder>/.<name>.partial``."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flushes a folder's entries (a rename or removal inside it) to disk. A no-op where folders cannot be
    opened for that (Windows)."""
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems refuse fsync on a folder; the data itself is already synced
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _free_bytes(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def estimated_size(obj: Any) -> int:
    """Bytes :func:`torch.save` will write for `obj`, from above: the storages of every tensor in the
    (nested) dicts, lists and tuples, each storage once, plus 1 MB for the pickled structure."""
    seen: set[tuple[str, int]] = set()
    total = _SAVE_OVERHEAD
    for t in _tensors(obj):
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _check_free_space(folder: str, path: str, needed: int) -> None:
    free = _free_bytes(folder)
    if free is not None and needed > free:
        raise InsufficientDiskSpaceError(folder, path, needed, free)


# The three steps of a write are separate functions so that tests can stop a writer between them.
def _write_partial(tmp: str, write: Callable[[Any], None], binary: bool) -> None:
    """Writes the temporary file completely and syncs its data to disk (a leftover one is removed first, by
    :func:`atomic_write`, so it is created afresh with the default mode)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    kwargs: dict[str, Any] = {} if binary else {"newline": "", "encoding": "utf-8", "errors": PATH_ERRORS}
    with os.fdopen(fd, "wb" if binary else "w", **kwargs) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _commit(tmp: str, path: str) -> None:
    """Renames the complete temporary file over `path` and syncs the folder, so the rename is on disk."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def _discard(tmp: str) -> None:
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass


def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False, expected_size: int | None = None
) -> str:
    """Writes `path` atomically and durably: ``write(file)`` fills a temporary file beside it, which is
    synced and renamed over `path` (see the module docstring).

    Args:
        path: the file to write; its folder is created if missing.
        write: called once with the open temporary file (text with ``newline=""`` and UTF-8, or binary).
        binary: open the temporary file in binary mode.
        expected_size: bytes the write will need; when given, a disk with less free space is refused
            before anything is written.

    Returns:
        `path`.

    Raises:
        InsufficientDiskSpaceError: the disk is (or became) full; `path` is unchanged.
        Whatever `write` raises, after removing the temporary file; `path` is unchanged.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = partial_path(path)
    if os.path.lexists(tmp):  # left by a writer that was stopped; its space is free for this write
        os.remove(tmp)
    if expected_size is not None:
        _check_free_space(folder, path, expected_size)
    try:
        _write_partial(tmp, write, binary)
        _commit(tmp, path)
    except OSError as e:
        _discard(tmp)
        if e.errno in _DISK_FULL and not isinstance(e, InsufficientDiskSpaceError):
            raise InsufficientDiskSpaceError(folder, path, expected_size, _free_bytes(folder)) from e
        raise
    except BaseException:
        _discard(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """:func:`torch.save` of `obj` to `path` through :func:`atomic_write`, refusing before writing when the
    disk's free space is below :func:`estimated_size` of `obj`. Returns `path`; raises as :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), binary=True, expected_size=estimated_size(obj))
