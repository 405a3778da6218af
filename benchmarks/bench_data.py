"""Data pipeline: images per second from files to batched tensors on the device through a bundle's own
transforms, dataset and loader, for DICOM and PNG, per cache mode and worker count; and the whole bundle
training loop's rate against the model's own step rate, to see whether loading or the model limits training.

    python benchmarks/bench_data.py [--bundle convnext_tiny] [--images 320] [--size 224] [--workers 0 1 2]
        [--device cpu] [--loop]

Loading: for each format, a datalist of ``--images`` training entries (demo images of that format, each a
distinct symbolic link), the bundle's ``train#dataloader`` built by MONAI's ``ConfigWorkflow`` from its
``train.json`` (augmentations included), iterated for two epochs: the first fills a cache, the second
reads it; each batch's image is moved to ``--device``. Rates are images per second per epoch.

``--loop``: the bundle's trainer (cache ``memory``, the given workers) for two epochs over the PNG
datalist, the second epoch's rate from its first to its last iteration, against the median of the same
network's training step on a random batch of the same shape (the model alone). The ratio is the share of
the model's speed the whole loop keeps.

One JSON line per measurement, then a table. Figures go to BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _datalist(fmt: str, n: int, demo: str, work: Path) -> str:
    from hmn.data import load_datalist, make_datalist, write_datalist

    data = load_datalist(demo)
    ext = ".dcm" if fmt == "dicom" else ".png"
    pool = [e for s in ("training", "validation", "test") for e in data[s] if e["image"].endswith(ext)]
    links = work / f"{fmt}_{n}"
    links.mkdir(parents=True, exist_ok=True)
    train = []
    for i in range(n):
        src = pool[i % len(pool)]
        link = links / f"img{i:05d}{ext}"
        if not link.exists():
            os.symlink(src["image"], link)
        train.append({"image": str(link), "label": src["label"], "patient_id": f"P{i}"})
    val = [dict(e) for e in train[:16]]
    return write_datalist(make_datalist({"training": train, "validation": val, "test": []}, data["class_names"]),
                          work / f"{fmt}_{n}.json")


def _workflow(bundle: str, datalist: str, root: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=str(ROOT / f"bundles/{bundle}/configs/train.json"), workflow_type="train",
                        datalist=datalist, bundle_root=str(root), evaluate_after_training=False, **overrides)
    wf.initialize()
    return wf


def loading(args, fmt: str, datalist: str, cache: str, workers: int) -> dict:
    import torch

    root = Path(args.work) / f"run_{fmt}_{cache}_{workers}"
    wf = _workflow(args.bundle, datalist, root, image_size=args.size, cache=cache, num_workers=workers,
                   batch_size=args.batch)
    loader = wf.parser.get_parsed_content("train#dataloader")
    device = torch.device(args.device)
    rates = []
    for _ in range(2):
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(n / (time.perf_counter() - t0))
    return {"kind": "loading", "format": fmt, "cache": cache, "workers": workers, "images": n,
            "epoch1_images_per_s": rates[0], "epoch2_images_per_s": rates[1]}


def loop(args, datalist: str, workers: int) -> dict:
    import torch
    from ignite.engine import Events

    root = Path(args.work) / f"loop_{workers}"
    wf = _workflow(args.bundle, datalist, root, image_size=args.size, cache="memory", num_workers=workers,
                   batch_size=args.batch, max_epochs=2, val_interval=100)
    trainer = wf.parser.get_parsed_content("train#trainer")
    stamps: dict[int, list[float]] = {1: [], 2: []}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: stamps[e.state.epoch].append(time.perf_counter()))
    trainer.run()
    s = stamps[2]
    loop_rate = (len(s) - 1) * args.batch / (s[-1] - s[0])
    network, optimizer, loss = (wf.parser.get_parsed_content(k) for k in ("network", "optimizer", "loss"))
    device = next(network.parameters()).device
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    y = (torch.rand(args.batch, len(wf.parser.get_parsed_content("class_names")), device=device) > 0.8).float()
    inferer = wf.parser.get_parsed_content("train#inferer")
    network.train()
    times = []
    for i in range(args.model_steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss(inferer(x, network), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    model_rate = args.batch / statistics.median(times)
    return {"kind": "loop", "format": "png", "cache": "memory", "workers": workers, "loop_images_per_s": loop_rate,
            "model_images_per_s": model_rate, "loop_share_of_model": loop_rate / model_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="convnext_tiny")
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--caches", nargs="+", default=["none", "memory", "persistent"])
    ap.add_argument("--formats", nargs="+", default=["png", "dicom"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loop", action="store_true")
    ap.add_argument("--model-steps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/hmn_bench_data")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from _machine import cpu_name

    from hmn.data import make_demo_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    demo = make_demo_dataset(work / "demo", n_images=300, image_size=256, seed=0)
    rows = []
    for fmt in args.formats:
        datalist = _datalist(fmt, args.images, demo, work)
        for cache in args.caches:
            for workers in args.workers:
                rec = loading(args, fmt, datalist, cache, workers)
                rec.update(bundle=args.bundle, size=args.size, batch=args.batch, device=args.device, cpu=cpu_name())
                print(json.dumps(rec), flush=True)
                rows.append(rec)
    if args.loop:
        datalist = _datalist("png", args.images, demo, work)
        for workers in args.workers:
            rec = loop(args, datalist, workers)
            rec.update(bundle=args.bundle, size=args.size, batch=args.batch, device=args.device, cpu=cpu_name())
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    print(f"\n{args.bundle}, {args.size}x{args.size}, batch {args.batch}, {args.device}, {cpu_name()}")
    print("| format | cache | workers | epoch 1 images/s | epoch 2 images/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        if r["kind"] == "loading":
            print(f"| {r['format']} | {r['cache']} | {r['workers']} | {r['epoch1_images_per_s']:.1f} | "
                  f"{r['epoch2_images_per_s']:.1f} |")
    for r in rows:
        if r["kind"] == "loop":
            print(f"loop, {r['workers']} workers: {r['loop_images_per_s']:.1f} images/s, model alone "
                  f"{r['model_images_per_s']:.1f} images/s: {r['loop_share_of_model']:.2f}x")


if __name__ == "__main__":
    main()
