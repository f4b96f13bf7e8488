"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), from the paper's Fig. 1 and Sec. 2-3.

Contracting path: four levels of two unpadded 3x3 convolutions + ReLU and a 2x2 max pooling,
channels 64-128-256-512, then two 3x3 convolutions at 1024 (the bottom). Expansive path: a 2x2
up-convolution halving the channels, concatenation with the cropped contracting feature map,
two 3x3 convolutions + ReLU; a final 1x1 convolution to the classes. Drop-out at the end of the
contracting path (Sec. 3.1: after the fourth level and the bottom), weights from a Gaussian with
std sqrt(2/N) (Sec. 3).

`padding`:
  "valid"  the paper: unpadded convolutions, so the output is 184 pixels smaller than the input
           (572 -> 388). The overlap-tile strategy (Fig. 2) feeds the network a mirror-extended
           image: forward() mirror-pads the input to the smallest valid tile whose output covers
           the image (input 16k + 124 -> output 16k - 60), 92 pixels at the top/left, so the
           output is the image's prediction, cropped to its size. Any input size works, odd
           ones included (a tile of one image; large images are not split into several tiles).
  "same"   the padded variant everyone uses (3x3 convolutions with padding 1); pooling rounds up
           and each up-convolution is cropped to its skip's size, so any input size works.

The seed repository's (ZijunDeng/pytorch-semantic-segmentation) U-Net differs in two places, both
named options: BatchNorm after every 3x3 convolution (`batch_norm=True`) and, instead of
cropping the skip, bilinear resizing of it to the decoder's size (`skip="resize"`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seglab.models.spec import Architecture, simple_param_groups

LEVELS = 4           # poolings
VALID_MARGIN = 92    # the output starts 92 input pixels in (paper: 572 -> 388)


def mirror_index(n: int, before: int, after: int, device=None) -> torch.Tensor:
    """Source index of each position of a mirrored extension of n samples by `before` / `after`
    (the periodic reflection ... 2 1 | 0 1 2 ... n-1 | n-2 ..., of any width); a one-sample
    axis is repeated."""
    i = torch.arange(-before, n + after, device=device)
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * (n - 1))
    return torch.where(i < n, i, 2 * (n - 1) - i)


def mirror_pad(x, top: int, bottom: int, left: int, right: int):
    """Mirror (reflect) padding of any width, also wider than the image, as the overlap-tile
    strategy extrapolates missing context (Fig. 2); equals numpy's pad(mode="reflect")."""
    h, w = x.shape[-2:]
    x = x.index_select(-2, mirror_index(h, top, bottom, x.device))
    return x.index_select(-1, mirror_index(w, left, right, x.device))


def valid_tile(size: int) -> tuple[int, int]:
    """(tile input size, tile output size) of the valid U-Net covering `size` pixels."""
    k = max(1, math.ceil((size + 60) / 16))
    return 16 * k + 124, 16 * k - 60


def center_crop(x, size):
    dh, dw = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[:, :, dh:dh + size[0], dw:dw + size[1]]


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU (and BatchNorm with `batch_norm`)."""

    def __init__(self, cin: int, cout: int, pad: int, batch_norm: bool):
        layers = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=pad))
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net; returns logits at the input size (output stride 1)."""

    def __init__(self, num_classes: int = 21, padding: str = "valid", width: int = 64,
                 batch_norm: bool = False, skip: str = "crop", dropout: float = 0.5):
        super().__init__()
        if padding not in ("valid", "same") or skip not in ("crop", "resize"):
            raise ValueError("unet: padding must be 'valid' or 'same', skip 'crop' or 'resize'")
        self.padding, self.skip, self.dropout = padding, skip, dropout
        pad = int(padding == "same")
        widths = [width * 2 ** i for i in range(LEVELS + 1)]
        self.down = nn.ModuleList(DoubleConv(cin, cout, pad, batch_norm)
                                  for cin, cout in zip([3] + widths[:-1], widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(LEVELS)))
        self.decode = nn.ModuleList(DoubleConv(2 * widths[i], widths[i], pad, batch_norm)
                                    for i in reversed(range(LEVELS)))
        self.classifier = nn.Conv2d(width, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _join(self, up, skip):
        if self.skip == "resize":
            skip = F.interpolate(skip, size=up.shape[-2:], mode="bilinear", align_corners=False)
        elif self.padding == "valid":
            skip = center_crop(skip, up.shape[-2:])
        else:  # "same" with ceil pooling: the up-convolution may be one pixel larger
            up = up[:, :, :skip.shape[-2], :skip.shape[-1]]
        return torch.cat([skip, up], 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if self.padding == "valid":
            (th, _), (tw, _) = valid_tile(h), valid_tile(w)
            x = mirror_pad(x, VALID_MARGIN, th - h - VALID_MARGIN, VALID_MARGIN,
                           tw - w - VALID_MARGIN)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i >= LEVELS - 1:  # end of the contracting path: level 4 and the bottom
                x = F.dropout(x, self.dropout, self.training)
            if i < LEVELS:
                skips.append(x)
                x = F.max_pool2d(x, 2, ceil_mode=(self.padding == "same"))
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = decode(self._join(up(x), skip))
        return self.classifier(x)[:, :, :h, :w].contiguous()


def build(num_classes: int = 21, padding: str = "valid", width: int = 64,
          batch_norm: bool = False, skip: str = "crop", dropout: float = 0.5) -> UNet:
    return UNet(num_classes, padding, width, batch_norm, skip, dropout)


ARCHITECTURE = Architecture(
    name="unet", build=build,
    summary="U-Net: valid convolutions, overlap-tile mirror padding (Ronneberger et al. 2015)",
    input_norm="imagenet", output_stride=lambda arch: 1,
    param_groups=simple_param_groups,
    train_outputs="msc")
