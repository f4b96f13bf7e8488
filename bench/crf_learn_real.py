"""Stage two, learned vs searched, on real photographs: `crf.py learn --folds 2` (Potts and full
compatibility) against the paper's CRF values and `crf.py search --folds 2` on the full paper grid.

    python bench/crf_learn_real.py [--voc ../shared/real/voc_dev] [--work /tmp/crf_learn_real]

The logits are the single-scale ones of Google's DeepLab v3 MobileNetV2 (depth 1.0, TF Lite
release, converted by `convert.py tflite`) on the 20 real VOC 2012 val images of ../shared/real
(cached once in --work, as bench/real_stage_two.py makes them). The three fits run as a user runs
them, `crf.py` in a subprocess, back to back, each timed with the load average before and after
(another process may share the CPU: wall times are noisy). Every row is scored on held-out
images only: with 2-fold cross-validation each image gets the parameters fitted (or searched) on
the other fold; the trimap bands (mIoU within k px of a boundary) come from those same held-out
predictions, at full resolution with pydensecrf. Also measured, on a synthetic 500x375 image with
21 labels: the peak memory of a backward pass through 10 mean-field iterations (torch backend),
with and without checkpointing the iterations. Results: bench/results/crf_learn_real.json.
"""
from __future__ import annotations

from common import ROOT, machine, write_report  # noqa: E402  (also puts Implementation/ on sys.path)
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = ROOT.parent / "shared" / "real"
RESULTS = Path(__file__).resolve().parent / "results" / "crf_learn_real.json"
TRIMAP = (1, 2, 4, 8, 16, 32)
CRF = ROOT / "Implementation" / "crf.py"

MEMORY_PROBE = r"""
import resource, sys, time
import numpy as np, torch
from seglab.densecrf import torch_crf as tc
torch.set_num_threads(1)
h, w, c, ck = 375, 500, 21, bool(int(sys.argv[1]))
rng = np.random.default_rng(0)
lab = (np.arange(h)[:, None] // 75 + np.arange(w)[None] // 100) % c
img = np.clip(rng.normal(40 + 9 * lab[..., None], 10, (h, w, 3)), 0, 255).astype(np.uint8)
logits = np.eye(c, dtype=np.float32)[lab].transpose(2, 0, 1) * 2 + rng.normal(0, 1.5, (c, h, w))
unary = torch.from_numpy(-np.log(np.clip(np.exp(logits) / np.exp(logits).sum(0), 1e-5, None))
                         .astype(np.float32)).reshape(c, -1).t().contiguous()
kernels = tc.differentiable_kernels(torch.from_numpy(img), h, w, 67.0, 3.0, 1.0)
weights = torch.tensor([3.0, 4.0], requires_grad=True)
compat = torch.tensor(1 - np.eye(c), dtype=torch.float32, requires_grad=True)
labels = torch.from_numpy(lab.reshape(-1))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tic = time.time()
log_q = tc.mean_field_differentiable(unary, kernels, weights, compat, 10, checkpoint=ck)
torch.nn.functional.nll_loss(log_q, labels).backward()
seconds = time.time() - tic
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{before / 1024:.1f} {peak / 1024:.1f} {seconds:.2f}")
"""


def memory(checkpoint: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "Implementation"))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(int(checkpoint))], env=env,
                         check=True, capture_output=True, text=True).stdout.split()
    before, peak, seconds = map(float, out)
    return dict(checkpoint=checkpoint, rss_before_mb=before, peak_rss_mb=peak,
                backward_growth_mb=peak - before, forward_backward_s=seconds)


def build_cache(voc: Path, tflite: Path, work: Path) -> Path:
    from seglab.evaluation.evaluate import EvalSettings, evaluate
    cache = work / "ss" / "logits"
    if len(list(cache.glob("*.npz"))) >= 20:
        return cache
    ckpt = work / "mnv2.pth"
    if not ckpt.is_file():
        subprocess.run([sys.executable, str(ROOT / "Implementation" / "convert.py"), "tflite",
                        str(tflite), str(ckpt)], check=True, stdout=subprocess.DEVNULL)
    settings = EvalSettings(data_root=str(voc), device="cpu", save_predictions=False,
                            msc_scales=(), crf_workers=2)
    evaluate(ckpt, settings, out_dir=work / "ss", show_progress=False)
    return cache


def timed(cmd: list[str], record: Path, reuse: bool) -> dict:
    """Run `cmd` (unless `reuse` and `record` holds a finished run): wall seconds, CPU seconds
    of it and every process it started (the workers included), the load average around it."""
    if reuse and record.is_file():
        return json.loads(record.read_text())
    import resource
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.time()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = dict(seconds=time.time() - tic, load_before=load, load_after=os.getloadavg()[0],
               cpu_seconds=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))
    record.write_text(json.dumps(out) + "\n")
    return out


def held_out_scores(voc_root: Path, cache: Path, chosen: list[dict]) -> dict:
    """mIoU, pixel acc and trimap bands of each fold's held-out images under that fold's
    parameters (pydensecrf, full resolution)."""
    from seglab.densecrf.params import CRFParams
    from seglab.densecrf.runner import CRFJob, run_crf
    from seglab.data.logit_cache import cache_path
    from seglab.data.metrics import ConfusionMatrix, TrimapEvaluator
    cm, tri = ConfusionMatrix(21), TrimapEvaluator(TRIMAP, 21)
    for fold in chosen:
        jobs = [CRFJob(i, str(voc_root / "JPEGImages" / f"{i}.jpg"), str(cache_path(cache, i)),
                       gt_path=str(voc_root / "SegmentationClass" / f"{i}.png"))
                for i in fold["scored_on"]]
        results, failures = run_crf(jobs, CRFParams(**fold["params"]), 2, trimap_widths=TRIMAP,
                                    progress=False)
        if failures:
            raise RuntimeError(f"CRF failures: {failures}")
        for r in results:
            cm.merge(r.confusion)
            tri.merge(r.trimap)
    s = cm.scores()
    return dict(miou=s["miou"], pixel_acc=s["pixel_acc"],
                trimap={w: v["miou"] for w, v in tri.scores().items()})


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", type=Path, default=SHARED / "voc_dev")
    p.add_argument("--tflite", type=Path, default=SHARED / "models" /
                   "deeplabv3_mnv2_pascal_quant.tflite")
    p.add_argument("--work", type=Path, default=Path("/tmp/crf_learn_real"))
    p.add_argument("--reuse", action="store_true",
                   help="reuse the runs already finished in --work (their folders and timings)")
    p.add_argument("--only", choices=("search", "potts", "full"), nargs="+",
                   default=["search", "potts", "full"], help="the runs to make (default: all)")
    args = p.parse_args(argv)
    info = machine()
    report = {"memory_backward_500x375_21_labels_10_iterations": [memory(True), memory(False)]}
    for m in report["memory_backward_500x375_21_labels_10_iterations"]:
        print(f"memory, checkpoint={m['checkpoint']}: peak RSS {m['peak_rss_mb']:.0f} MB "
              f"(+{m['backward_growth_mb']:.0f} MB over the set-up), {m['forward_backward_s']:.2f} s")
    if not args.tflite.is_file() or not (args.voc / "VOCdevkit").is_dir():
        print(f"skipping the real-data comparison: needs {args.tflite} and {args.voc}/VOCdevkit "
              "(../shared/real, see bench/real_stage_two.py); the memory figures above stand "
              f"(not written: {RESULTS} keeps the last full run)")
        return report
    args.work.mkdir(parents=True, exist_ok=True)
    cache = build_cache(args.voc, args.tflite, args.work)
    voc_root = args.voc / "VOCdevkit" / "VOC2012"
    common = ["--cache", str(cache), "--data-root", str(args.voc), "--folds", "2",
              "--num-images", "20", "crf.workers=2"]
    timing = {}
    search_out = args.work / "search"
    if "search" in args.only:
        timing["search (paper grid, 128 settings)"] = timed(
            [sys.executable, str(CRF), "search", "--out", str(search_out), *common],
            args.work / "search_timing.json", args.reuse)
    for compat in ("potts", "full"):
        if compat in args.only:
            timing[f"learn ({compat})"] = timed(
                [sys.executable, str(CRF), "learn", "--compat", compat, "--out",
                 str(args.work / f"learn_{compat}"), *common],
                args.work / f"learn_{compat}_timing.json", args.reuse)
    if set(args.only) != {"search", "potts", "full"}:
        print(f"made {args.only}; the table needs all three (--reuse to add the others)")
        return None
    cv = {"search (paper grid, 128 settings)": search_out / "cross_validation.json",
          "learn (potts)": args.work / "learn_potts" / "cross_validation.json",
          "learn (full)": args.work / "learn_full" / "cross_validation.json"}
    folds = {k: json.loads(v.read_text()) for k, v in cv.items()}
    from seglab.densecrf.params import CRFParams
    paper_folds = [dict(c, params=CRFParams().to_dict()) for c in folds["learn (potts)"]["chosen"]]
    no_crf = dict(CRFParams(iterations=0).to_dict())
    rows = {"no CRF": held_out_scores(voc_root, cache, [dict(c, params=no_crf)
                                                        for c in paper_folds]),
            "CRF, the paper's values": held_out_scores(voc_root, cache, paper_folds)}
    for name, data in folds.items():
        rows[name] = held_out_scores(voc_root, cache, data["chosen"])
        rows[name].update(cv_miou=data["crf"]["miou"], wall_s=timing[name]["seconds"],
                          cpu_s=timing[name].get("cpu_seconds"),
                          load=[timing[name]["load_before"], timing[name]["load_after"]],
                          chosen=[c["params"] for c in data["chosen"]])
    learned_full = json.loads((args.work / "learn_full" / "learned.json").read_text())
    report.update(learned_full_compat=learned_full,
                  learned_potts=json.loads((args.work / "learn_potts" / "learned.json")
                                           .read_text()))
    print(f"\n{'':<36}{'mIoU':>7}{'pix acc':>9}" + "".join(f"{'tri ' + str(w):>8}"
                                                          for w in TRIMAP) + f"{'wall s':>9}{'CPU s':>8}")
    for name, r in rows.items():
        tri = "".join(f"{100 * r['trimap'][w]:8.2f}" for w in TRIMAP)
        wall = f"{r['wall_s']:9.0f}{r['cpu_s'] or 0:8.0f}" if "wall_s" in r else ""
        print(f"{name:<36}{100 * r['miou']:7.2f}{100 * r['pixel_acc']:9.2f}{tri}{wall}")
    settings = dict(voc=str(args.voc), tflite=str(args.tflite), images=20, folds=2,
                    trimap=list(TRIMAP), only=args.only, reuse=args.reuse)
    return write_report(settings, info, [dict(r, row=name) for name, r in rows.items()], report,
                        RESULTS)


if __name__ == "__main__":
    main()
