"""Turning a trained DeepLab v2 into a fast predictor (used by evaluate.py, infer.py and bench/).

    predictor = Predictor("runs/voc12/final.pth")              # MSC, VOC protocol, fp32
    labels, logits = predictor.predict(image_rgb_uint8)        # (H, W) uint8, (C, H, W) float32

What makes it fast, and what each step does to the numbers:
  torch.inference_mode   no autograd bookkeeping; numerics unchanged.
  fold_frozen_bn         each frozen BatchNorm becomes a per-channel scale and shift of the conv
                         before it, so 104 BN passes over the activations disappear; changes the
                         logits by float rounding only (~1e-6 relative). On by default.
  in-place activations   ReLU and the residual sum overwrite their input instead of allocating a
                         new tensor (InplaceBottleneck); numerics unchanged. Always on.
  channels_last          NHWC activations, which oneDNN (CPU) and cuDNN (GPU) convolutions
                         prefer; numerics unchanged up to summation order. On by default: faster
                         here in fp32 and essential for bf16 (bench/bench_inference.py).
  shifted_aspp           the four dilated 2048 -> 21 ASPP convolutions computed as one 1x1
                         convolution and shifted sums (ShiftedASPP); the same sum in another
                         order. On by default: those thin, widely dilated convolutions were a
                         quarter of the bf16 forward pass.
  precision="bf16"       autocast to bfloat16 (AMX on recent Xeons, tensor cores on CUDA), the
                         conv weights cast once up front; the argmax agrees with fp32 on >= 99.5%
                         of pixels. Opt-in only.

Measured on the 2-core Xeon (AMX) this was written on, MSC at 513x513, idle machine
(bench/bench_inference.py, three runs; paired medians): eager fp32 about 4.5 s per image; the
default fp32 path 1.31-1.33x faster with every pixel's argmax unchanged; bf16 3.2-3.5x faster
(about 1.2-1.3 s per image) with 99.86-99.89% of pixels unchanged on a model with meaningful logits.

The network output is the MSC max-fused logits at 1/8 of the input size; `predict` brings them to
the image size with `logit_cache.full_resolution_logits` (the one place that does this).
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from checkpoint import load_checkpoint, load_model_weights, sha256
from config import DEFAULTS
from model import ASPP, MSC, Bottleneck, ConvBN, DeepLabV2, ResNet, unwrap

PRECISIONS = ("fp32", "bf16")


def select_device(name: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device if there is one, else the CPU; else torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but this machine has no CUDA device. "
                           "Use --device cpu (or auto).")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively: CUDA with bf16, or a CPU oneDNN build with
    bf16 instructions (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available()
                        and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


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

    def __init__(self, aspp: ASPP):
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
    """Replace (in place) the ASPP of the DeepLabV2 inside `net` by its ShiftedASPP."""
    deeplab = unwrap(net)
    deeplab.aspp = ShiftedASPP(deeplab.aspp)
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


def state_dict_digest(net: nn.Module) -> str:
    """sha256 over a state_dict (names, shapes, bytes): the identity of in-memory weights."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def class_names(num_classes: int) -> list[str]:
    """The VOC class names of label values 0..num_classes-1 (the index itself beyond 20)."""
    from labels import VOC_CLASSES
    return [VOC_CLASSES[i] if i < len(VOC_CLASSES) else str(i) for i in range(num_classes)]


def _find_msc(source):
    """The MSC wrapper inside a model (through DDP's `.module`), or None."""
    while isinstance(source, nn.Module):
        if isinstance(source, MSC):
            return source
        source = getattr(source, "module", None)
    return None


def _config_value(ckpt: dict, section: str, key: str):
    cfg = ckpt.get("config") or {}
    return (cfg.get(section) or {}).get(key, DEFAULTS[section][key])


class Predictor:
    """An MSC DeepLab v2 ready for inference.

    model_or_checkpoint: a checkpoint path, a loaded checkpoint dict, or a model (DeepLabV2, MSC,
    or DDP-wrapped; it is copied, never modified). From a checkpoint the network comes from its
    `arch`, the input normalisation from `input_norm` (default "caffe"), and the MSC scales and
    resize convention from its training `config` if it has one, else config.DEFAULTS (the paper:
    scales 1, 0.75, 0.5; Caffe Interp). Explicit `msc_scales` / `interp` / `norm` override these;
    `msc_scales=()` gives single-scale inference.

    Attributes: model (the ready network), device, precision (what actually runs: "bf16" falls
    back to "fp32" with a warning where bf16 is not supported), norm, interp, msc_scales,
    num_classes, checkpoint (the checkpoint's fields except the weights/optimizer, or None),
    identity (sha256 of the checkpoint file, or of the weights).
    A model passed in keeps its own MSC scales and resize convention; a bare DeepLabV2 gets the
    paper's MSC (config.DEFAULTS).
    """

    def __init__(self, model_or_checkpoint, device="auto", precision: str = "fp32",
                 fold_bn: bool = True, channels_last: bool = True, shifted_aspp: bool = True,
                 msc_scales=None, interp=None, norm=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.checkpoint, self.identity, net = self._load(model_or_checkpoint)
        msc = _find_msc(model_or_checkpoint)
        if msc_scales is None:
            msc_scales = (msc.scales if msc is not None else
                          _config_value(self.checkpoint or {}, "model", "msc_scales"))
        if interp is None:
            interp = (msc.interp if msc is not None else
                      _config_value(self.checkpoint or {}, "model", "interp"))
        if norm is None:
            ckpt = self.checkpoint or {}
            norm = ckpt.get("input_norm") or _config_value(ckpt, "data", "norm")
        self.msc_scales, self.interp, self.norm = tuple(msc_scales), interp, norm
        self.num_classes = net.arch["num_classes"]
        self.fold_bn, self.channels_last = fold_bn, channels_last
        self.shifted_aspp = shifted_aspp

        net = fold_frozen_bn(net, inplace=True) if fold_bn else net.eval()
        net = use_inplace_activations(net.requires_grad_(False))
        if shifted_aspp:
            net = use_shifted_aspp(net)
        model = MSC(net, self.msc_scales, interp) if self.msc_scales else net
        model = model.eval().requires_grad_(False).to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

        if precision == "bf16" and not bf16_supported(self.device):
            warnings.warn(f"bf16 is not supported on {self.device} here (no AVX512-BF16/AMX or "
                          "CUDA bf16); running fp32 instead.", RuntimeWarning, stacklevel=2)
            precision = "fp32"
        if precision == "bf16":
            cast_conv_weights(self.model, torch.bfloat16)
        self.precision = precision
        self._transforms = {}

    @staticmethod
    def _load(source):
        """(checkpoint facts without the weights or None, identity, a DeepLabV2 of our own)."""
        if isinstance(source, nn.Module):
            net = unwrap(source)
            return None, "weights:" + state_dict_digest(net), copy.deepcopy(net)
        if isinstance(source, dict):
            ckpt, where, identity = source, "checkpoint", None
        else:
            where = Path(source)
            ckpt, identity = load_checkpoint(where), "sha256:" + sha256(where)
        net = DeepLabV2(**ckpt["arch"])
        load_model_weights(net, ckpt, str(where))
        if identity is None:
            identity = "weights:" + state_dict_digest(net)
        facts = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
        return facts, identity, net

    def settings(self) -> dict:
        """Everything that shapes the logits, e.g. for a logit cache's identity."""
        return dict(identity=self.identity, msc_scales=list(self.msc_scales), interp=self.interp,
                    norm=self.norm, precision=self.precision, fold_bn=self.fold_bn,
                    channels_last=self.channels_last, shifted_aspp=self.shifted_aspp)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Network logits for one normalised image [3, H', W'] (or a batch [N, 3, H', W']):
        FloatTensor (C, h, w) (or (N, C, h, w)) on the CPU, h = (H'-1)//8 + 1."""
        batched = image.dim() == 4
        x = (image if batched else image[None]).to(self.device, torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            y = self.model(x)
        y = y.float().cpu().contiguous()
        return y if batched else y[0]

    def transform(self, mode: str = "voc", pad_to: int = 513):
        from transforms import EvalTransform
        key = (mode, pad_to)
        if key not in self._transforms:
            self._transforms[key] = EvalTransform(mode=mode, pad_to=pad_to, norm=self.norm)
        return self._transforms[key]

    def predict(self, image_rgb: np.ndarray, mode: str = "voc", pad_to: int = 513):
        """Labels and full-resolution logits for one RGB uint8 image (H, W, 3):
        `mode="voc"` pads bottom/right to `pad_to` (the VOC protocol), "full" feeds the image as
        is. Returns (labels (H, W) uint8 numpy array, logits FloatTensor (C, H, W))."""
        from logit_cache import full_resolution_logits
        x, size = self.transform(mode, pad_to)(image_rgb)
        full = full_resolution_logits(self.logits(x), tuple(x.shape[-2:]), tuple(size),
                                      interp=self.interp)
        return full.argmax(0).to(torch.uint8).numpy(), full
