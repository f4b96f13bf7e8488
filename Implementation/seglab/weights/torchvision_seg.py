"""torchvision's segmentation weight files -> our checkpoint of the matching `_tv` architecture.

    python Implementation/convert.py torchvision-seg deeplabv3_resnet101_coco-586e9e4e.pth OUT.pth
    python Implementation/convert.py torchvision-seg FILE OUT.pth --num-classes 19
    python Implementation/convert.py torchvision-seg deeplabv3_resnet101_tv=resnet101-63fe2227.pth OUT

Our `_tv` networks hold torchvision's own modules under torchvision's own keys
(seglab/models/torchvision_seg.py), so a file maps one to one; which network it is comes from
its keys (`identify`). The files (torchvision's Weights enums; COCO train2017 images of the 20
VOC classes, so trained_on = coco):
  deeplabv3_resnet50    https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth
  deeplabv3_resnet101   https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth
  deeplabv3_mobilenet_v3_large
                 https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth
  fcn_resnet50          https://download.pytorch.org/models/fcn_resnet50_coco-1167a1af.pth
  fcn_resnet101         https://download.pytorch.org/models/fcn_resnet101_coco-7ecb50ca.pth
  lraspp_mobilenet_v3_large
                 https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth
A checkpoint of torchvision's reference training script ({"model": ..., "args": ...}) works too.

Another number of classes (`--num-classes N`): every tensor loads except those whose shape
depends on the class count (found by building the network for two class counts and comparing
shapes: the last 1x1 conv of the classifier and of the aux head); those are re-initialised
(torchvision's init, seeded by --seed) and listed by name.

`NAME=FILE`: an ImageNet classification file (torchvision's ResNet-50/101 or
MobileNetV3-Large) as the backbone of architecture NAME, the heads at their init: where
torchvision's reference recipe starts (weights_backbone).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

try:  # numpy 2 (numpy 1 calls the module numpy.core)
    from numpy._core.multiarray import scalar as numpy_scalar
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import scalar as numpy_scalar

from seglab.models import ARCHITECTURES, build_model, class_dependent, normalize_arch
from seglab.weights.common import (ConversionError, add_num_batches_tracked, blocks_per_stage,
                                   load_across_classes, load_torch_state)

# How torchvision measures its published numbers: references/segmentation/train.py --test-only
# resizes image and label so that the shorter side is 520, normalises with ImageNet's mean/std
# and runs one scale (our `torchvision` protocol, seglab/data/protocols.py).
RECIPE = {"msc_scales": [], "msc_fusion": "max", "interp": "caffe", "mode": "torchvision",
          "pad_to": 513, "source": "torchvision references/segmentation (train.py --test-only: "
          "shorter side resized to 520, one scale)"}
LABELS = {21: "voc"}    # a COCO subset with the 20 VOC categories
# The input normalisation the weights expect (checkpoint `input_norm`): torchvision's references:
# RGB 0..1, ImageNet mean/std.
INPUT_NORM = "imagenet"
# Plain data that training scripts put next to the weights: numpy scalars (VainF's best_score,
# pickled by numpy 1 or 2, whose names differ), argparse.Namespace (torchvision's reference
# `args`).
SAFE_GLOBALS = [(numpy_scalar, "numpy.core.multiarray.scalar"),
                (numpy_scalar, "numpy._core.multiarray.scalar"), np.dtype, argparse.Namespace] + [
    getattr(np.dtypes, t) for t in ("Float64DType", "Float32DType", "Int64DType")
    if hasattr(np, "dtypes")]
WRAPPERS = ("model_state", "model", "state_dict")
HELP = ("a torchvision segmentation weight file (deeplabv3_*, fcn_*, lraspp_*; the architecture "
        "is read from its keys), or NAME=FILE: an ImageNet ResNet/MobileNetV3 file as the "
        "backbone of NAME")
DOWNLOAD = " or ".join(f"https://download.pytorch.org/models/{f}" for f in (
    "deeplabv3_resnet50_coco-cd0a2569.pth", "deeplabv3_resnet101_coco-586e9e4e.pth",
    "deeplabv3_mobilenet_v3_large-fc3c493d.pth", "fcn_resnet50_coco-1167a1af.pth",
    "fcn_resnet101_coco-7ecb50ca.pth", "lraspp_mobilenet_v3_large-d234d4ea.pth"))


def load_state(path) -> dict:
    """The state_dict of a torchvision or VainF weights file (common.load_torch_state with the
    wrappers and plain-data globals those files use)."""
    return load_torch_state(path, WRAPPERS, SAFE_GLOBALS)


def resnet_depth(keys, prefix: str) -> int:
    """50 or 101, from the number of blocks in layer3 (6 or 23)."""
    blocks = blocks_per_stage(keys, rf"{re.escape(prefix)}layer(\d+)\.(\d+)\.").get(3, [])
    return {6: 50, 23: 101}.get(len(blocks), 0)


def identify(state_dict: dict) -> str | None:
    """Which `_tv` architecture a torchvision segmentation state_dict is, or None."""
    keys = set(state_dict)
    if "classifier.cbr.0.weight" in keys:
        return "lraspp_mobilenet_v3_large_tv"
    deeplab = "classifier.0.convs.0.0.weight" in keys
    if "backbone.0.0.weight" in keys and deeplab:
        return "deeplabv3_mobilenet_v3_large_tv"
    depth = resnet_depth(keys, "backbone.")
    if "backbone.layer1.0.conv1.weight" in keys and depth:
        if deeplab:
            return f"deeplabv3_resnet{depth}_tv"
        if "classifier.0.weight" in keys and "classifier.4.weight" in keys:
            return f"fcn_resnet{depth}_tv"
    return None


def load_with_classes(arch: dict, mapped: dict, seed: int, optional=()) -> dict:
    """Our network of `arch` (seeded) with `mapped` loaded across class counts
    (common.load_across_classes): a class tensor for another count is dropped and
    re-initialised; model tensors the file lacks may only be the classifier's or those under the
    `optional` prefixes. Returns the converter's dict (state_dict, filled, dropped, missing)."""
    n = arch["num_classes"]
    dropped = [f"{key} {tuple(mapped[key].shape)} (the file has {mapped[key].shape[0]} classes, "
               f"{n} requested: re-initialised)"
               for key in sorted(class_dependent(arch) & set(mapped)) if mapped[key].shape[0] != n]
    filled = len(mapped) - len(dropped)
    torch.manual_seed(seed)
    net = build_model(arch)
    add_num_batches_tracked(mapped)
    try:
        load_across_classes(net, mapped, optional)
    except ConversionError as e:
        raise ConversionError(f"the file of {arch['name']} {e}") from None
    state = net.state_dict()
    missing = [k for k in state if k not in mapped or mapped[k].shape != state[k].shape]
    return dict(state_dict=state, filled=filled, dropped=dropped,
                missing=[k for k in missing if not k.endswith("num_batches_tracked")])


def load_backbone_only(mapped: dict, dropped: list, name: str, args, optional=()) -> dict:
    """An ImageNet backbone's `mapped` tensors in a new network of architecture `name` (its
    head initialised, seeded; `args.num_classes` or 21 classes): the converter's dict, with
    the file's `dropped` keys; the training split defaults to "imagenet"."""
    arch = dict(name=name, num_classes=args.num_classes or 21)
    result = load_with_classes(arch, mapped, args.seed, optional=optional)
    result["dropped"] = dropped
    return dict(arch=normalize_arch(arch), skipped=[], trained_on="imagenet", **result)


def file_classes(mapped: dict, name: str) -> int:
    """The class count of a file: the first dimension of its class-dependent tensors."""
    heads = class_dependent({"name": name, "num_classes": 3})
    shapes = {mapped[k].shape[0] for k in heads if k in mapped}
    if len(shapes) != 1:
        raise ConversionError(f"cannot tell the number of classes of the file ({name}): class "
                              f"tensors with first dimensions {sorted(shapes)}")
    return shapes.pop()


def imagenet_resnet_names(state_dict: dict, name: str) -> dict:
    """{key: backbone.key} for an ImageNet ResNet file of the depth architecture `name` has
    (the classifier `fc` left out); a file of another depth is refused."""
    depth = resnet_depth(state_dict, "")
    if f"resnet{depth}_" not in name:
        raise ConversionError(f"the file is not the ImageNet ResNet of {name} (its layer3 "
                              f"has the blocks of ResNet-{depth or '?'})")
    return {k: f"backbone.{k}" for k in state_dict if not k.startswith("fc.")}


def imagenet_backbone(state_dict: dict, name: str) -> tuple[dict, list]:
    """An ImageNet classification state_dict (torchvision ResNet / MobileNetV3-Large) as the
    `backbone.*` tensors of architecture `name`: (mapped, dropped keys: the classifier)."""
    if "resnet" in name:
        rename = imagenet_resnet_names(state_dict, name)
    else:
        if not any(k.startswith("features.16.") for k in state_dict):
            raise ConversionError("the file is not torchvision's ImageNet MobileNetV3-Large "
                                  "(no features.16)")
        rename = {k: f"backbone.{k[len('features.'):]}" for k in state_dict
                  if k.startswith("features.")}
    dropped = [f"{k} (ImageNet classifier)" for k in state_dict if k not in rename]
    return {new: state_dict[k] for k, new in rename.items()}, dropped


def split_input(text: str, suffix: str):
    """'NAME=FILE' -> (NAME, FILE) for a known NAME ending in `suffix`; 'FILE' -> (None, FILE)."""
    name, sep, path = str(text).partition("=")
    if not sep or Path(text).is_file():
        return None, text
    if name not in ARCHITECTURES or not name.endswith(suffix):
        known = ", ".join(n for n in ARCHITECTURES if n.endswith(suffix))
        raise ConversionError(f"{name!r} is not one of {known} (NAME=FILE puts ImageNet "
                              "weights in the backbone of NAME)")
    return name, path


def convert(args) -> dict:
    name, path = split_input(args.input, "_tv")
    sd = load_state(path)
    if name is not None:  # an ImageNet backbone
        return load_backbone_only(*imagenet_backbone(sd, name), name, args,
                                  optional=("classifier.", "aux_classifier."))
    name = identify(sd)
    if name is None:
        raise ConversionError(f"{path} is not a torchvision segmentation state_dict "
                              "(deeplabv3_*, fcn_*, lraspp_*); ImageNet backbones go as "
                              "NAME=FILE, VainF's checkpoints through `convert.py vainf`")
    arch = dict(name=name, num_classes=args.num_classes or file_classes(sd, name))
    result = load_with_classes(arch, dict(sd), args.seed, optional=("aux_classifier.",))
    return dict(arch=normalize_arch(arch), skipped=[], trained_on="coco", **result)
