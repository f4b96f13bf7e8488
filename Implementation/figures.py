"""Regenerates every image in Figures/ from our code and a (demo) run.

    python Implementation/train.py --config demo          # once: the run the figures read
    python Implementation/figures.py                      # newest runs/demo*/ -> Figures/
    python Implementation/figures.py --run runs/NAME --only c d
    python Implementation/figures.py --real weights/mnv2_dm1.pth   # the real-photo figures

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

With --real CHECKPOINT (a real VOC-trained network, e.g. Google's DeepLab v3 MobileNetV2 through
`convert.py tflite`) it draws msc_real.png, crf_real.png and overlay_real.png instead, on a
public-domain photo that scikit-image ships (seglab/figures/real.py).

(a) and (b) need no run. Label maps use the VOC colour map (void = 255 in its VOC colour) and
a legend of the classes shown. Figures are 12 inches wide at 110 dpi, so they read at README
width. Each figure is drawn by its own module in seglab/figures/ (style.py and run.py are what
they share); this file is the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from tqdm import tqdm

from seglab.checkpoint import CheckpointError
from seglab.data.labels import DataError
from seglab.data.logit_cache import LogitCacheError
from seglab.figures import atrous, crf, msc, network, real, scores, training
from seglab.figures.run import ROOT, FigureError, default_run, load_run


class Figure(NamedTuple):
    name: str
    needs_run: bool
    make: Callable


FIGURES = {
    "a": Figure(atrous.NAME, False, lambda run, out, args: atrous.fig_atrous(out)),
    "b": Figure(network.NAME, False, lambda run, out, args: network.fig_network(out)),
    "c": Figure(msc.NAME, True, lambda run, out, args: msc.fig_msc(run, out)),
    "d": Figure(crf.NAME, True, lambda run, out, args: crf.fig_crf(run, out)),
    "e": Figure(training.NAME, True,
                lambda run, out, args: training.fig_training_curves(run, out)),
    "f": Figure(scores.IOU_NAME, True, lambda run, out, args: scores.fig_per_class_iou(run, out)),
    "g": Figure(scores.TRIMAP_NAME, True,
                lambda run, out, args: scores.fig_trimap(run, out, args.trimap_widths,
                                                         args.workers)),
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
                    + ". (a) and (b) need no run; --real CHECKPOINT draws the real-photo figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", help="run folder of train.py with checkpoints/final.pth, log.csv and "
                                 "eval_val/ (default: runs/demo, the README's demo run)")
    p.add_argument("--out", default=str(ROOT / "Figures"), help="output folder")
    p.add_argument("--only", nargs="+", metavar="FIG",
                   help="only these figures (letters a-g or file names)")
    p.add_argument("--trimap-widths", type=int, nargs="+", default=list(scores.TRIMAP_WIDTHS),
                   metavar="W", help="trimap band widths (px) for figure g")
    p.add_argument("--real", metavar="CHECKPOINT",
                   help="draw the real-photo figures with this VOC-trained checkpoint instead")
    p.add_argument("--photo", default="astronaut", choices=real.PHOTOS,
                   help="the scikit-image photo for --real")
    p.add_argument("--workers", type=int, default=0,
                   help="CRF worker processes for figure g when it computes the trimap "
                        "(0 = all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.real:
        try:
            written = real.fig_real(args.real, out, args.photo)
        except (FigureError, DataError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print("written:\n" + "\n".join(f"  {p}" for p in written))
        return 0
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
