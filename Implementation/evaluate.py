"""Score a checkpoint on a split: inference with the checkpoint's own recipe (DeepLab v2's: MSC,
the VOC protocol), cached logits, scores.json and a per-class table in the checkpoint's class
names; the dense CRF (stage two) with --crf. The recipe is printed in one line at the start
(seglab/recipe.py: command line > checkpoint > architecture > DeepLab v2's).

    python Implementation/evaluate.py --checkpoint runs/voc12/checkpoints/final.pth --split val
    python Implementation/evaluate.py --checkpoint C --crf --crf-params runs/crf_search/best.json
    python Implementation/evaluate.py --checkpoint C --config demo eval.precision=bf16

Settings come from the same config as training (`--config PRESET`, `section.key=value`); the
flags below are shorthands for config keys. What is written where: seglab/evaluation/evaluate.py.
"""
from __future__ import annotations

import argparse
import sys

from seglab.checkpoint import CheckpointError
from seglab.config import ConfigError, add_config_arguments, config_flag, config_from_args
from seglab.config import parse_args as parse_config_args
from seglab.data.images import DataError
from seglab.densecrf.params import BACKENDS
from seglab.device import DeviceError
from seglab.evaluation.evaluate import EvalSettings, EvaluationError, evaluate
from seglab.data.logit_cache import LogitCacheError
from seglab.data.transforms import NORMS

EXPECTED = (CheckpointError, ConfigError, DataError, DeviceError, EvaluationError,
            LogitCacheError, FileNotFoundError, ValueError, ImportError)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Score a checkpoint on a split: MSC inference with the VOC protocol (pad to "
                    "513), cached logits, scores.json and a per-class table; --crf adds the "
                    "dense CRF (stage two).")
    add_config_arguments(p)
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of ours (.pth), or an exported .onnx file (export.py)")
    p.add_argument("--out", help="output folder (default: <run>/eval_<split>/ beside the "
                                 "checkpoint)")
    config_flag(p, "--data-root", "data.root", help="folder that contains the data set")
    config_flag(p, "--split", "data.val_split", help="the split to score")
    config_flag(p, "--num-classes", "data.num_classes", type=int)
    config_flag(p, "--pad-to", "eval.pad_to", type=int, help="VOC protocol pad size")
    p.add_argument("--full-image", dest="cfg:eval.mode", action="store_const", const="full",
                   help="feed whole images instead of padding (config eval.mode=full)")
    config_flag(p, "--crf", "eval.crf", action="store_true", help="also score after the CRF")
    config_flag(p, "--crf-params", "crf.params",
                help="CRF parameter JSON (crf.py search's best.json)")
    config_flag(p, "--crf-backend", "crf.backend", choices=BACKENDS)
    config_flag(p, "--workers", "crf.workers", type=int, help="CRF processes (0 = all cores)")
    config_flag(p, "--loader-workers", "eval.loader_workers", type=int,
                help="image-loading processes for the network pass")
    config_flag(p, "--precision", "eval.precision", choices=("fp32", "bf16"),
                help="bf16: autocast on CUDA / CPUs with AVX512-BF16 or AMX")
    config_flag(p, "--device", "run.device", help="auto | cpu | cuda | cuda:N")
    config_flag(p, "--trimap", "eval.trimap", type=int, nargs="+", metavar="W",
                help="also score trimap bands of these widths (px)")
    config_flag(p, "--limit", "eval.limit", type=int, help="only the first N images")
    config_flag(p, "--norm", "data.norm", choices=NORMS,
                help="input normalisation (auto: the checkpoint's)")
    config_flag(p, "--recompute", "eval.recompute", action="store_true",
                help="ignore cached logits")
    p.add_argument("--no-save-pred", dest="cfg:eval.save_predictions", action="store_const",
                   const=False, help="do not write the predicted label PNGs")
    return parse_config_args(p, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        # an explicit crf.* value implies --crf only through eval.crf; training's default
        # (eval.crf=true after training) does not apply to a standalone evaluation
        if getattr(args, "cfg:eval.crf") is None and not any(
                o.startswith("eval.crf=") for o in args.overrides):
            cfg["eval"]["crf"] = False
        settings = EvalSettings.from_config(cfg)   # unset recipe keys: the checkpoint's
        evaluate(args.checkpoint, settings, out_dir=args.out)
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that is a file, a folder that is not writable, a full disk
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
