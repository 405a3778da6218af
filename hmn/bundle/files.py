"""Writes ``bundles/<name>/`` for every bundle from the template and the bundle table.

    python -m hmn bundles [--out bundles] [--check]

Each bundle is MONAI bundle configuration only (``configs/*.json``, ``docs/README.md``, ``LICENSE``); the
code it names lives in the installed ``hmn`` package. ``--check`` compares the committed bundles with
what the generator writes and fails on any difference, so that a fix lands in all bundles at once.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any

from hmn.bundle.docs import bundle_readme, license_text, volume_bundle_readme
from hmn.bundle.metadata import metadata
from hmn.bundle.table import BUNDLES, EXPORT_ARGS, is_volume_bundle
from hmn.bundle.template import (
    evaluate_config,
    export_args,
    inference_config,
    multi_gpu_config,
    multi_gpu_inference_config,
    train_config,
)

__all__ = ["LOGGING_CONF", "bundle_files", "check_bundles", "main", "write_bundles"]


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=4) + "\n"


def bundle_files(name: str) -> dict[str, str]:
    """Relative path -> content of every generated file of bundle ``name``."""
    return {
        "configs/metadata.json": _dump(metadata(name)),
        "configs/train.json": _dump(train_config(name)),
        "configs/evaluate.json": _dump(evaluate_config(name)),
        "configs/inference.json": _dump(inference_config(name)),
        "configs/multi_gpu_train.json": _dump(multi_gpu_config(name)),
        "configs/multi_gpu_inference.json": _dump(multi_gpu_inference_config(name)),
        **{path: _dump(export_args(name, fmt)) for fmt, path in EXPORT_ARGS.items()},
        "configs/logging.conf": LOGGING_CONF,
        "docs/README.md": (volume_bundle_readme if is_volume_bundle(name) else bundle_readme)(name, BUNDLES[name], train_config(name)),
        "LICENSE": license_text(),
    }


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def write_bundles(out: str | os.PathLike = "bundles", names: list[str] | None = None) -> list[str]:
    """Writes the bundles into ``out``; returns the files written."""
    written = []
    for name in names or list(BUNDLES):
        for rel, text in bundle_files(name).items():
            path = Path(out) / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(str(path))
    return written


def check_bundles(out: str | os.PathLike = "bundles") -> list[str]:
    """Differences between the bundles in ``out`` and what the generator writes (empty when identical)."""
    problems = []
    for name in BUNDLES:
        for rel, text in bundle_files(name).items():
            path = Path(out) / name / rel
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            have = path.read_text()
            if have != text:
                diff = "".join(difflib.unified_diff(have.splitlines(True), text.splitlines(True), str(path), "generated", n=1))
                problems.append(diff[:2000])
    return problems


def main(argv: list[str] | None = None) -> int:
    """``python -m hmn bundles``."""
    p = argparse.ArgumentParser(prog="python -m hmn bundles", description="Write or check the MONAI bundles.")
    p.add_argument("--out", default="bundles", help="bundles folder (default: %(default)s)")
    p.add_argument("--check", action="store_true", help="fail if the committed bundles differ from the generator's")
    p.add_argument("names", nargs="*", help="bundles to write (default: all)")
    args = p.parse_args(argv)
    if args.check:
        problems = check_bundles(args.out)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"{len(problems)} difference(s)" if problems else "bundles are up to date")
        return 1 if problems else 0
    unknown = [n for n in args.names if n not in BUNDLES]
    if unknown:
        print(f"unknown bundle(s) {unknown}; known: {', '.join(BUNDLES)}", file=sys.stderr)
        return 2
    files = write_bundles(args.out, args.names or None)
    print(f"wrote {len(files)} files under {args.out}/")
    return 0
