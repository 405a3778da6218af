"""Why does a from-scratch `convnext_tiny` not learn the demo data? Recipe sweep and random-feature probe.

    python benchmarks/demo_recipe_probe.py train --device cuda [--only NAME ...] [--seconds 300]
    python benchmarks/demo_recipe_probe.py features            # linear probe of untrained backbones (CPU, ~2 min)

Both read the demo dataset through the `convnext_tiny` bundle's validation preprocessing at 128 px
(`LoadXrayd` with the resize, `PercentileRescaled`) once, and keep the images in memory.

`train`: HybridMedNet with the bundle's `network_def` (CBAM, FPN 256, fusion 512), trained from scratch by a
plain loop that mirrors the bundle's recipe (AdamW, 1 warm-up epoch then cosine, BCE with `pos_weight`,
batch 16, random affine with p=0.7 and random gamma with p=0.3 on the GPU) with one setting changed per run
(learning rate, weight decay, layer-scale init, stem normalization, input centring, optimizer, backbone).
Prints the validation macro ROC AUC after every epoch. On a GPU a 10-epoch run takes 15-30 s.

`features`: each untrained backbone's pyramid features (global average per level) for the training images,
a logistic regression per class on them, validation ROC AUC: how much of the labels a network can see
before any training.
"""

from __future__ import annotations

import argparse
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

SIZE = 128

# name -> overrides of run()'s defaults (the bundle's recipe)
CONFIGS: dict[str, dict] = {
    "default lr2e-4": {},
    "lr1e-4": dict(lr=1e-4),
    "lr5e-4": dict(lr=5e-4),
    "lr1e-3": dict(lr=1e-3),
    "lr2e-4 ls0.1": dict(ls=0.1),
    "lr1e-3 ls1.0": dict(lr=1e-3, ls=1.0),
    "lr2e-4 no-aug": dict(aug=False),
    "lr2e-4 no-posw wd0": dict(posw=False, wd=0.0),
    "lr2e-4 batch8": dict(batch=8),
    "lr5e-4 ls0.1 clip1": dict(lr=5e-4, ls=0.1, clip=1.0),
    "lr4e-3 ls0.1 clip1": dict(lr=4e-3, ls=0.1, clip=1.0),
    "lr2e-4 30ep": dict(epochs=30),
    "bn-stem lr2e-4": dict(bn_stem=True),
    "bn-stem lr1e-3": dict(bn_stem=True, lr=1e-3),
    "bn-stem ls1.0 lr2e-4": dict(bn_stem=True, ls=1.0),
    # backbone_options={"norm": "batch", "ls_init_value": 1.0}: the ConvNeXt bundles' first from-scratch recipe
    "bn-all ls1.0 lr2e-4": dict(options={"norm": "batch", "ls_init_value": 1.0}),
    "bn-all ls1.0 lr1e-3": dict(options={"norm": "batch", "ls_init_value": 1.0}, lr=1e-3),
    # ... with the overlapping conv stem: what the ConvNeXt bundles use now
    "bn-all ls1.0 conv-stem lr2e-4": dict(options={"norm": "batch", "ls_init_value": 1.0, "stem": "conv"}),
    "stem-bias1 lr2e-4": dict(stem_bias=1.0),
    "centered lr2e-4": dict(center=True),
    "centered lr1e-3": dict(center=True, lr=1e-3),
    "sgd lr0.05 wd5e-5": dict(sgd=True, lr=0.05, wd=5e-5),
    "resnet34 lr1e-3": dict(backbone="resnet34", lr=1e-3),
    "efficientnetv2_s lr2e-4": dict(backbone="efficientnetv2_s"),
    "efficientnetv2_s lr1e-3": dict(backbone="efficientnetv2_s", lr=1e-3),
}


def load_demo(size: int = SIZE) -> dict:
    """The demo dataset's training and validation splits through the bundle's validation preprocessing."""
    from monai.bundle import ConfigParser

    from hmn.data import load_datalist, make_demo_dataset
    from hmn.data.cli import default_demo_root

    datalist = make_demo_dataset(default_demo_root())
    cfg = ConfigParser()
    cfg.read_config(str(ROOT / "bundles" / "convnext_tiny" / "configs" / "train.json"))
    cfg["image_size"] = size
    pre = cfg.get_parsed_content("validate#preprocessing", instantiate=True)
    out = {}
    for split in ("training", "validation"):
        items = [pre(dict(it)) for it in load_datalist(datalist, split)]
        out[split] = (torch.stack([it["image"].as_tensor() for it in items]), torch.stack([it["label"] for it in items]))
    return out


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The bundle's augmentation, batched: random affine (p=0.7) and random gamma (p=0.3)."""
    n, dev = x.shape[0], x.device
    on = (torch.rand(n, device=dev, generator=g) < 0.7).float()
    ang = (torch.rand(n, device=dev, generator=g) * 2 - 1) * 0.15 * on
    sc = 1 + (torch.rand(n, 2, device=dev, generator=g) * 2 - 1) * 0.1 * on[:, None]
    tr = (torch.rand(n, 2, device=dev, generator=g) * 2 - 1) * 0.1 * on[:, None]
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack(
        [torch.stack([cos / sc[:, 0], -sin / sc[:, 0], tr[:, 0]], 1), torch.stack([sin / sc[:, 1], cos / sc[:, 1], tr[:, 1]], 1)], 1
    )
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="zeros", align_corners=False)
    gamma = torch.where(
        torch.rand(n, device=dev, generator=g) < 0.3, 0.7 + 0.8 * torch.rand(n, device=dev, generator=g), torch.ones(n, device=dev)
    )
    return x.clamp_min(0) ** gamma[:, None, None, None]


def run(name, data, dev, deadline, backbone="convnext_tiny", lr=2e-4, wd=0.05, epochs=10, batch=16, warmup=1,
        posw=True, ls=None, aug=True, clip=None, seed=0, bn_stem=False, stem_bias=None, center=False, sgd=False,
        options=None):  # fmt: skip
    from sklearn.metrics import roc_auc_score

    from hmn.losses import MultiLabelBCELoss, pos_weight_from_labels
    from hmn.networks import HybridMedNet

    (xtr, ytr), (xva, yva) = [(x.to(dev), y.to(dev)) for x, y in (data["training"], data["validation"])]
    ncls = ytr.shape[1]
    torch.manual_seed(seed)
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    net = HybridMedNet(backbone=backbone, num_classes=ncls, in_channels=1, img_size=SIZE, attention=["cbam"],
                       fpn_channels=256, fusion_channels=512, num_heads=8, context_size=7, dropout=0.2,
                       backbone_options=options).to(dev)  # fmt: skip
    if ls is not None:  # ConvNeXt layer scale
        for m in net.modules():
            if isinstance(getattr(m, "gamma", None), nn.Parameter) and m.gamma.dim() == 1:
                m.gamma.data.fill_(ls)
    if bn_stem or stem_bias is not None:  # timm ConvNeXt features_only: stem_0 conv, stem_1 LayerNorm2d
        model = net.backbone.model
        if bn_stem:
            model.stem_1 = nn.BatchNorm2d(model.stem_0.out_channels).to(dev)
        if stem_bias is not None:
            with torch.no_grad():
                model.stem_0.bias.normal_(0, stem_bias)
    params = list(net.parameters())
    if sgd:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(xtr) / batch)
    total, wsteps = epochs * steps_per_epoch, warmup * steps_per_epoch

    def schedule(step: int) -> float:
        if step < wsteps:
            return 0.01 + 0.99 * step / max(1, wsteps)
        return 0.5 * (1 + math.cos(math.pi * (step - wsteps) / max(1, total - wsteps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    loss_fn = MultiLabelBCELoss(pos_weight=pos_weight_from_labels(ytr.cpu().tolist()) if posw else None).to(dev)

    def prep(x):
        return x * 2 - 1 if center else x

    t0, curve = time.time(), []
    for epoch in range(1, epochs + 1):
        net.train()
        perm = torch.randperm(len(xtr), device=dev, generator=g)
        losses = []
        for i in range(0, len(xtr), batch):
            idx = perm[i : i + batch]
            x = augment(xtr[idx], g) if aug else xtr[idx]
            loss = loss_fn(net(prep(x)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad():
            p = torch.cat([torch.sigmoid(net(prep(xva[i : i + 64]))) for i in range(0, len(xva), 64)]).cpu().numpy()
        y = yva.cpu().numpy()
        auc = float(np.mean([roc_auc_score(y[:, c], p[:, c]) for c in range(ncls)]))
        curve.append((epoch, float(np.mean(losses)), auc))
        print(f"  {name}: epoch {epoch} loss {curve[-1][1]:.3f} val macro AUC {auc:.3f} ({time.time() - t0:.0f} s)", flush=True)
        if time.time() > deadline:
            break
    return curve


def features(data) -> None:
    import timm
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    (xtr, ytr), (xva, yva) = data["training"], data["validation"]
    variants = [
        ("resnet34", "resnet34", {}, False),
        ("efficientnetv2_s", "efficientnetv2_s", {}, False),
        ("convnext_tiny", "convnext_tiny", {}, False),
        ("convnext_tiny, layer scale 1.0", "convnext_tiny", dict(ls_init_value=1.0), False),
        ("convnext_tiny, no stem norm", "convnext_tiny", {}, True),
        ("convnext_tiny, no stem norm, layer scale 1.0", "convnext_tiny", dict(ls_init_value=1.0), True),
        ("convnext_tiny, BatchNorm everywhere, layer scale 1.0", "convnext_tiny", "bundle", False),
    ]
    for label, name, kw, drop_stem_norm in variants:
        torch.manual_seed(0)
        levels = (1, 2, 3) if name.startswith("convnext") else (2, 3, 4)
        if kw == "bundle":
            from hmn.networks.backbones import build_backbone

            full = build_backbone(name, in_channels=1, img_size=SIZE, options={"norm": "batch", "ls_init_value": 1.0}).eval()
            m = lambda x, full=full: full(x)[1:]  # noqa: E731  strides 8, 16, 32 as for the others
        else:
            m = timm.create_model(name, pretrained=False, features_only=True, in_chans=1, out_indices=levels, **kw).eval()
        if drop_stem_norm:
            m.stem_1 = nn.Identity()
        with torch.no_grad():
            f = [torch.cat([torch.cat([t.mean((2, 3)) for t in m(x[i : i + 64])], 1) for i in range(0, len(x), 64)]) for x in (xtr, xva)]
        mu, sd = f[0].mean(0), f[0].std(0) + 1e-6
        ftr, fva = ((f[0] - mu) / sd).numpy(), ((f[1] - mu) / sd).numpy()
        aucs = [
            roc_auc_score(yva[:, c].numpy(), LogisticRegression(C=0.1, max_iter=2000).fit(ftr, ytr[:, c].numpy()).decision_function(fva))
            for c in range(ytr.shape[1])
        ]
        print(f"| {label} | {np.mean(aucs):.3f} | {' / '.join(f'{a:.2f}' for a in aucs)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["train", "features"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", help=f"config names (default: all): {', '.join(CONFIGS)}")
    ap.add_argument("--seconds", type=float, default=600.0, help="stop starting new runs after this")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = load_demo()
    if args.mode == "features":
        print("| backbone (untrained) | val macro AUC | per class |\n|---|---:|---|")
        features(data)
        return
    deadline = time.time() + args.seconds
    for name in args.only or list(CONFIGS):
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")
        if time.time() > deadline:
            print(f"  {name}: skipped (time budget spent)")
            continue
        curve = run(name, data, torch.device(args.device), deadline, **CONFIGS[name])
        print(f"{name}: " + " ".join(f"{auc:.3f}" for _, _, auc in curve), flush=True)


if __name__ == "__main__":
    main()
