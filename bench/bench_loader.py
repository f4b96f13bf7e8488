"""Training-data throughput: images/s through decoding + the Caffe training transform + the
DataLoader, with 0, 1 and 2 worker processes.

    python bench/bench_loader.py [--images 40] [--batch 10]
        [--crop 321] [--workers 0 1 2] [--batches 16] [--rounds 2] [--out PATH]

Data: a generated demo set of VOC-sized images (seglab.data.demo.make_demo_dataset, 375x500 H x W,
the usual VOC landscape size; JPEG quality 90 and palette PNG labels like VOC's), in a temp folder
unless `--data` names one to reuse.

Measured:
  per image    one process, no DataLoader: decode (JPEG + PNG, with the label checks) and the
               TrainTransform (seglab/data/transforms.py) (random scale from {0.5, ..., 1.5}, pad,
               crop, mirror, normalise), mean milliseconds over every image with two seeds each
  loader       seglab.data.loaders.train_loader (the positional TrainSampler, batch `--batch`):
               startup = seconds to the first batch (worker start-up included);
               steady  = images/s over the next `--batches` batches;
               overall = images/s from creating the loader to the last batch.
               The worker counts are timed interleaved, `--rounds` times, so other load on a
               shared machine hits each alike; the table shows the best round (the least
               disturbed), the JSON every round and the median.

Results: a printed table and `--out` (default bench/results/loader.json; common.write_report:
the settings, the machine with the load average at the start and end, other processes slowing
every row; a row per worker count; the per-image times in the summary).
"""
from __future__ import annotations

from common import machine, write_report  # noqa: E402  (also puts Implementation/ on sys.path)
import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from seglab.data.voc import VOCSegmentation
from seglab.data.demo import make_demo_dataset
from seglab.data.labels import load_label
from seglab.data.images import load_image
from seglab.data.loaders import train_loader
from seglab.data.transforms import TrainTransform

RESULTS = Path(__file__).resolve().parent / "results" / "loader.json"
SIZE = (375, 500)  # H, W


def per_image(dataset: VOCSegmentation, transform: TrainTransform) -> dict:
    """Mean ms per image of decoding and of the transform, in this process."""
    decode, augment = [], []
    for i in range(len(dataset)):
        for seed in (0, 1):
            t0 = time.perf_counter()
            image = load_image(dataset.image_path(i))
            label = load_label(dataset.label_path(i), image.shape[:2], dataset.num_classes)
            t1 = time.perf_counter()
            transform(image, label, np.random.default_rng(seed))
            t2 = time.perf_counter()
            decode.append(t1 - t0)
            augment.append(t2 - t1)
    decode_ms, augment_ms = 1000 * statistics.mean(decode), 1000 * statistics.mean(augment)
    return {"decode_ms": decode_ms, "transform_ms": augment_ms,
            "img_per_s_one_process": 1000.0 / (decode_ms + augment_ms)}


def time_loader(dataset, batch: int, workers: int, batches: int, seed: int) -> dict:
    """Startup, steady and overall throughput of one train_loader with `workers` workers."""
    start = time.perf_counter()
    loader = train_loader(dataset, batch, seed=seed, num_workers=workers)
    first = next(loader)
    assert first["image"].shape[0] == batch
    ready = time.perf_counter()
    for _ in itertools.islice(loader, batches):
        pass
    end = time.perf_counter()
    del loader  # shuts the (persistent) workers down
    return {"workers": workers, "startup_s": ready - start,
            "img_per_s_steady": batches * batch / (end - ready),
            "img_per_s_overall": (batches + 1) * batch / (end - start)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=40, help="generated training images")
    parser.add_argument("--batch", type=int, default=10, help="batch size (the paper's 10)")
    parser.add_argument("--crop", type=int, default=321, help="training crop (the paper's 321)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=16,
                        help="batches timed after the first one, per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per count")
    parser.add_argument("--seed", type=int, default=0, help="data and sampler seed")
    parser.add_argument("--data", type=Path, help="folder for the demo set (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output file")
    args = parser.parse_args(argv)

    report = {"settings": dict(vars(args), image_size_hw=list(SIZE)), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(args.data or Path(tmp), num_train=args.images, num_val=1,
                                 size=SIZE, seed=args.seed, progress=True)
        transform = TrainTransform(crop=args.crop)
        dataset = VOCSegmentation(root, "train", transform)
        report["per_image"] = per_image(dataset, transform)
        rounds = {w: [] for w in args.workers}
        for _ in range(args.rounds):
            for w in args.workers:
                rounds[w].append(time_loader(dataset, args.batch, w, args.batches, args.seed))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["loader"] = []
    for w, runs in rounds.items():
        best = max(runs, key=lambda r: r["img_per_s_steady"])
        report["loader"].append({
            "workers": w, "best": best, "rounds": runs,
            "median_img_per_s_steady": statistics.median(r["img_per_s_steady"] for r in runs)})

    load = report["machine"]
    p = report["per_image"]
    print(f"training data: {args.images} generated {SIZE[1]}x{SIZE[0]} images, batch "
          f"{args.batch}, crop {args.crop}, {os.cpu_count()} cores (load average "
          f"{load['load_average_at_start'][0]:.2f} at start, {load['load_average_at_end'][0]:.2f} "
          "at end)")
    print(f"per image, one process: decode {p['decode_ms']:.1f} ms + transform "
          f"{p['transform_ms']:.1f} ms = {p['img_per_s_one_process']:.1f} img/s")
    print(f"{'workers':>8}{'img/s steady':>14}{'median':>9}{'img/s overall':>15}{'startup s':>11}")
    for row in report["loader"]:
        b = row["best"]
        print(f"{row['workers']:>8}{b['img_per_s_steady']:>14.1f}"
              f"{row['median_img_per_s_steady']:>9.1f}{b['img_per_s_overall']:>15.1f}"
              f"{b['startup_s']:>11.2f}")
    return write_report(report["settings"], report["machine"], report["loader"],
                        {"per_image": report["per_image"]}, args.out)


if __name__ == "__main__":
    main()
