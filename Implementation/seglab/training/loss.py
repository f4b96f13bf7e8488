"""The training loss of every architecture (`training_loss`), and DeepLab v2's MSC loss.

"msc" architectures (DeepLab v2): softmax cross-entropy on each of the four MSC outputs, summed.

Targets (docs/fidelity.md, "Training"):
  "caffe"   the Caffe release: the label is subsampled by the branch's stride, label[::8, ::8] for
            the 1x and fused outputs (321 -> 41) and label[::16, ::16] for the 0.5x branch
            (321 -> 21); a branch whose stride is not an integer (0.75x: 8/0.75) has its logits
            upsampled to the 1x size first (Caffe Interp) and uses label[::8, ::8]. (At another
            output stride s, the same with s in place of 8.)
  "nearest" the published port: the label is resized to each branch's own size with nearest
            neighbour (PIL's rule, `nearest-exact`).
"aux" architectures (a main and an auxiliary head, e.g. PSPNet, torchvision's DeepLab v3): both
outputs are upsampled bilinearly to the label size and scored with cross-entropy; the loss is
main + w x aux, w declared by the architecture (PSPNet: 0.4) or set by train.aux_weight.
Pixels labelled 255 are ignored. Each image's loss is the mean over its valid pixels (Caffe's
VALID normalisation with batch 1), and a batch's loss the mean over its images, so k accumulated
steps of b images equal one step of k*b images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seglab.data.labels import IGNORE
from seglab.models.resize import resize
from seglab.models.spec import Architecture


def loss_names(spec: Architecture, msc_scales) -> list[str]:
    """The name of each training output, in the order training_loss returns their losses."""
    if spec.train_outputs == "aux":
        return ["out", "aux"]
    return branch_names(msc_scales) if msc_scales else ["1x"]


def loss_weights(spec: Architecture, names, aux_weight=None) -> list[float]:
    """The weight of each training output: MSC's are all 1; an auxiliary head gets the
    architecture's declared weight (spec.loss_weights[1]) unless train.aux_weight says
    otherwise."""
    if spec.train_outputs == "aux":
        return [spec.loss_weights[0], spec.loss_weights[1] if aux_weight is None else aux_weight]
    return [1.0] * len(names)


def training_loss(outputs, label: torch.Tensor, spec: Architecture, targets: str = "caffe",
                  interp: str = "caffe", weights=None):
    """(total, [loss of each output]) for what the architecture returns in training; total =
    sum of weight x loss with `weights` (loss_weights: one per output; default the
    architecture's), the same sum the training log reports."""
    if spec.train_outputs == "msc":
        return msc_loss(outputs if isinstance(outputs, (list, tuple)) else [outputs], label,
                        targets, interp)
    w_out, w_aux = weights if weights is not None else spec.loss_weights[:2]
    size = tuple(label.shape[-2:])
    parts = [cross_entropy_per_image(F.interpolate(outputs[k].float(), size=size,
                                                   mode="bilinear", align_corners=False), label)
             for k in ("out", "aux")]
    return w_out * parts[0] + w_aux * parts[1], parts


def branch_names(scales) -> list[str]:
    return ["1x"] + [f"{s:g}x" for s in scales] + ["max"]


def cross_entropy_per_image(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over each image's valid pixels, then mean over the batch."""
    pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none")
    valid = (target != IGNORE).flatten(1).sum(1)
    per_image = pixel.flatten(1).sum(1) / valid.clamp(min=1)
    return per_image.mean()


def subsampling_stride(label_size, logits_size) -> int | None:
    """The s with label[::s, ::s] the size of the logits ((H-1)//s + 1 = h), if there is one."""
    (h, w), (lh, lw) = label_size, logits_size
    for s in range(1, max(h, w) + 1):
        if (h - 1) // s + 1 == lh and (w - 1) // s + 1 == lw:
            return s
    return None


def caffe_targets(label: torch.Tensor, logits: torch.Tensor, base_size, interp: str):
    """(logits, target) for one branch, as the Caffe release paired them: the label subsampled
    by the branch's stride when it is the 1x stride times 1, 2 or 4 (8 and 16 for DeepLab v2's
    1x and 0.5x branches), else (the 0.75x branch, stride 8/0.75) the logits upsampled to the
    1x size and the label subsampled by the 1x stride."""
    h, w = label.shape[-2:]
    base = subsampling_stride((h, w), base_size)
    if base is not None:
        for stride in (base, 2 * base, 4 * base):
            sub = label[:, ::stride, ::stride]
            if sub.shape[-2:] == logits.shape[-2:]:
                return logits, sub
        return resize(logits, base_size, interp), label[:, ::base, ::base]
    raise ValueError(f"no Caffe label subsampling fits logits {tuple(logits.shape[-2:])} for a "
                     f"{h}x{w} crop; use a crop of the form stride x k + 1 (8k+1 such as 321 at "
                     "output stride 8) or train.loss_targets=nearest")


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


def crf_training_loss(outputs, label: torch.Tensor, image: torch.Tensor, crf_layer) -> torch.Tensor:
    """model.crf_layer (CRF-as-RNN training): the cross-entropy of the dense CRF's mean-field
    marginals on the network's final output (MSC: the fused one; aux: "out"), upsampled inside
    the layer to the label size, against the full-resolution label (255 ignored). `image`
    (B, H, W, 3) raw RGB: the batch's normalised crop put back (densecrf.layer.denormalize)."""
    if isinstance(outputs, dict):
        final = outputs["out"]
    elif isinstance(outputs, (list, tuple)):
        final = outputs[-1]
    else:
        final = outputs
    return cross_entropy_per_image(crf_layer(final.float(), image), label)
