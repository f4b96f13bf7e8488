"""PSPNet (Zhao, Shi, Qi, Wang & Jia, CVPR 2017): pyramid pooling on a dilated ResNet.

Reading order, after the paper:
  backbone          torchvision's ResNet with layer3 / layer4 at dilation 2 / 4 and no stride
                    (Sec. 3.2, "dilated network strategy"): features at output stride 8
  PyramidPooling    Sec. 3.2 / Fig. 3: average pooling to 1x1, 2x2, 3x3 and 6x6 bins, a 1x1
                    convolution to 1/N of the channels (N = 4 levels) + BN + ReLU per level,
                    bilinear upsampling, concatenation with the features
  head              3x3 convolution to 512 + BN + ReLU + dropout 0.1, 1x1 to the classes
  aux               Sec. 4 / Fig. 4: the auxiliary loss on res4b22 (layer3), weight 0.4; its head
                    as in the authors' PyTorch code (hszhao/semseg): 3x3 conv to 256 + BN + ReLU +
                    dropout 0.1 + 1x1 to the classes. Training returns {"out", "aux"}.
Logits are returned at output stride 8 (the loss and evaluation upsample them).

The authors' ResNet (Caffe release, hszhao/semseg) has a deep stem (three 3x3 convolutions); here
the stem is torchvision's 7x7 one, whose ImageNet weights torchvision ships. The seed repository
(ZijunDeng/pytorch-semantic-segmentation) deviates in two ways, both named options:
`bn_momentum=0.95` on the head's BatchNorm (a Caffe `moving_average_fraction` read with the
PyTorch convention, where it means 95% of each batch) and `aux_head="1x1"`, a bare 1x1
convolution on layer3 instead of the 3x3 head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.backbones import resnet, resnet_channels, resnet_stem, set_dilations
from seglab.models.spec import Architecture, simple_param_groups


def conv_bn_relu(cin: int, cout: int, kernel: int, momentum: float) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, momentum=momentum), nn.ReLU(inplace=True)]


class PyramidPooling(nn.Module):
    """The pyramid pooling module: features concatenated with one pooled, reduced and
    upsampled map per bin size (output channels: in + len(bins) * in // len(bins))."""

    def __init__(self, channels: int, bins: Sequence[int] = (1, 2, 3, 6), momentum: float = 0.1):
        super().__init__()
        reduced = channels // len(bins)
        self.levels = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *conv_bn_relu(channels, reduced, 1, momentum))
            for b in bins)

    def forward(self, x):
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(level(x), size=size, mode="bilinear",
                                              align_corners=True) for level in self.levels], 1)


class PSPNet(nn.Module):
    """PSPNet; eval: logits at output stride 8; train: {"out": logits, "aux": layer3 logits}."""

    def __init__(self, num_classes: int = 21, depth: int = 101, width: int = 64,
                 bins: Sequence[int] = (1, 2, 3, 6), head_width: int = 512,
                 aux_head: str = "3x3", bn_momentum: float = 0.1, dropout: float = 0.1):
        super().__init__()
        if aux_head not in ("3x3", "1x1"):
            raise ValueError(f"pspnet: aux_head must be '3x3' or '1x1', got {aux_head!r}")
        self.backbone = resnet(depth, width)
        set_dilations(self.backbone.layer3, [2])
        set_dilations(self.backbone.layer4, [4])
        c3, c4 = resnet_channels(self.backbone)[2:]
        self.ppm = PyramidPooling(c4, bins, bn_momentum)
        cat = c4 + len(bins) * (c4 // len(bins))
        self.head = nn.Sequential(*conv_bn_relu(cat, head_width, 3, bn_momentum),
                                  nn.Dropout2d(dropout), nn.Conv2d(head_width, num_classes, 1))
        if aux_head == "3x3":
            self.aux = nn.Sequential(*conv_bn_relu(c3, head_width // 2, 3, bn_momentum),
                                     nn.Dropout2d(dropout),
                                     nn.Conv2d(head_width // 2, num_classes, 1))
        else:
            self.aux = nn.Conv2d(c3, num_classes, 1)
        for m in [*self.ppm.modules(), *self.head.modules(), *self.aux.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        if self.training and x.shape[0] == 1:
            raise ValueError("pspnet: BatchNorm cannot train on one image (the 1x1 pyramid level "
                             "holds one value per image and channel): use train.batch_per_step "
                             ">= 2 (the paper: 16)")
        b = self.backbone
        f3 = b.layer3(b.layer2(b.layer1(resnet_stem(b, x))))
        out = self.head(self.ppm(b.layer4(f3)))
        if self.training:
            return {"out": out, "aux": self.aux(f3)}
        return out


def build(num_classes: int = 21, depth: int = 101, width: int = 64, bins=(1, 2, 3, 6),
          head_width: int = 512, aux_head: str = "3x3", bn_momentum: float = 0.1,
          dropout: float = 0.1) -> PSPNet:
    return PSPNet(num_classes, depth, width, tuple(bins), head_width, aux_head, bn_momentum,
                  dropout)


def param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """hszhao/semseg (tool/train.py): the new layers (pyramid pooling, head, aux) at 10x the
    backbone's learning rate."""
    return simple_param_groups(net, base_lr, weight_decay, head_prefixes=("ppm.", "head.", "aux."),
                               head_lr_mult=10)


ARCHITECTURE = Architecture(
    name="pspnet_resnet101", build=build,
    summary="PSPNet: dilated ResNet-101 (OS 8), pyramid pooling 1/2/3/6, aux head 0.4 "
            "(Zhao et al. 2017)",
    input_norm="imagenet", output_stride=lambda arch: 8, param_groups=param_groups,
    train_outputs="aux", loss_weights=(1.0, 0.4))
