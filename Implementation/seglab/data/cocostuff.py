"""COCO-Stuff 10k and 164k, in the layouts of the published DeepLab v2 port (kazuto1011/
deeplab-pytorch, data/datasets/cocostuff/README.md):

    164k  root/images/{train2017,val2017}/<id>.jpg     COCO 2017 images
          root/annotations/{train2017,val2017}/<id>.png  stuffthingmaps_trainval2017.zip:
                                                         values 0..181, 255 = unlabelled
    10k   root/images/<id>.jpg, root/annotations/<id>.mat  cocostuff-10k-v1.1.zip: field "S",
          root/imageLists/{train,test,all}.txt             values 0..182, 0 = unlabelled

Label ids. Both hold the 182 ids of COCO-Stuff's labels.txt (0-based: 0 person ... 181 wood;
the 10k .mat files are 1-based, so id = S - 1 and S = 0 is unlabelled -> 255). Eleven of the
182 are never annotated (COCO thing ids with no instances: 11 street sign, 25 hat, 28 shoe,
29 eye glasses, 44 plate, 65 mirror, 67 window, 68 desk, 70 door, 82 blender, 90 hair brush),
leaving the 171 classes of the benchmark. Which map:
  num_classes=171 (default): the 171 used ids in increasing order -> 0..170, unused ids -> 255;
      the same table as mmsegmentation's COCO-Stuff converter (clsID_to_trID).
  num_classes=182: the identity on the 182 ids, as kazuto1011/deeplab-pytorch trains (its
      configs say N_CLASSES: 182; the 11 unused ids simply never occur, and its mIoU skips
      classes absent from the ground truth). Use it to evaluate that port's released models.
The mapped labels go to root/annotations_trainid<N>/[<split>/]<id>.png (label_path, for the CRF
and evaluation); 164k with 182 classes reads its PNGs as they are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import loadmat
from torchvision.datasets.utils import download_and_extract_archive

from seglab.data.base import SegmentationDataset, write_mapped_labels
from seglab.data.images import DataError
from seglab.data.voc import read_ids

CALVIN = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
URLS = {"cocostuff10k": [CALVIN + "cocostuff-10k-v1.1.zip"],
        "cocostuff164k": ["http://images.cocodataset.org/zips/train2017.zip",
                          "http://images.cocodataset.org/zips/val2017.zip",
                          CALVIN + "stuffthingmaps_trainval2017.zip"]}
LABEL_IDS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "hat",
    "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table",
    "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other",
    "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf",
    "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
USED = tuple(i for i in range(len(LABEL_IDS)) if i not in UNUSED)


def id_table(num_classes: int) -> np.ndarray:
    """Label id (0..181) -> class index: identity for 182 classes, the 171 used ids in order
    for 171 (unused -> 255); 255 -> 255; any other value invalid (-1)."""
    table = np.full(256, -1, np.int16)
    table[:len(LABEL_IDS)] = np.arange(len(LABEL_IDS)) if num_classes == len(LABEL_IDS) else 255
    if num_classes != len(LABEL_IDS):
        table[list(USED)] = np.arange(len(USED))
    table[255] = 255
    return table


class _CocoStuff(SegmentationDataset):
    classes = tuple(LABEL_IDS[i] for i in USED)     # 171; 182 with data.num_classes=182
    class_counts = (len(LABEL_IDS),)
    label_help = ("COCO-Stuff labels are single-channel maps of the 182 label ids "
                  "(stuffthingmaps_trainval2017.zip for 164k, the .mat files of "
                  "cocostuff-10k-v1.1.zip for 10k); re-extract them.")

    def __init__(self, root, split, transform, num_classes):
        super().__init__(root, split, transform, num_classes)
        self.require_num_classes((len(USED), len(LABEL_IDS)), self.name)
        self.classes = LABEL_IDS if num_classes == len(LABEL_IDS) else \
            tuple(LABEL_IDS[i] for i in USED)
        self.table = id_table(num_classes)
        self.how_to_get = (f"Run `python Implementation/datasets.py --dataset {self.name} "
                           f"--root ROOT --download` (fetches {', '.join(URLS[self.name])}) or "
                           "extract those zips as the port's scripts/setup_"
                           f"{self.name}.sh does.")

    def mapped_dir(self) -> Path:
        return self.root / f"annotations_trainid{self.num_classes}"


class CocoStuff164k(_CocoStuff):
    """COCO-Stuff 164k: splits train2017 (118k images) and val2017 (5k)."""

    name = "cocostuff164k"
    raw_values = "COCO-Stuff label ids 0..181 or 255 (unlabelled)"
    SPLITS = {"train2017": "train2017", "train": "train2017", "val2017": "val2017",
              "val": "val2017"}

    def __init__(self, root, split: str = "train2017", transform=None, num_classes: int = 171):
        super().__init__(root, split, transform, num_classes)
        if split not in self.SPLITS:
            raise DataError(f"COCO-Stuff 164k has no split {split!r}; use train2017 or val2017")
        self.folder = self.SPLITS[split]
        self.image_dir = self.root / "images" / self.folder
        if not self.image_dir.is_dir():
            raise DataError(f"COCO-Stuff 164k not found: expected {self.image_dir} and "
                            f"{self.root / 'annotations' / self.folder}. {self.how_to_get}")
        self.ids = sorted(p.stem for p in self.image_dir.glob("*.jpg"))
        self.list_path = self.image_dir

    @staticmethod
    def image_folder(root) -> Path:
        return Path(root) / "images"

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}.jpg"

    def raw_label_path(self, i: int) -> Path:
        return self.root / "annotations" / self.folder / f"{self.ids[i]}.png"

    def mapped_label_path(self, i: int) -> Path | None:
        if self.num_classes == len(LABEL_IDS):
            return None  # the annotation PNGs hold the 182 ids already
        return self.mapped_dir() / self.folder / f"{self.ids[i]}.png"


class CocoStuff10k(_CocoStuff):
    """COCO-Stuff 10k (v1.1): splits train (9k images), test (1k), all."""

    name = "cocostuff10k"
    raw_values = "COCO-Stuff 10k values 0..182 (0 = unlabelled)"

    def __init__(self, root, split: str = "train", transform=None, num_classes: int = 171):
        super().__init__(root, split, transform, num_classes)
        lists = self.root / "imageLists"
        if not lists.is_dir():
            raise DataError(f"COCO-Stuff 10k not found: expected {lists} (with images/ and "
                            f"annotations/ beside it). {self.how_to_get}")
        if not (lists / f"{split}.txt").is_file():
            raise DataError(f"COCO-Stuff 10k has no split list {lists / f'{split}.txt'}; its "
                            "splits are train, test and all")
        self.list_path = lists / f"{split}.txt"
        self.ids = read_ids(self.list_path)

    @staticmethod
    def image_folder(root) -> Path:
        return Path(root) / "images"

    def image_path(self, i: int) -> Path:
        return self.root / "images" / f"{self.ids[i]}.jpg"

    def raw_label_path(self, i: int) -> Path:
        return self.root / "annotations" / f"{self.ids[i]}.mat"

    def mapped_label_path(self, i: int) -> Path:
        return self.mapped_dir() / f"{self.ids[i]}.png"

    def read_raw_label(self, path: Path) -> np.ndarray:
        """The .mat's "S" (1-based ids, 0 unlabelled) as 0-based ids with 255 unlabelled."""
        try:
            s = np.asarray(loadmat(str(path))["S"])
        except Exception as e:
            raise DataError(f"cannot read COCO-Stuff 10k annotation {path}: {e}. "
                            f"{self.label_help}") from None
        if s.ndim != 2 or not np.issubdtype(s.dtype, np.number):
            raise DataError(f"label {path}: field S is not an (H, W) map of label ids (shape "
                            f"{s.shape}, {s.dtype}). {self.label_help}")
        bad = (s < 0) | (s > len(LABEL_IDS)) | (s != np.round(s))
        if bad.any():
            raise DataError(f"label {path} holds values {np.unique(s[bad]).tolist()[:10]} that "
                            f"are not {self.raw_values}. {self.label_help}")
        s = s.astype(np.int64)
        return np.where(s == 0, 255, s - 1).astype(np.uint8)


def prepare(name: str, root, download: bool = False, num_classes: int = 171, workers: int = 4,
            progress: bool = True) -> dict:
    """Download and extract (when asked and not yet there) as the port's setup scripts do,
    then write the mapped labels of each split; returns {split: number of images}."""
    root = Path(root)
    cls, splits = ((CocoStuff10k, ("train", "test")) if name == "cocostuff10k"
                   else (CocoStuff164k, ("train2017", "val2017")))
    have = (root / "imageLists").is_dir() if name == "cocostuff10k" else \
        (root / "images" / "val2017").is_dir() and (root / "annotations" / "val2017").is_dir()
    if download and not have:
        for url in URLS[name]:
            target = root if name == "cocostuff10k" else \
                root / ("annotations" if "stuffthingmaps" in url else "images")
            download_and_extract_archive(url, str(root), extract_root=str(target))
    return {split: write_mapped_labels(cls(root, split, num_classes=num_classes), workers,
                                       progress) for split in splits}
