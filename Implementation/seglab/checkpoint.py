"""Our checkpoint format: one torch file holding plain data only, so it loads with
`weights_only=True`, written atomically (temp file + rename) so a crash never leaves half a file.

    {
      "format": "seglab", "version": 1,
      "arch": {"name": ..., ...its options...},  # rebuilds the network (models.build_model)
      "model": state_dict of the bare network (no MSC / DDP prefixes),
      "trained_on": "train_aug" | "trainval" | ... | None,   # which split the weights saw
      "input_norm": "caffe" | "imagenet" | "tf",  # how its inputs were normalised
      "provenance": {...},                       # source file, sha256, converter, notes
      # training checkpoints also carry: optimizer, iteration, rng, config
    }

Checkpoints written before the pipeline had several architectures say format "deeplab-v2" and
have no arch name: they load as DeepLab v2.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from seglab.atomic import atomic_output
from seglab.models import normalize_arch

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
    """torch.save to a temp file in the same folder, then rename over `path` (atomic.py)."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def make_checkpoint(arch: dict, state_dict: dict, trained_on=None, provenance=None, **extra) -> dict:
    return dict(format=FORMAT, version=VERSION, arch=normalize_arch(arch),
                model={k: v.detach().cpu() for k, v in state_dict.items()},
                trained_on=trained_on, provenance=dict(provenance or {}), **extra)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and validate one of our checkpoints (weights_only=True: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. Is it a checkpoint of this project? "
                              "Published/Caffe/torchvision weights must first go through "
                              "`python Implementation/convert.py`.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in FORMATS_READ:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no format={FORMAT!r} "
                              "field). "
                              "Convert foreign weights with `python Implementation/convert.py`.")
    return ckpt


def check_arch(ckpt: dict, arch: dict, path="checkpoint") -> None:
    """Raise if a checkpoint was made for another architecture than `arch`."""
    theirs, ours = normalize_arch(ckpt["arch"]), normalize_arch(arch)
    diff = {k: (theirs.get(k), v) for k, v in ours.items()
            if k != "frozen_bn" and theirs.get(k) != v}  # freezing is a training choice
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
