"""PASCAL VOC classes, the VOC colour map, and reading/writing/checking images and label PNGs.

Reading order:
  VOC_CLASSES, IGNORE   the 21 class names (index = label value) and the void label 255
  DataError             the one error type of the data layer: names the file, the problem, the fix
  voc_palette           the VOC devkit colour map (bit-interleaving construction, 256 colours)
  rgb_to_label          colour-rendered mask (H, W, 3) -> label indices, for masks saved as RGB
  atomic_output         (from atomic.py) temp file + rename: never half a file
  save_label_png        label (H, W) uint8 -> palette ("P") PNG with the VOC colour map
  load_label            label PNG -> (H, W) uint8, checked: single channel, size, values
  load_image            any image PIL reads -> (H, W, 3) uint8 RGB, or a DataError naming the file

VOC masks are palette PNGs whose pixel values are class indices 0..20, with 255 ("void") on
object borders and unclear regions; 255 is ignored by the loss and the metrics.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from seglab.atomic import atomic_output
from seglab.data.images import DataError, open_image  # noqa: F401  (DataError re-exported)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)
IGNORE = 255

# PIL errors that mean "this file is not a readable image" (UnidentifiedImageError is an OSError).


def voc_palette() -> np.ndarray:
    """The VOC devkit colour map (`VOClabelcolormap.m`): (256, 3) uint8.

    The bits of the index are dealt out to R, G, B in turn, most significant bit first:
    bit 0 -> R bit 7, bit 1 -> G bit 7, bit 2 -> B bit 7, bit 3 -> R bit 6, ...
    Index 1 is (128, 0, 0), 15 (person) is (192, 128, 128), 255 (void) is (224, 224, 192).
    """
    palette = np.zeros((256, 3), np.uint8)
    for index in range(256):
        rgb = [0, 0, 0]
        bits = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette[index] = rgb
    return palette


def rgb_to_label(rgb: np.ndarray, num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """Map a colour-rendered VOC mask (H, W, 3) back to label indices (H, W) uint8.

    Known colours are those of classes 0..num_classes-1 and of void (255). Any other colour
    raises a ValueError listing a few of them (a JPEG-compressed or resized colour mask has such
    in-between colours and cannot be recovered exactly).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb_to_label expects an (H, W, 3) colour image, got shape {rgb.shape}")
    palette = voc_palette().astype(np.int64)
    indices = list(range(num_classes)) + [IGNORE]
    codes = {int((palette[i, 0] << 16) | (palette[i, 1] << 8) | palette[i, 2]): i for i in indices}
    pixels = rgb.astype(np.int64)
    pixel_codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    unique, inverse = np.unique(pixel_codes, return_inverse=True)
    unknown = [int(c) for c in unique if int(c) not in codes]
    if unknown:
        shown = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in unknown[:5])
        raise ValueError(f"{len(unknown)} colour(s) are not VOC class colours, e.g. {shown}")
    lookup = np.array([codes[int(c)] for c in unique], np.uint8)
    return lookup[inverse.reshape(pixel_codes.shape)]


def distinct_palette(count: int) -> np.ndarray:
    """(count, 3) uint8 colours for classes that come without a colour table: golden-ratio steps
    of hue at alternating value and saturation, so neighbours in the list differ clearly and no
    two of the first 64 are alike; class 0 is black, as VOC's background."""
    colors = np.zeros((count, 3), np.uint8)
    for k in range(1, count):
        hue = (k * 0.6180339887) % 1.0
        sat, val = (0.9, 0.95) if k % 2 else (0.6, 0.7)
        colors[k] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return colors


def full_palette(colors=None) -> np.ndarray:
    """(256, 3) uint8: the given class colours first, the VOC colour map after them (so 255,
    the ignore label, keeps VOC's void colour); the VOC colour map alone without colours."""
    palette = voc_palette()
    if colors is not None:
        colors = np.asarray(colors, np.uint8).reshape(-1, 3)[:255]
        palette[:len(colors)] = colors
    return palette


def save_label_png(path, label: np.ndarray, palette=None) -> Path:
    """Write a (H, W) uint8 label as a palette PNG, atomically: pixel value = class index,
    drawn in `palette` ((256, 3) or per-class colours; default the VOC colour map)."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"a label must be a (H, W) uint8 array, got {label.dtype} {label.shape}")
    image = Image.fromarray(np.ascontiguousarray(label))  # mode "L"
    image.putpalette(full_palette(palette).tobytes())     # "L" + palette -> "P"
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def load_label(path, image_size=None, num_classes: int | None = len(VOC_CLASSES)) -> np.ndarray:
    """Read a label PNG as (H, W) uint8 and check it.

    The mask must be single-channel 8-bit ("P" palette or "L" grayscale), of `image_size`
    (H, W) when given, with values in 0..num_classes-1 or 255. `num_classes=None` skips the
    value check. Anything else is a DataError naming the file, the problem and the fix.
    """
    path = Path(path)
    image = open_image(path, "label")
    if image.mode in ("RGB", "RGBA"):
        raise DataError(
            f"label {path} is a {image.mode} colour image; labels must be single-channel PNGs whose "
            "pixel values are class indices. It looks like a colour-rendered mask: convert it to a "
            "palette PNG by mapping each VOC colour to its index, e.g. "
            "save_label_png(path, rgb_to_label(np.asarray(Image.open(path).convert('RGB')))) "
            "with labels.py's helpers.")
    if image.mode not in ("P", "L"):
        raise DataError(
            f"label {path} has PIL mode {image.mode!r}; labels must be single-channel 8-bit PNGs "
            "(mode 'P' or 'L') holding class indices 0..20 and 255. Re-save it as 8-bit, e.g. with "
            "labels.save_label_png.")
    label = np.array(image, dtype=np.uint8)
    if image_size is not None and label.shape != tuple(image_size):
        (h, w), (ih, iw) = label.shape, image_size
        raise DataError(f"label {path} is {w}x{h} (WxH) but its image is {iw}x{ih}; a label must "
                        "match its image pixel for pixel. Was the mask resized or paired with "
                        "the wrong image?")
    if num_classes is not None:
        bad = (label >= num_classes) & (label != IGNORE)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            raise DataError(f"label {path} holds values {values[:10]} outside 0..{num_classes - 1} "
                            f"and {IGNORE} (void). Check num_classes ({num_classes}) and how the "
                            "mask was made; map other values to 255 to ignore them.")
    return label


def class_names(num_classes: int) -> list[str]:
    """The VOC class names of label values 0..num_classes-1 (the index itself beyond 20)."""
    return [VOC_CLASSES[i] if i < len(VOC_CLASSES) else str(i) for i in range(num_classes)]
