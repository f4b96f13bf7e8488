"""The dense CRF on many images in parallel worker processes, with a progress bar.

pydensecrf holds the GIL, so images run in separate worker processes ("spawn" start method, one
torch thread each). Workers receive file paths, not arrays, and load one image and its cached
logits themselves, so memory stays at about one image per worker and the messages between
processes stay tiny (a label map, or just a confusion matrix when the job has a ground truth).
A job that fails is reported with its image id and error; the others finish.
"""
from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from seglab.data.labels import load_label, save_label_png
from seglab.data.protocols import protocol_label
from seglab.densecrf.dense_crf import DenseCRF, load_crf_inputs, resolve_backend
from seglab.densecrf.params import CRFParams, is_torch_backend
from seglab.data.metrics import ConfusionMatrix, TrimapEvaluator


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
    mode: str = "voc"               # the evaluation protocol the cached logits were made with
    palette: tuple | None = None    # the label PNGs' class colours (the model's); None: VOC's


# The last image a worker prepared: the search runs every setting on one image in a row.
_PREPARED: dict = {}


def _prepare(job: CRFJob, interp: str, mode: str = "voc"):
    key = (job.image_path, job.logits_path, interp)
    if key not in _PREPARED:
        _PREPARED.clear()
        _PREPARED[key] = load_crf_inputs(job.image_path, job.logits_path, interp, mode)
    return _PREPARED[key]


def _run_job(item: tuple[int, CRFJob, _Settings]):
    """Worker body: one job -> (index, CRFResult | CRFFailure). Never raises."""
    index, job, s = item
    started, cpu_started = time.time(), time.process_time()
    try:
        image, unary = _prepare(job, s.interp, s.mode)
        h, w = image.shape[:2]
        crf = DenseCRF(job.params or s.params, s.backend, s.device)
        pred = crf.infer(image, unary).argmax(0).reshape(h, w).astype(np.uint8)
        confusion = trimap = None
        if job.gt_path is not None:
            gt = protocol_label(s.mode, load_label(job.gt_path, num_classes=unary.shape[0]))
            if gt.shape != (h, w):
                raise ValueError(f"label {job.gt_path} is {gt.shape[1]}x{gt.shape[0]} (WxH) "
                                 f"under the {s.mode!r} protocol, its image {w}x{h}")
            confusion = ConfusionMatrix(unary.shape[0]).update(pred, gt)
            if s.trimap_widths:
                trimap = TrimapEvaluator(s.trimap_widths, unary.shape[0]).update(pred, gt)
        if job.out_path is not None:
            save_label_png(job.out_path, pred, s.palette)
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
    return 1 if is_torch_backend(backend) and str(device).startswith("cuda") else (os.cpu_count() or 1)


def iter_crf(jobs: Iterable, params: CRFParams | None = None, workers: int | None = None,
             backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
             return_labels: bool = False, trimap_widths=None, progress: bool = True,
             desc: str = "CRF", unit: str = "img",
             mode: str = "voc") -> Iterator[tuple[int, CRFResult | CRFFailure]]:
    """Run the CRF on every job and yield (job index, result or failure) as they complete.

    workers=1 runs in this process; more start a "spawn" pool (one torch thread per worker,
    jobs handed out one at a time for load balance)."""
    jobs = [job if isinstance(job, CRFJob) else CRFJob(*job) for job in jobs]
    backend = resolve_backend(backend)  # the workers get the backend that is there
    settings = _Settings(params or CRFParams(), backend, device, interp, return_labels,
                         tuple(trimap_widths) if trimap_widths else None, mode)
    DenseCRF(settings.params, backend, device)  # fail here, not in every worker
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


class CRFStream:
    """CRF jobs handed in as they become ready (e.g. as the network caches each image's
    logits), run by worker processes started up front, so that the network and the CRF keep
    every core busy at once: no network pass waiting on the CRF, no CRF waiting for the whole
    network pass, and no idle tail (jobs go out one at a time). `finish()` waits for the last
    one. workers=1 runs each job in this process when it is submitted."""

    def __init__(self, params: CRFParams | None = None, workers: int | None = None,
                 backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
                 trimap_widths=None, progress: bool = True, desc: str = "CRF",
                 mode: str = "voc", palette=None):
        backend = resolve_backend(backend)
        self.settings = _Settings(params or CRFParams(), backend, device, interp, False,
                                  tuple(trimap_widths) if trimap_widths else None, mode,
                                  tuple(map(tuple, palette)) if palette is not None else None)
        DenseCRF(self.settings.params, backend, device)  # fail here, not in every worker
        workers = workers or default_workers(backend, device)
        self.pool = (multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
                     if workers > 1 else None)
        self.done, self.pending, self.count = [], [], 0
        self.bar = tqdm(total=0, desc=desc, unit="img", disable=not progress, position=1,
                        leave=True)

    def submit(self, job: CRFJob) -> None:
        item = (self.count, job, self.settings)
        self.count += 1
        self.bar.total = self.count
        self.bar.refresh()
        if self.pool is None:
            self._finished(_run_job(item))
        else:
            self.pending.append(self.pool.apply_async(_run_job, (item,),
                                                      callback=self._finished))

    def _finished(self, pair) -> None:
        self.done.append(pair)
        self.bar.update(1)

    def finish(self) -> tuple[list[CRFResult], list[CRFFailure]]:
        """Wait for every job: (results, failures), each in submission order."""
        try:
            for pending in self.pending:
                pending.wait()
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool.join()
            self.bar.close()
            _PREPARED.clear()
        done = [out for _, out in sorted(self.done, key=lambda pair: pair[0])]
        return ([o for o in done if isinstance(o, CRFResult)],
                [o for o in done if isinstance(o, CRFFailure)])

    def abort(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
        self.bar.close()


def run_crf(jobs: Iterable, params: CRFParams | None = None, workers: int | None = None,
            backend: str = "pydensecrf", device: str = "cpu", interp: str = "caffe",
            return_labels: bool = False, trimap_widths=None, progress: bool = True,
            desc: str = "CRF", mode: str = "voc") -> tuple[list[CRFResult], list[CRFFailure]]:
    """Run the CRF on every job: (results, failures), each in job order.

    A job is a CRFJob or a tuple (image_id, image_path, logits_npz_path, out_png_path_or_None
    [, gt_path]). Each worker loads the image and its cached logits itself, upsamples the
    logits (logit_cache.full_resolution_logits), runs the CRF, writes the PNG if asked, and
    returns the labels (return_labels=True) and/or the confusion matrix against gt_path."""
    done = sorted(iter_crf(jobs, params, workers, backend, device, interp, return_labels,
                           trimap_widths, progress, desc, mode=mode), key=lambda pair: pair[0])
    results = [out for _, out in done if isinstance(out, CRFResult)]
    failures = [out for _, out in done if isinstance(out, CRFFailure)]
    return results, failures
