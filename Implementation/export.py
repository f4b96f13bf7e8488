"""Deploy a checkpoint: ONNX export (fp32) and int8 post-training quantisation.

    python Implementation/export.py onnx --checkpoint C --out model.onnx [--msc]
    python Implementation/export.py int8 --checkpoint C --calibration DATA --out model_int8.onnx
    python Implementation/evaluate.py --checkpoint model_int8.onnx --split val   # runs the file
    python Implementation/infer.py --checkpoint model_int8.onnx photos/

onnx  the network of any architecture (`python Implementation/model.py` lists them), single scale
      or with --msc the MSC max fusion (scales from model.msc_scales=[...] if given, else the
      checkpoint's training config, else the paper's 0.75, 0.5), dynamic batch, height and width
      (--fixed-size H W: that size only, e.g. 513 513 as the TF Lite releases take). The file is then run in onnxruntime next to PyTorch on two images of
      different sizes (or the images of --check-images): the export fails unless the logits agree
      to a max relative difference of 1e-4 and every pixel's label is the same.
int8  the same fp32 export, then onnxruntime's static QDQ quantisation (int8 weights per channel,
      uint8 activations) calibrated on --crops training crops (default 300) of --crop pixels from
      the training split (data.train_split) of the VOC-layout --calibration root, or from every
      image under a plain folder; prints the labels' agreement with the fp32 file.

Both write OUT.json beside OUT (what was exported, the check, the calibration). Settings come
from the same config as the other scripts (`--config PRESET`, `section.key=value`); seglab/deploy/
says how each step works.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seglab.checkpoint import CheckpointError
from seglab.config import ConfigError, add_config_arguments, config_flag, config_from_args
from seglab.config import parse_args as parse_config_args
from seglab.recipe import explicit_recipe
from seglab.data.images import DataError, load_image
from seglab.deploy.onnx_export import export_onnx
from seglab.deploy.onnx_file import ExportError
from seglab.deploy.quantize import DEFAULT_CROPS, DEFAULT_METHOD, METHODS, quantize_checkpoint
from seglab.inference.batch import find_images
from seglab.data.transforms import NORMS

EXPECTED = (CheckpointError, ConfigError, DataError, ExportError, FileNotFoundError, ValueError,
            ImportError)


COMMANDS = {"onnx": "export to an fp32 ONNX file, checked against PyTorch",
            "int8": "export and quantise to int8 (onnxruntime static QDQ)"}


def command_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"export.py {name}", description=COMMANDS[name])
    add_config_arguments(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of ours (.pth)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--msc", action="store_true",
                   help="include the MSC max fusion (scales: model.msc_scales=[...] if given, "
                        "else the checkpoint's)")
    p.add_argument("--fixed-size", type=int, nargs=2, metavar=("H", "W"),
                   help="export for this input size only (default: dynamic)")
    p.add_argument("--check-images", help="a folder of images for the PyTorch/ONNX check "
                                           "(default: two synthetic scenes)")
    config_flag(p, "--norm", "data.norm", choices=NORMS,
                help="input normalisation (auto: the checkpoint's)")
    if name == "int8":
        config_flag(p, "--calibration", "data.root",
                    help="VOC-layout data root (its training split) or a folder of images")
        config_flag(p, "--split", "data.train_split", help="split to calibrate on")
        config_flag(p, "--crop", "data.crop", type=int, help="calibration crop size")
        p.add_argument("--crops", type=int, default=DEFAULT_CROPS,
                       help=f"number of calibration crops (default {DEFAULT_CROPS})")
        p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
        p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                       help="calibration: minmax (observed ranges), percentile (99.999%% of each "
                            "activation's values; slower) or entropy (default %(default)s)")
        p.add_argument("--float-linear", action="store_true",
                       help="keep the convolutions that no activation follows (MobileNetV2's "
                            "linear bottlenecks, the classifier) in float")
        p.add_argument("--fp32-out", help="also keep the fp32 file here")
    return p


def parse_args(argv=None):
    """`export.py COMMAND ...`: the command picks the parser (argparse's intermixed parsing,
    which lets `key=value` overrides go anywhere, does not combine with sub-parsers)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("command", choices=sorted(COMMANDS),
                     help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()) +
                          " (`export.py COMMAND --help` for its options)")
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints the help, or the error naming the commands
    parser = command_parser(argv[0])
    args = parse_config_args(parser, argv[1:])
    args.command = argv[0]
    if getattr(args, "crops", 1) < 1:
        parser.error("--crops must be at least 1")
    return args


def check_images(folder, limit: int = 4):
    """Up to `limit` RGB images from `folder` (None: use the synthetic scenes)."""
    if not folder:
        return None
    found, missing = find_images([folder])
    if missing or not found:
        raise FileNotFoundError(f"--check-images {folder}: no images found")
    return [load_image(path) for path, _ in found[:limit]]


def run(args) -> dict:
    cfg = config_from_args(args)
    given = explicit_recipe(cfg)   # the rest: the checkpoint's recipe (seglab/recipe.py)
    common = dict(msc=args.msc, msc_scales=given.get("msc_scales"), fixed_size=args.fixed_size,
                  norm=given.get("norm"), check_images=check_images(args.check_images),
                  msc_fusion=given.get("msc_fusion"))
    if args.command == "onnx":
        return export_onnx(args.checkpoint, args.out, interp=given.get("interp"), **common)
    d = cfg["data"]
    return quantize_checkpoint(args.checkpoint, args.out, d["root"], count=args.crops,
                               crop=d["crop"], split=d["train_split"], seed=args.seed,
                               fp32_out=args.fp32_out, method=args.method,
                               float_linear=args.float_linear, **common)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        facts = run(args)
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(str(args.out) + ".json").write_text(json.dumps(facts, indent=2, default=str) + "\n")
    check = facts.get("fp32_check") or facts["check"]
    size = "x".join(map(str, facts["fixed_size"])) if facts.get("fixed_size") else "any size"
    lines = [f"wrote {args.out} ({facts['precision']}, {facts['arch']['name']}, MSC scales "
             f"{facts['msc_scales'] or 'none'}, input {size})",
             f"  fp32 ONNX vs PyTorch on {len(check['sizes'])} inputs {check['sizes']}: max "
             f"relative difference {check['max_rel_diff']:.2e}, labels "
             f"{100 * check['label_agreement']:.3f}% equal"]
    if "int8_check" in facts:
        q, c = facts["quantization"], facts["int8_check"]
        lines.append(f"  int8: {q['crops']} calibration crops ({q['method']}, {q['seconds']} s); "
                     f"labels {100 * c['label_agreement']:.2f}% equal to the fp32 file on "
                     f"{len(c['sizes'])} inputs")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
