"""What every converter shares: its error, reading a torch file safely, and putting mapped
tensors into a model's state_dict with every key and shape checked."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from seglab.checkpoint import FORMATS_READ, CheckpointError, safe_load
from seglab.models import class_dependent, unwrap


class ConversionError(ValueError):
    """Weights that do not map onto our model (unknown/missing layer, wrong shape, ...)."""


def blocks_per_stage(keys, pattern: str) -> dict[int, list[str]]:
    """Stage -> distinct block labels in order of first appearance, from keys matching
    `pattern` (groups: stage, block)."""
    found = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            blocks = found.setdefault(int(m.group(1)), [])
            if m.group(2) not in blocks:
                blocks.append(m.group(2))
    return found


def add_num_batches_tracked(sd: dict):
    """Older PyTorch files lack BatchNorm's counter; add it (0) wherever running_mean exists."""
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd.setdefault(key[:-len("running_mean")] + "num_batches_tracked",
                      torch.tensor(0, dtype=torch.long))


def merge_into(net, mapped: dict, required_prefix: str = "") -> tuple[dict, list]:
    """net's state_dict with `mapped` copied in. Every mapped key must exist with the same shape;
    every key starting with `required_prefix` must be mapped. Returns (state_dict, left at init)."""
    target = {k: v.detach().clone() for k, v in unwrap(net).state_dict().items()}
    unknown = [k for k in mapped if k not in target]
    if unknown:
        raise ConversionError(f"{len(unknown)} tensors have no home in the model: {unknown[:5]}")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ConversionError(f"{k}: shape {tuple(v.shape)} in the file, "
                                  f"{tuple(target[k].shape)} in the model")
        target[k] = v.detach().clone().to(target[k].dtype)
    unfilled = [k for k in target if k not in mapped]
    required = [k for k in unfilled if k.startswith(required_prefix)]
    if required:
        raise ConversionError(f"{len(required)} tensors of the model are missing from the file: "
                              f"{required[:5]}")
    return target, unfilled


def load_across_classes(net, state: dict, optional=()) -> tuple[int, list[str]]:
    """Copy into `net` every tensor of `state` whose name and shape fit. What keeps the fresh
    init may only be the classifier (models.class_dependent: the tensors whose shape follows the
    class count, re-initialised when `state` has another count) and keys under the `optional`
    prefixes that `state` lacks (a file shipped without that head). Returns (tensors loaded,
    the re-initialised keys as "name (file shape -> our shape)"); any other misfit (another
    backbone, another architecture) is a ConversionError naming it.

    The one loader across class counts: convert.py's torchvision / VainF files (their COCO or
    VOC heads onto another --num-classes) and train.py's --init (training/init.py)."""
    head = class_dependent(unwrap(net).arch)
    target = unwrap(net).state_dict()
    fits = {k: v for k, v in state.items()
            if k in target and tuple(v.shape) == tuple(target[k].shape)}
    left = [k for k in target if k not in fits and not k.endswith("num_batches_tracked")]
    stray = [k for k in left if k not in head and not (k not in state and
                                                       k.startswith(tuple(optional)))]
    unexpected = sorted(set(state) - set(target))
    if stray or unexpected:
        problems = [f"{k}: file {tuple(state[k].shape) if k in state else 'has none'}, "
                    f"model {tuple(target[k].shape)}" for k in stray[:4]]
        problems += [f"{k}: not in the model" for k in unexpected[:4]]
        raise ConversionError(f"does not fit the model outside its classifier "
                              f"({'; '.join(problems)}). Only the class count may differ: use a "
                              "checkpoint of the same architecture and backbone options.")
    unwrap(net).load_state_dict(fits, strict=False)
    return len(fits), [f"{k} ({tuple(state[k].shape) if k in state else 'absent'} -> "
                       f"{tuple(target[k].shape)})" for k in left]


def load_torch_state(path, wrappers=("state_dict", "model"), safe_globals=()) -> dict:
    """The state_dict in a foreign weights file, read with torch.load(weights_only=True)
    (checkpoint.safe_load): unwrapped from the first of `wrappers` it is stored under (VainF's
    `model_state`, torchvision's reference `model`, `state_dict`), a DataParallel `module.`
    prefix removed. `safe_globals`: plain-data classes the file may hold besides tensors
    (VainF's numpy scores), allowed by torch.serialization.safe_globals."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (`convert.py --help` lists download URLs)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            obj = safe_load(path, "weights file")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if isinstance(obj, dict) and obj.get("format") in FORMATS_READ:
        raise ConversionError(f"{path} is already one of our checkpoints (use it as it is, or "
                              "`--to-published` to export it)")
    for wrapper in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or \
            not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)
