"""The paper's stage-two search (Sec. 4.1): the bilateral term on a grid, scored on val images.

Keep the Gaussian term fixed and grid-search w_bi in 3..6, theta_alpha in 30..100 (step 10) and
theta_beta in 3..6 on a seeded subset of 100 val images, reusing cached logits. The paper then
refines the step sizes around the first round's best values: run `search` again with finer lists.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random
from typing import Iterable

from seglab.densecrf.params import PAPER_GRID, CRFParams
from seglab.densecrf.runner import CRFFailure, CRFJob, iter_crf
from seglab.data.metrics import ConfusionMatrix


def search_grid(bi_w=PAPER_GRID["bi_w"], bi_xy_std=PAPER_GRID["bi_xy_std"],
                bi_rgb_std=PAPER_GRID["bi_rgb_std"],
                base: CRFParams | None = None) -> list[CRFParams]:
    """Every (w_bi, theta_alpha, theta_beta) setting, the rest (Gaussian term, iterations,
    normalisation) taken from `base`."""
    base = base or CRFParams()
    return [dataclasses.replace(base, bi_w=float(w), bi_xy_std=float(xy), bi_rgb_std=float(rgb))
            for w, xy, rgb in itertools.product(bi_w, bi_xy_std, bi_rgb_std)]


def pick_subset(ids: Iterable[str], num_images: int, seed: int = 0) -> list[str]:
    """The first `num_images` of a seeded shuffle of the sorted ids."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    return ids[:num_images]


def score_grid(image_jobs: list[CRFJob], settings: list[CRFParams], workers: int | None = None,
               backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
               progress: bool = True, mode: str = "voc"):
    """Run every setting, and the no-CRF baseline first, on every image (jobs must carry
    gt_path). Returns (candidates = [baseline] + settings, confusions[k][image_id],
    failures). Jobs are (image, setting) pairs, image-major, so a worker prepares each image
    once and the load stays balanced."""
    baseline_params = dataclasses.replace(settings[0] if settings else CRFParams(), iterations=0)
    candidates = [baseline_params] + list(settings)
    image_jobs = [job if isinstance(job, CRFJob) else CRFJob(*job) for job in image_jobs]
    if any(job.gt_path is None for job in image_jobs):
        raise ValueError("every search job needs a gt_path (the ground truth to score)")
    jobs = [job._replace(out_path=None, params=p, tag=k) for job in image_jobs
            for k, p in enumerate(candidates)]
    confusions: dict[int, dict] = {k: {} for k in range(len(candidates))}
    failures = []
    for _, out in iter_crf(jobs, None, workers, backend, device, interp, progress=progress,
                           desc=f"CRF search ({len(candidates)} settings incl. no CRF x "
                                f"{len(image_jobs)} images)", unit="run", mode=mode):
        if isinstance(out, CRFFailure):
            failures.append(out)
        else:
            confusions[out.tag][out.image_id] = out.confusion
    return candidates, confusions, failures


def pooled(confusions: dict, ids) -> ConfusionMatrix | None:
    """One confusion matrix over the images `ids` (those that were scored)."""
    found = [confusions[i] for i in ids if i in confusions]
    if not found:
        return None
    total = ConfusionMatrix(found[0].num_classes)
    for cm in found:
        total.merge(cm)
    return total


def score_row(params: CRFParams, cm: ConfusionMatrix | None, images: int) -> dict:
    s = cm.scores() if cm is not None else {}
    return dict(params.to_dict(), miou=s.get("miou", math.nan),
                pixel_acc=s.get("pixel_acc", math.nan),
                mean_class_acc=s.get("mean_class_acc", math.nan), images=images)


def search(image_jobs: list[CRFJob], settings: list[CRFParams], workers: int | None = None,
           backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
           progress: bool = True, grid=None) -> tuple[list[dict], dict, list[CRFFailure]]:
    """Score every setting on every image (jobs must carry gt_path).

    Returns (rows, baseline, failures): one row per setting, in `settings` order, with the
    parameters and mIoU / pixel acc / mean class acc / images scored; `baseline` the same
    scores without the CRF (0 iterations). `grid`: the result of score_grid, if already run."""
    candidates, confusions, failures = grid or score_grid(image_jobs, settings, workers, backend,
                                                          device, interp, progress)
    rows = [score_row(p, pooled(confusions[k], confusions[k]), len(confusions[k]))
            for k, p in enumerate(candidates)]
    return rows[1:], rows[0], failures


def cross_validate(candidates: list[CRFParams], confusions: dict, ids: list[str], folds: int,
                   seed: int = 0) -> dict:
    """K-fold cross-validation of the search, from per-image results: for each fold, the best
    setting on the other folds' images is scored on this fold's images only, so no image is
    scored with parameters tuned on it. Returns the pooled scores of the held-out predictions
    with and without the CRF, and each fold's chosen setting."""
    if not 2 <= folds <= len(ids):
        raise ValueError(f"--folds must be between 2 and the number of images ({len(ids)}), "
                         f"got {folds}")
    order = pick_subset(ids, len(ids), seed)
    parts = [order[f::folds] for f in range(folds)]
    held_out = ConfusionMatrix(next(iter(confusions[0].values())).num_classes)
    chosen = []
    for f, test in enumerate(parts):
        train = [i for g, part in enumerate(parts) if g != f for i in part]
        rows = [score_row(p, pooled(confusions[k], train), len(train))
                for k, p in enumerate(candidates) if k > 0]
        best = best_setting(rows)
        k = 1 + rows.index(best)
        cm = pooled(confusions[k], test)
        if cm is not None:
            held_out.merge(cm)
        chosen.append(dict(fold=f, tuned_on=len(train), scored_on=test, params=params_of(best)
                           .to_dict(), tuned_miou=best["miou"]))
    baseline = pooled(confusions[0], ids)
    return dict(folds=folds, seed=seed, crf=held_out.scores(), no_crf=baseline.scores(),
                chosen=chosen)


def best_setting(rows: list[dict]) -> dict:
    """The row with the highest mIoU (the first of equals, in grid order)."""
    scored = [r for r in rows if not math.isnan(r["miou"])]
    if not scored:
        raise RuntimeError("no setting could be scored: every CRF job failed (see failures.txt)")
    return max(scored, key=lambda r: r["miou"])


def params_of(row: dict) -> CRFParams:
    return CRFParams(**{f.name: row[f.name] for f in dataclasses.fields(CRFParams)})
