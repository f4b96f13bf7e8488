"""The fully connected CRF (Krähenbühl & Koltun 2011) on one image.

  unary_from_logits  -log softmax of full-resolution logits (probabilities clipped at 1e-5)
  DenseCRF           raw RGB uint8 image + logits -> mean-field marginals Q (C, H, W), with
                     pydensecrf (C++) or the pure-PyTorch lattice of torch_crf.py
  load_crf_inputs    image file + cached logits file -> (image, unary), checked against each other

The image is the raw RGB uint8 image (never a mean-subtracted one).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from seglab.data.images import load_image
from seglab.data.protocols import protocol_image
from seglab.densecrf import torch_crf
from seglab.densecrf.params import BACKENDS, NORMALIZATIONS, CRFParams, is_torch_backend
from seglab.data.logit_cache import load_logits
from seglab.models.resize import full_resolution_logits

PROB_CLIP = 1e-5


def import_pydensecrf():
    """The pydensecrf module, or None when it is not installed."""
    try:
        import pydensecrf.densecrf as dcrf  # optional: the torch backend needs no build
    except ImportError:
        return None
    return dcrf


_NOTED: set = set()


def resolve_backend(backend: str) -> str:
    """`backend`, or "torch" when pydensecrf or numba is asked for but not installed (with a
    one-line note, once per process): the pure-PyTorch lattice gives the same labels
    (torch_crf.py)."""
    if backend not in BACKENDS:
        raise ValueError(f"CRF backend must be one of {BACKENDS}, got {backend!r}")
    missing = {"pydensecrf": ("pydensecrf2", lambda: import_pydensecrf() is not None),
               "numba": ("numba", _numba_available)}.get(backend)
    if missing is None or missing[1]():
        return backend
    if backend not in _NOTED:
        _NOTED.add(backend)
        print(f"note: {backend} is not installed (`pip install {missing[0]}` provides it); "
              "using the pure-PyTorch CRF (crf.backend=torch), which gives the same labels",
              file=sys.stderr)
    return "torch"


def _numba_available() -> bool:
    """Whether the compiled lattice (crf.backend=numba, permutohedral_numba.py) can run."""
    from seglab.densecrf import permutohedral_numba
    return permutohedral_numba.AVAILABLE


def unary_from_logits(logits) -> np.ndarray:
    """Unary energies -log(max(softmax(logits), 1e-5)) as float32 C-contiguous (C, H*W)."""
    logits = torch.as_tensor(logits).detach().cpu().float()
    if logits.dim() != 3:
        raise ValueError(f"logits must be (C, H, W), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError(f"the logits hold {int((~torch.isfinite(logits)).sum())} NaN/Inf values; "
                         "the CRF refuses them rather than return a wrong result")
    prob = torch.softmax(logits, dim=0).clamp_min_(PROB_CLIP)
    return np.ascontiguousarray(-torch.log(prob).reshape(logits.shape[0], -1).numpy(),
                                dtype=np.float32)


def _softmax_of_negative(unary: np.ndarray) -> np.ndarray:
    """softmax(-unary) over labels: the mean-field start, and the result of 0 iterations."""
    e = np.exp(unary.min(0, keepdims=True) - unary)
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


class DenseCRF:
    """The fully connected CRF on one image. `backend="pydensecrf"` (C++) or "torch" (the
    pure-PyTorch permutohedral lattice of torch_crf.py, CPU or `device="cuda"`), or "numba"
    (the compiled lattice of permutohedral_numba.py, CPU)."""

    def __init__(self, params: CRFParams | None = None, backend: str = "pydensecrf",
                 device: str = "cpu"):
        backend = resolve_backend(backend)
        self.params, self.backend, self.device = params or CRFParams(), backend, device
        if backend == "pydensecrf":
            self._dcrf = import_pydensecrf()

    def __call__(self, image: np.ndarray, logits) -> np.ndarray:
        """image (H, W, 3) uint8 RGB, logits (C, H, W) at full resolution -> Q float32
        (C, H, W); the labels are Q.argmax(0)."""
        shape = tuple(torch.as_tensor(logits).shape)
        self._check_image(image, shape)
        return self.infer(image, unary_from_logits(logits)).reshape(shape)

    @staticmethod
    def _check_image(image, logits_shape):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            what = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"the CRF image must be a (H, W, 3) uint8 RGB array (the raw image, "
                             f"not a normalised tensor), got {what}")
        if len(logits_shape) != 3 or tuple(image.shape[:2]) != tuple(logits_shape[1:]):
            raise ValueError(f"the image is {image.shape[0]}x{image.shape[1]} but the logits are "
                             f"{logits_shape}: upsample the logits to the image size first "
                             "(logit_cache.full_resolution_logits)")

    def infer(self, image: np.ndarray, unary: np.ndarray) -> np.ndarray:
        """Mean-field marginals (C, H*W) from unary energies (C, H*W) (`unary_from_logits`)."""
        h, w = image.shape[:2]
        c = unary.shape[0]
        self._check_image(image, (c, h, w))
        if unary.shape != (c, h * w):
            raise ValueError(f"unary must be (C, H*W) = ({c}, {h * w}), got {unary.shape}")
        p = self.params
        if p.iterations == 0:
            return _softmax_of_negative(unary)
        if is_torch_backend(self.backend) or self.backend == "numba":   # numba: CPU only
            q = torch_crf.dense_crf(image, unary.reshape(c, h, w), iterations=p.iterations,
                                    bi_w=p.bi_w, bi_xy_std=p.bi_xy_std, bi_rgb_std=p.bi_rgb_std,
                                    pos_w=p.pos_w, pos_xy_std=p.pos_xy_std,
                                    normalization=p.normalization,
                                    device="cpu" if self.backend == "numba" else self.device,
                                    lattice={"torch-fp16": "fp16", "numba": "numba"}.get(
                                        self.backend, "fp32"),
                                    **compat_kwargs(p, c))
            return np.asarray(q, dtype=np.float32).reshape(c, h * w)
        dcrf = self._dcrf
        norm = getattr(dcrf, NORMALIZATIONS[p.normalization])
        d = dcrf.DenseCRF2D(w, h, c)  # width first
        d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        pos_compat, bi_compat = p.pos_w, p.bi_w
        if p.compat is not None:  # pydensecrf's MatrixCompatibility M: energy -U - M @ message
            mu = p.compat_matrix(c)
            pos_compat, bi_compat = [np.ascontiguousarray(w * mu, dtype=np.float32)
                                     for w in (p.pos_w, p.bi_w)]
        d.addPairwiseGaussian(sxy=p.pos_xy_std, compat=pos_compat, normalization=norm)
        d.addPairwiseBilateral(sxy=p.bi_xy_std, srgb=p.bi_rgb_std,
                               rgbim=np.ascontiguousarray(image), compat=bi_compat,
                               normalization=norm)
        return np.array(d.inference(p.iterations), dtype=np.float32)


def compat_kwargs(params: CRFParams, num_classes: int) -> dict:
    """{} for Potts (the unchanged call), else {"compat": the (C, C) matrix}."""
    return {} if params.compat is None else {"compat": params.compat_matrix(num_classes)}


def load_crf_inputs(image_path, logits_path, interp: str = "caffe", mode: str = "voc"):
    """(image (H, W, 3) uint8, unary (C, H*W) float32) for one image and its cached logits;
    `mode`: the evaluation protocol that made them (a resizing one resizes the image too)."""
    image = protocol_image(mode, load_image(image_path))
    logits, input_size, size = load_logits(logits_path)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(f"the cached logits {logits_path} hold {bad} NaN/Inf values: the CRF "
                         "would turn them into a wrong result. Recompute them with evaluate.py "
                         "(--recompute), or check the network that wrote them.")
    if tuple(image.shape[:2]) != tuple(size):
        raise ValueError(f"image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but "
                         f"the cached logits {logits_path} are for a {size[0]}x{size[1]} image: "
                         "the cache belongs to other images; recompute it with evaluate.py")
    return image, unary_from_logits(full_resolution_logits(logits, input_size, size, interp))
