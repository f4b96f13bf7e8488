"""Figures (f) per_class_iou.png and (g) trimap.png: the run's evaluation scores with and without
the dense CRF (DeepLab v2, Chen et al., Sections 3.3 and 4.1).

(f) reads RUN/eval_<split>/scores.json and scores_crf.json (evaluate.py, plain and --crf).
(g) scores pixels within a band around object boundaries (the trimap of Kohli et al. 2009, as
the DeepLab papers use it; VOC's void outlines mark the boundaries): from the scores files when
evaluate.py --trimap made them, else computed here from the run's cached logits and the CRF.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from seglab.data.labels import IGNORE, voc_palette
from seglab.densecrf.runner import CRFJob, run_crf
from seglab.data.metrics import TrimapEvaluator, trimap_band
from seglab.figures.run import FigureError, Run, cached_full_logits, label_of
from seglab.figures.style import WIDTH, class_name, colourise, save, set_style, show_row

IOU_NAME = "per_class_iou.png"
TRIMAP_NAME = "trimap.png"
TRIMAP_WIDTHS = (1, 2, 4, 6, 8, 12, 16, 20, 30, 40)
SERIES = (("DCNN (MSC)", "#4c72b0"), ("DCNN + CRF", "#dd8452"))   # (label, colour) plain, CRF


def fig_per_class_iou(run: Run, out: Path) -> Path:
    """Grouped bars of the per-class IoU on the val split, DCNN vs DCNN + CRF, for the classes
    that occur (a class with no union in either has no IoU and is left out)."""
    set_style()
    plain, with_crf = run.scores(), run.scores(crf=True)
    names = plain.get("class_names") or [class_name(i) for i in range(len(plain["iou"]))]
    present = [i for i, (a, b) in enumerate(zip(plain["iou"], with_crf["iou"]))
               if a is not None or b is not None]
    fig, ax = plt.subplots(figsize=(WIDTH, 4.6))
    x = np.arange(len(present))
    width = 0.4
    for offset, scores, (label, colour) in zip((-width / 2, width / 2), (plain, with_crf),
                                               SERIES):
        values = [100 * (scores["iou"][i] or 0.0) for i in present]
        bars = ax.bar(x + offset, values, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=9 if len(present) <= 8 else 7, padding=1)
    palette = voc_palette() / 255.0
    ax.scatter(x, np.full(len(x), -6.0), s=90, marker="s", c=palette[present], edgecolors="0.3",
               clip_on=False, zorder=5)
    ax.set_xticks(x)
    ax.set_xticklabels([names[i] for i in present], rotation=0 if len(present) <= 8 else 40,
                       ha="center" if len(present) <= 8 else "right")
    ax.tick_params(axis="x", pad=16)
    ax.set_ylim(0, 105)
    ax.set_ylabel("IoU (%)")
    ax.grid(axis="y", alpha=0.3)
    # Beside the axes, not on them: the bar labels reach the top for good classes.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Per-class IoU on {plain.get('split', run.split)} "
                 f"({plain.get('num_images', '?')} images): mIoU {100 * plain['miou']:.2f} "
                 f"without CRF, {100 * with_crf['miou']:.2f} with CRF")
    return save(fig, out, IOU_NAME)


def trimap_from_scores(scores: dict, widths) -> dict | None:
    """{width: {...}} from a scores file's "trimap" results, if they cover `widths`."""
    trimap = scores.get("trimap")
    if not trimap:
        return None
    trimap = {int(k): v for k, v in trimap.items()}
    return trimap if set(widths) <= set(trimap) else None


def compute_trimap(run: Run, widths, workers: int, progress: bool = False) -> tuple[dict, dict]:
    """Trimap scores of the DCNN (cached logits) and of the CRF (run on them), all val images."""
    items, interp = run.val_images(), run.interp()
    plain = TrimapEvaluator(widths, run.num_classes)
    for item in items:
        logits = cached_full_logits(item, interp)
        gt = label_of(item, run.num_classes, tuple(logits.shape[1:]))
        plain.update(logits.argmax(0).numpy(), gt)
    jobs = [CRFJob(it["id"], str(it["image_path"]), str(it["logits_path"]),
                   gt_path=str(it["label_path"])) for it in items]
    results, failures = run_crf(jobs, run.crf_params(), workers=workers or None,
                                backend=run.crf_backend(), interp=interp, trimap_widths=widths,
                                progress=progress, desc="trimap CRF")
    if failures:
        raise FigureError(f"the CRF failed on {len(failures)} images, e.g. {failures[0].image_id}:"
                          f" {failures[0].error}")
    crf = TrimapEvaluator(widths, run.num_classes)
    for r in results:
        crf.merge(r.trimap)
    return plain.scores(), crf.scores()


def band_example(ax, run: Run, band_width: int) -> None:
    """The first val image's label map, faded, with the band of `band_width` px in red."""
    item = run.val_images(1, with_logits=False)[0]
    gt = label_of(item, run.num_classes)
    band = trimap_band(gt, band_width)
    shown = colourise(gt).astype(float) * 0.35 + 255 * 0.65
    shown[band] = (214, 39, 40)
    shown[gt == IGNORE] = (0, 0, 0)
    show_row([ax], [(f"band of {band_width} px (red) around\nthe void outlines (black)",
                     shown.astype(np.uint8))])


def fig_trimap(run: Run, out: Path, widths=TRIMAP_WIDTHS, workers: int = 0) -> Path:
    """An example band, then mIoU and pixel accuracy within bands of growing width around the
    object boundaries (VOC's void outlines), with and without the CRF."""
    set_style()
    widths = sorted(set(int(w) for w in widths))
    plain = trimap_from_scores(run.scores(), widths)
    crf = trimap_from_scores(run.scores(crf=True), widths)
    source, images = "scores.json", run.scores().get("num_images", "?")
    if plain is None or crf is None:
        plain, crf = compute_trimap(run, widths, workers)
        source, images = "cached logits + CRF", len(run.val_images())
    fig, axes = plt.subplots(1, 3, figsize=(WIDTH, 4.0),
                             gridspec_kw=dict(width_ratios=[0.8, 1, 1], wspace=0.3))
    band_example(axes[0], run, widths[len(widths) // 2])
    for ax, key, label in ((axes[1], "miou", "mean IoU (%)"),
                           (axes[2], "pixel_acc", "pixel accuracy (%)")):
        for scores, (name, colour) in zip((plain, crf), SERIES):
            values = [100 * (scores[w][key] if scores[w][key] is not None else np.nan)
                      for w in widths]
            ax.plot(widths, values, marker="o", ms=4, color=colour, label=name)
        ax.set_xlabel("trimap band width (pixels)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    axes[1].set_title("mean IoU within the band")
    axes[2].set_title("pixel accuracy within the band")
    fig.suptitle(f"Accuracy near object boundaries ({run.split}, {images} images, from {source})",
                 y=1.02)
    return save(fig, out, TRIMAP_NAME)
