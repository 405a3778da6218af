"""Images per second for load + resize to 224 + percentile normalize, the MONAI path against a plain loop.

    python benchmarks/bench_io.py [--seconds 4] [--write benchmarks/results_io.md]

MONAI path, as the bundles run it: ``Compose([LoadXrayd(spatial_size=224, resize_mode="area"),
PercentileRescaled])`` on ``{"image": path}``; and, for comparison, with MONAI's own ``Resized`` instead of
the resize at load: ``Compose([LoadXrayd, Resized(224, mode="area"), PercentileRescaled])``.
Plain loop: the same work written directly: pydicom ``dcmread`` + ``pixel_array`` + ``apply_modality_lut``
+ ``apply_voi_lut`` + MONOCHROME1 inversion (or PIL ``open`` + ``numpy.asarray`` for PNG),
``torch.nn.functional.interpolate(mode="area")`` to 224 x 224, ``numpy.percentile`` clip/rescale.

Inputs: a real CR chest radiograph from pydicom-data (RG1_UNCI, 1955 x 1841, MONOCHROME1, 15 bits; and its
JPEG 2000 lossless twin RG1_J2KR), the same pixels as a 16-bit PNG and as a 1024 x 1024 8-bit PNG (the
size and depth of NIH ChestX-ray14's files), and the synthetic demo dataset's
256 x 256 DICOM and PNG files. Single-threaded (torch.set_num_threads(1)), as in a DataLoader worker. The two
paths run in interleaved rounds and the best round of each counts, so that other load on the machine hits
both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from _machine import cpu_name

warnings.filterwarnings("ignore")


def machine() -> str:
    cpu = cpu_name()
    import monai
    import PIL
    import pydicom

    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} (1 thread), monai {monai.__version__}, "
        f"pydicom {pydicom.__version__}, Pillow {PIL.__version__}, numpy {np.__version__}, Python {platform.python_version()}"
    )


def plain_dicom(path: str) -> torch.Tensor:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_modality_lut(ds.pixel_array, ds)
    arr = apply_voi_lut(arr, ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    return _norm_resize(arr)


def plain_png(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return _norm_resize(arr)


def _norm_resize(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(arr.astype(np.float32))[None, None]
    arr = torch.nn.functional.interpolate(t, size=(224, 224), mode="area")[0].numpy()
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return torch.from_numpy(np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1))


def rate(fn, paths: list[str], seconds: float) -> float:
    """Images per second of `fn` over `paths` for about `seconds`."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(paths[n % len(paths)])
        n += 1
    return n / (time.perf_counter() - start)


def compare(fns, paths: list[str], seconds: float, rounds: int = 8) -> list[float]:
    """Best rate of each of `fns` over interleaved rounds, so that load from other processes hits all alike."""
    for fn in fns:
        fn(paths[0])  # warm up
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = max(best[i], rate(fn, paths, seconds / rounds))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=4.0, help="time per path and input, split into 8 interleaved rounds")
    p.add_argument("--only-small", action="store_true", help="skip the full-size radiographs")
    p.add_argument("--write", help="also write the table as Markdown to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from monai.transforms import Compose, Resized
    from PIL import Image

    from hmn.data import load_datalist, make_demo_dataset
    from hmn.transforms import LoadXrayd, PercentileRescaled

    pipeline = Compose(
        [LoadXrayd(keys="image", spatial_size=(224, 224), resize_mode="area"), PercentileRescaled(keys="image")]
    )
    with_resized = Compose(
        [LoadXrayd(keys="image"), Resized(keys="image", spatial_size=(224, 224), mode="area"), PercentileRescaled(keys="image")]
    )

    def monai_path(path: str) -> torch.Tensor:
        return pipeline({"image": path})["image"]

    def monai_resized_path(path: str) -> torch.Tensor:
        return with_resized({"image": path})["image"]

    import data_store  # the pydicom-data wheel

    store = os.path.join(os.path.dirname(data_store.__file__), "data")
    tmp = tempfile.mkdtemp(prefix="hmn_bench_io_")
    import pydicom

    cr = pydicom.dcmread(os.path.join(store, "RG1_UNCI.dcm")).pixel_array
    cr_png = os.path.join(tmp, "RG1_16bit.png")
    Image.fromarray(cr.astype(np.uint16)).save(cr_png)
    # an NIH ChestX-ray14-like export: 1024 x 1024, 8-bit grey, air dark
    nih_png = os.path.join(tmp, "RG1_nih_like.png")
    scaled = (cr.max() - cr.astype(np.float32)) / max(float(np.ptp(cr)), 1.0) * 255
    Image.fromarray(scaled.astype(np.uint8)).resize((1024, 1024), Image.BILINEAR).save(nih_png)
    t0 = time.perf_counter()
    demo = load_datalist(make_demo_dataset(os.path.join(tmp, "demo"), n_images=900))
    demo_seconds = time.perf_counter() - t0
    demo_files = [e["image"] for e in demo["training"]]
    cases = [
        ("CR DICOM 1955x1841 MONO1 uncompressed", [os.path.join(store, "RG1_UNCI.dcm")], plain_dicom),
        ("CR DICOM 1955x1841 MONO1 JPEG 2000 lossless", [os.path.join(store, "RG1_J2KR.dcm")], plain_dicom),
        ("CR as 16-bit PNG 1955x1841", [cr_png], plain_png),
        ("CR as 8-bit PNG 1024x1024 (NIH-like export)", [nih_png], plain_png),
        ("demo DICOM 256x256 (MONO1/MONO2)", [f for f in demo_files if f.endswith(".dcm")][:100], plain_dicom),
        ("demo PNG 256x256 (8/16-bit)", [f for f in demo_files if f.endswith(".png")][:100], plain_png),
    ]
    if args.only_small:
        cases = cases[4:]
    rows = []
    for name, paths, plain in cases:
        a, c, b = compare([monai_path, monai_resized_path, plain], paths, args.seconds)
        rows.append((name, a, c, b))
    lines = [
        "| input | MONAI path, bundles' (img/s) | plain loop (img/s) | ratio | with MONAI `Resized` (img/s) | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {n} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {c:.1f} | {c / b:.2f}x |" for n, a, c, b in rows],
    ]
    text = (
        "Load + resize to 224 + percentile normalize (benchmarks/bench_io.py)\n\n"
        f"Machine: {machine()}\n\n" + "\n".join(lines) + "\n\n"
        f"Demo dataset (900 images, 256 x 256, up to 2 worker processes): generated in {demo_seconds:.1f} s\n\n"
        "At 256 x 256 a fixed per-call cost matters: MONAI's Resized on a MetaTensor takes about 0.3 ms more than\n"
        "torch's interpolate (affine and operation tracking), which the resize at load (LoadXrayd spatial_size)\n"
        "avoids; at radiograph sizes decoding dominates and the two MONAI paths are about as fast.\n"
    )
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write("# I/O benchmark\n\n" + text)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
