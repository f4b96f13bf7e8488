"""Stage two end to end: `evaluate.py --crf` on a VOC-size split with DeepLab v2 ResNet-101.

    python bench/bench_stage_two.py [--images 200] [--precision bf16] [--workers 2]
        [--backend pydensecrf|torch] [--quick]

Writes a VOC-layout split of `--images` 500x375 photographs (crops and mirrors of
scikit-image's public-domain sample photos; labels are random blobs: the speed of the network
and of the CRF does not depend on them) and a ResNet-101 DeepLab v2 with random weights, then
measures, in one run:
  network only   evaluate() without the CRF: the MSC network pass at 513 (VOC protocol)
  CRF only       the CRF on the cached logits (the network pass skipped: cache hits)
  pipelined      evaluate() with the CRF from an empty cache: the CRF of each image starts as
                 soon as its logits are cached, in worker processes, while the network works
                 on the next images (seglab/densecrf/runner.py: CRFStream)
and projects each to VOC val's 1,449 images. Run it on an idle machine; the load average before
and after is recorded. Results: bench/results/stage_two.json.
"""
from __future__ import annotations

from common import write_report  # noqa: E402  (also puts Implementation/ on sys.path)
import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from seglab.checkpoint import atomic_save, make_checkpoint
from seglab.data.labels import save_label_png
from seglab.densecrf.params import CRFParams
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.models import build_model

H, W, VOC_VAL = 375, 500, 1449
RESULTS = Path(__file__).resolve().parent / "results" / "stage_two.json"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")


def make_split(root: Path, n: int) -> None:
    """n VOC-size crops of the sample photos (resized so the shorter side fits), random labels."""
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    rng = np.random.default_rng(0)
    photos = []
    for name in PHOTOS:
        photo = getattr(skdata, name)()
        scale = max(H / photo.shape[0], W / photo.shape[1]) * 1.2
        size = (int(photo.shape[1] * scale) + 1, int(photo.shape[0] * scale) + 1)
        photos.append(np.asarray(Image.fromarray(photo[..., :3]).resize(size)))
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


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="images in the split")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--workers", type=int, default=2, help="CRF worker processes")
    p.add_argument("--backend", default="pydensecrf", choices=("pydensecrf", "torch"))
    p.add_argument("--quick", action="store_true", help="8 images, a smoke check")
    args = p.parse_args(argv)
    n = 8 if args.quick else args.images
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_split(tmp / "data", n)
        torch.manual_seed(0)
        net = build_model({"name": "deeplabv2", "num_classes": 21})
        ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp / "r101.pth")
        del net
        settings = EvalSettings(data_root=str(tmp / "data"), precision=args.precision,
                                device="cpu", crf_workers=args.workers,
                                crf_backend=args.backend, crf_params=CRFParams(),
                                save_predictions=False)
        run = lambda out, **kw: evaluate(ckpt, EvalSettings(**dict(vars(settings), **kw)),  # noqa
                                         out_dir=tmp / out, show_progress=True)
        network = timed(lambda: run("a"))
        crf_only = timed(lambda: run("a", crf=True))  # every image a cache hit
        shutil.rmtree(tmp / "a")
        pipelined = timed(lambda: run("b", crf=True, crf_stream=True))
    rows = {"network only": network, "CRF only": crf_only, "pipelined network + CRF": pipelined}
    print(f"\n{n} images of {W}x{H}, ResNet-101 MSC at 513, {args.precision}, CRF "
          f"{args.backend} x {args.workers} workers, {os.cpu_count()} cores")
    print(f"{'stage':<26}{'s':>9}{'img/s':>9}{'s/img':>9}{'VOC val (1,449)':>18}")
    for name, seconds in rows.items():
        print(f"{name:<26}{seconds:9.1f}{n / seconds:9.3f}{seconds / n:9.3f}"
              f"{seconds / n * VOC_VAL / 60:15.1f} min")
    overlap = (network + crf_only) / pipelined
    print(f"pipelined vs network then CRF: {overlap:.2f}x")
    report = dict(images=n, precision=args.precision, backend=args.backend,
                  workers=args.workers, cpus=os.cpu_count(), processor=platform.processor(),
                  seconds=rows, per_image={k: v / n for k, v in rows.items()},
                  voc_val_minutes={k: v / n * VOC_VAL / 60 for k, v in rows.items()},
                  speedup_over_sequential=overlap,
                  load_before=load_before, load_after=os.getloadavg()[0])
    if not args.quick:
        write_report(report, RESULTS)
    return report


if __name__ == "__main__":
    main()
