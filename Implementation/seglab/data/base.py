"""The shared body of every data set class: one interface for train.py, evaluate.py, crf.py.

A data set class names its files (`image_path(i)`, `raw_label_path(i)`) and says how the values
of its annotation files become class indices: a lookup `table` over the raw values (class index,
255 = ignored, -1 = a value the data set never uses). This base does the rest, the same way for
every layout:

  load_label(i, size)  read the annotation (a single-channel PNG unless the class reads another
                       format), refuse a colour mask, a value outside the data set's range or a
                       size mismatch naming the file, map it through the table, check the mapped
                       values: (H, W) uint8 class indices, 255 ignored
  label_path(i)        a PNG of class indices: the annotation itself when it already holds them,
                       else the mapped copy (`mapped_label_path`), written on first use and again
                       when the annotation is newer. The CRF workers and evaluation's logit-cache
                       check read label *files*, so a data set whose files hold other ids (e.g.
                       Cityscapes' 34 label ids) serves them the mapped copy.
  __getitem__          {"image", "label", "id", "size"}: `transform(image, label, rng)` ->
                       (image, label), the one signature of every transform, with rng seeded
                       by the sample seed: a TrainTransform (random scale, crop, mirror), an
                       EvalTransform (original-size label), or by default the Caffe-normalised
                       full image (EvalTransform mode "full")
  list_path            where the split's ids come from (a list file or a folder), for messages
  class_names, palette, ignore_label, mean, std
                       what evaluation prints and overlays draw with. mean/std are the RGB
                       statistics (0..255) the data set's published recipe normalises with (the
                       Caffe mean, std 1, for every DeepLab recipe); the pipeline itself
                       normalises as the loaded weights require (config data.norm).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from seglab.atomic import atomic_output
from seglab.data.images import DataError, load_image, open_image
from seglab.data.labels import IGNORE, distinct_palette, full_palette
from seglab.data.transforms import CAFFE_MEAN_BGR, EvalTransform

INDEX_MODES = ("P", "L", "1")   # PIL modes whose pixel values are class indices


def identity_table(num_classes: int) -> np.ndarray:
    """Raw value k -> k for 0..num_classes-1, 255 -> 255, anything else invalid (-1)."""
    table = np.full(256, -1, np.int16)
    table[:num_classes] = np.arange(num_classes)
    table[IGNORE] = IGNORE
    return table


def read_index_png(path: Path, help_text: str = "") -> np.ndarray:
    """A single-channel label image as (H, W) uint8 pixel values, or a DataError naming it."""
    image = open_image(path, "label")
    if image.mode not in INDEX_MODES:
        kind = ("an RGB colour image" if image.mode in ("RGB", "RGBA")
                else f"of PIL mode {image.mode!r}")
        raise DataError(f"label {path} is {kind}; labels must be single-channel 8-bit PNGs whose "
                        f"pixel values are class indices (255 = ignored), not colours. {help_text}")
    return np.array(image, dtype=np.uint8)


def save_index_png(path, label: np.ndarray, palette: np.ndarray) -> Path:
    """Write (H, W) uint8 class indices as a palette PNG (pixel value = index), atomically."""
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8))
    image.putpalette(np.asarray(palette, np.uint8).tobytes())
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def check_values(label: np.ndarray, path, num_classes: int, what: str = "class indices") -> None:
    """DataError unless every value is a class index 0..num_classes-1 or 255."""
    bad = (label >= num_classes) & (label != IGNORE)
    if bad.any():
        values = np.unique(label[bad]).tolist()
        raise DataError(f"label {path} holds {what} {values[:10]} outside 0..{num_classes - 1} "
                        f"and {IGNORE} (ignored)")


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of the data set classes (see the module docstring). Subclasses set `self.ids`,
    `self.table`, and define image_path / raw_label_path (and mapped_label_path when the
    annotation files hold other values than class indices)."""

    name = "dataset"
    classes: tuple = ()                 # class names, index = class
    colors = None                       # (len(classes), 3) uint8: the data set's colour table;
                                        # None: generated distinct colours (labels.py)
    ignore_label = IGNORE
    mean = tuple(reversed(CAFFE_MEAN_BGR))   # RGB, 0..255
    std = (1.0, 1.0, 1.0)
    class_counts: tuple = ()            # other class counts the layout allows (VOC: a subset)
    raw_values = "class indices"        # what the annotation files hold, for error messages
    label_help = ""                     # how to fix a wrong label file
    how_to_get = ""                     # where the data set comes from

    def __init__(self, root, split: str, transform=None, num_classes: int | None = None):
        # every transform: (image, label, rng) -> (image, label); by default the
        # Caffe-normalised full image
        self.root, self.split = Path(root), split
        self.transform = transform or EvalTransform(mode="full")
        self.num_classes = num_classes if num_classes is not None else len(self.classes)
        self.ids: list[str] = []
        self.list_path = self.root          # where the split's ids come from (list or folder)
        self.table = identity_table(self.num_classes)

    def __len__(self):
        return len(self.ids)

    @classmethod
    def class_count(cls, root) -> int:
        """How many classes the data set under `root` has (the default of data.num_classes)."""
        return len(cls.classes)

    @property
    def class_names(self) -> list[str]:
        return [self.classes[i] if i < len(self.classes) else str(i)
                for i in range(self.num_classes)]

    @property
    def palette(self) -> np.ndarray:
        """(256, 3) uint8: the data set's class colours (its own table, else distinct generated
        ones), the VOC colour map beyond them (255: VOC's void colour)."""
        colors = (distinct_palette(self.num_classes) if self.colors is None else
                  np.asarray(self.colors, np.uint8)[:self.num_classes])
        return full_palette(colors)

    def require_num_classes(self, allowed, preset: str) -> None:
        if self.num_classes not in allowed:
            counts = " or ".join(str(n) for n in allowed)
            raise DataError(f"{self.name} has {counts} classes but data.num_classes is "
                            f"{self.num_classes}: set data.num_classes={allowed[0]} (the "
                            f"`--config {preset}` preset does)")

    # --- files ---------------------------------------------------------------------------

    def image_path(self, i: int) -> Path:
        """Abstract: each data set's layout says where image i is."""
        raise NotImplementedError(f"{type(self).__name__} must define image_path")

    def raw_label_path(self, i: int) -> Path:
        """Abstract: each data set's layout says where the annotation of image i is."""
        raise NotImplementedError(f"{type(self).__name__} must define raw_label_path")

    def mapped_label_path(self, i: int) -> Path | None:
        """Where the class-index copy of a mapped annotation goes; None: no mapping needed."""
        return None

    def _require(self, path: Path, what: str) -> Path:
        """`path`, or a DataError naming it and saying where the data set comes from."""
        if not Path(path).is_file():
            raise DataError(f"{what} not found: {path} ({self.name}, split {self.split!r}). "
                            f"{self.how_to_get}")
        return Path(path)

    # --- labels --------------------------------------------------------------------------

    def read_raw_label(self, path: Path) -> np.ndarray:
        return read_index_png(path, self.label_help)

    def map_label(self, raw: np.ndarray, path) -> np.ndarray:
        """Raw annotation values -> class indices through `self.table`; a value the table
        marks invalid (-1) or lies beyond it is a DataError naming the file."""
        raw = np.asarray(raw)
        if raw.dtype == np.uint8 and len(self.table) >= 256:
            mapped = self.table[raw]
        else:
            inside = (raw >= 0) & (raw < len(self.table))
            mapped = np.where(inside, self.table[np.clip(raw, 0, len(self.table) - 1)], -1)
        if (mapped < 0).any():
            values = np.unique(raw[mapped < 0]).tolist()
            raise DataError(f"label {path} holds values {values[:10]} that are not "
                            f"{self.raw_values}. {self.label_help}")
        return mapped.astype(np.uint8)

    def load_label(self, i: int, image_size=None) -> np.ndarray:
        """The checked (H, W) uint8 class-index label of image i (of `image_size` when given).
        Reads the annotation and maps it; with the annotation absent but its mapped copy
        present (e.g. only Cityscapes' *_labelTrainIds.png kept), reads the copy."""
        raw_path, mapped_path = self.raw_label_path(i), self.mapped_label_path(i)
        if mapped_path is not None and not raw_path.is_file() and mapped_path.is_file():
            path, label = mapped_path, read_index_png(mapped_path, self.label_help)
        else:
            path = self._require(raw_path, "label")
            label = self.map_label(self.read_raw_label(path), path)
        if image_size is not None and label.shape != tuple(image_size):
            (h, w), (ih, iw) = label.shape, image_size
            raise DataError(f"label {path} is {w}x{h} (WxH) but its image {self.image_path(i)} "
                            f"is {iw}x{ih}; a label must match its image pixel for pixel. Was the "
                            "mask resized or paired with the wrong image?")
        check_values(label, path, self.num_classes)
        return label

    def label_path(self, i: int) -> Path:
        """A PNG of class indices for image i (written from the annotation when needed)."""
        raw, mapped = self.raw_label_path(i), self.mapped_label_path(i)
        if mapped is None:
            return raw
        stale = not mapped.is_file() or (raw.is_file() and
                                         mapped.stat().st_mtime_ns < raw.stat().st_mtime_ns)
        if stale:
            with Image.open(self._require(self.image_path(i), "image")) as image:
                size = (image.height, image.width)  # the header only: no decoding
            label = self.load_label(i, size)
            try:
                save_index_png(mapped, label, self.palette)
            except OSError as e:
                raise DataError(f"cannot write the class-index label {mapped} ({e}): the CRF "
                                f"and evaluation read it. Make {self.root} writable, or run "
                                "`python Implementation/datasets.py --dataset "
                                f"{self.name} --root ROOT` on a writable copy.") from None
        return mapped

    # --- samples -------------------------------------------------------------------------

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, item)
        image = load_image(self._require(self.image_path(i), "image"))
        label = self.load_label(i, image.shape[:2])
        size = tuple(image.shape[:2])
        x, y = self.transform(image, label, np.random.default_rng(seed))
        return {"image": x, "label": y, "id": self.ids[i], "size": size}


def write_mapped_labels(dataset, workers: int = 4, progress: bool = True) -> int:
    """Write (or refresh) the class-index copy of every label of `dataset`, checking each;
    returns the number of labels. Threads: PIL decodes and encodes outside the GIL."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in tqdm(pool.map(dataset.label_path, range(len(dataset))), total=len(dataset),
                      desc=f"{dataset.name} {dataset.split} labels", unit="img",
                      disable=not progress, leave=False):
            pass
    return len(dataset)
