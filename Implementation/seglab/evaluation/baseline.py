"""What a useless model scores: background everywhere, on the val split (the demo's yardstick)."""
from __future__ import annotations

from seglab.data.registry import dataset_class
from seglab.data.metrics import ConfusionMatrix


def background_baseline(cfg: dict) -> float:
    """mIoU of predicting class 0 at every pixel of data.val_split."""
    d = cfg["data"]
    ds = dataset_class(d["dataset"])(d["root"], d["val_split"], num_classes=d["num_classes"])
    cm = ConfusionMatrix(d["num_classes"])
    for i in range(len(ds)):
        gt = ds.load_label(i)
        cm.update(gt * 0, gt)
    return cm.scores()["miou"]
