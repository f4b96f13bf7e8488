"""Dense CRF mean-field inference in plain PyTorch: the `--backend torch` of crf.py.

The same model as pydensecrf's `DenseCRF2D` with one Gaussian and one bilateral kernel (Krähenbühl
& Koltun 2011), Potts compatibility and mean-field updates, on any torch device:

    Q <- softmax(-U)
    repeat: Q <- softmax(-U + sum_k w_k * message_k(Q))     (Potts: mu(l, l') = -w_k [l = l'])
    message_k(Q) = normalised Gaussian filtering of Q over the kernel's features
    Gaussian features (x, y) / pos_xy_std;  bilateral (x, y) / bi_xy_std, (r, g, b) / bi_rgb_std

Each kernel's filter is a permutohedral lattice (permutohedral.py), built once per image (the
Gaussian kernel's, which depends on the image size alone, once per size: `gaussian_kernel`). The
normalisation follows pydensecrf, with n = the lattice filtering of ones:
    "after"      message = filter(Q) / n                 (Krähenbühl 2011; DeepLab's CRF binary)
    "symmetric"  message = filter(Q / sqrt(n)) / sqrt(n)  (pydensecrf's default, the 2013 code)
    "before"     message = filter(Q / n);    "none"  message = filter(Q)
The filter includes each pixel itself, as pydensecrf's does; labels agree with pydensecrf's
up to float rounding.

`lattice="fp16"` (the `torch-fp16` backend) keeps the values that move through the lattice in
float16: the filter's passes are bound by moving rows of C floats through memory, so half the
bytes makes them ~1.4x faster here (fbgemm's half-precision embedding bags, fp32 accumulation).
Every pass output is rounded to 11 significant bits, so the labels are no longer exact:
bench/bench_crf_torch.py measures their agreement. Overflow cannot happen: Q <= 1 and every
lattice weight is >= 0, so each pass's output is at most its output for Q = 1, computed in
float32 once per kernel; a power-of-two scale keeps that peak below 2^14 (removed, exactly, where
the message is added to the energies).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from seglab.densecrf.permutohedral import Bags, PermutohedralLattice

NORMALIZATIONS = ("after", "symmetric", "before", "none")
LATTICE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_EXP_SAFE = 64.0        # exp(64) * labels stays far below float32's maximum (3.4e38)
_FP16_PEAK = 2.0 ** 14  # largest lattice value allowed in float16 (its maximum: 65504)


def kernel_features(height: int, width: int, xy_std: float, image: Optional[Tensor] = None,
                    rgb_std: float = 1.0, device=None) -> Tensor:
    """(H*W, 2 or 5) float32 features, pixels row-major, as DenseCRF2D builds them:
    (x, y) / xy_std, then (r, g, b) / rgb_std when an (H, W, 3) image is given."""
    if xy_std <= 0 or (image is not None and rgb_std <= 0):
        raise ValueError(f"kernel standard deviations must be > 0, got xy {xy_std}, rgb {rgb_std}")
    dev = image.device if image is not None else device
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=dev),
                          torch.arange(width, dtype=torch.float32, device=dev), indexing="ij")
    xy = torch.tensor(xy_std, dtype=torch.float32, device=dev)     # the C++ divides by a float
    columns = [x.reshape(-1) / xy, y.reshape(-1) / xy]
    if image is not None:
        rgb = image.reshape(-1, 3).float() / torch.tensor(rgb_std, dtype=torch.float32, device=dev)
        columns += [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
    return torch.stack(columns, 1)


class PairwiseKernel:
    """One Potts-weighted, normalised Gaussian kernel on a permutohedral lattice.

    The per-pixel normalisation and the Potts weight are folded once into the first and the
    last of the lattice's filter passes (`PermutohedralLattice.passes`: splat, blur, slice),
    so `message(Q)` is a few embedding-bag passes.
    `bound` (N,): |weight| * after * filter(before), the largest |message| at each pixel
    (filter(Q) <= filter(1) where 0 <= Q <= 1: the lattice weights are >= 0).
    `lattice` "fp16": the passes run in float16 on values scaled by `scale` (a power of two);
    `message` returns the message times `scale`."""

    def __init__(self, features: Tensor, weight: float, normalization: str,
                 lattice: str = "fp32"):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if lattice not in LATTICE_DTYPES:
            raise ValueError(f"lattice must be one of {tuple(LATTICE_DTYPES)}, got {lattice!r}")
        self.dtype, self.scale = LATTICE_DTYPES[lattice], 1.0
        lattice = PermutohedralLattice(features)
        ones = torch.ones(features.shape[0], 1, dtype=torch.float32, device=features.device)
        norm = lattice.filter(ones)[:, 0]
        norm64 = norm.double()                                  # the C++ normalises in double
        before = after = None
        if normalization == "symmetric":
            before = after = (1.0 / torch.sqrt(norm64 + 1e-20)).float()
        elif normalization == "after":
            after = (1.0 / (norm64 + 1e-20)).float()
        elif normalization == "before":
            before = (1.0 / (norm64 + 1e-20)).float()
        reach = norm if before is None else lattice.filter(before[:, None])[:, 0]
        after = ones[:, 0] * weight if after is None else after * weight
        self.bound = (reach * after).abs()
        self.passes = list(lattice.passes())
        self.passes[0] = self.passes[0].scaled(inputs=before)
        self.passes[-1] = self.passes[-1].scaled(rows=after)
        if self.dtype != torch.float32:
            self._to_half(ones)

    def _to_half(self, ones: Tensor) -> None:
        """Scale the splat by a power of two that keeps every pass's |output| for Q = 1 (the
        largest any Q <= 1 can give) at most _FP16_PEAK, and store the weights in float16."""
        peak, x = 0.0, ones
        for step in self.passes:
            x = step.apply(x)
            peak = max(peak, float(x.abs().max()))
        self.scale = 2.0 ** math.floor(math.log2(_FP16_PEAK / peak)) if peak > 0 else 1.0
        splat = self.passes[0]
        self.passes[0] = Bags(splat.indices, splat.offsets, splat.weights * self.scale)
        self.passes = [Bags(p.indices, p.offsets, p.weights.to(self.dtype)) for p in self.passes]

    def message(self, q: Tensor) -> Tensor:
        """weight * normalised filter of q (N, C) -> (N, C), times `scale`, in the lattice's
        dtype (q already in it saves a conversion)."""
        q = q.to(self.dtype)
        for step in self.passes:
            q = step.apply(q)
        return q


@functools.lru_cache(maxsize=4)
def gaussian_kernel(height: int, width: int, xy_std: float, weight: float, normalization: str,
                    device: torch.device, lattice: str = "fp32") -> PairwiseKernel:
    """The position-only kernel, which depends on the image size alone: built once per size
    and kept for the last 4 sizes (~30 MB each at 500x375; about a third of VOC's images are
    500x375, W x H). `gaussian_kernel.cache_clear()` empties the cache."""
    features = kernel_features(height, width, xy_std, device=device)
    return PairwiseKernel(features, weight, normalization, lattice)


def _as_tensor(x, name: str, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _check(img: Tensor, u: Tensor, iterations: int, normalization: str, lattice: str) -> None:
    if img.dim() != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {tuple(img.shape)} {img.dtype}")
    if u.dim() != 3 or tuple(u.shape[1:]) != tuple(img.shape[:2]) or u.shape[0] == 0:
        raise ValueError(f"unary must be (C, H, W) with (H, W) = the image's {tuple(img.shape[:2])}, "
                         f"got {tuple(u.shape)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if lattice not in LATTICE_DTYPES:
        raise ValueError(f"lattice must be one of {tuple(LATTICE_DTYPES)}, got {lattice!r}")


def dense_crf(image, unary, iterations: int = 10, bi_w: float = 4.0, bi_xy_std: float = 67.0,
              bi_rgb_std: float = 3.0, pos_w: float = 3.0, pos_xy_std: float = 1.0,
              normalization: str = "after", device="cpu",
              callback: Optional[Callable[[int, Tensor], None]] = None, lattice: str = "fp32"):
    """Mean-field marginals Q (C, H, W) of the dense CRF after `iterations` updates.

    image: (H, W, 3) uint8 RGB; unary: (C, H, W) float energies (-log probabilities), the
    layout pydensecrf's `setUnaryEnergy` takes after reshaping to (C, H*W). Numpy in ->
    float32 numpy out, equal to `np.array(d.inference(iterations)).reshape(C, H, W)` of
    pydensecrf up to float rounding; a tensor unary -> a tensor on its device (`device` is
    then ignored). callback(iteration, Q (C, H, W) tensor), if given, sees the initial
    softmax(-U) as iteration 0 and Q after every update 1..iterations (e.g. for figures).
    lattice: "fp32" (exact) or "fp16" (faster, labels not exact: see the module docstring).
    """
    as_numpy = not isinstance(unary, Tensor)
    dev = torch.device(device) if as_numpy else unary.device
    img = _as_tensor(image, "image", dev)
    u = _as_tensor(unary, "unary", dev)
    _check(img, u, iterations, normalization, lattice)
    c, h, w = u.shape
    kernels = []                                   # a zero weight adds nothing: skip it
    with torch.no_grad():
        if pos_w != 0:
            kernels.append(gaussian_kernel(h, w, float(pos_xy_std), float(pos_w), normalization,
                                           torch.device(dev), lattice))
        if bi_w != 0:
            features = kernel_features(h, w, bi_xy_std, img, bi_rgb_std)
            kernels.append(PairwiseKernel(features, bi_w, normalization, lattice))
        q = _mean_field(u.float().reshape(c, h * w), kernels, iterations, callback, (c, h, w))
    q = q.t().reshape(c, h, w).contiguous()
    return q.cpu().numpy() if as_numpy else q


def _mean_field(unary: Tensor, kernels, iterations: int, callback, shape) -> Tensor:
    """Q (N, C) after `iterations` updates from unary (C, N).

    Softmax as exp(energy - shift) / sum with a per-pixel shift fixed once, max(-U): safe
    while no message can reach +-_EXP_SAFE (the kernels' `bound`); else torch.softmax."""
    shifted = unary.amin(0, keepdim=True) - unary                     # -U - max(-U), exactly
    neg_unary = shifted.new_empty(unary.shape[::-1]).copy_(shifted.t())   # (N, C)
    bound = sum((k.bound for k in kernels), torch.zeros_like(neg_unary[:, 0]))
    fast_softmax = bool(bound.max() < _EXP_SAFE)

    def normalise(energy: Tensor) -> Tensor:
        if not fast_softmax:
            return torch.softmax(energy, 1)
        energy = energy.exp_()
        return energy.div_(energy.sum(1, keepdim=True))

    q = normalise(neg_unary.clone())
    if callback is not None:
        callback(0, q.t().reshape(shape))
    dtype = kernels[0].dtype if kernels else torch.float32
    for it in range(1, iterations + 1):
        energy, q_in = neg_unary, q.to(dtype)      # -U + messages, in the C++'s order
        for kernel in kernels:                     # (the first sum makes a fresh buffer)
            message, unscale = kernel.message(q_in), 1.0 / kernel.scale
            energy = (torch.add(energy, message, alpha=unscale) if energy is neg_unary
                      else energy.add_(message, alpha=unscale))
        q = normalise(neg_unary.clone() if energy is neg_unary else energy)
        if callback is not None:
            callback(it, q.t().reshape(shape))
    return q
