"""PASCAL VOC 2012 segmentation in its own layout (the one torchvision reads too).

    root/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png          VOC's 2,913 palette masks (train + val)
        SegmentationClassAug/<id>.png       train_aug masks: SBD .mat converted, VOC's own win
        ImageSets/Segmentation/{train,val,trainval,train_aug}.txt
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seglab.data.base import SegmentationDataset
from seglab.data.images import DataError
from seglab.data.labels import VOC_CLASSES, load_label, voc_palette

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


class VOCSegmentation(SegmentationDataset):
    """VOC-layout segmentation set. `root` contains VOCdevkit/ (as in torchvision).

    `ds[i]` or `ds[(i, sample_seed)]` -> {"image", "label", "id", "size"}: with a TrainTransform
    the augmentation draws from np.random.default_rng(sample_seed) (seed = i when not given);
    with an EvalTransform the label is the original-size label; with no transform the image is
    the normalised (Caffe) full image (seglab/data/base.py: every transform is called as
    transform(image, label, rng) -> (image, label)). The masks hold class indices
    already: no mapping, and labels.load_label's VOC-specific checks and messages."""

    name, classes, how_to_get = "voc", VOC_CLASSES, HOW_TO_GET
    class_counts = tuple(range(1, len(VOC_CLASSES)))  # a VOC-layout set of the first N classes
    colors = voc_palette()[:len(VOC_CLASSES)]         # the devkit's colour map

    def __init__(self, root, split: str = "train_aug", transform=None, num_classes: int = 21,
                 check_labels: bool = True, label_dir: str | None = None):
        super().__init__(root, split, transform, num_classes)
        self.check_labels = check_labels
        base = voc_dir(root)
        if not base.is_dir():
            raise DataError(f"VOC 2012 not found: expected {base} (with JPEGImages/, "
                            f"SegmentationClass/, ImageSets/Segmentation/). {HOW_TO_GET}")
        if split == "train_aug" and not (base / "ImageSets/Segmentation/train_aug.txt").is_file():
            raise DataError(f"{base / 'ImageSets/Segmentation/train_aug.txt'} not found: train_aug "
                            f"is built from SBD. {HOW_TO_GET}")
        self.list_path = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        self.ids = read_ids(self.list_path)
        label_dir = label_dir or ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        self.image_dir, self.label_dir = base / "JPEGImages", base / label_dir

    @staticmethod
    def image_folder(root) -> Path:
        """Where the images of every split live."""
        return voc_dir(root) / "JPEGImages"

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self.label_dir / f"{self.ids[i]}.png"

    raw_label_path = label_path

    def load_label(self, i: int, image_size=None) -> np.ndarray:
        """The checked (H, W) uint8 label of image i (of `image_size` when given)."""
        return load_label(self._require(self.label_path(i), "label"), image_size,
                          self.num_classes if self.check_labels else None)

    def _require(self, path: Path, what: str) -> Path:
        """`path`, or a DataError saying where it is expected and how to get it."""
        if not path.is_file():
            if path.parent.is_dir() and any(path.parent.iterdir()):
                raise DataError(f"{what} {path} not found, but id {path.stem!r} is listed in "
                                f"{self.split}.txt ({self.list_path}). Remove the id from the "
                                "list or restore the file.")
            how = HOW_TO_GET
            if self.label_dir.name == "SegmentationClassAug":
                how = ("SegmentationClassAug/ is written by `python Implementation/datasets.py "
                       "--root ROOT` from SBD's .mat files. " + HOW_TO_GET)
            raise DataError(f"{what} not found: {path} (id {path.stem!r} of "
                            f"{self.split}.txt). {how}")
        return path
