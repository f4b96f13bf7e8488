"""Google's mobile DeepLab v3: MobileNetV2 + "ASPP-lite", as TensorFlow DeepLab builds it and its
TF Lite releases run it (seglab/weights/tflite.py converts those files). Logits at output stride
16 as released (8 with `output_stride=8`, as the float 257x257 release is).

Reading order:
  same_padding      TensorFlow's SAME padding: out = ceil(in / stride), the total padding split
                    with the odd pixel *after* (bottom/right), so it is asymmetric for stride 2 on
                    even sizes (and symmetric on the 2^k + 1 sizes DeepLab feeds)
  TFConv2d          a convolution with SAME padding, a bias (BatchNorm is folded into it in the
                    released graphs, which contain none) and TF Lite's fused activation
  InvertedResidual  MobileNetV2 (Sandler et al., CVPR 2018) Sec. 3.2-3.3 and Table 1: 1x1
                    expansion (factor t) + ReLU6, 3x3 depthwise + ReLU6, 1x1 *linear* projection
                    (linear bottlenecks), residual when stride 1 and in == out channels
  MobileNetV2       Table 2 (Sec. 4) without the final 1x1 conv to 1280 and the classifier (TF
                    DeepLab stops at `layer_18`). The width multiplier (Sec. 4, trade-off hyper
                    parameters) as TF DeepLab applies it: channels = _make_divisible(c x
                    multiplier, 8) at 1.0 and plain rounding (divisor 1) otherwise
                    (`feature_extractor._mobilenet_v2`: min_depth = divisible_by = 8 if
                    depth_multiplier == 1.0 else 1), the stem included (16 channels at 0.5); the
                    expanded width is always a multiple of 8 (slim's expand_input_by_factor(6)).
                    Atrous conversion (DeepLab v3, Chen et al. 2017, Sec. 3.1-3.2) as slim's
                    mobilenet does it: once the stride reached `output_stride`, a stride-2 block
                    runs at stride 1 with the current rate, and every later block at rate x 2
  ASPPLite          the mobile DeepLab v3 head (MobileNetV2 Sec. 6.3; DeepLab v3 Sec. 3.3 without
                    its atrous 3x3 branches): a 1x1 conv to 256 + ReLU and image-level features
                    (global average pool, 1x1 to 256 + ReLU, bilinear resize back with
                    align_corners=True), concatenated [image pool, 1x1] (512), a 1x1 projection
                    to 256 + ReLU
  DeepLabV3MobileNetV2  backbone + ASPP-lite + 1x1 classifier, logits at the output stride
  ARCHITECTURE      what the pipeline needs to know (seglab/models/spec.py): input "tf" ([-1, 1])

The graph facts (ReLU6 in the backbone, ReLU in the head, none after projections and the
classifier; concatenation order; align_corners) were read from the released .tflite files
(../shared/real/README.md). The image pooling of the released graphs is an AVERAGE_POOL_2D whose
window is the feature map at the export size (33x33 at 513); here it is a true global average, the
same at that size and defined at every other size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.spec import Architecture, simple_param_groups

# MobileNetV2 Table 2: (expansion t, channels c, repeats n, first stride s), after the stem.
MNV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
               (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, HEAD_CHANNELS = 32, 256
ACTIVATIONS = {None: None, "relu": F.relu, "relu6": F.relu6}


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """MobileNet's channel rounding: the nearest multiple of `divisor` (at least `min_value`),
    raised by one divisor when rounding down would lose more than 10%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def scaled_channels(channels: int, depth_multiplier: float) -> int:
    """Channels of a layer at `depth_multiplier`, with TF DeepLab's divisor (8 at 1.0, else 1)."""
    divisor = 8 if depth_multiplier == 1.0 else 1
    return make_divisible(channels * depth_multiplier, divisor)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's SAME along one axis: the output has
    ceil(size / stride) cells and the odd pixel of the total padding goes after."""
    effective = (kernel - 1) * dilation + 1
    out = (size + stride - 1) // stride
    total = torch.sym_max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow SAME padding, a bias and a fused activation (None, "relu",
    "relu6"). Symmetric padding goes to the convolution itself; asymmetric padding (stride 2 on
    an even size) is an explicit F.pad, the extra pixel after, then an unpadded convolution.
    Under torch.export the padding is always the explicit F.pad of symbolic amounts, so one
    exported graph serves every input size (the eager path keeps the faster fused padding)."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, dilation=1,
                 groups=1, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         dilation=dilation, groups=groups, bias=True)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation

    def extra_repr(self):
        return super().extra_repr() + f", padding=SAME, activation={self.activation}"

    def forward(self, x):
        pads = [same_padding(size, k, s, d) for size, k, s, d in
                zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation)]
        if not torch.compiler.is_exporting() and all(before == after for before, after in pads):
            y = F.conv2d(x, self.weight, self.bias, self.stride, tuple(p[0] for p in pads),
                         self.dilation, self.groups)
        else:
            (top, bottom), (left, right) = pads
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias,
                         self.stride, 0, self.dilation, self.groups)
        act = ACTIVATIONS[self.activation]
        return act(y, inplace=True) if act is not None else y


class InvertedResidual(nn.Module):
    """MobileNetV2's block: [1x1 expand to make_divisible(t x in, 8) + ReLU6] (absent when
    t = 1), 3x3 depthwise + ReLU6 at `stride` and `dilation`, 1x1 linear projection, + input when
    stride 1 and in == out."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int,
                 dilation: int):
        super().__init__()
        hidden = make_divisible(in_channels * expansion, 8) if expansion != 1 else in_channels
        self.expand = (TFConv2d(in_channels, hidden, 1, activation="relu6")
                       if expansion != 1 else None)
        self.depthwise = TFConv2d(hidden, hidden, 3, stride=stride, dilation=dilation,
                                  groups=hidden, activation="relu6")
        self.project = TFConv2d(hidden, out_channels, 1)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        if self.residual:
            h += x
        return h


class MobileNetV2(nn.Module):
    """The MobileNetV2 feature extractor of TF DeepLab (stem + 17 inverted residual blocks)."""

    def __init__(self, depth_multiplier: float = 1.0, output_stride: int = 16):
        super().__init__()
        channels = scaled_channels(STEM_CHANNELS, depth_multiplier)
        self.stem = TFConv2d(3, channels, 3, stride=2, activation="relu6")
        stride, rate, blocks = 2, 1, []
        for expansion, c, repeats, first_stride in MNV2_BLOCKS:
            out = scaled_channels(c, depth_multiplier)
            for i in range(repeats):
                s = first_stride if i == 0 else 1
                if s > 1 and stride >= output_stride:
                    block_stride, block_rate, rate = 1, rate, rate * s   # atrous from here on
                else:
                    block_stride, block_rate, stride = s, rate, stride * s
                blocks.append(InvertedResidual(channels, out, expansion, block_stride, block_rate))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = channels

    def forward(self, x):
        return self.blocks(self.stem(x))


class ASPPLite(nn.Module):
    """The mobile DeepLab v3 head: [image pooling, 1x1 branch] concatenated, 1x1 projection."""

    def __init__(self, in_channels: int, channels: int = HEAD_CHANNELS):
        super().__init__()
        self.image_pooling = TFConv2d(in_channels, channels, 1, activation="relu")
        self.aspp0 = TFConv2d(in_channels, channels, 1, activation="relu")
        self.project = TFConv2d(2 * channels, channels, 1, activation="relu")

    def forward(self, x):
        pooled = self.image_pooling(x.mean(dim=(2, 3), keepdim=True))
        pooled = F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return self.project(torch.cat([pooled, self.aspp0(x)], dim=1))


class DeepLabV3MobileNetV2(nn.Module):
    """MobileNetV2 + ASPP-lite + a 1x1 classifier: class logits at `output_stride`."""

    def __init__(self, num_classes: int = 21, depth_multiplier: float = 1.0,
                 output_stride: int = 16):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if depth_multiplier <= 0:
            raise ValueError(f"depth_multiplier must be positive, got {depth_multiplier}")
        self.backbone = MobileNetV2(depth_multiplier, output_stride)
        self.head = ASPPLite(self.backbone.out_channels)
        self.classifier = TFConv2d(HEAD_CHANNELS, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.head(self.backbone(x)))


def param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """One learning rate for all layers (TF DeepLab's default last_layer_gradient_multiplier is
    1); weight decay on the conv weights only."""
    return simple_param_groups(net, base_lr, weight_decay, head_prefixes=("head.", "classifier."))


ARCHITECTURE = Architecture(
    name="deeplabv3_mnv2_tf",
    build=DeepLabV3MobileNetV2,
    summary="DeepLab v3 MobileNetV2 + ASPP-lite, TF SAME padding (Google's TF Lite releases)",
    input_norm="tf",
    output_stride=lambda arch: int(arch.get("output_stride", 16)),
    param_groups=param_groups,
    train_outputs="msc",
)
