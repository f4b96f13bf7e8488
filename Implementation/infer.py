"""Segment your own images: an image or a folder in, VOC palette PNGs out.

    python Implementation/infer.py --checkpoint runs/voc12/checkpoints/final.pth photos/ cat.jpg
    python Implementation/infer.py --checkpoint C photos/ --crf --overlay --out runs/my_photos

Each INPUT is an image file or a folder, walked recursively for .jpg/.jpeg/.png/.bmp/.webp (any
letter case). Grayscale, palette, RGBA (alpha dropped) and 16-bit images are read as RGB
(seglab/data/images.py). Output names keep each image's path under its input folder (the folder's
own name first), with ".png":

  <out>/pred/<name>.png       predicted labels, palette PNG in the model's class colours
                              (pixel value = class index)
  <out>/pred_crf/<name>.png   after the dense CRF (--crf)
  <out>/overlay/<name>.png    the image tinted with the class colours + a legend of the classes
                              found (--overlay)
  <out>/probs/<name>.npy      float16 softmax probabilities (C, H, W) at full size (--save-probs)
  <out>/config.yaml           the resolved config

Photos larger than infer.max_side (1025 px on the longer side) run at that size and their
labels are brought back to full size, so memory stays bounded (seglab/inference/batch.py). A
JPEG's EXIF orientation is applied first, as photo viewers do: the labels (and overlays) are in
the orientation the photo is shown in, not the stored one.

The model runs with its own recipe (scales, fusion, protocol, input normalisation: the
checkpoint's, printed in one line and saved in config.yaml) unless a flag or override sets one;
class names and colours are the checkpoint's.

A file that cannot be read is reported and skipped; the others are still written. The run ends
with a summary (images written, failures with their reasons) and exits with status 1 if any
input failed. The network runs on CUDA when available (--device auto); the CRF runs on the CPU
(pydensecrf) or, with --crf-backend torch, on the network's device. Settings come from the
same config as training (`--config`, `section.key=value`); the flags are shorthands.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from seglab.checkpoint import CheckpointError
from seglab.config import ConfigError, config_flag, config_from_args, save_config
from seglab.config import parse_args as parse_config_args
from seglab.densecrf.dense_crf import DenseCRF
from seglab.densecrf.params import BACKENDS, crf_params_from_config, is_torch_backend
from seglab.device import DeviceError
from seglab.inference.batch import find_images, infer, summary
from seglab.deploy import load_predictor  # a checkpoint, or an .onnx file (export.py)
from seglab.recipe import explicit_recipe, fill_config
from seglab.data.transforms import NORMS

OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_.]+=")
EXPECTED = (CheckpointError, ConfigError, DeviceError, ImportError, FileNotFoundError, ValueError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Segment images with a checkpoint: each INPUT is an image or a folder "
                    "(recursive; jpg/jpeg/png/bmp/webp), read in its EXIF orientation (as "
                    "viewers show it). Writes palette PNGs in the model's class colours to "
                    "<out>/pred/, in that orientation. The model runs with its checkpoint's "
                    "recipe unless a flag or KEY=VALUE sets one.")
    p.add_argument("items", nargs="+", metavar="INPUT|KEY=VALUE",
                   help="image files and/or folders, and any config overrides "
                        "section.key=value (e.g. eval.precision=bf16)")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of ours (.pth), or an exported .onnx file (export.py)")
    p.add_argument("--config", default="voc12",
                   help="recipe preset or YAML file (default: voc12, the paper's recipe)")
    p.add_argument("--out", help="output folder (default: runs/infer-<timestamp>)")
    config_flag(p, "--crf", "eval.crf", action="store_true", help="also write dense-CRF labels")
    config_flag(p, "--crf-params", "crf.params", help="CRF parameter JSON")
    config_flag(p, "--crf-backend", "crf.backend", choices=BACKENDS)
    config_flag(p, "--overlay", "infer.overlay", action="store_true",
                help="also write colour overlays with a legend (overlay/)")
    config_flag(p, "--save-probs", "infer.save_probs", action="store_true",
                help="also write float16 softmax probabilities (probs/<name>.npy)")
    config_flag(p, "--max-side", "infer.max_side", type=int,
                help="run larger photos at this longer side (0 = never cap)")
    p.add_argument("--full-image", dest="cfg:eval.mode", action="store_const", const="full",
                   help="feed whole images instead of padding to --pad-to (eval.mode=full)")
    config_flag(p, "--pad-to", "eval.pad_to", type=int)
    config_flag(p, "--precision", "eval.precision", choices=("fp32", "bf16"),
                help="bf16: autocast on CUDA / CPUs with AVX512-BF16 or AMX")
    config_flag(p, "--device", "run.device", help="auto | cpu | cuda | cuda:N")
    config_flag(p, "--norm", "data.norm", choices=NORMS,
                help="input normalisation (auto: the checkpoint's)")
    args = parse_config_args(p, argv)
    args.overrides = [i for i in args.items if OVERRIDE.match(i) and not Path(i).exists()]
    args.inputs = [i for i in args.items if i not in args.overrides]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        if getattr(args, "cfg:eval.crf") is None and not any(
                o.startswith("eval.crf=") for o in args.overrides):
            cfg["eval"]["crf"] = False  # the CRF is opt-in here (--crf)
        out_dir = Path(args.out or Path(cfg["run"]["out"]) /
                       f"infer-{time.strftime('%Y%m%d-%H%M%S')}")
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} is an existing file; give a folder")
        images, failed = find_images(args.inputs)
        if not args.inputs:
            raise FileNotFoundError("no INPUT given: name image files or folders")
        if not images and not failed:
            raise FileNotFoundError(f"no images (.jpg/.jpeg/.png/.bmp/.webp) found in "
                                    f"{args.inputs}")
        e = cfg["eval"]
        given = explicit_recipe(cfg)   # the rest comes from the checkpoint (seglab/recipe.py)
        if "msc_scales" in given:
            given["msc_scales"] = tuple(given["msc_scales"])
        predictor = load_predictor(args.checkpoint, device=cfg["run"]["device"],
                                   precision=e["precision"], flip=e["flip"], **given)
        print(predictor.describe(), file=sys.stderr)
        crf = None
        if e["crf"]:
            backend = cfg["crf"]["backend"]
            crf = DenseCRF(crf_params_from_config(cfg["crf"]), backend=backend,
                           device=str(predictor.device) if is_torch_backend(backend) else "cpu")
        out_dir.mkdir(parents=True, exist_ok=True)
        fill_config(cfg, predictor.recipe)   # the saved config is the resolved one
        save_config(dict(cfg, checkpoint=args.checkpoint, inputs=args.inputs,
                         recipe=dict(predictor.recipe, sources=predictor.recipe_sources),
                         classes=predictor.classes, predictor=predictor.settings()), out_dir)
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    i = cfg["infer"]
    written, errors = infer(predictor, images, out_dir, None, None, crf,
                            i["overlay"], i["save_probs"], max_side=i["max_side"])
    failed += errors
    print(summary(written, failed, out_dir))
    print(predictor.describe())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
