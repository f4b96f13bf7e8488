"""Stage two on real photographs: what MSC, the flip and the dense CRF add to a real VOC-trained
network, measured with the pipeline's own evaluation on real VOC 2012 val images.

    python bench/real_stage_two.py [--voc ../shared/real/voc_dev] [--tflite FILE] [--workers 2]
        [--folds 2] [--out FILE]

The network is Google's DeepLab v3 MobileNetV2 (depth 1.0, VOC-trained, TF Lite release;
download: see `python Implementation/convert.py tflite --help`), converted by
`convert.py tflite`. Rows (all through seglab.evaluation.evaluate, the VOC protocol: pad to 513;
the CRF through seglab/densecrf/runner.py):
  single scale              the network once
  MSC, max                  the paper's scales 1, 0.75, 0.5, fused by max (as DeepLab v2 trains)
  MSC, mean                 the same scales, class probabilities averaged (TF DeepLab's test)
  MSC, mean + flip          ... and the left-right mirror
  + CRF (paper)             the dense CRF with the paper's ResNet-101 parameters, on the single
                            scale and on the MSC-mean logits
  + CRF (searched)          the paper's grid search on the single-scale logits
                            (seglab/densecrf/search.py), 2-fold cross-validated: each image is
                            scored with the setting tuned on the other fold, never on itself (a
                            reduced grid, GRID below, to keep the run to minutes on 2 cores)
Each row gives mIoU, pixel accuracy, per-class IoU and the trimap bands (mIoU within k px of a
boundary). The images are the ones in --voc (20 VOC val images in this project's shared data);
numbers on so few images carry a few points of sampling noise. Results:
bench/results/real_stage_two.json (common.write_report: a row per table row; the image count and
CRF failures in the summary).
"""
from __future__ import annotations

from common import REAL, ROOT, machine, write_report  # noqa: E402  (puts Implementation/ on path)
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from seglab.densecrf.runner import CRFJob
from seglab.densecrf.search import cross_validate, score_grid, search_grid
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.data.logit_cache import cache_path

RESULTS = Path(__file__).resolve().parent / "results" / "real_stage_two.json"
TRIMAP = (1, 2, 4, 8, 16, 32)
GRID = {"bi_w": [3, 5], "bi_xy_std": [30, 50, 70, 90], "bi_rgb_std": [3, 5]}


def convert(tflite: Path, out: Path) -> Path:
    cmd = [sys.executable, str(ROOT / "Implementation" / "convert.py"), "tflite", str(tflite),
           str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def row(scores: dict) -> dict:
    return dict(miou=scores["miou"], pixel_acc=scores["pixel_acc"],
                iou=dict(zip(scores["class_names"], scores["iou"])),
                trimap={int(k): v["miou"] for k, v in scores.get("trimap", {}).items()})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", type=Path, default=REAL / "voc_dev")
    p.add_argument("--tflite", type=Path, default=REAL / "models" /
                   "deeplabv3_mnv2_pascal_quant.tflite")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not args.tflite.is_file() or not (args.voc / "VOCdevkit").is_dir():
        sys.exit(f"needs {args.tflite} and {args.voc}/VOCdevkit (see the script's docstring)")
    info, rows = machine(), {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = convert(args.tflite, tmp / "mnv2.pth")
        base = EvalSettings(data_root=str(args.voc), trimap_widths=TRIMAP, crf_workers=args.workers,
                            device="cpu", save_predictions=False)
        msc = dict(msc_scales=(0.75, 0.5))
        runs = {"single scale": ("ss", dict(msc_scales=())),
                "MSC, max (the paper's fusion)": ("max", msc),
                "MSC, mean of probabilities": ("mean", dict(msc, msc_fusion="mean")),
                "MSC, mean + flip": ("flip", dict(msc, msc_fusion="mean", flip=True)),
                "single scale + CRF (paper's parameters)": ("ss", dict(msc_scales=(), crf=True)),
                "MSC mean + CRF (paper's parameters)": ("mean", dict(msc, msc_fusion="mean",
                                                                     crf=True))}
        for name, (folder, kw) in runs.items():
            settings = EvalSettings(**dict(vars(base), **kw))
            scores = evaluate(ckpt, settings, out_dir=tmp / folder, show_progress=False)
            rows[name] = row(scores["crf"] if kw.get("crf") else scores)
            print(f"{name}: {100 * rows[name]['miou']:.2f}", flush=True)
        cache = tmp / "ss" / "logits"
        ids = sorted(q.stem for q in cache.glob("*.npz"))
        voc = args.voc / "VOCdevkit" / "VOC2012"
        jobs = [CRFJob(i, str(voc / "JPEGImages" / f"{i}.jpg"), str(cache_path(cache, i)),
                       gt_path=str(voc / "SegmentationClass" / f"{i}.png")) for i in ids]
        candidates, confusions, failures = score_grid(jobs, search_grid(**GRID), args.workers,
                                                      progress=True)
        cv = cross_validate(candidates, confusions, ids, args.folds)
        rows[f"single scale + CRF (searched, {args.folds}-fold CV)"] = dict(
            miou=cv["crf"]["miou"], pixel_acc=cv["crf"]["pixel_acc"],
            iou=dict(zip(rows["single scale"]["iou"], cv["crf"]["iou"])), trimap={},
            chosen=[c["params"] for c in cv["chosen"]])
    print(f"\n{len(ids)} real VOC 2012 val images, DeepLab v3 MobileNetV2 (TF Lite release, "
          "converted), VOC protocol")
    print(f"{'':<44}{'mIoU':>7}{'pix acc':>9}" + "".join(f"{'tri ' + str(w):>8}" for w in TRIMAP))
    for name, r in rows.items():
        tri = "".join(f"{100 * r['trimap'][w]:8.2f}" if w in r["trimap"] else f"{'':>8}"
                      for w in TRIMAP)
        print(f"{name:<44}{100 * r['miou']:7.2f}{100 * r['pixel_acc']:9.2f}{tri}")
    settings = dict(voc=args.voc, tflite=args.tflite, workers=args.workers, folds=args.folds,
                    trimap=TRIMAP, grid=GRID)
    return write_report(settings, info, [dict(r, row=name) for name, r in rows.items()],
                        dict(images=len(ids), failures=len(failures)), args.out)


if __name__ == "__main__":
    main()
