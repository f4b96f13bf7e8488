"""Figure (d), crf_iterations.png: the fully connected CRF (DeepLab v2, Chen et al., Section 3.3;
Krähenbühl & Koltun 2011) iteration by iteration: image, DCNN output, the CRF's labels after 1, 5
and 10 mean-field iterations, ground truth.

  crf_labels   the CRF's labels after a given number of iterations (seglab.densecrf.DenseCRF)
  crf_figure   the figure for any RGB image, its label map or None (a photograph), and the
               network's logits at the image size (a run's logit cache, or msc.msc_predict)
  fig_crf      the figure of a run: the val image (of a few) where 10 iterations raise the pixel
               accuracy most, from the run's cached logits and its CRF parameters
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from seglab.data.images import load_image
from seglab.densecrf.dense_crf import DenseCRF
from seglab.densecrf.params import CRFParams
from seglab.figures.run import CANDIDATES, FigureError, Run, cached_full_logits, label_of
from seglab.figures.style import (accuracy_line, colourise, image_row, label_legend,
                                  pixel_accuracy, save, set_style, show_row)

NAME = "crf_iterations.png"
ITERATIONS = (1, 5, 10)


def crf_labels(image, logits, params, iterations: int, backend: str) -> np.ndarray:
    crf = DenseCRF(dataclasses.replace(params, iterations=iterations), backend=backend)
    return crf(image, logits).argmax(0).astype(np.uint8)


def draw_crf(image: np.ndarray, label: np.ndarray | None, dcnn: np.ndarray, steps: dict,
             params: CRFParams, backend: str, out: Path, title: str = "image",
             name: str = NAME) -> Path:
    """The row: image, DCNN labels, the CRF's labels after each number of iterations in `steps`
    ({iterations: labels}), and the ground truth when `label` is given (panel titles then quote
    each prediction's pixel accuracy)."""
    set_style()
    fig, axes, legend_y = image_row(len(steps) + 2 + (label is not None), image.shape[:2])
    panels = [(title, image),
              (f"DCNN output{accuracy_line(dcnn, label)}", colourise(dcnn))]
    for k, labels in steps.items():
        changed = 100 * float((labels != dcnn).mean())
        panels.append((f"CRF, {k} iteration{'s' if k > 1 else ''}{accuracy_line(labels, label)}"
                       f"\n{changed:.1f}% of pixels changed", colourise(labels)))
    if label is not None:
        panels.append(("ground truth", colourise(label)))
    show_row(axes, panels)
    fig.suptitle(f"Fully connected CRF, mean field ({backend}): $w_{{bi}}$={params.bi_w:g}, "
                 f"$\\theta_\\alpha$={params.bi_xy_std:g}, $\\theta_\\beta$={params.bi_rgb_std:g}, "
                 f"$w_g$={params.pos_w:g}, $\\theta_\\gamma$={params.pos_xy_std:g}", y=0.995,
                 va="top")
    shown = [dcnn] + ([label] if label is not None else []) + list(steps.values())
    label_legend(fig, shown, legend_y)
    return save(fig, out, name)


def crf_figure(image: np.ndarray, label: np.ndarray | None, logits: torch.Tensor,
               params: CRFParams, backend: str, out: Path, title: str = "image",
               iterations=ITERATIONS, name: str = NAME) -> Path:
    """The CRF figure of any RGB uint8 image (with its label map, or None) from the network's
    logits (C, H, W) at the image size."""
    if tuple(logits.shape[1:]) != tuple(image.shape[:2]):
        raise FigureError(f"logits of size {tuple(logits.shape[1:])} do not fit the image of "
                          f"size {tuple(image.shape[:2])}: upsample them to the image first")
    dcnn = logits.argmax(0).numpy().astype(np.uint8)
    steps = {k: crf_labels(image, logits, params, k, backend) for k in iterations}
    return draw_crf(image, label, dcnn, steps, params, backend, out, title, name)


def fig_crf(run: Run, out: Path) -> Path:
    """Image, DCNN output, CRF after 1, 5 and 10 mean-field iterations, ground truth, on the
    val image (of a few) where 10 CRF iterations raise the pixel accuracy most."""
    params, backend, interp = run.crf_params(), run.crf_backend(), run.interp()
    last = ITERATIONS[-1]
    best = None
    for item in run.val_images(CANDIDATES):
        image = load_image(item["image_path"])
        logits = cached_full_logits(item, interp)
        if tuple(logits.shape[1:]) != image.shape[:2]:
            raise FigureError(f"cached logits {item['logits_path']} do not fit image "
                              f"{item['image_path']}: re-run evaluate.py with --recompute")
        gt = label_of(item, run.num_classes, image.shape[:2])
        dcnn = logits.argmax(0).numpy().astype(np.uint8)
        final = crf_labels(image, logits, params, last, backend)
        key = (pixel_accuracy(final, gt) - pixel_accuracy(dcnn, gt), float((final != dcnn).mean()))
        if best is None or key > best[0]:
            best = (key, item, image, logits, gt, dcnn, final)
    _, item, image, logits, gt, dcnn, final = best
    steps = {k: crf_labels(image, logits, params, k, backend) for k in ITERATIONS[:-1]}
    steps[last] = final
    return draw_crf(image, gt, dcnn, steps, params, backend, out, f"image\n({item['id']})")
