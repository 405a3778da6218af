"""Do the report's 95% intervals hold the true AUC 95% of the time when patients have several images?

    python benchmarks/bench_ci_coverage.py [--datasets 200] [--n-bootstrap 500] [--seed 0]

Simulated test sets with a known truth, per design: patients are positive with probability 0.3 (every image of
a patient carries its label, as a finding seen on each of a patient's radiographs); an image's score is
``mu * label + u_patient + e_image`` with a patient effect ``u ~ N(0, sd_u)`` shared by the patient's images
and an image noise ``e ~ N(0, sd_e)``. The population ROC AUC, over a positive and a negative image of two
random patients, is ``Phi(mu / sqrt(2 (sd_u^2 + sd_e^2)))``. For each data set the report
(:func:`hmn.evaluation.compute_report`) is computed with images as the unit (no patient ids: what evaluation
did before) and with patient ids (the cluster bootstrap), and DeLong's interval with and without clustering
(:func:`hmn.evaluation.delong_test`, Obuchowski 1997); the coverage is the share of data sets whose interval
holds the true AUC (a binomial standard error of about 1.5 points at 200 data sets).

Then the optimism of thresholds fitted on the reported data: a model with no skill (scores independent of the
labels, 6 findings, 400 images), its mean Youden's J (sensitivity + specificity - 1) at thresholds fitted on
the same data (``thresholds="youden"``) against the report's default (a fixed 0.5) and against thresholds
fitted on another draw (a validation split). The true J of every threshold is 0.

Prints one JSON line per design, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.stats import norm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hmn.evaluation import compute_report, delong_test, select_thresholds  # noqa: E402

DESIGNS = {
    # name: (patients, images per patient (low, high), mu, sd_u, sd_e)
    "50 patients x 8 images, strong patient effect": (50, (8, 8), 1.3, 1.0, 0.6),
    "50 patients x 8 images, moderate patient effect": (50, (8, 8), 1.3, 0.7, 0.9),
    "120 patients x 1-5 images": (120, (1, 5), 1.3, 0.8, 0.8),
    "400 patients x 1 image (no clustering)": (400, (1, 1), 1.0, 0.0, 1.0),
}


def simulate(rng, patients, per, mu, sd_u, sd_e):
    sizes = rng.integers(per[0], per[1] + 1, size=patients)
    y_pat = rng.random(patients) < 0.3
    y_pat[:2], y_pat[2:4] = True, False  # both labels present
    pid = np.repeat(np.arange(patients), sizes)
    u = rng.normal(0.0, sd_u, size=patients)[pid] if sd_u > 0 else 0.0
    score = mu * y_pat[pid] + u + rng.normal(0.0, sd_e, size=pid.size)
    return score, y_pat[pid].astype(float), pid


def coverage(design, datasets, n_bootstrap, seed):
    patients, per, mu, sd_u, sd_e = design
    truth = float(norm.cdf(mu / np.sqrt(2 * (sd_u ** 2 + sd_e ** 2))))
    rng = np.random.default_rng(seed)
    hits = {"bootstrap, images": 0, "bootstrap, patients": 0, "DeLong": 0, "DeLong, clustered": 0}
    widths = {k: [] for k in hits}
    z = norm.ppf(0.975)
    for d in range(datasets):
        score, y, pid = simulate(rng, patients, per, mu, sd_u, sd_e)
        for key, ids in (("bootstrap, images", None), ("bootstrap, patients", pid)):
            r = compute_report(score[:, None], y[:, None], ["x"], n_bootstrap=n_bootstrap, seed=d, patient_ids=ids,
                               min_positives=1, _sections=False, _quiet=True)
            lo, hi = r["per_class"][0]["auc_ci"]
            hits[key] += lo <= truth <= hi
            widths[key].append(hi - lo)
        for key, ids in (("DeLong", None), ("DeLong, clustered", pid)):
            t = delong_test(y == 1, score, score, patient_ids=ids)
            half = z * np.sqrt(t.var_a)
            hits[key] += t.auc_a - half <= truth <= t.auc_a + half
            widths[key].append(2 * half)
    return truth, {k: hits[k] / datasets for k in hits}, {k: float(np.mean(w)) for k, w in widths.items()}


def optimism(repeats, seed):
    rng = np.random.default_rng(seed)
    j = {"fitted on the reported data": [], "fixed 0.5 (default)": [], "fitted on a validation draw": []}
    for _ in range(repeats):
        def draw():
            labels = (rng.random((400, 6)) < 0.3).astype(float)
            return rng.random((400, 6)), labels

        (p, y), (vp, vy) = draw(), draw()
        for key, thr in (("fitted on the reported data", "youden"), ("fixed 0.5 (default)", "fixed"),
                         ("fitted on a validation draw", select_thresholds(vp, vy))):
            r = compute_report(p, y, list("ABCDEF"), thresholds=thr, n_bootstrap=0, _sections=False, _quiet=True)
            j[key].append(np.mean([e["sensitivity"] + e["specificity"] - 1 for e in r["per_class"]]))
    return {k: float(np.mean(v)) for k, v in j.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", type=int, default=200)
    ap.add_argument("--n-bootstrap", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for i, (name, design) in enumerate(DESIGNS.items()):
        t0 = time.perf_counter()
        truth, cov, width = coverage(design, args.datasets, args.n_bootstrap, args.seed + i)
        row = {"design": name, "true_auc": truth, "coverage": cov, "mean_width": width, "datasets": args.datasets,
               "n_bootstrap": args.n_bootstrap, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    opt = optimism(50, args.seed)
    print(json.dumps({"no_skill_mean_youden_j": opt}), flush=True)
    keys = list(rows[0]["coverage"])
    print("\n| design | true AUC | " + " | ".join(keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['design']} | {r['true_auc']:.3f} | "
              + " | ".join(f"{r['coverage'][k]:.3f} ({r['mean_width'][k]:.3f})" for k in keys) + " |")
    print("\n(coverage of nominal 95% intervals; mean interval width in brackets)\n")
    print("| thresholds of a no-skill model | mean Youden's J on the reported data |\n|---|---:|")
    for k, v in opt.items():
        print(f"| {k} | {v:+.3f} |")


if __name__ == "__main__":
    main()
