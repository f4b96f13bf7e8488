"""Get the data: PASCAL VOC 2012, and SBD's extra annotations turned into `train_aug`.

    python Implementation/datasets.py --root data --download   # fetch VOC + SBD, build train_aug
    python Implementation/datasets.py --root data --sbd-root data/SBD   # build train_aug only

The layout and the split arithmetic are in seglab/data/voc.py and seglab/data/sbd.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seglab.data.images import DataError
from seglab.data.sbd import build_train_aug, download
from seglab.data.voc import voc_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Get VOC 2012 + SBD and build the train_aug split.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", default="data", help="folder that contains (or will contain) VOCdevkit/")
    p.add_argument("--download", action="store_true",
                   help="download VOC 2012 and SBD with torchvision (about 3.4 GB)")
    p.add_argument("--sbd-root", help="SBD folder with cls/, train.txt, val.txt (default ROOT/SBD)")
    args = p.parse_args(argv)
    try:
        counts = download(args.root) if args.download else build_train_aug(
            args.root, args.sbd_root or Path(args.root) / "SBD")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"train_aug: {counts['train_aug']} ids, val: {counts['val']} ids "
          f"({voc_dir(args.root) / 'ImageSets/Segmentation'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
