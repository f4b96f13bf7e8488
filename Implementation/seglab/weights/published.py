"""The published PyTorch port (kazuto1011/deeplab-pytorch) <-> our DeepLab v2, losslessly.

Its state_dict (`[base.]layer1.conv1.*`, `layer{S}.block{k}.*`, `aspp.c{i}.*`) maps onto ours
(`backbone.conv1.*`, `backbone.res{S}.{caffe block name}.*`, `aspp.c{i}.*`) and back.
"""
from __future__ import annotations

import re

from seglab.checkpoint import atomic_save, load_checkpoint, sha256
from seglab.models import build_model
from seglab.models.resnet import caffe_block_names
from seglab.weights.deeplabv2_arch import ASPP_RATES, infer_arch
from seglab.weights.common import (ConversionError, add_num_batches_tracked, blocks_per_stage,
                                   load_torch_state, merge_into)


def _strip(key: str) -> str:
    for prefix in ("module.", "base."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def published_to_ours(sd: dict) -> dict:
    """The published port's keys (`[base.]layer1.conv1.*`, `layer{S}.block{k}.*`, `aspp.c{i}.*`)
    -> ours (`backbone.conv1.*`, `backbone.res{S}.{caffe block name}.*`, `aspp.c{i}.*`)."""
    sd = {_strip(k): v for k, v in sd.items()}
    stages = blocks_per_stage(sd, r"layer([2-5])\.block(\d+)\.")
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"layer([2-5])\.block(\d+)\.(.+)", key)
        if key.startswith("layer1.conv1."):
            new = "backbone.conv1." + key[len("layer1.conv1."):]
        elif m:
            stage, k, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            labels = caffe_block_names(len(stages[stage]))
            if not 1 <= k <= len(labels):
                raise ConversionError(f"{key}: layer{stage} has blocks 1..{len(labels)}")
            new = f"backbone.res{stage}.{labels[k - 1]}.{rest}"
        elif key.startswith("aspp."):
            new = key
        else:
            raise ConversionError(f"{key!r} is not a key of the published DeepLab v2 port "
                                  "(torchvision weights go through `convert.py torchvision`)")
        out[new] = value
    add_num_batches_tracked(out)
    return out


def ours_to_published(sd: dict) -> dict:
    """Our state_dict -> the published port's (`base.` prefixed), the exact inverse of
    `published_to_ours`."""
    stages = blocks_per_stage(sd, r"backbone\.res([2-5])\.([a-z]\d*)\.")
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"backbone\.res([2-5])\.([a-z]\d*)\.(.+)", key)
        if key.startswith("backbone.conv1."):
            new = "layer1.conv1." + key[len("backbone.conv1."):]
        elif m:
            stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
            labels = caffe_block_names(len(stages[stage]))
            if block not in labels:
                raise ConversionError(f"{key}: block {block!r} is not one of res{stage}'s {labels}")
            new = f"layer{stage}.block{labels.index(block) + 1}.{rest}"
        elif key.startswith("aspp."):
            new = key
        else:
            raise ConversionError(f"{key!r} has no counterpart in the published port")
        out["base." + new] = value
    return out


# How the port tests its models: configs/voc12.yaml MODEL.SCALES [0.5, 0.75] (max-fused with
# 1x) and main.py's test, which feeds the whole image and resizes with F.interpolate
# (align_corners=False): our `full` protocol with `interp=pytorch` (docs/fidelity.md).
RECIPE = {"msc_scales": [0.75, 0.5], "msc_fusion": "max", "interp": "pytorch", "mode": "full",
          "pad_to": 513, "source": "kazuto1011/deeplab-pytorch configs/voc12.yaml (MODEL.SCALES "
          "0.5, 0.75) and main.py test (whole image, F.interpolate)"}
LABELS = {21: "voc"}
# The input normalisation the weights expect (checkpoint `input_norm`): the port keeps the Caffe
# input: BGR 0..255 minus the mean.
INPUT_NORM = "caffe"


def convert(args) -> dict:
    mapped = published_to_ours(load_torch_state(args.input))
    arch = infer_arch(mapped, "caffe", args.num_classes)
    state, missing = merge_into(build_model(arch), mapped)
    return dict(arch=arch, state_dict=state, filled=len(mapped), skipped=[], dropped=[],
                missing=missing)


def to_published(args) -> dict:
    ckpt = load_checkpoint(args.input)
    arch = ckpt["arch"]
    if arch.get("style") != "caffe" or list(arch.get("rates", [])) != ASPP_RATES:
        raise ConversionError(f"{args.input}: the published port is ResNet caffe-style with ASPP "
                              f"rates {ASPP_RATES}; this checkpoint has style "
                              f"{arch.get('style')!r}, rates {arch.get('rates')}")
    sd = ours_to_published(ckpt["model"])
    atomic_save(sd, args.output)
    return dict(converter="pth --to-published", source=str(args.input),
                sha256=sha256(args.input), keys=len(sd), trained_on=ckpt.get("trained_on"))
