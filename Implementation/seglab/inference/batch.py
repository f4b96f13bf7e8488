"""Inference on files: find the images under the inputs, predict each, write the outputs.

Images whose longer side exceeds `max_side` run at a capped size: the image is resized so that
its longer side is `max_side` (bilinear), the network and the CRF run there, and the labels are
brought back to full size (nearest) at the end. Memory then stays bounded whatever the photo
(a 6000x4000 photo at full size would need ~12 GB for DeepLab v2's ResNet-101 activations and
2 GB of full-resolution logits); the paper's own test protocol pads VOC images (at most 500 px)
to 513, so a cap of 1025 keeps every VOC-size image exactly as it was.

Photos are read in the orientation their EXIF tag gives (as every viewer shows them), and the
labels are written in that orientation. Label PNGs, overlays and their legend use the model's
class names and colours (Predictor.classes / palette: the checkpoint's).
"""
from __future__ import annotations

import traceback
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from seglab.data.images import DataError, load_image
from seglab.data.labels import save_label_png
from seglab.inference.overlay import overlay

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(inputs) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """([(image path, output name without suffix)], [(input, reason)] for inputs that do not
    exist). A folder contributes every image file below it, named `<folder>/<relative path>`;
    a file is named by its own name. Names that would collide (a.jpg and a.png) keep their
    extension in the name (a_jpg, a_png)."""
    found, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [(p, Path(path.resolve().name) / p.relative_to(path)) for p in files]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            missing.append((str(item), "no such file or folder"))
    stems = [name.with_suffix("") for _, name in found]
    counts = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    named, seen = [], set()
    for (path, name), stem in zip(found, stems):
        if counts[stem] > 1:
            stem = stem.with_name(f"{stem.name}_{name.suffix.lstrip('.').lower()}")
        base, k = stem, 1
        while base in seen:  # the same file given twice, or a_jpg.png next to a.jpg + a.png
            base, k = stem.with_name(f"{stem.name}_{k}"), k + 1
        seen.add(base)
        named.append((path, base))
    return named, missing


def capped(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image with its longer side at most `max_side` (bilinear; unchanged if it fits)."""
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def full_size(labels: np.ndarray, shape) -> np.ndarray:
    if labels.shape == tuple(shape[:2]):
        return labels
    return cv2.resize(labels, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


def softmax_probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=0).to(torch.float16).numpy()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def infer(predictor, images, out_dir: Path, mode: str | None = None, pad_to: int | None = None,
          crf=None, save_overlay: bool = False, save_probs: bool = False,
          show_progress: bool = True, max_side: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Predict every (path, name) of `images` into `out_dir`: (names written, [(path, reason)]
    for the images that failed). `crf`: a DenseCRF or None. `mode` / `pad_to`: None = the
    predictor's recipe. Probabilities (save_probs) are at the capped size."""
    names, colors = predictor.classes, predictor.palette
    written, failed = [], []
    for path, name in tqdm(images, desc="infer", unit="img", disable=not show_progress):
        try:
            original = load_image(path, exif_orientation=True)
            image = capped(original, max_side)
            labels, logits = predictor.predict(image, mode=mode, pad_to=pad_to)
            save_label_png(out_dir / "pred" / f"{name}.png", full_size(labels, original.shape),
                           colors)
            if crf is not None:
                q = crf(image, logits)
                save_label_png(out_dir / "pred_crf" / f"{name}.png",
                               full_size(q.argmax(0).astype(np.uint8), original.shape), colors)
            if save_overlay:
                target = out_dir / "overlay" / f"{name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                overlay(original, full_size(labels, original.shape), names,
                        colors=colors).save(target)
            if save_probs:
                target = out_dir / "probs" / f"{name}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, softmax_probs(logits))
            written.append(str(name))
        except DataError as e:
            failed.append((str(path), str(e)))
        except Exception as e:  # report, skip, go on with the other images
            detail = traceback.format_exception_only(type(e), e)[-1].strip()
            failed.append((str(path), detail))
    return written, failed


def summary(written, failed, out_dir) -> str:
    lines = [f"{len(written)} image(s) written to {out_dir}, {len(failed)} failed"]
    lines += [f"  FAILED {path}: {reason}" for path, reason in failed]
    return "\n".join(lines)
