"""Segment your own images: an image or a folder in, VOC palette PNGs out.

    python Implementation/infer.py --checkpoint runs/voc12/checkpoints/final.pth photos/ cat.jpg
    python Implementation/infer.py --checkpoint C photos/ --crf --overlay --out runs/my_photos

Each INPUT is an image file or a folder, walked recursively for .jpg/.jpeg/.png/.bmp/.webp (any
letter case). Grayscale, palette, RGBA (alpha dropped) and 16-bit images are read as RGB
(labels.load_image). Output names keep each image's path under its input folder (the folder's
own name first), with ".png":

  <out>/pred/<name>.png       predicted labels, palette PNG with the VOC colours (values = class)
  <out>/pred_crf/<name>.png   after the dense CRF (--crf)
  <out>/overlay/<name>.png    the image tinted with the class colours + a legend of the classes
                              found (--overlay)
  <out>/probs/<name>.npy      float16 softmax probabilities (C, H, W) at full size (--save-probs)
  <out>/config.json           the resolved arguments

A file that cannot be read is reported and skipped; the others are still written. The run ends
with a summary (images written, failures with their reasons) and exits with status 1 if any
input failed. The network runs on CUDA when available (--device auto); the CRF runs on the CPU
(pydensecrf) or, with --crf-backend torch, on the network's device.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from config import DEFAULTS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Inputs and output names
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Overlays
# ---------------------------------------------------------------------------------------------

def overlay(image: np.ndarray, labels: np.ndarray, names, alpha: float = 0.5) -> Image.Image:
    """The image with every non-background pixel tinted by its class's VOC colour, and a legend
    (colour swatch + class name) of the classes found, to the right of the image."""
    from labels import voc_palette
    palette = voc_palette()
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


def softmax_probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=0).to(torch.float16).numpy()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def infer(predictor, images, out_dir: Path, mode: str = "voc", pad_to: int = 513,
          crf=None, save_overlay: bool = False, save_probs: bool = False,
          show_progress: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Predict every (path, name) of `images` into `out_dir`: (names written, [(path, reason)]
    for the images that failed). `crf`: a crf.DenseCRF or None."""
    from inference import class_names
    from labels import DataError, load_image, save_label_png
    names = class_names(predictor.num_classes)
    written, failed = [], []
    for path, name in tqdm(images, desc="infer", unit="img", disable=not show_progress):
        try:
            image = load_image(path)
            labels, logits = predictor.predict(image, mode=mode, pad_to=pad_to)
            save_label_png(out_dir / "pred" / f"{name}.png", labels)
            if crf is not None:
                q = crf(image, logits)
                save_label_png(out_dir / "pred_crf" / f"{name}.png",
                               q.argmax(0).astype(np.uint8))
            if save_overlay:
                target = out_dir / "overlay" / f"{name}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                overlay(image, labels, names).save(target)
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


def parse_args(argv=None):
    e, r = DEFAULTS["eval"], DEFAULTS["run"]
    p = argparse.ArgumentParser(
        description="Segment images with a DeepLab v2 checkpoint: each INPUT is an image or a "
                    "folder (recursive; jpg/jpeg/png/bmp/webp). Writes VOC palette PNGs to "
                    "<out>/pred/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders")
    p.add_argument("--checkpoint", required=True, help="a deeplab-v2 checkpoint (.pth)")
    p.add_argument("--out", help="output folder (default: runs/infer-<timestamp>)")
    p.add_argument("--crf", action="store_true", help="also write dense-CRF labels (pred_crf/)")
    p.add_argument("--crf-params", help="CRF parameter JSON (default: the paper's values)")
    p.add_argument("--crf-backend", default="pydensecrf", choices=("pydensecrf", "torch"))
    p.add_argument("--overlay", action="store_true",
                   help="also write colour overlays with a legend (overlay/)")
    p.add_argument("--save-probs", action="store_true",
                   help="also write float16 softmax probabilities (probs/<name>.npy)")
    p.add_argument("--full-image", action="store_true",
                   help="feed whole images instead of padding to --pad-to (the VOC protocol)")
    p.add_argument("--pad-to", type=int, default=e["pad_to"])
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast on CUDA / CPUs with AVX512-BF16 or AMX")
    p.add_argument("--device", default=r["device"], help="auto | cpu | cuda | cuda:N")
    p.add_argument("--norm", choices=("caffe", "imagenet"),
                   help="input normalisation (default: the checkpoint's input_norm)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoint import CheckpointError
    from inference import Predictor
    out_dir = Path(args.out or Path(DEFAULTS["run"]["out"]) /
                   f"infer-{time.strftime('%Y%m%d-%H%M%S')}")
    images, failed = find_images(args.inputs)
    if not images and not failed:
        print(f"error: no images (.jpg/.jpeg/.png/.bmp/.webp) found in {args.inputs}",
              file=sys.stderr)
        return 1
    try:
        predictor = Predictor(args.checkpoint, device=args.device, precision=args.precision,
                              norm=args.norm)
        crf = None
        if args.crf:
            from crf import CRFParams, DenseCRF
            params = CRFParams.from_json(args.crf_params) if args.crf_params else CRFParams()
            crf = DenseCRF(params, backend=args.crf_backend,
                           device=str(predictor.device) if args.crf_backend == "torch" else "cpu")
    except (CheckpointError, ImportError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    config = dict(vars(args), out=str(out_dir), mode="full" if args.full_image else "voc",
                  predictor=predictor.settings(), device=str(predictor.device),
                  crf_params=crf.params.to_dict() if crf else None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    written, errors = infer(predictor, images, out_dir, config["mode"], args.pad_to, crf,
                            args.overlay, args.save_probs)
    failed += errors
    print(summary(written, failed, out_dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
