"""Dense CRF speed: per-image time and multi-process throughput of `run_crf`
(seglab/densecrf/runner.py, what `crf.py` and `evaluate.py --crf` run).

    python bench/bench_crf.py [--images 8] [--workers 1 2] [--repeats 3]
        [--backends pydensecrf torch]

Generates VOC-size test data in a temp folder: `--images` crops of 500x375 (W x H, the usual
VOC landscape size) from matplotlib's sample photo (a real photograph, so the bilateral lattice
is as busy as on VOC images), with cached logits as evaluate.py writes them: 21 classes at 1/8
resolution (65x65) of the 513x513 padded input, a blurred noisy one-hot of a few regions
(seglab/data/logit_cache.py's format). The photo and its crops: common.source_photo and
common.photo_crops.

For each backend it measures
  per-image   one process: load + upsample + unary (prep: load_crf_inputs) and the CRF itself
              (DenseCRF.infer), 10 iterations
  run_crf     throughput through `run_crf` with each worker count, in --repeats alternating
              rounds (the host's speed drifts; each N is compared with the 1-worker run of
              its own round, and the table gives the median): end to end (pool start
              included) and steady state (first job start to last job end, from the workers'
              own timestamps), and the parallel efficiency = throughput(N) / (N x throughput(1))
              ("eff. cpu": job CPU time with 1 worker / with N, which other load on the
              machine does not skew; it shows what running N jobs at once costs each job)
Prints a table and writes bench/results/crf.json (common.write_report: a row per backend and
worker count as printed; the summary holds each backend's per-image times and every round). On a
shared machine, other load skews the wall-clock numbers: the load average at the start and end,
and after each run, is recorded with them.
"""
from __future__ import annotations

from common import machine, photo_crops, source_photo, write_report  # noqa: E402
import argparse  # (common also puts Implementation/ on sys.path)
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from seglab.densecrf.dense_crf import DenseCRF, load_crf_inputs
from seglab.densecrf.params import CRFParams
from seglab.densecrf.runner import CRFJob, run_crf
from seglab.data.logit_cache import save_logits

H, W, NUM_CLASSES, PAD = 375, 500, 21, 513
RESULTS = Path(__file__).resolve().parent / "results" / "crf.json"


def make_data(folder: Path, n: int) -> list[CRFJob]:
    """n 500x375 crops + cached 21-class logits (65x65 for a 513x513 padded input)."""
    photo, rng = source_photo(), np.random.default_rng(0)
    jobs = []
    for k, image in enumerate(photo_crops(photo, n, H, W, rng)):
        path = folder / "JPEGImages" / f"bench_{k:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path, quality=90)
        # "network output": a few brightness regions as classes, on the padded 513x513 input
        gray = np.pad(image.mean(-1), ((0, PAD - H), (0, PAD - W)), mode="edge")
        regions = np.digitize(gray, np.quantile(gray, [0.3, 0.6, 0.85]))
        classes = np.concatenate([[0], rng.choice(np.arange(1, NUM_CLASSES), 3, replace=False)])
        onehot = np.eye(NUM_CLASSES)[classes[regions]][::8, ::8].transpose(2, 0, 1) * 5.0
        logits = ndimage.gaussian_filter(onehot, (0, 1, 1)) + rng.normal(0, 1, onehot.shape)
        logits_path = folder / "logits" / f"bench_{k:03d}.npz"
        save_logits(logits_path, logits, (PAD, PAD), (H, W))
        jobs.append(CRFJob(f"bench_{k:03d}", str(path), str(logits_path)))
    return jobs


def per_image(jobs, params, backend, device) -> dict:
    crf = DenseCRF(params, backend, device)
    image, unary = load_crf_inputs(jobs[0].image_path, jobs[0].logits_path)
    crf.infer(image, unary)  # warm-up
    prep, run, cpu = [], [], []
    for job in jobs:
        t0 = time.perf_counter()
        image, unary = load_crf_inputs(job.image_path, job.logits_path)
        t1, c1 = time.perf_counter(), time.process_time()
        crf.infer(image, unary)
        run.append(time.perf_counter() - t1)
        cpu.append(time.process_time() - c1)
        prep.append(t1 - t0)
    return {"crf_s_mean": statistics.mean(run), "crf_s_median": statistics.median(run),
            "crf_s_min": min(run), "crf_cpu_s_mean": statistics.mean(cpu),
            "prep_s_mean": statistics.mean(prep)}


def throughput(jobs, params, backend, device, workers) -> dict:
    t0 = time.perf_counter()
    results, failures = run_crf(jobs, params, workers=workers, backend=backend, device=device,
                                progress=False)
    wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"bench jobs failed: {failures}")
    steady = max(r.started + r.seconds for r in results) - min(r.started for r in results)
    return {"workers": workers, "images": len(results), "wall_s": wall, "steady_s": steady,
            "img_per_s_wall": len(results) / wall, "img_per_s_steady": len(results) / steady,
            "job_s_mean": statistics.mean(r.seconds for r in results),
            "job_cpu_s_mean": statistics.mean(r.cpu_seconds for r in results),
            "load_average_after": os.getloadavg()[0]}


def add_efficiency(runs: list[dict]) -> None:
    """Parallel efficiency of each run against the 1-worker run of the same round."""
    base = next((r for r in runs if r["workers"] == 1), None)
    if base is None:
        return
    for r in runs:
        for kind in ("wall", "steady"):
            r[f"efficiency_{kind}"] = (r[f"img_per_s_{kind}"]
                                       / (r["workers"] * base[f"img_per_s_{kind}"]))
        # load-independent: how much running N at once inflates each job's CPU time
        r["efficiency_cpu"] = base["job_cpu_s_mean"] / r["job_cpu_s_mean"]


def summarise(rounds: list[list[dict]]) -> list[dict]:
    """Per worker count: the median over rounds of every number, and the efficiencies' range."""
    summary = []
    for k, first in enumerate(rounds[0]):
        same = [runs[k] for runs in rounds]
        row = {key: statistics.median(r[key] for r in same) for key in first
               if isinstance(first[key], (int, float))}
        for key in [key for key in first if key.startswith("efficiency_")]:
            row[key + "_range"] = [min(r[key] for r in same), max(r[key] for r in same)]
        summary.append(dict(row, workers=first["workers"], rounds=len(same)))
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="test images (default: 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts for run_crf (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of all worker counts, alternating; the table shows the "
                             "median (default: 3)")
    parser.add_argument("--backends", nargs="+", default=["pydensecrf"],
                        choices=["pydensecrf", "torch"], help="CRF backends (default: pydensecrf)")
    parser.add_argument("--device", default="cpu", help="device for the torch backend")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output file")
    args = parser.parse_args(argv)
    params = CRFParams()  # the paper's: 10 iterations, w_bi 4, 67 / 3, w_pos 3, 1
    info = machine()
    backends = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = make_data(Path(tmp), args.images)
        for backend in args.backends:
            single = per_image(jobs, params, backend, args.device)
            rounds = []
            for _ in range(args.repeats):  # worker counts alternate, so each round is paired
                runs = [throughput(jobs, params, backend, args.device, w) for w in args.workers]
                add_efficiency(runs)
                rounds.append(runs)
            backends[backend] = {"per_image": single, "rounds": rounds,
                                 "run_crf": summarise(rounds)}

    print(f"dense CRF, {W}x{H}, {NUM_CLASSES} labels, {params.iterations} iterations, "
          f"{args.images} images, {os.cpu_count()} cores "
          f"(load average at start {info['load_average_at_start'][0]:.2f}); "
          f"median of {args.repeats} alternating rounds, efficiency range in brackets")
    print(f"{'backend':<11}{'workers':>8}{'s/img (1 proc)':>16}{'cpu s/img':>11}"
          f"{'job cpu s':>11}{'img/s wall':>12}{'img/s steady':>14}{'eff. wall':>23}"
          f"{'eff. steady':>23}{'eff. cpu':>23}")
    for backend, b in backends.items():
        for r in b["run_crf"]:
            print(f"{backend:<11}{r['workers']:>8}{b['per_image']['crf_s_mean']:>16.3f}"
                  f"{b['per_image']['crf_cpu_s_mean']:>11.3f}{r['job_cpu_s_mean']:>11.3f}"
                  f"{r['img_per_s_wall']:>12.3f}{r['img_per_s_steady']:>14.3f}"
                  + "".join(f"{efficiency(r, kind):>23}" for kind in ("wall", "steady", "cpu")))
    settings = dict(image_size_hw=[H, W], num_classes=NUM_CLASSES, params=params.to_dict(),
                    images=args.images, workers=args.workers, repeats=args.repeats,
                    backends=args.backends, device=args.device)
    rows = [dict(r, backend=backend, per_image=b["per_image"])
            for backend, b in backends.items() for r in b["run_crf"]]
    summary = {backend: {"per_image": b["per_image"], "rounds": b["rounds"]}
               for backend, b in backends.items()}
    return write_report(settings, info, rows, summary, args.out)


def efficiency(row: dict, kind: str) -> str:
    """'95.6% [90.1-97.0]': the median and range over rounds."""
    if f"efficiency_{kind}" not in row:
        return "-"
    low, high = row[f"efficiency_{kind}_range"]
    return f"{100 * row[f'efficiency_{kind}']:.1f}% [{100 * low:.1f}-{100 * high:.1f}]"


if __name__ == "__main__":
    main()
