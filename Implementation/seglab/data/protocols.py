"""Evaluation protocols: which pixels are scored, at which size. The same model scores
differently under each, which explains part of the spread of published numbers.

  voc          (default) the Caffe test protocol: the image padded bottom/right to 513 with the
               mean colour, logits cropped back: every pixel of the original image is scored
  full         the whole image as it is, unpadded (the published port's evaluation)
  torchvision  torchvision's reference evaluation: image and label resized so that the shorter
               side is 520 (image bilinear, label nearest), scored at that size
  vainf        VainF/DeepLabV3Plus-Pytorch: shorter side resized to 513, then the centre
               513 x 513 crop of image and label: the parts of long images outside the crop are
               never scored

`eval.mode` picks one. The resizing protocols change the label itself (nearest resampling moves
boundaries) and, for vainf, drop pixels, so their numbers are not comparable with `voc`/`full`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

PROTOCOLS = ("voc", "full", "torchvision", "vainf")
SHORTER_SIDE = {"torchvision": 520, "vainf": 513}
CENTRE_CROP = {"vainf": 513}


def _resized(mode: str, h: int, w: int) -> tuple[int, int]:
    """The size after resizing the shorter side to the protocol's (torchvision's rounding:
    the longer side int(side * long / short))."""
    side = SHORTER_SIDE[mode]
    return (side, int(side * w / h)) if h <= w else (int(side * h / w), side)


def protocol_size(mode: str, size) -> tuple[int, int]:
    """The (H, W) that `mode` turns an (H, W) image into (before any padding)."""
    h, w = int(size[0]), int(size[1])
    if mode in SHORTER_SIDE:
        h, w = _resized(mode, h, w)
    if mode in CENTRE_CROP:
        h, w = min(h, CENTRE_CROP[mode]), min(w, CENTRE_CROP[mode])
    return h, w


def _geometry(mode: str, array: np.ndarray, resample) -> np.ndarray:
    if mode not in SHORTER_SIDE:
        return array
    resized_h, resized_w = _resized(mode, *array.shape[:2])
    out = np.array(Image.fromarray(array).resize((resized_w, resized_h), resample))  # writable
    if mode in CENTRE_CROP:
        crop = CENTRE_CROP[mode]
        top = int(round((resized_h - crop) / 2.0)) if resized_h > crop else 0
        left = int(round((resized_w - crop) / 2.0)) if resized_w > crop else 0
        out = out[top:top + crop, left:left + crop]
    return np.array(out, copy=True, order="C")


def protocol_image(mode: str, image: np.ndarray) -> np.ndarray:
    """The RGB uint8 image as the protocol feeds it (bilinear resizing, as both references)."""
    return _geometry(mode, image, Image.BILINEAR)


def protocol_label(mode: str, label: np.ndarray) -> np.ndarray:
    """The label map as the protocol scores it (nearest resampling)."""
    return _geometry(mode, label, Image.NEAREST)
