"""Input normalisation and the training / evaluation transforms of the DeepLab v2 Caffe data layer.

Reading order:
  normalize        RGB uint8 image -> float tensor, in the convention of the weights to be loaded:
                   "caffe"    BGR, 0..255, minus the mean (104.008, 116.669, 122.675), no std
                   "imagenet" RGB, 0..1, (x - mean) / std with torchvision's ImageNet values
                   "tf"       RGB scaled to [-1, 1]: x / 127.5 - 1 (TensorFlow's DeepLab)
  mean_fill_rgb    the RGB colour that normalises to 0 (the "mean colour" images are padded with)
  TrainTransform   Caffe's ImageSegData transform: random scale, pad, random crop, random mirror
  EvalTransform    the VOC protocol (pad to 513) or the full image

Padding happens on the normalised float image with 0, which is padding with the exact mean colour
and then normalising. (Caffe pads its uint8 image with the mean rounded to integers, so its padded
pixels normalise to (-0.008, 0.331, 0.325) instead of exactly 0; the difference is below 0.4 grey
level on pixels that carry the ignore label.)
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

from seglab.data.labels import IGNORE
from seglab.data.protocols import PROTOCOLS, protocol_image

CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = ("caffe", "imagenet", "tf")
VOC_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown input normalisation {norm!r}; use one of {NORMS} (the one the "
                         "loaded weights were trained with)")


def normalize_array(image_rgb: np.ndarray, norm: str = "caffe") -> np.ndarray:
    """(H, W, 3) RGB image on the 0..255 scale (uint8 or float) -> normalised (H, W, 3) float32."""
    _check_norm(norm)
    image = np.asarray(image_rgb, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if norm == "caffe":
        return image[:, :, ::-1] - np.array(CAFFE_MEAN_BGR, np.float32)
    if norm == "tf":
        return image / np.float32(127.5) - np.float32(1.0)
    mean = np.array(IMAGENET_MEAN, np.float32)
    std = np.array(IMAGENET_STD, np.float32)
    return (image / 255.0 - mean) / std


def to_tensor(image_hwc: np.ndarray) -> torch.Tensor:
    """(H, W, 3) float array -> contiguous (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1), dtype=np.float32))


def normalize(image_rgb_uint8: np.ndarray, norm: str = "caffe") -> torch.Tensor:
    """RGB image (H, W, 3) on the 0..255 scale -> normalised FloatTensor (3, H, W)."""
    return to_tensor(normalize_array(image_rgb_uint8, norm))


def mean_fill_rgb(norm: str = "caffe") -> tuple[float, float, float]:
    """The RGB colour (0..255 scale) whose normalised value is 0: the padding colour."""
    _check_norm(norm)
    if norm == "caffe":
        b, g, r = CAFFE_MEAN_BGR
        return (r, g, b)
    if norm == "tf":
        return (127.5, 127.5, 127.5)
    return tuple(255.0 * m for m in IMAGENET_MEAN)


def pad_crop(array: np.ndarray, top: int, left: int, height: int, width: int, fill) -> np.ndarray:
    """The window [top:top+height, left:left+width] of `array` padded bottom/right with `fill`.

    Equal to padding the array bottom/right far enough and then cropping, without building the
    padded array. `top`/`left` must lie inside the array (padding is only ever bottom/right).
    """
    out = np.full((height, width) + array.shape[2:], fill, dtype=array.dtype)
    inside = array[top:top + height, left:left + width]
    out[:inside.shape[0], :inside.shape[1]] = inside
    return out


class TrainTransform:
    """The DeepLab v2 Caffe training transform (ImageSegData layer), in the layer's order:

    1. scale: one factor picked uniformly from `scales`; image bilinear, label nearest (cv2, the
       output size rounded as cv::resize rounds it: round(W * s) x round(H * s));
    2. pad bottom/right up to crop x crop: image with the mean colour (normalised 0), label 255;
    3. random crop x crop window (offsets uniform over all valid positions);
    4. random mirror (left-right, image and label together), with probability 1/2.

    Called as `t(image_rgb_uint8, label_uint8, rng)`; all randomness comes from the
    `np.random.Generator` `rng`, so a sample is a pure function of (image, label, seed).
    Returns (FloatTensor[3, crop, crop], LongTensor[crop, crop]).
    """

    def __init__(self, crop: int = 321, scales=VOC_SCALES, mirror: bool = True,
                 norm: str = "caffe"):
        _check_norm(norm)
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive factors, got {scales}")
        self.crop, self.scales, self.mirror, self.norm = int(crop), tuple(scales), mirror, norm

    def __repr__(self):
        return (f"TrainTransform(crop={self.crop}, scales={self.scales}, mirror={self.mirror}, "
                f"norm={self.norm!r})")

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        if image.shape[:2] != label.shape:
            raise ValueError(f"image {image.shape[:2]} and label {label.shape} sizes differ")
        # 1. random scale
        scale = self.scales[rng.integers(len(self.scales))]
        if scale != 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        # 2. + 3. pad bottom/right to the crop size, then a random crop of the padded image
        height, width = max(label.shape[0], self.crop), max(label.shape[1], self.crop)
        top = int(rng.integers(height - self.crop + 1))
        left = int(rng.integers(width - self.crop + 1))
        image = pad_crop(normalize_array(image[top:top + self.crop, left:left + self.crop],
                                         self.norm), 0, 0, self.crop, self.crop, 0.0)
        label = pad_crop(label, top, left, self.crop, self.crop, IGNORE)
        # 4. random mirror
        if self.mirror and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return to_tensor(image), torch.from_numpy(label.astype(np.int64))


def voc_padded_size(size: int, pad_to: int = 513, stride: int = 8) -> int:
    """`pad_to`, or for a larger side the next size of the form stride x k + 1 (the network's
    output grid then lands on input pixels: 8k + 1 for DeepLab v2's output stride 8)."""
    if size <= pad_to:
        return pad_to
    return (size - 1 + stride - 1) // stride * stride + 1


class EvalTransform:
    """The evaluation transform. `t.prepare(image_rgb_uint8)` -> (FloatTensor[3, H', W'], (H, W)):
    the network's input and the original size, to crop predictions back to. As a data set's
    transform, with the signature every transform has, `t(image, label, rng)` -> (the prepared
    image, LongTensor[H, W] the label at its original size); rng is unused (no randomness).

    mode "voc":  the Caffe test protocol: pad bottom/right with the mean colour to pad_to x pad_to
                 (513: every VOC image fits). A side larger than pad_to is padded to the next size
                 of the form stride x k + 1 instead (8k + 1 at output stride 8), so the
                 network's output grid still lands on pixels.
    mode "full": the normalised image as it is.
    modes "torchvision", "vainf": resized (and cropped) as those references evaluate
                 (seglab/data/protocols.py), then as it is.
    """

    def __init__(self, mode: str = "voc", pad_to: int = 513, norm: str = "caffe", stride: int = 8):
        _check_norm(norm)
        if mode not in PROTOCOLS:
            raise ValueError(f"unknown evaluation mode {mode!r}; use 'voc' (pad to {pad_to}) or "
                             "'full' (the image as it is)")
        self.mode, self.pad_to, self.norm, self.stride = mode, int(pad_to), norm, int(stride)

    def __repr__(self):
        return f"EvalTransform(mode={self.mode!r}, pad_to={self.pad_to}, norm={self.norm!r})"

    def __call__(self, image: np.ndarray, label: np.ndarray, rng=None):
        return self.prepare(image)[0], torch.from_numpy(label.astype(np.int64))

    def prepare(self, image: np.ndarray):
        image = protocol_image(self.mode, image)
        size = tuple(image.shape[:2])
        normalised = normalize_array(image, self.norm)
        if self.mode == "voc":
            normalised = pad_crop(normalised, 0, 0,
                                  voc_padded_size(size[0], self.pad_to, self.stride),
                                  voc_padded_size(size[1], self.pad_to, self.stride), 0.0)
        return to_tensor(normalised), size
