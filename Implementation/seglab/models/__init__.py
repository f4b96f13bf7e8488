"""Every architecture the pipeline knows, by name: the one list a new architecture joins.

    net = build_model({"name": "deeplabv2", "num_classes": 21})
    spec = architecture(net.arch)          # its Architecture (seglab/models/spec.py)

`build_model(arch)` dispatches on `arch["name"]` (default "deeplabv2", so checkpoints written
before architectures had names still load) through the plain dict `ARCHITECTURES` below.
"""
from __future__ import annotations

import functools
import json

import torch
import torch.nn as nn

from seglab.models import deeplabv2
from seglab.models import deeplabv3_mnv2_tf
from seglab.models import torchvision_seg as tv, vainf
from seglab.models import duc_hdc, fcn, gcn, pspnet, segnet, unet
from seglab.models.class_groups import attach, check_groups
from seglab.models.msc import MSC
from seglab.models.spec import Architecture

DEFAULT = "deeplabv2"

ARCHITECTURES: dict[str, Architecture] = {
    spec.name: spec for spec in (
        deeplabv2.ARCHITECTURE,
        deeplabv3_mnv2_tf.ARCHITECTURE,
        tv.ARCHITECTURES["deeplabv3_resnet50_tv"],
        tv.ARCHITECTURES["deeplabv3_resnet101_tv"],
        tv.ARCHITECTURES["deeplabv3_mobilenet_v3_large_tv"],
        tv.ARCHITECTURES["fcn_resnet50_tv"],
        tv.ARCHITECTURES["fcn_resnet101_tv"],
        tv.ARCHITECTURES["lraspp_mobilenet_v3_large_tv"],
        vainf.ARCHITECTURES["deeplabv3_mobilenet_vainf"],
        vainf.ARCHITECTURES["deeplabv3_resnet50_vainf"],
        vainf.ARCHITECTURES["deeplabv3_resnet101_vainf"],
        vainf.ARCHITECTURES["deeplabv3plus_mobilenet_vainf"],
        vainf.ARCHITECTURES["deeplabv3plus_resnet50_vainf"],
        vainf.ARCHITECTURES["deeplabv3plus_resnet101_vainf"],
        fcn.FCN32S_VGG16,
        fcn.FCN16S_VGG16,
        fcn.FCN8S_VGG16,
        fcn.FCN32S_RESNET152,
        fcn.FCN16S_RESNET152,
        fcn.FCN8S_RESNET152,
        fcn.FCN32S_DENSENET201,
        fcn.FCN16S_DENSENET201,
        fcn.FCN8S_DENSENET201,
        unet.ARCHITECTURE,
        segnet.ARCHITECTURE,
        pspnet.ARCHITECTURE,
        gcn.ARCHITECTURE,
        duc_hdc.ARCHITECTURE,
    )
}


class UnknownArchitecture(ValueError):
    """An arch name that is not in ARCHITECTURES."""


def architecture(arch: dict | str | None) -> Architecture:
    """The Architecture of an arch dict (or a name); a missing name means DeepLab v2."""
    name = arch if isinstance(arch, str) else (arch or {}).get("name") or DEFAULT
    if name not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {name!r}; known: "
                                  f"{', '.join(sorted(ARCHITECTURES))} "
                                  "(`python Implementation/model.py` lists them)")
    return ARCHITECTURES[name]


def normalize_arch(arch: dict | None) -> dict:
    """name + every option with its default filled in, so two descriptions of one network
    compare equal (a checkpoint's, a config's); `class_groups` (class_groups.py), where given,
    is kept after them."""
    arch = dict(arch or {})
    spec = architecture(arch)
    arch.pop("name", None)
    groups = arch.pop("class_groups", None)
    out = spec.arch(**arch)
    if groups is not None:
        out["class_groups"] = check_groups(groups, out["num_classes"])
    return out


def build_model(arch: dict | None = None) -> nn.Module:
    """The bare network of an arch dict (the one stored in every checkpoint); `net.arch` holds
    the normalised dict. Wrap it in `MSC` for multi-scale inputs. With `class_groups` the
    network has one classifier row per group member and merges them (class_groups.py)."""
    arch = normalize_arch(arch)
    spec = architecture(arch)
    options = {k: v for k, v in arch.items() if k not in ("name", "class_groups")}
    groups = arch.get("class_groups")
    if groups:
        options["num_classes"] = sum(groups)
    net = spec.build(**options)
    if groups:
        attach(net, groups)
    net.arch = arch
    return net


def class_dependent(arch: dict) -> set[str]:
    """The state_dict keys of `arch` whose shapes change with num_classes: its classifier.
    Built twice on the meta device (no memory, no init cost); on CPU if a build needs data.
    With class_groups, rows (not classes) set the shapes. Remembered per normalised arch: a
    training start asks for the same network's several times (init, teacher, loader)."""
    return set(_class_dependent(json.dumps(normalize_arch(arch), sort_keys=True, default=str)))


@functools.lru_cache(maxsize=32)
def _class_dependent(normalised: str) -> frozenset:
    arch = json.loads(normalised)
    groups = arch.pop("class_groups", None)
    if groups:
        arch["num_classes"] = sum(groups)

    def shapes(num_classes: int) -> dict:
        spec = dict(arch, num_classes=num_classes)
        try:
            with torch.device("meta"):
                net = build_model(spec)
        except (RuntimeError, NotImplementedError, TypeError):
            net = build_model(spec)
        return {k: tuple(v.shape) for k, v in net.state_dict().items()}
    a, b = shapes(arch["num_classes"]), shapes(arch["num_classes"] + 1)
    return frozenset(k for k in a if a[k] != b.get(k))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside MSC and/or (Distributed)DataParallel."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, MSC):
            model = model.net
        else:
            return model


def param_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """SGD groups of the network inside `model`, as its architecture declares them."""
    net = unwrap(model)
    return architecture(net.arch).param_groups(net, base_lr, weight_decay)
