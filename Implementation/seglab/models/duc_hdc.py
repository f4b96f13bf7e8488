"""DUC-HDC, "Understanding Convolution for Semantic Segmentation" (Wang et al., WACV 2018).

Reading order, after the paper:
  HDC            Sec. 3.2: hybrid dilated convolution. The dilated ResNet's blocks take their
                 rates from a pattern without a common factor, so the stacked receptive fields
                 have no holes ("gridding"): layer3 (res4b, 23 blocks in ResNet-101) cycles
                 through 1, 2, 5, 9; layer4 (res5) uses 5, 9, 17. Strides are removed from both,
                 so the features are at output stride d = 8.
  DUC            Sec. 3.1: dense upsampling convolution. The stride-8 features are convolved to
                 d^2 x L channels (L classes) and rearranged into an (8h) x (8w) x L map, i.e. a
                 pixel shuffle: each feature cell predicts its own 8 x 8 pixels, nothing is
                 interpolated. As in the authors' release (TuSimple/TuSimple-DUC,
                 network_duc_hdc.py: aspp_num 4, aspp_stride 6) the convolution is the sum of four
                 3x3 convolutions at rates 6, 12, 18, 24 (`duc_rates`).
The output is cropped to the input size (output stride 1).

The release's ResNet has a deep stem (three 3x3 convolutions) and starts res4 at rate 2; here the
stem is torchvision's, whose ImageNet weights torchvision ships, and the pattern starts at 1 as
the paper writes it. The seed repository (ZijunDeng/pytorch-semantic-segmentation) uses
ResNet-152, one 3x3 convolution with BatchNorm + ReLU before the pixel shuffle (a ReLU on the
logits): `depth=152, duc_rates=[1], duc_bn_relu=True`. Its plain "DUC" (dilation 2/4 instead of
HDC) is `res4_rates=[2], res5_rates=[4]`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn as nn

from seglab.models.backbones import resnet, resnet_channels, resnet_stem, set_dilations
from seglab.models.spec import Architecture, simple_param_groups

DOWNSAMPLING = 8  # d: the output stride of the features that DUC upsamples


class DUC(nn.Module):
    """Sum of 3x3 convolutions (one per rate) to d^2 * classes channels, optionally BN + ReLU
    (the seed's), then PixelShuffle(d)."""

    def __init__(self, cin: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24),
                 bn_relu: bool = False, d: int = DOWNSAMPLING):
        super().__init__()
        cout = d * d * num_classes
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=r, dilation=r) for r in rates)
        self.post = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU()) if bn_relu else nn.Identity()
        self.shuffle = nn.PixelShuffle(d)
        for conv in self.convs:  # the release's mx.init.Xavier(factor_type="in", magnitude=2.34)
            bound = math.sqrt(2.34 / (cin * 9))
            nn.init.uniform_(conv.weight, -bound, bound)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        return self.shuffle(self.post(sum(conv(x) for conv in self.convs)))


class DUCHDC(nn.Module):
    """ResNet with HDC rates in layer3/layer4, then DUC; logits at the input size."""

    def __init__(self, num_classes: int = 21, depth: int = 101, width: int = 64,
                 res4_rates: Sequence[int] = (1, 2, 5, 9), res5_rates: Sequence[int] = (5, 9, 17),
                 duc_rates: Sequence[int] = (6, 12, 18, 24), duc_bn_relu: bool = False,
                 frozen_bn: bool = False):
        super().__init__()
        self.backbone = resnet(depth, width, frozen_bn)
        set_dilations(self.backbone.layer3, res4_rates)
        set_dilations(self.backbone.layer4, res5_rates)
        self.duc = DUC(resnet_channels(self.backbone)[3], num_classes, duc_rates, duc_bn_relu)

    def forward(self, x):
        b = self.backbone
        y = b.layer4(b.layer3(b.layer2(b.layer1(resnet_stem(b, x)))))
        return self.duc(y)[:, :, :x.shape[-2], :x.shape[-1]].contiguous()


def build(num_classes: int = 21, depth: int = 101, width: int = 64, res4_rates=(1, 2, 5, 9),
          res5_rates=(5, 9, 17), duc_rates=(6, 12, 18, 24), duc_bn_relu: bool = False,
          frozen_bn: bool = False) -> DUCHDC:
    return DUCHDC(num_classes, depth, width, tuple(res4_rates), tuple(res5_rates),
                  tuple(duc_rates), duc_bn_relu, frozen_bn)


ARCHITECTURE = Architecture(
    name="duc_hdc_resnet101", build=build,
    summary="DUC-HDC: ResNet-101 with hybrid dilation 1/2/5/9, dense upsampling convolution "
            "(Wang et al. 2018)",
    input_norm="imagenet", output_stride=lambda arch: 1,
    param_groups=simple_param_groups,  # release: no lr_mult
    train_outputs="msc")
