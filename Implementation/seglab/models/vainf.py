"""DeepLab v3 and v3+ in the form of VainF/DeepLabV3Plus-Pytorch (commit 4e1087d), whose released
VOC checkpoints load here with every key used.

  DeepLab v3   Chen et al. 2017, "Rethinking Atrous Convolution" (arXiv:1706.05587), Sec. 3.3:
               ASPP = 1x1 branch, three 3x3 atrous branches (rates 6/12/18 at output stride 16,
               12/24/36 at 8) and image pooling, each conv + BN + ReLU, concatenated (1280 ch)
               and projected 1x1 to 256 + BN + ReLU + Dropout(0.1); then VainF's head adds a
               3x3 256 -> 256 + BN + ReLU and a 1x1 to the classes.
  DeepLab v3+  Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution"
               (arXiv:1802.02611), Sec. 3.1: low-level features (ResNet layer1, 256 ch, or
               MobileNetV2 features[:4], 24 ch; stride 4) projected 1x1 to 48 + BN + ReLU,
               concatenated with the ASPP output upsampled to their size (304 ch), then one
               3x3 304 -> 256 + BN + ReLU (the paper has two; VainF one) and a 1x1 to classes.
               Logits at output stride 4.
  backbones    torchvision's ResNet-50/101 with the last one (OS 16) or two (OS 8) strides
               replaced by dilation; or VainF's MobileNetV2 (Sandler et al. 2018): its stem conv
               has no padding, every inverted residual pads its input symmetrically (the
               padding goes through the 1x1 expansion, so the depthwise conv sees BN(0), not
               0, at the border), dilation replaces the strides past the output stride, and the
               last 1x1 -> 1280 conv is dropped (320 channels out).
  separable    VainF's option: every head conv with kernel > 1 becomes a depthwise conv + a 1x1
               (key `<conv>.body.0` / `.body.1`); none of the released weights use it.

Built on torchvision's modules where they are the same layers: ResNet, IntermediateLayerGetter
(the `backbone.*` keys), DeepLabHead / ASPP (the `classifier.*` keys; VainF's projection
dropout is 0.1, torchvision's 0.5) and Conv2dNormActivation (MobileNetV2's ConvBNReLU6). What
torchvision lacks is written here: the OS-dependent rates, the v3+ decoder, VainF's
MobileNetV2 (torchvision's pads each depthwise conv with zeros and keeps the 1280 conv) and
the separable convs. The heads start as VainF's do (kaiming-normal convs, BN 1/0).

Training options in the arch (VainF's main.py): the backbone learns at `backbone_lr_mult` = 0.1
x lr, weight decay on every parameter, backbone BatchNorm momentum `bn_momentum` = 0.01.
Names: `<VainF's model name>_vainf`, e.g. deeplabv3plus_resnet101_vainf.
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet50, resnet101
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.ops import Conv2dNormActivation

from seglab.models.spec import Architecture
from seglab.models.torchvision_seg import fold_batchnorm

RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
# MobileNetV2 (Sandler et al. 2018, Table 2): expansion t, channels c, repeats n, stride s
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))


# --- VainF's MobileNetV2 -------------------------------------------------------------------

def fixed_padding(kernel_size: int, dilation: int) -> tuple[int, int, int, int]:
    """F.pad amounts that keep a stride-1 conv's size: the effective kernel's extent minus 1,
    split with the smaller half first."""
    total = kernel_size + (kernel_size - 1) * (dilation - 1) - 1
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def conv_bn_relu6(inp: int, out: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
                  groups: int = 1) -> nn.Sequential:
    """conv (no padding, no bias) + BN + ReLU6: keys .0 .1 .2."""
    return Conv2dNormActivation(inp, out, kernel, stride, padding=0, groups=groups,
                                activation_layer=nn.ReLU6, dilation=dilation, bias=False)


class InvertedResidual(nn.Module):
    """Expansion 1x1 (if t > 1), depthwise 3x3 (stride, dilation), linear 1x1; identity shortcut
    when shapes allow. The input is padded first and everything runs on the padded input."""

    def __init__(self, inp: int, oup: int, stride: int, dilation: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, dilation, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.input_padding = fixed_padding(3, dilation)

    def forward(self, x):
        out = self.conv(F.pad(x, self.input_padding))
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """VainF's MobileNetV2 backbone, split as their segmentation model uses it:
    `low_level_features` = features 0-3 (stride 4, 24 ch), `high_level_features` = features
    4-17 (keys keep the feature index; 320 ch at `output_stride`)."""

    def __init__(self, output_stride: int = 16):
        super().__init__()
        features, current_stride, dilation, channels = [conv_bn_relu6(3, 32, stride=2)], 2, 1, 32
        for t, c, n, s in MOBILENET_V2:
            previous_dilation = dilation
            if current_stride == output_stride:
                stride, dilation = 1, dilation * s
            else:
                stride, current_stride = s, current_stride * s
            for i in range(n):
                features.append(InvertedResidual(channels, c, stride if i == 0 else 1,
                                                 previous_dilation if i == 0 else dilation, t))
                channels = c
        self.low_level_features = nn.Sequential(
            OrderedDict((str(i), m) for i, m in enumerate(features) if i < 4))
        self.high_level_features = nn.Sequential(
            OrderedDict((str(i), m) for i, m in enumerate(features) if i >= 4))
        for m in self.modules():  # MobileNetV2's init (VainF's copy of torchvision's)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# --- heads -----------------------------------------------------------------------------------

def vainf_init(module: nn.Module) -> nn.Module:
    """VainF's head init: kaiming-normal conv weights (fan_in), BN weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return module


def vainf_aspp(in_channels: int, rates) -> ASPP:
    """torchvision's ASPP (the same layers and keys) with VainF's Dropout(0.1)."""
    aspp = ASPP(in_channels, rates)
    aspp.project[3] = nn.Dropout(0.1)
    return aspp


class DeepLabV3Head(nn.Module):
    """`classifier.classifier` = ASPP, 3x3 conv 256 -> 256 + BN + ReLU, 1x1 to classes."""

    def __init__(self, in_channels: int, num_classes: int, rates):
        super().__init__()
        self.classifier = DeepLabHead(in_channels, num_classes, rates)
        self.classifier[0].project[3] = nn.Dropout(0.1)
        vainf_init(self)

    def forward(self, features):
        return self.classifier(features["out"])


class DeepLabV3PlusHead(nn.Module):
    """The v3+ decoder: `project` (low-level 1x1 -> 48), `aspp`, `classifier` (3x3 304 -> 256,
    1x1 to classes) at the low-level features' size."""

    def __init__(self, in_channels: int, low_level_channels: int, num_classes: int, rates):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, 48, 1, bias=False),
                                     nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp = vainf_aspp(in_channels, rates)
        self.classifier = nn.Sequential(nn.Conv2d(304, 256, 3, padding=1, bias=False),
                                        nn.BatchNorm2d(256), nn.ReLU(inplace=True),
                                        nn.Conv2d(256, num_classes, 1))
        vainf_init(self)

    def forward(self, features):
        low = self.project(features["low_level"])
        high = F.interpolate(self.aspp(features["out"]), size=low.shape[-2:], mode="bilinear",
                             align_corners=False)
        return self.classifier(torch.cat([low, high], dim=1))


class SeparableConv2d(nn.Module):
    """A k x k conv as depthwise k x k (same stride, padding, dilation) + pointwise 1x1, no bias:
    VainF's AtrousSeparableConvolution (`body.0`, `body.1`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        c = conv.in_channels
        self.body = nn.Sequential(
            nn.Conv2d(c, c, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      groups=c, bias=False),
            nn.Conv2d(c, conv.out_channels, 1, bias=False))
        vainf_init(self)

    def forward(self, x):
        return self.body(x)


def to_separable(module: nn.Module) -> nn.Module:
    """Every Conv2d with kernel > 1 inside `module` replaced by a SeparableConv2d (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and child.kernel_size[0] > 1:
            setattr(module, name, SeparableConv2d(child))
        else:
            to_separable(child)
    return module


# --- the network -----------------------------------------------------------------------------

class VainFDeepLab(nn.Module):
    """`backbone` (a dict of feature maps) + `classifier` (the v3 or v3+ head): logits at the
    output stride (v3) or at stride 4 (v3+). VainF's forward upsamples them to the input
    (bilinear, align_corners=False): `model.interp: pytorch` is the same resize."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module):
        super().__init__()
        self.backbone, self.classifier = backbone, classifier

    def forward(self, x):
        return self.classifier(self.backbone(x))


def make_backbone(name: str, output_stride: int, plus: bool):
    """(IntermediateLayerGetter returning "out" and, for v3+, "low_level"; out channels;
    low-level channels)."""
    if name == "mobilenet":
        net = MobileNetV2(output_stride)
        out, low, channels = "high_level_features", "low_level_features", (320, 24)
    else:
        builder = {"resnet50": resnet50, "resnet101": resnet101}[name]
        net = builder(weights=None, replace_stride_with_dilation=[False, output_stride == 8, True])
        out, low, channels = "layer4", "layer1", (2048, 256)
    returns = {out: "out", low: "low_level"} if plus else {out: "out"}
    return IntermediateLayerGetter(net, return_layers=returns), channels[0], channels[1]


def build(form: str, backbone: str, num_classes: int = 21, output_stride: int = 16,
          separable: bool = False, backbone_lr_mult: float = 0.1,
          bn_momentum: float = 0.01) -> VainFDeepLab:
    """One VainF form; backbone_lr_mult shapes no layer (param_groups reads it from net.arch)."""
    if output_stride not in RATES:
        raise ValueError(f"{form}_{backbone}_vainf: output_stride must be 8 or 16 (VainF's "
                         f"choices), got {output_stride!r}")
    plus = form == "deeplabv3plus"
    features, channels, low_channels = make_backbone(backbone, output_stride, plus)
    for m in features.modules():  # VainF's main.py: set_bn_momentum(model.backbone, 0.01)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = bn_momentum
    rates = RATES[output_stride]
    head = (DeepLabV3PlusHead(channels, low_channels, num_classes, rates) if plus
            else DeepLabV3Head(channels, num_classes, rates))
    return VainFDeepLab(features, to_separable(head) if separable else head)


def param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """VainF's SGD groups: the backbone at `backbone_lr_mult` x lr, the head at lr; weight
    decay on every parameter."""
    mult = float(net.arch.get("backbone_lr_mult", 0.1))
    groups = []
    for prefix, lr_mult in (("backbone.", mult), ("classifier.", 1.0)):
        params = [p for n, p in net.named_parameters() if p.requires_grad and n.startswith(prefix)]
        groups.append(dict(params=params, name=prefix[:-1], lr=base_lr * lr_mult,
                           lr_mult=lr_mult, weight_decay=weight_decay))
    return groups


def _architecture(form: str, backbone: str) -> Architecture:
    name = f"{form}_{backbone}_vainf"
    plus = form == "deeplabv3plus"
    title = {"mobilenet": "MobileNetV2", "resnet50": "ResNet-50", "resnet101": "ResNet-101"}
    return Architecture(
        name=name, build=functools.partial(build, form, backbone),
        summary=f"VainF DeepLab{'V3+' if plus else 'V3'}, {title[backbone]} "
                f"(OS 16 or 8{', decoder at 1/4' if plus else ''})",
        input_norm="imagenet",
        output_stride=(lambda arch: 4) if plus else (lambda arch: int(arch["output_stride"])),
        param_groups=param_groups, train_outputs="msc",
        prepare_inference=fold_batchnorm,
        training_options=("backbone_lr_mult", "bn_momentum", "output_stride"))


ARCHITECTURES = {spec.name: spec for spec in (
    _architecture(form, backbone) for form in ("deeplabv3", "deeplabv3plus")
    for backbone in ("mobilenet", "resnet50", "resnet101"))}
