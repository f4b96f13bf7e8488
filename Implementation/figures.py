"""Regenerates every image in Figures/ from our code and a (demo) run.

    python Implementation/train.py --config demo          # once: the run the figures read
    python Implementation/figures.py                      # newest runs/demo*/ -> Figures/
    python Implementation/figures.py --run runs/NAME --only c d

Figures (letter, file, what it shows, what it reads):
  a  atrous_fov.png       the taps of a 3x3 kernel at rates 1, 6, 12, 24 (measured through our
                          ASPP module) and the field of view of each ASPP branch on a 321 input
  b  network.png          ResNet-101 + ASPP + MSC as a block diagram, every tensor size measured
                          with forward hooks during a real forward pass of a 1x3x321x321 input
  c  msc.png              one val image: the prediction of each MSC branch (1, 0.75, 0.5) and
                          their max fusion, next to the ground truth    (RUN/checkpoints/final.pth)
  d  crf_iterations.png   image, DCNN output, CRF after 1, 5 and 10 mean-field iterations,
                          ground truth                                  (RUN/eval_val/logits/)
  e  training_curves.png  total and per-branch losses and the poly lr   (RUN/log.csv)
  f  per_class_iou.png    per-class IoU with and without the CRF        (RUN/eval_val/scores*.json)
  g  trimap.png           mIoU and pixel accuracy within a band around object boundaries, with
                          and without the CRF (from the scores if evaluate.py --trimap made them,
                          else computed here from the cached logits and the CRF)

(a) and (b) need no run. Label maps use the VOC colour map (void = 255 in its VOC colour) and
a legend of the classes shown. Figures are 12 inches wide at 110 dpi, so they read at README
width.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import yaml
from matplotlib.patches import FancyBboxPatch, Patch, Rectangle
from tqdm import tqdm

from seglab.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from seglab.config import DEFAULTS, ConfigError, load_config
from seglab.densecrf.dense_crf import DenseCRF
from seglab.densecrf.params import CRFParams
from seglab.data.labels import IGNORE, VOC_CLASSES, DataError, load_label, voc_palette
from seglab.data.images import load_image
from seglab.evaluation.logit_cache import LogitCacheError, cache_path, cached_ids, load_logits
from seglab.models.resize import full_resolution_logits
from seglab.models.deeplabv2 import ASPP, DeepLabV2
from seglab.models.msc import MSC
from seglab.models import build_model, normalize_arch
from seglab.models.resize import resize, scaled_size

plt.switch_backend("Agg")  # files only, no display

ROOT = Path(__file__).resolve().parents[1]
DPI = 110
WIDTH = 12.0                               # inches: 1320 px, shown at README width
NETWORK_ARCH = dict(num_classes=21)        # the paper's ResNet-101 DeepLabV2 (model defaults)
NETWORK_INPUT = 321                        # the training crop
TAP_RATES = (1, 6, 12, 24)
PAPER_RATES = tuple(normalize_arch({"name": "deeplabv2"})["rates"])  # ASPP-L: 6, 12, 18, 24
TRIMAP_WIDTHS = (1, 2, 4, 6, 8, 12, 16, 20, 30, 40)
CANDIDATES = 12                            # val images (c) and (d) choose their example from
DEMO_RUN = Path("runs") / "demo"
DEMO_HINT = ("run `python Implementation/train.py --config demo --run-dir runs/demo` first (or "
             "pass --run RUN_DIR)")


class FigureError(RuntimeError):
    """A figure's input is missing or unusable; the message names the file and the fix."""


def set_style() -> None:
    plt.rcParams.update({"font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11,
                         "legend.fontsize": 10, "figure.dpi": DPI, "savefig.dpi": DPI,
                         "savefig.facecolor": "white", "axes.spines.top": False,
                         "axes.spines.right": False})


def save(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Label maps: the VOC colour map and a legend of the classes shown
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The run a figure reads
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What the figures read from a run folder (train.py's layout)."""
    path: Path
    config: dict

    @property
    def split(self) -> str:
        return self.config.get("data", {}).get("val_split", "val")

    @property
    def num_classes(self) -> int:
        return int(self.config.get("data", {}).get("num_classes", 21))

    @property
    def eval_dir(self) -> Path:
        return self.path / f"eval_{self.split}"

    def model_setting(self, key: str):
        return self.config["model"][key]

    def require(self, relative: str, fix: str) -> Path:
        path = self.path / relative
        if not path.exists():
            raise FigureError(f"{path} not found: {fix}")
        return path

    def scores(self, crf: bool = False) -> dict:
        name = "scores_crf.json" if crf else "scores.json"
        fix = (f"evaluate the run with `python Implementation/evaluate.py --checkpoint "
               f"{self.path / 'checkpoints' / 'final.pth'} --split {self.split}"
               f"{' --crf' if crf else ''} --out {self.eval_dir}`")
        return json.loads(self.require(f"{self.eval_dir.name}/{name}", fix).read_text())

    def crf_params(self):
        """The CRF parameters the run's evaluation used, else a best.json of a CRF search in
        the run folder, else the paper's values."""
        path = self.eval_dir / "scores_crf.json"
        if path.is_file():
            params = json.loads(path.read_text()).get("crf_params")
            if params:
                return CRFParams(**params)
        found = sorted(self.path.rglob("best.json"))
        return CRFParams.from_json(found[0]) if found else CRFParams()

    def crf_backend(self) -> str:
        path = self.eval_dir / "scores_crf.json"
        backend = json.loads(path.read_text()).get("crf_backend") if path.is_file() else None
        if backend in (None, "pydensecrf"):
            try:
                import pydensecrf.densecrf  # noqa: F401
                return "pydensecrf"
            except ImportError:
                return "torch"
        return backend

    def interp(self) -> str:
        path = self.eval_dir / "scores.json"
        if path.is_file():
            return json.loads(path.read_text()).get("interp") or self.model_setting("interp")
        return self.model_setting("interp")

    def eval_protocol(self) -> tuple[str, int]:
        """(mode, pad_to) the run's evaluation used (its scores.json, else its config)."""
        path = self.eval_dir / "scores.json"
        scores = json.loads(path.read_text()) if path.is_file() else {}
        ev = self.config["eval"]
        return scores.get("mode") or ev["mode"], int(scores.get("pad_to") or ev["pad_to"])

    def data_root(self) -> Path:
        """The data root the run was evaluated on (relative paths: to the current folder, else
        to the repository)."""
        info = self.eval_dir / "config.json"
        root = json.loads(info.read_text()).get("data_root") if info.is_file() else None
        root = Path(root or self.config["data"]["root"])
        for candidate in ([root] if root.is_absolute() else [Path.cwd() / root, ROOT / root]):
            if (candidate / "VOCdevkit" / "VOC2012").is_dir():
                return candidate
        raise FigureError(f"the data of run {self.path} ({root}/VOCdevkit/VOC2012) was not found; "
                          "re-create the demo set with `python Implementation/train.py --config "
                          "demo` or run from the folder the run was made in")

    def val_images(self, limit: int | None = None, with_logits: bool = True) -> list[dict]:
        """[{id, image_path, label_path, logits_path}] of the val images (with cached logits
        only, unless `with_logits` is False), in split order."""
        from seglab.data.voc import VOCSegmentation
        cache = self.eval_dir / "logits"
        ds = VOCSegmentation(self.data_root(), self.split, num_classes=self.num_classes)
        have = set(ds.ids)
        if with_logits:
            try:
                have = set(cached_ids(cache))
            except LogitCacheError as e:
                raise FigureError(f"{e} (evaluate {self.path / 'checkpoints/final.pth'})") from e
        items = [dict(id=ds.ids[i], image_path=ds.image_path(i), label_path=ds.label_path(i),
                      logits_path=cache_path(cache, ds.ids[i]))
                 for i in range(len(ds)) if ds.ids[i] in have]
        if not items:
            raise FigureError(f"no cached logits of the {self.split} images in {cache}: evaluate "
                              f"the run with `python Implementation/evaluate.py --checkpoint "
                              f"{self.path / 'checkpoints/final.pth'} --out {self.eval_dir}`")
        return items[:limit] if limit else items


def load_run(path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise FigureError(f"run folder {path} not found; {DEMO_HINT}")
    cfg_path = path / "config.yaml"
    try:
        config = load_config(cfg_path) if cfg_path.is_file() else load_config("voc12")
    except ConfigError as e:
        raise FigureError(f"cannot read the run's config: {e}") from e
    return Run(path, config)


def default_run() -> Path:
    """The documented demo run, runs/demo (the README's quickstart writes it), here or in the
    repository: never whichever run happens to be newest."""
    for base in (Path.cwd(), ROOT):
        if (base / DEMO_RUN / "checkpoints" / "final.pth").is_file():
            return base / DEMO_RUN
    raise FigureError(f"no {DEMO_RUN}/checkpoints/final.pth here or in {ROOT}: {DEMO_HINT}")


def label_of(item: dict, num_classes: int, size=None) -> np.ndarray:
    return load_label(item["label_path"], image_size=size, num_classes=num_classes)


def cached_full_logits(item: dict, interp: str) -> torch.Tensor:
    logits, input_size, size = load_logits(item["logits_path"])
    return full_resolution_logits(logits, input_size, size, interp)


# ---------------------------------------------------------------------------------------------
# (a) atrous convolution: taps and field of view
# ---------------------------------------------------------------------------------------------

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


def fig_atrous(out: Path) -> Path:
    """Taps of a 3x3 kernel at rates 1, 6, 12, 24 on a feature map, and each ASPP branch's
    field of view on a 321x321 input (feature pixel j sits at input pixel stride * j)."""
    set_style()
    fig = plt.figure(figsize=(WIDTH, 5.6))
    grid_spec = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.12, 2.3], wspace=0.12, hspace=0.3)
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

    ax = fig.add_subplot(grid_spec[:, 3])
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
    return save(fig, out, "atrous_fov.png")


# ---------------------------------------------------------------------------------------------
# (b) the network, with tensor sizes from a real forward pass
# ---------------------------------------------------------------------------------------------

STAGES = ("input", "stem", "res2", "res3", "res4", "res5", "aspp")


def measure_network(arch: dict | None = None, size: int = NETWORK_INPUT,
                    scales=tuple(DEFAULTS["model"]["msc_scales"]), interp: str = "caffe"):
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
    output shape one module had in a real forward pass (C x H x W, batch 1)."""
    set_style()
    size = size or NETWORK_INPUT
    scales = tuple(DEFAULTS["model"]["msc_scales"])
    net, rows, fused = measure_network(arch, size, scales)
    a = net.arch
    headers = {"input": "input", "stem": "conv1 7x7/2\n+ max-pool\n3x3/2",
               "aspp": f"ASPP: {len(a['rates'])} parallel\n3x3 convs, rates\n"
                       + ", ".join(str(r) for r in a["rates"]) + "\n(summed)"}
    for i in range(4):
        what = [f"{len(getattr(net.backbone, f'res{i + 2}'))} blocks"]
        what.append(f"stride {a['strides'][i]}" if a["strides"][i] > 1 else
                    f"rate {a['dilations'][i]}" if a["dilations"][i] > 1 else "")
        headers[f"res{i + 2}"] = f"res{i + 2}\n" + "\n".join(what)
    xs = dict(zip(STAGES, (0.0, 1.25, 2.5, 3.75, 5.0, 6.25, 7.65)))
    x_up, x_max, x_out = 9.1, 10.35, 11.7
    widths = {stage: 1.1 for stage in STAGES}
    widths["aspp"] = 1.35
    colours = {"input": "#f2f2f2", "stem": "#d6e6f5", "res2": "#c4dbf0", "res3": "#b2d0eb",
               "res4": "#a0c5e6", "res5": "#8ebae1", "aspp": "#f9d9a8"}

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
            draw_box(ax, xs[stage], y, widths[stage], h, text, colours[stage])
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
    return save(fig, out, "network.png")


# ---------------------------------------------------------------------------------------------
# (c) MSC: per-scale predictions and their max fusion
# ---------------------------------------------------------------------------------------------

def load_trained_net(run: Run):
    """(DeepLabV2 in eval mode, input normalisation) from the run's final checkpoint."""
    path = run.require("checkpoints/final.pth", f"train the run to the end; {DEMO_HINT}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise FigureError(str(e)) from e
    net = build_model(ckpt["arch"])
    load_model_weights(net, ckpt, str(path))
    return net.eval(), ckpt.get("input_norm") or "caffe"


def msc_branches(net, x: torch.Tensor, scales, interp: str):
    """Logits of each MSC branch (1x first), each upsampled to the 1x logit size, and their
    element-wise max: MSC's own steps, kept apart."""
    msc = MSC(net, scales, interp).eval()
    with torch.inference_mode():
        logits = msc.branch_logits(x)
        fused = msc(x)
    return logits, msc.upsampled(logits), fused


def fig_msc(run: Run, out: Path) -> Path:
    """On the val image where the MSC branches disagree most: each branch's prediction (upsampled
    to the image), the max-fused prediction, and the ground truth."""
    from seglab.data.transforms import EvalTransform
    set_style()
    net, norm = load_trained_net(run)
    scales = tuple(run.model_setting("msc_scales"))
    interp = run.interp()
    transform = EvalTransform(*run.eval_protocol(), norm=norm)
    best = None
    for item in run.val_images(CANDIDATES, with_logits=False):
        image = load_image(item["image_path"])
        gt = label_of(item, run.num_classes, image.shape[:2])
        x, size = transform(image)
        logits, upsampled, fused = msc_branches(net, x[None], scales, interp)
        preds = [full_resolution_logits(u[0], x.shape[-2:], size, interp).argmax(0).numpy()
                 .astype(np.uint8) for u in upsampled + [fused]]
        disagree = float(np.mean([(p != preds[-1]).mean() for p in preds[:-1]]))
        if best is None or disagree > best[0]:
            best = (disagree, item, image, gt, x, logits, preds)
    _, item, image, gt, x, logits, preds = best
    fig, axes, legend_y = image_row(len(preds) + 2, image.shape[:2])
    panels = [(f"image\n({item['id']})", image)]
    for s, lg, p in zip((1.0,) + scales, logits, preds):
        h_in, w_in = scaled_size(x.shape[-2:], s, interp) if s != 1.0 else x.shape[-2:]
        panels.append((f"{s:g}x branch\ninput {h_in}\u00d7{w_in} -> {lg.shape[-2]}\u00d7"
                       f"{lg.shape[-1]}\nacc {100 * pixel_accuracy(p, gt):.1f}%", colourise(p)))
    panels.append((f"max fusion\n(the MSC output)\nacc "
                   f"{100 * pixel_accuracy(preds[-1], gt):.1f}%", colourise(preds[-1])))
    panels.append(("ground truth", colourise(gt)))
    show_row(axes, panels)
    fig.suptitle("Multi-scale inputs (MSC): one network on three scales of the image, logits "
                 "fused by element-wise max", y=0.995, va="top")
    label_legend(fig, preds + [gt], legend_y)
    return save(fig, out, "msc.png")


# ---------------------------------------------------------------------------------------------
# (d) the dense CRF, iteration by iteration
# ---------------------------------------------------------------------------------------------

def crf_labels(image, logits, params, iterations: int, backend: str) -> np.ndarray:
    crf = DenseCRF(dataclasses.replace(params, iterations=iterations), backend=backend)
    return crf(image, logits).argmax(0).astype(np.uint8)


def fig_crf(run: Run, out: Path) -> Path:
    """Image, DCNN output, CRF after 1, 5 and 10 mean-field iterations, ground truth, on the
    val image (of a few) where 10 CRF iterations raise the pixel accuracy most."""
    set_style()
    params, backend, interp = run.crf_params(), run.crf_backend(), run.interp()
    best = None
    for item in run.val_images(CANDIDATES):
        image = load_image(item["image_path"])
        logits = cached_full_logits(item, interp)
        if tuple(logits.shape[1:]) != image.shape[:2]:
            raise FigureError(f"cached logits {item['logits_path']} do not fit image "
                              f"{item['image_path']}: re-run evaluate.py with --recompute")
        gt = label_of(item, run.num_classes, image.shape[:2])
        dcnn = logits.argmax(0).numpy().astype(np.uint8)
        final = crf_labels(image, logits, params, 10, backend)
        key = (pixel_accuracy(final, gt) - pixel_accuracy(dcnn, gt), float((final != dcnn).mean()))
        if best is None or key > best[0]:
            best = (key, item, image, logits, gt, dcnn, final)
    _, item, image, logits, gt, dcnn, final = best
    steps = {1: crf_labels(image, logits, params, 1, backend),
             5: crf_labels(image, logits, params, 5, backend), 10: final}
    fig, axes, legend_y = image_row(6, image.shape[:2])
    panels = [(f"image\n({item['id']})", image),
              (f"DCNN output\nacc {100 * pixel_accuracy(dcnn, gt):.1f}%", colourise(dcnn))]
    for k, labels in steps.items():
        changed = 100 * float((labels != dcnn).mean())
        panels.append((f"CRF, {k} iteration{'s' if k > 1 else ''}\nacc "
                       f"{100 * pixel_accuracy(labels, gt):.1f}%\n{changed:.1f}% of pixels changed",
                       colourise(labels)))
    panels.append(("ground truth", colourise(gt)))
    show_row(axes, panels)
    fig.suptitle(f"Fully connected CRF, mean field ({backend}): $w_{{bi}}$={params.bi_w:g}, "
                 f"$\\theta_\\alpha$={params.bi_xy_std:g}, $\\theta_\\beta$={params.bi_rgb_std:g}, "
                 f"$w_g$={params.pos_w:g}, $\\theta_\\gamma$={params.pos_xy_std:g}", y=0.995,
                 va="top")
    label_legend(fig, [dcnn, gt] + list(steps.values()), legend_y)
    return save(fig, out, "crf_iterations.png")


# ---------------------------------------------------------------------------------------------
# (e) training curves
# ---------------------------------------------------------------------------------------------

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
    return save(fig, out, "training_curves.png")


# ---------------------------------------------------------------------------------------------
# (f) per-class IoU with and without the CRF
# ---------------------------------------------------------------------------------------------

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
    for offset, scores, label, colour in ((-width / 2, plain, "DCNN (MSC)", "#4c72b0"),
                                          (width / 2, with_crf, "DCNN + CRF", "#dd8452")):
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
    return save(fig, out, "per_class_iou.png")


# ---------------------------------------------------------------------------------------------
# (g) trimap: accuracy near object boundaries
# ---------------------------------------------------------------------------------------------

def trimap_from_scores(scores: dict, widths) -> dict | None:
    """{width: {...}} from a scores file's "trimap" results, if they cover `widths`."""
    trimap = scores.get("trimap")
    if not trimap:
        return None
    trimap = {int(k): v for k, v in trimap.items()}
    return trimap if set(widths) <= set(trimap) else None


def compute_trimap(run: Run, widths, workers: int, progress: bool = False) -> tuple[dict, dict]:
    """Trimap scores of the DCNN (cached logits) and of the CRF (run on them), all val images."""
    from crf import CRFJob, run_crf
    from seglab.evaluation.metrics import TrimapEvaluator
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


def fig_trimap(run: Run, out: Path, widths=TRIMAP_WIDTHS, workers: int = 0) -> Path:
    """An example band, then mIoU and pixel accuracy within bands of growing width around the
    object boundaries (VOC's void outlines), with and without the CRF."""
    from seglab.evaluation.metrics import trimap_band
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
    item = run.val_images(1, with_logits=False)[0]
    gt = label_of(item, run.num_classes)
    band_width = widths[len(widths) // 2]
    band = trimap_band(gt, band_width)
    shown = colourise(gt).astype(float) * 0.35 + 255 * 0.65
    shown[band] = (214, 39, 40)
    shown[gt == IGNORE] = (0, 0, 0)
    show_row(axes[:1], [(f"band of {band_width} px (red) around\nthe void outlines (black)",
                         shown.astype(np.uint8))])
    for ax, key, label in ((axes[1], "miou", "mean IoU (%)"),
                           (axes[2], "pixel_acc", "pixel accuracy (%)")):
        for scores, name, colour in ((plain, "DCNN (MSC)", "#4c72b0"),
                                     (crf, "DCNN + CRF", "#dd8452")):
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
    return save(fig, out, "trimap.png")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

class Figure(NamedTuple):
    name: str
    needs_run: bool
    make: Callable


FIGURES = {
    "a": Figure("atrous_fov.png", False, lambda run, out, args: fig_atrous(out)),
    "b": Figure("network.png", False, lambda run, out, args: fig_network(out)),
    "c": Figure("msc.png", True, lambda run, out, args: fig_msc(run, out)),
    "d": Figure("crf_iterations.png", True, lambda run, out, args: fig_crf(run, out)),
    "e": Figure("training_curves.png", True,
                lambda run, out, args: fig_training_curves(run, out)),
    "f": Figure("per_class_iou.png", True, lambda run, out, args: fig_per_class_iou(run, out)),
    "g": Figure("trimap.png", True,
                lambda run, out, args: fig_trimap(run, out, args.trimap_widths, args.workers)),
}


def selected(only) -> list[str]:
    """Figure letters from --only (letters or file names, e.g. `c` or `msc`)."""
    if not only:
        return list(FIGURES)
    by_stem = {Path(f.name).stem: k for k, f in FIGURES.items()}
    keys = []
    for o in only:
        key = o if o in FIGURES else by_stem.get(Path(o).stem)
        if key is None:
            raise FigureError(f"unknown figure {o!r}: choose from "
                              + ", ".join(f"{k} ({f.name})" for k, f in FIGURES.items()))
        keys.append(key)
    return sorted(set(keys))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Regenerate every PNG in Figures/ from our code and a demo run: "
                    + "; ".join(f"{k}: {f.name}" for k, f in FIGURES.items())
                    + ". (a) and (b) need no run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="run folder of train.py with checkpoints/final.pth, log.csv and "
                                 "eval_val/ (default: runs/demo, the README's demo run)")
    p.add_argument("--out", default=str(ROOT / "Figures"), help="output folder")
    p.add_argument("--only", nargs="+", metavar="FIG",
                   help="only these figures (letters a-g or file names)")
    p.add_argument("--trimap-widths", type=int, nargs="+", default=list(TRIMAP_WIDTHS),
                   metavar="W", help="trimap band widths (px) for figure g")
    p.add_argument("--workers", type=int, default=0,
                   help="CRF worker processes for figure g when it computes the trimap "
                        "(0 = all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        keys = selected(args.only)
        run = None
        if any(FIGURES[k].needs_run for k in keys):
            run = load_run(args.run if args.run else default_run())
    except FigureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    written, failed = [], []
    for key in tqdm(keys, desc="figures", unit="fig"):
        try:
            written.append(FIGURES[key].make(run, out, args))
        except (FigureError, DataError, CheckpointError, LogitCacheError) as e:
            failed.append(f"{FIGURES[key].name}: {e}")
    if run is not None:
        print(f"run: {run.path}")
    print("written:\n" + "\n".join(f"  {p}" for p in written) if written else "nothing written")
    if failed:
        print("failed:\n" + "\n".join(f"  {f}" for f in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
