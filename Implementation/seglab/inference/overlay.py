"""A picture of a prediction: the image tinted with the class colours, plus a legend."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from seglab.data.labels import full_palette


def overlay(image: np.ndarray, labels: np.ndarray, names, alpha: float = 0.5,
            colors=None) -> Image.Image:
    """The image with every pixel but class 0 (background) tinted by its class's colour
    (`colors`: one RGB per class, the model's; default the VOC colour map), and a legend (colour
    swatch + class name) of the classes found, to the right of the image."""
    palette = full_palette(colors)
    tinted = image.astype(np.float32)
    mask = (labels != 0) & (labels != 255)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * palette[labels[mask]].astype(np.float32)
    picture = Image.fromarray(np.clip(np.rint(tinted), 0, 255).astype(np.uint8))

    found = [int(c) for c in np.unique(labels) if c != 255]
    size = max(11, image.shape[0] // 30)   # legend text scales with the image
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the bitmap font
        font = ImageFont.load_default()
    row, swatch, pad = int(size * 1.6), size, size // 2 + 2
    text = max((font.getlength(names[c]) for c in found), default=60)
    width = pad * 3 + swatch + int(np.ceil(text))
    height = max(image.shape[0], pad * 2 + row * len(found))
    canvas = Image.new("RGB", (image.shape[1] + width, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, c in enumerate(found):
        x, y = image.shape[1] + pad, pad + k * row
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(v) for v in palette[c]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + pad, y), names[c], fill=(0, 0, 0), font=font)
    return canvas
