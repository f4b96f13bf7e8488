"""Exact speed rewrites of a trained network for inference (bench/bench_inference.py measures them).

  fold_frozen_bn          each ConvBN's BatchNorm folded into its convolution
  ShiftedASPP             DeepLab v2's four dilated ASPP convolutions as one 1x1 conv + shifted sums
  cast_conv_weights       bf16 weights cast once instead of on every autocast call
  use_inplace_activations in-place ReLU and residual sums in the ResNet blocks

Each is an architecture's business: an `Architecture.prepare_inference` (seglab/models/spec.py)
chooses which apply. They work on modules by type (ConvBN, Bottleneck, ResNet) or by shape
(an ASPP is anything with `.rates` and `.branches()`), so this file imports no architecture.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from seglab.models.resnet import Bottleneck, ConvBN, ResNet


def fold_frozen_bn(net: nn.Module, inplace: bool = False) -> nn.Module:
    """A deep copy of `net` (`net` itself with inplace=True) in which every ConvBN's BatchNorm is
    folded into its convolution:

        BN(conv(x)) = gamma * (W*x - mean) / sqrt(var + eps) + beta
                    = (W * s) * x + (beta - mean * s),   s = gamma / sqrt(var + eps)

    so the conv gets the scaled weights and a bias, and the BN becomes nn.Identity. This equals
    the original only while BN uses its running statistics, i.e. frozen BN or eval mode: the
    result is returned in eval mode and is meant for inference only. Computed in float64.
    """
    folded = (net if inplace else copy.deepcopy(net)).eval()
    for module in folded.modules():
        if not isinstance(module, ConvBN) or isinstance(module.bn, nn.Identity):
            continue
        conv, bn = module.conv, module.bn
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("fold_frozen_bn needs BatchNorm running statistics "
                             "(track_running_stats=True)")
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
        shift = bn.bias.double() - bn.running_mean.double() * scale
        bias = shift if conv.bias is None else shift + conv.bias.double() * scale
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, conv.dilation, conv.groups, bias=True,
                          device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(conv.weight.double() * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(bias)
        fused.requires_grad_(False)
        module.conv, module.bn = fused, nn.Identity()
    return folded


class ShiftedASPP(nn.Module):
    """ASPP for inference, computed as one 1x1 convolution followed by shifted sums.

    A 3x3 convolution with dilation r is a sum over its 9 taps: tap (ky, kx) applies the 1x1
    weights W[:, :, ky, kx] to the input shifted by ((ky-1) r, (kx-1) r), zero outside. Stacking
    the taps of all branches gives one 1x1 convolution from 2048 to 9 x branches x C channels: a
    single large matrix product, which the CPU's AMX/AVX-512 and a GPU's tensor cores run at full
    speed, where the four dilated 2048 -> 21 convolutions ran at 40-80 GFLOP/s in bf16 on the
    benchmark machine (a quarter of the whole bf16 MSC forward pass). Each tap's C channels are
    then added at its offset, in float32, and the branch biases once. The same sum as ASPP in a
    different order: equal up to float rounding. The parameters are copied from `aspp`.
    """

    def __init__(self, aspp: nn.Module):
        super().__init__()
        convs = aspp.branches()
        self.num_classes = convs[0].out_channels
        # (C, K, 3, 3) -> taps-major (3, 3, C, K) -> (9 C, K, 1, 1), one block of C per tap
        weight = torch.cat([conv.weight.permute(2, 3, 0, 1).reshape(-1, conv.in_channels)
                            for conv in convs])
        self.register_buffer("weight", weight[:, :, None, None].detach().clone())
        bias = torch.zeros(self.num_classes, device=weight.device)
        for conv in convs:
            if conv.bias is not None:
                bias += conv.bias.detach().float()
        self.register_buffer("bias", bias)  # stays float32, added to the float32 sum
        self.offsets = [((ky - 1) * rate, (kx - 1) * rate)
                        for rate in aspp.rates for ky in range(3) for kx in range(3)]

    def forward(self, x):
        taps = nn.functional.conv2d(x, self.weight)
        n, _, h, w = taps.shape
        out = self.bias.view(1, -1, 1, 1).repeat(n, 1, h, w)
        c = self.num_classes
        for t, (dy, dx) in enumerate(self.offsets):
            if abs(dy) >= h or abs(dx) >= w:
                continue  # the tap only ever reads the zero padding
            # out[i, j] += tap[i + dy, j + dx] wherever i + dy, j + dx lie inside the map
            out[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
                taps[:, t * c:(t + 1) * c, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        return out


def use_shifted_aspp(net: nn.Module) -> nn.Module:
    """Replace (in place) `net.aspp` by its ShiftedASPP."""
    net.aspp = ShiftedASPP(net.aspp)
    return net


def cast_conv_weights(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store every convolution's weight and bias in `dtype` (in place), once: autocast would
    cast them on every call (it caches casts only of parameters that require grad), to the
    same values."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.to(dtype)
        elif isinstance(module, ShiftedASPP):
            module.weight = module.weight.to(dtype)
    return net


class InplaceBottleneck(Bottleneck):
    """Bottleneck.forward with in-place ReLU and residual sum: the same numbers, fewer
    allocations and memory passes. Inference only (autograd needs the overwritten inputs)."""

    def forward(self, x):
        h = self.reduce(x).relu_()
        h = self.conv3x3(h).relu_()
        h = self.increase(h)
        h += self.shortcut(x) if self.shortcut is not None else x
        return h.relu_()


class InplaceResNet(ResNet):
    """ResNet.forward with the stem's ReLU in place. Inference only."""

    def forward(self, x):
        x = self.pool1(self.conv1(x).relu_())
        return self.res5(self.res4(self.res3(self.res2(x))))


def use_inplace_activations(net: nn.Module) -> nn.Module:
    """Switch `net`'s Bottleneck and ResNet modules (in place) to their in-place-activation
    forms; their parameters and state_dict keys stay as they are."""
    for module in net.modules():
        if type(module) is Bottleneck:
            module.__class__ = InplaceBottleneck
        elif type(module) is ResNet:
            module.__class__ = InplaceResNet
    return net
