"""The data sets every script reads, behind one interface: a name -> a dataset class.

A dataset class takes (root, split, transform, num_classes) and gives, per index i, the dict
{"image", "label", "id", "size"}; `ids`, `image_path(i)`, `label_path(i)` and
`load_label(i, size)` (the checked label) serve evaluation, the CRF and the split check.
"""
from __future__ import annotations

from seglab.data.images import DataError
from seglab.data.transforms import TrainTransform
from seglab.data.ade20k import ADE20KSegmentation
from seglab.data.cityscapes import CityscapesSegmentation
from seglab.data.cocostuff import CocoStuff10k, CocoStuff164k
from seglab.data.folder import FolderSegmentation
from seglab.data.voc import VOCSegmentation

DATASETS = {
    "voc": VOCSegmentation,
    "cityscapes": CityscapesSegmentation,     # 19 train ids of the 34 label ids
    "cocostuff10k": CocoStuff10k,             # 171 classes (or 182: the port's layout)
    "cocostuff164k": CocoStuff164k,
    "ade20k": ADE20KSegmentation,             # SceneParsing, 150 classes
    "folder": FolderSegmentation,             # your own: images/ + masks/ + classes.txt
}


def dataset_class(name: str):
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def resolve_num_classes(dataset: str, root, given: int = 0) -> int:
    """The class count of the data set under `root` (VOC 21, a folder's classes.txt, ...);
    `given` (data.num_classes, 0 = not given) must agree with it, or be another count the layout
    allows (a VOC-layout set of the first N classes; COCO-Stuff's 182-class layout)."""
    cls = dataset_class(dataset)
    natural = cls.class_count(root)
    if given and given != natural and given not in cls.class_counts:
        raise DataError(f"data.num_classes={given} disagrees with the {dataset} data set under "
                        f"{root}, which has {natural} classes: drop data.num_classes (it follows "
                        f"from the data set) or set data.num_classes={natural}")
    return given or natural


def training_dataset(cfg: dict):
    """data.train_split of data.dataset under data.root, with the training transform."""
    d = cfg["data"]
    transform = TrainTransform(crop=d["crop"], scales=tuple(d["scales"]), mirror=d["mirror"],
                               norm=d["norm"])
    return dataset_class(d["dataset"])(d["root"], d["train_split"], transform,
                                       num_classes=resolve_num_classes(d["dataset"], d["root"],
                                                                       d["num_classes"]))


def eval_dataset(settings, transform=None):
    """settings.split of settings.dataset under settings.data_root (an EvalSettings)."""
    return dataset_class(settings.dataset)(settings.data_root, settings.split, transform,
                                           num_classes=resolve_num_classes(
                                               settings.dataset, settings.data_root,
                                               settings.num_classes))
