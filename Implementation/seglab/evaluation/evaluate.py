"""Evaluation on a split: inference with the model's own recipe, a logit cache, scores, and
optionally the dense CRF (stage two) on the cached logits.

The recipe (scales, fusion, resizing, protocol, input normalisation) is the checkpoint's unless
the settings give one (seglab/recipe.py); it is printed in one line and saved in scores.json.
DeepLab v2's: each image is padded bottom/right to 513 with the mean colour (`eval.mode=voc`; a
larger image to the next size the output stride divides), goes through the network (MSC: scales
1, 0.75, 0.5, max-fused), and its logits are upsampled to the padded size (Caffe Interp) and
cropped back to the image; `eval.mode=full` feeds the unpadded image instead. Scores come from
one confusion matrix over the whole split (seglab/data/metrics.py); class names and colours are the
checkpoint's.

Outputs, all in one folder (default: `<run>/eval_<split>/` beside the checkpoint):
  logits/<id>.npz      the network's logits, float16 at the output stride (data/logit_cache.py); the
                       CRF, the CRF search and later runs reuse them instead of recomputing
  logits/cache.json    what made them (checkpoint sha256, MSC scales, resize, input
                       normalisation, precision, protocol): a cache made otherwise is recomputed
  pred/<id>.png        predicted labels as VOC palette PNGs (pred_crf/ with the CRF)
  scores.json          pixel acc, mean class acc, per-class IoU, mIoU, fwIoU (+ trimap bands)
  scores_crf.json      the same after the CRF
  per_class.txt        the printed per-class table(s)
  config.json          the resolved settings and the predictor's
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from seglab.data.labels import save_label_png
from seglab.data.loaders import eval_loader
from seglab.data.protocols import PROTOCOLS, protocol_label, protocol_size
from seglab.data.registry import eval_dataset, resolve_num_classes
from seglab.data.transforms import EvalTransform
from seglab.densecrf.params import CRFParams, crf_params_from_config, is_torch_backend
from seglab.densecrf.runner import CRFJob, CRFStream
from seglab.atomic import write_json
from seglab.data.logit_cache import (CACHE_KEYS, cache_path, cached_indices,
                                           load_logits, prepare_cache, save_logits)
from seglab.data.metrics import ConfusionMatrix, TrimapEvaluator, format_table
from seglab.inference.predictor import Predictor
from seglab.deploy import load_predictor  # .onnx files (export.py) run through OnnxPredictor
from seglab.models.resize import full_resolution_logits
from seglab.recipe import explicit_recipe
from seglab.weights.provenance import warn_if_trained_on

class EvaluationError(RuntimeError):
    """Evaluation could not produce complete scores (e.g. the CRF failed on some images)."""


@dataclasses.dataclass
class EvalSettings:
    """Everything an evaluation run needs besides the model: one object, made from the config
    (`from_config`) by every script, or directly in code and tests."""
    data_root: str = "data"
    split: str = "val"
    num_classes: int = 0                 # 0: the data set's own
    dataset: str = "voc"
    # The recipe: None takes the checkpoint's, else its architecture's (seglab/recipe.py)
    mode: str | None = None              # voc | full | torchvision | vainf
    pad_to: int | None = None            # the voc protocol's padded size
    precision: str = "fp32"
    device: str = "auto"
    norm: str | None = None              # input normalisation
    msc_scales: tuple | None = None      # () = single scale
    interp: str | None = None            # caffe | pytorch
    flip: bool = False                   # also the mirrored image, max-fused
    msc_fusion: str | None = None        # max (the paper) | mean (of the class probabilities)
    trimap_widths: tuple | None = None
    limit: int | None = None
    loader_workers: int = 0
    save_predictions: bool = True
    recompute: bool = False
    crf: bool = False
    crf_params: CRFParams = dataclasses.field(default_factory=CRFParams)
    crf_backend: str = "pydensecrf"
    crf_workers: int = 0                 # 0: all cores
    crf_stream: bool = False             # CRF beside the network pass (needs spare cores)

    def __post_init__(self):
        if self.mode is not None and self.mode not in PROTOCOLS:
            raise ValueError(f"mode must be one of {PROTOCOLS}, got {self.mode!r}")

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "EvalSettings":
        d, e, c = cfg["data"], cfg["eval"], cfg["crf"]
        given = explicit_recipe(cfg)     # the settings the config states; None: the model's
        scales = given.get("msc_scales")
        settings = cls(data_root=d["root"], split=d["val_split"], num_classes=d["num_classes"],
                       dataset=d.get("dataset", "voc"), mode=given.get("mode"),
                       pad_to=given.get("pad_to"), precision=e["precision"],
                       device=cfg["run"]["device"], norm=given.get("norm"),
                       msc_scales=None if scales is None else tuple(scales),
                       interp=given.get("interp"), msc_fusion=given.get("msc_fusion"),
                       trimap_widths=tuple(e["trimap"]) or None, limit=e["limit"] or None,
                       loader_workers=e["loader_workers"],
                       save_predictions=e["save_predictions"], recompute=e["recompute"],
                       flip=e["flip"], crf=e["crf"],
                       crf_params=crf_params_from_config(c),
                       crf_backend=c["backend"], crf_workers=c["workers"],
                       crf_stream=c["stream"])
        return dataclasses.replace(settings, **overrides)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), crf_params=self.crf_params.to_dict())


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def default_out_dir(checkpoint, split: str) -> Path:
    """`<run>/eval_<split>/`: beside the run folder of `<run>/checkpoints/x.pth`, else beside
    the checkpoint file."""
    parent = Path(checkpoint).resolve().parent
    run = parent.parent if parent.name == "checkpoints" else parent
    return run / f"eval_{split}"


# ---------------------------------------------------------------------------------------------
# The three passes: network, scores, CRF
# ---------------------------------------------------------------------------------------------

def network_pass(predictor, dataset, missing, cache_dir, s: EvalSettings, progress,
                 on_cached=None) -> float:
    """Run the network on the images in `missing` and cache their logits, calling
    `on_cached(image_id)` after each; returns seconds."""
    started = time.perf_counter()
    if missing:
        loader = eval_loader(Subset(dataset, missing), num_workers=s.loader_workers)
        for sample in tqdm(loader, total=len(missing), desc=f"network ({s.split})", unit="img",
                           disable=not progress):
            logits = predictor.logits(sample["image"])
            if not torch.isfinite(logits).all():
                raise EvaluationError(f"the network produced non-finite logits for image "
                                      f"{sample['id']}: the weights are broken (NaN/Inf); no "
                                      "scores were written")
            save_logits(cache_path(cache_dir, sample["id"]), logits,
                        tuple(sample["image"].shape[-2:]),
                        protocol_size(s.mode, [int(v) for v in sample["size"]]))
            if on_cached is not None:
                on_cached(sample["id"])
    return time.perf_counter() - started


def score_pass(dataset, indices, cache_dir, out_dir, predictor, s: EvalSettings, progress):
    """(confusion matrix, trimap evaluator or None) of the cached logits; the predicted label
    PNGs in the model's colours."""
    interp = predictor.interp
    confusion = ConfusionMatrix(s.num_classes)
    trimap = TrimapEvaluator(s.trimap_widths, s.num_classes) if s.trimap_widths else None
    for i in tqdm(indices, desc=f"scoring ({s.split})", unit="img", disable=not progress):
        image_id = dataset.ids[i]
        logits, input_size, size = load_logits(cache_path(cache_dir, image_id))
        gt = protocol_label(s.mode, dataset.load_label(i))
        if gt.shape != tuple(size):
            raise EvaluationError(f"label {dataset.label_path(i)} is {gt.shape} under the "
                                  f"{s.mode!r} protocol, its cached logits {tuple(size)}")
        pred = full_resolution_logits(logits, input_size, size, interp).argmax(0)
        pred = pred.to(torch.uint8).numpy()
        confusion.update(pred, gt)
        if trimap is not None:
            trimap.update(pred, gt)
        if s.save_predictions:
            save_label_png(out_dir / "pred" / f"{image_id}.png", pred, predictor.palette)
    return confusion, trimap


def crf_stream(dataset, out_dir, cache_dir, predictor, s: EvalSettings, progress):
    """(a CRFStream for this evaluation, submit(image_id)): the CRF of each image starts as soon
    as its logits are cached, while the network works on the next images."""
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    stream = CRFStream(s.crf_params, s.crf_workers or None, s.crf_backend,
                       str(predictor.device) if is_torch_backend(s.crf_backend) else "cpu",
                       predictor.interp, s.trimap_widths, progress, desc=f"CRF ({s.split})",
                       mode=s.mode, palette=predictor.palette)

    def submit(image_id: str) -> None:
        i = index[image_id]
        stream.submit(CRFJob(image_id, str(dataset.image_path(i)),
                             str(cache_path(cache_dir, image_id)),
                             str(out_dir / "pred_crf" / f"{image_id}.png")
                             if s.save_predictions else None, str(dataset.label_path(i))))
    return stream, submit


def crf_scores_of(stream, s: EvalSettings):
    """(confusion matrix, trimap evaluator or None) once every CRF job is done."""
    results, failures = stream.finish()
    if failures:
        lines = "\n".join(f"  {f.image_id}: {f.error}" for f in failures)
        raise EvaluationError(f"the CRF failed on {len(failures)} of "
                              f"{len(results) + len(failures)} images, so no CRF scores were "
                              f"written:\n{lines}")
    confusion = ConfusionMatrix(s.num_classes)
    trimap = TrimapEvaluator(s.trimap_widths, s.num_classes) if s.trimap_widths else None
    for r in results:
        confusion.merge(r.confusion)
        if trimap is not None:
            trimap.merge(r.trimap)
    return confusion, trimap


def scores_of(confusion, trimap, facts: dict) -> dict:
    scores = dict(confusion.scores(), **facts)
    if trimap is not None:
        scores["trimap"] = trimap.scores()
    return scores


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

def make_predictor(checkpoint_or_model, s: EvalSettings):
    """(the Predictor (or ONNX predictor) for the settings, checked against the data set; the
    settings with the recipe it resolved and the data set's class count filled in)."""
    predictor = (checkpoint_or_model if isinstance(checkpoint_or_model, Predictor) else
                 load_predictor(checkpoint_or_model, device=s.device, precision=s.precision,
                                norm=s.norm, msc_scales=s.msc_scales, interp=s.interp,
                                flip=s.flip, msc_fusion=s.msc_fusion, mode=s.mode,
                                pad_to=s.pad_to))
    s = dataclasses.replace(s, mode=predictor.mode, pad_to=predictor.pad_to,
                            num_classes=resolve_num_classes(s.dataset, s.data_root,
                                                            s.num_classes))
    if predictor.num_classes != s.num_classes:
        raise EvaluationError(f"the model predicts {predictor.num_classes} classes but the data "
                              f"set has {s.num_classes}: score it with "
                              f"data.num_classes={predictor.num_classes}")
    if predictor.checkpoint:
        warn_if_trained_on(predictor.checkpoint, s.split)
    print(predictor.describe(), file=sys.stderr)
    return predictor, s


def open_split(predictor, s: EvalSettings):
    """(data set with the evaluation transform, the indices to score)."""
    transform = EvalTransform(mode=s.mode, pad_to=s.pad_to, norm=predictor.norm,
                              stride=predictor.output_stride)
    dataset = eval_dataset(s, transform)
    indices = list(range(len(dataset)))[:s.limit] if s.limit else list(range(len(dataset)))
    if not indices:
        raise EvaluationError(f"the {s.split!r} split of {s.data_root} is empty: nothing to "
                              "score. Check the split list.")
    return dataset, indices


def run_network(predictor, dataset, indices, cache_dir, out_dir, s: EvalSettings, progress):
    """Cache the logits of every image (network pass for those not cached), streaming each
    image into the CRF as soon as its logits exist. Returns (CRF stream or None, images the
    network ran on, seconds)."""
    cached = cached_indices(dataset, indices, cache_dir, s.mode)
    missing = [i for i in indices if i not in cached]
    if not s.crf_stream:  # the network pass first, then the CRF on every core
        seconds = network_pass(predictor, dataset, missing, cache_dir, s, progress)
        stream, submit = (crf_stream(dataset, out_dir, cache_dir, predictor, s, progress)
                          if s.crf else (None, None))
        for i in indices if s.crf else ():
            submit(dataset.ids[i])
        return stream, len(missing), seconds
    stream, submit = (crf_stream(dataset, out_dir, cache_dir, predictor, s, progress)
                      if s.crf else (None, None))
    try:
        for i in indices:
            if i in cached and submit is not None:
                submit(dataset.ids[i])
        seconds = network_pass(predictor, dataset, missing, cache_dir, s, progress, submit)
    except BaseException:
        if stream is not None:
            stream.abort()
        raise
    return stream, len(missing), seconds


def evaluate(checkpoint_or_model, settings: EvalSettings | None = None, out_dir=None,
             show_progress: bool = True) -> dict:
    """Score a model on `settings.split` of its data set.

    checkpoint_or_model: a checkpoint path, a checkpoint dict, a model, or a Predictor.
    Returns the scores of metrics.ConfusionMatrix.scores() plus run facts (split, num_images,
    protocol, ...), "trimap" when trimap widths are given, and "crf" (the CRF's scores) with
    `settings.crf`. Writes the files listed in the module docstring into `out_dir`.
    """
    s = settings or EvalSettings()
    if out_dir is None:
        if not isinstance(checkpoint_or_model, (str, Path)):
            raise ValueError("out_dir is required when evaluating an in-memory model")
        out_dir = default_out_dir(checkpoint_or_model, s.split)
    out_dir, cache_dir = Path(out_dir), Path(out_dir) / "logits"
    predictor, s = make_predictor(checkpoint_or_model, s)
    dataset, indices = open_split(predictor, s)
    source = (str(checkpoint_or_model) if isinstance(checkpoint_or_model, (str, Path))
              else "in-memory model")
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = {k: v for k, v in dict(predictor.settings(), mode=s.mode, pad_to=s.pad_to,
                                 num_classes=s.num_classes).items() if k in CACHE_KEYS}
    prepare_cache(cache_dir, key, s.recompute)
    write_json(out_dir / "config.json", dict(s.to_dict(), checkpoint=source, out_dir=str(out_dir),
                                             precision=predictor.precision,
                                             device=str(predictor.device),
                                             norm=predictor.norm, predictor=predictor.settings()))
    stream, ran, seconds = run_network(predictor, dataset, indices, cache_dir, out_dir, s,
                                       show_progress)
    names = predictor.classes
    facts = dict(split=s.split, num_images=len(indices), checkpoint=source,
                 identity=predictor.identity, mode=s.mode, pad_to=s.pad_to,
                 msc_scales=list(predictor.msc_scales), interp=predictor.interp,
                 norm=predictor.norm, precision=predictor.precision,
                 recipe=dict(predictor.recipe, sources=predictor.recipe_sources),
                 network_images=ran, network_seconds=round(seconds, 3), class_names=names)
    scores = scores_of(*score_pass(dataset, indices, cache_dir, out_dir, predictor, s,
                                   show_progress), facts)
    write_json(out_dir / "scores.json", scores)
    report = [f"{s.split} ({len(indices)} images, {s.mode} protocol, {predictor.precision})",
              format_table(scores, names), f"mIoU (no CRF): {100 * scores['miou']:.2f}%"]
    if s.crf:
        scores["crf"] = scores_of(*crf_scores_of(stream, s),
                                  dict(facts, crf_params=s.crf_params.to_dict(),
                                       crf_backend=s.crf_backend))
        write_json(out_dir / "scores_crf.json", scores["crf"])
        report += ["", f"{s.split} with the dense CRF ({s.crf_backend}, "
                       f"{s.crf_params.iterations} mean-field iterations)",
                   format_table(scores["crf"], names),
                   f"mIoU (CRF): {100 * scores['crf']['miou']:.2f}%"]
    text = "\n".join(report)
    (out_dir / "per_class.txt").write_text(text + "\n")
    print(text)
    return scores
