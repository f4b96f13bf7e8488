"""A synthetic, deterministic VOC-layout data set: what the demo trains on and what tests read.

`make_demo_dataset(root)` writes

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
                          SegmentationClass/<id>.png        palette PNGs, VOC colour map
                          SegmentationClassAug/<id>.png     the same labels (train_aug layout)
                          ImageSets/Segmentation/{train,val,train_aug,trainval}.txt
    root/demo.json                                          the parameters (written last)

so the real loader reads it unchanged (train_aug = train, so the default split works).

Each image: a textured background (low-saturation colour, smooth blotches, fine grain) and 1-3
objects of a few VOC classes. An object is an ellipse, a rotated rectangle or a polygon, filled
with its class's colour *and* texture (stripes, diagonal stripes, checks or dots, at a class
period), composited with a blurred (soft) edge; about half the objects are placed overlapping
the previous one. As in VOC, a band of 255 (void) a few pixels wide covers every object border.

Everything is drawn from `np.random.default_rng([seed, split, index])`: the same parameters give
the same bytes on every run and machine, and adding images does not change the earlier ones.
"""
from __future__ import annotations

import argparse
import colorsys
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from seglab.data.labels import IGNORE, VOC_CLASSES, save_label_png

from seglab.atomic import atomic_output
from seglab.data.images import DataError

DEMO_CLASSES = (1, 8, 12, 15)  # aeroplane, cat, dog, person: well-separated colours/textures
GENERATOR_VERSION = 1          # bump when the drawing changes, so old demo sets are rewritten
JPEG_QUALITY = 90
SPLIT_CODES = {"train": 0, "val": 1}
OWNER_MARK = "GENERATED_BY_DEMO.txt"  # written first: the folder is the generator's to rewrite


def class_style(class_index: int) -> tuple[np.ndarray, int, int]:
    """A VOC class's look: (RGB colour on 0..255 float, texture kind 0..3, texture period px).

    Hues follow the golden-ratio sequence over class indices, so any few classes differ.
    """
    hue = (class_index * 0.381966) % 1.0
    value = 0.9 if class_index % 2 else 0.7
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.85, value)) * 255.0
    return colour, class_index % 4, 6 + 2 * (class_index % 3)


def texture(kind: int, period: int, height: int, width: int, phase: np.ndarray) -> np.ndarray:
    """A (H, W) pattern in [-1, 1]: 0 horizontal stripes, 1 diagonal stripes, 2 checks, 3 dots."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    wave_y = np.sin(2 * np.pi * (y + phase[0]) / period)
    wave_x = np.sin(2 * np.pi * (x + phase[1]) / period)
    if kind == 0:
        return wave_y
    if kind == 1:
        return np.sin(2 * np.pi * (x + y + phase[0]) / period)
    if kind == 2:
        return np.sign(wave_x * wave_y)
    return np.where(wave_x * wave_y > 0.5, 1.0, -1.0).astype(np.float32)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation colour + smooth blotches + fine grain, (H, W, 3) float on 0..255."""
    colour = np.array(colorsys.hsv_to_rgb(rng.random(), 0.15 * rng.random(),
                                          0.35 + 0.35 * rng.random())) * 255.0
    blotches = rng.normal(0.0, 1.0, (6, 6, 3)).astype(np.float32)
    blotches = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0.0, 1.0, (height, width, 3)).astype(np.float32)
    return colour + 18.0 * blotches + 6.0 * grain


def shape_mask(rng: np.random.Generator, height: int, width: int, centre, radius) -> np.ndarray:
    """A filled ellipse, rotated rectangle or polygon around `centre`, (H, W) uint8 0/1."""
    mask = np.zeros((height, width), np.uint8)
    kind = rng.integers(3)
    angle = rng.uniform(0.0, 180.0)
    cx, cy = centre
    if kind == 0:
        axes = (int(radius), int(radius * rng.uniform(0.5, 1.0)))
        cv2.ellipse(mask, (int(cx), int(cy)), axes, angle, 0, 360, 1, thickness=-1)
    else:
        if kind == 1:  # rectangle: four corners at +-45 degrees, stretched
            aspect = rng.uniform(0.5, 1.0)
            corners = [(radius, radius * aspect), (-radius, radius * aspect),
                       (-radius, -radius * aspect), (radius, -radius * aspect)]
        else:          # polygon: 5-8 vertices at random radii, in angle order
            count = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0.0, 2 * np.pi, count))
            radii = radius * rng.uniform(0.55, 1.0, count)
            corners = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
        theta = np.deg2rad(angle)
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        points = np.array(corners) @ rotation.T + np.array([cx, cy])
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def border_band(label: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within `radius` of a change of label value: VOC's void band on object borders."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(label, kernel) != cv2.erode(label, kernel)


def draw_sample(rng: np.random.Generator, size, classes) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image (H, W, 3) uint8 and its label (H, W) uint8."""
    height, width = size
    short = min(height, width)
    image = background(rng, height, width)
    label = np.zeros((height, width), np.uint8)
    sigma = max(0.8, short / 110.0)
    previous = None
    for _ in range(int(rng.integers(1, 4))):
        class_index = int(classes[rng.integers(len(classes))])
        radius = short * rng.uniform(0.14, 0.3)
        if previous is not None and rng.random() < 0.5:  # overlap the previous object
            direction = rng.uniform(0.0, 2 * np.pi)
            reach = 0.7 * (previous[1] + radius)
            centre = np.clip(previous[0] + reach * np.array([np.cos(direction), np.sin(direction)]),
                             0, [width - 1, height - 1])
        else:
            centre = rng.uniform([0.15 * width, 0.15 * height], [0.85 * width, 0.85 * height])
        mask = shape_mask(rng, height, width, centre, radius)
        colour, kind, period = class_style(class_index)
        pattern = texture(kind, period, height, width, rng.uniform(0, period, 2))
        fill = colour * rng.uniform(0.85, 1.1) * (1.0 + 0.25 * pattern[:, :, None])
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)[:, :, None]
        image = alpha * fill + (1.0 - alpha) * image
        label[mask > 0] = class_index
        previous = (centre, radius)
    label[border_band(label, max(1, round(short / 150)))] = IGNORE
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def demo_ids(split: str, count: int) -> list[str]:
    return [f"{split}_{i:04d}" for i in range(count)]


def _write_lines(path: Path, lines) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines))


def make_demo_dataset(root, num_train: int = 60, num_val: int = 20, size=(160, 160),
                      classes=DEMO_CLASSES, seed: int = 0, progress: bool = False) -> Path:
    """Write the synthetic VOC-layout set under `root` (see the module docstring); return `root`.

    Skips all work when `root/demo.json` records the same parameters and the files are there.
    """
    root = Path(root)
    size = (int(size[0]), int(size[1]))
    classes = tuple(int(c) for c in classes)
    if not classes or any(not 1 <= c < len(VOC_CLASSES) for c in classes):
        raise ValueError(f"classes must be VOC object class indices 1..20, got {classes}")
    params = dict(version=GENERATOR_VERSION, num_train=int(num_train), num_val=int(num_val),
                  size=list(size), classes=list(classes), seed=int(seed))
    voc = root / "VOCdevkit" / "VOC2012"
    splits = {"train": demo_ids("train", num_train), "val": demo_ids("val", num_val)}
    all_ids = splits["train"] + splits["val"]
    marker, owner = root / "demo.json", root / OWNER_MARK
    if root.is_dir() and any(root.iterdir()) and not (owner.is_file() or marker.is_file()):
        raise DataError(f"{root} already holds files that the demo generator did not write "
                        f"({', '.join(sorted(p.name for p in root.iterdir())[:4])}); it writes "
                        "only into a new folder or one it made itself. Pick another data.root "
                        "for the demo, or drop data.demo=true to train on the data in "
                        f"{root}.")
    root.mkdir(parents=True, exist_ok=True)
    if not owner.is_file():
        owner.write_text("This folder was written by the synthetic demo generator "
                         "(seglab/data/demo.py), which may rewrite it.\n")
    if marker.is_file() and json.loads(marker.read_text()) == params and all(
            (voc / "JPEGImages" / f"{i}.jpg").is_file()
            and (voc / "SegmentationClass" / f"{i}.png").is_file() for i in all_ids):
        return root
    marker.unlink(missing_ok=True)  # a run killed below must not look complete
    for split, ids in splits.items():
        for index, sample_id in enumerate(tqdm(ids, desc=f"demo {split}", disable=not progress)):
            rng = np.random.default_rng([int(seed), SPLIT_CODES[split], index])
            image, label = draw_sample(rng, size, classes)
            with atomic_output(voc / "JPEGImages" / f"{sample_id}.jpg") as tmp:
                Image.fromarray(image).save(tmp, format="JPEG", quality=JPEG_QUALITY)
            save_label_png(voc / "SegmentationClass" / f"{sample_id}.png", label)
            save_label_png(voc / "SegmentationClassAug" / f"{sample_id}.png", label)
    lists = voc / "ImageSets" / "Segmentation"
    _write_lines(lists / "train.txt", splits["train"])
    _write_lines(lists / "train_aug.txt", splits["train"])
    _write_lines(lists / "val.txt", splits["val"])
    _write_lines(lists / "trainval.txt", all_ids)
    with atomic_output(marker) as tmp:
        tmp.write_text(json.dumps(params, indent=1) + "\n")
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="folder to write VOCdevkit/ into")
    parser.add_argument("--num-train", type=int, default=60, help="training images")
    parser.add_argument("--num-val", type=int, default=20, help="validation images")
    parser.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"),
                        help="image height and width")
    parser.add_argument("--classes", type=int, nargs="+", default=list(DEMO_CLASSES),
                        help="VOC class indices drawn as objects (1..20)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    root = make_demo_dataset(args.root, args.num_train, args.num_val, args.size, args.classes,
                             args.seed, progress=True)
    names = ", ".join(VOC_CLASSES[c] for c in args.classes)
    print(f"demo set ({names}): {args.num_train} train + {args.num_val} val images in {root}")


if __name__ == "__main__":
    main()
