"""torchvision's segmentation networks behind the model seam, built by torchvision itself.

  deeplabv3_resnet50_tv, deeplabv3_resnet101_tv   DeepLabV3 (Chen et al. 2017, arXiv:1706.05587):
                                  dilated ResNet at output stride 8, ASPP rates 12/24/36 with
                                  image pooling, aux FCNHead on layer3
  deeplabv3_mobilenet_v3_large_tv DeepLabV3 on a dilated MobileNetV3-Large (output stride 16),
                                  aux FCNHead on the stride-8 stage
  fcn_resnet50_tv, fcn_resnet101_tv  FCN (Long et al. 2015) heads on the same dilated ResNets
  lraspp_mobilenet_v3_large_tv    Lite R-ASPP (Howard et al. 2019, "Searching for MobileNetV3",
                                  Sec. 6.3): logits at output stride 8, no aux head

Naming: torchvision's own builder name plus `_tv` (the source), as `deeplabv3_mnv2_tf` and the
`_vainf` forms of seglab/models/vainf.py.

Nothing here re-implements a layer: `torchvision.models.segmentation.<builder>(weights=None,
weights_backbone=None, ...)` builds the network, and `TorchvisionSegmentation` adopts its
`backbone`, `classifier` and `aux_classifier` modules as its own children. So the state_dict keys
are exactly torchvision's, with no prefix: torchvision's weight files (e.g.
deeplabv3_resnet101_coco-586e9e4e.pth) load with `load_state_dict` as they are, and the outputs
equal torchvision's by construction. What the wrapper changes is the forward: torchvision's
upsamples the logits to the input size (bilinear, align_corners=False) and returns a dict; the
pipeline wants logits at the output stride (MSC, the logit cache and the CRF upsample once, in
seglab/models/resize.py; `model.interp: pytorch` is torchvision's upsampling) and, in training,
{"out", "aux"} for the loss (main + train.aux_weight x aux, seglab/training/loss.py).

Options: `num_classes`, and `aux_lr_mult` (the aux head's learning-rate multiplier: 10 in
torchvision's reference recipe, references/segmentation/train.py, which also applies weight decay
to every parameter; so do `param_groups` here). `prepare_inference` folds every BatchNorm into
the convolution before it with torch.ao.quantization.fuse_modules (exact up to float rounding).
"""
from __future__ import annotations

import functools

import torch.nn as nn
from torch.ao.quantization import fuse_modules
from torchvision.models import segmentation
from torchvision.models.segmentation.lraspp import LRASPP

from seglab.models.spec import Architecture

# our name -> (torchvision builder, output stride, has an aux head, one-line summary)
FORMS = {
    "deeplabv3_resnet50_tv": ("deeplabv3_resnet50", 8, True,
                              "torchvision DeepLabV3, ResNet-50 (OS 8), aux FCN head"),
    "deeplabv3_resnet101_tv": ("deeplabv3_resnet101", 8, True,
                               "torchvision DeepLabV3, ResNet-101 (OS 8), aux FCN head"),
    "deeplabv3_mobilenet_v3_large_tv": ("deeplabv3_mobilenet_v3_large", 16, True,
                                        "torchvision DeepLabV3, MobileNetV3-Large (OS 16), aux"),
    "fcn_resnet50_tv": ("fcn_resnet50", 8, True, "torchvision FCN, ResNet-50 (OS 8), aux head"),
    "fcn_resnet101_tv": ("fcn_resnet101", 8, True, "torchvision FCN, ResNet-101 (OS 8), aux head"),
    "lraspp_mobilenet_v3_large_tv": ("lraspp_mobilenet_v3_large", 8, False,
                                     "torchvision Lite R-ASPP, MobileNetV3-Large (logits OS 8)"),
}


class TorchvisionSegmentation(nn.Module):
    """torchvision's segmentation model with its own modules and keys, returning logits at the
    output stride (eval), or {"out", "aux"} at their native strides (training, with an aux
    head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)
        # LR-ASPP's head reads two backbone outputs ("low", "high"); the others read "out"
        self.head_takes_features = isinstance(model, LRASPP)

    def forward(self, x):
        features = self.backbone(x)
        out = self.classifier(features if self.head_takes_features else features["out"])
        if self.training and self.aux_classifier is not None:
            return {"out": out, "aux": self.aux_classifier(features["aux"])}
        return out


def torchvision_model(tv_name: str, num_classes: int) -> nn.Module:
    """torchvision's own network (its outer forward and all), random weights."""
    builder = getattr(segmentation, tv_name)
    kwargs = {} if tv_name.startswith("lraspp") else dict(aux_loss=True)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _build_aux(tv_name: str, num_classes: int = 21, aux_lr_mult: float = 10.0):
    """(aux_lr_mult shapes no layer: param_groups reads it from net.arch.)"""
    return TorchvisionSegmentation(torchvision_model(tv_name, num_classes))


def _build_plain(tv_name: str, num_classes: int = 21):
    return TorchvisionSegmentation(torchvision_model(tv_name, num_classes))


def param_groups(net: nn.Module, base_lr: float, weight_decay: float) -> list[dict]:
    """torchvision's reference recipe: backbone and classifier at lr, the aux head at
    `aux_lr_mult` x lr; weight decay on every parameter (BN and biases included)."""
    mult = float(net.arch.get("aux_lr_mult", 1.0))
    main = [p for n, p in net.named_parameters()
            if p.requires_grad and not n.startswith("aux_classifier.")]
    aux = [p for n, p in net.named_parameters()
           if p.requires_grad and n.startswith("aux_classifier.")]
    groups = [dict(params=main, name="main", lr=base_lr, lr_mult=1.0, weight_decay=weight_decay)]
    if aux:
        groups.append(dict(params=aux, name="aux", lr=base_lr * mult, lr_mult=mult,
                           weight_decay=weight_decay))
    return groups


def conv_bn_pairs(net: nn.Module) -> list[list[str]]:
    """Names of every (Conv2d, BatchNorm2d) pair where the BN directly follows the conv: adjacent
    children of an nn.Sequential, or `convK`/`bnK` siblings (torchvision's ResNet stem and
    Bottleneck)."""
    pairs = []
    for name, module in net.named_modules():
        prefix = f"{name}." if name else ""
        children = list(module.named_children())
        if isinstance(module, nn.Sequential):
            for (a, conv), (b, bn) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    pairs.append([prefix + a, prefix + b])
        kids = dict(children)
        for a, conv in children:
            if a.startswith("conv") and isinstance(conv, nn.Conv2d):
                bn = kids.get("bn" + a[len("conv"):])
                if isinstance(bn, nn.BatchNorm2d):
                    pairs.append([prefix + a, prefix + "bn" + a[len("conv"):]])
    return pairs


def fold_batchnorm(net: nn.Module, fold_bn: bool = True, **_) -> nn.Module:
    """Inference form: every BatchNorm that follows a convolution folded into it (eval-mode BN
    is an affine map: torch.ao.quantization.fuse_modules computes the folded weights), in place;
    returns `net` in eval mode. Any other option of Predictor (shifted_aspp, ...) is DeepLab
    v2's and ignored here."""
    net.eval()
    if fold_bn:
        pairs = conv_bn_pairs(net)
        if pairs:
            fuse_modules(net, pairs, inplace=True)
    return net.requires_grad_(False)


def _architecture(name: str) -> Architecture:
    tv_name, stride, aux, summary = FORMS[name]
    # a partial keeps the signature of its keyword arguments: the arch options and defaults
    build = functools.partial(_build_aux if aux else _build_plain, tv_name)
    return Architecture(
        name=name, build=build, summary=summary, input_norm="imagenet",
        output_stride=lambda arch, s=stride: s,
        param_groups=param_groups,
        train_outputs="aux" if aux else "msc",
        loss_weights=(1.0, 0.5) if aux else (1.0,),  # the reference's; train.aux_weight rules
        prepare_inference=fold_batchnorm,
        training_options=("aux_lr_mult",))


ARCHITECTURES = {name: _architecture(name) for name in FORMS}
