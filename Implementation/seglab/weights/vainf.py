"""VainF/DeepLabV3Plus-Pytorch checkpoints -> our checkpoint of the matching `_vainf` architecture.

    python Implementation/convert.py vainf best_deeplabv3plus_resnet101_voc_os16.pth OUT.pth
    python Implementation/convert.py vainf FILE OUT.pth --num-classes 19
    python Implementation/convert.py vainf deeplabv3plus_resnet101_vainf=resnet101-63fe2227.pth OUT

Their checkpoints are `{"model_state": state_dict, "optimizer_state", "scheduler_state",
"cur_itrs", "best_score"}` (best_score a numpy scalar, allowed through weights_only loading) with
keys `backbone.*` and `classifier.*`, which are ours (seglab/models/vainf.py): every tensor has
exactly one home. Which network it is comes from the keys (`identify`): v3+ has
`classifier.project`, MobileNetV2 `backbone.low_level_features`, ResNet-50/101 6/23 blocks in
layer3, separable heads `.body.0`. The output stride is not in the weights: `_os8` in the file
name gives 8, otherwise 16 (every released file is OS 16). VOC files (`voc` in the name) were
trained on VOC 2012 train_aug (10,582 images), so trained_on = train_aug.

The released VOC files (VainF's README at commit 4e1087d; also on Tencent Weiyun):
  deeplabv3_mobilenet      https://www.dropbox.com/s/uhksxwfcim3nkpo/best_deeplabv3_mobilenet_voc_os16.pth?dl=0
  deeplabv3_resnet50       https://www.dropbox.com/s/3eag5ojccwiexkq/best_deeplabv3_resnet50_voc_os16.pth?dl=0
  deeplabv3_resnet101      https://www.dropbox.com/s/vtenndnsrnh4068/best_deeplabv3_resnet101_voc_os16.pth?dl=0
  deeplabv3plus_mobilenet  https://www.dropbox.com/s/0idrhwz6opaj7q4/best_deeplabv3plus_mobilenet_voc_os16.pth?dl=0
  deeplabv3plus_resnet50   https://www.dropbox.com/s/dgxyd3jkyz24voa/best_deeplabv3plus_resnet50_voc_os16.pth?dl=0
  deeplabv3plus_resnet101  https://www.dropbox.com/s/bm3hxe7wmakaqc5/best_deeplabv3plus_resnet101_voc_os16.pth?dl=0

Another number of classes (`--num-classes N`, e.g. fine-tuning a VOC model on Cityscapes): the
backbone and the head load except the last 1x1 conv (`classifier.classifier.4` in v3,
`classifier.classifier.3` in v3+), which is re-initialised (seeded by --seed) and listed.

`NAME=FILE`: torchvision's ImageNet ResNet-50/101 or MobileNetV2 (mobilenet_v2-b0353104.pth,
the file VainF's code downloads) as the backbone of NAME, the head at VainF's init: where
VainF's training starts. MobileNetV2's features 0-3 become `low_level_features`, 4-17
`high_level_features`; its last 1x1 -> 1280 conv (features.18) and classifier are dropped.
"""
from __future__ import annotations

import re
from pathlib import Path

from seglab.models import normalize_arch
from seglab.weights.common import ConversionError
from seglab.weights.torchvision_seg import (file_classes, imagenet_resnet_names,
                                            load_backbone_only, load_state, load_with_classes,
                                            resnet_depth, split_input)

# How VainF measures its README numbers: main.py --crop_val (the README's commands) resizes the
# shorter side to 513 and scores the centre 513x513 crop, one scale (our `vainf` protocol).
RECIPE = {"msc_scales": [], "msc_fusion": "max", "interp": "caffe", "mode": "vainf",
          "pad_to": 513, "source": "VainF/DeepLabV3Plus-Pytorch main.py --crop_val (README: "
          "resize 513, centre crop 513, one scale)"}
LABELS = {21: "voc", 19: "cityscapes"}
# The input normalisation the weights expect (checkpoint `input_norm`): VainF's transforms: RGB
# 0..1, ImageNet mean/std.
INPUT_NORM = "imagenet"
HELP = ("a VainF/DeepLabV3Plus-Pytorch checkpoint (best_deeplabv3plus_resnet101_voc_os16.pth, "
        "...; the architecture is read from its keys), or NAME=FILE: an ImageNet "
        "ResNet/MobileNetV2 file as the backbone of NAME")
DOWNLOAD = " or ".join(f"https://www.dropbox.com/s/{f}?dl=0" for f in (
    "uhksxwfcim3nkpo/best_deeplabv3_mobilenet_voc_os16.pth",
    "3eag5ojccwiexkq/best_deeplabv3_resnet50_voc_os16.pth",
    "vtenndnsrnh4068/best_deeplabv3_resnet101_voc_os16.pth",
    "0idrhwz6opaj7q4/best_deeplabv3plus_mobilenet_voc_os16.pth",
    "dgxyd3jkyz24voa/best_deeplabv3plus_resnet50_voc_os16.pth",
    "bm3hxe7wmakaqc5/best_deeplabv3plus_resnet101_voc_os16.pth"))  # VainF's README, 4e1087d


def identify(state_dict: dict) -> str | None:
    """Which `_vainf` architecture a VainF `model_state` is, or None."""
    keys = set(state_dict)
    if "classifier.project.0.weight" in keys and "classifier.aspp.project.0.weight" in keys:
        form = "deeplabv3plus"
    elif "classifier.classifier.0.project.0.weight" in keys:
        form = "deeplabv3"
    else:
        return None
    if "backbone.low_level_features.0.0.weight" in keys:
        return f"{form}_mobilenet_vainf"
    depth = resnet_depth(keys, "backbone.")
    return f"{form}_resnet{depth}_vainf" if depth else None


def options(state_dict: dict, path) -> tuple[dict, str]:
    """The arch options the weights imply (separable head convs; the output stride from the
    file name, `_os8`, else 16) and where the output stride came from."""
    separable = any(k.startswith("classifier.") and ".body.0." in k for k in state_dict)
    match = re.search(r"(?:^|[_-])os(8|16)(?:\D|$)", Path(str(path)).name.lower())
    stride = int(match.group(1)) if match else 16
    why = f"{stride}, from the file name" if match else "16, VainF's default (not in the name)"
    return dict(separable=separable, output_stride=stride), why


def imagenet_backbone(state_dict: dict, name: str) -> tuple[dict, list]:
    """torchvision's ImageNet ResNet / MobileNetV2 as the `backbone.*` tensors of `name`:
    (mapped, dropped keys)."""
    if "resnet" in name:
        rename = imagenet_resnet_names(state_dict, name)
    else:
        last = state_dict.get("features.18.0.weight")
        if last is None or tuple(last.shape[:2]) != (1280, 320):
            raise ConversionError("the file is not torchvision's ImageNet MobileNetV2 "
                                  "(mobilenet_v2-b0353104.pth: features.18 is 320 -> 1280)")
        rename = {}
        for k in state_dict:
            m = re.match(r"features\.(\d+)\.", k)
            if m and int(m.group(1)) < 18:
                part = "low" if int(m.group(1)) < 4 else "high"
                rename[k] = f"backbone.{part}_level_features.{k[len('features.'):]}"
    dropped = [f"{k} (ImageNet classifier / MobileNetV2's last 1x1 conv)" for k in state_dict
               if k not in rename]
    return {new: state_dict[k] for k, new in rename.items()}, dropped


def convert(args) -> dict:
    name, path = split_input(args.input, "_vainf")
    sd = load_state(path)
    if name is not None:  # an ImageNet backbone
        return load_backbone_only(*imagenet_backbone(sd, name), name, args,
                                  optional=("classifier.",))
    name = identify(sd)
    if name is None:
        raise ConversionError(f"{path} is not a VainF DeepLabV3/V3+ checkpoint with a "
                              "MobileNetV2 or ResNet-50/101 backbone (their `model_state`, "
                              "keys backbone.* and classifier.*); ImageNet backbones go as "
                              "NAME=FILE, torchvision's files through `convert.py "
                              "torchvision-seg`")
    implied, why = options(sd, path)
    arch = dict(name=name, num_classes=args.num_classes or file_classes(sd, name), **implied)
    result = load_with_classes(arch, dict(sd), args.seed)
    result["provenance"] = dict(output_stride=why)
    if "voc" in Path(str(path)).name.lower():
        result["trained_on"] = "train_aug"
    return dict(arch=normalize_arch(arch), skipped=[], **result)
