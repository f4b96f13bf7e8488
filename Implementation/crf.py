"""Stage two of DeepLab: the fully connected CRF (Krähenbühl & Koltun 2011) on cached logits.

Reading order:
  CRFParams          the CRF's parameters; defaults = the paper's ResNet-101 VOC values
  unary_from_logits  -log softmax of full-resolution logits (probabilities clipped at 1e-5)
  DenseCRF           one image: raw RGB uint8 image + logits -> mean-field marginals Q (C, H, W)
  load_crf_inputs    image file + cached logits file -> (image, unary), checked against each other
  CRFJob / run_crf   many images in parallel worker processes, with a progress bar
  search             the paper's grid search of the bilateral term on ~100 val images
  main               CLI: `apply` (write CRF label PNGs) and `search`

The model: E(x) = sum_i -log P(x_i) + sum_{i<j} [x_i != x_j] (w_bi exp(-|p_i-p_j|^2 / 2
theta_alpha^2 - |I_i-I_j|^2 / 2 theta_beta^2) + w_pos exp(-|p_i-p_j|^2 / 2 theta_gamma^2)),
solved by `iterations` mean-field updates. Defaults (DESIGN.md section 4, the released
ResNet-101 settings): 10 iterations, w_bi=4, theta_alpha=67, theta_beta=3, w_pos=3,
theta_gamma=1. The image is the raw RGB uint8 image (never a mean-subtracted one).

Normalisation: DeepLab's CRF binary is built on the 2011 code, which normalises each message
after filtering; that is pydensecrf's NORMALIZE_AFTER, our default ("after"). pydensecrf's own
default is NORMALIZE_SYMMETRIC ("symmetric"), as used by the published PyTorch port.

Parallelism: pydensecrf holds the GIL, so images run in separate worker processes ("spawn"
start method, one torch thread each). Workers receive file paths, not arrays, and load one
image and its cached logits themselves, so memory stays at about one image per worker and the
messages between processes stay tiny (a label map, or just a confusion matrix when the job has
a ground truth). A job that fails is reported with its image id and error; the others finish.

Search (the paper's stage two, Sec. 4.1): keep the Gaussian term fixed and grid-search w_bi in
3..6, theta_alpha in 30..100 (step 10) and theta_beta in 3..6 on a seeded subset of 100 val
images, reusing cached logits. The paper then refines the step sizes around the first round's
best values: run `search` again with finer `--bi-*` lists for that.

    python Implementation/crf.py search --cache runs/eval/logits --data-root data \
        --out runs/crf_search
    python Implementation/crf.py apply --cache runs/eval/logits --data-root data \
        --params runs/crf_search/best.json --out runs/crf_val
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from logit_cache import cache_path, cached_ids, full_resolution_logits, load_logits
from metrics import ConfusionMatrix, TrimapEvaluator

BACKENDS = ("pydensecrf", "torch")
NORMALIZATIONS = {"after": "NORMALIZE_AFTER", "symmetric": "NORMALIZE_SYMMETRIC"}
PROB_CLIP = 1e-5

# The paper's first-round search ranges (MATLAB [3:6], [30:10:100], [3:6]): 128 settings.
PAPER_GRID = {"bi_w": [3, 4, 5, 6], "bi_xy_std": list(range(30, 101, 10)),
              "bi_rgb_std": [3, 4, 5, 6]}


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CRFParams:
    """Dense CRF parameters. bi_* = the bilateral (appearance) kernel: weight w_bi, position
    std theta_alpha (px), colour std theta_beta; pos_* = the Gaussian (smoothness) kernel:
    weight w_pos, position std theta_gamma (px). `iterations=0` means no CRF: Q is the softmax
    of the network's logits."""
    iterations: int = 10
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    normalization: str = "after"

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {sorted(NORMALIZATIONS)}, "
                             f"got {self.normalization!r}")
        if int(self.iterations) != self.iterations or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, got {self.iterations}")
        for name in ("bi_xy_std", "bi_rgb_std", "pos_xy_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("bi_w", "pos_w"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path) -> "CRFParams":
        """Read parameters written by `to_json` (e.g. the search's best.json)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"CRF parameter file not found: {path}. Create one with "
                                    "`python Implementation/crf.py search` (its best.json).")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read CRF parameters from {path}: {e}") from e
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - fields:
            extra = sorted(set(data) - fields) if isinstance(data, dict) else data
            raise ValueError(f"{path} is not a CRF parameter file: unexpected {extra}; "
                             f"the keys are {sorted(fields)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad CRF parameters in {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------

def import_pydensecrf():
    """The pydensecrf module, or an ImportError that says how to get it (or avoid it)."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError("pydensecrf is not installed: `pip install pydensecrf2` (a fork that "
                          "builds on Python 3.11 and provides the `pydensecrf` module), or use "
                          "the pure-PyTorch CRF with `--backend torch`.") from e
    return dcrf


def unary_from_logits(logits) -> np.ndarray:
    """Unary energies -log(max(softmax(logits), 1e-5)) as float32 C-contiguous (C, H*W)."""
    logits = torch.as_tensor(logits).detach().cpu().float()
    if logits.dim() != 3:
        raise ValueError(f"logits must be (C, H, W), got shape {tuple(logits.shape)}")
    prob = torch.softmax(logits, dim=0).clamp_min_(PROB_CLIP)
    return np.ascontiguousarray(-torch.log(prob).reshape(logits.shape[0], -1).numpy(),
                                dtype=np.float32)


def _softmax_of_negative(unary: np.ndarray) -> np.ndarray:
    """softmax(-unary) over labels: the mean-field start, and the result of 0 iterations."""
    e = np.exp(unary.min(0, keepdims=True) - unary)
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


class DenseCRF:
    """The fully connected CRF on one image. `backend="pydensecrf"` (C++) or "torch" (the
    pure-PyTorch permutohedral lattice of crf_torch.py, CPU or `device="cuda"`)."""

    def __init__(self, params: CRFParams | None = None, backend: str = "pydensecrf",
                 device: str = "cpu"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.params, self.backend, self.device = params or CRFParams(), backend, device
        if backend == "pydensecrf":
            self._dcrf = import_pydensecrf()

    def __call__(self, image: np.ndarray, logits) -> np.ndarray:
        """image (H, W, 3) uint8 RGB, logits (C, H, W) at full resolution -> Q float32
        (C, H, W); the labels are Q.argmax(0)."""
        shape = tuple(torch.as_tensor(logits).shape)
        self._check_image(image, shape)
        return self.infer(image, unary_from_logits(logits)).reshape(shape)

    @staticmethod
    def _check_image(image, logits_shape):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"the CRF image must be a (H, W, 3) uint8 RGB array (the raw image, "
                             f"not a normalised tensor), got {what}")
        if len(logits_shape) != 3 or tuple(image.shape[:2]) != tuple(logits_shape[1:]):
            raise ValueError(f"the image is {image.shape[0]}x{image.shape[1]} but the logits are "
                             f"{logits_shape}: upsample the logits to the image size first "
                             "(logit_cache.full_resolution_logits)")

    def infer(self, image: np.ndarray, unary: np.ndarray) -> np.ndarray:
        """Mean-field marginals (C, H*W) from unary energies (C, H*W) (`unary_from_logits`)."""
        h, w = image.shape[:2]
        c = unary.shape[0]
        self._check_image(image, (c, h, w))
        if unary.shape != (c, h * w):
            raise ValueError(f"unary must be (C, H*W) = ({c}, {h * w}), got {unary.shape}")
        p = self.params
        if p.iterations == 0:
            return _softmax_of_negative(unary)
        if self.backend == "torch":
            import crf_torch
            q = crf_torch.dense_crf(image, unary.reshape(c, h, w), iterations=p.iterations,
                                    bi_w=p.bi_w, bi_xy_std=p.bi_xy_std, bi_rgb_std=p.bi_rgb_std,
                                    pos_w=p.pos_w, pos_xy_std=p.pos_xy_std,
                                    normalization=p.normalization, device=self.device)
            return np.asarray(q, dtype=np.float32).reshape(c, h * w)
        dcrf = self._dcrf
        norm = getattr(dcrf, NORMALIZATIONS[p.normalization])
        d = dcrf.DenseCRF2D(w, h, c)  # width first
        d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        d.addPairwiseGaussian(sxy=p.pos_xy_std, compat=p.pos_w, normalization=norm)
        d.addPairwiseBilateral(sxy=p.bi_xy_std, srgb=p.bi_rgb_std,
                               rgbim=np.ascontiguousarray(image), compat=p.bi_w,
                               normalization=norm)
        return np.array(d.inference(p.iterations), dtype=np.float32)


def load_crf_inputs(image_path, logits_path, interp: str = "caffe"):
    """(image (H, W, 3) uint8, unary (C, H*W) float32) for one image and its cached logits."""
    import labels
    image = labels.load_image(image_path)
    logits, input_size, size = load_logits(logits_path)
    if tuple(image.shape[:2]) != tuple(size):
        raise ValueError(f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but "
                         f"the cached logits {logits_path} are for a {size[0]}x{size[1]} image: "
                         "the cache belongs to other images; recompute it with evaluate.py")
    return image, unary_from_logits(full_resolution_logits(logits, input_size, size, interp))


# ---------------------------------------------------------------------------------------------
# Many images, in parallel
# ---------------------------------------------------------------------------------------------

class CRFJob(NamedTuple):
    """One CRF run. `out_path`: write the labels there as a palette PNG. `gt_path`: score the
    labels against this label PNG (the result then carries a ConfusionMatrix). `params`:
    overrides run_crf's parameters (the search's settings). `tag`: returned with the result."""
    image_id: str
    image_path: str
    logits_path: str
    out_path: str | None = None
    gt_path: str | None = None
    params: CRFParams | None = None
    tag: Any = None


class CRFResult(NamedTuple):
    image_id: str
    tag: Any
    labels: np.ndarray | None           # (H, W) uint8, when run_crf(return_labels=True)
    confusion: ConfusionMatrix | None   # when the job has a gt_path
    trimap: TrimapEvaluator | None      # when the job has a gt_path and trimap_widths are given
    out_path: str | None                # the PNG written, if any
    started: float                      # time.time() when the worker began the job
    seconds: float                      # the job's wall time in the worker
    cpu_seconds: float                  # the worker's CPU time for the job


class CRFFailure(NamedTuple):
    image_id: str
    error: str
    tag: Any = None


class _Settings(NamedTuple):
    params: CRFParams
    backend: str
    device: str
    interp: str
    return_labels: bool
    trimap_widths: tuple | None


# The last image a worker prepared: the search runs every setting on one image in a row.
_PREPARED: dict = {}


def _prepare(job: CRFJob, interp: str):
    key = (job.image_path, job.logits_path, interp)
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = load_crf_inputs(job.image_path, job.logits_path, interp)
    return _PREPARED[key]


def _run_job(item: tuple[int, CRFJob, _Settings]):
    """Worker body: one job -> (index, CRFResult | CRFFailure). Never raises."""
    index, job, s = item
    started, cpu_started = time.time(), time.process_time()
    try:
        import labels
        image, unary = _prepare(job, s.interp)
        h, w = image.shape[:2]
        crf = DenseCRF(job.params or s.params, s.backend, s.device)
        pred = crf.infer(image, unary).argmax(0).reshape(h, w).astype(np.uint8)
        confusion = trimap = None
        if job.gt_path is not None:
            gt = labels.load_label(job.gt_path, image_size=(h, w), num_classes=unary.shape[0])
            confusion = ConfusionMatrix(unary.shape[0]).update(pred, gt)
            if s.trimap_widths:
                trimap = TrimapEvaluator(s.trimap_widths, unary.shape[0]).update(pred, gt)
        if job.out_path is not None:
            labels.save_label_png(job.out_path, pred)
        return index, CRFResult(job.image_id, job.tag, pred if s.return_labels else None,
                                confusion, trimap, job.out_path, started, time.time() - started,
                                time.process_time() - cpu_started)
    except Exception as e:  # one bad image must not stop the others
        detail = traceback.format_exception_only(type(e), e)[-1].strip()
        return index, CRFFailure(job.image_id, f"{detail} (image {job.image_path}, "
                                               f"logits {job.logits_path})", job.tag)


def _init_worker():
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def default_workers(backend: str = "pydensecrf", device: str = "cpu") -> int:
    """All cores for CPU CRFs; one process for a GPU (it parallelises inside)."""
    return 1 if backend == "torch" and str(device).startswith("cuda") else (os.cpu_count() or 1)


def iter_crf(jobs: Iterable, params: CRFParams | None = None, workers: int | None = None,
             backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
             return_labels: bool = False, trimap_widths=None, progress: bool = True,
             desc: str = "CRF", unit: str = "img") -> Iterator[tuple[int, CRFResult | CRFFailure]]:
    """Run the CRF on every job and yield (job index, result or failure) as they complete.

    workers=1 runs in this process; more start a "spawn" pool (one torch thread per worker,
    jobs handed out one at a time for load balance)."""
    jobs = [job if isinstance(job, CRFJob) else CRFJob(*job) for job in jobs]
    settings = _Settings(params or CRFParams(), backend, device, interp, return_labels,
                         tuple(trimap_widths) if trimap_widths else None)
    DenseCRF(settings.params, backend, device)  # fail here, not in every worker
    if backend == "torch":
        import crf_torch  # noqa: F401  (an import error surfaces once, here)
    workers = min(workers or default_workers(backend, device), max(1, len(jobs)))
    items = [(i, job, settings) for i, job in enumerate(jobs)]
    failures = 0
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1:
            outputs: Iterable = map(_run_job, items)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
            outputs = pool.imap_unordered(_run_job, items, chunksize=1)
        try:
            for index, out in outputs:
                if isinstance(out, CRFFailure):
                    failures += 1
                    bar.set_postfix(failed=failures)
                bar.update(1)
                yield index, out
        finally:
            _PREPARED.clear()  # the in-process run's last image
            if pool is not None:
                pool.terminate()
                pool.join()


def run_crf(jobs: Iterable, params: CRFParams | None = None, workers: int | None = None,
            backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
            return_labels: bool = False, trimap_widths=None, progress: bool = True,
            desc: str = "CRF") -> tuple[list[CRFResult], list[CRFFailure]]:
    """Run the CRF on every job: (results, failures), each in job order.

    A job is a CRFJob or a tuple (image_id, image_path, logits_npz_path, out_png_path_or_None
    [, gt_path]). Each worker loads the image and its cached logits itself, upsamples the
    logits (logit_cache.full_resolution_logits), runs the CRF, writes the PNG if asked, and
    returns the labels (return_labels=True) and/or the confusion matrix against gt_path."""
    done = sorted(iter_crf(jobs, params, workers, backend, device, interp, return_labels,
                           trimap_widths, progress, desc), key=lambda pair: pair[0])
    results = [out for _, out in done if isinstance(out, CRFResult)]
    failures = [out for _, out in done if isinstance(out, CRFFailure)]
    return results, failures


# ---------------------------------------------------------------------------------------------
# Parameter search
# ---------------------------------------------------------------------------------------------

def search_grid(bi_w=PAPER_GRID["bi_w"], bi_xy_std=PAPER_GRID["bi_xy_std"],
                bi_rgb_std=PAPER_GRID["bi_rgb_std"],
                base: CRFParams | None = None) -> list[CRFParams]:
    """Every (w_bi, theta_alpha, theta_beta) setting, the rest (Gaussian term, iterations,
    normalisation) taken from `base`."""
    base = base or CRFParams()
    return [dataclasses.replace(base, bi_w=float(w), bi_xy_std=float(xy), bi_rgb_std=float(rgb))
            for w, xy, rgb in itertools.product(bi_w, bi_xy_std, bi_rgb_std)]


def pick_subset(ids: Iterable[str], num_images: int, seed: int = 0) -> list[str]:
    """The first `num_images` of a seeded shuffle of the sorted ids."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    return ids[:num_images]


def search(image_jobs: list[CRFJob], settings: list[CRFParams], workers: int | None = None,
           backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
           progress: bool = True) -> tuple[list[dict], dict, list[CRFFailure]]:
    """Score every setting on every image (jobs must carry gt_path).

    Returns (rows, baseline, failures): one row per setting, in `settings` order, with the
    parameters and mIoU / pixel acc / mean class acc / images scored; `baseline` the same
    scores without the CRF (0 iterations). Jobs are (image, setting) pairs, image-major, so a
    worker prepares each image once and the load stays balanced."""
    baseline_params = dataclasses.replace(settings[0] if settings else CRFParams(), iterations=0)
    candidates = [baseline_params] + list(settings)
    image_jobs = [job if isinstance(job, CRFJob) else CRFJob(*job) for job in image_jobs]
    if any(job.gt_path is None for job in image_jobs):
        raise ValueError("every search job needs a gt_path (the ground truth to score)")
    jobs = [job._replace(out_path=None, params=p, tag=k) for job in image_jobs
            for k, p in enumerate(candidates)]
    totals: dict[int, ConfusionMatrix] = {}
    images = [0] * len(candidates)
    failures = []
    for _, out in iter_crf(jobs, None, workers, backend, device, interp, progress=progress,
                           desc=f"CRF search ({len(candidates)} settings incl. no CRF x "
                                f"{len(image_jobs)} images)", unit="run"):
        if isinstance(out, CRFFailure):
            failures.append(out)
            continue
        totals.setdefault(out.tag, ConfusionMatrix(out.confusion.num_classes)).merge(out.confusion)
        images[out.tag] += 1

    def row(k: int) -> dict:
        s = totals[k].scores() if k in totals else {}
        return dict(candidates[k].to_dict(), miou=s.get("miou", math.nan),
                    pixel_acc=s.get("pixel_acc", math.nan),
                    mean_class_acc=s.get("mean_class_acc", math.nan), images=images[k])

    return [row(k) for k in range(1, len(candidates))], row(0), failures


def best_setting(rows: list[dict]) -> dict:
    """The row with the highest mIoU (the first of equals, in grid order)."""
    scored = [r for r in rows if not math.isnan(r["miou"])]
    if not scored:
        raise RuntimeError("no setting could be scored: every CRF job failed (see failures.txt)")
    return max(scored, key=lambda r: r["miou"])


def params_of(row: dict) -> CRFParams:
    return CRFParams(**{f.name: row[f.name] for f in dataclasses.fields(CRFParams)})


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def voc_dir(root) -> Path:
    """The VOC2012 folder under `root` (ROOT/VOCdevkit/VOC2012, ROOT/VOC2012 or ROOT itself)."""
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(f"no VOC layout under {root}: expected "
                            f"{root}/VOCdevkit/VOC2012/JPEGImages (pass the folder that holds "
                            "VOCdevkit as --data-root)")


def split_ids(voc: Path, split: str) -> list[str]:
    path = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}. Choose an existing --split "
                                "(train, val, trainval) or check --data-root.")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def find_image(folder: Path, image_id: str) -> Path:
    """<folder>/<id>.jpg (or .jpeg/.png); the .jpg path if none exists (the job then fails
    with a clear 'not found')."""
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
        if (folder / f"{image_id}{ext}").is_file():
            return folder / f"{image_id}{ext}"
    return folder / f"{image_id}.jpg"


def _selected_ids(args) -> list[str]:
    ids = cached_ids(args.cache)
    if not ids:
        raise FileNotFoundError(f"no cached logits (*.npz) in {args.cache}: run evaluate.py "
                                "with this cache folder first")
    if args.split:
        wanted = set(split_ids(voc_dir(args.data_root), args.split))
        ids = [i for i in ids if i in wanted]
        if not ids:
            raise ValueError(f"none of the cached images in {args.cache} is in the "
                             f"{args.split!r} split")
    return ids


def _params_from_args(args, skip=()) -> CRFParams:
    """--params JSON (or the paper's defaults) with the single-value flags applied on top."""
    params = CRFParams.from_json(args.params) if args.params else CRFParams()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(CRFParams)
                 if f.name not in skip and getattr(args, f.name, None) is not None}
    return dataclasses.replace(params, **overrides)


def _write_config(out: Path, args, **extra) -> None:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k != "func"}
    config.update(extra)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_failures(out: Path, failures: list[CRFFailure]) -> None:
    if failures:
        lines = [f"{f.image_id}\t{f.error}" for f in failures]
        (out / "failures.txt").write_text("\n".join(lines) + "\n")
        print(f"{len(failures)} job(s) failed, listed in {out / 'failures.txt'}:", file=sys.stderr)
        for line in lines[:10]:
            print("  " + line, file=sys.stderr)


def cmd_apply(args) -> int:
    params = _params_from_args(args)
    ids = _selected_ids(args)
    image_dir = Path(args.images) if args.images else voc_dir(args.data_root) / "JPEGImages"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_config(out, args, crf_params=params.to_dict(), images_found_in=str(image_dir),
                  num_images=len(ids))
    jobs = [CRFJob(i, str(find_image(image_dir, i)), str(cache_path(args.cache, i)),
                   str(out / f"{i}.png")) for i in ids]
    results, failures = run_crf(jobs, params, args.workers, args.backend, args.device,
                                args.interp)
    _write_failures(out, failures)
    print(f"wrote {len(results)} CRF label PNGs to {out}")
    return 1 if failures else 0


def cmd_search(args) -> int:
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    base = _params_from_args(args, skip=tuple(PAPER_GRID))  # the grid sets the bilateral term
    voc = voc_dir(args.data_root)
    ids = pick_subset(_selected_ids(args), args.num_images, args.seed)
    if len(ids) < args.num_images:
        print(f"note: only {len(ids)} cached images available; searching on all of them",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ids.txt").write_text("\n".join(ids) + "\n")
    grid = {"bi_w": args.bi_w, "bi_xy_std": args.bi_xy_std, "bi_rgb_std": args.bi_rgb_std}
    settings = search_grid(**grid, base=base)
    _write_config(out, args, base_params=base.to_dict(), grid=grid, num_settings=len(settings),
                  ids_file=str(out / "ids.txt"))
    jobs = [CRFJob(i, str(find_image(voc / "JPEGImages", i)), str(cache_path(args.cache, i)),
                   gt_path=str(voc / "SegmentationClass" / f"{i}.png")) for i in ids]
    rows, baseline, failures = search(jobs, settings, args.workers, args.backend, args.device,
                                      args.interp)
    _write_failures(out, failures)
    if len({r["images"] for r in rows}) > 1:
        print("warning: settings were scored on different numbers of images (see failures.txt);"
              " their mIoUs are not comparable", file=sys.stderr)
    best = best_setting(rows)
    ranked = sorted(rows, key=lambda r: -r["miou"] if not math.isnan(r["miou"]) else math.inf)
    columns = [f.name for f in dataclasses.fields(CRFParams)] + [
        "miou", "pixel_acc", "mean_class_acc", "images"]
    with open(out / "search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank"] + columns)
        writer.writeheader()
        for rank, r in enumerate(ranked, 1):
            writer.writerow(dict(rank=rank, **{k: r[k] for k in columns}))
    params_of(best).to_json(out / "best.json")
    summary = {"best": best, "no_crf": baseline, "num_images": len(ids),
               "num_settings": len(settings), "failures": len(failures)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'w_bi':>6}{'xy_std':>8}{'rgb_std':>9}{'mIoU %':>9}{'pix acc %':>11}")
    for r in ranked[:args.top]:
        print(f"{r['bi_w']:6g}{r['bi_xy_std']:8g}{r['bi_rgb_std']:9g}"
              f"{100 * r['miou']:9.2f}{100 * r['pixel_acc']:11.2f}")
    print(f"no CRF on the same {baseline['images']} images: mIoU {100 * baseline['miou']:.2f}, "
          f"pixel acc {100 * baseline['pixel_acc']:.2f}")
    print(f"best: w_bi={best['bi_w']:g} theta_alpha={best['bi_xy_std']:g} "
          f"theta_beta={best['bi_rgb_std']:g} -> {out / 'best.json'} "
          "(use with `crf.py apply --params` or `evaluate.py --crf --crf-params`)")
    return 1 if failures else 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, type=Path,
                   help="folder of cached logits <id>.npz (written by evaluate.py)")
    p.add_argument("--data-root", type=Path, default=Path("data"),
                   help="folder holding VOCdevkit/VOC2012 (default: %(default)s)")
    p.add_argument("--out", required=True, type=Path, help="run folder for the outputs")
    p.add_argument("--params", type=Path,
                   help="CRF parameter JSON (e.g. a search's best.json); default: the paper's")
    p.add_argument("--iterations", type=int, help="mean-field iterations (paper: 10)")
    p.add_argument("--pos-w", type=float, help="Gaussian kernel weight w_pos (paper: 3)")
    p.add_argument("--pos-xy-std", type=float, help="Gaussian kernel theta_gamma, px (paper: 1)")
    p.add_argument("--normalization", choices=sorted(NORMALIZATIONS),
                   help="message normalisation (default 'after', as DeepLab's CRF binary)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores; 1 for --backend torch on cuda)")
    p.add_argument("--backend", choices=BACKENDS, default="pydensecrf",
                   help="pydensecrf (C++, default) or torch (crf_torch.py, no build needed)")
    p.add_argument("--device", default="cpu", help="device for --backend torch (cpu, cuda)")
    p.add_argument("--interp", choices=("caffe", "pytorch"), default="caffe",
                   help="logit upsampling: caffe = Interp, align_corners=True (default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    apply = sub.add_parser("apply", help="CRF label PNGs for every cached image")
    _add_common(apply)
    apply.add_argument("--split", default=None,
                       help="only images of this VOC split (default: every cached image)")
    apply.add_argument("--images", type=Path,
                       help="folder of <id>.jpg images (default: DATA_ROOT's JPEGImages)")
    apply.add_argument("--bi-w", dest="bi_w", type=float, help="bilateral weight (paper: 4)")
    apply.add_argument("--bi-xy-std", dest="bi_xy_std", type=float,
                       help="bilateral theta_alpha, px (paper: 67)")
    apply.add_argument("--bi-rgb-std", dest="bi_rgb_std", type=float,
                       help="bilateral theta_beta (paper: 3)")
    apply.set_defaults(func=cmd_apply)

    search_p = sub.add_parser("search", help="grid search of the bilateral term (stage two)")
    _add_common(search_p)
    search_p.add_argument("--split", default="val", help="VOC split to draw from (default: val)")
    search_p.add_argument("--num-images", type=int, default=100,
                          help="images in the search subset (default: %(default)s)")
    search_p.add_argument("--seed", type=int, default=0, help="subset shuffle seed")
    search_p.add_argument("--bi-w", dest="bi_w", type=float, nargs="+",
                          default=PAPER_GRID["bi_w"], help="w_bi values (default: 3 4 5 6)")
    search_p.add_argument("--bi-xy-std", dest="bi_xy_std", type=float, nargs="+",
                          default=PAPER_GRID["bi_xy_std"],
                          help="theta_alpha values (default: 30 40 ... 100)")
    search_p.add_argument("--bi-rgb-std", dest="bi_rgb_std", type=float, nargs="+",
                          default=PAPER_GRID["bi_rgb_std"],
                          help="theta_beta values (default: 3 4 5 6)")
    search_p.add_argument("--top", type=int, default=10, help="settings to print")
    search_p.set_defaults(func=cmd_search)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
