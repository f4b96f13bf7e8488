"""Figure (a), atrous_fov.png: atrous convolution and the field of view of ASPP (DeepLab v2,
Chen et al., Sections 3.1 and 3.2).

Left: the 9 input positions one output pixel of a 3x3 kernel reads at rates 1, 6, 12 and 24,
measured as the non-zero gradient through our ASPP module. Right: the taps of each of the paper's
ASPP-L branches (rates 6, 12, 18, 24) on a 321x321 input, at the backbone's output stride,
which is measured with a forward pass. Needs no run.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle

from seglab.figures.network import NETWORK_INPUT
from seglab.figures.style import WIDTH, save, set_style
from seglab.models import normalize_arch
from seglab.models.deeplabv2 import ASPP, DeepLabV2

NAME = "atrous_fov.png"
TAP_RATES = (1, 6, 12, 24)
PAPER_RATES = tuple(normalize_arch({"name": "deeplabv2"})["rates"])  # ASPP-L: 6, 12, 18, 24


def atrous_taps(rate: int, grid: int) -> np.ndarray:
    """(grid, grid) bool: the input positions one output pixel (the centre) of a 3x3 ASPP branch
    with this rate reads, found as the non-zero gradient of that output through model.ASPP."""
    aspp = ASPP(1, 1, rates=(rate,))
    with torch.no_grad():
        aspp.c0.weight.fill_(1.0)
    x = torch.zeros(1, 1, grid, grid, requires_grad=True)
    aspp(x)[0, 0, grid // 2, grid // 2].backward()
    return (x.grad[0, 0] != 0).numpy()


def output_stride(size: int = NETWORK_INPUT) -> int:
    """The backbone's output stride, measured: (input - 1) / (features - 1) of a forward pass
    (a narrow ResNet with the paper's strides and rates; the width does not change sizes)."""
    net = DeepLabV2(num_classes=1, depth=14, width=4).eval()
    with torch.inference_mode():
        features = net.backbone(torch.zeros(1, 3, size, size)).shape[-1]
    return (size - 1) // (features - 1)


def rate_colour(rate: int):
    """One colour per atrous rate, the same in every panel."""
    order = sorted(set(TAP_RATES) | set(PAPER_RATES))
    return plt.get_cmap("tab10").colors[order.index(rate) % 10]


def draw_taps(fig, grid_spec) -> None:
    """The left 2x2 panels: the taps of a 3x3 kernel at each of TAP_RATES on a feature map."""
    grid = 2 * max(TAP_RATES) + 9
    gy, gx = np.mgrid[0:grid, 0:grid]
    for k, rate in enumerate(TAP_RATES):
        ax = fig.add_subplot(grid_spec[k // 2, k % 2])
        taps = atrous_taps(rate, grid)
        ax.scatter(gx.ravel(), gy.ravel(), s=0.6, color="0.6")
        ys, xs = np.nonzero(taps)
        colour = rate_colour(rate)
        ax.scatter(xs, ys, s=22, color=colour, edgecolors="black", linewidths=0.5, zorder=3)
        ax.add_patch(Rectangle((xs.min() - 0.5, ys.min() - 0.5), np.ptp(xs) + 1, np.ptp(ys) + 1,
                               fill=False, edgecolor=colour, linewidth=1.2, linestyle="--"))
        ax.scatter([grid // 2], [grid // 2], marker="x", s=25, color="black", zorder=4)
        ax.set_xlim(-0.5, grid - 0.5)
        ax.set_ylim(grid - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_title(f"rate {rate}: taps {rate} apart,\nthe 3x3 kernel spans {2 * rate + 1}x"
                     f"{2 * rate + 1}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(True)
            spine.set_color("0.6")
    fig.text(0.25, 0.04, f"the 9 inputs one output pixel (x) of a 3x3 atrous conv reads,\non a "
             f"{grid}x{grid} feature map (non-zero gradient through model.ASPP)", ha="center",
             va="top", fontsize=10)


def draw_field_of_view(ax) -> None:
    """The right panel: each ASPP branch's taps on a NETWORK_INPUT-sized input (feature pixel j
    sits at input pixel stride * j)."""
    stride, size = output_stride(), NETWORK_INPUT
    centre = (size - 1) / 2
    features = (size - 1) // stride + 1
    fy, fx = np.mgrid[0:features, 0:features] * stride
    ax.add_patch(Rectangle((-0.5, -0.5), size, size, facecolor="0.93", edgecolor="black", lw=1.2))
    ax.scatter(fx.ravel(), fy.ravel(), s=1.5, color="0.55", zorder=1)
    handles = []
    for k, rate in enumerate(PAPER_RATES):
        step = stride * rate
        offsets = np.array([-step, 0, step])
        ty, tx = np.meshgrid(centre + offsets, centre + offsets, indexing="ij")
        colour = rate_colour(rate)
        ax.scatter(tx.ravel(), ty.ravel(), s=40, color=colour, edgecolors="black",
                   linewidths=0.6, zorder=4 + k)
        span = 2 * step + 1
        ax.add_patch(Rectangle((centre - step - 0.5, centre - step - 0.5), span, span, fill=False,
                               edgecolor=colour, linewidth=2, zorder=3))
        inside = "" if span <= size else " (outer taps in the zero padding)"
        handles.append(Patch(facecolor="none", edgecolor=colour, linewidth=2,
                             label=f"rate {rate}: taps {step} px apart, field of view "
                                   f"{span}x{span}{inside}"))
    ax.scatter([centre], [centre], marker="x", s=60, color="black", zorder=10)
    margin = stride * max(PAPER_RATES) - centre + 12
    ax.set_xlim(-margin, size + margin)
    ax.set_ylim(size + margin, -margin)
    ax.set_aspect("equal")
    ax.set_xticks([0, centre, size - 1])
    ax.set_yticks([0, centre, size - 1])
    ax.set_title(f"the 4 ASPP branches on a {size}x{size} input: output stride {stride},\n"
                 f"{features}x{features} feature pixels (grey dots), taps of the centre one (x)")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), frameon=False,
              fontsize=10)


def fig_atrous(out: Path) -> Path:
    """Taps of a 3x3 kernel at rates 1, 6, 12, 24 on a feature map, and each ASPP branch's
    field of view on a 321x321 input."""
    set_style()
    fig = plt.figure(figsize=(WIDTH, 5.6))
    grid_spec = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.12, 2.3], wspace=0.12, hspace=0.3)
    draw_taps(fig, grid_spec)
    draw_field_of_view(fig.add_subplot(grid_spec[:, 3]))
    return save(fig, out, NAME)
