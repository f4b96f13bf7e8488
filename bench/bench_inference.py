"""Inference and training speed of DeepLab v2 ResNet-101 at 513x513, and what each optimisation
of the Predictor (seglab/inference/predictor.py) buys.

    python bench/bench_inference.py [--quick] [--reps 3] [--device cpu] [--threads N]

Rows (each run in its own subprocess, so the memory peaks do not mix):
  ss_eager_fp32        single scale, the plain nn.Module under torch.no_grad (the baseline)
  ss_inference_mode    + torch.inference_mode and in-place ReLU/sum (Predictor, BN not folded)
  ss_fold_bn           + frozen BN folded into the convs
  ss_channels_last     + channels_last (NHWC) weights and activations
  ss_shifted_aspp      + ASPP as one 1x1 convolution and shifted sums (seglab/models/rewrites.py
                       ShiftedASPP):
                       Predictor's default single-scale fp32 path
  ss_bf16              + bf16 autocast (folded BN, NCHW, the four dilated ASPP convolutions)
  ss_bf16_cl           + bf16 autocast with channels_last
  ss_bf16_cl_aspp      + bf16 autocast, channels_last and the shifted-sum ASPP
  msc_eager_fp32       MSC (1, 0.75, 0.5, max-fused): the eager fp32 baseline of evaluation
  msc_fp32             MSC through Predictor's default fp32 path (what evaluate.py runs)
  msc_bf16             MSC through Predictor with --precision bf16 (BN folded, channels_last,
                       shifted-sum ASPP)
  train_msc_fp32       one training iteration, batch 1, 321x321 crop, MSC, frozen BN: forward,
                       the 4-output loss, backward, SGD step: train.py's unit of work, run by
                       the training loop's own Step (seglab/training/loop.py) on the model and
                       optimizer its build_training_model makes
  train_msc_bf16       the same under bf16 autocast
`--quick` keeps ss_eager_fp32, ss_shifted_aspp, ss_bf16_cl_aspp, msc_eager_fp32, msc_fp32,
msc_bf16.

Timing: the inference rows live in one process (the training rows in another) and are timed
interleaved (common.interleaved), after one warm-up call each: `--reps` rounds of one call per row,
so other load on a shared machine hits every row alike. The table shows each row's best call (the
least disturbed) and its speedup over the baseline's best ("speedup"), and the median over rounds of
the speedup within a round ("paired": both calls seconds apart, under the same load); the JSON keeps
every time and the median. Memory is measured separately, one subprocess
per row (Linux /proc/self/status): "model MB" is the resident set once the model is built,
"peak MB" the resident high-water mark over two calls (VmHWM, reset after the build through
/proc/self/clear_refs, so loading the checkpoint does not count; where that reset is
unavailable, the whole process's peak), so peak - model = what the passes add. The build's own
peak is in the JSON. On CUDA the peak allocated GPU memory is reported too.

Agreement: the share of pixels (at 513x513, after the x8 upsampling) whose argmax equals the
eager fp32 reference's on the same inputs (single-scale rows vs ss_eager_fp32, MSC rows vs
msc_eager_fp32). Two weight sets are used, both ResNet-101 with random backbone weights and
random non-trivial BN statistics:
  "random"  the random ASPP too. Its logits are nearly tied everywhere, so every rounding
            difference can flip an argmax: a pessimistic bound.
  "fitted"  the ASPP replaced by a ridge-regression readout of the backbone features, fitted to the
            labels of synthetic VOC-like scenes (seglab.data.demo.draw_sample): logits with margins
            like a trained model's, where only near-ties at region borders can flip. Timing uses
            these weights. Agreement on them is the better estimate for a trained model.
Timed inputs are other synthetic scenes (not those fitted on), normalised as in evaluation.

Results: a printed table and bench/results/inference.json (common.write_report: the settings,
the machine with the load average at the start and end, a row per table row with every time, and
the fitted readout's accuracy; other processes on a shared machine slow every row).
"""
from __future__ import annotations

from common import (finish, interleaved, machine, paired, random_net,  # noqa: E402
                    write_report)  # (common also puts Implementation/ on sys.path)
import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "inference.json"
SIZE, TRAIN_CROP, NUM_CLASSES = 513, 321, 21

ROWS = {
    # name: (description, kind, settings)
    "ss_eager_fp32": ("single scale, eager fp32 (baseline)", "eager", dict(msc=False)),
    "ss_inference_mode": ("+ inference_mode, in-place ReLU/sum", "predictor",
                          dict(msc=False, fold_bn=False, channels_last=False,
                               shifted_aspp=False, precision="fp32")),
    "ss_fold_bn": ("+ BN folding", "predictor",
                   dict(msc=False, fold_bn=True, channels_last=False, shifted_aspp=False,
                        precision="fp32")),
    "ss_channels_last": ("+ channels_last", "predictor",
                         dict(msc=False, fold_bn=True, channels_last=True, shifted_aspp=False,
                              precision="fp32")),
    "ss_shifted_aspp": ("+ ASPP as 1x1 conv + shifted sums", "predictor",
                        dict(msc=False, fold_bn=True, channels_last=True, shifted_aspp=True,
                             precision="fp32")),
    "ss_bf16": ("+ bf16 autocast (NCHW)", "predictor",
                dict(msc=False, fold_bn=True, channels_last=False, shifted_aspp=False,
                     precision="bf16")),
    "ss_bf16_cl": ("+ bf16 autocast + channels_last", "predictor",
                   dict(msc=False, fold_bn=True, channels_last=True, shifted_aspp=False,
                        precision="bf16")),
    "ss_bf16_cl_aspp": ("+ bf16 + channels_last + shifted ASPP", "predictor",
                        dict(msc=False, fold_bn=True, channels_last=True, shifted_aspp=True,
                             precision="bf16")),
    "msc_eager_fp32": ("MSC, eager fp32 (baseline)", "eager", dict(msc=True)),
    "msc_fp32": ("MSC, Predictor fp32 (default path)", "predictor", dict(msc=True)),
    "msc_bf16": ("MSC, Predictor --precision bf16", "predictor",
                 dict(msc=True, precision="bf16")),
    "train_msc_fp32": ("train iteration, MSC, batch 1, 321, fp32", "train",
                       dict(precision="fp32")),
    "train_msc_bf16": ("train iteration, MSC, batch 1, 321, bf16", "train",
                       dict(precision="bf16")),
}
QUICK = ("ss_eager_fp32", "ss_shifted_aspp", "ss_bf16_cl_aspp", "msc_eager_fp32", "msc_fp32",
         "msc_bf16")
BASELINE = {"ss": "ss_eager_fp32", "msc": "msc_eager_fp32"}


# ---------------------------------------------------------------------------------------------
# Inputs and weights (built once, in a subprocess)
# ---------------------------------------------------------------------------------------------

def scenes(seed: int, count: int, size: int):
    """`count` synthetic VOC-like scenes (image uint8, label uint8) of size x size."""
    from seglab.data.demo import draw_sample
    classes = list(range(1, NUM_CLASSES))
    return [draw_sample(np.random.default_rng([seed, k]), (size, size), classes)
            for k in range(count)]


def fit_readout(net, fit_scenes, ridge: float = 1e-2):
    """Replace the ASPP by a ridge-regression readout of the backbone features (centre tap of
    branch c0; other taps and branches zero) fitted to one-hot labels at [::8, ::8]."""
    import torch
    from seglab.data.transforms import normalize
    feats, targets = [], []
    with torch.inference_mode():
        for image, label in fit_scenes:
            f = net.backbone(normalize(image)[None])[0]            # (2048, h, w)
            sub = label[::8, ::8]
            keep = torch.from_numpy((sub != 255).reshape(-1))
            feats.append(f.flatten(1).T[keep].double())
            targets.append(torch.nn.functional.one_hot(
                torch.from_numpy(sub.reshape(-1)[keep.numpy()].astype(np.int64)),
                NUM_CLASSES).double())
    x, y = torch.cat(feats), torch.cat(targets)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    gram = xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(gram, xs.T @ y)                          # (2049, C)
    weight = (w[:-1] / std[:, None]).T                              # (C, 2048)
    bias = w[-1] - (w[:-1] * (mean / std)[:, None]).sum(0)
    with torch.no_grad():
        for conv in net.aspp.branches():
            conv.weight.zero_()
            conv.bias.zero_()
        net.aspp.c0.weight[:, :, 1, 1] = weight.float()
        net.aspp.c0.bias.copy_(bias.float())
    return net


def prepare(folder: Path, num_inputs: int) -> None:
    import torch
    from seglab.checkpoint import atomic_save, make_checkpoint
    from seglab.data.transforms import normalize
    inputs = scenes(1, num_inputs, SIZE)
    torch.save(torch.stack([normalize(image) for image, _ in inputs]), folder / "inputs.pt")
    np.save(folder / "labels.npy", np.stack([label for _, label in inputs]))
    train_image, train_label = scenes(2, 1, TRAIN_CROP)[0]
    torch.save({"image": normalize(train_image), "label": torch.from_numpy(
        train_label.astype(np.int64))}, folder / "train_input.pt")
    net = random_net()
    atomic_save(make_checkpoint(net.arch, net.state_dict(), provenance={"source": "random"}),
                folder / "random.pth")
    fit_readout(net, scenes(0, 4, 321))
    atomic_save(make_checkpoint(net.arch, net.state_dict(), provenance={"source": "fitted"}),
                folder / "fitted.pth")


# ---------------------------------------------------------------------------------------------
# One row (in a subprocess)
# ---------------------------------------------------------------------------------------------

def status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux), or the getrusage peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def start_memory_window() -> dict:
    """Resident set now, the peak so far, then reset the peak (VmHWM) to the current RSS."""
    gc.collect()
    out = {"model_rss_mb": status_mb("VmRSS"), "build_peak_mb": status_mb("VmHWM")}
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return out


def build(kind: str, settings: dict, checkpoint: Path, device):
    """A callable: image batch (N, 3, H, W) -> logits (N, C, h, w) on the CPU."""
    import torch
    from seglab.checkpoint import load_checkpoint, load_model_weights
    from seglab.inference.predictor import Predictor
    from seglab.models import build_model
    from seglab.models.msc import MSC
    scales = (0.75, 0.5) if settings["msc"] else ()
    if kind == "eager":
        ckpt = load_checkpoint(checkpoint)
        net = build_model(ckpt["arch"])
        load_model_weights(net, ckpt, str(checkpoint))
        model = (MSC(net, scales) if scales else net).eval().to(device)

        def run(x):
            with torch.no_grad():
                return model(x.to(device)).float().cpu()
        return run
    extra = {k: settings[k] for k in ("fold_bn", "channels_last", "shifted_aspp", "precision")
             if k in settings}
    return Predictor(checkpoint, device=device, msc_scales=scales, **extra).logits


def train_step(settings: dict, folder: Path, device):
    """A callable running one training iteration on the fitted model: the training loop's Step
    (seglab/training/loop.py: forward under the precision's autocast, training_loss, backward,
    SGD step) on the model and optimizer build_training_model makes from the paper's recipe
    (configs/voc12: MSC 0.75 / 0.5, Caffe Interp and loss targets, SGD lr 1e-3, momentum 0.9,
    weight decay 5e-4), batch 1."""
    from seglab.checkpoint import load_checkpoint, load_model_weights
    from seglab.config import load_config
    from seglab.models import architecture
    from seglab.training.loop import Step, build_training_model
    from seglab.training.loss import loss_names
    import torch
    ckpt = load_checkpoint(folder / "fitted.pth")
    arch = dict(ckpt["arch"])
    cfg = load_config("voc12", ["train.init=scratch", "model.msc_scales=[0.75, 0.5]",
                                "model.interp=caffe", f"train.precision={settings['precision']}",
                                "train.batch_per_step=1", "train.effective_batch=1"])
    cfg["model"]["name"], cfg["data"]["num_classes"] = arch.pop("name"), arch.pop("num_classes")
    cfg["model"]["arch"] = arch
    model, net, optimizer, _, _ = build_training_model(cfg, device, None)
    load_model_weights(net, ckpt)
    spec = architecture(net.arch)
    step = Step(cfg, model.train(), optimizer, spec, device, 1, 1,
                loss_names(spec, cfg["model"]["msc_scales"]))
    data = torch.load(folder / "train_input.pt", weights_only=True)
    batch = [{"image": data["image"][None], "label": data["label"][None]}]
    return lambda _=None: step(batch, 0, folder)[0]


def full_argmax(logits) -> np.ndarray:
    """(N, 513, 513) uint8 labels from (C, 65, 65) logits, as evaluation upsamples them."""
    from seglab.models.resize import full_resolution_logits
    return np.stack([full_resolution_logits(y, (SIZE, SIZE), (SIZE, SIZE)).argmax(0).numpy()
                     .astype(np.uint8) for y in logits])


def time_rows(names: list[str], folder: Path, reps: int, device_name: str) -> dict:
    """Time the rows in one process, interleaved (common.interleaved): 1 warm-up each, then
    `reps` rounds of one call per row, so load from other processes hits every row alike. Saves
    each row's argmax on the timed inputs (fitted weights) and on one input with the random
    weights."""
    import torch
    from seglab.inference.predictor import select_device
    device = select_device(device_name)
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    runs = {}
    for name in names:
        _, kind, settings = ROWS[name]
        run = (train_step(settings, folder, device) if kind == "train" else
               build(kind, settings, folder / "fitted.pth", device))
        runs[name] = lambda k, run=run: run(inputs[k % len(inputs)][None])
    logits = {name: [] for name in names}

    def keep(name, k, y):
        if ROWS[name][1] != "train" and k < len(inputs):
            logits[name].append(y[0])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    times, _ = interleaved(runs, reps, sync=sync, keep=keep,
                           progress=f"timing {len(names)} rows")
    runs.clear()
    for name in names:
        _, kind, settings = ROWS[name]
        if kind == "train":
            continue
        np.save(folder / f"{name}.fitted.npy", full_argmax(logits[name]))
        run = build(kind, settings, folder / "random.pth", device)
        np.save(folder / f"{name}.random.npy", full_argmax([run(inputs[:1])[0]]))
    return times


def memory_row(name: str, folder: Path, device_name: str) -> dict:
    """Resident memory of one row, alone in this process: after the build, and the peak over
    two calls (the first builds oneDNN's caches, an optimizer step its momentum buffers)."""
    import torch
    from seglab.inference.predictor import select_device
    device = select_device(device_name)
    _, kind, settings = ROWS[name]
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    run = (train_step(settings, folder, device) if kind == "train" else
           build(kind, settings, folder / "fitted.pth", device))
    out = start_memory_window()
    for _ in range(2):
        run(inputs[:1])
    out["peak_rss_mb"] = status_mb("VmHWM")
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def call(args: list[str]) -> None:
    """Run this script in a subprocess (its progress bars pass through)."""
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    if subprocess.run(cmd).returncode:
        raise RuntimeError(f"bench subprocess {' '.join(args)} failed (see above)")


def agreement(folder: Path, name: str, baseline: str, which: str) -> float:
    a = np.load(folder / f"{name}.{which}.npy")
    b = np.load(folder / f"{baseline}.{which}.npy")
    n = min(len(a), len(b))
    return float((a[:n] == b[:n]).mean())


def readout_accuracy(folder: Path, name: str) -> float:
    """Pixel accuracy of a row's fitted-weight predictions against the scenes' labels: how
    meaningful the fitted logits are (chance is about 1/21 away from the background)."""
    pred, labels = np.load(folder / f"{name}.fitted.npy"), np.load(folder / "labels.npy")
    labels = labels[:len(pred)]
    valid = labels != 255
    return float((pred[valid] == labels[valid]).mean())


def table(rows: list[dict]) -> str:
    head = (f"{'row':<20}{'description':<42}{'best s':>8}{'img/s':>8}{'speedup':>8}{'paired':>8}"
            f"{'agree fitted':>13}{'agree random':>13}{'model MB':>9}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        agree = [f"{100 * r[k]:12.3f}%" if r.get(k) is not None else f"{'-':>13}"
                 for k in ("agreement_fitted", "agreement_random")]
        speed = (f"{r['speedup']:7.2f}x{r['speedup_paired']:7.2f}x" if r.get("speedup")
                 else f"{'-':>8}{'-':>8}")
        lines.append(f"{r['name']:<20}{r['description']:<42}{r['best_s']:8.3f}"
                     f"{r['per_s']:8.3f}{speed}{agree[0]}{agree[1]}"
                     f"{r['model_rss_mb']:9.0f}{r['peak_rss_mb']:9.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), help="run only these rows")
    p.add_argument("--reps", type=int, default=3, help="timed calls per row (after 1 warm-up)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads in the subprocesses (0 = torch's default: all "
                        "cores)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--stage", choices=("prepare", "time", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    names = args.rows or (list(QUICK) if args.quick else list(ROWS))
    if args.stage and args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.stage == "prepare":
        prepare(args.folder, args.reps)
        return 0
    if args.stage == "time":
        times = time_rows(names, args.folder, args.reps, args.device)
        (args.folder / f"times-{names[0]}.json").write_text(json.dumps(times))
        return 0
    if args.stage == "memory":
        (args.folder / f"{names[0]}.memory.json").write_text(
            json.dumps(memory_row(names[0], args.folder, args.device)))
        return 0

    for family, base in BASELINE.items():
        if any(n.startswith(family + "_") for n in names) and base not in names:
            names.insert(0, base)
    info = machine(args.threads or None)
    common = ["--folder", None, "--reps", str(args.reps), "--device", args.device,
              "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        folder = Path(tmp)
        common[1] = str(folder)
        print("building inputs and weights (ResNet-101 + fitted readout)...", flush=True)
        call(["--stage", "prepare"] + common)
        times = {}
        for group in ([n for n in names if ROWS[n][1] != "train"],
                      [n for n in names if ROWS[n][1] == "train"]):
            if group:
                call(["--stage", "time", "--rows"] + group + common)
                times.update(json.loads((folder / f"times-{group[0]}.json").read_text()))
        rows = []
        for name in names:
            print(f"memory: {name}", flush=True)
            call(["--stage", "memory", "--rows", name] + common)
            r = dict(name=name, description=ROWS[name][0], times=times[name],
                     **json.loads((folder / f"{name}.memory.json").read_text()))
            r["best_s"], r["median_s"] = min(r["times"]), float(np.median(r["times"]))
            r["per_s"] = 1.0 / r["best_s"]
            rows.append(r)
        by_name = {r["name"]: r for r in rows}
        for r in rows:
            base = BASELINE.get(r["name"].split("_")[0])
            if base is None:
                continue
            r["speedup"] = by_name[base]["best_s"] / r["best_s"]
            r["speedup_paired"] = paired(by_name[base]["times"], r["times"])
            r["fitted_pixel_acc"] = readout_accuracy(folder, r["name"])
            for which in ("fitted", "random"):
                r[f"agreement_{which}"] = agreement(folder, r["name"], base, which)
    finish(info)
    text = table(rows)
    print(f"\n{info['cpu']}, {info['cores']} cores ({info['torch_threads']} threads), "
          f"torch {info['torch']}, "
          f"{SIZE}x{SIZE} inputs (train: {TRAIN_CROP}), best of {args.reps} after 1 warm-up, "
          f"load average {info['load_average_at_start'][0]:.2f} at the start, "
          f"{info['load_average_at_end'][0]:.2f} at the end")
    fitted = [r for r in rows if "fitted_pixel_acc" in r]
    if fitted:
        print(f"fitted readout: {100 * fitted[0]['fitted_pixel_acc']:.1f}% pixel accuracy on "
              "the timed scenes (the logits are meaningful, not noise)")
    print(text)
    write_report(dict(rows=names, size=SIZE, train_crop=TRAIN_CROP, reps=args.reps,
                      device=args.device, threads=args.threads, baselines=BASELINE), info, rows,
                 dict(fitted_readout_pixel_acc=fitted[0]["fitted_pixel_acc"] if fitted
                      else None), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
