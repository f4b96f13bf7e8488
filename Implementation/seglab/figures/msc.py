"""Figure (c), msc.png: multi-scale inputs (MSC, DeepLab v2, Chen et al., Section 3.2): one
network on the image at scales 1, 0.75 and 0.5, each branch's prediction, and their fusion by
element-wise max, next to the ground truth.

  msc_branches   MSC's own steps (seglab.models.msc.MSC.branch_logits / upsampled), kept apart
  msc_predict    one image through a network: every branch's and the fused prediction at the
                 image size, and the fused logits (which the CRF of figure (d) can read)
  msc_figure     the figure for any RGB image, its label map or None (a photograph), a network
  fig_msc        the figure of a run: the val image (of a few) where the branches disagree most
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from seglab.data.images import load_image
from seglab.data.transforms import EvalTransform
from seglab.figures.run import CANDIDATES, Run, label_of, load_trained_net
from seglab.figures.style import (accuracy_line, colourise, image_row, label_legend, save,
                                  set_style, show_row)
from seglab.models.msc import MSC
from seglab.models.resize import full_resolution_logits, scaled_size

NAME = "msc.png"


class MSCPrediction(NamedTuple):
    x: torch.Tensor                # the network input (3, H', W'): normalised, maybe padded
    logits: list                   # each branch's logits (1, C, h, w), 1x first
    labels: list                   # (H, W) uint8 of each branch, then of the fusion
    fused: torch.Tensor            # the fused logits at the image size (C, H, W)


def msc_branches(net, x: torch.Tensor, scales, interp: str):
    """Logits of each MSC branch (1x first), each upsampled to the 1x logit size, and their
    element-wise max: MSC's own steps, kept apart."""
    msc = MSC(net, scales, interp).eval()
    with torch.inference_mode():
        logits = msc.branch_logits(x)
        fused = msc(x)
    return logits, msc.upsampled(logits), fused


def msc_predict(net, image: np.ndarray, transform, scales, interp: str) -> MSCPrediction:
    """An RGB uint8 image through `net` with MSC. `transform`: a seglab.data.transforms
    EvalTransform with the network's input normalisation (its prepare: image -> (input tensor,
    (H, W)))."""
    x, size = transform.prepare(image)
    logits, upsampled, fused = msc_branches(net, x[None], scales, interp)
    full = [full_resolution_logits(u[0], x.shape[-2:], size, interp) for u in upsampled + [fused]]
    labels = [f.argmax(0).numpy().astype(np.uint8) for f in full]
    return MSCPrediction(x, logits, labels, full[-1])


def draw_msc(image: np.ndarray, label: np.ndarray | None, pred: MSCPrediction, scales,
             interp: str, out: Path, title: str = "image", name: str = NAME) -> Path:
    """The row: image, each branch, the fusion, and the ground truth when `label` is given
    (panel titles then quote each prediction's pixel accuracy)."""
    set_style()
    x, labels = pred.x, pred.labels
    fig, axes, legend_y = image_row(len(labels) + 1 + (label is not None), image.shape[:2])
    panels = [(title, image)]
    for s, lg, p in zip((1.0,) + tuple(scales), pred.logits, labels):
        h_in, w_in = scaled_size(x.shape[-2:], s, interp) if s != 1.0 else x.shape[-2:]
        panels.append((f"{s:g}x branch\ninput {h_in}\u00d7{w_in} -> {lg.shape[-2]}\u00d7"
                       f"{lg.shape[-1]}{accuracy_line(p, label)}", colourise(p)))
    panels.append((f"max fusion\n(the MSC output){accuracy_line(labels[-1], label)}",
                   colourise(labels[-1])))
    if label is not None:
        panels.append(("ground truth", colourise(label)))
    show_row(axes, panels)
    fig.suptitle("Multi-scale inputs (MSC): one network on three scales of the image, logits "
                 "fused by element-wise max", y=0.995, va="top")
    label_legend(fig, labels + ([label] if label is not None else []), legend_y)
    return save(fig, out, name)


def msc_figure(image: np.ndarray, label: np.ndarray | None, net, transform, scales, interp: str,
               out: Path, title: str = "image", name: str = NAME) -> Path:
    """The MSC figure of any RGB uint8 image (with its label map, or None) and network."""
    pred = msc_predict(net, image, transform, scales, interp)
    return draw_msc(image, label, pred, scales, interp, out, title, name)


def fig_msc(run: Run, out: Path) -> Path:
    """On the val image where the MSC branches disagree most: each branch's prediction (upsampled
    to the image), the max-fused prediction, and the ground truth."""
    net, norm = load_trained_net(run)
    scales = tuple(run.model_setting("msc_scales"))
    interp = run.interp()
    transform = EvalTransform(*run.eval_protocol(), norm=norm)
    best = None
    for item in run.val_images(CANDIDATES, with_logits=False):
        image = load_image(item["image_path"])
        gt = label_of(item, run.num_classes, image.shape[:2])
        pred = msc_predict(net, image, transform, scales, interp)
        disagree = float(np.mean([(p != pred.labels[-1]).mean() for p in pred.labels[:-1]]))
        if best is None or disagree > best[0]:
            best = (disagree, item, image, gt, pred)
    _, item, image, gt, pred = best
    return draw_msc(image, gt, pred, scales, interp, out, f"image\n({item['id']})")
