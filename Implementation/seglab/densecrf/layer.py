"""The dense CRF as a network layer (CRF-as-RNN, Zheng et al. ICCV 2015): logits + the raw image
-> refined log-marginals, differentiable in the logits, the kernel weights and the label
compatibility.

    crf = DenseCRFLayer(CRFParams(), learn_weights=True)
    log_q = crf(logits, image)            # (B, C, H, W) log mean-field marginals
    loss = F.nll_loss(log_q, label, ignore_index=255)

The bandwidths (they build the permutohedral lattice) are fixed; each image's lattice is built
in the forward pass (no gradient flows into the image). The mean field is
`torch_crf.mean_field_differentiable` with its iterations checkpointed; the unary is the one
stage two uses, -log max(softmax(logits), 1e-5). `denormalize` recovers the raw RGB image
from a training batch's normalised one (data.transforms.normalize, inverted).

Training through it: `model.crf_layer=true` (training/loss.py `crf_training_loss`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seglab.data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, NORMS
from seglab.densecrf.dense_crf import PROB_CLIP
from seglab.densecrf.params import CRFParams
from seglab.densecrf.torch_crf import differentiable_kernels, mean_field_differentiable


def denormalize(x: Tensor, norm: str) -> Tensor:
    """(B, 3, H, W) images normalised by data.transforms.normalize (`norm`: caffe, imagenet,
    tf) -> (B, H, W, 3) RGB float on the 0..255 scale (the mean-colour padding comes back as
    the mean colour)."""
    if norm not in NORMS:
        raise ValueError(f"unknown input normalisation {norm!r}; use one of {NORMS}")
    x = x.detach().float()
    if norm == "caffe":                 # BGR minus the mean
        rgb = (x + x.new_tensor(CAFFE_MEAN_BGR)[None, :, None, None]).flip(1)
    elif norm == "tf":                  # x / 127.5 - 1
        rgb = (x + 1.0) * 127.5
    else:                               # (x / 255 - mean) / std
        rgb = (x * x.new_tensor(IMAGENET_STD)[None, :, None, None]
               + x.new_tensor(IMAGENET_MEAN)[None, :, None, None]) * 255.0
    return rgb.clamp(0, 255).permute(0, 2, 3, 1).contiguous()


class DenseCRFLayer(nn.Module):
    """The dense CRF's mean field as a layer. `learn_weights`: the kernel weights (as logs)
    and, with `learn_compat`, a full symmetric label compatibility are parameters (Potts
    start unless params.compat is set); otherwise buffers. `params.iterations` updates."""

    def __init__(self, params: CRFParams | None = None, learn_weights: bool = True,
                 learn_compat: bool = False, num_classes: int | None = None,
                 checkpoint: bool = True):
        super().__init__()
        self.params = params or CRFParams()
        if self.params.iterations < 1:
            raise ValueError("DenseCRFLayer needs params.iterations >= 1")
        log_w = torch.tensor([math.log(max(self.params.pos_w, 1e-3)),
                              math.log(max(self.params.bi_w, 1e-3))])
        if learn_weights:
            self.log_weights = nn.Parameter(log_w)
        else:
            self.register_buffer("log_weights", log_w)
        mu = None
        if learn_compat or self.params.compat is not None:
            if num_classes is None and self.params.compat is None:
                raise ValueError("learn_compat needs num_classes (or params.compat)")
            mu = torch.tensor(self.params.compat_matrix(
                num_classes or len(self.params.compat)), dtype=torch.float32)
        if learn_compat:
            self.compat = nn.Parameter(mu)
        else:
            self.register_buffer("compat", mu)
        self.checkpoint = checkpoint

    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def compat_matrix(self) -> Tensor | None:
        return None if self.compat is None else (self.compat + self.compat.t()) / 2

    def learned_params(self) -> CRFParams:
        """The layer's current parameters as CRFParams (for crf.py apply / evaluate.py)."""
        import dataclasses
        pos_w, bi_w = (float(v) for v in self.weights().detach())
        mu = self.compat_matrix()
        return dataclasses.replace(self.params, pos_w=pos_w, bi_w=bi_w, compat=None if mu is None
                                   else mu.detach().double().tolist())

    def forward(self, logits: Tensor, image: Tensor) -> Tensor:
        """logits (B, C, h, w) (bilinearly upsampled here to the image size if smaller),
        image (B, H, W, 3) raw RGB, uint8 or float 0..255 -> log-marginals (B, C, H, W)."""
        if image.dim() != 4 or image.shape[-1] != 3:
            raise ValueError(f"image must be (B, H, W, 3) raw RGB, got {tuple(image.shape)}")
        b, c = logits.shape[:2]
        h, w = image.shape[1:3]
        if tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
        p = self.params
        unary = (-F.log_softmax(logits.float(), 1)).clamp(max=-math.log(PROB_CLIP))
        weights, mu = self.weights().to(logits.device), self.compat_matrix()
        out = []
        for k in range(b):
            with torch.no_grad():
                kernels = differentiable_kernels(image[k].float(), h, w, p.bi_xy_std,
                                                 p.bi_rgb_std, p.pos_xy_std, p.normalization)
            u = unary[k].reshape(c, -1).t()
            log_q = mean_field_differentiable(u, kernels, weights, mu, p.iterations,
                                              checkpoint=self.checkpoint)
            out.append(log_q.t().reshape(c, h, w))
        return torch.stack(out)
