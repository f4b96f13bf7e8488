"""torchvision's ImageNet ResNet-50/101 -> the backbone of our DeepLab v2 (`style="pytorch"`).

conv1/bn1 -> reduce, conv2/bn2 -> conv3x3, conv3/bn3 -> increase, downsample -> shortcut; the
ImageNet classifier `fc` is dropped and the ASPP keeps its init.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torchvision.models import ResNet101_Weights

from seglab.checkpoint import sha256
from seglab.models import build_model
from seglab.models.resnet import caffe_block_names
from seglab.weights.common import (ConversionError, add_num_batches_tracked, blocks_per_stage,
                                   load_torch_state, merge_into)
from seglab.weights.deeplabv2_arch import infer_arch

# The input normalisation the weights expect (checkpoint `input_norm`): torchvision's ImageNet
# training: RGB 0..1, ImageNet mean/std.
INPUT_NORM = "imagenet"

TORCHVISION_UNITS = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv",
                     "bn2": "conv3x3.bn", "conv3": "increase.conv", "bn3": "increase.bn",
                     "downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}


def torchvision_to_ours(state_dict: dict) -> dict:
    """A torchvision ResNet state_dict -> our `style="pytorch"` backbone keys (`backbone.*`);
    `fc.*` (the ImageNet classifier) is dropped. Use with `load_state_dict(strict=False)` or
    merge into a full state_dict: the ASPP is not touched."""
    stages = blocks_per_stage(state_dict, r"layer([1-4])\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)", key)
        if key.startswith("fc."):
            continue
        if re.fullmatch(r"(conv1|bn1)\.\w+", key):
            unit, param = key.split(".")
            new = f"backbone.conv1.{'conv' if unit == 'conv1' else 'bn'}.{param}"
        elif m:
            layer, index, unit, param = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            labels = caffe_block_names(len(stages[layer]))
            if index >= len(labels):
                raise ConversionError(f"{key}: layer{layer} has blocks 0..{len(labels) - 1}")
            new = f"backbone.res{layer + 1}.{labels[index]}.{TORCHVISION_UNITS[unit]}.{param}"
        else:
            raise ConversionError(f"{key!r} is not a torchvision ResNet key (published DeepLab "
                                  "weights go through `convert.py pth`)")
        out[new] = value
    add_num_batches_tracked(out)
    return out


def _torchvision_download():
    """torchvision's own download of its ImageNet ResNet-101 (cached in torch.hub's folder)."""
    weights = ResNet101_Weights.IMAGENET1K_V1
    sd = weights.get_state_dict(progress=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return sd, weights.url, cached


def load_torchvision_state(source) -> dict:
    """A torchvision ResNet state_dict from a local file, or from `download`: torchvision's own
    download of ResNet101_Weights.IMAGENET1K_V1 (cached in torch.hub's folder)."""
    return _torchvision_download()[0] if str(source) == "download" else load_torch_state(source)


def convert(args) -> dict:
    found = {}
    if args.input == "download":
        sd, source, cached = _torchvision_download()
        found = dict(source=source, sha256=sha256(cached) if cached.is_file() else None)
    else:
        sd = load_torchvision_state(args.input)
    mapped = torchvision_to_ours(sd)
    arch = infer_arch(mapped, "pytorch", args.num_classes)
    torch.manual_seed(args.seed)
    state, missing = merge_into(build_model(arch), mapped, required_prefix="backbone.")
    return dict(arch=arch, state_dict=state, filled=len(mapped), skipped=[],
                dropped=[f"{k} (ImageNet classifier)" for k in sd if k.startswith("fc.")],
                missing=[k for k in missing if not k.endswith("num_batches_tracked")],
                trained_on="imagenet", **found)
