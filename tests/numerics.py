"""Bounds for comparing two float computations of one function, valid on every CPU family.

Two float32 evaluations of the same function that differ only in the order of their operations
(BatchNorm folded into the convolution, NHWC instead of NCHW, the shifted-sum ASPP, ONNX Runtime
instead of PyTorch, another oneDNN kernel on another CPU) differ by rounding, and rounding is
proportional to the magnitude of the terms summed, not to each output element: an output near
zero carries the absolute error of the large terms that cancelled in it. So a fixed absolute
tolerance on raw logits is no bound at all (a random ResNet-50's logits reach 800; a tiny
network's stay below 1), and a per-element relative one fails on every near-zero element. The
bound here is relative to the *scale* of the output, its largest |value|:

    |got - want| <= rel * max|want|          (assert_close_to_scale)

`rel` is a multiple of float32's machine epsilon (2^-23 = 1.19e-7) sized to the depth of the
computation: one layer, one reduction of K terms, differs by a few sqrt(K) ulps of the scale
(ONE_OP = 64 ulps); a deep network in another order by about 1e-6 of its scale (measured on an
Intel Xeon with AMX for the BN-folded Predictor of three torchvision / VainF networks: 4e-7 ..
2e-6; the test that first failed differed by 1.5e-6), so DEEP = 1e-4 leaves a 50x margin while a
real mistake (a wrong fold, a shifted tap, a missing bias) moves the outputs by a sizeable part
of their scale. The suite passes with these bounds under ONEDNN_MAX_CPU_ISA=AVX2 and
ATEN_CPU_CAPABILITY=default too.

Labels are compared the way the export check does (seglab/deploy/onnx_export.py): every pixel
must keep its label except where the reference's two best scores are closer than twice the
allowed error, since rounding may legitimately flip such a near-tie (assert_labels_agree).
"""
from __future__ import annotations

import numpy as np
import torch

EPS32 = 2.0 ** -23
ONE_OP = 64 * EPS32     # one layer / one reduction: a few sqrt(K) ulps of the scale
DEEP = 1e-4             # a whole network evaluated in another order (50x the largest measured)


def _as_tensor(x) -> torch.Tensor:
    return x.detach().double().cpu() if isinstance(x, torch.Tensor) else \
        torch.as_tensor(np.asarray(x, dtype=np.float64))


def scale(x) -> float:
    """The largest |value| of a tensor or array (the unit of its rounding error)."""
    return float(_as_tensor(x).abs().max())


def assert_close_to_scale(got, want, rel: float = DEEP, what: str = "outputs") -> None:
    """|got - want| <= rel * max|want| everywhere, shapes equal."""
    g, w = _as_tensor(got), _as_tensor(want)
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert torch.isfinite(g).all(), f"{what}: non-finite values"
    bound = rel * float(w.abs().max())
    err = float((g - w).abs().max()) if g.numel() else 0.0
    assert err <= bound, (f"{what}: max |difference| {err:.3g} exceeds {rel:.3g} x scale "
                          f"{bound / rel if rel else 0:.3g} = {bound:.3g}")


def near_tie(scores, margin: float, dim: int = 0) -> torch.Tensor:
    """Where the two best scores along `dim` are within `margin` of each other."""
    s = _as_tensor(scores)
    if s.shape[dim] < 2:
        return torch.zeros(s.select(dim, 0).shape, dtype=torch.bool)
    top2 = s.topk(2, dim=dim).values
    return (top2.select(dim, 0) - top2.select(dim, 1)) <= margin


def assert_labels_agree(got_scores, want_scores, rel: float = DEEP, dim: int = 0,
                        what: str = "labels") -> None:
    """argmax(got) == argmax(want) at every position whose top-2 gap in `want` exceeds twice the
    rounding bound rel * scale(want): rounding cannot move a label there."""
    g, w = _as_tensor(got_scores), _as_tensor(want_scores)
    tie = near_tie(w, 2 * rel * float(w.abs().max()), dim)
    differ = (g.argmax(dim) != w.argmax(dim)) & ~tie
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {differ.numel()} labels differ "
                              f"where the reference is not a near-tie")
