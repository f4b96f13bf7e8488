"""Cityscapes (fine annotations) in its own layout, the one torchvision's `Cityscapes` reads:

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The annotations hold the 34 Cityscapes label ids (0..33); training and evaluation use the 19
train ids of the benchmark (road = 0 ... bicycle = 18), every other id ignored (255). The map,
the class names and colours come from torchvision's `Cityscapes.classes` (the table of the
official cityscapesScripts `labels.py`); torchvision also lists the files and extracts the
downloaded zips. The mapped labels are written beside the annotations under the name the
official `createTrainIdLabelImgs.py` uses, `<...>_gtFine_labelTrainIds.png` (label_path, for the
CRF and evaluation); a data set that only kept those files is read from them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision

from seglab.data.base import SegmentationDataset, write_mapped_labels
from seglab.data.images import DataError

URL = "https://www.cityscapes-dataset.com/downloads/"
HOW_TO_GET = (f"Cityscapes needs a (free) login: download leftImg8bit_trainvaltest.zip and "
              f"gtFine_trainvaltest.zip from {URL} into ROOT, then run `python "
              "Implementation/datasets.py --dataset cityscapes --root ROOT` (extracts them and "
              "writes the train-id labels).")
CLASSES = torchvision.datasets.Cityscapes.classes
TRAIN = sorted((c for c in CLASSES if 0 <= c.train_id < 255), key=lambda c: c.train_id)
SPLITS = ("train", "val", "test")


def train_id_table() -> np.ndarray:
    """Label id -> train id (255 for the ids the benchmark ignores); -1 for values that are
    no Cityscapes label id."""
    table = np.full(256, -1, np.int16)
    for c in CLASSES:
        if c.id >= 0:
            table[c.id] = c.train_id if 0 <= c.train_id < 255 else 255
    return table


class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes fine, 19 classes. `root` contains leftImg8bit/ and gtFine/."""

    name, how_to_get = "cityscapes", HOW_TO_GET
    classes = tuple(c.name for c in TRAIN)
    colors = np.array([c.color for c in TRAIN], np.uint8)
    raw_values = "Cityscapes label ids 0..33"
    label_help = ("Labels are read from *_gtFine_labelIds.png (values 0..33); *_gtFine_color.png "
                  "is a colour rendering and *_instanceIds.png holds instance ids. Re-extract "
                  "gtFine_trainvaltest.zip.")

    def __init__(self, root, split: str = "train", transform=None, num_classes: int = 19):
        super().__init__(root, split, transform, num_classes)
        self.require_num_classes((len(TRAIN),), "cityscapes")
        self.table = train_id_table()
        if split not in SPLITS:
            raise DataError(f"Cityscapes has no split {split!r}; its fine splits are "
                            f"{', '.join(SPLITS)}")
        try:
            listing = torchvision.datasets.Cityscapes(str(root), split=split, mode="fine",
                                                      target_type="semantic")
        except (RuntimeError, OSError) as e:
            raise DataError(f"Cityscapes not found under {root}: expected "
                            f"{Path(root) / 'leftImg8bit' / split} and "
                            f"{Path(root) / 'gtFine' / split} ({e}). {HOW_TO_GET}") from None
        pairs = sorted((Path(image).name.rsplit("_leftImg8bit", 1)[0], Path(image), Path(t[0]))
                       for image, t in zip(listing.images, listing.targets))
        self.ids = [p[0] for p in pairs]
        self.list_path = Path(listing.images_dir)
        self._images = [p[1] for p in pairs]
        self._labels = [p[2] for p in pairs]

    @staticmethod
    def image_folder(root) -> Path:
        """The images, in one sub-folder per split and city (crf.py apply: pass --split)."""
        return Path(root) / "leftImg8bit"

    def image_path(self, i: int) -> Path:
        return self._images[i]

    def raw_label_path(self, i: int) -> Path:
        return self._labels[i]

    def mapped_label_path(self, i: int) -> Path:
        raw = self._labels[i]
        return raw.with_name(raw.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


def prepare(root, download: bool = False, workers: int = 4, progress: bool = True) -> dict:
    """Extract the zips if needed (torchvision) and write the train-id labels of train and
    val; returns {split: number of images}."""
    if download:
        raise DataError(f"Cityscapes cannot be downloaded without a login. {HOW_TO_GET}")
    return {split: write_mapped_labels(CityscapesSegmentation(root, split), workers, progress)
            for split in ("train", "val")}
