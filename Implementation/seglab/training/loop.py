"""Stage one: the training loop, architecture-neutral (the network comes from the model seam).

Each iteration: set the poly lr, fetch all micro-batches of the iteration, forward + loss +
backward for each (gradient accumulation), one SGD step, log. Checkpoints (state.py) are
written every `train.checkpoint_every` iterations, at the end, and when training stops early:
on Ctrl-C or SIGTERM (`timeout`, Slurm, `docker stop`) the iteration in flight finishes first,
so the checkpoint always holds the state *between* two iterations and resume is bit-identical
(a second Ctrl-C stops at once, keeping the last checkpoint). A bad sample found mid-run stops
training with a checkpoint of the iterations done and the file named.
"""
from __future__ import annotations

import contextlib
import csv
import math
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from seglab.checkpoint import check_arch, label_facts
from seglab.config import arch_from_config
from seglab.data.images import DataError
from seglab.data.loaders import train_loader
from seglab.densecrf.layer import DenseCRFLayer, denormalize
from seglab.densecrf.params import crf_params_from_config
from seglab.device import bf16_supported, select_device
from seglab.models import architecture, build_model, param_groups
from seglab.models.msc import MSC
from seglab.training.distributed import setup_distributed
from seglab.training.distill import distillation, with_distillation
from seglab.training.init import TrainingError, load_init
from seglab.training.loss import crf_training_loss, loss_names, loss_weights, training_loss
from seglab.training.schedule import set_poly_lr
from seglab.training.state import FINAL, save_training_checkpoint, set_rng_state
from seglab.training.watch import Watch


def accumulation_steps(cfg: dict, world: int) -> int:
    t = cfg["train"]
    per_pass = t["batch_per_step"] * world
    if t["effective_batch"] % per_pass:
        raise TrainingError(f"effective_batch {t['effective_batch']} is not a multiple of "
                            f"batch_per_step {t['batch_per_step']} x {world} process(es); "
                            "change train.batch_per_step")
    return t["effective_batch"] // per_pass


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


class StopRequest:
    """SIGINT / SIGTERM set a flag that the loop reads between iterations; a second SIGINT
    raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: stopping after this iteration (Ctrl-C again to stop at once, "
              "keeping the last checkpoint)", file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signal_name: str, iteration: int, path: Path):
        super().__init__(f"{signal_name}: checkpoint of iteration {iteration} written to {path}")
        self.signal_name, self.iteration, self.path = signal_name, iteration, path


def build_training_model(cfg: dict, device, resume: dict | None, dataset=None):
    """(model to train, bare network, optimizer, first iteration, init note)."""
    t = cfg["train"]
    net = build_model(arch_from_config(cfg))
    init_note = "resumed" if resume else load_init(net, cfg, dataset)
    spec = architecture(net.arch)
    scales = cfg["model"]["msc_scales"] if spec.train_outputs == "msc" else []
    model = (MSC(net, scales, cfg["model"]["interp"]) if scales else net).to(device)
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
    return model, net, optimizer, start, init_note


def prepare(cfg: dict, device, resume: dict | None, world: int, dataset=None):
    """(model in train mode, DDP-wrapped when distributed; bare network, with `init_note`;
    optimizer; first iteration), seeded and checked."""
    t = cfg["train"]
    if t["precision"] == "bf16" and not bf16_supported(device):
        raise TrainingError(f"train.precision=bf16 is not supported on {device} here (no "
                            "AVX512-BF16/AMX or CUDA bf16); use train.precision=fp32")
    if t["deterministic"]:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t["seed"])
    model, net, optimizer, start, net.init_note = build_training_model(cfg, device, resume,
                                                                        dataset)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model.train(), net, optimizer, start


def train(cfg: dict, run_dir: Path, dataset, resume: dict | None = None,
          show_progress: bool = True) -> Path:
    """Run stage one on `dataset`; returns the path of the final checkpoint. Raises
    Interrupted after a signal, DataError after a bad sample (each once a checkpoint is
    written)."""
    rank, world, local_rank = setup_distributed()
    device = select_device(cfg["run"]["device"], local_rank)
    t = cfg["train"]
    accum = accumulation_steps(cfg, world)
    model, net, optimizer, start = prepare(cfg, device, resume, world, dataset)
    spec = architecture(net.arch)
    batches = train_loader(dataset, t["batch_per_step"], t["seed"],
                           start=start * t["effective_batch"], num_workers=cfg["data"]["workers"],
                           rank=rank, world_size=world)
    distill = distillation(cfg, net, dataset, device)
    names = loss_names(spec, cfg["model"]["msc_scales"]) + (
        ["crf"] if cfg["model"].get("crf_layer") else []) + (["distill"] if distill else [])
    log = watch = None
    if rank == 0:
        watch = Watch(cfg, run_dir, start, device)   # TensorBoard, periodic validation
        log = CSVLog(run_dir / "log.csv", ["iteration", "lr", "loss"] +
                     [f"loss_{n}" for n in names] + ["images_per_s", "seconds"] +
                     (["val_miou"] if watch.validates else []), start)
        print(f"run folder: {run_dir}\ninit: {net.init_note}\ntraining {net.arch['name']} on "
              f"{len(dataset)} images ({cfg['data']['train_split']}), {world} process(es) x "
              f"batch {t['batch_per_step']} x {accum} accumulation = effective batch "
              f"{t['effective_batch']}, device {device}", file=sys.stderr)
    step = Step(cfg, model, optimizer, spec, device, accum, world, names, distill)
    bar = tqdm(total=t["iterations"], initial=start, disable=(rank != 0 or not show_progress),
               desc="train", dynamic_ncols=True)
    it, t0 = start, time.time()
    labels = label_facts(cfg["data"]["dataset"], dataset.class_names,
                         dataset.palette[:len(dataset.class_names)])
    save = lambda final=False: save_training_checkpoint(  # noqa: E731
        run_dir, model, optimizer, it, cfg, final=final, labels=labels) if rank == 0 else None
    with StopRequest() as stop:
        try:
            if t["iterations"] == 0 and rank == 0:   # the initialised network as it is
                save(final=True)
            while it < t["iterations"]:
                if stop.signal:
                    raise Interrupted(stop.signal, it, save())
                tic = time.time()
                lr = set_poly_lr(optimizer, t["base_lr"], it, t["iterations"], t["poly_power"])
                micro_batches = [next(batches) for _ in range(accum)]  # before any forward
                loss, parts = step(micro_batches, it, run_dir)
                it += 1
                if rank == 0:
                    ips = t["effective_batch"] / max(time.time() - tic, 1e-9)
                    row = {"iteration": it, "lr": lr, "loss": loss,
                           "images_per_s": round(ips, 3), "seconds": round(time.time() - t0, 3)}
                    row.update({f"loss_{n}": float(v) for n, v in zip(names, parts)})
                    watch.iteration(it, row, names, optimizer, model)
                    log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                    bar.update(1)
                    if it % t["checkpoint_every"] == 0 or it == t["iterations"]:
                        save(final=(it == t["iterations"]))
                if world > 1 and (it % t["checkpoint_every"] == 0):
                    dist.barrier()
        except DataError as e:
            path = save()
            raise DataError(f"{clean_worker_error(e)}\ntraining stopped at iteration {it}; "
                            f"checkpoint written to {path}. Fix or remove the sample, then "
                            f"`python Implementation/train.py --resume {run_dir}`.") from None
        finally:
            bar.close()
            if watch is not None:
                watch.close()
    return run_dir / "checkpoints" / FINAL


def clean_worker_error(e: Exception) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback
    that the DataLoader prepends ("Caught DataError in DataLoader worker process 0 ...")."""
    text = str(e)
    marker = f"{type(e).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


def crf_loss(cfg: dict, loss, device):
    """model.crf_layer: (outputs, label, normalised image) -> the default loss plus the
    cross-entropy of the dense CRF's marginals (loss.crf_training_loss), its parts plus the
    CRF's. The CRF's parameters come from the crf section (e.g. crf.params = a `crf.py learn`
    result) and stay fixed; the raw image is the batch's, denormalised (data.norm, resolved by
    train.py's recipe before training)."""
    layer = DenseCRFLayer(crf_params_from_config(cfg["crf"]), learn_weights=False).to(device)
    norm = cfg["data"]["norm"]

    def total(outputs, label, image):
        value, parts = loss(outputs, label, image)
        crf = crf_training_loss(outputs, label, denormalize(image, norm), layer)
        return value + crf, list(parts) + [crf]
    return total


class Step:
    """One SGD iteration over its micro-batches (gradient accumulation); returns (the weighted
    total loss, the loss of each output as a float64 tensor), averaged over micro-batches and
    processes."""

    def __init__(self, cfg, model, optimizer, spec, device, accum, world, names, distill=None):
        t = cfg["train"]
        self.model, self.optimizer, self.device, self.accum, self.world = (model, optimizer,
                                                                           device, accum, world)
        self.channels_last = t["channels_last"] and device.type == "cuda"
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
            if t["precision"] == "bf16" else contextlib.nullcontext
        crf = cfg["model"].get("crf_layer")
        extra = int(bool(crf)) + int(distill is not None)   # parts after the network's own
        network = loss_weights(spec, names[:len(names) - extra], t["aux_weight"])
        weights = network + ([1.0] if crf else []) + ([distill.weight] if distill else [])
        loss = lambda outputs, y, x: training_loss(  # noqa: E731
            outputs, y, spec, t["loss_targets"], cfg["model"]["interp"], network)
        if crf:
            loss = crf_loss(cfg, loss, device)
        if distill:   # training/distill.py
            loss = with_distillation(loss, distill)
        self.loss, self.names = loss, names
        self.weights = torch.tensor(weights, dtype=torch.float64)

    def __call__(self, micro_batches, it: int, run_dir: Path) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        parts_sum = torch.zeros(len(self.names), dtype=torch.float64)
        for micro, batch in enumerate(micro_batches):
            x = batch["image"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            last = micro == self.accum - 1
            sync = self.model.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    outputs = self.model(x)
                total, parts = self.loss(outputs, y, x)
                (total / self.accum).backward()
            parts_sum += torch.tensor([p.item() for p in parts], dtype=torch.float64) / self.accum
        if self.world > 1:
            dist.all_reduce(parts_sum)
            parts_sum /= self.world
        loss = float((parts_sum * self.weights).sum())
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite loss ({loss}) at iteration {it + 1}; training stopped. The last "
                f"good checkpoint ({run_dir / 'checkpoints' / 'last.pth'}) is intact. Lower "
                "train.base_lr, check the labels, or resume from that checkpoint.")
        self.optimizer.step()
        return loss, parts_sum

