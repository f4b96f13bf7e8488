"""Stage two end to end: `evaluate.py --crf` on a VOC-size split with DeepLab v2 ResNet-101.

    python bench/bench_stage_two.py [--images 200] [--precision bf16|fp32|int8] [--workers 2]
        [--backends pydensecrf torch torch-fp16] [--stream] [--quick] [--out FILE]

Writes a VOC-layout split of `--images` 500x375 photographs (crops and mirrors of scikit-image's
public-domain sample photos, common.skimage_photos; labels are random blobs: the speed of the
network and of the CRF does not depend on them) and a ResNet-101 DeepLab v2 with random weights,
then measures, in one run:
  network only       evaluate() (seglab/evaluation/evaluate.py, what evaluate.py runs) without the
                     CRF: the MSC network pass at 513 (VOC protocol), on every core through torch's
                     threads; `--precision int8` exports the network with MSC to ONNX and quantises
                     it (export.py int8, calibrated on 16 crops of the split: speed only) and
                     evaluates that file in onnxruntime
  CRF only           for each of --backends: the CRF on the cached logits (every image a cache
                     hit), --workers processes, each image loaded, upsampled, solved and scored
  end to end         evaluate() with the CRF (the first backend) from an empty cache, as a user
                     runs it: the network pass on every core, then the CRF on every core
  streamed           with --stream: the same with crf.stream=true (the CRF of each image starts
                     in a worker as soon as its logits are cached, beside the network pass)
For each row: images per second, seconds per image, the projection to VOC val's 1,449 images
(seconds per image x 1,449), and the share of the cores kept busy (CPU seconds of this process
and its workers / (wall seconds x cores), common.timed). Run it on an idle machine; the load
average before and after is recorded. Results: bench/results/stage_two_<precision>.json
(common.write_report: a row per stage; the VOC val projections in the summary), or --out;
`--quick` writes only to --out.
"""
from __future__ import annotations

from common import (RESULTS, ROOT, machine, skimage_photos, timed,  # noqa: E402
                    write_report)  # (common also puts Implementation/ on sys.path)
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglab.checkpoint import atomic_save, make_checkpoint
from seglab.data.labels import save_label_png
from seglab.densecrf.params import BACKENDS, CRFParams
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.models import build_model

H, W, VOC_VAL = 375, 500, 1449


def make_split(root: Path, n: int) -> None:
    """n VOC-size crops of the sample photos (resized so the shorter side fits), random labels."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    photos = skimage_photos(H, W)
    ids = []
    for k in range(n):
        photo = photos[k % len(photos)]
        y0 = int(rng.integers(0, photo.shape[0] - H + 1))
        x0 = int(rng.integers(0, photo.shape[1] - W + 1))
        image = photo[y0:y0 + H, x0:x0 + W]
        image = image[:, ::-1] if (k // len(photos)) % 2 else image
        image_id = f"bench_{k:04d}"
        Image.fromarray(np.ascontiguousarray(image)).save(voc / "JPEGImages" / f"{image_id}.jpg",
                                                          quality=90)
        label = np.zeros((H, W), np.uint8)
        for _ in range(3):
            cy, cx, r = rng.integers(0, H), rng.integers(0, W), rng.integers(30, 120)
            yy, xx = np.ogrid[:H, :W]
            label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 21)
        save_label_png(voc / "SegmentationClass" / f"{image_id}.png", label)
        ids.append(image_id)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def int8_file(ckpt: Path, data: Path, out: Path) -> Path:
    """The network with MSC as an int8 ONNX file (export.py int8), calibrated on the split."""
    subprocess.run([sys.executable, str(ROOT / "Implementation" / "export.py"), "int8",
                    "--checkpoint", str(ckpt), "--out", str(out), "--msc", "--calibration",
                    str(data), "--split", "val", "--crops", "16"], check=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="images in the split")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "int8"))
    p.add_argument("--workers", type=int, default=2, help="CRF worker processes")
    p.add_argument("--backends", nargs="+", default=["pydensecrf", "torch", "torch-fp16"],
                   choices=BACKENDS, help="CRF backends to time; the first runs end to end")
    p.add_argument("--stream", action="store_true", help="also time crf.stream=true")
    p.add_argument("--quick", action="store_true", help="8 images, a smoke check")
    p.add_argument("--out", type=Path, help="JSON results file (default: "
                   "bench/results/stage_two_<precision>.json; --quick writes none unless given)")
    args = p.parse_args(argv)
    n = 8 if args.quick else args.images
    cores = os.cpu_count() or 1
    info = machine()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_split(tmp / "data", n)
        torch.manual_seed(0)
        net = build_model({"name": "deeplabv2", "num_classes": 21})
        ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp / "r101.pth")
        del net
        if args.precision == "int8":
            ckpt = int8_file(ckpt, tmp / "data", tmp / "r101_int8.onnx")
        settings = EvalSettings(data_root=str(tmp / "data"),
                                precision="fp32" if args.precision == "int8" else args.precision,
                                device="cpu", crf_workers=args.workers,
                                crf_backend=args.backends[0], crf_params=CRFParams(),
                                save_predictions=False)
        run = lambda out, **kw: evaluate(ckpt, EvalSettings(**dict(vars(settings), **kw)),  # noqa
                                         out_dir=tmp / out, show_progress=True)
        rows[f"network only ({args.precision})"] = timed(lambda: run("a"), children=True)
        for backend in args.backends:                    # every image a cache hit
            rows[f"CRF only ({backend})"] = timed(lambda: run("a", crf=True, crf_backend=backend),
                                                  children=True)
        shutil.rmtree(tmp / "a")
        rows[f"end to end ({args.backends[0]})"] = timed(lambda: run("b", crf=True),
                                                         children=True)
        if args.stream:
            rows[f"streamed ({args.backends[0]})"] = timed(
                lambda: run("c", crf=True, crf_stream=True), children=True)
    print(f"\n{n} images of {W}x{H}, ResNet-101 MSC at 513, {args.precision}, CRF x "
          f"{args.workers} workers, {cores} cores, load average "
          f"{info['load_average_at_start'][0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'stage':<30}{'s':>8}{'img/s':>8}{'s/img':>8}{'cores busy':>12}{'VOC val (1,449)':>18}")
    for name, (wall, cpu) in rows.items():
        print(f"{name:<30}{wall:8.1f}{n / wall:8.3f}{wall / n:8.3f}{cpu / (wall * cores):11.0%}"
              f"{wall / n * VOC_VAL / 60:15.1f} min")
    network = rows[f"network only ({args.precision})"][0] / n
    projected = {b: (network + rows[f"CRF only ({b})"][0] / n) * VOC_VAL / 60 for b in args.backends}
    print("projection for VOC val, network then CRF: " + "; ".join(
        f"{b}: ({network:.3f} + {rows[f'CRF only ({b})'][0] / n:.3f}) s x 1,449 = "
        f"{projected[b]:.1f} min" for b in args.backends))
    best = min(projected, key=projected.get)
    network_min = network * VOC_VAL / 60
    print(f"target, VOC val in < 20 min: {'met' if projected[best] < 20 else 'NOT met'} "
          f"(best {projected[best]:.1f} min, {best}); the network pass alone projects to "
          f"{network_min:.1f} min ({network * cores:.2f} core-seconds an image), the CRF to "
          f"{projected[best] - network_min:.1f} min")
    settings = dict(images=n, precision=args.precision, backends=args.backends,
                    workers=args.workers, stream=args.stream, quick=args.quick)
    table = [dict(stage=k, seconds=wall, cpu_seconds=cpu, per_image=wall / n,
                  cores_busy=cpu / (wall * cores), voc_val_minutes=wall / n * VOC_VAL / 60)
             for k, (wall, cpu) in rows.items()]
    summary = dict(projected_network_then_crf_minutes=projected, best_backend=best,
                   target_met=projected[best] < 20, network_minutes=network_min)
    if args.out or not args.quick:
        return write_report(settings, info, table, summary,
                            args.out or RESULTS / f"stage_two_{args.precision}.json")
    return dict(settings=settings, machine=info, rows=table, summary=summary)


if __name__ == "__main__":
    main()
