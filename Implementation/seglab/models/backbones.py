"""The ImageNet backbones of the classic networks, built by torchvision itself (weights=None).

  vgg16_features     torchvision's VGG16 / VGG16-BN `features` (make_layers on config "D"),
                     optionally narrower (`width`, for tests); its module indices stay torchvision's
  resnet             torchvision's ResNet-18/34/50/101/152 (and the test-only ResNet-10) with
                     its classifier removed; `dilations` / `set_dilations` turn the strides of
                     layer3/layer4 into atrous rates as PSPNet, DUC-HDC and DeepLab do
  densenet_features  torchvision's DenseNet-121/169/201 (and the test-only DenseNet-13) `features`
  freeze_batchnorm   every BatchNorm2d in a module -> FrozenBatchNorm2d (running statistics,
                     fixed affine), keeping the state_dict keys

Nothing here rewrites a torchvision network: the modules are torchvision's, so its ImageNet
weight files load with a key prefix only (seglab/weights/imagenet_backbones.py). Where a paper
changes a torchvision module (FCN's 100-pixel pad, ceil-mode pooling, atrous rates), the change
is an attribute set after construction, as the seed repository and hszhao/semseg do.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torchvision.models import densenet as tv_densenet
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from seglab.models.resnet import FrozenBatchNorm2d

# depth -> (block, blocks per stage). ResNet-10 (one BasicBlock per stage) is for tests only.
RESNETS = {
    10: (tv_resnet.BasicBlock, (1, 1, 1, 1)),
    18: (tv_resnet.BasicBlock, (2, 2, 2, 2)),
    34: (tv_resnet.BasicBlock, (3, 4, 6, 3)),
    50: (tv_resnet.Bottleneck, (3, 4, 6, 3)),
    101: (tv_resnet.Bottleneck, (3, 4, 23, 3)),
    152: (tv_resnet.Bottleneck, (3, 8, 36, 3)),
}
# depth -> (growth rate, layers per dense block, initial features). DenseNet-13 is for tests only.
DENSENETS = {
    13: (32, (1, 1, 1, 1), 64),
    121: (32, (6, 12, 24, 16), 64),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


def _check(value, known: dict, what: str):
    if value not in known:
        raise ValueError(f"{what} must be one of {sorted(known)}, got {value!r}")
    return known[value]


def vgg16_features(batch_norm: bool = False, width: int = 64) -> nn.Sequential:
    """torchvision's VGG16 (config "D") convolutional part; `width` scales every layer's channels
    (64 = the real network: 64-128-256-512-512)."""
    cfg = [v if v == "M" else v * width // 64 for v in tv_vgg.cfgs["D"]]
    return tv_vgg.make_layers(cfg, batch_norm=batch_norm)


def vgg_stages(features: nn.Sequential) -> list[tuple[int, int]]:
    """(start, stop) index ranges of the five VGG stages, each ending with its max pooling."""
    stages, start = [], 0
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            stages.append((start, i + 1))
            start = i + 1
    return stages


def resnet(depth: int = 101, width: int = 64, frozen_bn: bool = False) -> tv_resnet.ResNet:
    """torchvision's ResNet of `depth` without `avgpool`/`fc` (stride 32 as built). `width` is
    torchvision's width_per_group (the bottleneck width; 64 as published, Bottleneck only)."""
    block, layers = _check(depth, RESNETS, "ResNet depth")
    if block is tv_resnet.BasicBlock and width != 64:
        raise ValueError(f"ResNet-{depth} (BasicBlock) has no width option; use width=64")
    norm = (lambda c: FrozenBatchNorm2d(c, frozen=True)) if frozen_bn else None
    net = tv_resnet.ResNet(block, list(layers), width_per_group=width, norm_layer=norm)
    del net.avgpool, net.fc
    return net


def resnet_channels(net: tv_resnet.ResNet) -> list[int]:
    """Output channels of layer1..layer4."""
    return [layer[-1].bn2.num_features if isinstance(layer[-1], tv_resnet.BasicBlock)
            else layer[-1].bn3.num_features for layer in (net.layer1, net.layer2, net.layer3,
                                                           net.layer4)]


def set_dilations(layer: nn.Sequential, rates: Sequence[int]) -> None:
    """Make a torchvision ResNet stage atrous: stride 1 everywhere, block i's 3x3 convolution(s)
    at dilation = padding = rates[i % len(rates)], so the stage keeps its input resolution."""
    for i, block in enumerate(layer):
        rate = int(rates[i % len(rates)])
        convs = [block.conv2] if isinstance(block, tv_resnet.Bottleneck) else [block.conv1,
                                                                                block.conv2]
        for conv in convs:
            conv.stride, conv.dilation, conv.padding = (1, 1), (rate, rate), (rate, rate)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def resnet_stem(net: tv_resnet.ResNet, x):
    """conv1, bn1, relu, maxpool: stride 4."""
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


def densenet_features(depth: int = 201) -> nn.Sequential:
    """torchvision's DenseNet `features` (conv0 ... denseblock4, norm5)."""
    growth, blocks, init = _check(depth, DENSENETS, "DenseNet depth")
    return tv_densenet.DenseNet(growth_rate=growth, block_config=blocks,
                                num_init_features=init).features


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every nn.BatchNorm2d below `module` by a FrozenBatchNorm2d with the same state
    (same keys and parameter count; always running statistics, affine not trained)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            frozen = FrozenBatchNorm2d(child.num_features, frozen=True, eps=child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def fit(x, size):
    """Crop (bottom/right) or replicate-pad `x` (N, C, h, w) to `size` = (H, W): how a map
    upsampled by an integer factor is brought onto a finer map whose size is not an exact
    multiple (odd input sizes)."""
    h, w = int(size[0]), int(size[1])
    x = x[:, :, :h, :w]
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh or dw:
        x = nn.functional.pad(x, (0, dw, 0, dh), mode="replicate")
    return x
