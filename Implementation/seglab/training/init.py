"""Where training starts from (train.init): scratch, ImageNet, or a checkpoint of ours.

The paper starts from the MS-COCO model of the Caffe release (convert it with convert.py).
Pretrained weights imply frozen BatchNorm where the architecture has that option; torchvision's
ImageNet ResNet implies the torchvision block form and ImageNet input normalisation.

Fine-tuning to another class count: a checkpoint of ours trained on another data set (21 VOC
classes -> your 5) fills every tensor whose name and shape fit. The tensors that do not are
re-initialised as the architecture builds them, and they may only be its classifier: the tensors
whose shape depends on num_classes (found exactly, by building the architecture for two class
counts on the meta device), plus, for converted files that ship without one, the head modules
`aspp.` / `classifier.` / `head.`. Every re-initialised tensor is named in the line this returns
(train.py prints it). Any other mismatch (another backbone depth or width, another
architecture) is an error naming the difference.
"""
from __future__ import annotations

from pathlib import Path

import torch

from seglab.checkpoint import CheckpointError, check_arch, load_checkpoint
from seglab.models import architecture, build_model
from seglab.weights.torchvision_imagenet import load_torchvision_state, torchvision_to_ours


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent batch settings, bad init)."""


def prepare_init(cfg: dict) -> None:
    """Adjust the config to what train.init implies (before the network is built)."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return
    if "frozen_bn" in architecture(cfg["model"]["name"]).defaults():
        cfg["model"]["arch"]["frozen_bn"] = True
    if init.startswith("imagenet"):
        if cfg["model"]["name"] != "deeplabv2":
            raise TrainingError("train.init=imagenet fills DeepLab v2's ResNet from torchvision's "
                                f"ImageNet weights; {cfg['model']['name']} loads its backbone "
                                "from a converted checkpoint instead (see convert.py --help)")
        cfg["model"]["arch"]["style"], cfg["data"]["norm"] = "pytorch", "imagenet"


HEAD_PREFIXES = ("aspp.", "classifier.", "head.")


def _fill(net, state: dict, where) -> None:
    """Load `state` into `net`; only the classifier head (the architecture's newly initialised
    layers: any key the state lacks) may stay as initialised."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    head = {k for k in net.state_dict() if k.startswith(HEAD_PREFIXES)}
    if unexpected or any(k not in head for k in missing):
        raise TrainingError(f"{where} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")


def class_dependent(arch: dict) -> set[str]:
    """The state_dict keys of `arch` whose shapes change with num_classes: its classifier.
    Built twice on the meta device (no memory, no init cost); on CPU if a build needs data."""
    def shapes(num_classes: int) -> dict:
        spec = dict(arch, num_classes=num_classes)
        try:
            with torch.device("meta"):
                net = build_model(spec)
        except (RuntimeError, NotImplementedError, TypeError):
            net = build_model(spec)
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}
    a, b = shapes(arch["num_classes"]), shapes(arch["num_classes"] + 1)
    return {k for k in a if a[k] != b.get(k)}


def fill_across_classes(net, ckpt: dict, where) -> tuple[int, list[str]]:
    """Copy every tensor of `ckpt` whose name and shape fit `net`; the rest of `net` keeps its
    fresh init and must be its classifier. Returns (tensors loaded, the re-initialised keys as
    "name (checkpoint shape -> our shape)")."""
    ours = net.arch
    try:  # every option but the class count must match
        check_arch(dict(ckpt, arch=dict(ckpt["arch"], num_classes=ours["num_classes"])), ours,
                   where)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    state, target = ckpt["model"], net.state_dict()
    head = class_dependent(ours)
    fits = {k: v for k, v in state.items()
            if k in target and tuple(v.shape) == tuple(target[k].shape)}
    left = [k for k in target if k not in fits and not k.endswith("num_batches_tracked")]
    stray = [k for k in left
             if k not in head and not (k not in state and k.startswith(HEAD_PREFIXES))]
    unexpected = sorted(set(state) - set(target))
    if stray or unexpected:
        problems = [f"{k}: checkpoint {tuple(state[k].shape) if k in state else 'has none'}, "
                    f"model {tuple(target[k].shape)}" for k in stray[:4]]
        problems += [f"{k}: not in the model" for k in unexpected[:4]]
        raise TrainingError(f"{where} does not fit the model outside its classifier "
                            f"({'; '.join(problems)}). Only the class count may differ: use a "
                            "checkpoint of the same architecture and backbone options.")
    net.load_state_dict(fits, strict=False)
    return len(fits), [f"{k} ({tuple(state[k].shape) if k in state else 'absent'} -> "
                       f"{tuple(target[k].shape)})" for k in left]


def load_init(net, cfg: dict) -> str:
    """Fill the network from train.init: scratch | imagenet[=FILE] | a checkpoint of ours.
    Returns a line saying what was loaded (and which tensors were re-initialised)."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return "scratch (PyTorch default init; DeepLab v2's ASPP N(0, 0.01))"
    if init.startswith("imagenet"):
        src = init.split("=", 1)[1] if "=" in init else "download"
        try:
            state = torchvision_to_ours(load_torchvision_state(src))
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainingError(f"cannot use ImageNet weights {src}: {e}") from None
        _fill(net, state, f"ImageNet weights {src}")
        return f"torchvision ImageNet ResNet ({src})"
    path = Path(init)
    if not path.is_file():
        raise TrainingError(
            f"init weights {path} not found. The paper starts from the MS-COCO model: download "
            "init.caffemodel (see README) and run `python Implementation/convert.py caffe "
            f"init.caffemodel {path}`, or pass --init imagenet / --init scratch.")
    ckpt = load_checkpoint(path)
    loaded, reinit = fill_across_classes(net, ckpt, path)
    theirs = (ckpt.get("arch") or {}).get("num_classes")
    line = f"{path} (trained on {ckpt.get('trained_on')}"
    line += f", {theirs} classes -> {net.arch['num_classes']})" if theirs != net.arch[
        "num_classes"] else ")"
    if not reinit:
        return line + "; every tensor loaded"
    return (line + f"; loaded {loaded} tensors, re-initialised {len(reinit)} (the "
            "classifier):\n  " + "\n  ".join(reinit))
