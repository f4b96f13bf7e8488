"""Evaluation on a VOC split: MSC inference with the VOC protocol, a logit cache, scores, and
optionally the dense CRF (stage two) on the cached logits.

    python Implementation/evaluate.py --checkpoint runs/voc12/checkpoints/final.pth --split val
    python Implementation/evaluate.py --checkpoint C --crf --crf-params runs/crf_search/best.json

Protocol (DESIGN.md section 3): each image is padded bottom/right to 513 with the mean colour,
goes through the MSC network (scales 1, 0.75, 0.5, max-fused), and its 65x65 logits are upsampled
x8 (Caffe Interp) and cropped back to the image; `--full-image` feeds the unpadded image instead.
Scores come from one confusion matrix over the whole split (metrics.py).

Outputs, all in one folder (default: `<run>/eval_<split>/` beside the checkpoint):
  logits/<id>.npz      the network's logits, float16 at 1/8 resolution (logit_cache.py); the CRF,
                       the CRF search and later runs reuse them instead of recomputing the network
  logits/cache.json    what made them (checkpoint sha256, MSC scales, resize, input
                       normalisation, precision, protocol): a cache made otherwise is recomputed
  pred/<id>.png        predicted labels as VOC palette PNGs (pred_crf/ with --crf)
  scores.json          pixel acc, mean class acc, per-class IoU, mIoU, fwIoU (+ trimap bands)
  scores_crf.json      the same after the CRF (with --crf)
  per_class.txt        the printed per-class table(s)
  config.json          the resolved arguments and the predictor's settings

Evaluation runs in one process (call it on rank 0 after distributed training); the network
uses the GPU when there is one, the CRF uses `--workers` processes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config import DEFAULTS

CACHE_INFO = "cache.json"
CACHE_KEYS = ("identity", "msc_scales", "interp", "norm", "precision", "mode", "pad_to",
              "num_classes")


class EvaluationError(RuntimeError):
    """Evaluation could not produce complete scores (e.g. the CRF failed on some images)."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def default_out_dir(checkpoint, split: str) -> Path:
    """`<run>/eval_<split>/`: beside the run folder of `<run>/checkpoints/x.pth`, else beside
    the checkpoint file."""
    parent = Path(checkpoint).resolve().parent
    run = parent.parent if parent.name == "checkpoints" else parent
    return run / f"eval_{split}"


def json_safe(value):
    """NaN/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def warn_trained_on(ckpt: dict | None, split: str) -> bool:
    """Loud warning when the checkpoint saw the split it is scored on (convert.py's check)."""
    if not ckpt:
        return False
    try:
        from convert import warn_if_trained_on
    except ImportError:
        trained_on = ckpt.get("trained_on")
        contents = {"trainval": {"train", "val"}, "train_aug": {"train"}}
        overlap = contents.get(trained_on, {trained_on}) & contents.get(split, {split})
        if trained_on and overlap:
            print(f"WARNING: the weights were trained on {trained_on!r}, which contains the "
                  f"images of {split!r}: these scores are not a result.", file=sys.stderr)
        return bool(trained_on and overlap)
    return warn_if_trained_on(ckpt, split)


def make_predictor(checkpoint_or_model, precision: str, device, norm):
    from inference import Predictor
    if isinstance(checkpoint_or_model, Predictor):
        return checkpoint_or_model
    return Predictor(checkpoint_or_model, device=device, precision=precision, norm=norm)


def prepare_cache(cache_dir: Path, key: dict, recompute: bool) -> None:
    """Keep the cached logits only if cache.json says the same settings made them; otherwise
    (or with recompute) delete them and write the new cache.json."""
    info = cache_dir / CACHE_INFO
    old = None
    if info.is_file():
        try:
            old = json.loads(info.read_text())
        except ValueError:
            old = None
    stale = list(cache_dir.glob("*.npz"))
    if old != key or recompute:
        if stale:
            why = ("--recompute" if recompute else
                   "it was made by another checkpoint or other settings" if old else
                   f"it has no readable {CACHE_INFO}")
            print(f"logit cache {cache_dir}: recomputing {len(stale)} files ({why})",
                  file=sys.stderr)
            for p in stale:
                p.unlink()
        write_json(info, key)


def scores_summary(scores: dict, title: str) -> str:
    return f"mIoU ({title}): {100 * scores['miou']:.2f}%"


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(checkpoint_or_model, data_root, split: str = "val", out_dir=None, mode: str = "voc",
             pad_to: int = 513, crf: bool = False, crf_params=None, crf_workers: int = 0,
             crf_backend: str = "pydensecrf", precision: str = "fp32", device="auto",
             trimap_widths=None, limit: int | None = None, num_classes: int = 21, norm=None,
             show_progress: bool = True, recompute: bool = False, num_workers: int = 0,
             save_predictions: bool = True) -> dict:
    """Score a model on `split` of the VOC-layout data set under `data_root`.

    checkpoint_or_model: a checkpoint path, a checkpoint dict, a model, or an inference.Predictor.
    Returns the scores of metrics.ConfusionMatrix.scores() plus run facts (split, num_images,
    protocol, ...), "trimap" when `trimap_widths` are given, and "crf" (the CRF's scores) when
    `crf`. Writes the files listed in the module docstring into `out_dir`.
    """
    from crf import CRFJob, CRFParams, run_crf
    from datasets import VOCSegmentation
    from inference import class_names
    from labels import load_label, save_label_png
    from logit_cache import cache_path, full_resolution_logits, load_logits, save_logits
    from logit_cache import LogitCacheError
    from metrics import ConfusionMatrix, TrimapEvaluator, format_table
    from transforms import EvalTransform

    if mode not in ("voc", "full"):
        raise ValueError(f"mode must be 'voc' or 'full', got {mode!r}")
    if out_dir is None:
        if not isinstance(checkpoint_or_model, (str, Path)):
            raise ValueError("out_dir is required when evaluating an in-memory model")
        out_dir = default_out_dir(checkpoint_or_model, split)
    out_dir = Path(out_dir)
    cache_dir = out_dir / "logits"
    if isinstance(crf_params, (str, Path)):
        crf_params = CRFParams.from_json(crf_params)
    elif isinstance(crf_params, dict):
        crf_params = CRFParams(**crf_params)
    crf_params = crf_params or CRFParams()

    predictor = make_predictor(checkpoint_or_model, precision, device, norm)
    if predictor.num_classes != num_classes:
        raise ValueError(f"the model predicts {predictor.num_classes} classes but num_classes="
                         f"{num_classes}: score it with num_classes={predictor.num_classes}")
    warn_trained_on(predictor.checkpoint, split)
    names = class_names(num_classes)

    transform = EvalTransform(mode=mode, pad_to=pad_to, norm=predictor.norm)
    dataset = VOCSegmentation(data_root, split, transform=transform, num_classes=num_classes)
    indices = list(range(len(dataset)))[:limit] if limit is not None else list(range(len(dataset)))
    source = (str(checkpoint_or_model) if isinstance(checkpoint_or_model, (str, Path))
              else "in-memory model")
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = predictor.settings()
    key = {k: v for k, v in dict(settings, mode=mode, pad_to=pad_to,
                                 num_classes=num_classes).items() if k in CACHE_KEYS}
    prepare_cache(cache_dir, key, recompute)
    config = dict(checkpoint=source, data_root=str(data_root), split=split, out_dir=str(out_dir),
                  mode=mode, pad_to=pad_to, crf=crf, crf_params=crf_params.to_dict(),
                  crf_workers=crf_workers, crf_backend=crf_backend, precision=predictor.precision,
                  device=str(predictor.device), trimap_widths=trimap_widths, limit=limit,
                  num_classes=num_classes, norm=predictor.norm, num_workers=num_workers,
                  predictor=settings)
    write_json(out_dir / "config.json", config)

    # 1. logits: the network runs only for images whose cache file is missing, unreadable, or
    #    for an image of another size than the label's (the data set changed under the cache)
    cached = set()
    for i in indices:
        path = cache_path(cache_dir, dataset.ids[i])
        if not path.is_file():
            continue
        try:
            _, _, size = load_logits(path)
        except LogitCacheError as e:
            print(f"{e} Recomputing it.", file=sys.stderr)
            continue
        with Image.open(dataset.label_path(i)) as label_file:
            label_size = (label_file.height, label_file.width)
        if size == label_size:
            cached.add(i)
        else:
            print(f"cached logits {path} are for a {size[0]}x{size[1]} image but the label "
                  f"{dataset.label_path(i)} is {label_size[0]}x{label_size[1]}: recomputing",
                  file=sys.stderr)
    missing = [i for i in indices if i not in cached]
    started = time.perf_counter()
    if missing:
        loader = _loader(dataset, missing, num_workers)
        for sample in tqdm(loader, total=len(missing), desc=f"network ({split})", unit="img",
                           disable=not show_progress):
            logits = predictor.logits(sample["image"])
            save_logits(cache_path(cache_dir, sample["id"]), logits,
                        tuple(sample["image"].shape[-2:]), tuple(int(s) for s in sample["size"]))
    network_seconds = time.perf_counter() - started

    # 2. scores from the cached logits (so a fresh run and a cached one score the same numbers)
    confusion = ConfusionMatrix(num_classes)
    trimap = TrimapEvaluator(trimap_widths, num_classes) if trimap_widths else None
    for i in tqdm(indices, desc=f"scoring ({split})", unit="img", disable=not show_progress):
        image_id = dataset.ids[i]
        logits, input_size, size = load_logits(cache_path(cache_dir, image_id))
        gt = load_label(dataset.label_path(i), image_size=size, num_classes=num_classes)
        pred = full_resolution_logits(logits, input_size, size, predictor.interp).argmax(0)
        pred = pred.to(torch.uint8).numpy()
        confusion.update(pred, gt)
        if trimap is not None:
            trimap.update(pred, gt)
        if save_predictions:
            save_label_png(out_dir / "pred" / f"{image_id}.png", pred)

    facts = dict(split=split, num_images=len(indices), checkpoint=source,
                 identity=predictor.identity, mode=mode, pad_to=pad_to,
                 msc_scales=list(predictor.msc_scales), interp=predictor.interp,
                 norm=predictor.norm, precision=predictor.precision,
                 network_images=len(missing), network_seconds=round(network_seconds, 3),
                 class_names=names)
    scores = dict(confusion.scores(), **facts)
    if trimap is not None:
        scores["trimap"] = trimap.scores()
    write_json(out_dir / "scores.json", scores)
    report = [f"{split} ({len(indices)} images, {mode} protocol, {predictor.precision})",
              format_table(scores, names), scores_summary(scores, "no CRF")]

    # 3. stage two: the dense CRF on the cached logits, in worker processes
    if crf:
        jobs = [CRFJob(dataset.ids[i], str(dataset.image_path(i)),
                       str(cache_path(cache_dir, dataset.ids[i])),
                       str(out_dir / "pred_crf" / f"{dataset.ids[i]}.png") if save_predictions
                       else None, str(dataset.label_path(i))) for i in indices]
        crf_device = str(predictor.device) if crf_backend == "torch" else "cpu"
        results, failures = run_crf(jobs, crf_params, workers=crf_workers or None,
                                    backend=crf_backend, device=crf_device,
                                    interp=predictor.interp, trimap_widths=trimap_widths,
                                    progress=show_progress, desc=f"CRF ({split})")
        if failures:
            lines = "\n".join(f"  {f.image_id}: {f.error}" for f in failures)
            raise EvaluationError(f"the CRF failed on {len(failures)} of {len(jobs)} images, so "
                                  f"no CRF scores were written:\n{lines}")
        crf_confusion = ConfusionMatrix(num_classes)
        crf_trimap = TrimapEvaluator(trimap_widths, num_classes) if trimap_widths else None
        for r in results:
            crf_confusion.merge(r.confusion)
            if crf_trimap is not None:
                crf_trimap.merge(r.trimap)
        crf_scores = dict(crf_confusion.scores(), **facts, crf_params=crf_params.to_dict(),
                          crf_backend=crf_backend)
        if crf_trimap is not None:
            crf_scores["trimap"] = crf_trimap.scores()
        write_json(out_dir / "scores_crf.json", crf_scores)
        scores["crf"] = crf_scores
        report += ["", f"{split} with the dense CRF ({crf_backend}, {crf_params.iterations} "
                       "mean-field iterations)",
                   format_table(crf_scores, names), scores_summary(crf_scores, "CRF")]

    text = "\n".join(report)
    (out_dir / "per_class.txt").write_text(text + "\n")
    print(text)
    return scores


def _loader(dataset, indices, num_workers: int):
    """Samples of `dataset` at `indices`, one at a time (images differ in size)."""
    from torch.utils.data import Subset
    from loaders import eval_loader
    return eval_loader(Subset(dataset, indices), num_workers=num_workers)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    d, e, r = DEFAULTS["data"], DEFAULTS["eval"], DEFAULTS["run"]
    p = argparse.ArgumentParser(
        description="Score a DeepLab v2 checkpoint on a VOC split: MSC inference with the VOC "
                    "protocol (pad to 513), cached logits, scores.json and a per-class table; "
                    "--crf adds the dense CRF (stage two).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a deeplab-v2 checkpoint (.pth)")
    p.add_argument("--data-root", default=d["root"], help="folder that contains VOCdevkit/")
    p.add_argument("--split", default=d["val_split"], help="ImageSets/Segmentation/<split>.txt")
    p.add_argument("--out", help="output folder (default: <run>/eval_<split>/ beside the "
                                 "checkpoint)")
    p.add_argument("--full-image", action="store_true",
                   help="feed whole images instead of the VOC protocol's pad to --pad-to")
    p.add_argument("--pad-to", type=int, default=e["pad_to"], help="VOC protocol pad size")
    p.add_argument("--crf", action="store_true", help="also score after the dense CRF")
    p.add_argument("--crf-params", help="CRF parameter JSON (crf.py search's best.json); "
                                        "default: the paper's ResNet-101 values")
    p.add_argument("--crf-backend", default="pydensecrf", choices=("pydensecrf", "torch"))
    p.add_argument("--workers", type=int, default=e["crf_workers"],
                   help="CRF worker processes (0 = all cores)")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="image-loading worker processes for the network pass")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast on CUDA / CPUs with AVX512-BF16 or AMX (~99.5%% of "
                        "pixels agree with fp32)")
    p.add_argument("--device", default=r["device"], help="auto | cpu | cuda | cuda:N")
    p.add_argument("--trimap", type=int, nargs="+", metavar="W",
                   help="also score the trimap bands of these widths (px), e.g. 1 2 4 8 16 32")
    p.add_argument("--limit", type=int, help="only the first N images of the split")
    p.add_argument("--num-classes", type=int, default=d["num_classes"])
    p.add_argument("--norm", choices=("caffe", "imagenet"),
                   help="input normalisation (default: the checkpoint's input_norm)")
    p.add_argument("--recompute", action="store_true",
                   help="ignore cached logits and run the network on every image")
    p.add_argument("--no-save-pred", action="store_true",
                   help="do not write the predicted label PNGs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from checkpoint import CheckpointError
    from labels import DataError
    try:
        evaluate(args.checkpoint, args.data_root, split=args.split, out_dir=args.out,
                 mode="full" if args.full_image else "voc", pad_to=args.pad_to, crf=args.crf,
                 crf_params=args.crf_params, crf_workers=args.workers,
                 crf_backend=args.crf_backend, precision=args.precision, device=args.device,
                 trimap_widths=args.trimap, limit=args.limit, num_classes=args.num_classes,
                 norm=args.norm, recompute=args.recompute, num_workers=args.loader_workers,
                 save_predictions=not args.no_save_pred)
    except (CheckpointError, DataError, EvaluationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
