"""GCN, "Large Kernel Matters" (Peng, Zhang, Yu, Luo & Sun, CVPR 2017), from the paper's Fig. 2.

Reading order:
  GlobalConv        Sec. 3.1 / Fig. 2(b): a k x k convolution made of two separable branches,
                    (k x 1 then 1 x k) + (1 x k then k x 1), no nonlinearity; to the classes
  BoundaryRefine    Sec. 3.2 / Fig. 2(c): a residual block S + conv3x3(ReLU(conv3x3(S)))
  GCN               Fig. 2(a): ResNet (ImageNet-pretrained ResNet-152, Sec. 4) res2..res5 ->
                    GCN -> BR score maps at strides 4/8/16/32; from the coarsest, deconvolution x2,
                    sum with the next score map, BR; then two more deconvolution + BR steps up to
                    the input resolution (output stride 1)

k = 15 is the paper's best on VOC (Table 1 / Sec. 4.1.1); the deconvolutions are 4x4 stride 2,
initialised to bilinear interpolation and learned. The seed repository
(ZijunDeng/pytorch-semantic-segmentation) uses k = 7 and bilinear interpolation instead of the
deconvolutions: `k=7, upsample="bilinear"`.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from seglab.models.backbones import fit, resnet, resnet_channels
from seglab.models.fcn import Upsample
from seglab.models.spec import Architecture, simple_param_groups


class GlobalConv(nn.Module):
    """k x k receptive field with 2 * 2 * k * cin-size separable kernels: left branch k x 1 ->
    1 x k, right branch 1 x k -> k x 1, summed."""

    def __init__(self, cin: int, cout: int, k: int = 15):
        super().__init__()
        if k % 2 == 0:
            raise ValueError(f"gcn: the kernel size k must be odd (aligned outputs), got {k}")
        p = k // 2
        self.left = nn.Sequential(nn.Conv2d(cin, cout, (k, 1), padding=(p, 0)),
                                  nn.Conv2d(cout, cout, (1, k), padding=(0, p)))
        self.right = nn.Sequential(nn.Conv2d(cin, cout, (1, k), padding=(0, p)),
                                   nn.Conv2d(cout, cout, (k, 1), padding=(p, 0)))

    def forward(self, x):
        return self.left(x) + self.right(x)


class BoundaryRefine(nn.Module):
    """S + conv(ReLU(conv(S))), 3x3 convolutions keeping the channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class GCN(nn.Module):
    """GCN; returns logits at the input size. `gcm.i` / `br.i` are stage i's GCN and BR
    (i = 0 for res2 ... 3 for res5); `fuse_br.j` the BRs after each fusion and upsampling."""

    def __init__(self, num_classes: int = 21, depth: int = 152, width: int = 64, k: int = 15,
                 upsample: str = "deconv", frozen_bn: bool = False):
        super().__init__()
        if upsample not in ("deconv", "bilinear"):
            raise ValueError(f"gcn: upsample must be 'deconv' or 'bilinear', got {upsample!r}")
        self.backbone = resnet(depth, width, frozen_bn)
        channels = resnet_channels(self.backbone)
        self.gcm = nn.ModuleList(GlobalConv(c, num_classes, k) for c in channels)
        self.br = nn.ModuleList(BoundaryRefine(num_classes) for _ in channels)
        self.fuse_br = nn.ModuleList(BoundaryRefine(num_classes) for _ in range(5))
        self.up = (nn.ModuleList(Upsample(num_classes, 4, 2, 1, learn=True) for _ in range(5))
                   if upsample == "deconv" else None)
        # The paper gives no initialisation: the GCN convolutions produce class scores and start
        # as N(0, 0.01) (DeepLab's classifier init); each BR starts as the identity (its last
        # convolution zero), so the untrained decoder passes the scores through unchanged.
        for m in self.gcm.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        for br in [*self.br, *self.fuse_br]:
            nn.init.kaiming_normal_(br.conv1.weight, nonlinearity="relu")
            nn.init.zeros_(br.conv1.bias)
            nn.init.zeros_(br.conv2.weight)
            nn.init.zeros_(br.conv2.bias)

    def _up(self, i: int, x, size):
        if self.up is None:
            return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return fit(self.up[i](x), size)

    def forward(self, x):
        b = self.backbone
        f1 = b.relu(b.bn1(b.conv1(x)))           # stride 2
        feats = [b.layer1(b.maxpool(f1))]        # res2, stride 4
        for layer in (b.layer2, b.layer3, b.layer4):
            feats.append(layer(feats[-1]))
        scores = [br(gcm(f)) for gcm, br, f in zip(self.gcm, self.br, feats)]
        y = scores[3]
        for i, s in enumerate(reversed(scores[:3])):  # res4, res3, res2
            y = self.fuse_br[i](self._up(i, y, s.shape[-2:]) + s)
        y = self.fuse_br[3](self._up(3, y, f1.shape[-2:]))
        return self.fuse_br[4](self._up(4, y, x.shape[-2:]))


def build(num_classes: int = 21, depth: int = 152, width: int = 64, k: int = 15,
          upsample: str = "deconv", frozen_bn: bool = False) -> GCN:
    return GCN(num_classes, depth, width, k, upsample, frozen_bn)


ARCHITECTURE = Architecture(
    name="gcn_resnet152", build=build,
    summary="GCN: ResNet-152, k x 1 + 1 x k global convolutions (k = 15), boundary refinement "
            "(Peng et al. 2017)",
    input_norm="imagenet", output_stride=lambda arch: 1,
    param_groups=simple_param_groups,
    train_outputs="msc")
