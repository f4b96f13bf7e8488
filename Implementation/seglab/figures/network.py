"""Figure (b), network.png: DeepLab v2 (ResNet-101 + ASPP, with multi-scale inputs, MSC) as a
block diagram (DeepLab v2, Chen et al., Sections 3.1-3.2 and 4.1).

Every size printed in it is measured: forward hooks record the output shape of each stage of each
MSC branch during one real MSC forward pass of a 1x3x321x321 input through our model. Needs no
run (the network has random weights; only shapes and the parameter count are shown).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyBboxPatch

from seglab.recipe import PAPER
from seglab.figures.style import WIDTH, save, set_style
from seglab.models import build_model
from seglab.models.msc import MSC

NAME = "network.png"
NETWORK_ARCH = dict(num_classes=21)        # the paper's ResNet-101 DeepLabV2 (model defaults)
NETWORK_INPUT = 321                        # the training crop
STAGES = ("input", "stem", "res2", "res3", "res4", "res5", "aspp")
COLOURS = {"input": "#f2f2f2", "stem": "#d6e6f5", "res2": "#c4dbf0", "res3": "#b2d0eb",
           "res4": "#a0c5e6", "res5": "#8ebae1", "aspp": "#f9d9a8"}


def measure_network(arch: dict | None = None, size: int = NETWORK_INPUT,
                    scales=tuple(PAPER["msc_scales"]), interp: str = "caffe"):
    """Output shapes (C, H, W) of every stage for each MSC branch, measured with forward hooks
    during one MSC forward pass of a 1x3xsize x size input. Returns (net, rows, fused): rows
    has one {stage: shape, "branches": [shapes of the ASPP convs]} per scale (1 first)."""
    net = build_model(arch if arch is not None else NETWORK_ARCH).eval()
    msc = MSC(net, scales, interp).eval()
    rows: list[dict] = []

    def record(name):
        def hook(module, inputs, output):
            rows[-1][name] = tuple(output.shape[1:])
        return hook

    modules = {"stem": net.backbone.pool1, "res2": net.backbone.res2, "res3": net.backbone.res3,
               "res4": net.backbone.res4, "res5": net.backbone.res5, "aspp": net.aspp}
    handles = [net.register_forward_pre_hook(
        lambda module, inputs: rows.append({"input": tuple(inputs[0].shape[1:]), "branches": []}))]
    handles += [m.register_forward_hook(record(name)) for name, m in modules.items()]
    handles += [conv.register_forward_hook(
        lambda module, inputs, output: rows[-1]["branches"].append(tuple(output.shape[1:])))
        for conv in net.aspp.branches()]
    try:
        with torch.inference_mode():
            fused = msc(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return net, rows, tuple(fused.shape[1:])


def stage_headers(net) -> dict[str, str]:
    """The text above each column: what the stage is (blocks, stride or rate, ASPP rates)."""
    a = net.arch
    headers = {"input": "input", "stem": "conv1 7x7/2\n+ max-pool\n3x3/2",
               "aspp": f"ASPP: {len(a['rates'])} parallel\n3x3 convs, rates\n"
                       + ", ".join(str(r) for r in a["rates"]) + "\n(summed)"}
    for i in range(4):
        what = [f"{len(getattr(net.backbone, f'res{i + 2}'))} blocks"]
        what.append(f"stride {a['strides'][i]}" if a["strides"][i] > 1 else
                    f"rate {a['dilations'][i]}" if a["dilations"][i] > 1 else "")
        headers[f"res{i + 2}"] = f"res{i + 2}\n" + "\n".join(what)
    return headers


def shape_text(shape) -> str:
    """(C, H, W) -> 'C ch' over 'H×W' (two lines, so the boxes stay narrow)."""
    return f"{shape[0]} ch\n" + "\u00d7".join(str(s) for s in shape[1:])


def draw_box(ax, x, y, w, h, text, colour, fontsize=10, weight="normal"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=colour, edgecolor="0.25", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(ax, x0, y0, x1, y1, colour="0.3"):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.2, shrinkA=0, shrinkB=0))


def fig_network(out: Path, arch: dict | None = None, size: int | None = None) -> Path:
    """DeepLab v2 (ResNet-101 + ASPP + MSC) as a block diagram; every size printed in it is the
    output shape one module had in a real forward pass (C x H x W, batch 1). One row per MSC
    scale, left to right: the stages, the upsampling to the 1x size, the max fusion."""
    set_style()
    size = size or NETWORK_INPUT
    scales = tuple(PAPER["msc_scales"])
    net, rows, fused = measure_network(arch, size, scales)
    a = net.arch
    headers = stage_headers(net)
    xs = dict(zip(STAGES, (0.0, 1.25, 2.5, 3.75, 5.0, 6.25, 7.65)))
    x_up, x_max, x_out = 9.1, 10.35, 11.7
    widths = {stage: 1.1 for stage in STAGES}
    widths["aspp"] = 1.35

    fig, ax = plt.subplots(figsize=(WIDTH + 1.5, 5.6))
    ax.set_xlim(-0.95, 12.45)
    ax.set_ylim(-0.85, 4.6)
    ax.axis("off")
    h, ys, y_mid = 0.7, [3.0, 1.85, 0.7], 1.85
    for stage in STAGES:
        ax.text(xs[stage], 3.6, headers[stage], ha="center", va="bottom", fontsize=10)
    for x, text in ((x_up, "bilinear\nupsample\nto 1x size"), (x_max, "MSC\nfusion"),
                    (x_out, "output")):
        ax.text(x, 3.6, text, ha="center", va="bottom", fontsize=10)
    base = rows[0]["aspp"]
    for row, (y, scale) in enumerate(zip(ys, (1.0,) + scales)):
        r = rows[row]
        ax.text(-0.7, y, f"{scale:g}x", ha="right", va="center", fontsize=12, weight="bold")
        previous = None
        for stage in STAGES:
            text = shape_text(r[stage])
            if stage == "aspp":
                c, hh, ww = r["branches"][0]
                text = f"{len(r['branches'])} \u00d7 {c} ch\n{hh}\u00d7{ww}"
            draw_box(ax, xs[stage], y, widths[stage], h, text, COLOURS[stage])
            if previous:
                arrow(ax, xs[previous] + widths[previous] / 2, y, xs[stage] - widths[stage] / 2, y)
            previous = stage
        up = shape_text(base) if r["aspp"] != base else "(identity)"
        draw_box(ax, x_up, y, 1.1, h, up, "#e3f1d9")
        arrow(ax, xs["aspp"] + widths["aspp"] / 2, y, x_up - 0.55, y)
        arrow(ax, x_up + 0.55, y, x_max - 0.45, y_mid + (y - y_mid) * 0.4)
    draw_box(ax, x_max, y_mid, 0.9, 1.2, "element-\nwise\nmax", "#c9e4b4", fontsize=11,
             weight="bold")
    draw_box(ax, x_out, y_mid, 1.2, 1.0, "fused logits\n" + shape_text(fused), "#f9d9a8",
             fontsize=10, weight="bold")
    arrow(ax, x_max + 0.45, y_mid, x_out - 0.6, y_mid)
    params = sum(p.numel() for p in net.parameters())
    aspp_params = sum(p.numel() for p in net.aspp.parameters())
    ax.text(5.75, -0.5, f"Sizes (channels x height x width) measured with forward hooks on a "
            f"1x3x{size}x{size} input.\nThe three rows share one set of weights: ResNet-"
            f"{a['depth']} + ASPP, {params:,} parameters ({aspp_params:,} in the ASPP).\n"
            "Training puts a loss on each of the four outputs (1x, 0.75x, 0.5x, max); "
            "evaluation upsamples the fused logits x8 to the image.",
            ha="center", va="center", fontsize=10)
    return save(fig, out, NAME)
