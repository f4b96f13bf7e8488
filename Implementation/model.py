"""DeepLab v2: ResNet-101 (Caffe/MSRA form) with atrous convolution, ASPP and multi-scale inputs.

Reading order follows the paper:
  FrozenBatchNorm2d   BatchNorm that always uses its running statistics (the Caffe release froze it)
  ConvBN              conv (no bias) + BatchNorm; the unit every Caffe `resXY_branchZ` layer maps to
  Bottleneck          1x1 reduce -> 3x3 (atrous) -> 1x1 increase, plus shortcut, ReLU after the sum
  ResNet              stem + res2..res5; `dilations` turn strides into atrous rates (output stride 8)
  ASPP                atrous spatial pyramid pooling: parallel 3x3 convs at rates 6/12/18/24, summed
  DeepLabV2           ResNet + ASPP, logits at 1/8 of the input
  MSC                 multi-scale inputs (1, 0.75, 0.5) through shared weights, fused by element-wise max
  param_groups        the Caffe solver's lr/weight-decay multipliers (1x backbone, 10x/20x ASPP)

Module names follow the Caffe layers: `backbone.res4.b22.reduce` is `res4b22_branch2a`,
`.conv3x3` is `branch2b`, `.increase` is `branch2c`, `.shortcut` is `branch1`; `aspp.c0..c3` are
`fc1_voc12_c0..c3`; `backbone.conv1` is `conv1`/`bn_conv1`/`scale_conv1`.
"""
from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ResNet depths: blocks per stage res2..res5.
DEPTHS = {
    101: (3, 4, 23, 3),
    50: (3, 4, 6, 3),
    26: (2, 2, 2, 2),
    14: (1, 1, 1, 1),
}
CAFFE_BN_EPS = 1e-5


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, when `frozen`, always normalises with its running statistics and keeps
    its affine parameters fixed, whatever `model.train()` says (the Caffe release: BN layers with
    `use_global_stats: true` and Scale layers with lr_mult 0)."""

    def __init__(self, num_features: int, frozen: bool = True, eps: float = CAFFE_BN_EPS):
        super().__init__(num_features, eps=eps)
        self.frozen = frozen
        if frozen:
            self.weight.requires_grad_(False)
            self.bias.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)


class ConvBN(nn.Sequential):
    """Convolution without bias, then BatchNorm (Caffe: Convolution + BatchNorm + Scale)."""

    def __init__(self, cin, cout, kernel, stride=1, dilation=1, frozen_bn=True):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel, stride, padding=dilation * (kernel // 2),
                           dilation=dilation, bias=False),
            bn=FrozenBatchNorm2d(cout, frozen=frozen_bn),
        ))


class Bottleneck(nn.Module):
    """ResNet bottleneck. `style="caffe"` puts the stride on the first 1x1 conv (MSRA release);
    `style="pytorch"` puts it on the 3x3 conv (torchvision). The 3x3 conv is atrous with
    padding = dilation, so the spatial size only changes through the stride."""

    def __init__(self, cin, mid, cout, stride, dilation, shortcut, style="caffe", frozen_bn=True):
        super().__init__()
        s1, s3 = (stride, 1) if style == "caffe" else (1, stride)
        self.reduce = ConvBN(cin, mid, 1, s1, frozen_bn=frozen_bn)
        self.conv3x3 = ConvBN(mid, mid, 3, s3, dilation, frozen_bn=frozen_bn)
        self.increase = ConvBN(mid, cout, 1, frozen_bn=frozen_bn)
        self.shortcut = ConvBN(cin, cout, 1, stride, frozen_bn=frozen_bn) if shortcut else None

    def forward(self, x):
        h = F.relu(self.reduce(x))
        h = F.relu(self.conv3x3(h))
        h = self.increase(h)
        return F.relu(h + (self.shortcut(x) if self.shortcut is not None else x))


def caffe_block_names(n: int) -> list[str]:
    """Caffe's block suffixes: a, b, c for short stages; a, b1, b2, ... for long ones (res3/res4
    of ResNet-101)."""
    if n <= 3:
        return ["a", "b", "c"][:n]
    return ["a"] + [f"b{i}" for i in range(1, n)]


class ResNet(nn.Module):
    """ResNet backbone res1..res5 with per-stage strides and atrous rates.

    Defaults give DeepLab v2's ResNet-101: strides 1/2/1/1 and dilations 1/1/2/4 for res2..res5,
    so the features have output stride 8 (321 -> 41, 513 -> 65)."""

    def __init__(self, depth: int = 101, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4),
                 style: str = "caffe", frozen_bn: bool = True, width: int = 64):
        super().__init__()
        if style not in ("caffe", "pytorch"):
            raise ValueError(f"style must be 'caffe' or 'pytorch', got {style!r}")
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.depth, self.style, self.width = depth, style, width
        self.strides, self.dilations = tuple(strides), tuple(dilations)
        self.conv1 = ConvBN(3, width, 7, stride=2, frozen_bn=frozen_bn)
        # Caffe's pooling rounds up; torchvision's rounds down (same size for odd inputs like 321).
        self.pool1 = nn.MaxPool2d(3, 2, padding=1, ceil_mode=(style == "caffe"))
        cin = width
        for i, (n, stride, dilation) in enumerate(zip(DEPTHS[depth], strides, dilations)):
            mid = width * 2 ** i
            blocks = OrderedDict()
            for j, name in enumerate(caffe_block_names(n)):
                blocks[name] = Bottleneck(cin, mid, mid * 4, stride if j == 0 else 1, dilation,
                                          shortcut=(j == 0), style=style, frozen_bn=frozen_bn)
                cin = mid * 4
            self.add_module(f"res{i + 2}", nn.Sequential(blocks))
        self.out_channels = cin

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        return self.res5(self.res4(self.res3(self.res2(x))))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v2 ASPP-L): parallel 3x3 convs with
    dilation = padding = rate, one per rate, each predicting class scores; outputs summed.
    `rates=(12,)` gives the DeepLab-LargeFOV head."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.rates = tuple(rates)
        for i, rate in enumerate(self.rates):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def branches(self):
        return [getattr(self, f"c{i}") for i in range(len(self.rates))]

    def forward(self, x):
        return sum(conv(x) for conv in self.branches())


class DeepLabV2(nn.Module):
    """DeepLab v2: atrous ResNet + ASPP. Returns class logits at output stride 8."""

    def __init__(self, num_classes: int = 21, depth: int = 101, rates=(6, 12, 18, 24),
                 style: str = "caffe", frozen_bn: bool = True, width: int = 64,
                 strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)):
        super().__init__()
        self.arch = dict(num_classes=num_classes, depth=depth, rates=list(rates), style=style,
                         frozen_bn=frozen_bn, width=width, strides=list(strides),
                         dilations=list(dilations))
        self.backbone = ResNet(depth, strides, dilations, style, frozen_bn, width)
        self.aspp = ASPP(self.backbone.out_channels, num_classes, rates)

    def forward(self, x):
        return self.aspp(self.backbone(x))


# ---------------------------------------------------------------------------------------------
# Resizing: Caffe's Interp layer vs F.interpolate
# ---------------------------------------------------------------------------------------------

def caffe_scaled_size(size: int, scale: float) -> int:
    """Size Caffe's Interp layer gives for a scale written as zoom/shrink factors: shrink q then
    zoom p for scale = p/q, with out = (in-1)//q + 1 and out = in + (in-1)(p-1).
    321 -> 161 at 0.5 (shrink 2) and 241 at 0.75 (shrink 4, zoom 3)."""
    frac = Fraction(scale).limit_denominator(16)
    shrunk = (size - 1) // frac.denominator + 1
    return shrunk + (shrunk - 1) * (frac.numerator - 1)


def resize(x: torch.Tensor, size, interp: str = "caffe") -> torch.Tensor:
    """Bilinear resize of an NCHW tensor; 'caffe' = Interp (align_corners=True)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=(interp == "caffe"))


def scaled_size(hw, scale: float, interp: str = "caffe"):
    if interp == "caffe":
        return tuple(caffe_scaled_size(s, scale) for s in hw)
    return tuple(int(s * scale) for s in hw)  # F.interpolate(scale_factor=s) floors


class MSC(nn.Module):
    """Multi-scale inputs: the image at 1x and each of `scales` goes through the same network;
    the smaller logits are upsampled to the 1x logit size and fused by element-wise max.

    train(): returns [logits_1x, logits_s1, logits_s2, ..., fused_max], each branch at its native
    size (41, 31, 21 for a 321 input), so the loss can choose its targets. eval(): the fused max.
    interp="caffe" reproduces Caffe's Interp layer; "pytorch" is the published port's
    F.interpolate(align_corners=False)."""

    def __init__(self, net: nn.Module, scales: Sequence[float] = (0.75, 0.5), interp: str = "caffe"):
        super().__init__()
        if interp not in ("caffe", "pytorch"):
            raise ValueError(f"interp must be 'caffe' or 'pytorch', got {interp!r}")
        self.net, self.scales, self.interp = net, tuple(scales), interp

    def forward(self, x):
        logits = [self.net(x)]
        for s in self.scales:
            logits.append(self.net(resize(x, scaled_size(x.shape[-2:], s, self.interp), self.interp)))
        size = logits[0].shape[-2:]
        fused = logits[0]
        for branch in logits[1:]:
            fused = torch.max(fused, resize(branch, size, self.interp))
        return logits + [fused] if self.training else fused


def build_model(arch: dict | None = None, msc_scales=(0.75, 0.5), interp="caffe") -> nn.Module:
    """DeepLabV2 from an `arch` dict (the one stored in every checkpoint), wrapped in MSC unless
    `msc_scales` is empty."""
    net = DeepLabV2(**(arch or {}))
    return MSC(net, msc_scales, interp) if msc_scales else net


def unwrap(model: nn.Module) -> DeepLabV2:
    """The DeepLabV2 inside MSC and/or DistributedDataParallel."""
    while not isinstance(model, DeepLabV2):
        model = model.module if hasattr(model, "module") else model.net
    return model


def param_groups(model: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """SGD parameter groups with the Caffe solver's multipliers: backbone convs 1x lr (wd 1x),
    ASPP weights 10x (wd 1x), ASPP biases 20x (wd 0). Frozen BatchNorm is excluded; trainable
    BatchNorm (training from scratch) gets 1x lr and no weight decay. Each group records its
    `lr_mult` so the poly schedule can rescale it."""
    net = unwrap(model)
    groups = {"backbone": [], "bn": [], "aspp_weight": [], "aspp_bias": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("aspp."):
            groups["aspp_bias" if name.endswith(".bias") else "aspp_weight"].append(p)
        elif ".bn." in name:
            groups["bn"].append(p)
        else:
            groups["backbone"].append(p)
    spec = {"backbone": (1, weight_decay), "bn": (1, 0.0),
            "aspp_weight": (10, weight_decay), "aspp_bias": (20, 0.0)}
    return [dict(params=ps, name=k, lr=base_lr * spec[k][0], lr_mult=spec[k][0],
                 weight_decay=spec[k][1]) for k, ps in groups.items() if ps]
