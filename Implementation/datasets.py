"""Get the data and put it in the layout the loaders read.

    python Implementation/datasets.py --root data --download   # VOC 2012 + SBD, build train_aug
    python Implementation/datasets.py --root data --sbd-root data/SBD   # build train_aug only
    python Implementation/datasets.py --dataset ade20k --root data/ade20k --download
    python Implementation/datasets.py --dataset cocostuff10k --root data/cocostuff-10k --download
    python Implementation/datasets.py --dataset cocostuff164k --root data/cocostuff-164k --download
    python Implementation/datasets.py --dataset cityscapes --root data/cityscapes  # zips in ROOT
    python Implementation/datasets.py --dataset folder --root my_data --val-fraction 0.2 --seed 0

Every data set other than VOC is prepared the same way: downloaded and extracted where a public
source allows it (Cityscapes needs a login: download its two zips by hand), then every label of
every split is read, checked and, where the annotation files hold other ids than the classes
(Cityscapes label ids, COCO-Stuff's 182 ids, ADE20K's 0 = unlabelled), mapped and written as a
class-index PNG. A folder data set gets its train.txt / val.txt (a seeded split) and a check of
every sample. The layouts and the label maps are in seglab/data/<name>.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seglab.data import ade20k, cityscapes, cocostuff, folder
from seglab.data.images import DataError
from seglab.data.sbd import build_train_aug, download
from seglab.data.voc import voc_dir

NAMES = ("voc", "cityscapes", "ade20k", "cocostuff10k", "cocostuff164k", "folder")


def prepare(args) -> dict:
    """{split: images} of the prepared data set (VOC: train_aug and val)."""
    if args.dataset == "voc":
        return download(args.root) if args.download else build_train_aug(
            args.root, args.sbd_root or Path(args.root) / "SBD")
    if args.dataset == "folder":
        if args.download:
            raise DataError("a folder data set is yours: there is nothing to download")
        return folder.prepare(args.root, args.val_fraction, args.seed)
    if args.dataset in ("cocostuff10k", "cocostuff164k"):
        return cocostuff.prepare(args.dataset, args.root, args.download, args.num_classes,
                                 args.workers)
    module = {"cityscapes": cityscapes, "ade20k": ade20k}[args.dataset]
    return module.prepare(args.root, args.download, args.workers)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Get a data set and prepare its labels (default: "
                                            "VOC 2012 + SBD -> the train_aug split).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="voc", choices=NAMES, help="which data set")
    p.add_argument("--root", default="data", help="folder that contains (or will contain) the "
                                                  "data set (VOC: VOCdevkit/)")
    p.add_argument("--download", action="store_true",
                   help="download it first (VOC + SBD with torchvision, about 3.4 GB; ADE20K "
                        "923 MB; COCO-Stuff 10k 2 GB, 164k 20 GB; not Cityscapes)")
    p.add_argument("--sbd-root", help="VOC: SBD folder with cls/, train.txt, val.txt "
                                      "(default ROOT/SBD)")
    p.add_argument("--num-classes", type=int, default=171, choices=(171, 182),
                   help="COCO-Stuff: 171 used classes, or the port's 182 label ids")
    p.add_argument("--val-fraction", type=float, default=folder.VAL_FRACTION,
                   help="folder: share of the images in val when no lists exist yet")
    p.add_argument("--seed", type=int, default=folder.SEED,
                   help="folder: seed of the train/val split when no lists exist yet")
    p.add_argument("--workers", type=int, default=4, help="threads that read and write labels")
    args = p.parse_args(argv)
    try:
        if not 0 <= args.val_fraction < 1:
            raise DataError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        counts = prepare(args)
    except (DataError, OSError) as e:  # OSError: a failed download or write
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dataset == "voc":
        print(f"train_aug: {counts['train_aug']} ids, val: {counts['val']} ids "
              f"({voc_dir(args.root) / 'ImageSets/Segmentation'})")
    else:
        print(f"{args.dataset} ({args.root}): " +
              ", ".join(f"{k}: {v} {'' if k == 'classes' else 'images'}".strip()
                        for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
