"""Stage two, learned: fit the dense CRF's weights and label compatibility by gradient descent.

The parameters that do not change the permutohedral lattice -- the bilateral weight w_bi, the
Gaussian weight w_pos and, optionally, a full symmetric C x C label compatibility (CRF-as-RNN,
Zheng et al. 2015) -- are fitted by minimising the cross-entropy of the mean-field marginals
after T iterations against the ground truth (label 255 ignored; each image's mean over its
valid pixels, then the mean over images), with Adam on the log-weights, full batch (every
fitting image each step: deterministic). The bandwidths (theta_alpha, theta_beta, theta_gamma)
change the lattice: they come from a small outer grid (`FIT_GRID`), one fit per setting, and
the setting whose fit scores the best mIoU on the fitting images wins (as the search picks).

Fitting runs on a copy of each image subsampled by `scale` (every scale-th pixel and row: the
colours stay real pixel colours; the kernels' pixel standard deviations are divided by `scale`),
so a step costs about 1/scale^2 of a full-resolution one; the learned parameters are then used
(and scored) at full resolution. `crf.py learn` is the command line; `learn_folds` the
cross-validation (each fold's images scored with parameters fitted on the other folds only).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from seglab.data.labels import IGNORE, load_label
from seglab.data.protocols import protocol_label
from seglab.densecrf.dense_crf import load_crf_inputs
from seglab.densecrf.params import CRFParams
from seglab.densecrf.search import pick_subset
from seglab.densecrf.torch_crf import (DifferentiableKernel, kernel_features,
                                       mean_field_differentiable)
from seglab.data.metrics import ConfusionMatrix

# The outer grid over the bandwidths (they change the lattice, so they are not learned): the
# paper's theta_alpha range 30..100 at three points, its theta_beta range 3..6 at two, and
# theta_gamma = 1 (the search's grid keeps the Gaussian term fixed too).
FIT_GRID = {"bi_xy_std": [40.0, 70.0, 100.0], "bi_rgb_std": [3.0, 5.0], "pos_xy_std": [1.0]}
MIN_WEIGHT = 1e-3       # a zero starting weight starts here (log-parametrised)


class FitImage(NamedTuple):
    """One image prepared for fitting, subsampled by `scale`: image (h, w, 3) uint8, unary
    (h*w, C) float32 energies, labels (h*w,) int64 (255 = ignore)."""
    image_id: str
    image: torch.Tensor
    unary: torch.Tensor
    labels: torch.Tensor
    shape: tuple


def prepare(image_id: str, image: np.ndarray, unary: np.ndarray, label: np.ndarray,
            scale: int = 1) -> FitImage:
    """A FitImage from the full-resolution image (H, W, 3), unary (C, H*W) and label (H, W)."""
    h, w = image.shape[:2]
    c = unary.shape[0]
    if label.shape != (h, w):
        raise ValueError(f"{image_id}: the label is {label.shape[1]}x{label.shape[0]} (WxH), "
                         f"the image {w}x{h}")
    sub = np.ascontiguousarray(image[::scale, ::scale])
    u = unary.reshape(c, h, w)[:, ::scale, ::scale]
    lab = label[::scale, ::scale].astype(np.int64)
    return FitImage(image_id, torch.from_numpy(sub),
                    torch.from_numpy(np.ascontiguousarray(u.reshape(c, -1).T)).float(),
                    torch.from_numpy(lab.reshape(-1)), sub.shape[:2])


def load_fit_image(image_id: str, image_path, logits_path, gt_path, scale: int = 1,
                   interp: str = "caffe", mode: str = "voc") -> FitImage:
    image, unary = load_crf_inputs(image_path, logits_path, interp, mode)
    label = protocol_label(mode, load_label(gt_path, num_classes=unary.shape[0]))
    return prepare(image_id, image, unary, label, scale)


class Setting(NamedTuple):
    bi_xy_std: float
    bi_rgb_std: float
    pos_xy_std: float


def fit_grid(bi_xy_std=None, bi_rgb_std=None, pos_xy_std=None) -> list[Setting]:
    return [Setting(float(a), float(b), float(g)) for a, b, g in itertools.product(
        bi_xy_std or FIT_GRID["bi_xy_std"], bi_rgb_std or FIT_GRID["bi_rgb_std"],
        pos_xy_std or FIT_GRID["pos_xy_std"])]


@dataclasses.dataclass
class FitOptions:
    compat: str = "potts"        # potts: learn w_bi, w_pos; full: also a symmetric C x C matrix
    steps: int = 10
    lr: float = 0.1              # Adam, on log-weights and on the matrix entries
    compat_l2: float = 1e-3      # full: penalty on |mu - Potts|^2 (mean over entries)
    scale: int = 4               # fit on images subsampled by this factor
    eval_every: int = 5          # val mIoU in the progress bar every this many steps
    seed: int = 0
    checkpoint: bool = True      # recompute the iterations in the backward pass (memory)

    def __post_init__(self):
        if self.compat not in ("potts", "full"):
            raise ValueError(f"compat must be 'potts' or 'full', got {self.compat!r}")
        for name in ("steps", "scale", "eval_every"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive whole number, got "
                                 f"{getattr(self, name)!r}")
        if not self.lr > 0 or not self.compat_l2 >= 0:
            raise ValueError(f"lr must be > 0 and compat_l2 >= 0, got {self.lr}, {self.compat_l2}")


class _Batch(NamedTuple):
    """Several images in one lattice (their features set apart by GAP standard deviations
    along x, so that no kernel reaches across: one pass filters them all, which saves the
    per-pass overhead that dominates at fitting sizes). pixel_weight: 1 / (the image's valid
    pixels x the number of images in the fit) on valid pixels, else 0."""
    unary: torch.Tensor
    labels: torch.Tensor        # indices into `classes` (255 = ignore)
    global_labels: torch.Tensor
    classes: torch.Tensor       # the labels kept (see _batches)
    pixel_weight: torch.Tensor
    kernels: list


GAP = 32.0                 # standard deviations between two images' features in a batch
BATCH_PIXELS = 400_000     # pixels per batch (memory: a few (N, C) floats per iteration)
KEEP_PROB = 1e-2           # a batch keeps the labels some pixel gives at least this, and its
                           # ground-truth labels: the others (Q ~ 0 everywhere: their messages
                           # are ~0) are left out of the fit, which costs time in proportion


def _batches(items, setting: Setting, params: CRFParams, scale: int, grad: bool,
             num_images: int) -> list[_Batch]:
    groups, group, size = [], [], 0
    for it in items:
        n = it.unary.shape[0]
        if group and size + n > BATCH_PIXELS:
            groups.append(group)
            group, size = [], 0
        group.append(it)
        size += n
    if group:
        groups.append(group)
    batches = []
    for group in groups:
        pos, bi, weight = [], [], []
        offset = [0.0, 0.0]
        for it in group:
            h, w = it.shape
            f_pos = kernel_features(h, w, setting.pos_xy_std / scale)
            f_bi = kernel_features(h, w, setting.bi_xy_std / scale, it.image, setting.bi_rgb_std)
            for k, f in enumerate((f_pos, f_bi)):
                f[:, 0] += offset[k]
                offset[k] = float(f[:, 0].max()) + GAP
            pos.append(f_pos)
            bi.append(f_bi)
            valid = it.labels != IGNORE
            weight.append(valid.float() / (max(int(valid.sum()), 1) * num_images))
        kernels = [DifferentiableKernel(torch.cat(f), params.normalization,
                                        build_transpose=grad) for f in (pos, bi)]
        unary, labels = torch.cat([it.unary for it in group]), torch.cat([it.labels for it in group])
        c = unary.shape[1]
        keep = unary.amin(0) <= -math.log(KEEP_PROB)
        keep[labels[labels != IGNORE].unique()] = True
        classes = keep.nonzero()[:, 0]
        local = torch.full((c + 1,), IGNORE, dtype=torch.long)
        local[classes] = torch.arange(classes.numel())
        batches.append(_Batch(unary[:, classes].contiguous(),
                              local[torch.where(labels == IGNORE, c, labels)], labels, classes,
                              torch.cat(weight), kernels))
    return batches


def batch_loss(log_q: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """This batch's share of the mean over images of each image's mean cross-entropy."""
    valid = batch.labels != IGNORE
    nll = -log_q[valid].gather(1, batch.labels[valid][:, None])[:, 0]
    return (nll * batch.pixel_weight[valid]).sum()


def _forward(batch: _Batch, weights, compat, iterations, checkpoint):
    if compat is not None:
        compat = compat.index_select(0, batch.classes).index_select(1, batch.classes)
    return mean_field_differentiable(batch.unary, batch.kernels, weights, compat, iterations,
                                     checkpoint=checkpoint)


def _predict(log_q: torch.Tensor, batch: _Batch) -> torch.Tensor:
    return batch.classes[log_q.argmax(1)]


def evaluate_fit(batches, weights, compat, iterations: int, num_classes: int):
    """(mean loss, pooled mIoU) of the current parameters on prepared batches, no gradients."""
    if not batches:
        return math.nan, math.nan
    cm = ConfusionMatrix(num_classes)
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            log_q = _forward(batch, weights, compat, iterations, False)
            total += float(batch_loss(log_q, batch))
            cm.update(_predict(log_q, batch), batch.global_labels)
    return total, cm.scores()["miou"]


def fit_setting(train: list[FitImage], setting: Setting, start: CRFParams, opts: FitOptions,
                val: list[FitImage] = (), on_step: Optional[Callable[[dict], None]] = None):
    """Fit the weights (and the compatibility) at one bandwidth setting. Returns (learned
    CRFParams, history: one dict per step: loss, fit_miou, val_miou (every eval_every steps))."""
    torch.manual_seed(opts.seed)
    c = train[0].unary.shape[1]
    prepared = _batches(train, setting, start, opts.scale, True, len(train))
    val_prepared = _batches(val, setting, start, opts.scale, False, len(val)) if val else []
    log_w = torch.tensor([math.log(max(start.pos_w, MIN_WEIGHT)),
                          math.log(max(start.bi_w, MIN_WEIGHT))], requires_grad=True)
    potts = torch.tensor(start.compat_matrix(c), dtype=torch.float32)
    free = [log_w]
    matrix = None
    if opts.compat == "full":
        matrix = potts.clone().requires_grad_(True)
        free.append(matrix)
    optimizer = torch.optim.Adam(free, lr=opts.lr)

    def current():
        mu = None if matrix is None else (matrix + matrix.t()) / 2
        return log_w.exp(), mu

    history = []
    best = None
    for step in range(opts.steps + 1):
        weights, mu = current()
        if step == opts.steps:                      # the last parameters, scored only
            fit_loss, fit_miou = evaluate_fit(prepared, weights, mu, start.iterations, c)
        else:
            optimizer.zero_grad(set_to_none=True)
            cm = ConfusionMatrix(c)
            fit_loss = 0.0
            for batch in prepared:                  # one graph per batch: bounded memory
                weights, mu = current()
                log_q = _forward(batch, weights, mu, start.iterations, opts.checkpoint)
                loss = batch_loss(log_q, batch)
                fit_loss += float(loss.detach())
                if mu is not None and opts.compat_l2:
                    loss = loss + opts.compat_l2 * (mu - potts).square().mean() / len(prepared)
                loss.backward()
                cm.update(_predict(log_q.detach(), batch), batch.global_labels)
            fit_miou = cm.scores()["miou"]
        val_miou = math.nan
        if val_prepared and (step % opts.eval_every == 0 or step == opts.steps):
            val_miou = evaluate_fit(val_prepared, *(t if t is None else t.detach()
                                                    for t in current()), start.iterations, c)[1]
        weights, mu = (t if t is None else t.detach() for t in current())
        row = dict(setting=setting._asdict(), step=step, loss=fit_loss, fit_miou=fit_miou,
                   val_miou=val_miou, pos_w=float(weights[0]), bi_w=float(weights[1]))
        history.append(row)
        if on_step:
            on_step(row)
        if best is None or fit_miou > best[0] or (fit_miou == best[0] and fit_loss < best[1]):
            best = (fit_miou, fit_loss, float(weights[1]), float(weights[0]),
                    None if mu is None else mu.numpy().astype(np.float64))
        if step < opts.steps:
            optimizer.step()
    _, loss, bi_w, pos_w, mu = best       # the step with the best fit mIoU (ties: lower loss)
    compat = None if mu is None else [[float(v) for v in row] for row in (mu + mu.T) / 2]
    learned = dataclasses.replace(start, bi_w=bi_w, pos_w=pos_w, compat=compat,
                                  bi_xy_std=setting.bi_xy_std, bi_rgb_std=setting.bi_rgb_std,
                                  pos_xy_std=setting.pos_xy_std)
    return learned, dict(fit_miou=best[0], loss=loss), history


class Task(NamedTuple):
    """One fit: `setting` on the `train` ids (val ids: shown in the progress, never used to
    choose). `key` groups the tasks whose best setting is picked together (a fold, or "all")."""
    key: str
    train: tuple
    val: tuple
    setting: Setting


_WORKER: dict = {}


def _init_worker(items, start, opts):
    torch.set_num_threads(1)
    _WORKER.update(items=items, start=start, opts=opts)


def _run_task(task: Task, on_step=None, state=None):
    state = state or _WORKER
    items = state["items"]
    tic = time.time()
    learned, best, history = fit_setting([items[i] for i in task.train], task.setting,
                                         state["start"], state["opts"],
                                         [items[i] for i in task.val], on_step)
    return task, dict(params=learned, fit_miou=best["fit_miou"], loss=best["loss"],
                      seconds=time.time() - tic), history


def run_tasks(tasks: list[Task], items: dict, start: CRFParams, opts: FitOptions,
              workers: int = 1, bar=None, log: Optional[Callable[[str, dict], None]] = None):
    """Run every fit; returns {key: (the learned params of its best setting (fit mIoU, ties:
    lower loss), [one summary dict per setting])}. workers > 1: tasks in "spawn" worker
    processes, one torch thread each (the bar then advances a task at a time); workers = 1:
    in this process, the bar advancing a step at a time with the loss and the val mIoU."""
    done: dict = {}
    shown = {"val": math.nan}

    def show(row, advance):
        if not math.isnan(row["val_miou"]):
            shown["val"] = row["val_miou"]
        if bar is not None:
            post = dict(xy=f"{row['setting']['bi_xy_std']:g}",
                        rgb=f"{row['setting']['bi_rgb_std']:g}", loss=f"{row['loss']:.4f}",
                        fit_miou=f"{100 * row['fit_miou']:.2f}", w_bi=f"{row['bi_w']:.2f}")
            if not math.isnan(shown["val"]):
                post["val_miou"] = f"{100 * shown['val']:.2f}"
            bar.set_postfix(post)
            bar.update(advance)

    def finished(task, result, history):
        done.setdefault(task.key, []).append(result)
        if log is not None:
            for row in history:
                log(task.key, row)

    if workers <= 1 or len(tasks) == 1:
        state = dict(items=items, start=start, opts=opts)
        for task in tasks:
            finished(*_run_task(task, lambda row: show(row, 1), state))
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker,
                      initargs=(items, start, opts)) as pool:
            for task, result, history in pool.imap_unordered(_run_task, tasks):
                last = [r for r in history if not math.isnan(r["val_miou"])]
                show(dict(history[-1], val_miou=last[-1]["val_miou"] if last else math.nan),
                     len(history))
                finished(task, result, history)
    order = {t: k for k, t in enumerate(tasks)}
    out = {}
    for key, results in done.items():
        results.sort(key=lambda r: order[next(t for t in tasks if t.key == key and
                                             t.setting == _setting_of(r["params"]))])
        winner = max(results, key=lambda r: (r["fit_miou"], -r["loss"]))
        out[key] = (winner["params"], results)
    return out


def _setting_of(params: CRFParams) -> Setting:
    return Setting(params.bi_xy_std, params.bi_rgb_std, params.pos_xy_std)


def fit(train: list[FitImage], start: CRFParams, opts: FitOptions, grid: list[Setting],
        val: list[FitImage] = (), bar=None, workers: int = 1):
    """Fit every bandwidth setting of `grid` on `train`; returns (the learned params of the
    setting with the best fit mIoU (ties: lower loss), one summary dict per setting)."""
    if not train:
        raise ValueError("no images to fit the CRF on")
    items = {it.image_id: it for it in list(train) + list(val)}
    tasks = [Task("all", tuple(it.image_id for it in train), tuple(it.image_id for it in val),
                  setting) for setting in grid]
    return run_tasks(tasks, items, start, opts, workers, bar)["all"]


def fold_parts(ids: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """The folds of `search.cross_validate` (same seed, same images in each fold)."""
    if not 2 <= folds <= len(ids):
        raise ValueError(f"--folds must be between 2 and the number of images ({len(ids)}), "
                         f"got {folds}")
    order = pick_subset(ids, len(ids), seed)
    return [order[f::folds] for f in range(folds)]
