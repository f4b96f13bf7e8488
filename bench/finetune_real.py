"""Fine-tuning a real model on your own classes, measured: the README's "Your own data" commands on
a relabelling of the 20 real VOC 2012 val images of ../shared/real, starting from Google's
VOC-trained DeepLab v3 MobileNetV2.

    python bench/finetune_real.py [--work DIR] [--union mean max]

The data: each of the 20 images keeps its pixels; its VOC mask is relabelled to the new classes
(CLASSES below: `background, person, animal` with animal = bird, cat, cow, dog, horse, sheep;
and `background, person, cat, dog`); pixels of the other VOC objects become 255 (ignored), as
VOC's own void. `datasets.py --dataset folder --val-fraction 0.5 --seed 0` (the README's
command) splits the 20 into 10 to train on and 10 to score. Nothing is tuned on them: the
fine-tuning runs use the folder preset's defaults as they are.

Rows (scored on the 10 val images, the model's own recipe: one scale, VOC protocol):
  unchanged, mapped      the VOC model as it is; its 21 labels mapped to the new classes (the
                         members of a union to it, the other VOC objects to background)
  mapped init (exact)    the new network before any training, each union keeping one row per
                         member, merged by log-sum-exp (seglab/models/class_groups.py)
  mapped init (fit/mean/max) ... with one linear row per union instead: how close a linear
                         head gets (seglab/training/class_map.py)
  fine-tuned             `train.py --config folder data.root=D --init mnv2.pth [--init-class
                         animal=bird,...]`: the README's command, 30 epochs of the 10 images at
                         the folder preset's lr 1e-4, distilled from the class-mapped init
  ... no distillation    the same with train.distill=0
  ... lr 1e-3            the same at the paper's rate (train.base_lr=1e-3), with and without
                         distillation (the folder preset before distillation: 1e-3, none)
  ... linear fit         the README's command with train.init_union=fit
  ... fresh rows         the same without --init-class: the classes whose names the VOC model
                         knows start from its rows, `animal` from a fresh init
Each row is scored without and with the dense CRF (the paper's parameters). The files live in
--work (by default a temporary folder, removed at the end), never in the repository.
Results: bench/results/finetune_real.json.
"""
from __future__ import annotations

from common import ROOT, machine, write_report  # noqa: E402  (Implementation/ on sys.path)
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from seglab.checkpoint import atomic_save, label_facts, load_checkpoint, make_checkpoint
from seglab.data.folder import FolderSegmentation
from seglab.data.images import load_image
from seglab.data.labels import IGNORE, VOC_CLASSES, distinct_palette
from seglab.data.transforms import TrainTransform
from seglab.densecrf.dense_crf import DenseCRF
from seglab.densecrf.params import CRFParams
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.data.metrics import ConfusionMatrix
from seglab.inference.predictor import Predictor
from seglab.models import build_model
from seglab.training.init import load_init, plan_class_groups

SHARED = ROOT.parent / "shared" / "real"
VOC = SHARED / "voc_dev" / "VOCdevkit" / "VOC2012"
TFLITE = SHARED / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
RESULTS = Path(__file__).resolve().parent / "results" / "finetune_real.json"
ANIMALS = ("bird", "cat", "cow", "dog", "horse", "sheep")
# name -> (new classes, {new class: its VOC classes})
CLASSES = {
    "person-animal": (["background", "person", "animal"],
                      {"background": ["background"], "person": ["person"], "animal": ANIMALS}),
    "person-cat-dog": (["background", "person", "cat", "dog"],
                       {c: [c] for c in ("background", "person", "cat", "dog")}),
}


# the fine-tuning runs of every set: (row, run folder suffix, extra train.py arguments)
VARIANTS = [
    ("fine-tuned (README command)", "run", ()),
    ("fine-tuned, no distillation", "plain", ("train.distill=0",)),
    ("fine-tuned at lr 1e-3", "lr3", ("train.base_lr=1e-3",)),
    ("fine-tuned at lr 1e-3, no distillation", "lr3_plain",
     ("train.base_lr=1e-3", "train.distill=0")),
]


def tables(classes, members) -> tuple[np.ndarray, np.ndarray]:
    """(ground-truth table: VOC label -> new label, other objects 255; prediction table: VOC
    label -> new label, other objects background)."""
    truth = np.full(256, IGNORE, np.uint8)
    for new, name in enumerate(classes):
        for voc in members[name]:
            truth[VOC_CLASSES.index(voc)] = new
    predicted = truth.copy()
    predicted[predicted == IGNORE] = 0
    predicted[IGNORE] = IGNORE
    return truth, predicted


def make_folder(root: Path, classes, members) -> Path:
    """images/, masks/ (relabelled), classes.txt, palette.txt; then the README's split."""
    truth, _ = tables(classes, members)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for line in (VOC / "ImageSets" / "Segmentation" / "val.txt").read_text().split():
        Image.open(VOC / "JPEGImages" / f"{line}.jpg").save(root / "images" / f"{line}.jpg",
                                                               quality=100)
        voc = np.asarray(Image.open(VOC / "SegmentationClass" / f"{line}.png"))
        Image.fromarray(truth[voc]).save(root / "masks" / f"{line}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    colours = distinct_palette(len(classes))
    (root / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in colours))
    script(["datasets.py", "--dataset", "folder", "--root", str(root), "--val-fraction", "0.5",
            "--seed", "0"])
    return root


def script(args, log: Path | None = None) -> float:
    """Run one of Implementation/'s scripts as the README shows it; returns seconds."""
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    subprocess.run([sys.executable, str(ROOT / "Implementation" / args[0]), *args[1:]],
                   check=True, stdout=out, stderr=subprocess.STDOUT if log else None)
    return time.perf_counter() - started


def score_unchanged(mnv2: Path, root: Path, classes, members) -> dict:
    """The VOC model as it is, its labels mapped to the new classes; with and without the CRF."""
    _, predicted = tables(classes, members)
    predictor, crf = Predictor(mnv2, device="cpu"), DenseCRF(CRFParams(), "pydensecrf")
    plain, refined = ConfusionMatrix(len(classes)), ConfusionMatrix(len(classes))
    for image_id in (root / "val.txt").read_text().split():
        image = load_image(root / "images" / f"{image_id}.jpg")
        truth = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        labels, logits = predictor.predict(image)
        plain.update(predicted[labels], truth)
        refined.update(predicted[crf(image, logits).argmax(0).astype(np.uint8)], truth)
    return {"miou": plain.scores()["miou"], "crf_miou": refined.scores()["miou"]}


def score_mapped_init(mnv2: Path, root: Path, classes, members, union: str,
                      work: Path) -> dict:
    """The new network before training: classifier rows mapped from the VOC model's."""
    old = load_checkpoint(mnv2)
    explicit = {c: list(m) for c, m in members.items() if len(m) > 1}
    dataset = FolderSegmentation(root, "train", TrainTransform(crop=321, norm=old["input_norm"]))
    cfg = {"train": {"init": str(mnv2), "init_classes": explicit, "init_union": union},
           "model": {"name": old["arch"]["name"], "arch": {}}}
    plan_class_groups(cfg, dataset)                     # union=exact: rows per member
    net = build_model(dict(old["arch"], num_classes=len(classes), **cfg["model"]["arch"]))
    note = load_init(net, cfg, dataset)
    path = work / f"mapped_{union}.pth"
    atomic_save(make_checkpoint(net.arch, net.state_dict(), input_norm=old["input_norm"],
                                recipe=old["recipe"], **label_facts(
                                    "folder", classes, dataset.palette[:len(classes)])), path)
    settings = EvalSettings(data_root=str(root), split="val", dataset="folder", crf=True,
                            device="cpu", save_predictions=False)
    scores = evaluate(path, settings, out_dir=work / f"eval_mapped_{union}", show_progress=False)
    return {"miou": scores["miou"], "crf_miou": scores["crf"]["miou"], "iou": scores["iou"],
            "mapping": note}


def fine_tune(mnv2: Path, root: Path, run: Path, init_classes, *extra) -> dict:
    """The README's command; the scores train.py writes after training."""
    args = ["train.py", "--config", "folder", f"data.root={root}", "--init", str(mnv2),
            "--run-dir", str(run), *extra]
    for new, old in init_classes.items():
        args += ["--init-class", f"{new}={','.join(old)}"]
    seconds = script(args, log=run.parent / f"{run.name}.log")
    plain = json.loads((run / "eval_val" / "scores.json").read_text())
    crf = json.loads((run / "eval_val" / "scores_crf.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return {"miou": plain["miou"], "crf_miou": crf["miou"], "iou": plain["iou"],
            "crf_iou": crf["iou"], "seconds": round(seconds, 1),
            "iterations": cfg["train"]["iterations"], "command": " ".join(args)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="folder for the data, checkpoints and runs (default: temp)")
    p.add_argument("--union", nargs="+", default=["exact", "fit", "mean", "max"],
                   choices=("exact", "fit", "mean", "max"))
    p.add_argument("--sets", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    args = p.parse_args(argv)
    if not TFLITE.is_file() or not VOC.is_dir():
        print(f"skipped: needs {TFLITE} and {VOC} (this project's shared real data)")
        return 0
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return measure(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="finetune_real_") as work:   # ~300 MB per set
        return measure(args, Path(work))


def measure(args, work: Path) -> int:
    """Every row of every set, printed as a table and written to RESULTS."""
    mnv2 = work / "mnv2.pth"
    if not mnv2.is_file():
        script(["convert.py", "tflite", str(TFLITE), str(mnv2)])
    rows, started, info = [], time.time(), machine()
    for name in args.sets:
        classes, members = CLASSES[name]
        root = make_folder(work / name, classes, members) if not (work / name).is_dir() \
            else work / name
        add = lambda what, r: rows.append(dict(set=name, row=what, **r)) or print(  # noqa
            f"{name:15s} {what:30s} {100 * r['miou']:6.2f} {100 * r['crf_miou']:6.2f}",
            flush=True)
        add("unchanged, mapped", score_unchanged(mnv2, root, classes, members))
        for union in args.union if any(len(m) > 1 for m in members.values()) else ["mean"]:
            add(f"mapped init ({union}), no training",
                score_mapped_init(mnv2, root, classes, members, union, work))
        explicit = {c: list(m) for c, m in members.items() if len(m) > 1}
        for label, run, extra in VARIANTS:
            add(label, fine_tune(mnv2, root, work / f"{name}_{run}", explicit, *extra))
        if explicit:
            add("fine-tuned, one linear row (init_union=fit)",
                fine_tune(mnv2, root, work / f"{name}_fit", explicit, "train.init_union=fit"))
            add("fine-tuned, fresh rows for unions",
                fine_tune(mnv2, root, work / f"{name}_fresh", {}))
    print("\n| classes | model | mIoU | + CRF |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['row']} | {100 * r['miou']:.2f} | {100 * r['crf_miou']:.2f} |")
    write_report({"work": str(work), "sets": args.sets, "unions": args.union}, info, rows,
                 {"minutes": round((time.time() - started) / 60, 1)}, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
