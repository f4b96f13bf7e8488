"""The pure-PyTorch dense CRF (crf_torch.py) against pydensecrf: per-image time and label agreement.

    python bench/bench_crf_torch.py [--images 4] [--repeats 3]
        [--threads 1 2] [--device cpu]

Test data: `--images` VOC-size scenes, 500x375 (W x H), 21 labels: crops of matplotlib's sample
photograph (a real photo, so the bilateral lattice is as busy as on VOC images; a synthetic
scene if it is missing), with DeepLab-like unaries: 21-class logits at 1/8 resolution from a few
brightness regions plus noise, upsampled bilinearly, unary = -log softmax (clip 1e-5).

For every image, with the paper's CRF (10 iterations, w_bi 4, theta 67 / 3, w_pos 3, theta 1):
  pydensecrf   time per image (min over --repeats, interleaved with the torch runs)
  torch        time per image with each torch thread count, split into the lattice setup
               (iterations=0) and the mean-field iterations; ratio = torch / pydensecrf
               wall time, "cpu 1t" the same ratio of process CPU time with one thread (less
               skewed by other load on a shared machine)
  agreement    fraction of equal labels and max |dQ| vs pydensecrf, for normalise-after
               (our default) and symmetric (pydensecrf's default)
Prints a table and writes bench/results/crf_torch.json (with the resolved settings). Other load
on a shared machine skews the times; the load average is recorded with them.
"""
from __future__ import annotations

from common import write_report  # noqa: E402  (also puts Implementation/ on sys.path)
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from seglab.densecrf.torch_crf import dense_crf

H, W, NUM_CLASSES = 375, 500, 21
PARAMS = dict(iterations=10, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0)
RESULTS = Path(__file__).resolve().parent / "results" / "crf_torch.json"


def source_photo() -> np.ndarray:
    """A real photograph (matplotlib's sample data), or a synthetic scene if it is missing."""
    import matplotlib
    from PIL import Image
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :600]
    base = np.stack([(xx // 75) * 30, (yy // 60) * 25, ((xx + yy) // 90) * 20], -1) % 256
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def make_scenes(n: int, seed: int = 0):
    """n (image (H, W, 3) uint8, unary (C, H, W) float32) pairs."""
    photo, rng = source_photo(), np.random.default_rng(seed)
    scenes = []
    for k in range(n):
        y0 = int(rng.integers(0, photo.shape[0] - H + 1))
        x0 = int(rng.integers(0, photo.shape[1] - W + 1))
        image = photo[y0:y0 + H, x0:x0 + W]
        image = np.ascontiguousarray(image[:, ::-1] if k % 2 else image)
        gray = image.mean(-1)
        regions = np.digitize(gray, np.quantile(gray, [0.3, 0.6, 0.85]))
        classes = np.concatenate([[0], rng.choice(np.arange(1, NUM_CLASSES), 3, replace=False)])
        onehot = np.eye(NUM_CLASSES)[classes[regions]].transpose(2, 0, 1)[:, ::8, ::8] * 5.0
        coarse = ndimage.gaussian_filter(onehot, (0, 1, 1)) + rng.normal(0, 1, onehot.shape)
        logits = torch.nn.functional.interpolate(torch.from_numpy(coarse)[None].float(), size=(H, W),
                                                 mode="bilinear", align_corners=True)[0]
        unary = -torch.log_softmax(logits, 0).clamp(max=-np.log(1e-5))
        scenes.append((image, unary.numpy().astype(np.float32)))
    return scenes


def pydensecrf_q(image, unary, normalization="after", iterations=PARAMS["iterations"]):
    import pydensecrf.densecrf as dcrf
    norm = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC}[normalization]
    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1)))
    d.addPairwiseGaussian(sxy=PARAMS["pos_xy_std"], compat=PARAMS["pos_w"], normalization=norm)
    d.addPairwiseBilateral(sxy=PARAMS["bi_xy_std"], srgb=PARAMS["bi_rgb_std"], rgbim=image,
                           compat=PARAMS["bi_w"], normalization=norm)
    return np.array(d.inference(iterations)).reshape(c, h, w)


def torch_q(image, unary, device, normalization="after", iterations=PARAMS["iterations"]):
    params = dict(PARAMS, iterations=iterations)
    q = dense_crf(image, unary, normalization=normalization, device=device, **params)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return q


def timed(fn) -> tuple:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="test images (default: 4)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per image and setting; the minimum is reported (default: 3)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to time (default: 1 2)")
    parser.add_argument("--device", default="cpu", help="device for the torch backend (default: cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default: {RESULTS})")
    args = parser.parse_args(argv)

    scenes = make_scenes(args.images)
    threads_before = torch.get_num_threads()
    torch_q(*scenes[0], args.device, iterations=1)                        # warm-up
    rows = []
    load_start = os.getloadavg()
    for k, (image, unary) in enumerate(tqdm(scenes, desc="images", unit="img")):
        runs = {"pydensecrf": [], **{f"torch_{t}t": [] for t in args.threads},
                **{f"torch_{t}t_setup": [] for t in args.threads}}
        for _ in range(args.repeats):                       # interleaved: load hits all alike
            runs["pydensecrf"].append(timed(lambda: pydensecrf_q(image, unary)))
            for t in args.threads:
                torch.set_num_threads(t)
                runs[f"torch_{t}t"].append(timed(lambda: torch_q(image, unary, args.device)))
                runs[f"torch_{t}t_setup"].append(
                    timed(lambda: torch_q(image, unary, args.device, iterations=0)))
        torch.set_num_threads(threads_before)
        row = {"image": k}
        for key, times in runs.items():                     # fastest run: least disturbed
            row[f"{key}_s"] = min(wall for wall, _ in times)
            row[f"{key}_cpu_s"] = min(cpu for _, cpu in times)
        for t in args.threads:
            row[f"torch_{t}t_per_iteration_s"] = ((row[f"torch_{t}t_s"] - row[f"torch_{t}t_setup_s"])
                                                  / PARAMS["iterations"])
            row[f"ratio_{t}t"] = row[f"torch_{t}t_s"] / row["pydensecrf_s"]
            row[f"cpu_ratio_{t}t"] = row[f"torch_{t}t_cpu_s"] / row["pydensecrf_cpu_s"]
        for norm in ("after", "symmetric"):
            ref, ours = pydensecrf_q(image, unary, norm), torch_q(image, unary, args.device, norm)
            row[f"agreement_{norm}"] = float((ref.argmax(0) == ours.argmax(0)).mean())
            changed = ref.argmax(0) != unary.argmin(0)
            row[f"agreement_changed_{norm}"] = float((ref.argmax(0) == ours.argmax(0))[changed].mean())
            row[f"crf_changed_fraction_{norm}"] = float(changed.mean())
            row[f"max_abs_dq_{norm}"] = float(np.abs(ref - ours).max())
        rows.append(row)

    summary = {key: statistics.mean(r[key] for r in rows) for key in rows[0] if key != "image"}
    report = {"settings": {"image_size_hw": [H, W], "num_classes": NUM_CLASSES, "crf": PARAMS,
                           "normalization_timed": "after", "images": args.images,
                           "repeats": args.repeats, "threads": args.threads, "device": args.device},
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                          "platform": platform.platform(), "torch": torch.__version__,
                          "load_average_start": list(load_start),
                          "load_average_end": list(os.getloadavg())},
              "per_image": rows, "mean": summary}

    print(f"dense CRF {W}x{H}, {NUM_CLASSES} labels, {PARAMS['iterations']} iterations, "
          f"device {args.device}, {os.cpu_count()} cores, load average {load_start[0]:.2f} -> "
          f"{report['machine']['load_average_end'][0]:.2f}; times: min of {args.repeats} runs (s)")
    head = f"{'image':>6}{'pydensecrf':>12}"
    for t in args.threads:
        head += f"{f'torch {t}t':>10}{'setup':>8}{'/iter':>8}{'ratio':>7}"
    head += f"{'cpu 1t':>8}{'agree after':>13}{'agree sym':>11}{'max|dQ|':>10}"
    print(head)
    for r in rows + [dict(summary, image="mean")]:
        line = f"{r['image']:>6}{r['pydensecrf_s']:>12.3f}"
        for t in args.threads:
            line += (f"{r[f'torch_{t}t_s']:>10.3f}{r[f'torch_{t}t_setup_s']:>8.3f}"
                     f"{r[f'torch_{t}t_per_iteration_s']:>8.3f}{r[f'ratio_{t}t']:>7.2f}")
        line += f"{r['cpu_ratio_1t']:>8.2f}" if 1 in args.threads else f"{'':>8}"
        line += (f"{100 * r['agreement_after']:>12.3f}%{100 * r['agreement_symmetric']:>10.3f}%"
                 f"{max(r['max_abs_dq_after'], r['max_abs_dq_symmetric']):>10.1e}")
        print(line)
    return write_report(report, args.out)


if __name__ == "__main__":
    main()
