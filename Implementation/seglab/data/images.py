"""Reading image files: one decoder for every script, with errors that name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """Bad or missing data. The message names the file, says what is wrong and how to fix it."""


def open_image(path, what: str) -> Image.Image:
    """Open and fully decode an image file, or raise a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        image = Image.open(path)
        image.load()  # decode now: truncated or corrupt files fail here, not later
    except Image.DecompressionBombError as e:
        raise DataError(f"{what} {path} is too large to open safely ({e}). Downscale it (e.g. to "
                        "a few thousand pixels on the longer side) and try again.") from None
    except _READ_ERRORS as e:
        raise DataError(f"cannot read {what} {path}: {e}. The file is corrupt, truncated or not "
                        "an image; re-extract or re-create it.") from e
    return image


def load_image(path, exif_orientation: bool = False) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB with PIL (as torchvision does).

    Grayscale and palette images are expanded to RGB, alpha is dropped, 16-bit grayscale is
    scaled to 8 bit (value * 255 / 65535, rounded). With `exif_orientation` a JPEG's EXIF
    Orientation tag is applied (as cv2.imread and every photo viewer do), so a phone photo
    stored rotated comes out as it is shown; data sets read the stored pixels, which their masks
    were drawn on. A missing, corrupt or unreadable file is a DataError naming it.
    """
    path = Path(path)
    image = open_image(path, "image")
    if exif_orientation:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"image {path} holds 32-bit values outside 0..65535; save it as an "
                            "8-bit RGB JPEG or PNG.")
        gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DataError(f"image {path} is a floating-point image; save it as an 8-bit RGB JPEG or "
                        "PNG.")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
