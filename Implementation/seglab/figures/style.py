"""The look every figure shares: fonts and sizes, saving, rows of image panels, label maps in the
VOC colour map with a legend of the classes shown, and the pixel accuracy a panel title quotes.

Figures are 12 inches wide at 110 dpi (1320 px), so they read at README width. Label maps use
the PASCAL VOC colour map (void = 255 in its VOC colour, seglab.data.labels.voc_palette).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from seglab.data.labels import IGNORE, VOC_CLASSES, voc_palette

plt.switch_backend("Agg")  # files only, no display

DPI = 110
WIDTH = 12.0                               # inches: 1320 px, shown at README width


def set_style() -> None:
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11,
                         "legend.fontsize": 10, "figure.dpi": DPI, "savefig.dpi": DPI,
                         "savefig.facecolor": "white", "axes.spines.top": False,
                         "axes.spines.right": False})


def save(fig, out: Path, name: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def colourise(label: np.ndarray) -> np.ndarray:
    """(H, W) label values -> (H, W, 3) RGB with the VOC colour map (255 in the void colour)."""
    return voc_palette()[np.asarray(label, dtype=np.uint8)]


def class_name(index: int) -> str:
    return "void" if index == IGNORE else (VOC_CLASSES[index] if index < len(VOC_CLASSES)
                                           else str(index))


def label_legend(fig, labels, y: float = 0.0, ncol: int = 8) -> None:
    """A legend below the figure listing only the classes that occur in `labels`."""
    present = sorted(set(np.unique(np.concatenate([np.unique(l) for l in labels])).tolist()))
    palette = voc_palette() / 255.0
    handles = [Patch(facecolor=palette[c], edgecolor="0.3", label=class_name(c)) for c in present]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, y),
               ncol=min(ncol, len(handles)), frameon=False, handlelength=1.2)


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    valid = gt != IGNORE
    return float((pred[valid] == gt[valid]).mean()) if valid.any() else float("nan")


def accuracy_line(pred: np.ndarray, gt: np.ndarray | None) -> str:
    """'\\nacc 87.5%' for a panel title, or '' when there is no ground truth (a photograph)."""
    return "" if gt is None else f"\nacc {100 * pixel_accuracy(pred, gt):.1f}%"


def image_row(n: int, hw, top: float = 1.15, bottom: float = 0.45, gap: float = 0.08):
    """A figure of `n` image panels in a row, sized so images of (height, width) `hw` fill
    them: `top` inches above for titles, `bottom` below for the legend. Returns (fig, axes,
    legend_y), legend_y the figure fraction just under the images."""
    panel_w = WIDTH / (n + (n - 1) * gap)
    panel_h = panel_w * hw[0] / hw[1]
    height = panel_h + top + bottom
    fig, axes = plt.subplots(1, n, figsize=(WIDTH, height))
    fig.subplots_adjust(left=0, right=1, top=1 - top / height, bottom=bottom / height, wspace=gap)
    return fig, axes, (bottom - 0.05) / height


def show_row(axes, panels) -> None:
    """panels: (title, RGB image) pairs, one per axis, drawn without ticks."""
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
