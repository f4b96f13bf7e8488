"""The DeepLab v2 Caffe release (.caffemodel) -> our DeepLab v2 checkpoint.

Decodes the protobuf (caffe_proto.py) and maps the layers onto our modules by name:
`conv1`/`bn_conv1`/`scale_conv1` -> backbone.conv1, `res{S}{b}_branch2a|2b|2c|1` (+ `bn...`,
`scale...`) -> backbone.res{S}.{b}.reduce|conv3x3|increase|shortcut, `fc1_voc12_c{i}` -> aspp.c{i}.
BatchNorm blobs [mean*f, var*f, f] become running statistics (times 1/f as Caffe does; 0 if
f == 0), Scale blobs [gamma, beta] the BN affine weight and bias. The MSC copies (`*_res05`,
`*_res075`) share weights with the 1x branch and are skipped; other classifiers (`fc1_coco*`, 91
classes, in init.caffemodel; or a class count that differs from --num-classes) are dropped and the
ASPP keeps its N(0, 0.01) init. Every other tensor must be filled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seglab.models import build_model, unwrap
from seglab.models.resnet import DEPTHS
from seglab.weights.caffe_proto import CaffeLayer, read_caffemodel
from seglab.weights.common import ConversionError
from seglab.weights.deeplabv2_arch import ASPP_RATES, deeplab_arch  # noqa: F401

# How the release tests its models (seglab/recipe.py), recorded in each converted checkpoint:
# the test prototxt of prototxt_and_model.zip runs MSC (1, 0.75, 0.5, max-fused, Interp) on each
# image padded to 513x513 with the mean; the paper's Sec. 4.1 numbers are measured that way.
RECIPE = {"msc_scales": [0.75, 0.5], "msc_fusion": "max", "interp": "caffe", "mode": "voc",
          "pad_to": 513, "source": "DeepLab v2 Caffe release, test.prototxt of "
          "prototxt_and_model.zip (MSC 1/0.75/0.5 max, Interp, crop 513 padded with the mean)"}
LABELS = {21: "voc"}    # the class count of a head -> the data set whose classes it predicts
# The input normalisation the weights expect (checkpoint `input_norm`): the Caffe release's data
# layer: BGR 0..255 minus the mean.
INPUT_NORM = "caffe"

MSC_COPIES = ("res05", "res075")  # Caffe layers of the 0.5x / 0.75x branches: shared weights
BRANCHES = {"2a": "reduce", "2b": "conv3x3", "2c": "increase", "1": "shortcut"}


def caffe_layer_map(net) -> dict[str, tuple[str, str]]:
    """Caffe layer name -> (our module prefix, kind), kind in conv / bn / scale / aspp, for the
    blocks `net` actually has (any depth: the names follow one scheme)."""
    net = unwrap(net)
    names = {"conv1": ("backbone.conv1.conv", "conv"), "bn_conv1": ("backbone.conv1.bn", "bn"),
             "scale_conv1": ("backbone.conv1.bn", "scale")}
    for stage in range(2, 6):
        for block, module in getattr(net.backbone, f"res{stage}").named_children():
            for branch, unit in BRANCHES.items():
                if getattr(module, unit) is None:
                    continue
                prefix = f"backbone.res{stage}.{block}.{unit}"
                suffix = f"{stage}{block}_branch{branch}"
                names[f"res{suffix}"] = (f"{prefix}.conv", "conv")
                names[f"bn{suffix}"] = (f"{prefix}.bn", "bn")
                names[f"scale{suffix}"] = (f"{prefix}.bn", "scale")
    for i in range(len(net.aspp.rates)):
        names[f"fc1_voc12_c{i}"] = (f"aspp.c{i}", "aspp")
    return names


def is_msc_copy(name: str) -> bool:
    return any(tag in name for tag in MSC_COPIES)


def infer_caffe_arch(layers: list[CaffeLayer], num_classes: int | None = None) -> dict:
    """DeepLabV2 kwargs for a caffemodel: width from conv1, depth from the blocks per stage,
    classes from fc1_voc12_c0 (21 if absent, e.g. init.caffemodel), unless `num_classes`."""
    weighted = {l.name: l for l in layers if l.blobs and not is_msc_copy(l.name)}
    if "conv1" not in weighted:
        raise ConversionError("no layer 'conv1' with weights: not a DeepLab ResNet caffemodel")
    counts = tuple(sum(1 for n in weighted if re.fullmatch(rf"res{s}[a-z]\d*_branch2a", n))
                   for s in range(2, 6))
    depth = next((d for d, c in DEPTHS.items() if c == counts), None)
    if depth is None:
        raise ConversionError(f"the caffemodel has {counts} blocks in res2..res5; model.py knows "
                              f"{ {d: c for d, c in DEPTHS.items()} }")
    if num_classes is None:
        head = weighted.get("fc1_voc12_c0")
        num_classes = int(head.blobs[0].data.shape[0]) if head else 21
    return deeplab_arch(num_classes, depth, int(weighted["conv1"].blobs[0].data.shape[0]), "caffe")


@dataclass
class CaffeConversion:
    """The result of `caffe_to_ours`: a complete state_dict for the target net (tensors the file
    did not fill keep the net's values) and what happened to every layer."""
    state_dict: dict
    filled: list = field(default_factory=list)    # our keys taken from the file
    skipped: list = field(default_factory=list)   # res05/res075 copies (shared weights)
    dropped: list = field(default_factory=list)   # classifiers that do not fit, "name (reason)"
    missing: list = field(default_factory=list)   # our keys left at the net's init


def fit_blob(blob, shape, layer: CaffeLayer, index: int, key: str) -> np.ndarray:
    """The blob's values in `shape`, accepting Caffe's legacy 1x1x1xN padding, else an error."""
    data = blob.data
    if tuple(data.shape) == tuple(shape):
        return data
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    if blob.legacy and data.size == int(np.prod(shape)) and squeeze(data.shape) == squeeze(shape):
        return data.reshape(shape)
    raise ConversionError(f"layer {layer.name!r} blob {index}: shape {tuple(data.shape)} in the "
                          f"caffemodel, but {key} has shape {tuple(shape)}")


# kind -> (what the Caffe layer is, our parameter for each of its blobs; None = used otherwise)
CAFFE_BLOBS = {"conv": ("bias-free Convolution", ["weight"]),
               "aspp": ("Convolution with bias", ["weight", "bias"]),
               "scale": ("Scale (gamma, beta)", ["weight", "bias"]),
               "bn": ("BatchNorm (mean, variance, scale factor)",
                      ["running_mean", "running_var", None])}


def _caffe_tensors(layer: CaffeLayer, prefix: str, kind: str, target: dict) -> dict:
    """Our tensors from one Caffe layer's blobs, shapes checked against `target`."""
    what, params = CAFFE_BLOBS[kind]
    if len(layer.blobs) != len(params):
        raise ConversionError(f"layer {layer.name!r} ({layer.type}) has {len(layer.blobs)} blobs; "
                              f"a {what} layer has {len(params)}")
    scale = np.float32(1)
    if kind == "bn":
        factor = layer.blobs[2].data.ravel()
        if factor.size != 1:
            raise ConversionError(f"layer {layer.name!r}: the BatchNorm scale factor (blob 2) has "
                                  f"shape {tuple(layer.blobs[2].data.shape)}, expected (1,)")
        # Caffe's BatchNormLayer: scale = (f == 0 ? 0 : 1 / f) in float32, times the stored sums.
        scale = np.float32(0) if factor[0] == 0 else np.float32(1) / np.float32(factor[0])
    out = {}
    for i, param in enumerate(params):
        if param:
            key = f"{prefix}.{param}"
            values = fit_blob(layer.blobs[i], target[key].shape, layer, i, key)
            out[key] = torch.from_numpy(np.array(values * scale if kind == "bn" else values,
                                                 dtype=np.float32))
    if kind == "bn":
        out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def caffe_to_ours(path, net, allow_partial: bool = False,
                  progress: bool = False) -> CaffeConversion:
    """Map a .caffemodel (path, or a list of CaffeLayer) onto `net` (a DeepLabV2 of the matching
    depth/width/classes). Errors name the layer; the ASPP may stay at its init only when the
    file's classifier was dropped (init.caffemodel) or with `allow_partial`."""
    layers = read_caffemodel(path, progress) if isinstance(path, (str, Path)) else list(path)
    net = unwrap(net)
    target = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = caffe_layer_map(net)
    out = CaffeConversion(state_dict=target)
    seen = set()
    for layer in layers:
        if not layer.blobs:
            continue  # ReLU, Pooling, Eltwise, Interp, data, loss: nothing to load
        if is_msc_copy(layer.name):
            out.skipped.append(layer.name)
            continue
        if layer.name not in names:
            if layer.name.startswith("fc1_"):
                out.dropped.append(f"{layer.name} (classifier {tuple(layer.blobs[0].data.shape)}, "
                                   "not part of our model)")
                continue
            raise ConversionError(f"layer {layer.name!r} ({layer.type}, blobs "
                                  f"{[tuple(b.data.shape) for b in layer.blobs]}) has weights but "
                                  "no home in DeepLabV2 (depth "
                                  f"{net.arch['depth']}, {len(net.aspp.rates)} ASPP branches): is "
                                  "this a DeepLab v2 ResNet caffemodel?")
        if layer.name in seen:
            raise ConversionError(f"layer {layer.name!r} appears twice in the caffemodel")
        seen.add(layer.name)
        prefix, kind = names[layer.name]
        if kind == "aspp" and layer.blobs and layer.blobs[0].data.ndim == 4 and \
                layer.blobs[0].data.shape[0] != target[f"{prefix}.weight"].shape[0]:
            out.dropped.append(f"{layer.name} ({layer.blobs[0].data.shape[0]} classes, the model "
                               f"has {target[f'{prefix}.weight'].shape[0]})")
            continue
        tensors = _caffe_tensors(layer, prefix, kind, target)
        target.update(tensors)
        out.filled += [k for k in tensors if not k.endswith("num_batches_tracked")]
    filled = set(out.filled)
    out.missing = [k for k in target if not k.endswith("num_batches_tracked") and k not in filled]
    backbone_missing = [k for k in out.missing if not k.startswith("aspp.")]
    if out.missing and not allow_partial and (backbone_missing or not out.dropped):
        raise ConversionError(f"the caffemodel leaves {len(out.missing)} tensors of the model "
                              f"unfilled: {', '.join(out.missing[:8])}"
                              f"{' ...' if len(out.missing) > 8 else ''}. Missing Caffe layers, or "
                              "another architecture; --allow-partial keeps them at their init.")
    return out


def convert(args) -> dict:
    layers = read_caffemodel(args.input, progress=True)
    arch = infer_caffe_arch(layers, args.num_classes)
    torch.manual_seed(args.seed)  # the ASPP init, when the file has no VOC classifier
    net = build_model(arch)
    result = caffe_to_ours(layers, net, allow_partial=args.allow_partial)
    filled = len(result.state_dict) - len(result.missing)  # BN counters (0) included
    return dict(arch=arch, state_dict=result.state_dict, filled=filled,
                skipped=result.skipped, dropped=result.dropped, missing=result.missing)
