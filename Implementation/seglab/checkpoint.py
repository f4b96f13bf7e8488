"""Our checkpoint format: one torch file holding plain data only, so it loads with
`weights_only=True`, written atomically (temp file + rename) so a crash never leaves half a file.

    {
      "format": "seglab", "version": 1,
      "arch": {"name": ..., ...its options...},  # rebuilds the network (models.build_model)
      "model": state_dict of the bare network (no MSC / DDP prefixes),
      "trained_on": "train_aug" | "trainval" | ... | None,   # which split the weights saw
      "input_norm": "caffe" | "imagenet" | "tf",  # how its inputs were normalised
      "recipe": {"msc_scales", "msc_fusion", "interp", "mode", "pad_to", "source"},
                                                 # how it is tested (seglab/recipe.py)
      "dataset": "voc" | "cityscapes" | ... ,    # the label set its classifier predicts
      "classes": [names], "palette": [[r, g, b], ...],   # one per class
      "provenance": {...},                       # source file, sha256, converter, notes
      # training checkpoints also carry: optimizer, iteration, rng, config
    }

Checkpoints written before the pipeline had several architectures say format "deeplab-v2" and
have no arch name: they load as DeepLab v2. Checkpoints written before classes and recipes
travelled with the weights load as VOC (its names and colour map) with the recipe of their
training config, else their architecture's (`label_set`, seglab/recipe.py).
"""
from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import torch

from seglab.atomic import atomic_output
from seglab.data.labels import VOC_CLASSES, class_names, full_palette, voc_palette
from seglab.models import architecture, normalize_arch

FORMAT, VERSION = "seglab", 1
FORMATS_READ = (FORMAT, "deeplab-v2")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or for another architecture."""


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_save(obj, path) -> Path:
    """torch.save to a temp file in the same folder, then rename over `path` (atomic.py). A
    failed write (a full disk, a folder that is not writable) leaves `path` as it was and
    raises a CheckpointError saying where and why."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        free = ""
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2 ** 20:.0f} MiB free there"
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}"
                              f"{free}). The previous file, if any, is intact; free disk space "
                              "or choose another folder.") from None
    return path


def safe_load(path, what: str = "checkpoint", map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True), with errors that say what is wrong in our words: an empty
    file, a file that is not a torch file, or one that holds pickled objects other than plain
    tensors and data (refused: unpickling them could run code). `mmap`: tensors stay in the
    file until touched (reading a checkpoint's facts costs no weight I/O); a file of the legacy
    format, which cannot be mapped, is read whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read {what} {path}: the file is empty (0 bytes); it was "
                              "cut short while being written or copied. Copy or download it "
                              "again.")
    try:
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = ("it holds pickled objects other than tensors and plain data, which this "
                  "project refuses to load because unpickling them can run arbitrary code"
                  if "weights_only" in str(e) or "Unsupported global" in str(e) else
                  "it is not a PyTorch file")
        raise CheckpointError(f"cannot read {what} {path}: {reason}. Use the original file "
                              "from its source.") from None
    except Exception as e:  # a truncated zip, another format altogether
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {what} {path}: not a readable PyTorch file "
                              f"({first[:200]}). Copy or download it again.") from None


def make_checkpoint(arch: dict, state_dict: dict, trained_on=None, provenance=None, **extra) -> dict:
    return dict(format=FORMAT, version=VERSION, arch=normalize_arch(arch),
                model={k: v.detach().cpu() for k, v in state_dict.items()},
                trained_on=trained_on, provenance=dict(provenance or {}), **extra)


def label_set(ckpt: dict | None, num_classes: int) -> tuple[list[str], list[list[int]]]:
    """(class names, RGB colour of each class) a checkpoint states; VOC's names (the index past
    20) and the VOC colour map for one that states none (written before they were recorded)."""
    ckpt = ckpt or {}
    names, colors = ckpt.get("classes"), ckpt.get("palette")
    if not names or len(names) != num_classes:
        names = class_names(num_classes)
    if colors is None or len(colors) != num_classes:
        colors = voc_palette()[:num_classes]
    return [str(n) for n in names], [[int(c) for c in rgb] for rgb in colors]


def label_facts(dataset: str | None, classes, colors) -> dict:
    """The `dataset` / `classes` / `palette` fields of a checkpoint."""
    return dict(dataset=dataset, classes=[str(c) for c in classes],
                palette=full_palette(colors)[:len(classes)].tolist())


VOC_LABELS = label_facts("voc", VOC_CLASSES, voc_palette()[:len(VOC_CLASSES)])


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load and validate one of our checkpoints (weights_only=True: no pickled code runs;
    `mmap`: see safe_load)."""
    path = Path(path)
    ckpt = safe_load(path, "checkpoint", map_location, mmap)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in FORMATS_READ:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no format={FORMAT!r} "
                              "field). "
                              "Convert foreign weights with `python Implementation/convert.py`.")
    return ckpt


def check_arch(ckpt: dict, arch: dict, path="checkpoint") -> None:
    """Raise if a checkpoint was made for another architecture than `arch`."""
    theirs, ours = normalize_arch(ckpt["arch"]), normalize_arch(arch)
    free = {"frozen_bn", *architecture(ours).training_options}  # shape no tensor
    diff = {k: (theirs.get(k), v) for k, v in ours.items()
            if k not in free and theirs.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} is for another architecture ({lines}). "
                              "Use the matching --config/arch settings, or another checkpoint.")


def load_model_weights(net, ckpt: dict, path="checkpoint") -> None:
    """Copy a checkpoint's weights into a network, failing clearly on any mismatch."""
    check_arch(ckpt, net.arch, path)
    missing, unexpected = net.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}..., "
                              f"unexpected {unexpected[:5]}...")
