"""What does a network need to learn the 3D demo's lesions? Plain-loop probes on volumes held in memory.

    python benchmarks/demo3d_probe.py [--only NAME ...] [--n_volumes N] [--epochs 15] [--seconds 900]

Reads the 3D demo dataset (:mod:`hmn.data.demo3d`; the bundle's, or a draw of ``--n_volumes``, written on first
use under ``~/.cache/hmn`` as ``train_demo.py --demo_volumes`` writes it) through the ``convnext3d_tiny`` bundle's validation preprocessing (orientation to RAS,
resampling to ``--spacing``, the CT window W400/L40, crop or pad to ``--image_size``) once, keeps the volumes in
memory and trains each model of :data:`PROBES` from scratch by a plain loop: AdamW (weight decay 0.05), one
warm-up epoch then cosine, BCE with the bundle's ``pos_weight``, batch 8, bfloat16 autocast where the CPU has
it, no augmentation. Prints the validation ROC AUC per finding after every epoch, with the seconds since the
model's first step.

The probes (names for ``--only``, quoted where they hold a space) separate what a 3D classifier of small
findings needs: a look at the input resolution before downsampling, and pooling that keeps a small response:

* ``cnn``: a plain 3D CNN (3x3x3 convolution, BatchNorm, ReLU; two layers at the input resolution, max pooling
  between levels; the last level's maximum and average over space concatenated before the linear layer);
* ``cnn-strided-stem``: the same levels after a ConvNeXt-like stem (two 3x3x3 convolutions of stride 2 and
  2 x 2 x 1), nothing at the input resolution;
* ``cnn-average-pool``: ``cnn`` with the average alone before the linear layer;
* ``convnext3d_tiny conv-stem`` and ``convnext3d_tiny pool-stem``: HybridMedNet as the bundle builds it (CBAM,
  FPN 256, fusion 512), 3D ConvNeXt-T from scratch with BatchNorm and layer scale 1 and stem stride 4 x 4 x 2,
  with ``stem='conv'`` or ``stem='pool'`` (:func:`hmn.networks.convnext3d._pool_stem`), at ``--lr``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRATCH = {"norm": "batch", "ls_init_value": 1.0, "stem_stride": [4, 4, 2]}


def _conv(cin: int, cout: int, stride=1) -> list:
    return [nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]


class PlainCNN3d(nn.Module):
    """Levels of 16, 32, 64, 128 channels; ``stem``: "full" (two convolutions at the input resolution, then
    max pooling by 2) or "strided" (convolutions of stride 2 and 2 x 2 x 1 to 32 channels, no pooling)."""

    def __init__(self, num_classes: int, stem: str = "full", pool: str = "avgmax") -> None:
        super().__init__()
        if stem == "full":
            layers = _conv(1, 16) + _conv(16, 16) + [nn.MaxPool3d(2)] + _conv(16, 32) + [nn.MaxPool3d((2, 2, 1))]
        else:
            layers = _conv(1, 16, 2) + _conv(16, 32, (2, 2, 1))
        layers += _conv(32, 64) + [nn.MaxPool3d(2)] + _conv(64, 128)
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.fc = nn.Linear(256 if pool == "avgmax" else 128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)
        pooled = torch.cat([f.mean(-1), f.amax(-1)], 1) if self.pool == "avgmax" else f.mean(-1)
        return self.fc(pooled)


def _hybrid(stem: str):
    def build(num_classes: int, size: list[int]) -> nn.Module:
        from hmn.networks import HybridMedNet

        return HybridMedNet(backbone="convnext3d_tiny", num_classes=num_classes, in_channels=1, img_size=size,
                            attention=["cbam"], fpn_channels=256, fusion_channels=512, dropout=0.2,
                            backbone_options={**SCRATCH, "stem": stem})  # fmt: skip

    return build


# name -> (builder(num_classes, size), learning rate or None for --lr)
PROBES = {
    "cnn": (lambda k, size: PlainCNN3d(k), 1e-3),
    "cnn-strided-stem": (lambda k, size: PlainCNN3d(k, stem="strided"), 1e-3),
    "cnn-average-pool": (lambda k, size: PlainCNN3d(k, pool="avg"), 1e-3),
    "convnext3d_tiny conv-stem": (_hybrid("conv"), None),
    "convnext3d_tiny pool-stem": (_hybrid("pool"), None),
}


def load(n_volumes: int | None, size: list[int], spacing: list[float]):
    from monai.bundle import ConfigParser

    from train_demo import demo_datalist

    from hmn.data import load_datalist

    datalist = demo_datalist("convnext3d_tiny", n_volumes)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "convnext3d_tiny" / "configs" / "train.json"))
    parser.update({"image_size": size, "spacing": spacing, "datalist": datalist, "bundle_root": str(ROOT / "runs" / "probe3d")})
    transform = parser.get_parsed_content("validate#preprocessing")
    classes = parser.get_parsed_content("class_names")
    out = {}
    for split in ("training", "validation"):
        items = [transform(dict(item)) for item in load_datalist(datalist, split)]
        out[split] = (torch.stack([torch.as_tensor(np.asarray(d["image"]), dtype=torch.float32) for d in items]),
                      torch.stack([torch.as_tensor(np.asarray(d["label"]), dtype=torch.float32) for d in items]))  # fmt: skip
    return out, classes


def run(name: str, data: dict, classes: list[str], args) -> None:
    from sklearn.metrics import roc_auc_score

    from hmn.workflows import cpu_bf16_supported

    torch.manual_seed(0)
    (xt, yt), (xv, yv) = data["training"], data["validation"]
    build, lr = PROBES[name]
    net = build(len(classes), list(xt.shape[2:]))
    lr = lr or args.lr
    bf16 = cpu_bf16_supported()
    prevalence = yt.mean(0)
    pos_weight = (1 - prevalence) / prevalence
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    per_epoch = len(xt) // args.batch_size
    total = args.epochs * per_epoch

    def factor(step: int) -> float:  # one warm-up epoch (from 1%), then cosine to 0
        return min(1.0, 0.01 + step / per_epoch) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"\n## {name} ({params:.2f} M parameters, lr {lr:g})\n")
    print("| epoch | seconds | train loss | val macro AUC | " + " | ".join(classes) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(classes))
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        order, losses = torch.randperm(len(xt)), []
        for i in range(per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(xt[idx])
            loss = F.binary_cross_entropy_with_logits(logits.float(), yt[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = torch.cat([net(xv[i:i + 16]).float() for i in range(0, len(xv), 16)]).numpy()
        aucs = [roc_auc_score(yv[:, c].numpy(), scores[:, c]) for c in range(len(classes))]
        elapsed = time.perf_counter() - start
        print(f"| {epoch} | {elapsed:.0f} | {np.mean(losses):.3f} | {np.mean(aucs):.3f} | "
              + " | ".join(f"{a:.3f}" for a in aucs) + " |", flush=True)  # fmt: skip
        if elapsed > args.seconds:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(PROBES), help="probes to run (default: all)")
    ap.add_argument("--n_volumes", type=int,
                    help="demo volumes to draw (default: the bundle's set of 600; too few leave a finding out of validation)")
    ap.add_argument("--image_size", type=json.loads, default=[48, 48, 24], help="X, Y, Z voxels (default [48, 48, 24])")
    ap.add_argument("--spacing", type=json.loads, default=[2.0, 2.0, 4.0], help="X, Y, Z mm (default [2.0, 2.0, 4.0])")
    ap.add_argument("--epochs", type=int, default=15, help="the cosine schedule's length")
    ap.add_argument("--seconds", type=float, default=900.0, help="stop a probe after the epoch that passes this")
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate of the HybridMedNet probes")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from _machine import cpu_name

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads")
    t = time.perf_counter()
    data, classes = load(args.n_volumes, args.image_size, args.spacing)
    n = {k: len(v[0]) for k, v in data.items()}
    print(f"{'the bundle' if args.n_volumes is None else args.n_volumes}'s demo volumes ({n}) at {args.image_size} voxels of {args.spacing} mm, "
          f"read in {time.perf_counter() - t:.0f} s")  # fmt: skip
    for name in args.only or list(PROBES):
        run(name, data, classes, args)


if __name__ == "__main__":
    main()
