"""Safe extraction of a downloaded bundle zip: every entry is checked before anything is written.

A zip names its own paths, so a hostile one can write over its neighbours (``victim/models/model.pt`` in a
zip for ``convnext_tiny``), escape with ``..`` or an absolute path, plant a symbolic link or a device file,
or expand to far more than it weighs. :func:`extract_bundle_zip` refuses all of these before it writes a
byte, then writes the files into a temporary folder beside the target and renames it into place, so a
failure leaves no half-written bundle. The archive format is PKWARE's APPNOTE (the ZIP File Format
Specification); the Unix file type of an entry is the high 16 bits of its "external file attributes".
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

__all__ = ["ArchiveError", "MAX_BUNDLE_BYTES", "MAX_ENTRIES", "MAX_RATIO", "check_bundle_name", "check_zip_entries",
           "extract_bundle_zip"]

MAX_BUNDLE_BYTES = 8 * 2**30
"""Default limit on the sum of the declared uncompressed sizes of a bundle zip's files (8 GiB: the largest
bundle's ``model.pt`` is well under 1 GiB)."""
MAX_RATIO = 200
"""Default limit on an entry's uncompressed / compressed size (model weights compress about 1.1:1, configs about
5:1; DEFLATE reaches about 1000:1 on repeated bytes), applied to entries over :data:`RATIO_FLOOR` bytes."""
RATIO_FLOOR = 1 << 20
MAX_ENTRIES = 10_000
"""Default limit on the number of entries (a bundle holds a few dozen)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """An archive that :func:`extract_bundle_zip` refuses; the message names the archive, the entry and why.

    Attributes:
        archive: the archive (its URL or path).
        entry: the offending entry's name as stored in the zip, or None for the archive as a whole.
        reason: what is wrong, and what is accepted.
    """

    def __init__(self, archive: str, entry: str | None, reason: str) -> None:
        self.archive, self.entry, self.reason = archive, entry, reason
        super().__init__(f"{archive}: entry {entry!r}: {reason}" if entry is not None else f"{archive}: {reason}")


def check_bundle_name(name: str) -> str:
    """`name` if it is one plain folder name (letters, digits, ``.``, ``_``, ``-``, not starting with ``.``).

    Raises:
        ValueError: anything else (a path, ``..``, an empty name).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"bundle name {name!r} is not a plain folder name; accepted: letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit")
    return name


def _kind(info: zipfile.ZipInfo) -> str:
    """'file', 'dir', or the refused Unix file type of an entry (mode 0: no Unix type recorded, as from DOS)."""
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if fmt == 0:
        return "dir" if info.filename.endswith("/") else "file"
    if stat.S_ISREG(fmt):
        return "file"
    if stat.S_ISDIR(fmt):
        return "dir"
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(fmt):
            return what
    return f"an unknown file type (mode {mode:o})"


def check_zip_entries(zf: zipfile.ZipFile, name: str, archive: str, max_bytes: int = MAX_BUNDLE_BYTES,
                      max_ratio: float = MAX_RATIO, max_entries: int = MAX_ENTRIES) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Checks every entry of an opened bundle zip without extracting anything; returns (entry, path parts) pairs.

    Accepted: regular files and folders whose names are relative ``/``-separated paths under ``<name>/``
    (no empty, ``.`` or ``..`` part, no backslash), each name once (also when compared without case, as
    macOS and Windows file systems do, and no name both a file and a folder), at most `max_entries` entries,
    declared uncompressed sizes summing to at most `max_bytes`, and no file over 1 MiB whose size is more than
    `max_ratio` times its compressed size. The archive must hold ``<name>/configs/``.

    Raises:
        ArchiveError: the first entry that breaks a rule (named, with the rule), or the archive as a whole.
    """
    check_bundle_name(name)
    infos = zf.infolist()
    if len(infos) > max_entries:
        raise ArchiveError(archive, None, f"has {len(infos)} entries; a bundle has at most {max_entries}")
    seen: dict[str, str] = {}
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    out = []
    total = 0
    for info in infos:
        entry = info.orig_filename
        if "\x00" in entry or "\\" in entry:
            raise ArchiveError(archive, entry, "has a NUL byte or a backslash in its name; accepted: '/'-separated paths")
        if entry.startswith("/") or re.match(r"[A-Za-z]:", entry):
            raise ArchiveError(archive, entry, "is an absolute path; accepted: paths relative to the bundle, under "
                               f"{name}/")
        kind = _kind(info)
        if kind not in ("file", "dir"):
            raise ArchiveError(archive, entry, f"is {kind}; accepted: regular files and folders")
        if kind == "dir" and not entry.endswith("/"):
            raise ArchiveError(archive, entry, "is marked as a folder but its name does not end with '/'")
        parts = tuple(entry[:-1].split("/") if entry.endswith("/") else entry.split("/"))
        if any(p in ("", ".", "..") for p in parts):
            raise ArchiveError(archive, entry, "has an empty, '.' or '..' part in its path; accepted: plain relative paths "
                               f"under {name}/")
        if parts[0] != name:
            raise ArchiveError(archive, entry, f"lies outside the bundle folder {name}/; every entry must be under {name}/")
        if kind == "dir" or entry.endswith("/"):
            if info.file_size:
                raise ArchiveError(archive, entry, f"is a folder entry with {info.file_size} bytes of data")
            kind = "dir"
        folded = "/".join(parts).casefold()
        if folded in seen:
            same = seen[folded] == entry
            raise ArchiveError(archive, entry, "appears twice in the archive" if same else
                               f"differs from entry {seen[folded]!r} only by letter case (they would be one file on "
                               "macOS and Windows)")
        seen[folded] = entry
        (files if kind == "file" else dirs).add(tuple(p.casefold() for p in parts))
        if kind == "file":
            total += info.file_size
            if total > max_bytes:
                raise ArchiveError(archive, entry, f"brings the declared uncompressed size to {total} bytes, over the "
                                   f"limit of {max_bytes} bytes (max_bytes)")
            if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
                raise ArchiveError(archive, entry, f"expands from {info.compress_size} to {info.file_size} bytes, a ratio "
                                   f"over the limit of {max_ratio}:1 (max_ratio): refused as a decompression bomb")
        out.append((info, parts))
    for parts in files:
        for i in range(1, len(parts)):
            if parts[:i] in files:
                raise ArchiveError(archive, "/".join(parts[:i]), "is a file and also the folder of other entries")
    if not any(len(p) > 2 and p[1] == "configs" for p in files):
        raise ArchiveError(archive, None, f"holds no bundle: no files under {name}/configs/")
    return out


_DAMAGED = (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, OSError, ValueError, zlib.error,
            lzma.LZMAError)


def _open(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str):
    """The entry opened for reading; an encrypted entry, an unsupported method or a bad local header as
    :class:`ArchiveError`."""
    try:
        return zf.open(info)
    except _DAMAGED as e:
        raise ArchiveError(archive, info.orig_filename, f"cannot be extracted ({type(e).__name__}: {e})") from e


def _read(src, archive: str, info: zipfile.ZipInfo) -> bytes:
    """The next block of an entry's data; damaged data (bad CRC-32, a broken stream) as :class:`ArchiveError`."""
    try:
        return src.read(_CHUNK)
    except _DAMAGED as e:
        raise ArchiveError(archive, info.orig_filename, f"cannot be extracted ({type(e).__name__}: {e})") from e


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def extract_bundle_zip(zip_path: str | os.PathLike, dest_dir: str | os.PathLike, name: str, archive: str | None = None,
                       max_bytes: int = MAX_BUNDLE_BYTES, max_ratio: float = MAX_RATIO,
                       max_entries: int = MAX_ENTRIES) -> str:
    """Extracts bundle `name` from `zip_path` to ``dest_dir/<name>``, refusing a hostile archive before writing.

    All entries are checked first (:func:`check_zip_entries`); the files are then written into a temporary folder
    inside `dest_dir`, each to a resolved path checked to stay inside it, at most its declared size each, and the
    folder is renamed to ``dest_dir/<name>`` only when every file was written and its CRC-32 matched. On any
    failure the temporary folder is removed and ``dest_dir/<name>`` does not exist.

    Args:
        zip_path: the zip file (PKWARE APPNOTE format; stored, deflated, bzip2 or LZMA entries).
        dest_dir: the folder to extract into (created).
        name: the bundle's folder name, which every entry must lie under.
        archive: how to name the archive in errors (default: `zip_path`); :func:`hmn.bundle.download_bundle`
            gives the URL.
        max_bytes, max_ratio, max_entries: the limits of :func:`check_zip_entries`.

    Returns:
        the path of ``dest_dir/<name>``.

    Raises:
        ArchiveError: a refused entry, an unreadable zip, or an entry whose data is damaged (named).
        FileExistsError: ``dest_dir/<name>`` already exists (it is left as it is).
        ValueError: `name` is not a plain folder name.
    """
    check_bundle_name(name)
    archive = str(archive or zip_path)
    dest_dir = Path(dest_dir)
    final = dest_dir / name
    if os.path.lexists(final):
        raise FileExistsError(f"{final} already exists: remove it (or give another folder) to extract {archive} there")
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArchiveError(archive, None, f"is not a readable zip file ({type(e).__name__}: {e})") from e
    with zf:
        entries = check_zip_entries(zf, name, archive, max_bytes, max_ratio, max_entries)
        dest_dir.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}.extracting-", dir=dest_dir)
        try:
            root = os.path.realpath(staging)
            for info, parts in entries:
                target = os.path.join(root, *parts)
                folder = target if info.filename.endswith("/") else os.path.dirname(target)
                os.makedirs(folder, exist_ok=True)
                if not _inside(os.path.realpath(folder), root) or not _inside(os.path.realpath(target), root):
                    raise ArchiveError(archive, info.orig_filename, f"resolves outside the extraction folder {root}")
                if info.filename.endswith("/"):
                    continue
                # O_EXCL | O_NOFOLLOW: never write through a link or over a file planted meanwhile
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out, _open(zf, info, archive) as src:
                    written = 0
                    while block := _read(src, archive, info):
                        written += len(block)
                        if written > info.file_size:
                            raise ArchiveError(archive, info.orig_filename, "holds more data than its declared size "
                                               f"of {info.file_size} bytes")
                        out.write(block)
            os.rename(os.path.join(root, name), final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(final)
