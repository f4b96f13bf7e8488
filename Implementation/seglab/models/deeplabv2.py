"""DeepLab v2 (Chen et al., TPAMI 2017): atrous ResNet-101 + ASPP, logits at output stride 8.

Reading order follows the paper:
  ASPP                atrous spatial pyramid pooling: parallel 3x3 convs at rates 6/12/18/24, summed
  DeepLabV2           ResNet + ASPP, logits at 1/8 of the input
  param_groups        the Caffe solver's lr/weight-decay multipliers (1x backbone, 10x/20x ASPP)
  ARCHITECTURE        what the pipeline needs to know about it (seglab/models/spec.py)

`aspp.c0..c3` are the Caffe layers `fc1_voc12_c0..c3`; the backbone is seglab/models/resnet.py.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from seglab.models.rewrites import (fold_frozen_bn, use_inplace_activations,
                                       use_shifted_aspp)
from seglab.models.resnet import ResNet
from seglab.models.spec import Architecture


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
        self.arch = dict(name="deeplabv2", num_classes=num_classes, depth=depth, rates=list(rates), style=style,
                         frozen_bn=frozen_bn, width=width, strides=list(strides),
                         dilations=list(dilations))
        self.backbone = ResNet(depth, strides, dilations, style, frozen_bn, width)
        self.aspp = ASPP(self.backbone.out_channels, num_classes, rates)

    def forward(self, x):
        return self.aspp(self.backbone(x))


def param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """SGD parameter groups with the Caffe solver's multipliers: backbone convs 1x lr (wd 1x),
    ASPP weights 10x (wd 1x), ASPP biases 20x (wd 0). Frozen BatchNorm is excluded; trainable
    BatchNorm (training from scratch) gets 1x lr and no weight decay. Each group records its
    `lr_mult` so the poly schedule can rescale it."""
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


def output_stride(arch: dict) -> int:
    """conv1 and pool1 stride 2 each, then the product of the stage strides (8 as released)."""
    stride = 4
    for s in arch.get("strides", (1, 2, 1, 1)):
        stride *= s
    return stride


def prepare_inference(net: DeepLabV2, fold_bn: bool = True, shifted_aspp: bool = True):
    """The exact inference rewrites (seglab/models/rewrites.py): frozen BN folded into the
    convolutions, in-place activations, and the ASPP as one 1x1 conv plus shifted sums."""
    net = fold_frozen_bn(net, inplace=True) if fold_bn else net.eval()
    net = use_inplace_activations(net.requires_grad_(False))
    return use_shifted_aspp(net) if shifted_aspp else net


ARCHITECTURE = Architecture(
    name="deeplabv2",
    build=DeepLabV2,
    summary="DeepLab v2: ResNet-101 (Caffe form) + ASPP-L, MSC max fusion (Chen et al. 2017)",
    input_norm="caffe",
    output_stride=output_stride,
    param_groups=param_groups,
    train_outputs="msc",
    loss_weights=(1.0, 1.0, 1.0, 1.0),
    prepare_inference=prepare_inference,
    recipe={"msc_scales": (0.75, 0.5)},   # MSC 1, 0.75, 0.5 max-fused (Sec. 3.3; test prototxt)
)
