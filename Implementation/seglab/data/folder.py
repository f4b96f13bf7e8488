"""Your own data: a plain folder of images and index masks.

    root/images/<id>.jpg      (or .jpeg / .png / .bmp / .tif / .tiff)
    root/masks/<id>.png       single-channel PNG (mode L or P): pixel value = class index,
                              255 = ignored (unlabelled, borders); same size as the image
    root/classes.txt          one class name per line: line k (from 0) names class k
    root/palette.txt          optional: one "R G B" line per class, the colours of overlays
    root/train.txt, val.txt   optional: image ids, one per line; any root/<name>.txt is a
                              split <name>; split "all" is every mask

Without train.txt / val.txt the split is seeded: the ids (mask names, sorted) are permuted by
numpy.random.default_rng(SEED) and the first round(VAL_FRACTION x n) of them (at least one, when
there are two or more) are val, the rest train. `python Implementation/datasets.py --dataset
folder --root ROOT --val-fraction F --seed S` writes the lists of such a split (then adding
images later never moves the old ones) and checks every sample.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from seglab.atomic import atomic_output
from seglab.data.base import SegmentationDataset
from seglab.data.images import DataError, load_image
from seglab.data.voc import read_ids

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SEED, VAL_FRACTION = 0, 0.1
LAYOUT = ("a folder dataset is ROOT/images/<id>.jpg, ROOT/masks/<id>.png (class indices, 255 "
          "ignored) and ROOT/classes.txt (one class name per line); see seglab/data/folder.py")


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} not found: {LAYOUT}")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not 1 <= len(names) <= 255:
        raise DataError(f"{path} lists {len(names)} classes; it must list 1 to 255 (value 255 "
                        "is the ignore label), one name per line")
    return names


def read_palette(root: Path, count: int) -> np.ndarray | None:
    path = root / "palette.txt"
    if not path.is_file():
        return None
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        colors = np.array([[int(v) for v in re.split(r"[\s,]+", r.strip())] for r in rows])
    except ValueError:
        colors = np.zeros((0, 0))
    if colors.shape != (count, 3) or colors.min(initial=0) < 0 or colors.max(initial=0) > 255:
        raise DataError(f"{path} must hold one 'R G B' line (0..255) per class of classes.txt "
                        f"({count} classes); got {len(rows)} line(s) of another form")
    return colors.astype(np.uint8)


def seeded_split(ids, val_fraction: float = VAL_FRACTION, seed: int = SEED) -> dict:
    """{"train": [...], "val": [...]}, each sorted (see the module docstring)."""
    ids = sorted(ids)
    n_val = 0 if len(ids) < 2 else min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[k] for k in order[:n_val]}
    return {"train": [i for i in ids if i not in val], "val": sorted(val)}


class FolderSegmentation(SegmentationDataset):
    """images/ + masks/ + classes.txt (+ palette.txt, split lists) under `root`."""

    name = "folder"
    label_help = ("Masks must be single-channel PNGs whose pixel values are class indices "
                  "(line k of classes.txt = value k, 255 = ignored); convert colour-coded masks "
                  "to indices first.")

    def __init__(self, root, split: str = "train", transform=None, num_classes: int | None = None):
        root = Path(root)
        self.classes = read_classes(root)
        super().__init__(root, split, transform, num_classes)
        if self.num_classes != len(self.classes):
            raise DataError(f"{root / 'classes.txt'} lists {len(self.classes)} classes but "
                            f"data.num_classes is {self.num_classes}: set "
                            f"data.num_classes={len(self.classes)}")
        self.colors = read_palette(root, len(self.classes))
        self.raw_values = f"class indices 0..{self.num_classes - 1} or 255 (classes.txt)"
        self.how_to_get = LAYOUT
        if not (root / "masks").is_dir():
            raise DataError(f"{root / 'masks'} not found: {LAYOUT}")
        self.ids = self._split_ids(split)
        self._images = self._index_images(root / "images")

    @classmethod
    def class_count(cls, root) -> int:
        return len(read_classes(Path(root)))

    def _split_ids(self, split: str) -> list[str]:
        listed = self.root / f"{split}.txt"
        self.list_path = listed if listed.is_file() else self.root / "masks"
        if listed.is_file():
            return read_ids(listed)
        every = sorted(p.stem for p in (self.root / "masks").glob("*.png"))
        if split == "all":
            return every
        if split in ("train", "val"):
            return seeded_split(every)[split]
        raise DataError(f"no split {split!r} in {self.root}: expected {listed} (splits: train "
                        "and val, from lists or seeded; all; or any <name>.txt)")

    @staticmethod
    def _index_images(folder: Path) -> dict:
        if not folder.is_dir():
            raise DataError(f"{folder} not found: {LAYOUT}")
        images = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                if p.stem in images:
                    raise DataError(f"two images for id {p.stem!r}: {images[p.stem]} and {p}; "
                                    "keep one")
                images[p.stem] = p
        return images

    @staticmethod
    def image_folder(root) -> Path:
        return Path(root) / "images"

    def image_path(self, i: int) -> Path:
        return self._images.get(self.ids[i], self.root / "images" / f"{self.ids[i]}.jpg")

    def raw_label_path(self, i: int) -> Path:
        return self.root / "masks" / f"{self.ids[i]}.png"

    def _require(self, path: Path, what: str) -> Path:
        path = Path(path)
        image_id = path.stem
        if not path.is_file():
            if what == "image":
                raise DataError(f"image not found for id {image_id!r}: expected {path} (or "
                                f"another of {', '.join(IMAGE_EXTENSIONS)}) for masks/"
                                f"{image_id}.png; add the image or drop the id from the split")
            raise DataError(f"{what} not found: {path} (id {image_id!r} of split "
                            f"{self.split!r}); add the mask or drop the id from the split list")
        return path


def images_without_masks(root) -> list[str]:
    """Names of the files in images/ that have no mask in masks/: they are in no split."""
    root = Path(root)
    masks = {p.stem for p in (root / "masks").glob("*.png")}
    return sorted(p.name for p in (root / "images").glob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem not in masks)


def warn_unlabelled(root, shown: int = 10) -> list[str]:
    """Print (stderr) the images that have no mask and so take part in no split."""
    names = images_without_masks(root)
    if names:
        print(f"note: {len(names)} image(s) in {Path(root) / 'images'} have no mask in "
              f"{Path(root) / 'masks'} and are in no split (add a mask to use one): "
              f"{', '.join(names[:shown])}{', ...' if len(names) > shown else ''}",
              file=sys.stderr)
    return names


def check_all(dataset, shown: int = 10) -> int:
    """Read every image and label of `dataset`; one DataError listing the bad ones."""
    errors = []
    for i in range(len(dataset)):
        try:
            image = load_image(dataset._require(dataset.image_path(i), "image"))
            dataset.load_label(i, image.shape[:2])
        except DataError as e:
            errors.append(str(e))
    if errors:
        raise DataError(f"{len(errors)} of {len(dataset)} samples of {dataset.split} are "
                        "unusable:\n  " + "\n  ".join(errors[:shown]))
    return len(dataset)


def prepare(root, val_fraction: float = VAL_FRACTION, seed: int = SEED) -> dict:
    """Write train.txt / val.txt (a seeded split) unless both exist, then check every sample
    of both splits; returns {split: number of images, "classes": count}."""
    root = Path(root)
    FolderSegmentation(root, "all", num_classes=len(read_classes(root)))  # layout errors first
    if not ((root / "train.txt").is_file() and (root / "val.txt").is_file()):
        every = sorted(p.stem for p in (root / "masks").glob("*.png"))
        for split, ids in seeded_split(every, val_fraction, seed).items():
            with atomic_output(root / f"{split}.txt") as tmp:
                tmp.write_text("".join(f"{i}\n" for i in ids))
    warn_unlabelled(root)
    counts = {split: check_all(FolderSegmentation(root, split, num_classes=None))
              for split in ("train", "val")}
    return dict(counts, classes=len(read_classes(root)))
