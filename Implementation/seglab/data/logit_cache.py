"""The logit cache: the network's output for each image, saved once so the CRF, the CRF
parameter search and later scoring runs never recompute the network.

One file per image, `<cache_dir>/<image_id>.npz`, holding
    logits      float16 (C, h, w): the MSC-fused logits at output stride 8 (65x65 for VOC's 513)
    input_size  (H', W'): the size of the (possibly padded) tensor that went into the network
    size        (H, W): the original image size (H <= H', W <= W')
About 180 kB per VOC image (21 x 65 x 65 x 2 bytes). Files are written atomically (temp file,
then rename), so an interrupted run never leaves half a file behind.

`seglab.models.resize.full_resolution_logits` turns cached logits into full-resolution scores.

Beside the files, `cache.json` records what made them (CACHE_KEYS: checkpoint identity, scales,
resizing, normalisation, precision, protocol, ...): `prepare_cache` keeps a cache only when the
same settings made it, and `cached_indices` re-checks each file against its image's size.
"""
from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglab.atomic import atomic_output, write_json
from seglab.data.protocols import protocol_size

CACHE_INFO = "cache.json"
CACHE_KEYS = ("identity", "msc_scales", "interp", "norm", "precision", "mode", "pad_to",
              "num_classes", "flip", "msc_fusion")


class LogitCacheError(RuntimeError):
    """A cache file that is missing, unreadable or inconsistent."""


def cache_path(cache_dir, image_id: str) -> Path:
    return Path(cache_dir) / f"{image_id}.npz"


def cached_ids(cache_dir) -> list[str]:
    """Sorted ids of every image in a cache folder."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise LogitCacheError(f"logit cache folder not found: {cache_dir}. Fill it first by "
                              "running `python Implementation/evaluate.py` with this cache folder.")
    return sorted(p.stem for p in cache_dir.glob("*.npz"))


def _pair(value, name) -> tuple[int, int]:
    pair = tuple(int(v) for v in np.asarray(value).reshape(-1))
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be (height, width) of positive ints, got {value!r}")
    return pair


def save_logits(path, logits, input_size, size) -> Path:
    """Write one image's logits (C, h, w; torch or numpy) as float16, atomically."""
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().float().numpy()
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (C, h, w), got shape {logits.shape}")
    input_size, size = _pair(input_size, "input_size"), _pair(size, "size")
    if size[0] > input_size[0] or size[1] > input_size[1]:
        raise ValueError(f"image size {size} is larger than the network input size {input_size}")
    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, logits=logits.astype(np.float16), input_size=np.array(input_size),
                 size=np.array(size))
    return path


def load_logits(path) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(logits float32 (C, h, w), input_size (H', W'), size (H, W)) from one cache file."""
    path = Path(path)
    if not path.is_file():
        raise LogitCacheError(f"cached logits not found: {path}. Compute them by running "
                              "`python Implementation/evaluate.py` with the cache folder "
                              f"{path.parent}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            logits, input_size, size = data["logits"], data["input_size"], data["size"]
        input_size, size = _pair(input_size, "input_size"), _pair(size, "size")
        if logits.ndim != 3:
            raise ValueError(f"logits have shape {logits.shape}, expected (C, h, w)")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise LogitCacheError(f"corrupt logit cache file {path} ({type(e).__name__}: {e}). "
                              "Delete it and run evaluate.py again to recompute it.") from e
    return torch.from_numpy(logits.astype(np.float32)), input_size, size


def prepare_cache(cache_dir: Path, key: dict, recompute: bool) -> None:
    """Keep the cached logits only if cache.json says the same settings made them; otherwise
    (or with recompute) delete them and write the new cache.json."""
    info = cache_dir / CACHE_INFO
    old = None
    if info.is_file():
        try:
            old = json.loads(info.read_text())
        except ValueError:
            old = None
    stale = list(cache_dir.glob("*.npz"))
    if old != key or recompute:
        if stale:
            why = ("--recompute" if recompute else
                   "it was made by another checkpoint or other settings" if old else
                   f"it has no readable {CACHE_INFO}")
            print(f"logit cache {cache_dir}: recomputing {len(stale)} files ({why})",
                  file=sys.stderr)
            for p in stale:
                p.unlink()
        write_json(info, key)


def cached_indices(dataset, indices, cache_dir: Path, mode: str = "voc") -> set:
    """The images whose cache file is readable and for an image of its label's size (else the
    data set changed under the cache)."""
    cached = set()
    for i in indices:
        path = cache_path(cache_dir, dataset.ids[i])
        if not path.is_file():
            continue
        try:
            _, _, size = load_logits(path)
        except LogitCacheError as e:
            print(f"{e} Recomputing it.", file=sys.stderr)
            continue
        with Image.open(dataset.label_path(i)) as label_file:
            label_size = protocol_size(mode, (label_file.height, label_file.width))
        if size == label_size:
            cached.add(i)
        else:
            print(f"cached logits {path} are for a {size[0]}x{size[1]} image but the label "
                  f"{dataset.label_path(i)} is {label_size[0]}x{label_size[1]}: recomputing",
                  file=sys.stderr)
    return cached
