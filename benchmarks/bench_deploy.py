"""Per-study CPU latency of the MONAI Deploy application (``python -m hmn.deploy``), eager model and ``model.ts``.

    python benchmarks/bench_deploy.py BUNDLE_DIR DICOM_DIR [--studies 8] [--repeats 3]

BUNDLE_DIR is an extracted packed bundle (``python -m hmn pack-bundle``, which writes ``models/model.ts``); DICOM_DIR
holds one-image studies (e.g. the demo set's DICOMs). For each model form the application is run, in this one
process, over 1 study and over ``--studies`` studies, the two forms and the two sizes interleaved, ``--repeats``
times:

* **load included**: the whole run over one study (the application graph, the bundle's configs parsed, the model
  loaded, the image read, classified and its Structured Report written); Python's and the libraries' imports are
  not counted (they are paid once per process, before the first run);
* **load excluded**: ``(T(N studies) - T(1 study)) / (N - 1)``, what each further study adds.

The eager form is a copy of the bundle without ``models/model.ts``, so that the SDK's loader falls back to
``model.pt`` and the network built from the bundle's config (the way it runs where no TorchScript is packed).
Medians over the repeats are printed, with the machine.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _run(bundle: str, inputs: str, out: str) -> float:
    from hmn.deploy.app import HybridMedNetDeployApp

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    start = time.perf_counter()
    HybridMedNetDeployApp(inputs, out, bundle).run()
    elapsed = time.perf_counter() - start
    n = len(glob.glob(os.path.join(out, "*.dcm")))
    if n == 0:
        raise RuntimeError(f"no report written from {inputs}")
    return elapsed


def main() -> None:
    import torch
    from _machine import cpu_name

    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("dicoms")
    p.add_argument("--studies", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = sorted(glob.glob(os.path.join(args.dicoms, "*.dcm")))[: args.studies]
    if len(files) < 2:
        raise SystemExit(f"{args.dicoms}: needs at least 2 DICOM files")
    work = tempfile.mkdtemp(prefix="bench-deploy-")
    one, many = os.path.join(work, "one"), os.path.join(work, "many")
    os.makedirs(one)
    os.makedirs(many)
    shutil.copy(files[0], one)
    for f in files:
        shutil.copy(f, many)
    eager = os.path.join(work, "eager")
    shutil.copytree(args.bundle, eager)
    os.remove(os.path.join(eager, "models", "model.ts"))
    forms = {"model.ts": args.bundle, "eager (model.pt)": eager}
    _run(args.bundle, one, os.path.join(work, "warm"))  # imports and first-use costs, not counted
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for form, bundle in forms.items():
            for size, folder in (("one", one), ("many", many)):
                times.setdefault((form, size), []).append(_run(bundle, folder, os.path.join(work, "out")))
    n = len(files)
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"studies: 1 and {n} (one image each, {os.path.basename(files[0])}...), repeats {args.repeats}")
    for form in forms:
        t1 = statistics.median(times[(form, "one")])
        tn = statistics.median(times[(form, "many")])
        print(f"{form:18s} load included {t1:6.2f} s   load excluded {(tn - t1) / (n - 1):6.3f} s per study   "
              f"(runs of 1: {', '.join(f'{t:.2f}' for t in times[(form, 'one')])}; of {n}: "
              f"{', '.join(f'{t:.2f}' for t in times[(form, 'many')])})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
