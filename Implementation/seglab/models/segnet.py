"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017), from the paper's Fig. 2-3 and Sec. 3.

Encoder: the 13 convolutional layers of VGG16 with BatchNorm (torchvision's VGG16-BN `features`,
whose ImageNet weights initialise it, Sec. 3), five 2x2 max poolings that record the argmax
positions. Decoder (Fig. 3): each stage upsamples with the *pooling indices* of its encoder
stage (values put back at the recorded positions, zeros elsewhere: no learned upsampling), then
the mirrored convolutions + BatchNorm + ReLU: 512-512-512, 512-512-256, 256-256-128, 128-64, 64,
then a final 3x3 convolution to the classes (the Caffe release's conv1_1_D, no BatchNorm; the
softmax is in the loss). Pooling rounds up as Caffe's does, and each unpooling restores the
exact size its encoder stage had, so every input size works, odd ones included.

The seed repository's "SegNet" (ZijunDeng/pytorch-semantic-segmentation) is another network (a
VGG19-BN encoder with learned transposed convolutions and concatenated skips); it is not offered.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from seglab.models.backbones import vgg16_features, vgg_stages
from seglab.models.spec import Architecture, simple_param_groups

# Output channels of the decoder's convolutions, stage 5 (deepest) first: the mirror of VGG16.
DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))  # + classifier


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegNet(nn.Module):
    """SegNet; returns logits at the input size (output stride 1). `encoder` is torchvision's
    VGG16-BN `features` (indices unchanged), `decoder.i` the stage that undoes encoder stage
    5 - i."""

    def __init__(self, num_classes: int = 21, width: int = 64):
        super().__init__()
        self.encoder = vgg16_features(batch_norm=True, width=width)
        self.stages = vgg_stages(self.encoder)
        for start, stop in self.stages:
            pool = self.encoder[stop - 1]
            pool.ceil_mode, pool.return_indices = True, True
        stages = []
        cin = DECODER[0][0] * width // 64
        for widths in DECODER:
            layers = []
            for c in widths:
                layers += conv_bn_relu(cin, c * width // 64)
                cin = c * width // 64
            stages.append(nn.Sequential(*layers))
        self.decoder = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(cin, num_classes, 3, padding=1)
        for m in [*self.decoder.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):  # the release's "msra" filler
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        trace = []  # (indices, size before pooling) of each encoder stage
        for start, stop in self.stages:
            x = self.encoder[start:stop - 1](x)
            size = x.shape[-2:]
            x, indices = self.encoder[stop - 1](x)
            trace.append((indices, size))
        for stage, (indices, size) in zip(self.decoder, reversed(trace)):
            x = stage(F.max_unpool2d(x, indices, 2, 2, output_size=size))
        return self.classifier(x)


def build(num_classes: int = 21, width: int = 64) -> SegNet:
    return SegNet(num_classes, width)


ARCHITECTURE = Architecture(
    name="segnet_vgg16bn", build=build,
    summary="SegNet: VGG16-BN encoder, decoder unpooling with the pooling indices "
            "(Badrinarayanan et al. 2017)",
    input_norm="imagenet", output_stride=lambda arch: 1,
    param_groups=simple_param_groups,
    train_outputs="msc")
