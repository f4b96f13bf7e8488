"""ADE20K as the MIT Scene Parsing benchmark distributes it (SceneParsing, 150 classes):

    root/ADEChallengeData2016/images/{training,validation}/ADE_<split>_<n>.jpg
    root/ADEChallengeData2016/annotations/{training,validation}/ADE_<split>_<n>.png

(`root` may also be ADEChallengeData2016/ itself.) Annotation value 0 is "other / unlabelled"
and is ignored; 1..150 are the classes of objectInfo150.txt, so class index = value - 1 and
0 -> 255 (the benchmark's own evaluation drops 0 the same way; mmsegmentation calls it
`reduce_zero_label`). The class names are objectInfo150.txt's first names. The mapped labels are
written to ADEChallengeData2016/annotations_trainid/<split>/ (label_path, for the CRF and
evaluation). Split names: training / validation (train / val accepted).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets.utils import download_and_extract_archive

from seglab.data.base import SegmentationDataset, write_mapped_labels
from seglab.data.images import DataError

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
HOW_TO_GET = (f"Run `python Implementation/datasets.py --dataset ade20k --root ROOT --download` "
              f"(fetches {URL}, 923 MB, and writes the mapped labels), or extract that zip into "
              "ROOT by hand and run the same command without --download.")
SPLITS = {"training": "training", "train": "training", "validation": "validation",
          "val": "validation"}
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle",
    "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The benchmark's colour of each class (color150 of the MIT Scene Parsing toolkit, as CSAIL's
# semantic-segmentation-pytorch and mmsegmentation draw ADE20K), as hex RGB, in class order.
COLORS = np.array([[int(h[k:k + 2], 16) for k in (0, 2, 4)] for h in (
    "787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 "
    "e005ff ebff07 96053d 787846 08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 "
    "0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c 7009ff "
    "08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 "
    "ff7a08 00ff14 ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f "
    "14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700 00ebff 00adff 1f00ff "
    "0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00 "
    "008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff "
    "ff00f5 ff0066 ffad00 ff0014 ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 "
    "00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900 00ff0a ff7000 "
    "8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff "
    "00d6ff ff0070 5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 "
    "ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff ff007a fff500 0abed4 d6ff00 "
    "00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff "
    "4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff "
).split()], np.uint8)


def ade_dir(root) -> Path:
    root = Path(root)
    return root if (root / "images").is_dir() and not (root / "ADEChallengeData2016").is_dir() \
        else root / "ADEChallengeData2016"


def shifted_table(num_classes: int = len(CLASSES)) -> np.ndarray:
    """Value 0 -> 255 (ignored), v -> v - 1 for 1..num_classes, anything else invalid."""
    table = np.full(256, -1, np.int16)
    table[0] = 255
    table[1:num_classes + 1] = np.arange(num_classes)
    return table


class ADE20KSegmentation(SegmentationDataset):
    """ADE20K SceneParsing, 150 classes. `root` contains ADEChallengeData2016/."""

    name, classes, how_to_get = "ade20k", CLASSES, HOW_TO_GET
    colors = COLORS
    raw_values = "ADE20K SceneParsing values 0..150 (0 = unlabelled)"
    label_help = ("Labels are annotations/<split>/<id>.png of ADEChallengeData2016 (values "
                  "0..150); the full ADE20K release's *_seg.png encode classes in colours and "
                  "are a different format. Re-extract ADEChallengeData2016.zip.")

    def __init__(self, root, split: str = "training", transform=None, num_classes: int = 150):
        super().__init__(root, split, transform, num_classes)
        self.require_num_classes((len(CLASSES),), "ade20k")
        self.table = shifted_table()
        if split not in SPLITS:
            raise DataError(f"ADE20K SceneParsing has no labelled split {split!r}; use "
                            "training or validation")
        base = ade_dir(root)
        self.image_dir = base / "images" / SPLITS[split]
        self.annotation_dir = base / "annotations" / SPLITS[split]
        self.mapped_dir = base / "annotations_trainid" / SPLITS[split]
        if not self.image_dir.is_dir():
            raise DataError(f"ADE20K not found: expected {self.image_dir} (and "
                            f"{self.annotation_dir}). {HOW_TO_GET}")
        self.ids = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        self.list_path = self.image_dir

    @staticmethod
    def image_folder(root) -> Path:
        """The images, one sub-folder per split (crf.py apply: pass --split)."""
        return ade_dir(root) / "images"

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.jpg"

    def raw_label_path(self, i: int) -> Path:
        return self.annotation_dir / f"{self.ids[i]}.png"

    def mapped_label_path(self, i: int) -> Path:
        return self.mapped_dir / f"{self.ids[i]}.png"


def prepare(root, download: bool = False, workers: int = 4, progress: bool = True) -> dict:
    """Download and extract the benchmark zip (when asked and not yet there), then write the
    mapped labels of both splits; returns {split: number of images}."""
    if download and not (ade_dir(root) / "images" / "training").is_dir():
        download_and_extract_archive(URL, str(root))
    return {split: write_mapped_labels(ADE20KSegmentation(root, split), workers, progress)
            for split in ("training", "validation")}
