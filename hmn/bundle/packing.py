"""Packing a trained bundle for sharing (``python -m hmn pack-bundle``): the configs and metadata of the
trained model, its weights and their TorchScript export ``models/model.ts`` (or a ``large_files.yml`` linking
both), its run record and thresholds, in one zip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from hmn.bundle.files import bundle_files
from hmn.bundle.table import (
    BUNDLES,
    EXPORT_ARGS,
    HASH_TYPES,
    PLACEHOLDER_URL,
    TESTED_WITH,
    TS_PLACEHOLDER_URL,
    _VERSION_KEYS,
)
from hmn.bundle.template import _trained

__all__ = ["LARGE_FILES", "ZOO_FILE_LIMIT", "file_hash", "installed_versions", "large_files_text", "pack_bundle",
           "pack_main", "packed_config", "packed_inference_config", "packed_metadata", "ts_url_beside"]


def installed_versions(packages: tuple[str, ...] | None = None) -> dict[str, str]:
    """The installed version of each distribution in `packages` (default: those of :data:`TESTED_WITH`), as
    exact public versions (a local label such as ``+cu130`` dropped: no package index serves it). A package
    that is not installed keeps its :data:`TESTED_WITH` version, with a warning naming it."""
    import importlib.metadata
    import logging

    out = {}
    for dist in packages or tuple(TESTED_WITH):
        try:
            out[dist] = importlib.metadata.version(dist).split("+", 1)[0]
        except importlib.metadata.PackageNotFoundError:
            logging.getLogger(__name__).warning("%s is not installed here: the packed metadata names the tested "
                                                "version %s", dist, TESTED_WITH.get(dist))
            if dist in TESTED_WITH:
                out[dist] = TESTED_WITH[dist]
    return out


def packed_metadata(metadata: dict, record: dict, versions: dict[str, str] | None = None) -> dict:
    """``metadata.json`` describing the trained model of run record `record`, as MONAI model-zoo bundles do:
    the input's channels and spatial shape, and the output's channels with a ``channel_def`` naming each
    class (then each coarse group of a hierarchical head).

    `versions` (distribution -> exact version, e.g. :func:`installed_versions`) replaces the template's
    ``monai_version``, ``pytorch_version``, ``numpy_version`` and the ``required_packages_version`` entries it
    names, so that the packed bundle says what it was packed with; None keeps the template's."""
    settings = record["settings"]
    out = json.loads(json.dumps(metadata))
    for key, dist in _VERSION_KEYS.items():
        if versions and dist in versions:
            out[key] = versions[dist]
    required = out.get("required_packages_version", {})
    for dist in required:
        if versions and dist in versions:
            required[dist] = versions[dist]
    fmt = out.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    image["num_channels"] = int(settings.get("in_channels", 1))
    size = settings["image_size"]
    # a radiograph model records one side (square images), a volume model its X, Y, Z sizes
    image["spatial_shape"] = [int(v) for v in size] if isinstance(size, (list, tuple)) else [int(size)] * 2
    classes = list(settings["class_names"])
    coarse = int(settings.get("num_coarse_classes") or 0) if settings.get("hierarchical") else 0
    pred = fmt.setdefault("outputs", {}).setdefault("pred", {})
    pred["num_channels"] = len(classes) + coarse
    pred["channel_def"] = {str(i): c for i, c in enumerate(classes + [f"coarse_group_{g}" for g in range(coarse)])}
    return out


_TRAINED_RE = re.compile(r"^\$hmn\.runs\.trained\(@ckpt_dir, '(\w+)', (.*), @use_run_record\)$")


def _literal(value: Any) -> str:
    """`value` as a Python literal for a config expression; "@" and "#" written as "\\x40" and "\\x23" so that
    MONAI neither reads a class name such as "Effusion (L@R)" as a reference nor rewrites "Heart #2"."""
    return repr(value).replace("@", "\\x40").replace("#", "\\x23")


def packed_config(config: dict, record: dict, model_sha256: str) -> dict:
    """A config of a packed bundle: every setting the configs take from a run record (:func:`_trained`)
    defaults to the recorded value (the datalist aside: the recipient has their own), so
    ``monai.bundle.load`` (with either workflow type) and the workflows build the trained model without
    reading the record; ``bundle_root`` is ``"."`` (MONAI's convention: run from the unpacked bundle's folder,
    or pass ``--bundle_root``); and ``model_sha256`` names the packed ``model.pt``, which the evaluation and
    inference workflows check before they run, so they never use other weights under this bundle's classes.
    """
    settings = {k: v for k, v in record["settings"].items() if k != "datalist"}

    def bake(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: bake(v) for k, v in node.items()}
        if isinstance(node, list):
            return [bake(v) for v in node]
        if isinstance(node, str):
            m = _TRAINED_RE.match(node)
            if m and m.group(1) in settings:
                return _trained(m.group(1), _literal(settings[m.group(1)]))
        return node

    out = bake(json.loads(json.dumps(config)))
    if "bundle_root" in out:
        out["bundle_root"] = "."
    out["model_sha256"] = model_sha256
    return out


def packed_inference_config(config: dict, record: dict, model_sha256: str = "") -> dict:
    """``inference.json`` of a packed bundle: :func:`packed_config`, reading no record at run time."""
    out = packed_config(config, record, model_sha256)
    out["use_run_record"] = False
    return out


# Files over this size the MONAI model zoo does not take into its repository: they are linked from
# large_files.yml (the zoo's CONTRIBUTING.md, "Model storage": 25 MB).
ZOO_FILE_LIMIT = 25_000_000
LARGE_FILES = "large_files.yml"


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """The hex digest of the file at `path` (read in 1 MiB blocks).

    Raises:
        ValueError: `hash_type` is not one of :data:`HASH_TYPES`.
    """
    import hashlib

    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def large_files_text(entries: list[dict[str, str]]) -> str:
    """``large_files.yml`` listing `entries` (``path``, ``url``, ``hash_val``, ``hash_type`` each), in the MONAI
    model zoo's layout, with a comment saying what the file is for and what to fill in."""
    import yaml

    head = (
        "# Files of this bundle that are linked rather than included (the MONAI model zoo's large_files.yml).\n"
        "# Each is downloaded to `path` (relative to the bundle folder) and checked against `hash_val` by\n"
        "# `python -m hmn fetch-large-files BUNDLE_FOLDER`, hmn.bundle.download_bundle and the zoo's CI.\n"
        f"# A url of {PLACEHOLDER_URL!r} (or {TS_PLACEHOLDER_URL!r}) is a placeholder: upload the file and put\n"
        "# its download URL there.\n"
    )
    return head + yaml.safe_dump({"large_files": entries}, sort_keys=False, default_flow_style=False, width=1000)


def ts_url_beside(weights_url: str | None) -> str | None:
    """Where ``model.ts`` is taken to be downloaded from when only the weights' URL is given: beside ``model.pt``
    (`weights_url` with its last path segment ``model.pt`` replaced by ``model.ts``); None when `weights_url` is
    None, does not end in ``/model.pt``, or has a query or fragment (a file host's share link says nothing about
    where another file will be)."""
    from urllib.parse import urlparse, urlunparse

    if not weights_url:
        return None
    parts = urlparse(weights_url)
    if parts.query or parts.fragment or parts.params or not parts.path.endswith("/model.pt"):
        return None
    return urlunparse(parts._replace(path=parts.path[: -len("model.pt")] + "model.ts"))


def _check_url(url: str, what: str) -> None:
    from urllib.parse import urlparse

    if urlparse(url).scheme not in ("http", "https", "ftp", "file"):
        raise ValueError(f"{what} URL {url!r} is not an http(s), ftp or file URL")


def pack_bundle(name: str, zip_path: str | os.PathLike, models_dir: str | os.PathLike | None = None,
                bundles_dir: str | os.PathLike = "bundles", link_weights: bool = False, weights_url: str | None = None,
                hash_type: str = "sha256", ts_url: str | None = None, *, torchscript: bool = True) -> str:
    """Zips bundle ``name`` (configs, docs, LICENSE) with the trained ``models/model.pt``, its TorchScript export
    ``models/model.ts``, its run record ``models/run.json`` and, where training recorded them, the validation
    split's operating thresholds ``models/thresholds.json``, for sharing.

    The archive holds one top-level folder ``<name>/``, the layout ``monai.bundle.download`` extracts and the
    MONAI model zoo's ``models/<name>/``: ``configs/metadata.json``, ``configs/inference.json``, ``LICENSE``
    and the weights at ``models/model.pt`` (the zoo's CI requires these). ``models_dir`` is where the trained
    ``model.pt`` and ``run.json`` lie (default: the bundle's own ``models/``); the full-state
    ``checkpoint_epoch=*.pt`` files are left out. The packed configs read the run record (:mod:`hmn.runs`), so
    evaluation, inference and ``monai.bundle.load`` rebuild the trained model; ``configs/metadata.json`` is
    rewritten to describe it and to name the package versions installed here (:func:`packed_metadata`,
    :func:`installed_versions`), and ``configs/inference.json`` carries the recorded settings itself
    (:func:`packed_inference_config`).

    ``models/model.ts`` is exported on the CPU by MONAI's ``ckpt_export`` with the bundle's
    ``configs/export_torchscript.json`` from exactly the packed ``inference.json`` and ``metadata.json`` (which it
    embeds as its extra files of those names), and checked before anything is written: loaded back, it gives
    those two configs and the logits of the PyTorch network built from them with ``model.pt``
    (:func:`hmn.bundle.torchscript.export_packed_torchscript`). MONAI Deploy's ``MonaiBundleInferenceOperator``
    loads it first, with ``torch.jit.load``. It is stored uncompressed (a TorchScript file is itself a zip of
    raw tensors: deflating it saves a few percent and costs seconds).

    Args:
        name: a bundle of :data:`BUNDLES`.
        zip_path: the archive to write (its folder is created).
        models_dir: the folder of ``model.pt`` and ``run.json``.
        bundles_dir: the folder of the generated bundles.
        link_weights: leave ``models/model.pt`` and ``models/model.ts`` out of the archive and write
            ``large_files.yml`` at the bundle's root instead (the zoo links files over 25 MB, and links both, as
            its own bundles do): one entry per file with ``path``, ``url`` and ``hash_val`` / ``hash_type``
            computed here; ``url`` is `weights_url` or :data:`PLACEHOLDER_URL` for ``model.pt``, and `ts_url`,
            else :func:`ts_url_beside` `weights_url`, else :data:`TS_PLACEHOLDER_URL` for ``model.ts``. The files
            to upload are ``models_dir/model.pt`` itself and ``models_dir/model.ts``, written there (replacing
            any earlier one) once checked.
        weights_url: where ``model.pt`` will be downloaded from; giving it implies `link_weights`.
        hash_type: the digest written to ``large_files.yml``: one of :data:`HASH_TYPES` (the zoo's own
            files use md5).
        ts_url: where ``model.ts`` will be downloaded from; giving it implies `link_weights`.
        torchscript: False leaves ``models/model.ts`` out (and out of ``large_files.yml``), so that MONAI
            Deploy can only run the bundle through ``model.pt`` and the ``hmn`` package; for callers whose
            export is checked elsewhere (the repository's tests of every bundle). The command line always exports.

    Raises:
        FileNotFoundError: no bundle `name`, no ``model.pt``, or no ``run.json`` beside it (without the
            record a packed bundle could not know the model's classes and image size).
        ValueError: `hash_type` is not one of :data:`HASH_TYPES`, or `weights_url` or `ts_url` is empty or not
            an http(s), ftp or file URL.
        hmn.bundle.torchscript.TorchScriptExportError: the export of ``model.ts`` failed or its check did; the
            message names the bundle (nothing is written).
        hmn.checkpoints.CheckpointReadError: ``model.pt`` cannot be read.
    """
    import tempfile
    import zipfile

    from hmn.bundle.torchscript import export_packed_torchscript
    from hmn.runs import RUN_RECORD, read_run_record

    if hash_type not in HASH_TYPES:
        raise ValueError(f"hash type {hash_type!r} is not supported; accepted: {', '.join(HASH_TYPES)}")
    for url, what in ((weights_url, "weights"), (ts_url, "model.ts")):
        if url is not None:
            _check_url(url, what)
            link_weights = True
    src = Path(bundles_dir) / name
    if not (src / "configs" / "train.json").is_file():
        raise FileNotFoundError(f"{src} is not a bundle (no configs/train.json); known bundles: {', '.join(BUNDLES)}")
    models = Path(models_dir or src / "models")
    model = models / "model.pt"
    if not model.is_file():
        raise FileNotFoundError(f"no trained weights at {model}: train the bundle first, or pass models_dir")
    record = read_run_record(models)
    if record is None:
        raise FileNotFoundError(
            f"no {RUN_RECORD} beside {model}: without the run record a packed bundle cannot know the model's classes, "
            "image size and architecture (training writes it; a model trained before run records can be recorded "
            "with hmn.runs.write_run_record)"
        )
    sha = file_hash(model, "sha256")
    # the packed configs, as text: model.ts embeds exactly what the zip holds
    packed: dict[str, str] = {}
    for rel, pack in (("configs/metadata.json", lambda c: packed_metadata(c, record, installed_versions())),
                      ("configs/inference.json", lambda c: packed_inference_config(c, record, sha)),
                      ("configs/train.json", lambda c: packed_config(c, record, sha))):
        packed[rel] = json.dumps(pack(json.loads((src / rel).read_text())), indent=4) + "\n"
    zip_path = Path(zip_path)
    with tempfile.TemporaryDirectory(prefix=f"hmn-pack-{name}-") as tmp:
        ts = None
        if torchscript:
            # linked: written beside model.pt, the two files to upload; packed: kept here until zipped
            ts = export_packed_torchscript(name, packed["configs/inference.json"], packed["configs/metadata.json"],
                                           src / EXPORT_ARGS["torchscript"], model,
                                           models / "model.ts" if link_weights else Path(tmp) / "model.ts")
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in bundle_files(name):
                if rel in packed:
                    zf.writestr(f"{name}/{rel}", packed[rel])
                else:
                    zf.write(src / rel, f"{name}/{rel}")
            if link_weights:
                entries = [{"path": "models/model.pt", "url": weights_url or PLACEHOLDER_URL,
                            "hash_val": sha if hash_type == "sha256" else file_hash(model, hash_type),
                            "hash_type": hash_type}]
                if ts is not None:
                    entries.append({"path": "models/model.ts",
                                    "url": ts_url or ts_url_beside(weights_url) or TS_PLACEHOLDER_URL,
                                    "hash_val": file_hash(ts, hash_type), "hash_type": hash_type})
                zf.writestr(f"{name}/{LARGE_FILES}", large_files_text(entries))
            else:
                zf.write(model, f"{name}/models/model.pt")
                if ts is not None:
                    zf.write(ts, f"{name}/models/model.ts", compress_type=zipfile.ZIP_STORED)
            # the recipient has their own data: the local datalist path stays here
            shared = {**record, "settings": {k: v for k, v in record["settings"].items() if k != "datalist"}}
            zf.writestr(f"{name}/models/{RUN_RECORD}", json.dumps(shared, indent=1) + "\n")
            # the validation split's operating thresholds travel with the model they were fitted for
            if (models / "thresholds.json").is_file():
                zf.write(models / "thresholds.json", f"{name}/models/thresholds.json")
    return str(zip_path)


def pack_main(argv: list[str] | None = None) -> int:
    """``python -m hmn pack-bundle NAME ZIP [--models-dir DIR] [--link-weights] [--weights-url URL] [--ts-url URL]
    [--hash-type T]``."""
    from hmn.bundle.torchscript import TorchScriptExportError
    from hmn.checkpoints import CheckpointReadError

    p = argparse.ArgumentParser(prog="python -m hmn pack-bundle",
                                description="Zip a bundle with its trained model.pt, its TorchScript export model.ts "
                                "(exported and checked here, on the CPU) and its run record.")
    p.add_argument("name", choices=list(BUNDLES))
    p.add_argument("zip", help="output .zip")
    p.add_argument("--models-dir", default=None, help="folder holding model.pt and run.json (default: bundles/NAME/models)")
    p.add_argument("--bundles-dir", default="bundles")
    p.add_argument("--link-weights", action="store_true",
                   help="leave models/model.pt and models/model.ts out of the zip and write large_files.yml (their "
                   "URLs, hashes and hash type) instead, as the MONAI model zoo wants for files over 25 MB; model.ts "
                   "is written beside model.pt in the models folder, for upload")
    p.add_argument("--weights-url", default=None,
                   help="where model.pt will be downloaded from (implies --link-weights; without it large_files.yml "
                   "holds a placeholder that the loaders refuse until it is filled in)")
    p.add_argument("--ts-url", default=None,
                   help="where model.ts will be downloaded from (implies --link-weights; default: beside model.pt, the "
                   "--weights-url with its last segment model.pt replaced by model.ts, where it ends so; else a "
                   "placeholder)")
    p.add_argument("--hash-type", default="sha256", choices=HASH_TYPES,
                   help="digest of model.pt and model.ts in large_files.yml (default: %(default)s; the zoo's own files "
                   "use md5)")
    args = p.parse_args(argv)
    try:
        path = pack_bundle(args.name, args.zip, args.models_dir, args.bundles_dir, link_weights=args.link_weights,
                           weights_url=args.weights_url, hash_type=args.hash_type, ts_url=args.ts_url)
    except (OSError, ValueError, TorchScriptExportError, CheckpointReadError) as e:  # OSError: FileNotFoundError too
        print(f"error: {e}", file=sys.stderr)
        return 1
    md5 = file_hash(path, "md5")
    model = Path(args.models_dir or Path(args.bundles_dir) / args.name / "models") / "model.pt"
    print(f"wrote {path} (models/model.ts exported and checked against the PyTorch network)")
    print(f"md5 {md5}: give it to the download, hmn.bundle.download_bundle(url, bundle_dir, {args.name!r}, hash_val={md5!r})")
    if args.link_weights or args.weights_url or args.ts_url:
        placeholder = f"an address of your choice, then replace the placeholder url in {args.name}/{LARGE_FILES}"
        print(f"models/model.pt is linked, not included: upload {model} ({args.hash_type} in {LARGE_FILES}) to "
              f"{args.weights_url or placeholder}")
        ts_url = args.ts_url or ts_url_beside(args.weights_url)
        print(f"models/model.ts is linked, not included: upload {model.with_name('model.ts')} ({args.hash_type} in "
              f"{LARGE_FILES}) to {ts_url or placeholder}")
    else:
        size = model.stat().st_size
        if size > ZOO_FILE_LIMIT:
            print(f"note: {model} is {size / 1e6:.0f} MB (and models/model.ts about as large); the MONAI model zoo "
                  "takes files up to 25 MB: pack with --link-weights --weights-url URL for a zoo submission")
    return 0
