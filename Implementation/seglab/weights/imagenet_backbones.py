"""torchvision's ImageNet weight files -> the backbone of a classic network (FCN, SegNet, PSPNet,
GCN, DUC-HDC), its new layers at their init.

    python Implementation/convert.py imagenet_backbones pspnet_resnet101=resnet101-63fe2227.pth OUT
    python Implementation/convert.py imagenet_backbones fcn8s_vgg16=download OUT.pth

INPUT is NAME=FILE (or NAME=download: torchvision's own download of the matching
IMAGENET1K_V1 file); NAME is an architecture, or a config preset whose model (name and
options) and classes the checkpoint then has, so that training from it with that preset finds
the same arch (fcn8s_vgg16_atonce=download). The networks hold torchvision's modules under
torchvision's keys (seglab/models/backbones.py), so the map is a prefix:
  VGG16     features.* -> features.* (FCN); classifier.0 / classifier.3 (fc6 / fc7, Linear) ->
            the convolutions fc6 (7x7) / fc7 (1x1), reshaped as the FCN paper's
            "convolutionalization" (Sec. 3.1) and the release's surgery.transplant do
  VGG16-BN  features.* -> encoder.* (SegNet)
  ResNet    * -> backbone.* (depth and bottleneck width read from the file)
  DenseNet  features.* -> backbone.* (depth read from the file; the old `norm.1` key spelling
            of torchvision's files is renamed as torchvision's own loader does)
The ImageNet classifier (fc, the last Linear) is dropped. Networks with a `frozen_bn`
option get frozen_bn=True, as fine-tuning pretrained weights implies (seglab/training/init.py).
"""
from __future__ import annotations

import re

import torch
import torchvision.models as tvm

from seglab.checkpoint import sha256
from seglab.config import ConfigError, load_config, presets
from seglab.data.registry import dataset_class
from seglab.models import ARCHITECTURES, architecture, build_model, normalize_arch
from seglab.models.backbones import DENSENETS, RESNETS
from seglab.weights.common import (ConversionError, add_num_batches_tracked, blocks_per_stage,
                                   load_torch_state, merge_into)

# The input normalisation the weights expect (checkpoint `input_norm`): torchvision's ImageNet
# training: RGB 0..1, ImageNet mean/std.
INPUT_NORM = "imagenet"
HELP = ("NAME=FILE: torchvision ImageNet weights (vgg16, vgg16_bn, resnet*, densenet*) as the "
        "backbone of NAME (fcn*_vgg16, segnet_vgg16bn, pspnet_resnet101, gcn_resnet152, "
        "duc_hdc_resnet101, fcn*_resnet152, fcn*_densenet201); FILE may be `download`")
DOWNLOAD = ("https://download.pytorch.org/models/ (vgg16-397923af.pth, vgg16_bn-6c64b313.pth, "
            "resnet101-63fe2227.pth, resnet152-394f9c45.pth, densenet201-c1103571.pth)")
DENSE_OLD = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
                       r"running_mean|running_var|num_batches_tracked))$")


def family(name: str) -> str:
    """vgg16 | vgg16_bn | resnet | densenet: which ImageNet network NAME's backbone is."""
    if name not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {name!r} (python Implementation/model.py "
                              "lists them)")
    for suffix, kind in (("_vgg16", "vgg16"), ("_vgg16bn", "vgg16_bn"), ("_densenet201",
                                                                         "densenet")):
        if name.endswith(suffix):
            return kind
    if any(name.endswith(f"_resnet{d}") for d in RESNETS):
        return "resnet"
    raise ConversionError(f"{name} is not a network this converter fills (FCN, SegNet, PSPNet, "
                          "GCN, DUC-HDC); U-Net has no ImageNet backbone: train it from scratch "
                          "(train.init=scratch)")


def _download(name: str, kind: str):
    """torchvision's download of the IMAGENET1K_V1 weights NAME's default backbone uses."""
    depth = architecture(name).defaults().get("depth")
    enum = {"vgg16": tvm.VGG16_Weights, "vgg16_bn": tvm.VGG16_BN_Weights,
            "resnet": getattr(tvm, f"ResNet{depth}_Weights", None),
            "densenet": getattr(tvm, f"DenseNet{depth}_Weights", None)}[kind]
    weights = enum.IMAGENET1K_V1
    return weights.get_state_dict(progress=True), weights.url


def _count(sd: dict, pattern: str) -> tuple:
    """Blocks per stage for keys matching `pattern` (groups: stage, block), stages in order."""
    found = blocks_per_stage(sd, pattern)
    return tuple(len(found[s]) for s in sorted(found))


def map_vgg(sd: dict, prefix: str, convolutionalize: bool) -> tuple[dict, list]:
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith("features."):
            out[prefix + k[len("features."):]] = v
        elif convolutionalize and k.startswith(("classifier.0.", "classifier.3.")):
            fc = "fc6" if k.startswith("classifier.0.") else "fc7"
            if k.endswith(".weight"):
                cin = v.shape[1] // 49 if fc == "fc6" else v.shape[1]
                v = v.reshape(v.shape[0], cin, *((7, 7) if fc == "fc6" else (1, 1)))
            out[f"{fc}.{k.rsplit('.', 1)[1]}"] = v
        else:
            dropped.append(f"{k} (ImageNet classifier)")
    return out, dropped


def map_resnet(sd: dict) -> tuple[dict, list, dict]:
    blocks = _count(sd, r"layer([1-4])\.(\d+)\.")
    depth = next((d for d, (_, b) in RESNETS.items() if b == blocks), None)
    if depth is None:
        raise ConversionError(f"the file has {blocks} blocks in layer1..4: not a torchvision "
                              f"ResNet ({ {d: b for d, (_, b) in RESNETS.items()} })")
    bottleneck = "layer1.0.conv3.weight" in sd
    options = dict(depth=depth, width=int(sd["layer1.0.conv1.weight"].shape[0]) if bottleneck
                   else 64)
    out = {f"backbone.{k}": v for k, v in sd.items() if not k.startswith("fc.")}
    return out, [f"{k} (ImageNet classifier)" for k in sd if k.startswith("fc.")], options


def map_densenet(sd: dict) -> tuple[dict, list, dict]:
    sd = {(DENSE_OLD.sub(r"\1\2", k)): v for k, v in sd.items()}
    blocks = _count(sd, r"features\.denseblock(\d)\.denselayer(\d+)\.")
    depth = next((d for d, (_, b, _) in DENSENETS.items() if b == blocks), None)
    if depth is None:
        raise ConversionError(f"the file has {blocks} layers per dense block: not a torchvision "
                              f"DenseNet-121/169/201")
    out = {"backbone." + k[len("features."):]: v for k, v in sd.items()
           if k.startswith("features.")}
    return out, [f"{k} (ImageNet classifier)" for k in sd if k.startswith("classifier.")], \
        dict(depth=depth)


def imagenet_to_ours(name: str, sd: dict) -> tuple[dict, list, dict, tuple]:
    """(mapped tensors, dropped keys, arch options read from the file, required key prefixes)."""
    kind = family(name)
    if kind in ("vgg16", "vgg16_bn"):
        has_bn = any(k.endswith("running_mean") for k in sd)
        if has_bn != (kind == "vgg16_bn"):
            raise ConversionError(f"{name} needs torchvision's {kind} weights; the file is "
                                  f"{'VGG16-BN' if has_bn else 'VGG16 without BatchNorm'}")
        convs = sum(1 for k, v in sd.items() if k.startswith("features.") and v.dim() == 4)
        if convs != 13:
            raise ConversionError(f"the file has {convs} convolutions: not VGG16 (13)")
        prefix = "features." if kind == "vgg16" else "encoder."
        mapped, dropped = map_vgg(sd, prefix, convolutionalize=(kind == "vgg16"))
        options = dict(width=int(sd["features.0.weight"].shape[0]))
        if kind == "vgg16":
            options["fc_width"] = int(sd["classifier.0.weight"].shape[0])
        required = ("features.", "fc6.", "fc7.") if kind == "vgg16" else ("encoder.",)
        return mapped, dropped, options, required
    mapped, dropped, options = (map_resnet if kind == "resnet" else map_densenet)(sd)
    return mapped, dropped, options, ("backbone.",)


def split_input(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConversionError(f"INPUT {text!r} must be NAME=FILE, e.g. pspnet_resnet101="
                              "resnet101-63fe2227.pth or fcn8s_vgg16=download")
    name, path = text.split("=", 1)
    return name, path


def target(name: str) -> tuple[str, dict, int]:
    """(architecture, its options, classes) for NAME: an architecture, or a config preset whose
    model.name / model.arch / data.num_classes are used (so the checkpoint's arch is the one
    the preset trains, e.g. fcn8s_vgg16_atonce with scale_skips=true)."""
    if name in ARCHITECTURES:
        return name, {}, 21
    try:
        cfg = load_config(name)
    except ConfigError:
        raise ConversionError(f"{name!r} is neither an architecture (python Implementation/"
                              f"model.py lists them) nor a config preset ({', '.join(presets())})"
                              ) from None
    d = cfg["data"]
    return cfg["model"]["name"], dict(cfg["model"]["arch"]), (
        d["num_classes"] or dataset_class(d["dataset"]).class_count(d["root"]))


def convert(args) -> dict:
    given, path = split_input(args.input)
    name, base, classes = target(given)
    kind = family(name)
    if path == "download":
        sd, source = _download(name, kind)
        found = dict(source=source, sha256=None)
    else:
        sd = load_torch_state(path)
        found = dict(source=path, sha256=sha256(path))
    mapped, dropped, options, required = imagenet_to_ours(name, sd)
    add_num_batches_tracked(mapped)
    if "frozen_bn" in architecture(name).defaults():
        options["frozen_bn"] = True
    arch = normalize_arch(dict(base, **options, name=name,
                               num_classes=args.num_classes or classes))
    torch.manual_seed(args.seed)
    state, missing = merge_into(build_model(arch), mapped, required_prefix=required)
    return dict(arch=arch, state_dict=state, filled=len(mapped), skipped=[], dropped=dropped,
                missing=[k for k in missing if not k.endswith("num_batches_tracked")],
                trained_on="imagenet", **found)
