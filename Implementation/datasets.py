"""PASCAL VOC 2012 segmentation, and SBD's extra annotations turned into `train_aug`.

    root/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          VOC's 2,913 palette masks (train + val)
        SegmentationClassAug/<id>.png       train_aug masks: SBD .mat converted, VOC's own win
        ImageSets/Segmentation/{train,val,trainval,train_aug}.txt

`train_aug` = (VOC train ∪ SBD train ∪ SBD val) − VOC val = 10,582 ids; `val` = 1,449 ids.
torchvision's SBDataset "train"/"val" is SBD's own 8,498/2,857 split, whose val overlaps VOC
val: it is an input here, never a training list on its own.

    python Implementation/datasets.py --root data --download   # fetch VOC + SBD, build train_aug
    python Implementation/datasets.py --root data --sbd-root data/SBD   # build train_aug only
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from labels import DataError, atomic_output, load_image, load_label, save_label_png
from transforms import EvalTransform, TrainTransform, normalize

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = ("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
           "benchmark.tgz")
REAL_COUNTS = {"train": 1464, "val": 1449, "train_aug": 10582}
HOW_TO_GET = (f"Run `python Implementation/datasets.py --download --root ROOT` (torchvision's "
              f"downloaders fetch VOC 2012 and SBD and build train_aug), or get them by hand: "
              f"{VOC_URL} (extract into ROOT) and {SBD_URL} (then `python "
              f"Implementation/datasets.py --root ROOT --sbd-root PATH/TO/benchmark_RELEASE/dataset`).")


def voc_dir(root) -> Path:
    return Path(root) / "VOCdevkit" / "VOC2012"


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"split list not found: {path}. Expected the VOC 2012 layout under "
                        f"{path.parents[2].parent}. {HOW_TO_GET}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class VOCSegmentation(torch.utils.data.Dataset):
    """VOC-layout segmentation set. `root` contains VOCdevkit/ (as in torchvision).

    `ds[i]` or `ds[(i, sample_seed)]` -> {"image", "label", "id", "size"}: with a TrainTransform
    the augmentation draws from np.random.default_rng(sample_seed) (seed = i when not given);
    with an EvalTransform the label is the original-size label; with no transform the image is
    the normalised (Caffe) full image."""

    def __init__(self, root, split: str = "train_aug", transform=None, num_classes: int = 21,
                 check_labels: bool = True, label_dir: str | None = None):
        self.root, self.split, self.transform = Path(root), split, transform
        self.num_classes, self.check_labels = num_classes, check_labels
        base = voc_dir(root)
        if not base.is_dir():
            raise DataError(f"VOC 2012 not found: expected {base} (with JPEGImages/, "
                            f"SegmentationClass/, ImageSets/Segmentation/). {HOW_TO_GET}")
        if split == "train_aug" and not (base / "ImageSets/Segmentation/train_aug.txt").is_file():
            raise DataError(f"{base / 'ImageSets/Segmentation/train_aug.txt'} not found: train_aug "
                            f"is built from SBD. {HOW_TO_GET}")
        self.ids = read_ids(base / "ImageSets" / "Segmentation" / f"{split}.txt")
        label_dir = label_dir or ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        self.image_dir, self.label_dir = base / "JPEGImages", base / label_dir

    def __len__(self):
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self.label_dir / f"{self.ids[i]}.png"

    def _require(self, path: Path, what: str) -> Path:
        """`path`, or a DataError saying where it is expected and how to get it."""
        if not path.is_file():
            how = HOW_TO_GET
            if self.label_dir.name == "SegmentationClassAug":
                how = ("SegmentationClassAug/ is written by `python Implementation/datasets.py "
                       "--root ROOT` from SBD's .mat files. " + HOW_TO_GET)
            raise DataError(f"{what} not found: {path} (id {path.stem!r} of "
                            f"{self.split}.txt). {how}")
        return path

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, item)
        image = load_image(self._require(self.image_path(i), "image"))
        label = load_label(self._require(self.label_path(i), "label"), image.shape[:2],
                           self.num_classes if self.check_labels else None)
        size = tuple(image.shape[:2])
        if isinstance(self.transform, TrainTransform):
            x, y = self.transform(image, label, np.random.default_rng(seed))
        elif isinstance(self.transform, EvalTransform):
            x, _ = self.transform(image)
            y = torch.from_numpy(label.astype(np.int64))
        elif self.transform is None:
            x, y = normalize(image), torch.from_numpy(label.astype(np.int64))
        else:
            x, y = self.transform(image, label)
        return {"image": x, "label": y, "id": self.ids[i], "size": size}


# --- SBD -> train_aug -------------------------------------------------------------------------

def read_sbd_mask(path: Path) -> np.ndarray:
    """SBD's cls/<id>.mat: struct GTcls with field Segmentation (H, W) of class indices."""
    from scipy.io import loadmat
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:
        raise DataError(f"cannot read SBD annotation {path}: {e}. Re-extract SBD's benchmark.tgz.") from e
    if seg.ndim != 2 or seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
        raise DataError(f"SBD annotation {path}: GTcls.Segmentation is not an (H, W) map of class "
                        f"indices 0..255 (shape {seg.shape}); re-extract SBD's benchmark.tgz.")
    return seg.astype(np.uint8)


def train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) -> list[str]:
    """(VOC train ∪ SBD train ∪ SBD val) − VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def build_train_aug(root, sbd_root, expect_real_counts: bool | None = None,
                    progress: bool = True) -> dict:
    """Write SegmentationClassAug/ and train_aug.txt; idempotent (present PNGs are kept) and
    safe to kill (every PNG is written to a temp file and renamed)."""
    base, sbd = voc_dir(root), Path(sbd_root)
    lists = base / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_ids(lists / "train.txt"), read_ids(lists / "val.txt")
    for name in ("train.txt", "val.txt"):
        if not (sbd / name).is_file():
            raise DataError(f"SBD list {sbd / name} not found: --sbd-root must hold cls/, img/, "
                            f"train.txt and val.txt (SBD's benchmark_RELEASE/dataset). {HOW_TO_GET}")
    sbd_train, sbd_val = read_ids(sbd / "train.txt"), read_ids(sbd / "val.txt")
    ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    if expect_real_counts is None:
        expect_real_counts = len(voc_train) == REAL_COUNTS["train"]
    if expect_real_counts and (len(ids) != REAL_COUNTS["train_aug"] or len(voc_val) != REAL_COUNTS["val"]):
        raise DataError(
            f"train_aug has {len(ids)} ids and val {len(voc_val)}; the real data gives "
            f"{REAL_COUNTS['train_aug']} and {REAL_COUNTS['val']}. Found: VOC train {len(voc_train)} "
            f"(expect 1,464), VOC val {len(voc_val)} (expect 1,449), SBD train {len(sbd_train)} "
            f"(expect 8,498), SBD val {len(sbd_val)} (expect 2,857): the list whose size differs is "
            "incomplete or from another release.")
    out = base / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    voc_pngs = base / "SegmentationClass"
    for i in tqdm(ids, desc="train_aug masks", disable=not progress):
        target = out / f"{i}.png"
        if target.is_file():
            continue
        if (voc_pngs / f"{i}.png").is_file():  # VOC's own annotation wins
            with atomic_output(target) as tmp:
                shutil.copyfile(voc_pngs / f"{i}.png", tmp)
        else:
            mat = sbd / "cls" / f"{i}.mat"
            if not mat.is_file():
                raise DataError(f"{i} is in the SBD lists but {mat} is missing; re-extract SBD.")
            save_label_png(target, read_sbd_mask(mat))
    listing = "".join(f"{i}\n" for i in ids)
    target = lists / "train_aug.txt"
    if not target.is_file() or target.read_text() != listing:  # a rerun leaves it untouched
        with atomic_output(target) as tmp:
            tmp.write_text(listing)
    return {"train_aug": len(ids), "val": len(voc_val)}


def download(root) -> dict:
    """Fetch VOC 2012 and SBD with torchvision's own download code, then build train_aug.

    A data set already in place is not fetched again: torchvision would re-extract the 2 GB VOC
    tar, and its SBD code fails when SBD's folders already exist (it moves them into place)."""
    import torchvision
    root = Path(root)
    base, sbd = voc_dir(root), root / "SBD"
    if not ((base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir()
            and (base / "ImageSets" / "Segmentation" / "val.txt").is_file()):
        torchvision.datasets.VOCSegmentation(str(root), year="2012", image_set="train",
                                             download=True)
    if not ((sbd / "cls").is_dir() and (sbd / "train.txt").is_file()
            and (sbd / "val.txt").is_file()):
        torchvision.datasets.SBDataset(str(sbd), image_set="train", mode="segmentation",
                                       download=True)
    return build_train_aug(root, sbd)


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
