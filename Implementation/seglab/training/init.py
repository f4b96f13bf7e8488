"""Where training starts from (train.init): scratch, ImageNet, or a checkpoint of ours.

The paper starts from the MS-COCO model of the Caffe release (convert it with convert.py).
Pretrained weights imply frozen BatchNorm where the architecture has that option; torchvision's
ImageNet ResNet implies the torchvision block form and ImageNet input normalisation.
"""
from __future__ import annotations

from pathlib import Path

from seglab.checkpoint import CheckpointError, check_arch, load_checkpoint
from seglab.models import architecture
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


def _fill(net, state: dict, where) -> None:
    """Load `state` into `net`; only the classifier head (the architecture's newly initialised
    layers: any key the state lacks) may stay as initialised."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    head = {k for k in net.state_dict() if k.startswith(("aspp.", "classifier.", "head."))}
    if unexpected or any(k not in head for k in missing):
        raise TrainingError(f"{where} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")


def load_init(net, cfg: dict) -> str:
    """Fill the network from train.init: scratch | imagenet[=FILE] | a checkpoint of ours.
    Returns a line saying what was loaded."""
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
    try:
        check_arch(ckpt, net.arch, path)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    _fill(net, ckpt["model"], path)
    return f"{path} (trained on {ckpt.get('trained_on')})"
