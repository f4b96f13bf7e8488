"""The harness every benchmark script in bench/ uses.

Importing it puts `Implementation/` on sys.path (so `python bench/X.py` works without
PYTHONPATH). It provides:
  machine() / finish()     the machine a run measured, in one schema (see `machine`)
  timed, best_of,          timing: one call's wall and CPU seconds; the best of several calls;
  interleaved, paired      rows timed in interleaved rounds (one call per row a round, so load
                           from other processes on a shared machine hits every row alike); the
                           median over rounds of a per-round ratio ("paired")
  write_report             the results JSON: top-level keys settings, machine, rows, summary
  source_photo, photo_crops, skimage_photos, voc_ids
                           the sample photographs and the shared VOC images the scripts use
  labels_at, random_net    logits -> labels at the input size (channels-last argmax); DeepLab
                           v2 ResNet-101 with random weights and BN statistics
Paths: ROOT (the checkout), REAL (../shared/real: the real models and VOC images).

Every bench/results/*.json has the four top-level keys above. Files measured before 2026-12-06
were reshaped into them with every value the run's own, so their `machine` keeps the keys that
run recorded (e.g. `load_average_start` or `load_at_start` for `load_average_at_start`); files
written by the scripts from then on have `machine()`'s schema.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "Implementation") not in sys.path:
    sys.path.insert(0, str(ROOT / "Implementation"))
REAL = ROOT.parent / "shared" / "real"
RESULTS = ROOT / "bench" / "results"

CPU_FLAGS = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
# module -> distribution, for versions recorded when the script imported the module
VERSIONED = {"numpy": "numpy", "onnxruntime": "onnxruntime", "numba": "numba",
             "pydensecrf": "pydensecrf2", "ai_edge_litert": "ai-edge-litert"}


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------

def _cpuinfo() -> tuple[str, set]:
    """(model name, flags) of the first CPU in /proc/cpuinfo (Linux); else platform's name."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return (info.get("model name") or platform.processor() or platform.machine(),
            set(info.get("flags", "").split()))


def _versions() -> dict:
    """{module: version} of VERSIONED, None for each module this process has not imported."""
    from importlib import metadata
    out = {}
    for module, dist in VERSIONED.items():
        version = None
        if module in sys.modules:
            version = getattr(sys.modules[module], "__version__", None)
            if not isinstance(version, str):
                try:
                    version = metadata.version(dist)
                except metadata.PackageNotFoundError:
                    version = None
        out[module] = version
    return out


def machine(torch_threads: int | None = None) -> dict:
    """The machine and the load on it now, one schema for every script:
    date (local, ISO), cpu (model name), cpu_flags ({flag: bool} for AVX512-BF16, AVX512-VNNI,
    AMX-BF16, AMX-TILE), cpu_bf16 (torch can run bf16 natively here), cores, platform, python,
    torch, torch_threads (`torch_threads`, else torch's current count), cuda (the GPU's name or
    None), numpy / onnxruntime / numba / pydensecrf / ai_edge_litert (versions, None where the
    script did not import them; filled in again by write_report), load_average_at_start and
    load_average_at_end (1, 5, 15 minutes; the end is set by `finish`)."""
    import torch
    from seglab.device import bf16_supported
    name, flags = _cpuinfo()
    return dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                cpu=name, cpu_flags={f: f in flags for f in CPU_FLAGS},
                cpu_bf16=bf16_supported(torch.device("cpu")), cores=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, torch_threads=torch_threads or torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                **_versions(), load_average_at_start=list(os.getloadavg()),
                load_average_at_end=None)


def finish(info: dict) -> dict:
    """Record the load average at the end (once) and the versions of modules imported since."""
    if info.get("load_average_at_end") is None:
        info["load_average_at_end"] = list(os.getloadavg())
    info.update({k: v for k, v in _versions().items() if info.get(k) is None})
    return info


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def timed(fn, children: bool = False) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of fn(); `children`: add the CPU
    time of child processes that finished during the call (worker pools)."""
    def cpu():
        t = os.times()
        return t.user + t.system + ((t.children_user + t.children_system) if children else 0)
    wall, start = time.perf_counter(), cpu() if children else time.process_time()
    fn()
    return (time.perf_counter() - wall,
            (cpu() if children else time.process_time()) - start)


def best_of(fn, repeats: int) -> float:
    """The fastest wall time of `repeats` calls of fn() (the least disturbed)."""
    return min(timed(fn)[0] for _ in range(repeats))


def interleaved(calls: dict, rounds: int, *, alternate: bool = False, sync=None, keep=None,
                progress: str | None = None) -> tuple[dict, dict]:
    """Time rows against each other: one warm-up call each (`call(0)`), then `rounds` rounds of
    one call per row, `call(k)` in round k (k picks the round's input), so load from other
    processes hits every row alike. `alternate`: odd rounds run the rows in reverse order.
    `sync()` runs before and after each timed call (e.g. torch.cuda.synchronize); `keep(name,
    k, result)` sees each timed call's result; `progress`: a tqdm bar over the rounds with this
    label. Returns ({row: [wall seconds per round]}, {row: [process CPU seconds per round]})."""
    for call in calls.values():
        call(0)
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    steps = range(rounds)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=progress, unit="round")
    for k in steps:
        names = list(calls) if not (alternate and k % 2) else list(calls)[::-1]
        for name in names:
            if sync:
                sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = calls[name](k)
            if sync:
                sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if keep:
                keep(name, k, result)
    return wall, cpu


def paired(numerators, denominators) -> float:
    """The median over rounds of numerator / denominator within each round: a ratio of two rows
    timed seconds apart, under the same load (e.g. paired(baseline, row) = the row's speedup)."""
    return float(statistics.median(a / b for a, b in zip(numerators, denominators)))


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(settings: dict, machine: dict, rows: list, summary: dict | None,
                 out) -> dict:
    """Write the results JSON: {"settings": what was run (arguments, sizes, parameters),
    "machine": machine() (finished here if the script did not), "rows": one entry per row of
    the printed table, with every repetition, "summary": what is computed across rows}.
    Returns the report."""
    report = {"settings": settings, "machine": finish(machine), "rows": rows, "summary": summary}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    print(f"wrote {out}")
    return report


# ---------------------------------------------------------------------------------------------
# Sample photographs and images
# ---------------------------------------------------------------------------------------------

def source_photo() -> np.ndarray:
    """A real photograph, RGB uint8 (matplotlib's sample grace_hopper.jpg, 600x512), or a
    synthetic scene if it is missing."""
    import matplotlib
    from seglab.data.images import load_image
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if path.is_file():
        return load_image(path)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :600]
    base = np.stack([(xx // 75) * 30, (yy // 60) * 25, ((xx + yy) // 90) * 20], -1) % 256
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def photo_crops(photo: np.ndarray, n: int, h: int, w: int, rng):
    """n random h x w crops of `photo` (every second one mirrored), drawn from `rng` lazily: a
    caller that draws from the same rng between crops keeps its sequence."""
    for k in range(n):
        y0 = int(rng.integers(0, photo.shape[0] - h + 1))
        x0 = int(rng.integers(0, photo.shape[1] - w + 1))
        image = photo[y0:y0 + h, x0:x0 + w]
        yield np.ascontiguousarray(image[:, ::-1] if k % 2 else image)


SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina")


def skimage_photos(h: int, w: int) -> list[np.ndarray]:
    """scikit-image's public-domain sample photos (SKIMAGE_PHOTOS), RGB, each resized to 1.2x
    the size that covers h x w."""
    from PIL import Image
    from skimage import data as skdata
    photos = []
    for name in SKIMAGE_PHOTOS:
        photo = getattr(skdata, name)()
        scale = max(h / photo.shape[0], w / photo.shape[1]) * 1.2
        size = (int(photo.shape[1] * scale) + 1, int(photo.shape[0] * scale) + 1)
        photos.append(np.asarray(Image.fromarray(photo[..., :3]).resize(size)))
    return photos


def voc_ids(root, split: str = "val", limit: int | None = None) -> tuple[Path, list[str]]:
    """(the VOC2012 folder under `root`, the first `limit` image ids of `split`)."""
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return voc, ids[:limit]


# ---------------------------------------------------------------------------------------------
# Models and outputs
# ---------------------------------------------------------------------------------------------

def labels_at(logits, size, interp: str = "caffe"):
    """Labels (H, W) at `size` from (C, h, w) logits: full_resolution_logits(...).argmax(0)
    (seglab/models/resize.py) with the channels innermost (channels_last): the same bilinear
    values, and the argmax over channels reads contiguous memory (about 4x faster at
    21 x 513 x 513 here than argmax(0), whose reduction runs across planes)."""
    import torch
    from seglab.models.resize import resize
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = logits[None].contiguous(memory_format=torch.channels_last)
    return resize(x, size, interp).argmax(1)[0]


def random_net(seed: int = 0, num_classes: int = 21):
    """DeepLab v2 ResNet-101 with random weights and random, non-trivial BN statistics."""
    import torch
    from seglab.models.deeplabv2 import DeepLabV2
    from seglab.models.resnet import FrozenBatchNorm2d
    torch.manual_seed(seed)
    net = DeepLabV2(num_classes=num_classes).eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net
