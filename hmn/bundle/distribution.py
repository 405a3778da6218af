"""Getting a shared bundle: downloading a packed zip with a hash check, and fetching the large files its
``large_files.yml`` links (``python -m hmn fetch-large-files``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hmn.bundle.packing import file_hash
from hmn.bundle.table import HASH_TYPES, PLACEHOLDER_URL, TS_PLACEHOLDER_URL

__all__ = ["download_bundle", "fetch_large_files", "fetch_main", "read_large_files"]


def _large_files_path(bundle: Path) -> Path | None:
    # the zoo's CI looks for large_files with these suffixes, the last one found winning
    found = None
    for suffix in ("json", "yaml", "yml"):
        if (bundle / f"large_files.{suffix}").is_file():
            found = bundle / f"large_files.{suffix}"
    return found


def read_large_files(bundle: str | os.PathLike) -> list[dict[str, str]]:
    """The entries of the bundle folder's ``large_files.yml`` (or ``.yaml``, ``.json``), checked; [] without one.

    Raises:
        ValueError: the file is unreadable or not in the zoo's layout: a ``large_files`` list of entries with
            ``path`` (relative, inside the bundle) and ``url`` text, optional ``hash_val`` and ``hash_type``
            (one of :data:`HASH_TYPES`), and no other keys; the message names the file and what is accepted.
    """
    import yaml

    path = _large_files_path(Path(bundle))
    if path is None:
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # JSON is read as YAML too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path} is not readable YAML/JSON ({type(e).__name__}: {e})") from e
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} has no 'large_files' list; accepted: large_files: [{{path, url, hash_val, hash_type}}, ...]")
    accepted = {"path", "url", "hash_val", "hash_type"}
    for i, e in enumerate(entries):
        where = f"{path}, entry {i + 1}"
        if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("url"), str):
            raise ValueError(f"{where}: needs 'path' and 'url' as text, got {e!r}")
        if set(e) - accepted:
            raise ValueError(f"{where}: unknown keys {sorted(set(e) - accepted)}; accepted: {', '.join(sorted(accepted))}")
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{where}: path {e['path']!r} must be relative to the bundle folder and stay inside it")
        if e.get("hash_type") and e["hash_type"] not in HASH_TYPES:
            raise ValueError(f"{where}: hash_type {e['hash_type']!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    return entries


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _large_file_target(bundle: Path, root: str, rel: str, listed: Path | None) -> Path:
    """``bundle/rel``, after checking that neither it nor any folder on the way leads out of the bundle.

    Each existing component is looked at in turn: a folder that is a symbolic link may point elsewhere inside the
    bundle (`root`, the bundle folder resolved), not outside it; the file itself may not be a link at all, nor
    anything but a regular file. The fully resolved path must lie inside `root`."""
    current = bundle
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        current = current / part
        last = i == len(parts) - 1
        if os.path.islink(current):
            where = os.path.realpath(current)
            if last:
                raise ValueError(f"{listed}: {rel}: {current} is a symbolic link to {os.readlink(current)} (resolving to "
                                 f"{where}); refused: a linked file must be a plain file inside the bundle folder {root}")
            if not _within(where, root):
                raise ValueError(f"{listed}: {rel}: {current} is a symbolic link to {os.readlink(current)} (resolving to "
                                 f"{where}), outside the bundle folder {root}; refused: the download would be written there")
        elif os.path.lexists(current) and not (current.is_file() if last else current.is_dir()):
            raise ValueError(f"{listed}: {rel}: {current} exists and is not a {'file' if last else 'folder'}")
    where = os.path.realpath(current)
    if not _within(where, root):
        raise ValueError(f"{listed}: {rel}: {current} resolves to {where}, outside the bundle folder {root}; refused")
    return current


def fetch_large_files(bundle: str | os.PathLike) -> list[str]:
    """Downloads the files the bundle folder's ``large_files.yml`` links (:func:`read_large_files`) to their
    ``path`` and checks each against its ``hash_val``; a file already there is checked, not downloaded
    again. Returns the files' paths ([] for a bundle without ``large_files.yml``).

    The ``hash_val`` of each entry is the trust anchor for its file (an entry without one is downloaded with a
    warning that nothing checks it). Every target is resolved before anything is written: a target that is a
    symbolic link, or a folder on its way that is a link leading out of the bundle folder (as ``unzip`` creates
    from a zip holding links), is refused, naming the entry and where the link points. A download goes to a
    temporary file beside its target, inside the bundle, and is renamed into place only once complete and
    checked, so an interrupted or refused download leaves no partial file.

    Raises:
        FileNotFoundError: `bundle` is not a folder.
        ValueError: the list is malformed; an entry's target or a folder on its way is a symbolic link (see above)
            or not a file/folder; or an entry's ``url`` is :data:`PLACEHOLDER_URL` or :data:`TS_PLACEHOLDER_URL`
            (or any text that is no http(s), ftp or file URL) while its file is absent: the message names the file
            and says what to fill in.
        RuntimeError: a download failed, or a file's digest differs from ``hash_val`` (the message names both).
    """
    import logging
    import shutil
    import tempfile
    from urllib.parse import urlparse

    from monai.apps import download_url

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise FileNotFoundError(f"{bundle} is not a folder: give the unpacked bundle's folder (the one holding configs/)")
    entries = read_large_files(bundle)
    listed = _large_files_path(bundle)
    root = os.path.realpath(bundle)
    out = []
    for e in entries:
        target = _large_file_target(bundle, root, e["path"], listed)
        hash_val, hash_type = e.get("hash_val") or None, e.get("hash_type") or "md5"
        if not target.is_file() and urlparse(e["url"]).scheme not in ("http", "https", "ftp", "file"):
            what = "the placeholder" if e["url"] in (PLACEHOLDER_URL, TS_PLACEHOLDER_URL) else "not a URL:"
            option = "--ts-url" if e["path"] == "models/model.ts" else "--weights-url"
            raise ValueError(
                f"{listed}: the url of {e['path']} is {what} {e['url']!r}, so {target} cannot be downloaded. Put the "
                f"file's download address in 'url' (the packer: python -m hmn pack-bundle ... {option} URL), or "
                f"copy the file to {target}" + (f" ({hash_type} {hash_val})" if hash_val else "")
            )
        if hash_val is None:
            logging.getLogger(__name__).warning(
                "%s lists no hash_val for %s: the file is not checked. The hash is the trust anchor: without it nothing "
                "shows that the file is the one the bundle was packed with", listed, e["path"])
        if target.is_file():
            got = file_hash(target, hash_type) if hash_val else None
            if got != hash_val:
                raise RuntimeError(
                    f"{listed}: {target} is there but its {hash_type} is {got}, not the {hash_val} listed for {e['path']}: "
                    f"it is not the file the bundle was packed with. Delete it to download it again, or copy in the right file"
                )
            out.append(str(target))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=target.parent)
        try:
            part = Path(tmp) / target.name
            try:
                download_url(url=e["url"], filepath=str(part), hash_val=hash_val, hash_type=hash_type, progress=False)
            except (RuntimeError, OSError, ValueError) as err:
                raise RuntimeError(f"{listed}: {e['path']} from {e['url']}: {err}") from err
            if not part.is_file():  # MONAI's download_url passes over a PermissionError in silence
                raise RuntimeError(f"{listed}: {e['path']} from {e['url']}: the download wrote no file")
            # checked again just before the rename (which replaces a link, never writes through one)
            _large_file_target(bundle, root, e["path"], listed)
            os.replace(part, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        out.append(str(target))
    return out


def fetch_main(argv: list[str] | None = None) -> int:
    """``python -m hmn fetch-large-files BUNDLE_FOLDER``: :func:`fetch_large_files`."""
    p = argparse.ArgumentParser(prog="python -m hmn fetch-large-files",
                                description="Download and check the files a bundle's large_files.yml links "
                                "(model.pt, model.ts).")
    p.add_argument("bundle", help="the unpacked bundle's folder (the one holding large_files.yml and configs/)")
    args = p.parse_args(argv)
    try:
        files = fetch_large_files(args.bundle)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(files)} file(s) present and checked" + "".join(f"\n  {f}" for f in files) if files
          else f"{args.bundle} links no large files (no large_files.yml)")
    return 0


def download_bundle(url: str, bundle_dir: str | os.PathLike, name: str, hash_val: str | None = None,
                    hash_type: str = "md5", large_files: bool = True, max_bytes: int | None = None) -> str:
    """Fetches a packed bundle zip from ``url`` into ``bundle_dir/<name>``, checking its hash when given, then
    (`large_files`) the files its ``large_files.yml`` links (:func:`fetch_large_files`: ``model.pt`` and ``model.ts``
    of a bundle packed with ``--link-weights``), each checked against its own hash.

    The hash is the trust anchor: a bundle's configs are code (MONAI evaluates their ``$`` expressions when it
    parses them), so loading a downloaded bundle runs whatever its author wrote, as unpickling does. Give the MD5
    that ``python -m hmn pack-bundle`` printed; a download without `hash_val` logs a warning saying so.
    The zip is downloaded with ``monai.apps.download_url`` (which refuses a file whose `hash_type` digest differs
    from `hash_val`) into a temporary folder inside `bundle_dir`, and extracted by
    :func:`hmn.bundle.archives.extract_bundle_zip`, which refuses, before writing anything, an entry outside ``<name>/``,
    an absolute path or ``..``, a symbolic link, device file or FIFO, a duplicate name, and absurd sizes (declared
    total over `max_bytes`, a decompression bomb), then writes into a temporary folder renamed into place, so a
    refused or damaged zip leaves no ``bundle_dir/<name>``. Afterwards ``monai.bundle.load(name,
    bundle_dir=...)`` finds the bundle locally. (``monai.bundle.download(url=...)`` in MONAI 1.6 takes no hash,
    fetches no large files, and extracts any path inside `bundle_dir`, not only ``<name>/``.)

    Args:
        url: the zip's address (http(s), ftp or file URL).
        bundle_dir: the folder to put ``<name>/`` in (created).
        name: the bundle's folder name inside the zip (a plain folder name, e.g. ``convnext_tiny``).
        hash_val: the zip's digest; None downloads unchecked, with a warning.
        hash_type: one of :data:`HASH_TYPES`.
        large_files: also fetch the files ``large_files.yml`` links.
        max_bytes: limit on the sum of the zip's declared uncompressed sizes, in bytes (default
            :data:`hmn.bundle.archives.MAX_BUNDLE_BYTES`, 8 GiB).

    Raises:
        FileExistsError: ``bundle_dir/<name>`` already exists (it is left as it is; a bundle whose linked files
            are missing is completed with ``python -m hmn fetch-large-files``).
        hmn.bundle.archives.ArchiveError: (a ValueError) the zip is refused; the message names the URL and the entry.
        ValueError: `name` is not a plain folder name, `hash_type` is unknown, the archive holds no
            ``<name>/configs/``, or its ``large_files.yml`` is malformed, links through a symbolic link or still
            has the placeholder URL (see :func:`fetch_large_files`).
        RuntimeError: a download failed or a digest differs.
    """
    import logging
    import shutil
    import tempfile

    from monai.apps import download_url

    from hmn.bundle.archives import MAX_BUNDLE_BYTES, check_bundle_name, extract_bundle_zip

    check_bundle_name(name)
    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    bundle_dir = Path(bundle_dir)
    target = bundle_dir / name
    if os.path.lexists(target):
        raise FileExistsError(f"{target} already exists: remove it to download {url} there again (a bundle whose linked "
                              f"files are missing is completed with: python -m hmn fetch-large-files {target})")
    if not hash_val:
        logging.getLogger(__name__).warning(
            "downloading %s without hash_val: nothing checks that it is the bundle that was packed. The hash is the "
            "trust anchor: a bundle's configs are code that runs when it is loaded. Pass the md5 that "
            "`python -m hmn pack-bundle` printed", url)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.download-", dir=bundle_dir)
    try:
        zip_path = Path(tmp) / f"{name}.zip"
        try:
            download_url(url=url, filepath=str(zip_path), hash_val=hash_val or None, hash_type=hash_type, progress=False)
        except (RuntimeError, OSError, ValueError) as err:
            raise RuntimeError(f"{url}: the download failed: {err}") from err
        if not zip_path.is_file():  # MONAI's download_url passes over a PermissionError in silence
            raise RuntimeError(f"{url}: the download wrote no file")
        extract_bundle_zip(zip_path, bundle_dir, name, archive=url,
                           max_bytes=MAX_BUNDLE_BYTES if max_bytes is None else max_bytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if large_files:
        fetch_large_files(target)
    return str(target)
