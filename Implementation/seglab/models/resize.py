"""Bilinear resizing in the two conventions the releases use, and logits back to image pixels.

  caffe_scaled_size / scaled_size   the size a scaled input gets (Caffe's Interp, or the port's)
  resize                            bilinear resize; "caffe" = Interp = align_corners=True
  full_resolution_logits            logits at the output stride -> the (padded) input size,
                                    cropped to the image: the one place evaluation, the CRF and
                                    inference turn network outputs into per-pixel scores

docs/fidelity.md explains where the Caffe release and the published port differ here.
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F


def caffe_scaled_size(size: int, scale: float) -> int:
    """Size Caffe's Interp layer gives for a scale written as zoom/shrink factors: shrink q then
    zoom p for scale = p/q, with out = (in-1)//q + 1 and out = in + (in-1)(p-1).
    321 -> 161 at 0.5 (shrink 2) and 241 at 0.75 (shrink 4, zoom 3)."""
    frac = Fraction(scale).limit_denominator(16)
    shrunk = (size - 1) // frac.denominator + 1
    return shrunk + (shrunk - 1) * (frac.numerator - 1)


def resize(x: torch.Tensor, size, interp: str = "caffe") -> torch.Tensor:
    """Bilinear resize of an NCHW tensor; 'caffe' = Interp (align_corners=True)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=(interp == "caffe"))


def scaled_size(hw, scale: float, interp: str = "caffe"):
    if interp == "caffe":
        return tuple(caffe_scaled_size(s, scale) for s in hw)
    return tuple(int(s * scale) for s in hw)  # F.interpolate(scale_factor=s) floors

def _pair(value, name) -> tuple[int, int]:
    pair = tuple(int(v) for v in torch.as_tensor(value).reshape(-1).tolist())
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be (height, width) of positive ints, got {value!r}")
    return pair


def full_resolution_logits(logits, input_size, size, interp: str = "caffe") -> torch.Tensor:
    """Upsample (C, h, w) logits to the network input size (the padded tensor that went in) and
    crop the top-left image area (evaluation pads bottom/right): (C, H, W). With Caffe's Interp,
    65 -> 513 is exactly Caffe's zoom x8."""
    logits = torch.as_tensor(logits).float()
    input_size, size = _pair(input_size, "input_size"), _pair(size, "size")
    if size[0] > input_size[0] or size[1] > input_size[1]:
        raise ValueError(f"image size {size} is larger than the network input size {input_size}")
    full = resize(logits[None], input_size, interp)[0]
    return full[:, :size[0], :size[1]].contiguous()
