"""Scale rehearsal: a bundle's start-up time and resident memory against the size of the datalist, up to
ChestX-ray14's 112,120 images, and the per-image cost of the in-memory cache.

    python benchmarks/bench_scale.py [--entries 1000 10000 112120] [--bundle convnext_tiny] [--size 224]
    python benchmarks/bench_scale.py --cache-items 3000        # the per-image cost of cache "memory"
    python benchmarks/bench_scale.py --entries --cache-items 3000 --cache-mode none   # the control: no cache

The datalists are written from a few hundred demo images linked many times (every entry a distinct path:
a symbolic link), split 70/10/20 patient-wise as a real datalist would be. Each measurement runs in a fresh
process: the bundle's ``train.json`` through MONAI's ``ConfigWorkflow`` with the bundle's defaults (cache
``auto``, workers as configured), from process start to the end of the first training iteration, which
stops the run. Reported: seconds to the first iteration, peak resident memory (VmHWM) at that point, and
what the cache plan chose (from the log).

``--cache-items N`` runs one epoch over N training images with ``--cache memory`` and batch 16 and reports
the resident memory growth per image once the cache is full (the projection's per-item figure), beside
the float32 size of one cached image. ``--cache-mode none`` runs the same epoch without a cache: the growth
that is not the cache's.

One JSON line per measurement, then a table. Figures go to BENCHMARKS.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T0 = time.time()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def make_datalist(n: int, demo: str, out: Path) -> str:
    """A datalist of `n` entries over the demo's images, each entry its own symlink."""
    from hmn.data import load_datalist, make_datalist as assemble, split_entries, write_datalist

    data = load_datalist(demo)
    pool = [e for s in ("training", "validation", "test") for e in data[s]]
    links = out / f"links_{n}"
    links.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        src = pool[i % len(pool)]
        ext = os.path.splitext(src["image"])[1]
        link = links / f"img{i:06d}{ext}"
        if not link.exists():
            os.symlink(src["image"], link)
        entries.append({"image": str(link), "label": src["label"], "patient_id": f"P{i // 3:06d}"})
    path = write_datalist(assemble(split_entries(entries, (0.7, 0.1, 0.2), 0), data["class_names"]), out / f"datalist_{n}.json")
    return str(path)


def child(args: argparse.Namespace) -> None:
    """One start-up measurement, in this (fresh) process."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    plan: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cache" in record.getMessage():
                plan.append(record.getMessage())

    logging.getLogger("hmn.workflows.data").addHandler(Catch())
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    overrides = {"datalist": args.datalist, "bundle_root": args.root, "image_size": args.size, "max_epochs": 1,
                 "evaluate_after_training": False}
    if args.cache:
        overrides["cache"] = args.cache
    if args.batch:
        overrides["batch_size"] = args.batch
    wf = ConfigWorkflow(config_file=str(ROOT / f"bundles/{args.bundle}/configs/train.json"), workflow_type="train",
                        **overrides)
    wf.initialize()
    trainer = wf.parser.get_parsed_content("train#trainer")
    out: dict = {}
    stop_after = args.iterations

    def first(engine) -> None:
        it = engine.state.iteration
        if it == 1:
            out["first_iteration_s"] = time.time() - T0
            out["rss_first_mib"] = _status_kib("VmRSS") / 1024
            out["peak_first_mib"] = _status_kib("VmHWM") / 1024
        if it >= stop_after:
            out["iterations"] = it
            out["end_s"] = time.time() - T0
            out["rss_end_mib"] = _status_kib("VmRSS") / 1024
            out["peak_end_mib"] = _status_kib("VmHWM") / 1024
            engine.terminate()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, first)
    wf.run()
    out["cache_plan"] = plan
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, nargs="*", default=[1000, 10000, 112120])
    ap.add_argument("--bundle", default="convnext_tiny")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--work", default="/tmp/hmn_scale")
    ap.add_argument("--cache-items", type=int, default=0)
    ap.add_argument("--cache-mode", default="memory", choices=("memory", "none"), help="the --cache-items run's cache")
    ap.add_argument("--_child", action="store_true")
    ap.add_argument("--datalist")
    ap.add_argument("--root")
    ap.add_argument("--cache")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--iterations", type=int, default=1)
    args = ap.parse_args()
    if args._child:
        child(args)
        return
    sys.path.insert(0, str(ROOT))
    from hmn.data import make_demo_dataset

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    demo = make_demo_dataset(work / "demo", n_images=300, image_size=256, seed=0)
    rows = []

    def run(n: int, **kw) -> dict:
        datalist = make_datalist(n, demo, work)
        root = work / f"bundle_{n}_{kw.get('cache', 'default')}"
        cmd = [sys.executable, __file__, "--_child", "--datalist", datalist, "--root", str(root), "--bundle", args.bundle,
               "--size", str(args.size)]
        for k, v in kw.items():
            cmd += [f"--{k}", str(v)]
        env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-4000:]}")
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        rec.update(entries=n, bundle=args.bundle, size=args.size, **kw)
        print(json.dumps(rec), flush=True)
        return rec

    for n in args.entries:
        rows.append(run(n))
    if args.cache_items:
        n = int(args.cache_items / 0.7) + 1
        batch = 16
        iters = args.cache_items // batch
        rec = run(n, cache=args.cache_mode, batch=batch, iterations=iters)
        per = (rec["rss_end_mib"] - rec["rss_first_mib"]) * 2**20 / max((iters - 1) * batch, 1)
        rec["rss_growth_per_image_kib"] = per / 1024
        rec["float32_image_kib"] = 4 * args.size * args.size / 1024
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    print("\n| entries | cache | seconds to the first iteration | peak RSS at it (MiB) | cache plan |")
    print("|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['entries']} | {r.get('cache', 'auto')} | {r['first_iteration_s']:.1f} | {r['peak_first_mib']:.0f} | "
              f"{'; '.join(r['cache_plan'])[:160]} |")


if __name__ == "__main__":
    main()
