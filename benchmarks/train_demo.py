"""Validation macro ROC AUC against wall time for a bundle trained on the synthetic demo data, on this machine.

A 3D bundle (``--bundle convnext3d_tiny``) trains on the synthetic demo volumes (:mod:`hmn.data.demo3d`).

    python benchmarks/train_demo.py [--bundle convnext_tiny] [--budget 600] [--out runs/train_demo] [-- OVERRIDES...]

Runs ``python -m monai.bundle run training`` from the repository root with the given overrides (default:
``--image_size 128 --max_epochs 40``), stops it when the wall-clock budget is spent (the run's per-epoch
``history.csv`` survives that), and prints the learning curve: epoch, seconds since the start of
training, validation macro ROC AUC, and when the AUC first reached 0.80. The demo dataset is written on
first use (its generation is not counted in the budget: it is made before the clock starts).
``--demo_volumes N`` draws a demo set of another size (the same generator and seed; written beside the
bundle's default set, in a folder of its own) and trains on it.
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def demo_datalist(bundle: str, count: int | None = None) -> str:
    """The datalist of `bundle`'s demo set (radiographs, or volumes for a 3D bundle), written on first use;
    with `count`, a draw of that many images or volumes (same generator and seed) in a folder of its own,
    ``<the default demo folder>_<count>``."""
    import json

    from hmn.bundle import is_volume_bundle
    from hmn.data import make_demo3d_dataset, make_demo_dataset
    from hmn.data.cli import default_demo3d_root, default_demo_root

    demo = json.loads((ROOT / "bundles" / bundle / "configs" / "train.json").read_text())["demo"]
    volumes = is_volume_bundle(bundle)
    root = default_demo3d_root() if volumes else default_demo_root()
    if count is not None:
        key = "n_volumes" if volumes else "n_images"
        if key not in demo:
            raise SystemExit(f"the {bundle} bundle's demo settings {demo} have no {key!r} to change")
        demo, root = {**demo, key: count}, f"{root}_{count}"
    return (make_demo3d_dataset if volumes else make_demo_dataset)(root, **demo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="convnext_tiny")
    ap.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds for training")
    ap.add_argument("--out", default=str(ROOT / "runs" / "train_demo"), help="bundle_root for the run's outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--demo_volumes", type=int, help="volumes or images in the demo set (default: the bundle's)")
    ap.add_argument("overrides", nargs="*", help="bundle overrides (after --)")
    args = ap.parse_args()
    if args.demo_volumes is not None and args.demo_volumes < 1:
        ap.error(f"--demo_volumes takes a positive count, got {args.demo_volumes}")
    overrides = args.overrides or ["--image_size", "128", "--max_epochs", "40"]

    sys.path.insert(0, str(ROOT))
    # the bundle's demo set (radiographs, or volumes for a 3D bundle), made before the clock starts
    datalist = demo_datalist(args.bundle, args.demo_volumes)
    out = Path(args.out)
    # every run starts afresh (the bundles refuse a new run in a folder that holds an earlier one)
    for sub in ("runs", "models"):
        shutil.rmtree(out / sub, ignore_errors=True)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           f"bundles/{args.bundle}/configs/train.json", "--bundle_root", str(out), "--datalist", datalist, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    stopped = False
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped = True
    wall = time.time() - start

    cpu = cpu_name()
    print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, OMP_NUM_THREADS={args.threads}")
    print(f"command: {shlex.join(cmd[1:])}")
    print(f"budget {args.budget:.0f} s, process ran {wall:.0f} s (including start-up and model build)\n")
    rows = list(csv.DictReader(open(out / "runs" / "history.csv"))) if (out / "runs" / "history.csv").exists() else []
    print("| epoch | seconds | val macro ROC AUC |\n|---|---|---|")
    reached = None
    for r in rows:
        auc = float(r["val_auc"])
        print(f"| {r['epoch']} | {float(r['elapsed_s']):.0f} | {auc:.3f} |")
        if reached is None and auc >= 0.80:
            reached = r
    if reached:
        print(f"\nmacro ROC AUC >= 0.80 first at epoch {reached['epoch']}, {float(reached['elapsed_s']):.0f} s into training")
    else:
        print("\nmacro ROC AUC did not reach 0.80 within the budget")
    if not stopped and proc.returncode != 0:
        # the training failed on its own (a bad override, a bad file): say so, not just an empty curve
        lines = (out / "train.log").read_text(errors="replace").strip().splitlines()
        print(f"\nthe training exited with status {proc.returncode}: {lines[-1] if lines else '(no output)'}\n"
              f"(the whole log: {out / 'train.log'})")  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
