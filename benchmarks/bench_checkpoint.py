"""What crash-safe checkpoint writing costs: the bundles' full-state checkpoint written as MONAI's saver
writes it (``torch.save`` in place, no fsync) against :func:`hmn.durable.atomic_torch_save` (temporary
file, fsync, rename, folder fsync), interleaved round by round in one process.

    python benchmarks/bench_checkpoint.py [--bundle convnext_large] [--rounds 3] [--dir /tmp/ckpt_bench]

The checkpoint is the bundle's own (network from its train.json with the 14 ChestX-ray14 classes, AdamW
state after one step, scheduler and trainer state), so its size is what a real run writes each epoch.
``in place`` returns once the bytes are in the page cache; the kernel writes them out later, so its
time is not the disk's; ``atomic`` waits until they are on disk. One JSON line per write, then a table of
medians. Each write goes to a new name and the previous file is removed first, as the bundles do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _machine import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NIH = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
       "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]


def bundle_checkpoint(bundle: str) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser["class_names"] = NIH
    parser["num_classes"] = len(NIH)
    parser["pretrained"] = False
    net = parser.get_parsed_content("network_def")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # fills the optimizer state (two moments per parameter), as after the first iteration
    trainer = {"epoch_length": 100, "max_epochs": 30, "iteration": 100}
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": {"last_epoch": 100}, "trainer": trainer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="convnext_large")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/hmn_ckpt_bench")
    args = ap.parse_args()
    from hmn.durable import atomic_torch_save

    state = bundle_checkpoint(args.bundle)
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ways = {"in place (MONAI)": lambda path: torch.save(state, path), "atomic + fsync (hmn)": lambda path: atomic_torch_save(state, path)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    previous = None
    n = 0
    size = 0
    for r in range(args.rounds):
        for name, write in ways.items():
            n += 1
            path = folder / f"checkpoint_epoch={n}.pt"
            if previous is not None:
                os.remove(previous)  # as n_saved=1 does
            os.sync()  # start every write with the page cache clean of earlier ones
            t0 = time.perf_counter()
            write(path)
            dt = time.perf_counter() - t0
            size = os.path.getsize(path)
            previous = path
            times[name].append(dt)
            print(json.dumps({"bench": "checkpoint", "bundle": args.bundle, "way": name, "round": r, "seconds": round(dt, 3),
                              "bytes": size}), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{args.bundle} full-state checkpoint, {size / 2**20:,.0f} MB; {cpu_name()}, {os.cpu_count()} cores; folder {args.dir}")
    base = statistics.median(times["in place (MONAI)"])
    print(f"{'way':<24}{'median s':>10}{'min s':>8}{'max s':>8}{'MB/s':>8}{'vs in place':>13}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>10.2f}{min(ts):>8.2f}{max(ts):>8.2f}{size / 2**20 / med:>8.0f}{med / base:>12.2f}x")


if __name__ == "__main__":
    sys.exit(main())
