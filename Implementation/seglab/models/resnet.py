"""ResNet in the Caffe/MSRA form of the DeepLab v2 release, with atrous convolution.

Reading order:
  FrozenBatchNorm2d   BatchNorm that always uses its running statistics (the Caffe release froze it)
  ConvBN              conv (no bias) + BatchNorm; the unit every Caffe `resXY_branchZ` layer maps to
  Bottleneck          1x1 reduce -> 3x3 (atrous) -> 1x1 increase, plus shortcut, ReLU after the sum
  ResNet              stem + res2..res5; `dilations` turn strides into atrous rates (output stride 8)

Module names follow the Caffe layers: `res4.b22.reduce` is `res4b22_branch2a`, `.conv3x3` is
`branch2b`, `.increase` is `branch2c`, `.shortcut` is `branch1`; `conv1` is
`conv1`/`bn_conv1`/`scale_conv1`.
"""
from __future__ import annotations

from collections import OrderedDict

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
