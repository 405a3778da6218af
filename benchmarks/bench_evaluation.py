"""What the evaluation report costs at ChestX-ray14 scale: :func:`hmn.evaluation.compute_report` on the
official test split's size (25,596 images, 14 findings) with 1,000 bootstrap resamples, without and with
the subgroup section (sex, five age bands, two views: nine groups, each bootstrapped), and
``python -m hmn compare``'s work (DeLong and a 2,000-resample paired bootstrap) on the same images.

    python benchmarks/bench_evaluation.py [--images 25596] [--rounds 2]

Scores and labels are random (a score shifted by the label), metadata drawn at random: the cost does not
depend on the values. Rounds interleave the variants; one JSON line per measurement, then medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from _machine import cpu_name

from hmn.evaluation import compute_report
from hmn.evaluation.compare import delong_test, paired_bootstrap


def _data(n: int, k: int = 14, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = (rng.uniform(size=(n, k)) < 0.08).astype(float)
    a = np.clip(0.2 * labels + rng.uniform(size=(n, k)) * 0.8, 0, 1)
    b = np.clip(a + rng.normal(0, 0.05, size=(n, k)), 0, 1)
    groups = {"sex": list(rng.choice(["M", "F"], size=n)),
              "age_band": list(rng.choice(["0-19", "20-39", "40-59", "60-79", "80+"], size=n)),
              "view": list(rng.choice(["PA", "AP"], size=n))}
    return a, b, labels, groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=25596)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    a, b, labels, groups = _data(args.images)
    names = [f"c{i}" for i in range(labels.shape[1])]
    variants = {
        "report": lambda: compute_report(a, labels, names, n_bootstrap=1000),
        "report+subgroups": lambda: compute_report(a, labels, names, n_bootstrap=1000, groups=groups),
        "compare": lambda: ([delong_test(labels[:, k], a[:, k], b[:, k]) for k in range(labels.shape[1])],
                            paired_bootstrap(labels, a, b, n_bootstrap=2000, seed=0)),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            print(json.dumps({"variant": name, "round": r, "images": args.images, "classes": labels.shape[1],
                              "seconds": round(dt, 3), "cpu": cpu_name()}), flush=True)
    print(f"\n{args.images} images x {labels.shape[1]} findings on {cpu_name()} (median of {args.rounds})")
    for name, ts in times.items():
        print(f"  {name:<18} {statistics.median(ts):8.1f} s")


if __name__ == "__main__":
    main()
