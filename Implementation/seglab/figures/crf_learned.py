"""crf_compat_learned.png: the label compatibility mu that `crf.py learn --compat full` fitted,
as a heat map of its change from Potts (mu - (1 - identity)), with the learned kernel weights.

    python -m seglab.figures.crf_learned runs/crf_learn/learned.json [--out Figures]

A negative entry (l, l') makes the pair cheaper than Potts says: neighbours labelled l' pull a
pixel towards l; a positive one makes it dearer. Classes absent from the fitting images keep
(almost) their Potts entries.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from seglab.densecrf.params import CRFParams  # noqa: E402
from seglab.figures.style import WIDTH, class_name, save, set_style  # noqa: E402

NAME = "crf_compat_learned.png"


def fig_crf_learned(params: CRFParams, out: Path, note: str = "") -> Path:
    if params.compat is None:
        raise ValueError("these parameters have no compatibility matrix (Potts): fit one with "
                         "`crf.py learn --compat full`")
    set_style()
    mu = np.array(params.compat)
    c = mu.shape[0]
    delta = mu - (1.0 - np.eye(c))
    names = [class_name(i) for i in range(c)]
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH, WIDTH * 0.48),
                             gridspec_kw={"width_ratios": [1, 1]})
    for ax, values, title in ((axes[0], mu, "learned compatibility mu(l, l')"),
                              (axes[1], delta, "change from Potts: mu - (1 - I)")):
        limit = max(np.abs(values).max(), 1e-6)
        cmap, vmin = ("viridis", values.min()) if values is mu else ("RdBu_r", -limit)
        im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=values.max() if values is mu else limit)
        ax.set_xticks(range(c), names, rotation=90, fontsize=8)
        ax.set_yticks(range(c), names, fontsize=8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"CRF-as-RNN compatibility fitted by `crf.py learn --compat full`: "
                 f"w_bi={params.bi_w:.2f}, w_pos={params.pos_w:.2f}, "
                 f"theta_alpha={params.bi_xy_std:g}, theta_beta={params.bi_rgb_std:g}"
                 + (f"\n{note}" if note else ""), fontsize=11)
    fig.tight_layout()
    return save(fig, out, NAME)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("params", type=Path, help="learned.json of `crf.py learn --compat full`")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[3] / "Figures")
    p.add_argument("--note", default="", help="a second title line (e.g. the data it saw)")
    args = p.parse_args(argv)
    try:
        path = fig_crf_learned(CRFParams.from_json(args.params), args.out, args.note)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
