"""FCN (Long, Shelhamer & Darrell, CVPR 2015; Shelhamer et al., TPAMI 2017): the skip architecture.

Reading order:
  bilinear_kernel / Upsample   the in-network upsampling (CVPR Sec. 3.3): a deconvolution with one
                               bilinear kernel per class, fixed as in the reference release or
                               learned as in the CVPR paper's first experiments (`learn_upsampling`)
  crop_offset                  Caffe's crop-layer arithmetic (caffe.coord_map) on our modules
  FCNVGG                       FCN-32s/16s/8s on VGG16 exactly as the Caffe release
                               (fcn.berkeleyvision.org voc-fcn*/net.py): 100-pixel pad on conv1_1,
                               ceil-mode pooling, fc6/fc7 as 7x7/1x1 convolutions, zero-initialised
                               score layers, crops at offsets 5 / 9 / 31 (8s), 5 / 27 (16s),
                               19 (32s)
  FCNBackbone                  the seed repository's FCN heads on torchvision ResNet / DenseNet:
                               the same skip fusion (CVPR Sec. 4.2, Fig. 3) on stride 8/16/32 taps
  ARCHITECTURES                fcn{32,16,8}s_{vgg16,resnet152,densenet201}

Every network decodes to the input resolution (output stride 1), for any input size.
The seed code (ZijunDeng/pytorch-semantic-segmentation) scales the pool4/pool3 skips by 0.01 /
0.0001 before scoring them: that is the release's *at-once* FCN-8s (voc-fcn8s-atonce), the
`scale_skips` option here; the staged "heavy" release (fcn8s-heavy-pascal.caffemodel) has none.
Its DenseNet FCN taps the transitions *after* their pooling (strides 16/32/32, so its fusion
cannot line up); here the taps are the transitions' convolutions before pooling (strides 8/16)
and norm5 (32), with the seed's score heads and hence its parameter counts; the transitions'
average pooling rounds up (torchvision's rounds down, which needs inputs of 29 px and more).
"""
from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.backbones import (densenet_features, fit, freeze_batchnorm, resnet,
                                     resnet_channels, resnet_stem, vgg16_features, vgg_stages)
from seglab.models.spec import Architecture

# stride -> the skip taps it fuses (besides the stride-32 score) and its upsampling kernels
VARIANTS = {32: ((), (64,)), 16: ((16,), (4, 32)), 8: ((16, 8), (4, 4, 16))}


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """(C, C, k, k) deconvolution weight: a bilinear kernel on the diagonal, 0 elsewhere (the
    release's surgery.interp)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64)
    filt = 1 - (og - center).abs() / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = (filt[:, None] * filt[None, :]).float()
    return weight


class Upsample(nn.ConvTranspose2d):
    """Class-wise deconvolution initialised to bilinear interpolation. Fixed (requires_grad off)
    unless `learn`. `padding` = stride/2 gives exactly `stride` x the input size (the FCNBackbone
    form); 0 is the Caffe release's form, which is then cropped."""

    def __init__(self, channels: int, kernel: int, stride: int, padding: int = 0,
                 learn: bool = False):
        super().__init__(channels, channels, kernel, stride, padding, bias=False)
        with torch.no_grad():
            self.weight.copy_(bilinear_kernel(channels, kernel))
        self.weight.requires_grad_(learn)


def zero_conv(cin: int, cout: int) -> nn.Conv2d:
    """A 1x1 score layer, zero-initialised as in the release (TPAMI Sec. 4.1)."""
    conv = nn.Conv2d(cin, cout, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def coordinate_map(modules) -> tuple[Fraction, Fraction]:
    """(a, b) with input position = a * output position + b through a chain of convolutions,
    poolings and deconvolutions (the centre of an output cell in input coordinates), as Caffe's
    coord_map computes it for the crop layer."""
    a, b = Fraction(1), Fraction(0)
    for m in modules:
        if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d)):
            continue
        k, s, p = (v[0] if isinstance(v, tuple) else v
                   for v in (m.kernel_size, m.stride, m.padding))
        dil = m.dilation[0] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else 1
        shift = Fraction(dil * (k - 1), 2) - p
        if isinstance(m, nn.ConvTranspose2d):
            a, b = a / s, b - a * shift / s
        else:
            a, b = a * s, b + a * shift
    return a, b


def crop_offset(top, reference) -> int:
    """The offset of Caffe's crop layer that aligns `top` (a, b) onto `reference` (a, b)."""
    (a1, b1), (a2, b2) = top, reference
    if a1 != a2 or (b2 - b1) % a1:
        raise ValueError(f"maps {top} and {reference} cannot be aligned by an integer crop")
    return int((b2 - b1) / a1)


class FCNVGG(nn.Module):
    """FCN-VGG16 as released (Caffe): `stride` 32, 16 or 8 (FCN-32s/16s/8s). Module names are the
    Caffe layer names (score_fr, upscore2, score_pool4, upscore_pool4, score_pool3, upscore8,
    upscore16, upscore); `features` is torchvision's VGG16 with indices unchanged."""

    def __init__(self, num_classes: int = 21, stride: int = 8, width: int = 64,
                 fc_width: int = 4096, learn_upsampling: bool = False, scale_skips: bool = False):
        super().__init__()
        taps, kernels = VARIANTS[stride]
        self.stride, self.scale_skips = stride, scale_skips
        self.features = vgg16_features(width=width)
        self.features[0].padding = (100, 100)          # conv1_1: pad 100
        for m in self.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True                    # Caffe pooling rounds up
        self.stages = vgg_stages(self.features)
        c = 8 * width
        self.fc6 = nn.Conv2d(c, fc_width, 7)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.score_fr = zero_conv(fc_width, num_classes)
        names = {32: ["upscore"], 16: ["upscore2", "upscore16"],
                 8: ["upscore2", "upscore_pool4", "upscore8"]}[stride]
        for name, k in zip(names, kernels):
            self.add_module(name, Upsample(num_classes, k, k // 2, learn=learn_upsampling))
        self.upsamplers = names
        if 16 in taps:
            self.score_pool4 = zero_conv(c, num_classes)
        if 8 in taps:
            self.score_pool3 = zero_conv(c // 2, num_classes)
        self.offsets = self._offsets()

    def _offsets(self) -> list[int]:
        """The crop offsets of the release (voc-fcn*/deploy.prototxt), derived from the layer
        geometry: one per skip, then the final crop onto the input."""
        feats = list(self.features)
        pool = {s: coordinate_map(feats[:self.stages[i][1]]) for i, s in ((2, 8), (3, 16))}
        chain = feats + [self.fc6, self.fc7, self.score_fr]
        offsets = []
        for name, tap in zip(self.upsamplers[:-1], (16, 8)):
            chain.append(getattr(self, name))
            offsets.append(crop_offset(pool[tap], coordinate_map(chain)))
        chain.append(getattr(self, self.upsamplers[-1]))
        offsets.append(crop_offset(coordinate_map(chain), (Fraction(1), Fraction(0))))
        return offsets

    def forward(self, x):
        h, w = x.shape[-2:]
        pools = {}
        y = x
        for i, (start, stop) in enumerate(self.stages):
            y = self.features[start:stop](y)
            pools[2 ** (i + 1)] = y
        y = F.dropout(F.relu(self.fc6(y)), 0.5, self.training)
        y = F.dropout(F.relu(self.fc7(y)), 0.5, self.training)
        y = self.score_fr(y)
        scale = {16: 0.01, 8: 0.0001} if self.scale_skips else {16: 1.0, 8: 1.0}
        for name, tap, off in zip(self.upsamplers[:-1], (16, 8), self.offsets):
            y = getattr(self, name)(y)
            skip = getattr(self, f"score_pool{3 if tap == 8 else 4}")(scale[tap] * pools[tap])
            y = y + skip[:, :, off:off + y.shape[-2], off:off + y.shape[-1]]
        y = getattr(self, self.upsamplers[-1])(y)
        off = self.offsets[-1]
        return y[:, :, off:off + h, off:off + w].contiguous()


class FCNBackbone(nn.Module):
    """FCN-32s/16s/8s heads on a torchvision ResNet or DenseNet (the seed repository's variants):
    1x1 score layers on the stride 8 / 16 / 32 taps (DenseNet taps: BN + ReLU first, as DenseNet
    features are pre-activation), 2x deconvolutions, and a final 8x / 16x / 32x deconvolution;
    each upsampled map is brought onto the finer one's size (odd sizes) by `fit`."""

    def __init__(self, num_classes: int = 21, stride: int = 8, backbone: str = "resnet",
                 depth: int = 152, width: int = 64, learn_upsampling: bool = False,
                 frozen_bn: bool = False):
        super().__init__()
        taps, kernels = VARIANTS[stride]
        self.kind, self.stride, self.taps = backbone, stride, (32,) + taps
        if backbone == "resnet":
            self.backbone = resnet(depth, width, frozen_bn)
            channels = dict(zip((4, 8, 16, 32), resnet_channels(self.backbone)))
        else:
            self.backbone = densenet_features(depth)
            for t in (self.backbone.transition1, self.backbone.transition2,
                      self.backbone.transition3):
                t.pool.ceil_mode = True  # any input size (floor: inputs >= 29 px only)
            if frozen_bn:
                freeze_batchnorm(self.backbone)
            f = self.backbone
            channels = {8: f.transition2.conv.out_channels, 16: f.transition3.conv.out_channels,
                        32: f.norm5.num_features}
        for tap in self.taps:
            pre = []
            if backbone == "densenet":
                pre = [nn.BatchNorm2d(channels[tap])] if tap != 32 else []
                pre.append(nn.ReLU())
            self.add_module(f"score{tap}", nn.Sequential(*pre, zero_conv(channels[tap],
                                                                         num_classes)))
        self.up = nn.ModuleList(Upsample(num_classes, k, k // 2, k // 4, learn_upsampling)
                                for k in kernels)

    def tap_features(self, x) -> dict:
        if self.kind == "resnet":
            b = self.backbone
            f8 = b.layer2(b.layer1(resnet_stem(b, x)))
            f16 = b.layer3(f8)
            return {8: f8, 16: f16, 32: b.layer4(f16)}
        f = self.backbone
        y = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        y = f.transition1(f.denseblock1(y))
        t = f.transition2
        f8 = t.conv(t.relu(t.norm(f.denseblock2(y))))
        t = f.transition3
        f16 = t.conv(t.relu(t.norm(f.denseblock3(f.transition2.pool(f8)))))
        return {8: f8, 16: f16, 32: f.norm5(f.denseblock4(t.pool(f16)))}

    def forward(self, x):
        feats = self.tap_features(x)
        y = getattr(self, "score32")(feats[32])
        for up, tap in zip(self.up, self.taps[1:]):
            skip = getattr(self, f"score{tap}")(feats[tap])
            y = fit(up(y), skip.shape[-2:]) + skip
        return fit(self.up[-1](y), x.shape[-2:])


def caffe_param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """The release's solver multipliers (voc-fcn*/net.py): weights lr x1 with weight decay,
    biases lr x2 without; BatchNorm parameters x1 without; fixed deconvolutions not trained."""
    groups = {"weight": [], "bias": [], "norm": []}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        module = net.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            groups["norm"].append(p)
        else:
            groups["bias" if name.endswith(".bias") else "weight"].append(p)
    spec = {"weight": (1, weight_decay), "bias": (2, 0.0), "norm": (1, 0.0)}
    return [dict(params=ps, name=k, lr=base_lr * spec[k][0], lr_mult=spec[k][0],
                 weight_decay=spec[k][1]) for k, ps in groups.items() if ps]


def _vgg_builder(stride: int):
    def build(num_classes: int = 21, width: int = 64, fc_width: int = 4096,
              learn_upsampling: bool = False, scale_skips: bool = False):
        return FCNVGG(num_classes, stride, width, fc_width, learn_upsampling, scale_skips)
    return build


def _backbone_builder(stride: int, kind: str, default_depth: int):
    def build(num_classes: int = 21, depth: int = default_depth, width: int = 64,
              learn_upsampling: bool = False, frozen_bn: bool = False):
        if kind == "densenet" and width != 64:
            raise ValueError("the DenseNet FCNs have no width option (use depth=13 for tests)")
        return FCNBackbone(num_classes, stride, kind, depth, width, learn_upsampling, frozen_bn)
    return build


def _architecture(stride: int, backbone: str) -> Architecture:
    depth = {"resnet152": 152, "densenet201": 201}.get(backbone)
    build = (_vgg_builder(stride) if backbone == "vgg16" else
             _backbone_builder(stride, backbone.rstrip("0123456789"), depth))
    where = ("the Caffe release (100-px pad, crops)" if backbone == "vgg16" else
             "the seed repository's heads")
    return Architecture(
        name=f"fcn{stride}s_{backbone}", build=build,
        summary=f"FCN-{stride}s, {backbone} backbone, {where} (Long et al. 2015)",
        input_norm="caffe" if backbone == "vgg16" else "imagenet",
        output_stride=lambda arch: 1, param_groups=caffe_param_groups, train_outputs="msc")


FCN32S_VGG16 = _architecture(32, "vgg16")
FCN16S_VGG16 = _architecture(16, "vgg16")
FCN8S_VGG16 = _architecture(8, "vgg16")
FCN32S_RESNET152 = _architecture(32, "resnet152")
FCN16S_RESNET152 = _architecture(16, "resnet152")
FCN8S_RESNET152 = _architecture(8, "resnet152")
FCN32S_DENSENET201 = _architecture(32, "densenet201")
FCN16S_DENSENET201 = _architecture(16, "densenet201")
FCN8S_DENSENET201 = _architecture(8, "densenet201")
