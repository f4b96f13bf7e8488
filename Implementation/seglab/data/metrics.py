"""Segmentation scores: one confusion matrix over a whole split, and the paper's trimap bands.

  ConfusionMatrix   counts (ground truth, prediction) pairs over every pixel of a split; void
                    pixels (label 255) are ignored. Its scores: pixel accuracy, mean class
                    accuracy, per-class IoU, mean IoU and frequency-weighted IoU.
  format_table      the per-class table printed and saved by evaluation.
  trimap_band       the pixels within `width` px of an object boundary (Fig. 5 of the paper).
  TrimapEvaluator   one confusion matrix per band width: accuracy and mIoU near boundaries.

Scores are computed from the split-wide matrix (the VOC protocol), not averaged per image.
mIoU is the mean over the classes whose union (ground truth or prediction) is non-zero; a
class that never occurs and is never predicted has IoU NaN and is left out, and `miou_note`
says so. On the full VOC val set every one of the 21 classes is present.

Trimap. DeepLab (v1 Sec. 4.1, v2 Sec. 4.1.2) measures accuracy "for those pixels that are
located within a narrow band (called trimap) of 'void' labels": VOC outlines every object with
a void band about 5 px wide, so the void pixels *are* the object boundaries. `boundary="void"`
(the default) follows the paper. `boundary="edges"` is for data without void outlines: a
boundary pixel is one whose label differs from one of its 4 neighbours (void counts as its own
label). A pixel is in the band of width k when its Euclidean distance to the nearest boundary
pixel is at most k (`scipy.ndimage.distance_transform_edt`); void pixels are never in a band,
since they are never scored.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

IGNORE_INDEX = 255


def _as_numpy(x) -> np.ndarray:
    """A label map as a flat int64 numpy array (accepts numpy arrays and torch tensors)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(np.int64, copy=False)


def _check_pair(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int):
    """Flat (pred, gt) of the scored pixels, with a clear error for bad values."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has {pred.size} pixels but ground truth has {gt.size}: "
                         "resize the prediction to the label's size before scoring")
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground truth holds labels outside 0..{num_classes - 1} "
                         f"(found {gt.min()}..{gt.max()}) other than the ignore label "
                         f"{ignore_index}: check the label PNGs and num_classes")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds labels outside 0..{num_classes - 1} "
                         f"(found {pred.min()}..{pred.max()}): check num_classes")
    return pred, gt


class ConfusionMatrix:
    """Split-wide confusion matrix: `matrix[g, p]` counts pixels of ground-truth class g
    predicted as p (rows = ground truth). Pixels whose ground truth is `ignore_index` are
    skipped."""

    def __init__(self, num_classes: int = 21, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred, gt) -> "ConfusionMatrix":
        """Add one prediction / ground-truth pair (numpy or torch, any equal shapes)."""
        pred, gt = _check_pair(_as_numpy(pred), _as_numpy(gt), self.num_classes,
                               self.ignore_index)
        n = self.num_classes
        self.matrix += np.bincount(n * gt + pred, minlength=n * n).reshape(n, n)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix's counts (from a worker process or another rank)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class confusion matrix into "
                             f"a {self.num_classes}-class one")
        self.matrix += other.matrix
        return self

    def scores(self) -> dict:
        """Pixel accuracy, mean class accuracy, per-class IoU, mIoU, frequency-weighted IoU."""
        m = self.matrix.astype(np.float64)
        tp, gt_count, pred_count = np.diag(m), m.sum(1), m.sum(0)
        total = m.sum()
        union = gt_count + pred_count - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            class_acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        present = union > 0
        in_gt = gt_count > 0
        return {
            "pixel_acc": float(tp.sum() / total) if total else math.nan,
            "mean_class_acc": float(class_acc[in_gt].mean()) if in_gt.any() else math.nan,
            "iou": [float(v) for v in iou],
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "fw_iou": float((gt_count[in_gt] * iou[in_gt]).sum() / total) if total else math.nan,
            "classes_present": int(present.sum()),
            "miou_note": (f"mean IoU over the {int(present.sum())} of {self.num_classes} classes "
                          "with a non-zero union (present in the ground truth or predicted); "
                          f"{int(total)} scored pixels, label {self.ignore_index} ignored"),
        }


def format_table(scores: dict, class_names=None) -> str:
    """A per-class IoU table followed by the summary scores, as plain text."""
    ious = scores["iou"]
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"{len(names)} class names for {len(ious)} classes")
    width = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'class':<{width}}{'IoU (%)':>9}", "-" * (width + 9)]
    for name, iou in zip(names, ious):
        cell = "     n/a" if math.isnan(iou) else f"{100 * iou:8.2f}"
        lines.append(f"{name:<{width}} {cell}")
    lines.append("-" * (width + 9))
    for key, label in (("miou", "mean IoU"), ("pixel_acc", "pixel acc"),
                       ("mean_class_acc", "mean acc"), ("fw_iou", "fw IoU")):
        lines.append(f"{label:<{width}} {100 * scores[key]:8.2f}")
    lines.append(scores["miou_note"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Trimap: accuracy in bands around object boundaries
# ---------------------------------------------------------------------------------------------

def boundary_mask(gt, boundary: str = "void", ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The boundary pixels the trimap is measured from (see the module docstring)."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be a 2-D label map, got shape {gt.shape}")
    if boundary == "void":
        return gt == ignore_index
    if boundary == "edges":
        edge = np.zeros(gt.shape, dtype=bool)
        vertical = gt[1:, :] != gt[:-1, :]
        horizontal = gt[:, 1:] != gt[:, :-1]
        edge[1:, :] |= vertical
        edge[:-1, :] |= vertical
        edge[:, 1:] |= horizontal
        edge[:, :-1] |= horizontal
        return edge
    raise ValueError(f"boundary must be 'void' or 'edges', got {boundary!r}")


def boundary_distance(gt, boundary: str = "void", ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Euclidean distance (px) of every pixel to the nearest boundary pixel; inf if none."""
    edge = boundary_mask(gt, boundary, ignore_index)
    if not edge.any():
        return np.full(edge.shape, np.inf)
    return ndimage.distance_transform_edt(~edge)


def trimap_band(gt, width: float, boundary: str = "void",
                ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Bool mask of the scored (non-void) pixels within `width` px of a boundary."""
    gt = np.asarray(gt)
    return (boundary_distance(gt, boundary, ignore_index) <= width) & (gt != ignore_index)


class TrimapEvaluator:
    """One ConfusionMatrix per band width, each restricted to the trimap band of that width.

    Band k holds the pixels at distance <= k from a boundary. Distances of a pixel grid are
    square roots of integers, so for integer widths `ceil(distance)` puts each pixel in one ring
    and band k is the union of rings 0..k: one bincount per image fills every width at once."""

    def __init__(self, widths=tuple(range(1, 41)), num_classes: int = 21,
                 boundary: str = "void", ignore_index: int = IGNORE_INDEX):
        widths = sorted(set(widths))
        if not widths or any(int(w) != w or w < 1 for w in widths):
            raise ValueError(f"trimap widths must be positive integers, got {widths}")
        boundary_mask(np.zeros((1, 1), np.int64), boundary)  # validates `boundary`
        self.widths = [int(w) for w in widths]
        self.num_classes, self.boundary, self.ignore_index = num_classes, boundary, ignore_index
        self.matrices = {w: ConfusionMatrix(num_classes, ignore_index) for w in self.widths}

    def update(self, pred, gt) -> "TrimapEvaluator":
        """Add one image: `gt` a 2-D label map, `pred` a prediction of the same size."""
        gt = np.asarray(gt.detach().cpu().numpy() if hasattr(gt, "detach") else gt)
        pred = _as_numpy(pred)
        if pred.size != gt.size:
            raise ValueError(f"prediction has {pred.size} pixels but ground truth has {gt.size}")
        dist = boundary_distance(gt, self.boundary, self.ignore_index)
        near = ((dist <= self.widths[-1]) & (gt != self.ignore_index)).reshape(-1)
        pred, gt_near = _check_pair(pred[near], gt.reshape(-1)[near].astype(np.int64),
                                    self.num_classes, self.ignore_index)
        ring = np.ceil(dist.reshape(-1)[near]).astype(np.int64)
        n, rings = self.num_classes, self.widths[-1] + 1
        counts = np.bincount((ring * n + gt_near) * n + pred, minlength=rings * n * n)
        cumulative = counts.reshape(rings, n, n).cumsum(0)
        for w in self.widths:
            self.matrices[w].matrix += cumulative[w]
        return self

    def merge(self, other: "TrimapEvaluator") -> "TrimapEvaluator":
        if other.widths != self.widths or other.boundary != self.boundary:
            raise ValueError("cannot merge trimap evaluators with different widths or boundaries")
        for w in self.widths:
            self.matrices[w].merge(other.matrices[w])
        return self

    def scores(self) -> dict:
        """{width: {"pixel_acc", "miou", "pixels"}} for every band width."""
        out = {}
        for w, cm in self.matrices.items():
            s = cm.scores()
            out[w] = {"pixel_acc": s["pixel_acc"], "miou": s["miou"],
                      "pixels": int(cm.matrix.sum())}
        return out
