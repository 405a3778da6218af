"""The MONAI model zoo's bundle checks, written for the project's tests (not the zoo's code).

What the zoo's CI (Project-MONAI/model-zoo, ``ci/verify_bundle.py``, ``ci/utils.py``,
``ci/get_bundle_requirements.py``, ``ci/unit_tests/``) does with a bundle in ``models/<name>/``, in its order:

1. Downloads the files ``large_files.yml`` (or ``.yaml``, ``.json``; the last of json, yaml, yml found)
   links: each entry's ``path``/``url``/``hash_val``/``hash_type`` go to ``monai.apps.download_url`` as
   keyword arguments (empty ``hash_val``/``hash_type`` dropped, ``path`` made ``filepath`` under the bundle);
   a file already there is hash-checked instead of downloaded.
2. Requires ``configs/metadata.json`` and ``LICENSE``, then ``models/model.pt`` and an inference config
   (``configs/inference.json``/``.yaml``/``.yml``).
3. Requires ``version`` and ``changelog`` in the metadata, with the version among the changelog's keys.
4. ``monai.bundle.verify_metadata`` against the schema the metadata's ``schema`` URL names (CI downloads it to
   ``eval/schema.json``).
5. (GPU "full" mode) the inference workflow's properties, only when the metadata has ``supported_apps``;
   ``verify_net_in_out`` on ``network_def`` of the inference config; ``ckpt_export`` of ``network_def`` from
   the inference config and ``models/model.pt`` to ``models/verify_model.ts`` (scripted: no ``use_trace``, no
   args file), and ``torch.jit.load`` of a provided ``models/model.ts``.
6. Before all that, pip-installs the lines ``get_bundle_requirements.py`` writes: ``monai==<monai_version>``
   (with ``ALLOW_MONAI_RC``: ``monai>=<v>rc1,<next patch>``), ``torch==<pytorch_version>``,
   ``numpy==<numpy_version>``, then ``name==value`` for every entry of ``optional_packages_version`` and
   ``required_packages_version``.
7. Per-bundle unit tests build the train, train+evaluate (as a "train" workflow) and infer workflows with
   ``ConfigWorkflow`` and check their properties before running them (here: train+evaluate and infer).

Each function raises ``AssertionError`` naming the bundle file and what the zoo wants.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NECESSARY_FILES = ("configs/metadata.json", "LICENSE")
PREFERRED_FILES = ("models/model.pt", "configs/inference")  # the inference config with any of the suffixes
LARGE_FILE_KEYS = {"path", "url", "hash_val", "hash_type"}  # download_url's arguments the zoo passes through
ZOO_HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
ZOO_FILE_LIMIT = 25 * 1000 * 1000  # CONTRIBUTING.md, "Model storage": no file over 25 MB in the repository


def find_bundle_file(folder: str | os.PathLike, stem: str) -> str | None:
    """``stem.json``, ``stem.yaml`` or ``stem.yml`` in `folder`, the last of them found (as the zoo picks)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    found = None
    for suffix in ("json", "yaml", "yml"):
        if f"{stem}.{suffix}" in names:
            found = f"{stem}.{suffix}"
    return found


def read_large_files(bundle: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of the bundle's large_files file ([] without one), checked for the zoo's format: a
    ``large_files`` list whose entries have ``path`` and ``url`` and no key ``download_url`` would reject."""
    from monai.bundle import ConfigParser

    name = find_bundle_file(bundle, "large_files")
    if name is None:
        return []
    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, name))
    entries = parser.get()["large_files"]
    assert isinstance(entries, list), f"{bundle}/{name}: 'large_files' must be a list"
    for e in entries:
        assert {"path", "url"} <= set(e), f"{bundle}/{name}: entry {e} needs 'path' and 'url'"
        assert set(e) <= LARGE_FILE_KEYS, f"{bundle}/{name}: entry keys {sorted(e)}; the zoo passes only {sorted(LARGE_FILE_KEYS)}"
        if e.get("hash_type"):
            assert e["hash_type"] in ZOO_HASH_TYPES, f"{bundle}/{name}: hash_type {e['hash_type']!r} not in {ZOO_HASH_TYPES}"
    return entries


def download_large_files(bundle: str | os.PathLike) -> list[str]:
    """Step 1: every large file fetched to its path as the zoo's CI does it (``download_url`` with ``fuzzy``);
    returns the paths."""
    from monai.apps.utils import download_url

    out = []
    for e in read_large_files(bundle):
        kwargs = {k: v for k, v in e.items() if not (k in ("hash_val", "hash_type") and v == "")}
        kwargs["filepath"] = os.path.join(bundle, kwargs.pop("path"))
        download_url(fuzzy=True, **kwargs)
        out.append(kwargs["filepath"])
    return out


def check_large_file_hashes(bundle: str | os.PathLike) -> None:
    """Each linked file is present and its digest, computed here with hashlib, is the one listed."""
    for e in read_large_files(bundle):
        path = Path(bundle) / e["path"]
        assert path.is_file(), f"{path}: listed in large_files but absent"
        assert e.get("hash_val"), f"{bundle}: {e['path']} has no hash_val: the zoo could not check the download"
        h = hashlib.new(e.get("hash_type") or "md5")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        assert h.hexdigest() == e["hash_val"], f"{path}: {e.get('hash_type')} {h.hexdigest()}, listed {e['hash_val']}"


def check_required_files(bundle: str | os.PathLike) -> None:
    """Step 2: the necessary and preferred files."""
    for rel in NECESSARY_FILES:
        assert os.path.isfile(os.path.join(bundle, rel)), f"necessary file {rel} is not existing in {bundle}"
    assert os.path.isfile(os.path.join(bundle, "models/model.pt")), f"necessary file models/model.pt is not existing in {bundle}"
    assert find_bundle_file(os.path.join(bundle, "configs"), "inference"), f"inference config file is not existing in {bundle}"


def check_version_changelog(bundle: str | os.PathLike) -> None:
    """Step 3: ``version`` and ``changelog`` in the metadata, the version among the changelog's keys."""
    meta = json.loads(Path(bundle, "configs/metadata.json").read_text())
    assert "version" in meta and "changelog" in meta, f"{bundle}/configs/metadata.json: 'version' and 'changelog' needed"
    assert meta["version"] in meta["changelog"], f"{bundle}/configs/metadata.json: version {meta['version']} not in changelog"


def check_metadata_schema(bundle: str | os.PathLike, schema_file: str | os.PathLike) -> None:
    """Step 4: ``verify_metadata`` against `schema_file` (the zoo's CI: the downloaded ``eval/schema.json``);
    the file exists, so nothing is downloaded."""
    from monai.bundle import verify_metadata

    assert os.path.isfile(schema_file), schema_file
    verify_metadata(meta_file=os.path.join(bundle, "configs/metadata.json"), filepath=str(schema_file))


def _increment_patch(version: str) -> str:
    parts = [int(p) for p in str(version).split(".")]
    parts += [0] * (3 - len(parts))
    parts[-1] += 1
    return ".".join(map(str, parts))


def requirement_lines(metadata: Mapping[str, Any], allow_monai_rc: bool = False) -> list[str]:
    """Step 6: the pip lines the zoo writes for `metadata` (``name==value`` for each package entry)."""
    lines = []
    if "monai_version" in metadata:
        v = metadata["monai_version"]
        lines.append(f"monai>={v}rc1,<{_increment_patch(v)}" if allow_monai_rc else f"monai=={v}")
    if "pytorch_version" in metadata:
        lines.append(f"torch=={metadata['pytorch_version']}")
    if "numpy_version" in metadata:
        lines.append(f"numpy=={metadata['numpy_version']}")
    for key in ("optional_packages_version", "required_packages_version"):
        for name, version in metadata.get(key, {}).items():
            lines.append(f"{name}=={version}")
    return lines


def check_requirement_lines(lines: list[str]) -> dict[str, str]:
    """Each line is a valid pip requirement pinning one exact version (``packaging``'s parser); returns
    ``{name: version}``."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    pins = {}
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise AssertionError(f"the zoo would write the invalid requirement {line!r}: {e}") from e
        if req.name == "monai" and "rc1" in line:
            continue
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{line!r} is not one exact version"
        try:
            Version(specs[0].version)
        except InvalidVersion as e:
            raise AssertionError(f"{line!r}: {specs[0].version!r} is not a version") from e
        pins[req.name] = specs[0].version
    return pins


def check_net_in_out(bundle: str | os.PathLike) -> None:
    """Step 5: ``verify_net_in_out`` of ``network_def`` in the inference config, with the bundle's metadata."""
    from monai.bundle import verify_net_in_out

    config = find_bundle_file(os.path.join(bundle, "configs"), "inference")
    verify_net_in_out(net_id="network_def", meta_file=os.path.join(bundle, "configs/metadata.json"),
                      config_file=os.path.join(bundle, "configs", config), bundle_root=str(bundle))


def check_torchscript_export(bundle: str | os.PathLike) -> str:
    """Step 5: ``ckpt_export`` as the zoo calls it; a provided ``models/model.ts`` must load. Returns the
    exported file."""
    import torch
    from monai.bundle import ckpt_export

    config = find_bundle_file(os.path.join(bundle, "configs"), "inference")
    out = os.path.join(bundle, "models/verify_model.ts")
    ckpt_export(net_id="network_def", filepath=out, ckpt_file=os.path.join(bundle, "models", "model.pt"),
                meta_file=os.path.join(bundle, "configs/metadata.json"), config_file=os.path.join(bundle, "configs", config),
                bundle_root=str(bundle))
    provided = os.path.join(bundle, "models", "model.ts")
    if os.path.exists(provided):
        torch.jit.load(provided)
    return out


def check_workflow_properties(bundle: str | os.PathLike, train_overrides: Mapping[str, Any],
                              infer_overrides: Mapping[str, Any]) -> None:
    """Step 7: the train+evaluate (as a "train" workflow, the zoo's unit-test pattern; it holds every id of
    train.json) and infer workflows initialise with no required property missing (not run)."""
    from monai.bundle import ConfigWorkflow

    cfg = os.path.join(bundle, "configs")
    common = {"logging_file": os.path.join(cfg, "logging.conf"), "meta_file": os.path.join(cfg, "metadata.json"),
              "bundle_root": str(bundle)}
    cases = [("train", [os.path.join(cfg, "train.json"), os.path.join(cfg, "evaluate.json")], train_overrides),
             ("infer", os.path.join(cfg, "inference.json"), infer_overrides)]
    for wtype, config, overrides in cases:
        workflow = ConfigWorkflow(workflow_type=wtype, config_file=config, **common, **overrides)
        workflow.initialize()
        missing = workflow.check_properties()
        assert not missing, f"{config}: {wtype} workflow lacks required properties {missing}"


def verify_min(bundle: str | os.PathLike, schema_file: str | os.PathLike) -> None:
    """The zoo's CPU ("min") verification, in its order: steps 1 to 4."""
    download_large_files(bundle)
    check_required_files(bundle)
    check_version_changelog(bundle)
    check_metadata_schema(bundle, schema_file)
