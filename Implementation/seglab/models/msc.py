"""Multi-scale inputs fused by max (DeepLab v2, Sec. 3.3): an architecture-neutral wrapper."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.resize import resize, scaled_size


FUSIONS = ("max", "mean")


def scale_input(x: torch.Tensor, scale: float, interp: str = "caffe") -> torch.Tensor:
    """The input of one MSC branch. "caffe": Caffe's Interp to the size it computes (321 -> 241,
    161), align_corners=True. "pytorch": as the published port does under current PyTorch,
    F.interpolate(scale_factor=s, align_corners=False): size floor(s * in) (321 -> 240, 160),
    sampled at a step of exactly 1/s, which is not the step in/out that a `size=` call takes
    (321/160 = 2.00625): docs/fidelity.md."""
    if interp == "pytorch":
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    return resize(x, scaled_size(x.shape[-2:], scale, interp), interp)


class MSC(nn.Module):
    """Multi-scale inputs: the image at 1x and each of `scales` goes through the same network;
    the smaller logits are upsampled to the 1x logit size and fused by element-wise max.

    train(): returns [logits_1x, logits_s1, logits_s2, ..., fused_max], each branch at its native
    size (41, 31, 21 for a 321 input), so the loss can choose its targets. eval(): the fused max.
    interp="caffe" reproduces Caffe's Interp layer; "pytorch" is the published port's
    F.interpolate(align_corners=False).

    fusion="max" is the paper's (the network learns it: DeepLab v2 trains through the max).
    fusion="mean" averages the branches' class probabilities and returns their log (a valid
    logit for softmax, argmax and the CRF's unary): TensorFlow DeepLab's multi-scale test, the
    fusion for a network trained at one scale, whose logits at different scales are not on
    one footing (a max of raw logits then lets the most confident scale win everywhere)."""

    def __init__(self, net: nn.Module, scales: Sequence[float] = (0.75, 0.5), interp: str = "caffe",
                 fusion: str = "max"):
        super().__init__()
        if interp not in ("caffe", "pytorch"):
            raise ValueError(f"interp must be 'caffe' or 'pytorch', got {interp!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.net, self.scales, self.interp, self.fusion = net, tuple(scales), interp, fusion

    def branch_logits(self, x) -> list:
        """Logits of each branch at its native size: 1x first, then each of `scales`."""
        logits = [self.net(x)]
        for s in self.scales:
            logits.append(self.net(scale_input(x, s, self.interp)))
        return logits

    def upsampled(self, logits: list) -> list:
        """Every branch's logits at the 1x branch's size (the smaller ones upsampled)."""
        size = logits[0].shape[-2:]
        return [logits[0]] + [resize(branch, size, self.interp) for branch in logits[1:]]

    def forward(self, x):
        logits = self.branch_logits(x)
        upsampled = self.upsampled(logits)
        if self.fusion == "mean":
            probs = torch.stack([b.float().softmax(1) for b in upsampled]).mean(0)
            fused = probs.clamp_min(1e-12).log().to(upsampled[0].dtype)
        else:
            fused = upsampled[0]
            for branch in upsampled[1:]:
                fused = torch.max(fused, branch)
        return logits + [fused] if self.training else fused
