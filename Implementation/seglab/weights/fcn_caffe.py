"""The FCN Caffe release (fcn.berkeleyvision.org) -> our fcn{8,16,32}s_vgg16 checkpoint.

    python Implementation/convert.py fcn_caffe fcn8s-heavy-pascal.caffemodel OUT.pth

The file is decoded by seglab/weights/caffe_proto.py. Layers map by the release's names
(voc-fcn8s/deploy.prototxt), which are our module names except for the VGG16 body:
  conv{s}_{i}                          features.{n}: the n-th module of torchvision's VGG16
                                       `features` that is the i-th convolution of stage s
  fc6, fc7                             fc6, fc7 (7x7 and 1x1 convolutions)
  score_fr, score_pool4, score_pool3   the same (1x1 convolutions with bias)
  upscore2, upscore_pool4, upscore8,   the same (bias-free deconvolutions; Caffe's deconvolution
  upscore16, upscore                   blob is (in, out, k, k) like ConvTranspose2d's weight)
  scale_pool4, scale_pool3             the at-once model's fixed skip scales (0.01, 0.0001):
                                       present -> arch scale_skips=True
Which of FCN-8s/16s/32s it is comes from the layers present (score_pool3 -> 8s, score_pool4 ->
16s); width and fc width from conv1_1 and fc6; the classes from score_fr. With --num-classes N
other than the file's, the score layers and deconvolutions are dropped and keep FCN's own
initialisation (zero scores, bilinear deconvolutions). Any other layer with weights, or a layer
the network needs and the file lacks, is an error naming it (--allow-partial: left at init).

What it was trained on: the PASCAL models were trained on SBD train (8,498 images), which holds
images of VOC 2012 val; the authors score them on seg11valid (736 images) for that reason. The
checkpoint therefore says trained_on = trainval_aug unless --trained-on says otherwise, so that
scoring it on VOC 2012 val warns.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn

from seglab.models import build_model
from seglab.models.fcn import FCNVGG
from seglab.weights.caffe import fit_blob
from seglab.weights.caffe_proto import CaffeLayer, read_caffemodel
from seglab.weights.common import ConversionError

# How the FCN release is scored (fcn.berkeleyvision.org score.py / infer.py): the whole image,
# one scale, BGR minus the mean.
RECIPE = {"msc_scales": [], "msc_fusion": "max", "interp": "caffe", "mode": "full",
          "pad_to": 513, "source": "FCN Caffe release, fcn.berkeleyvision.org score.py (whole "
          "image, one scale)"}
LABELS = {21: "voc"}
# The input normalisation the weights expect (checkpoint `input_norm`): the FCN Caffe release: BGR
# 0..255 minus the mean.
INPUT_NORM = "caffe"
HEAD = ("score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8",
        "upscore16", "upscore")
SKIP_SCALES = {"scale_pool4": 0.01, "scale_pool3": 0.0001}


def vgg_layer_names(net: FCNVGG) -> dict[str, str]:
    """Caffe name -> our module name for the VGG16 body (conv1_1 -> features.0, ...)."""
    names, stage, index = {}, 1, 0
    for n, m in enumerate(net.features):
        if isinstance(m, nn.MaxPool2d):
            stage, index = stage + 1, 0
        elif isinstance(m, nn.Conv2d):
            index += 1
            names[f"conv{stage}_{index}"] = f"features.{n}"
    return names


def layer_map(net: FCNVGG) -> dict[str, str]:
    """Caffe layer name -> our module name, for the layers `net` has."""
    names = vgg_layer_names(net)
    names.update(fc6="fc6", fc7="fc7")
    names.update({n: n for n in HEAD if hasattr(net, n)})
    return names


def infer_fcn_arch(layers: list[CaffeLayer], num_classes: int | None = None) -> tuple[dict, bool]:
    """(arch dict, whether the file's head fits) for a caffemodel of the release."""
    weighted = {l.name: l for l in layers if l.blobs}
    for needed in ("conv1_1", "fc6", "score_fr"):
        if needed not in weighted:
            raise ConversionError(f"no layer {needed!r} with weights: not an FCN-VGG16 caffemodel "
                                  "of fcn.berkeleyvision.org")
    stride = 8 if "score_pool3" in weighted else 16 if "score_pool4" in weighted else 32
    classes = int(weighted["score_fr"].blobs[0].data.shape[0])
    scales = {}
    for name, expected in SKIP_SCALES.items():
        if name in weighted:
            scales[name] = float(np.ravel(weighted[name].blobs[0].data)[0])
            if not np.isclose(scales[name], expected, rtol=1e-3):
                raise ConversionError(f"layer {name!r} scales by {scales[name]}; the at-once "
                                      f"release (and our scale_skips) uses {expected}")
    arch = dict(name=f"fcn{stride}s_vgg16", num_classes=num_classes or classes,
                width=int(weighted["conv1_1"].blobs[0].data.shape[0]),
                fc_width=int(weighted["fc6"].blobs[0].data.shape[0]), scale_skips=bool(scales))
    return arch, arch["num_classes"] == classes


def _tensors(layer: CaffeLayer, module: str, target: dict) -> dict:
    params = ["weight", "bias"] if f"{module}.bias" in target else ["weight"]
    if len(layer.blobs) != len(params):
        raise ConversionError(f"layer {layer.name!r} ({layer.type}) has {len(layer.blobs)} blobs; "
                              f"{module} takes {len(params)} ({', '.join(params)})")
    return {f"{module}.{p}": torch.from_numpy(np.array(
        fit_blob(blob, target[f"{module}.{p}"].shape, layer, i, f"{module}.{p}"), dtype=np.float32))
        for i, (p, blob) in enumerate(zip(params, layer.blobs))}


def fcn_caffe_to_ours(layers: list[CaffeLayer], net: FCNVGG, head_fits: bool = True,
                      allow_partial: bool = False) -> dict:
    """A complete state_dict for `net` from the layers; returns dict(state_dict, filled,
    dropped, missing)."""
    target = {k: v.detach().clone() for k, v in net.state_dict().items()}
    names = layer_map(net)
    filled, dropped, seen = [], [], set()
    for layer in layers:
        if not layer.blobs or layer.name in SKIP_SCALES:
            continue
        if layer.name not in names:
            raise ConversionError(f"layer {layer.name!r} ({layer.type}, blobs "
                                  f"{[tuple(b.data.shape) for b in layer.blobs]}) has weights but "
                                  f"no home in FCN-{net.stride}s VGG16: is this a caffemodel of "
                                  "fcn.berkeleyvision.org?")
        if layer.name in seen:
            raise ConversionError(f"layer {layer.name!r} appears twice in the caffemodel")
        seen.add(layer.name)
        if layer.name in HEAD and not head_fits:
            dropped.append(f"{layer.name} ({tuple(layer.blobs[0].data.shape)}: another class "
                           "count; FCN's own init kept)")
            continue
        tensors = _tensors(layer, names[layer.name], target)
        target.update(tensors)
        filled += list(tensors)
    missing = [k for k in target if k not in filled]
    required = [k for k in missing if head_fits or k.split(".")[0] not in HEAD]
    if required and not allow_partial:
        raise ConversionError(f"the caffemodel leaves {len(required)} tensors unfilled: "
                              f"{', '.join(required[:8])}{' ...' if len(required) > 8 else ''}. "
                              "Missing layers, or another network; --allow-partial keeps them at "
                              "their init.")
    return dict(state_dict=target, filled=filled, dropped=dropped, missing=missing)


def convert(args) -> dict:
    layers = read_caffemodel(args.input, progress=True)
    arch, head_fits = infer_fcn_arch(layers, args.num_classes)
    net = build_model(arch)
    result = fcn_caffe_to_ours(layers, net, head_fits, getattr(args, "allow_partial", False))
    return dict(arch=net.arch, state_dict=result["state_dict"], filled=len(result["filled"]),
                skipped=[], dropped=result["dropped"], missing=result["missing"],
                trained_on="trainval_aug")
