"""The MSC training loss: softmax cross-entropy on each of the four MSC outputs, summed.

Targets (DESIGN.md section 3):
  "caffe"   the Caffe release: the label is subsampled by the branch's stride, label[::8, ::8] for
            the 1x and fused outputs (321 -> 41) and label[::16, ::16] for the 0.5x branch
            (321 -> 21); a branch whose stride is not an integer (0.75x: 8/0.75) has its logits
            upsampled to the 1x size first (Caffe Interp) and uses label[::8, ::8].
  "nearest" the published port: the label is resized to each branch's own size with nearest
            neighbour (PIL's rule, `nearest-exact`).
Pixels labelled 255 are ignored. Each image's loss is the mean over its valid pixels (Caffe's
VALID normalisation with batch 1), and a batch's loss the mean over its images, so k accumulated
steps of b images equal one step of k*b images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from labels import IGNORE
from model import resize




def branch_names(scales) -> list[str]:
    return ["1x"] + [f"{s:g}x" for s in scales] + ["max"]


def cross_entropy_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over each image's valid pixels, then mean over the batch."""
    pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    valid = (target != IGNORE).flatten(1).sum(1)
    per_image = pixel.flatten(1).sum(1) / valid.clamp(min=1)
    return per_image.mean()


def caffe_targets(label: torch.Tensor, logits: torch.Tensor, base_size, interp: str):
    """(logits, target) for one branch, as the Caffe release paired them."""
    h, w = label.shape[-2:]
    for stride in (8, 16, 32):
        sub = label[:, ::stride, ::stride]
        if sub.shape[-2:] == logits.shape[-2:]:
            return logits, sub
    if tuple(base_size) == tuple(label[:, ::8, ::8].shape[-2:]):
        return resize(logits, base_size, interp), label[:, ::8, ::8]
    raise ValueError(f"no Caffe label subsampling fits logits {tuple(logits.shape[-2:])} for a "
                     f"{h}x{w} crop; use an odd crop of the form 8k+1 (e.g. 321) or "
                     "train.loss_targets=nearest")


def nearest_targets(label: torch.Tensor, logits: torch.Tensor):
    size = logits.shape[-2:]
    target = F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest-exact")
    return logits, target[:, 0].long()


def msc_loss(outputs, label: torch.Tensor, targets: str = "caffe", interp: str = "caffe"):
    """Sum of the per-branch losses; returns (total, [loss of each output])."""
    base_size = outputs[0].shape[-2:]
    losses = []
    for logits in outputs:
        if targets == "caffe":
            lg, tg = caffe_targets(label, logits, base_size, interp)
        elif targets == "nearest":
            lg, tg = nearest_targets(label, logits)
        else:
            raise ValueError(f"loss targets must be 'caffe' or 'nearest', got {targets!r}")
        losses.append(cross_entropy_per_image(lg, tg))
    return sum(losses), losses
