"""Deployment: accuracy per precision and speed per runtime (fp32 / bf16 / fp16 / int8), with the
TF Lite interpreter on the same real model.

    python bench/bench_deploy.py [--quick] [--reps 7] [--threads N] [--calib-crops 200]
                                 [--method minmax] [--no-pt2e] [--no-r101]
                                 [--out bench/results/deploy.json]

Models
  real   Google's DeepLab v3 MobileNetV2 (depth 1.0, output stride 16) from
         ../shared/real/models/deeplabv3_mnv2_pascal_quant.tflite through `convert.py tflite`
         (Implementation/convert.py),
         single scale; exported with --fixed-size 513 513 (the size the TF Lite file takes,
         so both run the same graph size)
  r101   DeepLab v2 ResNet-101 (random weights, common.random_net: speed only), single scale,
         513 x 513
  demo   the demo model runs/demo/checkpoints/final.pth (`train.py --config demo`), with its
         MSC, on the demo val split (data/demo)

Rows
  fp32 / bf16     PyTorch's Predictor (seglab/inference/predictor.py), precision fp32 / bf16
  fp16            the same network with fp16 weights and activations, on the CPU: accuracy only
                  (there is no GPU here; CPU fp16 convolutions are not a fast path)
  onnx fp32       the exported file in onnxruntime (seglab/deploy/onnx_export.py, what
                  export.py onnx runs; seglab/deploy/runtime.py's OnnxPredictor)
  int8 ort        onnxruntime static QDQ int8 (seglab/deploy/quantize.py, what export.py int8
                  runs), per-channel weights, calibrated
                  with --method (the ResNet-101, timed only, with minmax on 16 crops)
  int8 ort, linear fp32   the same with the convolutions no activation follows in float
                  (export.py int8 --float-linear; the real model only)
  int8 pt2e       torchao PT2E with the X86 Inductor quantizer, torch.compile'd (where its
                  pattern matcher takes the network; otherwise a note says why not)
  tflite uint8    Google's own quantised file in the TF Lite interpreter (ai_edge_litert): the
                  image padded to 513 with 128 (= 0 after its (x - 128) / 128), its own resize to
                  513 and argmax
Accuracy: the VOC protocol for every row (pad to 513 with the mean colour, logits upsampled with
align_corners=True, argmax, cropped), mIoU from one confusion matrix over the split; "agree" is
the share of pixels whose label equals the fp32 row's, "delta" the mIoU change from fp32.
int8 calibration: there are no VOC training images here, so the real model is calibrated in two
folds of voc_dev: the file that scores images 1-10 saw only crops of images 11-20 and vice versa
(no image is scored by a model calibrated on it); the demo model on crops of the demo train split.
Speed: image -> labels at 513 x 513 (for ours: network, bilinear upsampling, argmax, see
common.labels_at; TF Lite's graph does the same inside), each row warmed up, then `--reps`
interleaved rounds of one call per row (common.interleaved), so load from other processes hits all
rows alike. Reported: best and median seconds per image, images per second from the best, and "x
bf16": the median over rounds of the paired ratio (PyTorch bf16 time / row time) of the same model.
GMACs from torch.utils.flop_counter at 513.
Results: printed tables and bench/results/deploy.json (common.write_report: a row per accuracy
and speed table row, keyed by model and table; the summary holds each model's GMACs and
parameters and the notes on what could not run).
"""
from __future__ import annotations

from common import (REAL, ROOT, interleaved, labels_at, machine, paired,  # noqa: E402
                    random_net, voc_ids, write_report)  # (also puts Implementation/ on sys.path)
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from seglab.data.images import load_image
from seglab.data.labels import load_label
from seglab.deploy.onnx_export import export_onnx
from seglab.deploy.onnx_file import read_metadata
from seglab.deploy.quantize import METHODS, CalibrationCrops, quantize_onnx, quantize_pt2e
from seglab.deploy.runtime import OnnxPredictor
from seglab.data.metrics import ConfusionMatrix
from seglab.inference.predictor import Predictor

TFLITE = REAL / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
VOC_DEV = REAL / "voc_dev"
DEMO_CKPT, DEMO_DATA = ROOT / "runs" / "demo" / "checkpoints" / "final.pth", ROOT / "data" / "demo"
RESULTS = Path(__file__).resolve().parent / "results" / "deploy.json"
SIZE = 513
NOTES = []  # rows or sections that could not run, and why
FORMATS = {"miou": ".2f", "delta": "+.2f", "agree": ".3f", "images_per_s": ".2f",
           "x_bf16": ".2f"}


# ---------------------------------------------------------------------------------------------
# Predictors that are not in the library (bench only)
# ---------------------------------------------------------------------------------------------

class ModulePredictor:
    """Predictor's interface over a ready torch module (the PT2E int8 one, or an fp16 copy)."""
    transform, predict = Predictor.transform, Predictor.predict

    def __init__(self, module, like: Predictor, dtype=torch.float32):
        self.module, self.dtype = module, dtype
        self.norm, self.interp, self.output_stride = like.norm, like.interp, like.output_stride
        self._transforms = {}

    def logits(self, image):
        with torch.no_grad():
            return self.module(image[None].to(self.dtype))[0].float()


class TFLitePredictor:
    """The TF Lite interpreter on Google's uint8 file: labels for an RGB image (VOC protocol)."""

    def __init__(self, path, threads: int):
        from ai_edge_litert.interpreter import Interpreter
        self.interpreter = Interpreter(str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def run(self, padded: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], padded[None])
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])[0]

    def predict(self, image, mode="voc", pad_to=SIZE):
        h, w = image.shape[:2]
        padded = np.full((SIZE, SIZE, 3), 128, np.uint8)
        padded[:h, :w] = image
        return self.run(padded)[:h, :w].astype(np.uint8), None


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

def voc_items(root, split="val", limit=None):
    """[(id, image, label)] of the first `limit` images of a VOC-layout split."""
    base, ids = voc_ids(root, split, limit)
    return [(i, load_image(base / "JPEGImages" / f"{i}.jpg"),
             load_label(base / "SegmentationClass" / f"{i}.png")) for i in ids]


def score(predictors, items, fold_of=None) -> tuple[dict, list]:
    """mIoU of `predictors` (one, or one per fold: image k uses predictors[fold_of(k)])."""
    predictors = predictors if isinstance(predictors, list) else [predictors]
    cm, labels = ConfusionMatrix(21), []
    for k, (_, image, gt) in enumerate(items):
        p = predictors[fold_of(k) if fold_of else 0]
        pred = p.predict(image, mode="voc", pad_to=SIZE)[0]
        cm.update(pred, gt)
        labels.append(pred)
    return cm.scores(), labels


def accuracy_rows(rows: dict, items, folds=None) -> list[dict]:
    """[{row, miou, delta, agree}] with the first row ("fp32") as the reference."""
    out, ref, ref_miou = [], None, None
    for name, predictor in rows.items():
        started = time.perf_counter()
        scores, labels = score(predictor, items, folds if isinstance(predictor, list) else None)
        if ref is None:
            ref, ref_miou = labels, scores["miou"]
        same = sum(int((a == b).sum()) for a, b in zip(labels, ref))
        total = sum(a.size for a in ref)
        out.append(dict(row=name, miou=100 * scores["miou"], agree=100 * same / total,
                        delta=100 * (scores["miou"] - ref_miou),
                        seconds=round(time.perf_counter() - started, 1)))
        print(f"  {name}: mIoU {out[-1]['miou']:.2f}, agree {out[-1]['agree']:.3f}%", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Models and their rows
# ---------------------------------------------------------------------------------------------

def real_checkpoint(tmp: Path) -> Path:
    out = tmp / "mnv2.pth"
    subprocess.run([sys.executable, str(ROOT / "Implementation" / "convert.py"), "tflite",
                    str(TFLITE), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def torch_rows(ckpt, msc_scales, fp16: bool) -> dict:
    rows = {"fp32": Predictor(ckpt, device="cpu", msc_scales=msc_scales),
            "bf16": Predictor(ckpt, device="cpu", msc_scales=msc_scales, precision="bf16")}
    if fp16:
        like = Predictor(ckpt, device="cpu", msc_scales=msc_scales, channels_last=False)
        rows["fp16 (cpu)"] = ModulePredictor(like.model.half(), like, torch.float16)
    return rows


def int8_ort(fp32_onnx: Path, out: Path, calibration, crops: int, crop: int, threads: int,
             method: str, float_linear: bool = False) -> OnnxPredictor:
    """An int8 file of `fp32_onnx`, calibrated on `crops` training crops of `calibration`."""
    meta = read_metadata(fp32_onnx)
    quantize_onnx(fp32_onnx, out, CalibrationCrops(calibration, crops, crop, meta["norm"]),
                  method, float_linear=float_linear, calibration=str(calibration), crop=crop)
    return OnnxPredictor(out, device="cpu", threads=threads)


def int8_pt2e(ckpt, calibration, crops: int, crop: int, msc: bool, like: Predictor):
    """The PT2E row, or None (with a note) where torchao's quantizer cannot take the network."""
    try:
        module = quantize_pt2e(ckpt, CalibrationCrops(calibration, crops, crop, like.norm),
                               msc=msc)
    except ValueError as e:
        NOTES.append(f"int8 pt2e skipped for {Path(str(ckpt)).name}: {e}")
        print(f"  {NOTES[-1]}", flush=True)
        return None
    return ModulePredictor(module, like)


def real_rows(ckpt, tmp: Path, items, a) -> tuple[dict, object]:
    """The real model's rows; int8 ones are two-fold lists (see the docstring)."""
    rows = torch_rows(ckpt, (), fp16=True)
    fp32 = tmp / "real_fp32.onnx"
    export_onnx(ckpt, fp32, fixed_size=(SIZE, SIZE), check_images=[im for _, im, _ in items[:4]])
    rows["onnx fp32"] = OnnxPredictor(fp32, device="cpu", threads=a.threads)
    half = len(items) // 2
    image_dir = VOC_DEV / "VOCdevkit" / "VOC2012" / "JPEGImages"
    halves = [[image_dir / f"{i}.jpg" for i, _, _ in part]
              for part in (items[:half], items[half:])]
    fold_of = (lambda k: 0 if k < half else 1)
    # the file for fold f is calibrated on the other fold's images
    for name, linear in (("int8 ort", False), ("int8 ort, linear fp32", True)):
        rows[name] = [int8_ort(fp32, tmp / f"real_int8_{linear}_{f}.onnx", halves[1 - f],
                               a.calib_crops, SIZE, a.threads, a.method, linear) for f in (0, 1)]
    if a.pt2e and int8_pt2e(ckpt, halves[1], 1, SIZE, False, rows["fp32"]) is not None:
        rows["int8 pt2e"] = [int8_pt2e(ckpt, halves[1 - f], a.calib_crops, SIZE, False,
                                       rows["fp32"]) for f in (0, 1)]
    rows["tflite uint8"] = TFLitePredictor(TFLITE, a.threads)
    return rows, fold_of


def demo_rows(tmp: Path, a) -> dict:
    rows = torch_rows(DEMO_CKPT, None, fp16=True)
    msc = bool(rows["fp32"].msc_scales)
    fp32 = tmp / "demo_fp32.onnx"
    export_onnx(DEMO_CKPT, fp32, msc=msc)
    rows["onnx fp32"] = OnnxPredictor(fp32, device="cpu", threads=a.threads)
    crop = 129  # the demo recipe's training crop (configs/demo.yaml)
    rows["int8 ort"] = int8_ort(fp32, tmp / "demo_int8.onnx", DEMO_DATA, a.calib_crops, crop,
                                a.threads, a.method)
    if a.pt2e:
        rows["int8 pt2e"] = int8_pt2e(DEMO_CKPT, DEMO_DATA, a.calib_crops, crop, msc,
                                      rows["fp32"])
    return {k: v for k, v in rows.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------

def labels_call(predictor, x):
    """image (normalised, padded) -> labels at the input size, for one of our predictors."""
    size = tuple(x.shape[-2:])
    return lambda: labels_at(predictor.logits(x), size, predictor.interp)


def timed_rounds(calls: dict, reps: int) -> dict:
    """{row: [seconds per call]}: one warm-up each, then `reps` interleaved rounds."""
    return interleaved({name: (lambda k, call=call: call()) for name, call in calls.items()},
                       reps)[0]


def speed_table(times: dict, baseline: str) -> list[dict]:
    out = []
    for name, ts in times.items():
        out.append(dict(row=name, best=min(ts), median=statistics.median(ts),
                        images_per_s=1 / min(ts), x_bf16=paired(times[baseline], ts), times=ts))
    return out


def gmacs_params(ckpt) -> tuple[float, float]:
    """GMACs of one single-scale pass at 513 x 513 and parameters (millions) of the network as
    published (no inference rewrites)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = Predictor(ckpt, device="cpu", msc_scales=(), fold_bn=False, shifted_aspp=False,
                      channels_last=False).model
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops() / 2e9, sum(p.numel() for p in model.parameters()) / 1e6


def speed_calls(rows: dict, image) -> dict:
    """{row: call} timing image -> labels at 513 for every row that has a fast path."""
    calls = {}
    for name, predictor in rows.items():
        predictor = predictor[0] if isinstance(predictor, list) else predictor
        if name.startswith("fp16"):
            continue  # accuracy only
        if isinstance(predictor, TFLitePredictor):
            padded = np.full((SIZE, SIZE, 3), 128, np.uint8)
            padded[:image.shape[0], :image.shape[1]] = image
            calls[name] = (lambda p=predictor, x=padded: p.run(x))
        else:
            x, _ = predictor.transform("voc", SIZE).prepare(image)
            calls[name] = labels_call(predictor, x)
    return calls


def r101_rows(tmp: Path, a) -> tuple[dict, Path]:
    """DeepLab v2 ResNet-101 with random weights (speed only), calibrated on 16 demo crops."""
    from seglab.checkpoint import atomic_save, make_checkpoint
    net = random_net()
    ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict(), provenance={"source": "random"}),
                       tmp / "r101.pth")
    rows = torch_rows(ckpt, (), fp16=False)
    fp32 = tmp / "r101_fp32.onnx"
    export_onnx(ckpt, fp32, check=False)
    rows["onnx fp32"] = OnnxPredictor(fp32, device="cpu", threads=a.threads)
    calibration = DEMO_DATA if DEMO_DATA.is_dir() else [REAL / "images" / "dog_segmentation.bmp"]
    rows["int8 ort"] = int8_ort(fp32, tmp / "r101_int8.onnx", calibration, 16, 321, a.threads,
                                "minmax")  # speed only: the ranges do not change the work
    if a.pt2e:
        rows["int8 pt2e"] = int8_pt2e(ckpt, calibration, 16, 321, False, rows["fp32"])
    return {k: v for k, v in rows.items() if v is not None}, ckpt


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def print_table(title: str, rows: list, columns: str):
    """A markdown table of `rows` (dicts with "row" and `columns`, space-separated)."""
    keys = columns.split()
    print(f"\n{title}\n| row | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}")
    for r in rows:
        cells = [format(r[k], FORMATS.get(k, ".3f")) + ("%" if k == "agree" else "")
                 for k in keys]
        print(f"| {r['row']} | {' | '.join(cells)} |")


def summary_table(report: dict):
    print("\n| model | GMACs | params (M) | mIoU fp32 | bf16 | fp16 | int8 (all / linear fp32) "
          "| fastest s/img (row) |\n|---|---|---|---|---|---|---|---|")
    for name, m in report["models"].items():
        acc = {r["row"]: r["miou"] for r in m.get("accuracy", [])}
        cell = (lambda k: f"{acc[k]:.2f}" if k in acc else "-")
        fast = min(m["speed"], key=lambda r: r["best"]) if m.get("speed") else None
        print(f"| {name} | {m['gmacs']:.1f} | {m['params_m']:.1f} | {cell('fp32')} | "
              f"{cell('bf16')} | {cell('fp16 (cpu)')} | {cell('int8 ort')} / "
              f"{cell('int8 ort, linear fp32')} | "
              + (f"{fast['best']:.3f} ({fast['row']}) |" if fast else "- |"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 3 rounds, 8 calibration crops, 6 images per data set")
    p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every runtime")
    p.add_argument("--calib-crops", type=int, default=200,
                   help="calibration crops per int8 file (real: per fold; demo)")
    p.add_argument("--method", choices=METHODS, default="minmax",
                   help="int8 calibration of the real and demo models (default minmax)")
    p.add_argument("--no-pt2e", dest="pt2e", action="store_false", help="skip torchao PT2E")
    p.add_argument("--no-r101", dest="r101", action="store_false", help="skip the ResNet-101")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.calib_crops, a.limit = 3, 8, 6
    else:
        a.limit = None
    return a


def bench_real(tmp: Path, a) -> dict | None:
    if not (TFLITE.is_file() and VOC_DEV.is_dir()):
        NOTES.append(f"real model skipped: {TFLITE} or {VOC_DEV} absent (../shared/real/README.md "
                     "gives the public downloads)")
        return None
    ckpt = real_checkpoint(tmp)
    items = voc_items(VOC_DEV, limit=a.limit)
    rows, fold_of = real_rows(ckpt, tmp, items, a)
    acc = accuracy_rows(rows, items, fold_of)
    speed = speed_table(timed_rounds(speed_calls(rows, items[0][1]), a.reps), "bf16")
    print_table("accuracy, voc_dev", acc, "miou delta agree")
    print_table("speed, 513 x 513", speed, "best median images_per_s x_bf16")
    return dict(zip(("gmacs", "params_m"), gmacs_params(ckpt)), accuracy=acc, speed=speed)


def bench_r101(tmp: Path, a) -> dict:
    rows, ckpt = r101_rows(tmp, a)
    image = np.full((SIZE - 13, SIZE - 100, 3), 100, np.uint8)  # a VOC-sized image, padded
    speed = speed_table(timed_rounds(speed_calls(rows, image), a.reps), "bf16")
    print_table("speed, 513 x 513, single scale", speed, "best median images_per_s x_bf16")
    return dict(zip(("gmacs", "params_m"), gmacs_params(ckpt)), speed=speed)


def bench_demo(tmp: Path, a) -> dict | None:
    if not (DEMO_CKPT.is_file() and DEMO_DATA.is_dir()):
        NOTES.append("demo model skipped: train it first (python Implementation/train.py "
                     "--config demo --run-dir runs/demo)")
        return None
    acc = accuracy_rows(demo_rows(tmp, a), voc_items(DEMO_DATA, limit=a.limit))
    print_table("accuracy, demo val", acc, "miou delta agree")
    return dict(zip(("gmacs", "params_m"), gmacs_params(DEMO_CKPT)), accuracy=acc)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    info = machine(a.threads)
    report = dict(models={})
    sections = {"DeepLab v3 MNV2 (real)": bench_real,
                "DeepLab v2 R101 (random weights)": bench_r101 if a.r101 else None,
                "demo (DeepLab v2 ResNet-14, MSC)": bench_demo}
    with tempfile.TemporaryDirectory() as tmp:
        for name, section in sections.items():
            if section is not None:
                print(f"{name}:", flush=True)
                result = section(Path(tmp), a)
                if result is not None:
                    report["models"][name] = result
    summary_table(report)
    for note in NOTES:
        print(f"note: {note}")
    rows = [dict(r, model=name, table=table) for name, m in report["models"].items()
            for table in ("accuracy", "speed") for r in m.get(table, [])]
    summary = dict(models={name: dict(gmacs=m["gmacs"], params_m=m["params_m"])
                           for name, m in report["models"].items()}, notes=NOTES)
    return write_report(vars(a), info, rows, summary, a.out)


if __name__ == "__main__":
    main()
