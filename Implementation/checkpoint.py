"""Our checkpoint format: one torch file holding plain data only, so it loads with
`weights_only=True`, written atomically (temp file + rename) so a crash never leaves half a file.

    {
      "format": "deeplab-v2", "version": 1,
      "arch": {...DeepLabV2 kwargs...},          # rebuilds the network (model.build_model)
      "model": state_dict of DeepLabV2 (no MSC / DDP prefixes),
      "trained_on": "train_aug" | "trainval" | ... | None,   # which split the weights saw
      "provenance": {...},                       # source file, sha256, converter, notes
      # training checkpoints also carry: optimizer, iteration, rng, config
    }
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from atomic import atomic_output

FORMAT, VERSION = "deeplab-v2", 1


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
    return dict(format=FORMAT, version=VERSION, arch=dict(arch),
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
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. Is it a deeplab-v2 checkpoint? "
                              "Published/Caffe/torchvision weights must first go through "
                              "`python Implementation/convert.py`.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deeplab-v2 checkpoint (no format={FORMAT!r} field). "
                              "Convert foreign weights with `python Implementation/convert.py`.")
    return ckpt


def check_arch(ckpt: dict, arch: dict, path="checkpoint") -> None:
    """Raise if a checkpoint was made for another architecture than `arch`."""
    diff = {k: (ckpt["arch"].get(k), v) for k, v in arch.items()
            if k != "frozen_bn" and ckpt["arch"].get(k) != v}  # freezing is a training choice
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{path} is for another architecture ({lines}). "
                              "Use the matching --config/arch settings, or another checkpoint.")


def load_model_weights(net, ckpt: dict, path="checkpoint") -> None:
    """Copy a checkpoint's weights into a DeepLabV2, failing clearly on any mismatch."""
    check_arch(ckpt, net.arch, path)
    missing, unexpected = net.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:5]}..., "
                              f"unexpected {unexpected[:5]}...")
