"""Command line for datalists and the demo datasets (``python -m hmn datalist ...``, ``python -m hmn demo-data ...``,
``python -m hmn demo3d-data ...``).

    python -m hmn datalist nih --csv Data_Entry_2017.csv --images /data/nih --out nih.json
    python -m hmn datalist nih --csv Data_Entry_2017.csv --images /data/nih --split official \\
        --train-val-list train_val_list.txt --test-list test_list.txt --out nih.json
    python -m hmn datalist chexpert --train-csv CheXpert-v1.0-small/train.csv \\
        --valid-csv CheXpert-v1.0-small/valid.csv --uncertain ignore --out chexpert.json
    python -m hmn datalist vindr-cxr --root /data/vindr-cxr/1.0.0 --combine majority --read-metadata --out vindr.json
    python -m hmn datalist rsna-pneumonia --labels-csv stage_2_train_labels.csv --vocabulary --out rsna.json
    python -m hmn datalist mimic-cxr --root /data/mimic-cxr-jpg/2.1.0 --labeler chexpert --uncertain ignore \\
        --patients-csv /data/mimic-iv/hosp/patients.csv.gz --vocabulary --out mimic.json
    python -m hmn datalist padchest --csv PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz \\
        --images /data/padchest --physician-only --projections PA,L --vocabulary --out padchest.json
    python -m hmn datalist folder --root /data/by_class --negative-class normal --out folder.json
    python -m hmn datalist json --input dataset.json --out datalist.json
    python -m hmn demo-data --root ~/.cache/hmn/demo --n-images 900 --size 256
    python -m hmn demo3d-data --root ~/.cache/hmn/demo3d --n-volumes 600 --size 64,64,32 --spacing 1.5,1.5,3.0

Each writes the datalist JSON and prints images, patients and positives per class for every split, then
how many rows the builder read, kept and left out, one line per filter and reason (with the first ids), and
the patients that two splits share, if any (the datalist's ``"rows"`` record,
:class:`hmn.data.datalist.RowAccounting`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .datalist import DatalistError, accounting_lines, classes_without_positives, summarize, write_datalist

__all__ = ["datalist_main", "demo_main", "demo3d_main", "default_demo_root", "default_demo3d_root"]


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions {text!r}: expected three numbers like 0.7,0.1,0.2") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"fractions {text!r}: expected three numbers like 0.7,0.1,0.2")
    return parts  # type: ignore[return-value]


def _common(p: argparse.ArgumentParser, check: bool = True) -> None:
    p.add_argument("--out", required=True, help="datalist JSON to write")
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.1, 0.2),
                   help="training,validation,test fractions of a patient-wise split (default 0.7,0.1,0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient shuffle (default 0)")
    if check:
        p.add_argument("--no-check-files", dest="check_files", action="store_false",
                       help="write the datalist even if image files are missing")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hmn datalist",
        description="Write a MONAI datalist JSON (training/validation/test lists of image, label, patient_id) from a "
        "public source's tables, class folders or a MONAI JSON. Every builder accounts for every row it reads: it "
        "prints 'N rows read, M kept, K left out' and one line per filter and reason, keeps these counts under "
        "'rows' in the JSON, and warns, naming them, when two splits share a patient.")
    sub = parser.add_subparsers(dest="source", required=True)

    nih = sub.add_parser("nih", help="NIH ChestX-ray14 Data_Entry_2017*.csv")
    nih.add_argument("--csv", required=True, help="Data_Entry_2017.csv or Data_Entry_2017_v2020.csv(.gz)")
    nih.add_argument("--images", help="folder with the PNGs (flat or images_0xx/images/); default: the CSV's folder")
    nih.add_argument("--split", choices=("patient", "official"), default="patient")
    nih.add_argument("--train-val-list", help="train_val_list.txt (for --split official)")
    nih.add_argument("--test-list", help="test_list.txt (for --split official)")
    nih.add_argument("--val-fraction", type=float, default=0.1, help="validation share of train_val (official split)")
    nih.add_argument("--classes", help="comma-separated subset of the 14 findings")
    nih.add_argument("--views", help="comma-separated View Position values to keep, e.g. PA")
    nih.add_argument("--vocabulary", action="store_true",
                     help="name classes by the canonical finding vocabulary (Effusion -> Pleural Effusion)")
    _common(nih)

    chx = sub.add_parser("chexpert", help="CheXpert-style CSVs with uncertain (-1) labels")
    chx.add_argument("--train-csv", required=True)
    chx.add_argument("--valid-csv")
    chx.add_argument("--test-csv")
    chx.add_argument("--images", help="folder the Path column is relative to")
    chx.add_argument("--classes", help="comma-separated observation columns (default: all but 'No Finding')")
    chx.add_argument("--uncertain", default="ones",
                     help="policy for -1: ones, zeros or ignore; or per class as 'Atelectasis=ones,Edema=zeros'")
    chx.add_argument("--split", choices=("official", "patient"),
                     help="official: the CSVs are the splits (default with --valid-csv); patient: pool and split")
    chx.add_argument("--frontal-only", action="store_true")
    chx.add_argument("--vocabulary", action="store_true", help="record the canonical finding vocabulary")
    _common(chx)

    vdr = sub.add_parser("vindr-cxr", help="VinDr-CXR 1.0.0 annotations/image_labels_{train,test}.csv (PhysioNet)")
    vdr.add_argument("--root", required=True, help="the release's folder, holding annotations/, train/ and test/")
    vdr.add_argument("--train-csv", help="default: <root>/annotations/image_labels_train.csv")
    vdr.add_argument("--test-csv", help="default: <root>/annotations/image_labels_test.csv")
    vdr.add_argument("--images", help="folder holding train/ and test/ (default: --root)")
    vdr.add_argument("--classes", help="comma-separated labels (default: all but 'No finding'); "
                                       "canonical findings with --vocabulary")
    vdr.add_argument("--combine", default="majority",
                     help="how the 3 radiologists of a training image are combined: majority (default), any or all")
    vdr.add_argument("--readers", type=int, default=3, help="reader rows expected per training image (default 3)")
    vdr.add_argument("--val-fraction", type=float, default=0.1, help="share of the training images for validation")
    vdr.add_argument("--extension", default=".dicom", help="image file extension (default .dicom)")
    vdr.add_argument("--vocabulary", action="store_true", help="canonical finding names (hmn.data.vocabulary)")
    vdr.add_argument("--read-metadata", action="store_true", help="age, sex, view from the DICOM headers")
    vdr.add_argument("--out", required=True, help="datalist JSON to write")
    vdr.add_argument("--seed", type=int, default=0, help="seed of the validation carve (default 0)")
    vdr.add_argument("--no-check-files", dest="check_files", action="store_false",
                     help="write the datalist even if image files are missing")

    rsna = sub.add_parser("rsna-pneumonia", help="RSNA Pneumonia Detection stage_2_train_labels.csv (Kaggle)")
    rsna.add_argument("--labels-csv", required=True, help="stage_2_train_labels.csv")
    rsna.add_argument("--class-info-csv", help="stage_2_detailed_class_info.csv (checked against Target)")
    rsna.add_argument("--images", help="folder of <patientId>.dcm (default: stage_2_train_images beside the CSV)")
    rsna.add_argument("--include-not-normal", action="store_true",
                      help="add the class 'No Lung Opacity / Not Normal' (needs --class-info-csv)")
    rsna.add_argument("--vocabulary", action="store_true", help="record the canonical vocabulary (hmn.data.vocabulary)")
    rsna.add_argument("--read-metadata", action="store_true", help="age, sex, view from the DICOM headers")
    _common(rsna)

    mim = sub.add_parser("mimic-cxr", help="MIMIC-CXR-JPG 2.0.0/2.1.0 tables (PhysioNet)")
    mim.add_argument("--root", help="folder holding mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv(.gz)")
    mim.add_argument("--images", help="folder holding files/ (default: --root)")
    mim.add_argument("--labeler", choices=("chexpert", "negbio"), default="chexpert",
                     help="whose study labels: the CheXpert labeller's (default) or NegBio's table")
    mim.add_argument("--classes", help="comma-separated observations (default: all but 'No Finding'); "
                                       "canonical findings with --vocabulary")
    mim.add_argument("--uncertain", default="ones",
                     help="policy for -1: ones, zeros or ignore; or per class as 'Atelectasis=ones,Edema=zeros'")
    mim.add_argument("--views", help="comma-separated ViewPosition values to keep, e.g. PA,AP")
    mim.add_argument("--split", choices=("official", "patient"), default="official",
                     help="official: the split table (validate -> validation); patient: seeded by subject")
    mim.add_argument("--patients-csv", help="MIMIC-IV patients.csv(.gz): age and sex of each subject")
    mim.add_argument("--metadata-csv", help="default: mimic-cxr-2.0.0-metadata.csv(.gz) in --root")
    mim.add_argument("--labels-csv", help="default: mimic-cxr-2.0.0-<labeler>.csv(.gz) in --root")
    mim.add_argument("--split-csv", help="default: mimic-cxr-2.0.0-split.csv(.gz) in --root")
    mim.add_argument("--vocabulary", action="store_true", help="canonical finding names (hmn.data.vocabulary)")
    _common(mim)

    pad = sub.add_parser("padchest", help="PadChest PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv(.gz)")
    pad.add_argument("--csv", required=True, help="the PadChest label table")
    pad.add_argument("--images", help="folder holding the ImageDir folders (0/, 1/, ...) or the PNGs flat; "
                                      "default: the CSV's folder")
    pad.add_argument("--classes", help="comma-separated PadChest labels (default: those with a canonical finding); "
                                       "canonical findings with --vocabulary")
    pad.add_argument("--physician-only", action="store_true", help="only rows labelled by hand (MethodLabel Physician)")
    pad.add_argument("--projections", help="comma-separated Projection values to keep, e.g. PA,L,AP_horizontal")
    pad.add_argument("--vocabulary", action="store_true", help="canonical finding names (hmn.data.vocabulary)")
    _common(pad)

    fol = sub.add_parser("folder", help="one folder per class (optionally inside train/val/test folders)")
    fol.add_argument("--root", required=True)
    fol.add_argument("--negative-class", help="folder whose images have no finding (all-zero label)")
    fol.add_argument("--patient-regex", help="regex on file names; group 1 is the patient id")
    fol.add_argument("--volumes", action="store_true",
                     help="CT/MR studies for the 3D bundles: each NIfTI file and each folder of one DICOM series is "
                          "one entry (without it, each image file is one)")
    _common(fol, check=False)

    js = sub.add_parser("json", help="an existing MONAI datalist JSON")
    js.add_argument("--input", required=True)
    js.add_argument("--class-names", help="comma-separated class names (when the JSON has none)")
    js.add_argument("--base-dir", help="folder relative image paths are resolved against (default: the JSON's)")
    _common(js)
    return parser


def _split_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _policy(text: str):
    if "=" not in text:
        return text
    out = {}
    for part in text.split(","):
        name, _, pol = part.partition("=")
        out[name.strip()] = pol.strip()
    return out


def datalist_main(argv: list[str]) -> int:
    """``python -m hmn datalist {nih,chexpert,mimic-cxr,padchest,vindr-cxr,rsna-pneumonia,folder,json} ...``: writes
    a datalist and prints its counts: per split and class, then the rows read, kept and left out per filter and
    reason (:func:`hmn.data.datalist.accounting_lines`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.source == "nih":
            from .nih import NIH_CLASSES, nih_datalist

            data = nih_datalist(
                args.csv, args.images, split=args.split, train_val_list=args.train_val_list,
                test_list=args.test_list, fractions=args.fractions, val_fraction=args.val_fraction,
                seed=args.seed, classes=_split_list(args.classes) or NIH_CLASSES,
                views=_split_list(args.views), check_files=args.check_files, vocabulary=args.vocabulary,
            )
        elif args.source == "chexpert":
            from .chexpert import chexpert_datalist

            data = chexpert_datalist(
                args.train_csv, args.valid_csv, args.test_csv, image_root=args.images,
                classes=_split_list(args.classes), uncertain=_policy(args.uncertain), split=args.split,
                fractions=args.fractions, seed=args.seed, frontal_only=args.frontal_only,
                check_files=args.check_files, vocabulary=args.vocabulary,
            )
        elif args.source == "vindr-cxr":
            from .vindr import vindr_cxr_datalist

            data = vindr_cxr_datalist(
                args.root, args.train_csv, args.test_csv, image_root=args.images,
                classes=_split_list(args.classes), combine=args.combine, readers=args.readers,
                val_fraction=args.val_fraction, seed=args.seed, extension=args.extension,
                vocabulary=args.vocabulary, read_metadata=args.read_metadata, check_files=args.check_files,
            )
        elif args.source == "rsna-pneumonia":
            from .rsna import rsna_pneumonia_datalist

            data = rsna_pneumonia_datalist(
                args.labels_csv, args.images, class_info_csv=args.class_info_csv,
                include_not_normal=args.include_not_normal, fractions=args.fractions, seed=args.seed,
                vocabulary=args.vocabulary, read_metadata=args.read_metadata, check_files=args.check_files,
            )
        elif args.source == "mimic-cxr":
            from .mimic import mimic_cxr_datalist

            data = mimic_cxr_datalist(
                args.root, image_root=args.images, labeler=args.labeler, classes=_split_list(args.classes),
                uncertain=_policy(args.uncertain), views=_split_list(args.views), split=args.split,
                fractions=args.fractions, seed=args.seed, patients_csv=args.patients_csv,
                metadata_csv=args.metadata_csv, labels_csv=args.labels_csv, split_csv=args.split_csv,
                check_files=args.check_files, vocabulary=args.vocabulary,
            )
        elif args.source == "padchest":
            from .padchest import padchest_datalist

            data = padchest_datalist(
                args.csv, args.images, classes=_split_list(args.classes), physician_only=args.physician_only,
                projections=_split_list(args.projections), fractions=args.fractions, seed=args.seed,
                check_files=args.check_files, vocabulary=args.vocabulary,
            )
        elif args.source == "folder":
            from .folder import folder_datalist

            data = folder_datalist(args.root, negative_class=args.negative_class, patient_regex=args.patient_regex,
                                   fractions=args.fractions, seed=args.seed, volumes=args.volumes)
        else:
            from .folder import json_datalist

            data = json_datalist(args.input, class_names=_split_list(args.class_names), fractions=args.fractions,
                                 seed=args.seed, check_files=args.check_files, base_dir=args.base_dir)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = write_datalist(data, args.out)
    print(f"wrote {path}")
    print(summarize(data))
    for line in accounting_lines(data):
        print(line)
    for split, missing in classes_without_positives(data).items():
        print(f"warning: the {split} split has no positive label for {len(missing)} class(es): {', '.join(missing)}; "
              "their ROC AUC is undefined there, so they are left out of that split's macro average"
              + (" (the validation score that selects the best model)" if split == "validation" else ""),
              file=sys.stderr)
    return 0


def _cache_base() -> str:
    return os.environ.get("HMN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hmn")


def default_demo_root() -> str:
    """``$HMN_CACHE/demo`` or ``~/.cache/hmn/demo``: where the demo dataset goes by default."""
    return os.path.join(_cache_base(), "demo")


def default_demo3d_root() -> str:
    """``$HMN_CACHE/demo3d`` or ``~/.cache/hmn/demo3d``: where the 3D demo dataset goes by default."""
    return os.path.join(_cache_base(), "demo3d")


def demo_main(argv: list[str]) -> int:
    """``python -m hmn demo-data``: writes (or reuses) the synthetic demo dataset and prints its counts."""
    from .datalist import read_datalist
    from .demo import make_demo_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m hmn demo-data",
        description="Write the SYNTHETIC demo chest-radiograph dataset (phantoms, not patients) and its datalist.",
    )
    p.add_argument("--root", default=default_demo_root(), help="output folder (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=900)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.15, 0.15))
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    args = p.parse_args(argv)
    if args.n_images < 1 or args.size < 64:
        print("error: --n-images must be >= 1 and --size >= 64", file=sys.stderr)
        return 2
    path = make_demo_dataset(args.root, n_images=args.n_images, image_size=args.size, seed=args.seed,
                             fractions=args.fractions, overwrite=args.overwrite)
    print(f"datalist: {path}")
    print(summarize(read_datalist(path)))
    return 0


def _triple(kind: type, what: str):
    def parse(text: str):
        try:
            parts = tuple(kind(p) for p in text.split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3 or any(p <= 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{what} {text!r}: expected three positive numbers like "
                                             + ("64,64,32" if kind is int else "1.5,1.5,3.0"))
        return parts
    return parse


def demo3d_main(argv: list[str]) -> int:
    """``python -m hmn demo3d-data``: writes (or reuses) the synthetic 3D demo dataset and prints its counts."""
    from .datalist import read_datalist
    from .demo3d import DEFAULT_SIZE, DEFAULT_SPACING, make_demo3d_dataset

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m hmn demo3d-data",
        description="Write the SYNTHETIC 3D demo dataset (CT-like phantoms in HU, not patients) and its datalist.",
    )
    p.add_argument("--root", default=default_demo3d_root(), help="output folder (default: %(default)s)")
    p.add_argument("--n-volumes", type=int, default=600)
    p.add_argument("--size", type=_triple(int, "size"), default=DEFAULT_SIZE,
                   help="voxels along X,Y,Z, each >= 16 (default %(default)s)")
    p.add_argument("--spacing", type=_triple(float, "spacing"), default=DEFAULT_SPACING,
                   help="voxel spacing in mm along X,Y,Z (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.15, 0.15))
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    args = p.parse_args(argv)
    if args.n_volumes < 1 or min(args.size) < 16:
        print("error: --n-volumes must be >= 1 and every --size >= 16", file=sys.stderr)
        return 2
    try:
        path = make_demo3d_dataset(args.root, n_volumes=args.n_volumes, size=args.size, spacing=args.spacing,
                                   seed=args.seed, fractions=args.fractions, overwrite=args.overwrite)
    except (ValueError, DatalistError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"datalist: {path}")
    print(summarize(read_datalist(path)))
    return 0
