"""Stage one: train DeepLab v2 (ResNet-101 + ASPP + MSC) with the paper's recipe.

    python Implementation/train.py                      # the paper's recipe on VOC 2012 train_aug
    python Implementation/train.py --config demo        # CPU demo on the synthetic VOC-layout set
    python Implementation/train.py --resume runs/NAME   # continue exactly where it stopped
    torchrun --nproc_per_node=4 Implementation/train.py # DistributedDataParallel, same effective batch

The recipe (config.DEFAULTS): SGD, momentum 0.9, weight decay 5e-4, base lr 1e-3 with 1x/10x/20x
groups (model.param_groups), poly power 0.9 every iteration (schedule.py), 20,000 iterations,
effective batch 10 = batch_per_step x accumulation x processes, crop 321, MSC loss on the four
outputs (loss.py). Everything goes into one run folder: config.yaml, log.csv, checkpoints/,
and the evaluation of the final model (eval_val/).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import CheckpointError, check_arch, load_checkpoint
from config import ConfigError, add_config_arguments, load_config, save_config
from labels import DataError
from loss import branch_names, msc_loss
from model import MSC, DeepLabV2, param_groups
from schedule import set_poly_lr
from train_state import (FINAL, load_training_checkpoint, resolve_resume, save_training_checkpoint,
                         set_rng_state)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent batch settings, bad init)."""


# --- setup --------------------------------------------------------------------------------

def setup_distributed():
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def select_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def accumulation_steps(cfg: dict, world: int) -> int:
    t = cfg["train"]
    per_pass = t["batch_per_step"] * world
    if t["effective_batch"] % per_pass:
        raise TrainingError(f"effective_batch {t['effective_batch']} is not a multiple of "
                            f"batch_per_step {t['batch_per_step']} x {world} process(es); "
                            "change train.batch_per_step")
    return t["effective_batch"] // per_pass


def arch_from_config(cfg: dict) -> dict:
    m = cfg["model"]
    return dict(num_classes=cfg["data"]["num_classes"], depth=m["depth"], rates=list(m["rates"]),
                style=m["style"], frozen_bn=m["frozen_bn"], width=m["width"],
                strides=[1, 2, 1, 1], dilations=[1, 1, 2, 4])


def prepare_init(cfg: dict) -> None:
    """Pretrained weights imply frozen BN; ImageNet weights imply the torchvision form."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return
    cfg["model"]["frozen_bn"] = True
    if init.startswith("imagenet"):
        cfg["model"]["style"], cfg["data"]["norm"] = "pytorch", "imagenet"


def load_init(net, cfg: dict) -> str:
    """Fill the network from train.init: scratch | imagenet[=FILE] | a deeplab-v2 checkpoint."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return "scratch (PyTorch default init, ASPP N(0, 0.01))"
    if init.startswith("imagenet"):
        import convert
        src = init.split("=", 1)[1] if "=" in init else "download"
        state = convert.torchvision_to_ours(convert.load_torchvision_state(src))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("aspp.") for k in missing):
            raise TrainingError(f"ImageNet weights {src} do not fit the backbone: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        return f"torchvision ImageNet ResNet ({src})"
    path = Path(init)
    if not path.is_file():
        raise TrainingError(
            f"init weights {path} not found. The paper starts from the MS-COCO model: download "
            "init.caffemodel (see README) and run `python Implementation/convert.py caffe "
            f"init.caffemodel {path}`, or pass --init imagenet / --init scratch.")
    ckpt = load_checkpoint(path)
    check_arch(ckpt, net.arch, path)
    missing, unexpected = net.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not k.startswith("aspp.") for k in missing):
        raise TrainingError(f"{path} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return f"{path} (trained on {ckpt.get('trained_on')})"


def make_run_dir(cfg: dict) -> Path:
    name = cfg["run"]["name"] or f"{cfg['preset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg["run"]["out"]) / name


def training_dataset(cfg: dict, rank: int):
    from datasets import VOCSegmentation
    from transforms import TrainTransform
    d = cfg["data"]
    if d["demo"] and rank == 0:
        from demo_data import make_demo_dataset
        make_demo_dataset(d["root"], **d["demo_args"])
    if dist.is_initialized():
        dist.barrier()
    transform = TrainTransform(crop=d["crop"], scales=tuple(d["scales"]), mirror=d["mirror"],
                               norm=d["norm"])
    return VOCSegmentation(d["root"], d["train_split"], transform, num_classes=d["num_classes"])


# --- the loop -----------------------------------------------------------------------------

class CSVLog:
    """log.csv: one row per iteration; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, fields, start: int):
        self.path, self.fields = path, fields
        rows = []
        if start > 0 and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def train(cfg: dict, run_dir: Path, resume: dict | None = None, show_progress: bool = True) -> Path:
    """Run stage one; returns the path of the final checkpoint."""
    rank, world, local_rank = setup_distributed()
    device = select_device(cfg["run"]["device"], local_rank)
    t = cfg["train"]
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t["seed"])
    accum = accumulation_steps(cfg, world)

    net = DeepLabV2(**arch_from_config(cfg))
    init_note = "resumed" if resume else load_init(net, cfg)
    model = MSC(net, cfg["model"]["msc_scales"], cfg["model"]["interp"]).to(device)
    if t["channels_last"] and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, t["base_lr"], t["weight_decay"]),
                                lr=t["base_lr"], momentum=t["momentum"])
    start = 0
    if resume:
        check_arch(resume, net.arch, "resume checkpoint")
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        start = int(resume["iteration"])
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()

    from loaders import train_loader
    dataset = training_dataset(cfg, rank)
    batches = train_loader(dataset, t["batch_per_step"], t["seed"], start=start * t["effective_batch"],
                           num_workers=cfg["data"]["workers"], rank=rank, world_size=world)
    names = branch_names(cfg["model"]["msc_scales"])
    log = writer = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        log = CSVLog(run_dir / "log.csv", ["iteration", "lr", "loss"] + [f"loss_{n}" for n in names]
                     + ["images_per_s", "seconds"], start)
        if t["tensorboard"]:
            writer = tensorboard_writer(run_dir)
        print(f"run folder: {run_dir}\ninit: {init_note}\ntraining on {len(dataset)} images "
              f"({cfg['data']['train_split']}), {world} process(es) x batch {t['batch_per_step']} x "
              f"{accum} accumulation = effective batch {t['effective_batch']}, device {device}",
              file=sys.stderr)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t["precision"] == "bf16"
                else contextlib.nullcontext())
    bar = tqdm(total=t["iterations"], initial=start, disable=(rank != 0 or not show_progress),
               desc="train", dynamic_ncols=True)
    it, t0 = start, time.time()
    try:
        while it < t["iterations"]:
            tic = time.time()
            lr = set_poly_lr(optimizer, t["base_lr"], it, t["iterations"], t["poly_power"])
            optimizer.zero_grad(set_to_none=True)
            parts_sum = torch.zeros(len(names), dtype=torch.float64)
            for micro in range(accum):
                batch = next(batches)
                x = batch["image"].to(device, non_blocking=True)
                y = batch["label"].to(device, non_blocking=True)
                if t["channels_last"] and device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                sync = model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        outputs = model(x)
                    total, parts = msc_loss(outputs, y, t["loss_targets"], cfg["model"]["interp"])
                    (total / accum).backward()
                parts_sum += torch.tensor([p.item() for p in parts], dtype=torch.float64) / accum
            if world > 1:
                dist.all_reduce(parts_sum)
                parts_sum /= world
            loss = float(parts_sum.sum())
            if not math.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss}) at iteration {it + 1}; training stopped. The last "
                    f"good checkpoint ({run_dir / 'checkpoints' / 'last.pth'}) is intact. Lower "
                    "train.base_lr, check the labels, or resume from that checkpoint.")
            optimizer.step()
            it += 1
            if rank == 0:
                ips = t["effective_batch"] / max(time.time() - tic, 1e-9)
                row = {"iteration": it, "lr": lr, "loss": loss, "images_per_s": round(ips, 3),
                       "seconds": round(time.time() - t0, 3)}
                row.update({f"loss_{n}": float(v) for n, v in zip(names, parts_sum)})
                log.write(row)
                if writer:
                    writer.add_scalar("loss/total", loss, it)
                    writer.add_scalar("lr", lr, it)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                bar.update(1)
                if it % t["checkpoint_every"] == 0 or it == t["iterations"]:
                    save_training_checkpoint(run_dir, model, optimizer, it, cfg,
                                             final=(it == t["iterations"]))
            if world > 1 and (it % t["checkpoint_every"] == 0):
                dist.barrier()
    except KeyboardInterrupt:
        if rank == 0:
            path = save_training_checkpoint(run_dir, model, optimizer, it, cfg)
            print(f"\ninterrupted: checkpoint of iteration {it} written to {path}; continue with "
                  f"`python Implementation/train.py --resume {run_dir}`", file=sys.stderr)
        raise
    finally:
        bar.close()
        if writer:
            writer.close()
    return run_dir / "checkpoints" / FINAL


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard); logging to log.csv only",
              file=sys.stderr)
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# --- after training -----------------------------------------------------------------------

def background_baseline(cfg: dict) -> float:
    """mIoU of predicting background everywhere on the val split (what a useless model gets)."""
    from datasets import VOCSegmentation
    from labels import load_label
    from metrics import ConfusionMatrix
    d = cfg["data"]
    ds = VOCSegmentation(d["root"], d["val_split"], num_classes=d["num_classes"])
    cm = ConfusionMatrix(d["num_classes"])
    for i in range(len(ds)):
        gt = load_label(ds.label_path(i), num_classes=d["num_classes"])
        cm.update(gt * 0, gt)
    return cm.scores()["miou"]


def evaluate_final(cfg: dict, checkpoint: Path, run_dir: Path, show_progress=True) -> dict:
    from evaluate import evaluate
    e, d = cfg["eval"], cfg["data"]
    scores = evaluate(checkpoint, d["root"], split=d["val_split"], out_dir=run_dir / "eval_val",
                      mode=e["mode"], pad_to=e["pad_to"], crf=e["crf"],
                      crf_workers=e["crf_workers"] or (os.cpu_count() or 1),
                      device=cfg["run"]["device"], num_classes=d["num_classes"],
                      show_progress=show_progress)
    base = background_baseline(cfg)
    lines = [f"val mIoU ({d['val_split']}, {d['root']}): {100 * scores['miou']:.2f}"]
    if "crf" in scores:
        lines.append(f"val mIoU with CRF: {100 * scores['crf']['miou']:.2f}")
    lines.append(f"all-background baseline: {100 * base:.2f}")
    print("\n".join(lines))
    return scores


# --- command line -------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage one: train DeepLab v2 with the paper's recipe (defaults = config "
                    "preset voc12). Any config field can be overridden as section.key=value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--init", help="scratch | imagenet | imagenet=FILE | a converted or "
                                  "deeplab-v2 checkpoint (overrides train.init)")
    p.add_argument("--resume", metavar="RUN_DIR|FILE",
                   help="continue a run exactly from its checkpoints/last.pth")
    p.add_argument("--run-dir", help="run folder (default: run.out/<preset>-<timestamp>)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation of the final model on the val split")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Flush denormals to zero before torch starts its worker threads (they inherit the flag):
    # softmax gradients of classes a model has learned to rule out underflow into denormals,
    # which made late CPU iterations of the demo ~3x slower. Changes nothing above 1e-38.
    torch.set_flush_denormal(True)
    try:
        resume = None
        if args.resume:
            path = resolve_resume(args.resume)
            resume = load_training_checkpoint(path)
            cfg = resume["config"]
            overrides = load_config("voc12", args.overrides)  # validates the override keys
            for o in args.overrides:
                section, key = o.split("=", 1)[0].split(".", 1)
                cfg[section][key] = overrides[section][key]
            run_dir = Path(args.run_dir) if args.run_dir else path.parent.parent
        else:
            cfg = load_config(args.config, args.overrides)
            if args.init:
                cfg["train"]["init"] = args.init
            prepare_init(cfg)
            run_dir = Path(args.run_dir) if args.run_dir else make_run_dir(cfg)
        final = train(cfg, run_dir, resume)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0 and not args.no_eval and cfg["eval"].get("after_train", True):
            evaluate_final(cfg, final, run_dir)
    except (ConfigError, CheckpointError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
