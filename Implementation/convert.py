"""Convert released DeepLab v2 weights into our checkpoint format (and ours into the published
port's).

    python Implementation/convert.py caffe IN.caffemodel OUT.pth [--num-classes N] [--trained-on S]
    python Implementation/convert.py pth IN.pth OUT.pth [--to-published]
    python Implementation/convert.py torchvision IN.pth|download OUT.pth

Where to download the weights (we never download them for you, except `torchvision download`):
  * the DeepLab v2 Caffe release, http://liangchiehchen.com/projects/DeepLabv2_resnet.html:
    `prototxt_and_model.zip` holds `init.caffemodel` (MS-COCO pretrained: the paper's starting
    point), `train_iter_20000.caffemodel` (the final model, trained on VOC train_aug) and
    `train2_iter_20000.caffemodel` (fine-tuned on train+val: never score it on val);
  * the published PyTorch conversion (kazuto1011/deeplab-pytorch),
    https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/deeplabv2_resnet101_msc-vocaug-20000.pth
  * torchvision's ImageNet ResNet-101, https://download.pytorch.org/models/resnet101-63fe2227.pth

The three conversions (each writes OUT, our checkpoint, and OUT.json, the resolved config and a
summary beside it):
  caffe        decodes the protobuf (caffe_proto.py) and maps the layers onto our modules by name:
               `conv1`/`bn_conv1`/`scale_conv1` -> backbone.conv1, `res{S}{b}_branch2a|2b|2c|1`
               (+ `bn...`, `scale...`) -> backbone.res{S}.{b}.reduce|conv3x3|increase|shortcut,
               `fc1_voc12_c{i}` -> aspp.c{i}. BatchNorm blobs [mean*f, var*f, f] become running
               statistics (times 1/f as Caffe does; 0 if f == 0), Scale blobs [gamma, beta] the
               BN affine weight and bias. The MSC copies (`*_res05`, `*_res075`) share weights
               with the 1x branch and are skipped; other classifiers (`fc1_coco*`, 91 classes, in
               init.caffemodel; or a class count that differs from --num-classes) are dropped
               and the ASPP keeps its N(0, 0.01) init. Every other tensor must be filled.
  pth          the published port's state_dict (`base.layer{S}.block{k}...`) to ours, losslessly;
               `--to-published` turns one of our checkpoints back into exactly those keys.
  torchvision  a torchvision ResNet-50/101 state_dict into our `style="pytorch"` backbone
               (conv1/bn1 -> reduce, conv2/bn2 -> conv3x3, conv3/bn3 -> increase,
               downsample -> shortcut; fc dropped); the ASPP keeps its init.

Each checkpoint records `trained_on` (guessed from the file name, or --trained-on), the input
normalisation the weights expect (`input_norm`: "caffe" = BGR 0..255 minus the mean, "imagenet"
= RGB 0..1 with ImageNet mean/std) and provenance (source file, sha256, converter, what was
skipped or dropped). `warn_if_trained_on` is what evaluation calls to refuse to stay silent when
the weights have seen the split being scored.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from caffe_proto import CaffeLayer, CaffeModelError, read_caffemodel
from checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint, sha256
from model import DEPTHS, DeepLabV2, caffe_block_names, unwrap

URLS = {
    "caffe": "http://liangchiehchen.com/projects/DeepLabv2_resnet.html",
    "pth": "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
           "deeplabv2_resnet101_msc-vocaug-20000.pth",
    "torchvision": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}
INPUT_NORM = {"caffe": "caffe", "pth": "caffe", "torchvision": "imagenet"}
MSC_COPIES = ("res05", "res075")  # Caffe layers of the 0.5x / 0.75x branches: shared weights
BRANCHES = {"2a": "reduce", "2b": "conv3x3", "2c": "increase", "1": "shortcut"}
ASPP_RATES = [6, 12, 18, 24]


class ConversionError(ValueError):
    """Weights that do not map onto our model (unknown/missing layer, wrong shape, ...)."""


# ---------------------------------------------------------------------------------------------
# What the weights were trained on
# ---------------------------------------------------------------------------------------------

# Which image sets each training split contains ("sbd": SBD images outside VOC val).
SPLIT_CONTENTS = {
    "train": {"train"}, "val": {"val"}, "test": {"test"},
    "trainval": {"train", "val"},
    "train_aug": {"train", "sbd"},
    "trainval_aug": {"train", "val", "sbd"},
    "coco": {"coco"}, "imagenet": {"imagenet"},
}


def guess_trained_on(path, converter: str) -> str | None:
    """The release's naming: train_iter_* = train_aug, train2_* = trainval (train+val),
    init.caffemodel = MS-COCO; the published port's file says `vocaug`; torchvision = ImageNet."""
    name = Path(str(path)).name.lower()
    if converter == "torchvision":
        return "imagenet"
    if "train2" in name or "trainval" in name:
        return "trainval"
    if name.startswith("train_iter") or "vocaug" in name or "train_aug" in name:
        return "train_aug"
    if name.startswith("init") or "coco" in name:
        return "coco"
    return None


def _contents(split) -> set:
    splits = [split] if isinstance(split, str) else list(split or [])
    return set().union(*[SPLIT_CONTENTS.get(s, {s}) for s in splits])


def warn_if_trained_on(ckpt: dict, split: str, stream=None) -> bool:
    """Print a loud warning to stderr and return True when the checkpoint's `trained_on` includes
    the images of `split` (e.g. a `trainval` model scored on `val`)."""
    trained_on = ckpt.get("trained_on")
    overlap = _contents(trained_on) & _contents(split)
    if not trained_on or not overlap:
        return False
    source = (ckpt.get("provenance") or {}).get("source", "this checkpoint")
    bar = "!" * 78
    print("\n".join([
        bar,
        f"!! WARNING: the weights were trained on {trained_on!r}, which contains the images of",
        f"!! {split!r} ({', '.join(sorted(overlap))}). Scores on {split!r} measure memorisation,",
        "!! not generalisation: do not report them as results. (The release's train2_* models",
        "!! were fine-tuned on train+val for the test server; score train_iter_* models on val.)",
        f"!! source: {source}",
        bar]), file=stream or sys.stderr)
    return True


# ---------------------------------------------------------------------------------------------
# Caffe
# ---------------------------------------------------------------------------------------------

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


def deeplab_arch(num_classes: int, depth: int, width: int, style: str) -> dict:
    """DeepLab v2's kwargs (ASPP-L, output stride 8) for a given backbone."""
    return dict(num_classes=num_classes, depth=depth, rates=list(ASPP_RATES), style=style,
                frozen_bn=True, width=width, strides=[1, 2, 1, 1], dilations=[1, 1, 2, 4])


@dataclass
class CaffeConversion:
    """The result of `caffe_to_ours`: a complete state_dict for the target net (tensors the file
    did not fill keep the net's values) and what happened to every layer."""
    state_dict: dict
    filled: list = field(default_factory=list)    # our keys taken from the file
    skipped: list = field(default_factory=list)   # res05/res075 copies (shared weights)
    dropped: list = field(default_factory=list)   # classifiers that do not fit, "name (reason)"
    missing: list = field(default_factory=list)   # our keys left at the net's init


def _fit(blob, shape, layer: CaffeLayer, index: int, key: str) -> np.ndarray:
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
            values = _fit(layer.blobs[i], target[key].shape, layer, i, key)
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


# ---------------------------------------------------------------------------------------------
# The published port (kazuto1011/deeplab-pytorch)
# ---------------------------------------------------------------------------------------------

def _strip(key: str) -> str:
    for prefix in ("module.", "base."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _blocks_per_stage(keys, pattern: str) -> dict[int, list[str]]:
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


def published_to_ours(sd: dict) -> dict:
    """The published port's keys (`[base.]layer1.conv1.*`, `layer{S}.block{k}.*`, `aspp.c{i}.*`)
    -> ours (`backbone.conv1.*`, `backbone.res{S}.{caffe block name}.*`, `aspp.c{i}.*`)."""
    sd = {_strip(k): v for k, v in sd.items()}
    stages = _blocks_per_stage(sd, r"layer([2-5])\.block(\d+)\.")
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
    _add_num_batches_tracked(out)
    return out


def ours_to_published(sd: dict) -> dict:
    """Our state_dict -> the published port's (`base.` prefixed), the exact inverse of
    `published_to_ours`."""
    stages = _blocks_per_stage(sd, r"backbone\.res([2-5])\.([a-z]\d*)\.")
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


def _add_num_batches_tracked(sd: dict):
    """Older PyTorch files lack BatchNorm's counter; add it (0) wherever running_mean exists."""
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd.setdefault(key[:-len("running_mean")] + "num_batches_tracked",
                      torch.tensor(0, dtype=torch.long))


def infer_arch(sd: dict, style: str, num_classes: int | None = None) -> dict:
    """DeepLabV2 kwargs from one of our state_dicts (backbone, maybe ASPP): width from conv1,
    depth from the blocks per stage, classes from aspp.c0 (or `num_classes`, default 21)."""
    stages = _blocks_per_stage(sd, r"backbone\.res([2-5])\.([a-z]\d*)\.")
    counts = tuple(len(stages.get(s, ())) for s in range(2, 6))
    depth = next((d for d, c in DEPTHS.items() if c == counts), None)
    if depth is None or "backbone.conv1.conv.weight" not in sd:
        raise ConversionError(f"the weights have {counts} blocks in res2..res5 (and conv1: "
                              f"{'backbone.conv1.conv.weight' in sd}); model.py knows "
                              f"{ {d: c for d, c in DEPTHS.items()} }")
    branches = len({k.split(".")[1] for k in sd if k.startswith("aspp.")})
    if branches not in (0, len(ASPP_RATES)):
        raise ConversionError(f"the weights have {branches} ASPP branches; DeepLab v2 has 4")
    if num_classes is None:
        num_classes = int(sd["aspp.c0.weight"].shape[0]) if "aspp.c0.weight" in sd else 21
    return deeplab_arch(num_classes, depth, int(sd["backbone.conv1.conv.weight"].shape[0]), style)


# ---------------------------------------------------------------------------------------------
# torchvision ResNet (ImageNet)
# ---------------------------------------------------------------------------------------------

TORCHVISION_UNITS = {"conv1": "reduce.conv", "bn1": "reduce.bn", "conv2": "conv3x3.conv",
                     "bn2": "conv3x3.bn", "conv3": "increase.conv", "bn3": "increase.bn",
                     "downsample.0": "shortcut.conv", "downsample.1": "shortcut.bn"}


def torchvision_to_ours(state_dict: dict) -> dict:
    """A torchvision ResNet state_dict -> our `style="pytorch"` backbone keys (`backbone.*`);
    `fc.*` (the ImageNet classifier) is dropped. Use with `load_state_dict(strict=False)` or
    merge into a full state_dict: the ASPP is not touched."""
    stages = _blocks_per_stage(state_dict, r"layer([1-4])\.(\d+)\.")
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
    _add_num_batches_tracked(out)
    return out


# ---------------------------------------------------------------------------------------------
# Shared: put mapped tensors into a full state_dict, checking every key and shape
# ---------------------------------------------------------------------------------------------

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


def _load_torch(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (`convert.py --help` lists download URLs)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickled code, not a torch file
        raise ConversionError(f"cannot read {path} as a PyTorch weights file "
                              f"(torch.load(weights_only=True)): {e}") from e
    if isinstance(obj, dict) and obj.get("format") == "deeplab-v2":
        raise ConversionError(f"{path} is already one of our checkpoints (use `--to-published` "
                              "to export it)")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _convert_caffe(args) -> dict:
    layers = read_caffemodel(args.input, progress=True)
    arch = infer_caffe_arch(layers, args.num_classes)
    torch.manual_seed(args.seed)  # the ASPP init, when the file has no VOC classifier
    net = DeepLabV2(**arch)
    result = caffe_to_ours(layers, net, allow_partial=args.allow_partial)
    filled = len(result.state_dict) - len(result.missing)  # BN counters (0) included
    return dict(arch=arch, state_dict=result.state_dict, filled=filled,
                skipped=result.skipped, dropped=result.dropped, missing=result.missing)


def _convert_pth(args) -> dict:
    mapped = published_to_ours(_load_torch(args.input))
    arch = infer_arch(mapped, "caffe", args.num_classes)
    state, missing = merge_into(DeepLabV2(**arch), mapped)
    return dict(arch=arch, state_dict=state, filled=len(mapped), skipped=[], dropped=[],
                missing=missing)


def _torchvision_download():
    from torchvision.models import ResNet101_Weights
    weights = ResNet101_Weights.IMAGENET1K_V1
    sd = weights.get_state_dict(progress=True)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return sd, weights.url, cached


def load_torchvision_state(source) -> dict:
    """A torchvision ResNet state_dict from a local file, or from `download`: torchvision's own
    download of ResNet101_Weights.IMAGENET1K_V1 (cached in torch.hub's folder)."""
    return _torchvision_download()[0] if str(source) == "download" else _load_torch(source)


def _convert_torchvision(args) -> dict:
    if args.input == "download":
        sd, args.source, cached = _torchvision_download()
        args.source_sha256 = sha256(cached) if cached.is_file() else None
    else:
        sd = load_torchvision_state(args.input)
    mapped = torchvision_to_ours(sd)
    arch = infer_arch(mapped, "pytorch", args.num_classes)
    torch.manual_seed(args.seed)
    state, missing = merge_into(DeepLabV2(**arch), mapped, required_prefix="backbone.")
    return dict(arch=arch, state_dict=state, filled=len(mapped), skipped=[],
                dropped=[f"{k} (ImageNet classifier)" for k in sd if k.startswith("fc.")],
                missing=[k for k in missing if not k.endswith("num_batches_tracked")])


def _to_published(args) -> dict:
    ckpt = load_checkpoint(args.input)
    arch = ckpt["arch"]
    if arch.get("style") != "caffe" or list(arch.get("rates", [])) != ASPP_RATES:
        raise ConversionError(f"{args.input}: the published port is ResNet caffe-style with ASPP "
                              f"rates {ASPP_RATES}; this checkpoint has style "
                              f"{arch.get('style')!r}, rates {arch.get('rates')}")
    sd = ours_to_published(ckpt["model"])
    atomic_save(sd, args.output)
    return dict(converter="pth --to-published", source=str(args.input),
                sha256=args.source_sha256, keys=len(sd), trained_on=ckpt.get("trained_on"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="convert.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="converter", required=True)
    helps = {"caffe": "a DeepLab v2 .caffemodel (init.caffemodel, train_iter_20000.caffemodel, "
                      "...)",
             "pth": "the published PyTorch conversion (deeplabv2_resnet101_msc-vocaug-20000.pth), "
                    "or with --to-published one of our checkpoints back into it",
             "torchvision": "torchvision ResNet-50/101 ImageNet weights (a local file, or "
                            "`download`)"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=f"{text}. Download: {URLS[name]}")
        p.add_argument("input", help="input file" + (" or the word `download`"
                                                     if name == "torchvision" else ""))
        p.add_argument("output", help="output file (our checkpoint; OUTPUT.json gets the summary)")
        p.add_argument("--num-classes", type=int, default=None,
                       help="classes of the ASPP head (default: the file's VOC head, else 21)")
        p.add_argument("--trained-on", choices=sorted(SPLIT_CONTENTS), default=None,
                       help="what the weights were trained on (default: guessed from the file "
                            "name: train_iter_* = train_aug, train2_* = trainval, init = coco)")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the ASPP init where the file has no head (default 0)")
        if name == "caffe":
            p.add_argument("--allow-partial", action="store_true",
                           help="keep tensors the caffemodel lacks at their init instead of "
                                "failing")
        if name == "pth":
            p.add_argument("--to-published", action="store_true",
                           help="INPUT is our checkpoint; write the published port's state_dict")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.source, args.source_sha256 = str(args.input), None
    if args.input != "download" and Path(args.input).is_file():
        args.source_sha256 = sha256(args.input)
    try:
        if getattr(args, "to_published", False):
            summary = _to_published(args)
            print(f"wrote {args.output}: {summary['keys']} published keys (base.*)")
        else:
            convert = {"caffe": _convert_caffe, "pth": _convert_pth,
                       "torchvision": _convert_torchvision}[args.converter]
            result = convert(args)
            trained_on = args.trained_on or guess_trained_on(args.input, args.converter)
            provenance = dict(
                source=args.source,
                sha256=args.source_sha256,
                converter=args.converter, skipped=result["skipped"], dropped=result["dropped"],
                left_at_init=result["missing"], input_norm=INPUT_NORM[args.converter])
            ckpt = make_checkpoint(result["arch"], result["state_dict"], trained_on, provenance,
                                   input_norm=INPUT_NORM[args.converter])
            atomic_save(ckpt, args.output)
            summary = dict(arch=result["arch"], trained_on=trained_on, provenance=provenance,
                           filled=result["filled"], total=len(result["state_dict"]))
            print(f"wrote {args.output}: {result['filled']} tensors filled from {args.source}; "
                  f"skipped {len(result['skipped'])} res05/res075 copies; dropped "
                  f"{len(result['dropped'])}: {result['dropped'] or 'nothing'}; "
                  f"{len(result['missing'])} left at init; trained_on={trained_on}; "
                  f"input_norm={INPUT_NORM[args.converter]}")
            if trained_on is None:
                print("note: could not tell what the weights were trained on from the file name; "
                      "pass --trained-on so evaluation can warn about train/test overlap",
                      file=sys.stderr)
    except (CaffeModelError, ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = {k: v for k, v in vars(args).items() if k not in ("source", "source_sha256")}
    sidecar = Path(str(args.output) + ".json")
    sidecar.write_text(json.dumps(dict(config=config, **summary), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
