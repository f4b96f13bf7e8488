"""Figure (e), training_curves.png: the run's training log (RUN/log.csv, written by
seglab.training.loop): the total loss and the loss of each MSC branch (training puts a loss on
each of MSC's four outputs) with the poly learning rate (DeepLab v2, Chen et al., Sections 3.2
and 4.1).
"""
from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from seglab.figures.run import DEMO_HINT, FigureError, Run
from seglab.figures.style import WIDTH, save, set_style

NAME = "training_curves.png"


def read_log(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "loss" not in rows[0] or "iteration" not in rows[0]:
        raise FigureError(f"{path} has no training rows (columns iteration, lr, loss, ...): "
                          "train the run first")
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving geometric mean over `window` points (shorter at the ends): no lag, and
    the natural average on the log-scale loss axis. Non-positive values are left out."""
    logs = np.log(np.where(values > 0, values, np.nan))
    half = max(window, 1) // 2
    return np.array([np.exp(np.nanmean(logs[max(0, i - half):i + half + 1]))
                     if np.isfinite(logs[max(0, i - half):i + half + 1]).any() else np.nan
                     for i in range(len(values))])


def fig_training_curves(run: Run, out: Path) -> Path:
    """Total loss and the per-branch MSC losses (raw, faint; smoothed, solid; log scale, as
    early losses of a net trained from scratch are orders of magnitude larger) with the poly
    learning rate on a twin axis."""
    set_style()
    log = read_log(run.require("log.csv", f"train the run first; {DEMO_HINT}"))
    it = log["iteration"]
    window = max(1, len(it) // 25)
    fig, ax = plt.subplots(figsize=(WIDTH, 4.6))
    series = [("loss", "total (sum)", "black", 2.2)]
    colours = plt.get_cmap("tab10").colors
    branches = [k for k in log if k.startswith("loss_")]
    series += [(k, f"branch {k[5:]}", colours[i], 1.4) for i, k in enumerate(branches)]
    for key, label, colour, lw in series:
        ax.plot(it, log[key], color=colour, alpha=0.2, lw=0.8)
        ax.plot(it, smooth(log[key], window), color=colour, lw=lw, label=label)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("softmax cross-entropy (log scale)")
    ax.set_xlim(it.min(), it.max())
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.spines["right"].set_visible(True)
    lr_ax.plot(it, log["lr"], color="tab:gray", ls="--", lw=1.5, label="learning rate (right)")
    lr_ax.set_ylabel("learning rate (backbone; ASPP x10, x20)")
    lr_ax.set_ylim(bottom=0)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right", ncol=2,
              frameon=True, framealpha=0.9)
    t = run.config.get("train", {})
    ax.set_title(f"Training ({len(it)} iterations, effective batch {t.get('effective_batch', '?')},"
                 f" base lr {t.get('base_lr', '?')}, poly {t.get('poly_power', 0.9)}); "
                 f"faint: per iteration, solid: centred mean of {window}")
    return save(fig, out, NAME)
