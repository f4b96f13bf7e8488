"""Turning a checkpoint into a fast predictor (used by evaluate.py, infer.py, export.py, bench/).

    predictor = Predictor("runs/voc12/final.pth")              # its recipe: MSC, VOC protocol
    labels, logits = predictor.predict(image_rgb_uint8)        # (H, W) uint8, (C, H, W) float32
    predictor.classes, predictor.palette                       # what the labels mean, their colours

The network is run with the recipe its checkpoint states (seglab/recipe.py: scales, fusion,
resizing, protocol, input normalisation), unless the caller gives a setting explicitly.

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

from seglab.checkpoint import label_set, load_checkpoint, load_model_weights, sha256
from seglab.device import bf16_supported, select_device
from seglab.models.rewrites import cast_conv_weights
from seglab.models import architecture, build_model, unwrap
from seglab.models.msc import MSC
from seglab.models.resize import full_resolution_logits
from seglab.data.transforms import EvalTransform
from seglab.recipe import describe, resolve_recipe

PRECISIONS = ("fp32", "bf16")


def state_dict_digest(net: nn.Module) -> str:
    """sha256 over a state_dict (names, shapes, bytes): the identity of in-memory weights."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _find_msc(source):
    """The MSC wrapper inside a model (through DDP's `.module`), or None."""
    while isinstance(source, nn.Module):
        if isinstance(source, MSC):
            return source
        source = getattr(source, "module", None)
    return None


class FlipMax(nn.Module):
    """The model on the image and on its left-right mirror (mirrored back), fused by the same
    element-wise max as MSC: `eval.flip`, a test-time augmentation the paper does not use."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.max(self.model(x), self.model(x.flip(-1)).flip(-1))


class Predictor:
    """Any network behind the model seam, ready for inference with its recipe.

    model_or_checkpoint: a checkpoint path, a loaded checkpoint dict, or a model (bare, MSC, or
    DDP-wrapped; it is copied, never modified). The network comes from the checkpoint's `arch`;
    the recipe (msc_scales, msc_fusion, interp, mode, pad_to, norm) is resolved by
    seglab/recipe.py: the arguments given here (not None), then the checkpoint's recipe, then the
    architecture's (DeepLab v2: MSC 0.75, 0.5 max-fused), then DeepLab v2's. A model passed in
    keeps the scales, fusion and resizing of its MSC wrapper. `msc_scales=()` gives single-scale
    inference.

    Attributes: model (the ready network), device, precision (what actually runs: "bf16" falls
    back to "fp32" with a warning where bf16 is not supported), recipe and recipe_sources (each
    setting and where it came from; also as norm, interp, msc_scales, msc_fusion, mode, pad_to),
    num_classes, classes and palette (names and RGB colours of the classes, from the checkpoint;
    VOC's where it states none), checkpoint (the checkpoint's fields except the weights and
    optimizer, or None), identity (sha256 of the checkpoint file, or of the weights).
    """

    def __init__(self, model_or_checkpoint, device="auto", precision: str = "fp32",
                 fold_bn: bool = True, channels_last: bool = True, shifted_aspp: bool = True,
                 msc_scales=None, interp=None, norm=None, flip: bool = False,
                 msc_fusion=None, mode=None, pad_to=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.checkpoint, self.identity, net = self._load(model_or_checkpoint)
        explicit = {k: v for k, v in dict(msc_scales=msc_scales, interp=interp, norm=norm,
                                          msc_fusion=msc_fusion, mode=mode,
                                          pad_to=pad_to).items() if v is not None}
        msc = _find_msc(model_or_checkpoint)
        if msc is not None:  # a model passed in runs as it is wrapped
            for key, value in (("msc_scales", msc.scales), ("interp", msc.interp),
                               ("msc_fusion", msc.fusion)):
                explicit.setdefault(key, value)
        self.recipe, self.recipe_sources = resolve_recipe(explicit, self.checkpoint, net.arch)
        r = self.recipe
        self.msc_scales, self.interp, self.norm = tuple(r["msc_scales"]), r["interp"], r["norm"]
        self.mode, self.pad_to, msc_fusion = r["mode"], r["pad_to"], r["msc_fusion"]
        self.num_classes = net.arch["num_classes"]
        self.classes, self.palette = label_set(self.checkpoint, self.num_classes)
        self.output_stride = architecture(net.arch).output_stride(net.arch)
        self.fold_bn, self.channels_last = fold_bn, channels_last
        self.shifted_aspp = shifted_aspp

        spec = architecture(net.arch)
        if spec.prepare_inference is not None:
            net = spec.prepare_inference(net, fold_bn=fold_bn, shifted_aspp=shifted_aspp)
        self.msc_fusion = msc_fusion
        model = MSC(net, self.msc_scales, self.interp, msc_fusion) if self.msc_scales else net
        self.flip = bool(flip)
        if self.flip:
            model = FlipMax(model)
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
        net = build_model(ckpt["arch"])
        load_model_weights(net, ckpt, str(where))
        if identity is None:
            identity = "weights:" + state_dict_digest(net)
        facts = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}
        return facts, identity, net

    def describe(self) -> str:
        """The recipe in one line, with where each setting came from."""
        return describe(self.recipe, self.recipe_sources)

    def settings(self) -> dict:
        """Everything that shapes the logits, e.g. for a logit cache's identity."""
        return dict(identity=self.identity, msc_scales=list(self.msc_scales), interp=self.interp,
                    norm=self.norm, precision=self.precision, fold_bn=self.fold_bn,
                    channels_last=self.channels_last, shifted_aspp=self.shifted_aspp,
                    flip=self.flip, msc_fusion=self.msc_fusion)

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

    def transform(self, mode: str | None = None, pad_to: int | None = None):
        mode, pad_to = mode or self.mode, pad_to or self.pad_to
        key = (mode, pad_to)
        if key not in self._transforms:
            self._transforms[key] = EvalTransform(mode=mode, pad_to=pad_to, norm=self.norm,
                                                  stride=self.output_stride)
        return self._transforms[key]

    def refine(self, image_rgb: np.ndarray, logits, params=None,
               backend: str = "pydensecrf") -> np.ndarray:
        """The dense CRF's labels (H, W) uint8 for an image and the full-resolution logits
        `predict` returned; `params` a CRFParams (default: the paper's) or a parameter JSON
        (crf.py search / learn), `backend` as crf.backend (the torch ones run on this device)."""
        from seglab.densecrf.dense_crf import DenseCRF
        from seglab.densecrf.params import CRFParams, is_torch_backend
        if params is not None and not isinstance(params, CRFParams):
            params = CRFParams.from_json(params)
        device = str(self.device) if is_torch_backend(backend) else "cpu"
        image = np.array(image_rgb, dtype=np.uint8, order="C")  # writable (pydensecrf needs it)
        q = DenseCRF(params, backend=backend, device=device)(image, logits)
        return q.argmax(0).astype(np.uint8)

    def predict(self, image_rgb: np.ndarray, mode: str | None = None, pad_to: int | None = None):
        """Labels and full-resolution logits for one RGB uint8 image (H, W, 3), with the
        recipe's protocol unless given: `mode="voc"` pads bottom/right to `pad_to`, "full" feeds
        the image as is (seglab/data/protocols.py has the others). Returns (labels (H, W) uint8
        numpy array, logits FloatTensor (C, H, W))."""
        x, size = self.transform(mode, pad_to).prepare(image_rgb)
        full = full_resolution_logits(self.logits(x), tuple(x.shape[-2:]), tuple(size),
                                      interp=self.interp)
        return full.argmax(0).to(torch.uint8).numpy(), full
