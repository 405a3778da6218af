"""How many positives does a finding need before a comparison's p-value means anything?

    python benchmarks/bench_min_positives.py [--repeats 300] [--n-bootstrap 1000] [--seed 0] [--positives 1 2 ...]

Two equally good models under the null: 300 images of which ``m`` are positive, each model's score is
``label + N(0, 1)`` with its own noise, so the true AUC difference is 0 and a test at the 5% level should call
it significant in 5% of data sets. For each ``m``, the share of ``repeats`` data sets in which
:func:`hmn.evaluation.paired_bootstrap`'s p-value and :func:`hmn.evaluation.delong_test`'s are below 0.05 (a
binomial standard error of about 1.3 points at 300 repeats). The same counts hold for negatives by symmetry.
The project's :data:`hmn.evaluation.DEFAULT_MIN_POSITIVES` is the smallest ``m`` from which both stay near the
nominal 5%.

Prints one JSON line per ``m``, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmn.evaluation import delong_test, paired_bootstrap  # noqa: E402

POSITIVES = (1, 2, 3, 5, 7, 10, 15, 20, 40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--positives", type=int, nargs="+", default=list(POSITIVES), help="the values of m to simulate")
    args = ap.parse_args()
    rows = []
    for m in args.positives:
        rng = np.random.default_rng(args.seed + m)
        boot_hits = delong_hits = delong_defined = 0
        t0 = time.perf_counter()
        for r in range(args.repeats):
            y = np.zeros(args.images)
            y[:m] = 1
            a, b = y + rng.normal(size=y.size), y + rng.normal(size=y.size)
            res = paired_bootstrap(y, a, b, n_bootstrap=args.n_bootstrap, seed=r)
            boot_hits += res.p_value[0] is not None and res.p_value[0] < 0.05
            d = delong_test(y == 1, a, b)
            if d.p_value is not None:
                delong_defined += 1
                delong_hits += d.p_value < 0.05
        row = {"positives": m, "images": args.images, "repeats": args.repeats,
               "bootstrap_rejects": boot_hits / args.repeats,
               "delong_rejects": delong_hits / delong_defined if delong_defined else None,
               "delong_defined": delong_defined, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| positives | paired bootstrap p < 0.05 | DeLong p < 0.05 |\n|---:|---:|---:|")
    for r in rows:
        d = "-" if r["delong_rejects"] is None else f"{r['delong_rejects']:.3f}"
        print(f"| {r['positives']} | {r['bootstrap_rejects']:.3f} | {d} |")


if __name__ == "__main__":
    main()
