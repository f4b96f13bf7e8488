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

Label compatibility: `compat` (C, C) symmetric mu in place of Potts, energy -U - sum_k w_k
message_k @ mu (Potts = 1 - identity, the same up to a per-pixel constant); None = Potts as above.

Gradients: `dense_crf` runs under no_grad. `mean_field_differentiable` runs the same updates with
autograd, for fitting the weights and the compatibility (learn.py) and for the CRF as a layer
(layer.py): each lattice filter is a `_LatticeFilter` autograd function whose backward is the
transposed filter (the passes transposed, built once per kernel: `DifferentiableKernel`), so
no pass saves anything for backward; `checkpoint=True` also recomputes each iteration's softmax
in the backward pass, keeping one (N, C) tensor per iteration.

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

from seglab.densecrf.features import NORMALIZATIONS, kernel_features  # noqa: F401
from seglab.densecrf.permutohedral import Bags, PermutohedralLattice

LATTICE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_EXP_SAFE = 64.0        # exp(64) * labels stays far below float32's maximum (3.4e38)
_FP16_PEAK = 2.0 ** 14  # largest lattice value allowed in float16 (its maximum: 65504)


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
    if lattice not in LATTICE_DTYPES and lattice != "numba":
        raise ValueError(f"lattice must be one of {(*LATTICE_DTYPES, 'numba')}, got {lattice!r}")


def dense_crf(image, unary, iterations: int = 10, bi_w: float = 4.0, bi_xy_std: float = 67.0,
              bi_rgb_std: float = 3.0, pos_w: float = 3.0, pos_xy_std: float = 1.0,
              normalization: str = "after", device="cpu",
              callback: Optional[Callable[[int, Tensor], None]] = None, lattice: str = "fp32",
              compat=None):
    """Mean-field marginals Q (C, H, W) of the dense CRF after `iterations` updates.

    image: (H, W, 3) uint8 RGB; unary: (C, H, W) float energies (-log probabilities), the
    layout pydensecrf's `setUnaryEnergy` takes after reshaping to (C, H*W). Numpy in ->
    float32 numpy out, equal to `np.array(d.inference(iterations)).reshape(C, H, W)` of
    pydensecrf up to float rounding; a tensor unary -> a tensor on its device (`device` is
    then ignored). callback(iteration, Q (C, H, W) tensor), if given, sees the initial
    softmax(-U) as iteration 0 and Q after every update 1..iterations (e.g. for figures).
    lattice: "fp32" (exact) or "fp16" (faster, labels not exact: see the module docstring),
    or "numba": the compiled lattice with the mean field fused around it (CPU, exact;
    permutohedral_numba.py).
    compat: None (Potts) or a (C, C) symmetric label compatibility (array or tensor).
    """
    as_numpy = not isinstance(unary, Tensor)
    dev = torch.device(device) if as_numpy else unary.device
    img = _as_tensor(image, "image", dev)
    u = _as_tensor(unary, "unary", dev)
    _check(img, u, iterations, normalization, lattice)
    c, h, w = u.shape
    if lattice == "numba":                         # the compiled lattice (permutohedral_numba.py)
        from seglab.densecrf import permutohedral_numba
        q = permutohedral_numba.dense_crf(img, u, iterations, bi_w, bi_xy_std, bi_rgb_std, pos_w,
                                          pos_xy_std, normalization, callback, compat)
        return q.numpy() if as_numpy else q
    kernels = []                                   # a zero weight adds nothing: skip it
    with torch.no_grad():
        if pos_w != 0:
            kernels.append(gaussian_kernel(h, w, float(pos_xy_std), float(pos_w), normalization,
                                           torch.device(dev), lattice))
        if bi_w != 0:
            features = kernel_features(h, w, bi_xy_std, img, bi_rgb_std)
            kernels.append(PairwiseKernel(features, bi_w, normalization, lattice))
        mu = None if compat is None else _compat_tensor(compat, c, dev)
        q = _mean_field(u.float().reshape(c, h * w), kernels, iterations, callback, (c, h, w), mu)
    q = q.t().reshape(c, h, w).contiguous()
    return q.cpu().numpy() if as_numpy else q


def _compat_tensor(compat, num_classes: int, device) -> Tensor:
    mu = torch.as_tensor(np.asarray(compat, dtype=np.float32) if not isinstance(compat, Tensor)
                         else compat, dtype=torch.float32, device=device)
    if tuple(mu.shape) != (num_classes, num_classes):
        raise ValueError(f"compat must be ({num_classes}, {num_classes}) for {num_classes} labels, "
                         f"got {tuple(mu.shape)}")
    return mu


def _mean_field(unary: Tensor, kernels, iterations: int, callback, shape,
                compat: Optional[Tensor] = None) -> Tensor:
    """Q (N, C) after `iterations` updates from unary (C, N).

    Softmax as exp(energy - shift) / sum with a per-pixel shift fixed once, max(-U): safe
    while no message can reach +-_EXP_SAFE (the kernels' `bound`); else torch.softmax.
    compat (C, C): energy -U - (sum of messages) @ compat instead of Potts' -U + messages."""
    shifted = unary.amin(0, keepdim=True) - unary                     # -U - max(-U), exactly
    neg_unary = shifted.new_empty(unary.shape[::-1]).copy_(shifted.t())   # (N, C)
    bound = sum((k.bound for k in kernels), torch.zeros_like(neg_unary[:, 0]))
    if compat is not None:                 # |m @ mu| <= max |m| * (largest column sum of |mu|)
        bound = bound * float(compat.abs().sum(0).max())
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
        if compat is not None:
            total = sum(k.message(q.to(dtype)).float() / k.scale for k in kernels)
            q = normalise(neg_unary - total @ compat if kernels else neg_unary.clone())
            if callback is not None:
                callback(it, q.t().reshape(shape))
            continue
        energy, q_in = neg_unary, q.to(dtype)      # -U + messages, in the C++'s order
        for kernel in kernels:                     # (the first sum makes a fresh buffer)
            message, unscale = kernel.message(q_in), 1.0 / kernel.scale
            energy = (torch.add(energy, message, alpha=unscale) if energy is neg_unary
                      else energy.add_(message, alpha=unscale))
        q = normalise(neg_unary.clone() if energy is neg_unary else energy)
        if callback is not None:
            callback(it, q.t().reshape(shape))
    return q


# ---------------------------------------------------------------------------------- gradients
def transpose_bags(bags: Bags, num_inputs: int) -> Bags:
    """The transposed map of `bags` (num_rows x num_inputs): (num_rows, C) -> (num_inputs, C)."""
    counts = torch.diff(bags.offsets.long())
    rows = torch.repeat_interleave(torch.arange(bags.num_rows, device=counts.device), counts,
                                   output_size=bags.indices.numel())
    cols = bags.indices.long()
    order = torch.argsort(cols, stable=True)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(
        torch.bincount(cols, minlength=num_inputs), 0)])
    itype = bags.indices.dtype
    return Bags(rows.index_select(0, order).to(itype), offsets.to(itype),
                bags.weights.index_select(0, order))


class DifferentiableKernel:
    """A normalised Gaussian kernel of unit weight (the weight is applied outside, so that it
    can be learned), with its transposed passes for the backward pass. dtype float32 or
    float64 (for gradient checks). `build_transpose=False` for a kernel only run forward."""

    def __init__(self, features: Tensor, normalization: str, dtype=torch.float32,
                 build_transpose: bool = True):
        kernel = PairwiseKernel(features, 1.0, normalization, "fp32")
        self.dtype, self.num_points = dtype, features.shape[0]
        self.passes = [Bags(p.indices, p.offsets, p.weights.to(dtype)) for p in kernel.passes]
        self.transposed = None
        if build_transpose:
            sizes = [self.num_points] + [p.num_rows for p in self.passes[:-1]]
            self.transposed = [transpose_bags(p, n) for p, n in
                               zip(reversed(self.passes), reversed(sizes))]

    def filter(self, q: Tensor) -> Tensor:
        """message (N, C) of q (N, C), differentiable in q."""
        return _LatticeFilter.apply(q, self)


class _LatticeFilter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kernel):
        ctx.kernel = kernel
        out = q.to(kernel.dtype).contiguous()
        for step in kernel.passes:
            out = step.apply(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        kernel = ctx.kernel
        if kernel.transposed is None:
            raise RuntimeError("this DifferentiableKernel was built without its transpose")
        out = grad.to(kernel.dtype).contiguous()
        for step in kernel.transposed:
            out = step.apply(out)
        return out, None


def differentiable_kernels(image: Tensor, height: int, width: int, bi_xy_std: float,
                           bi_rgb_std: float, pos_xy_std: float, normalization: str = "after",
                           dtype=torch.float32, build_transpose: bool = True):
    """[Gaussian kernel, bilateral kernel] of one (H, W, 3) image (uint8 or float 0..255)."""
    dev = image.device
    pos = DifferentiableKernel(kernel_features(height, width, pos_xy_std, device=dev),
                               normalization, dtype, build_transpose)
    bi = DifferentiableKernel(kernel_features(height, width, bi_xy_std, image, bi_rgb_std),
                              normalization, dtype, build_transpose)
    return [pos, bi]


def mean_field_differentiable(unary: Tensor, kernels, weights: Tensor,
                              compat: Optional[Tensor] = None, iterations: int = 10,
                              checkpoint: bool = False) -> Tensor:
    """Log mean-field marginals log Q (N, C) after `iterations` updates, with autograd.

    unary (N, C) energies (-log probabilities; may require grad, e.g. a network's output);
    kernels: DifferentiableKernel list; weights (K,): each kernel's weight; compat (C, C) or
    None (Potts). The same updates as `dense_crf` (equal to its Q up to float rounding).
    checkpoint: recompute each iteration in the backward pass (memory: one (N, C) per
    iteration instead of several)."""
    neg_unary = -unary

    def step(log_q: Tensor) -> Tensor:
        q = log_q.exp()
        total = sum(w * k.filter(q) for w, k in zip(weights, kernels))
        energy = neg_unary + total if compat is None else neg_unary - total @ compat
        return torch.log_softmax(energy, 1)

    log_q = torch.log_softmax(neg_unary, 1)
    for _ in range(iterations):
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as run_checkpointed
            log_q = run_checkpointed(step, log_q, use_reentrant=False)
        else:
            log_q = step(log_q)
    return log_q
