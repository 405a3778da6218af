"""Do the heatmaps point at the lesion? Grad-CAM peaks against the nodules and masses the demo generator drew.

    python benchmarks/bench_heatmaps.py --bundle-root /tmp/hm_ct [--split test] [--examples docs/heatmaps]

On the synthetic demo's test split, with a model trained on the demo (e.g. ``python -m monai.bundle run
training --config_file bundles/convnext_tiny/configs/train.json --bundle_root /tmp/hm_ct --image_size 128
--max_epochs 12 --batch_size 16``), for every image positive for Nodule or Mass: the Grad-CAM map of that
finding (``hmn.explain.gradcam``, the finest pyramid level and all levels combined), its peak (the pixel of
the map's maximum, in the network's input coordinates), and whether the peak lies inside a lesion of that
kind. The lesions are the generator's own masks (``hmn.data.demo.render_demo_image``: the pixels each
nodule or mass made denser, lobulated masses included), area-resized to the input grid like the image
(an input pixel is in a lesion when at least half of it is).

Baselines, exact for a point drawn uniformly among the input pixels: "image", the share of the image's
pixels inside a lesion; "lung", the share of the aerated lung fields' pixels inside a lesion (the
generator places lesions in the aerated lung, so a map that only knew where the lungs are would reach
this). Each is averaged over the same images as the hit rate. A second criterion allows the peak to lie
within ``--tolerance`` pixels of a lesion (half the finest level's stride by default), with its baselines
computed the same way on the dilated lesions.

``--occlusion`` adds a model-agnostic cross-check: MONAI's :class:`monai.visualize.OcclusionSensitivity`
(a ``--occlusion-mask`` pixel square replaced by the image's mean, slid with half-mask steps), whose peak
is where hiding the image lowers the finding's logit most. If Grad-CAM and occlusion both miss the
lesion, the model's evidence lies elsewhere; if only Grad-CAM misses, the map is at fault.

Prints one JSON line per measurement, then a Markdown table; ``--examples DIR`` writes overlay PNGs (the
lesion outlined in white) of the first detected Nodule and Mass of the split, in datalist order.
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
import torch.nn.functional as F
from _machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINDINGS = ("Nodule", "Mass")


def _wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [float("nan"), float("nan")]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _to_input_grid(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A boolean mask area-resized to `size` (the image's own resize), then >= 0.5."""
    t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    return (F.interpolate(t, size=size, mode="area")[0, 0] >= 0.5).numpy()


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre lies within `radius` pixels of a pixel centre of `mask`."""
    if radius <= 0 or not mask.any():
        return mask
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float32)
    out = F.conv2d(torch.as_tensor(mask, dtype=torch.float32)[None, None], torch.as_tensor(disk)[None, None], padding=r)
    return (out[0, 0] > 0).numpy()


def main() -> None:
    from hmn.data import load_datalist
    from hmn.data.cli import default_demo_root
    from hmn.data.demo import render_demo_image
    from hmn.explain import gradcam_pairs, load_bundle_network, render_overlay

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle-root", required=True, help="a bundle_root with a demo-trained models/model.pt and run.json")
    ap.add_argument("--demo-root", default=None, help="the demo dataset (default: the bundles' demo folder)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--levels", nargs="+", default=["finest", "all"])
    ap.add_argument("--occlusion", action="store_true", help="also measure MONAI's occlusion sensitivity (slow)")
    ap.add_argument("--occlusion-mask", type=int, default=16, help="occluded square's side in input pixels")
    ap.add_argument("--tolerance", type=float, default=4.0, help="pixels (input grid) for the second criterion")
    ap.add_argument("--edge", type=int, default=8, help="a peak closer than this many pixels to the border counts as at the edge")
    ap.add_argument("--threshold", type=float, default=0.5, help="'detected' means probability >= this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", default=None, help="folder for overlay examples")
    ap.add_argument("--max-images", type=int, default=None, help="only the first N images of the split (a quick check)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    demo = Path(args.demo_root or default_demo_root())
    config = json.loads((demo / "demo_config.json").read_text())
    bundle = load_bundle_network(args.bundle_root, "cpu")
    net, names, pre = bundle["network"], bundle["class_names"], bundle["preprocessing"]
    entries = load_datalist(str(demo / "datalist.json"), args.split)[: args.max_images]
    machine = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads"
    date = time.strftime("%Y-%m-%d")

    methods = list(args.levels) + (["occlusion"] if args.occlusion else [])
    records = {(f, lv): [] for f in FINDINGS for lv in methods}
    seconds = {lv: 0.0 for lv in methods}
    passes = {lv: 0 for lv in methods}
    occlusion = None
    if args.occlusion:
        from monai.visualize import OcclusionSensitivity

        occlusion = OcclusionSensitivity(net, mask_size=args.occlusion_mask, overlap=0.5, mode="mean_img",
                                         n_batch=32, verbose=False, activate=False)
    examples = {}
    for e in entries:
        positive = [f for f in FINDINGS if e["label"][names.index(f)] == 1]
        if not positive:
            continue
        x = pre({"image": e["image"]})["image"].as_tensor().float()[None]
        with torch.no_grad():
            probs = torch.sigmoid(net(x))[0].numpy()
        _, _, masks = render_demo_image(e["image"], seed=config["seed"], image_size=config["image_size"])
        grid = tuple(x.shape[2:])
        lung = _to_input_grid(masks["lung"], grid)
        occluded = None
        for f in positive:
            k = names.index(f)
            lesion = _to_input_grid(masks[f], grid)
            if not lesion.any():
                continue  # a lesion smaller than half an input pixel: nothing to hit
            near = _dilate(lesion, args.tolerance)
            for lv in methods:
                t0 = time.perf_counter()
                if lv == "occlusion":
                    if occluded is None:  # one pass gives every finding's map
                        with torch.no_grad():
                            occluded = occlusion(x)[0][0].numpy()  # N, H, W: the logit with each place hidden
                    m = -occluded[k]  # the peak: where hiding the image lowers the logit most
                else:
                    m = gradcam_pairs(net, x, [0], [k], levels=lv)[0].numpy()
                seconds[lv] += time.perf_counter() - t0
                passes[lv] += 1
                peak = np.unravel_index(int(np.argmax(m)), m.shape)
                h, w = m.shape
                records[(f, lv)].append({
                    "p": float(probs[k]), "hit": bool(lesion[peak]), "hit_tol": bool(near[peak]),
                    "peak": [int(peak[0]), int(peak[1])],
                    "edge": bool(min(peak[0], peak[1], h - 1 - peak[0], w - 1 - peak[1]) < args.edge),
                    "base_image": float(lesion.mean()), "base_lung": float((lesion & lung).sum() / max(lung.sum(), 1)),
                    "base_image_tol": float(near.mean()), "base_lung_tol": float((near & lung).sum() / max(lung.sum(), 1)),
                    "flat": bool(m.max() <= m.min()),
                })
                if args.examples and lv == "finest" and f not in examples and probs[k] >= args.threshold:
                    examples[f] = (e["image"], x[0, 0].numpy(), m, float(probs[k]), lesion)

    rows = []
    for (f, lv), recs in records.items():
        for subset, sel in (("positives", recs), ("detected", [r for r in recs if r["p"] >= args.threshold])):
            n = len(sel)
            for crit, key in (("inside", ""), (f"within {args.tolerance:g} px", "_tol")):
                hits = sum(r["hit" + key] for r in sel)
                row = {
                    "benchmark": "heatmap_peak_in_lesion", "finding": f, "map": lv, "images": subset,
                    "criterion": crit, "n": n, "hits": hits, "hit_rate": hits / n if n else None,
                    "hit_rate_ci95": _wilson(hits, n), "flat_maps": sum(r["flat"] for r in sel),
                    "peaks_near_edge": sum(r["edge"] for r in sel), "peaks": [r["peak"] for r in sel],
                    "baseline_image": float(np.mean([r["base_image" + key] for r in sel])) if n else None,
                    "baseline_lung": float(np.mean([r["base_lung" + key] for r in sel])) if n else None,
                    "split": args.split, "threshold": args.threshold, "input_size": list(x.shape[2:]),
                    "seconds_per_map": seconds[lv] / max(passes[lv], 1), "machine": machine, "date": date,
                }
                rows.append(row)
                print(json.dumps(row))

    print(f"\nmachine: {machine}; {date}; split {args.split}; model {args.bundle_root}\n")
    print("| finding | map | images | n | peak inside the lesion | 95% CI | random point: image | random point: lung | "
          f"within {args.tolerance:g} px | random: image | random: lung | peaks < {args.edge} px from the edge |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    by = {(r["finding"], r["map"], r["images"], r["criterion"]): r for r in rows}
    for (f, lv), _ in records.items():
        for subset in ("positives", "detected"):
            a, b = by[(f, lv, subset, "inside")], by[(f, lv, subset, f"within {args.tolerance:g} px")]
            if not a["n"]:
                continue
            print(f"| {f} | {lv} | {subset} | {a['n']} | {a['hit_rate']:.2f} | {a['hit_rate_ci95'][0]:.2f}-{a['hit_rate_ci95'][1]:.2f} "
                  f"| {a['baseline_image']:.3f} | {a['baseline_lung']:.3f} | {b['hit_rate']:.2f} | {b['baseline_image']:.3f} "
                  f"| {b['baseline_lung']:.3f} | {a['peaks_near_edge']} |")
    print("\n" + ", ".join(f"{lv}: {seconds[lv] / max(passes[lv], 1):.3f} s per map" for lv in methods))

    if args.examples:
        out = Path(args.examples)
        out.mkdir(parents=True, exist_ok=True)
        for f, (image, img, m, p, lesion) in examples.items():
            path = out / f"demo_{f.lower()}.png"
            path.write_bytes(render_overlay(img, m, f"{f}   p = {p:.2f}   (synthetic phantom)", outline=lesion))
            print(f"example: {path} ({Path(image).name}, the first {f} of the split with p >= {args.threshold})")


if __name__ == "__main__":
    main()
