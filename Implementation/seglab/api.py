"""The library from your own code: the few names `import seglab` gives.

    import numpy as np, seglab
    predictor = seglab.load("runs/demo/checkpoints/final.pth")   # its recipe, classes, colours
    labels, logits = predictor.predict(image)                   # image: (H, W, 3) uint8 RGB
    refined = predictor.refine(image, logits)                   # the dense CRF's labels
    print(seglab.score(refined, truth, predictor.num_classes)["miou"])

These are the functions the scripts themselves run (infer.py, evaluate.py): nothing here is a
second implementation.
"""
from __future__ import annotations

import numpy as np

from seglab.data.metrics import ConfusionMatrix
from seglab.models import ARCHITECTURES


def load(checkpoint, device: str = "auto", **settings):
    """A ready predictor for a checkpoint of ours (.pth) or an exported .onnx file.

    `settings` are the Predictor's (seglab/inference/predictor.py): precision ("fp32" |
    "bf16"), msc_scales, msc_fusion, interp, norm, mode, pad_to, flip; any left out come from
    the checkpoint's recipe. The predictor's `predict(image)` returns (labels (H, W) uint8,
    logits (C, H, W) float32 torch tensor) for an RGB uint8 array; `refine(image, logits)` the
    dense CRF's labels; `classes` and `palette` name and colour its classes."""
    from seglab.deploy import load_predictor
    return load_predictor(checkpoint, device=device, **settings)


def architectures() -> dict[str, str]:
    """{name: one-line summary} of every architecture behind the model seam."""
    return {name: spec.summary for name, spec in ARCHITECTURES.items()}


def score(labels, truth, num_classes: int) -> dict:
    """Scores of predicted labels against a ground-truth label array (255 = ignored), as
    evaluate.py computes them over a split: {"miou", "pixel_acc", "mean_acc", "iou", ...}."""
    confusion = ConfusionMatrix(num_classes)
    confusion.update(np.asarray(labels), np.asarray(truth))
    return confusion.scores()
