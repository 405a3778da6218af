"""``python -m hmn <command> ...``: the project's command line.

Each command lives in its own module and receives the remaining arguments; ``python -m hmn`` alone
lists them.
"""

from __future__ import annotations

import importlib
import sys

# command -> ("module:function", one-line help). The function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "bundles": ("hmn.bundle.files:main", "write (or --check) the MONAI bundles under bundles/ from the template"),
    "pack-bundle": ("hmn.bundle.packing:pack_main", "zip a bundle with its trained models/model.pt and its TorchScript export for sharing"),
    "fetch-large-files": ("hmn.bundle.distribution:fetch_main",
                          "download and hash-check the files an unpacked bundle's large_files.yml links (model.pt, model.ts)"),
    "datalist": ("hmn.data.cli:datalist_main", "write a datalist JSON from NIH, CheXpert, MIMIC-CXR, PadChest, VinDr-CXR, RSNA tables, class folders or a MONAI JSON"),
    "demo-data": ("hmn.data.cli:demo_main", "write (or reuse) the synthetic demo chest-radiograph dataset"),
    "demo3d-data": ("hmn.data.cli:demo3d_main", "write (or reuse) the synthetic 3D demo dataset (CT-like volumes, NIfTI and DICOM)"),
    "bench": ("hmn.bench:bench_main", "training/inference speed and peak memory of HybridMedNet against the bare backbone"),
    "compare": ("hmn.evaluation.compare:compare_main",
                "compare two models' per-class ROC AUCs from their predictions.csv (DeLong test, paired bootstrap)"),
    "report": ("hmn.evaluation.report:report_main",
               "the evaluation report (patient-level intervals, operating points, calibration) of any predictions.csv"),
    "explain": ("hmn.explain:explain_main", "Grad-CAM heatmaps (overlay PNG and .npy per finding) of one image with a trained bundle"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatches ``argv[0]`` to its command module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hmn <command> [args...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<12} {help_text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, fn = COMMANDS[name][0].partition(":")
    return int(getattr(importlib.import_module(module), fn)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
