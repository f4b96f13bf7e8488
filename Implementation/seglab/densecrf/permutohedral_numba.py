"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) compiled with numba, and the
dense CRF's mean field (Krähenbühl & Koltun, NIPS 2011) fused around it: the `numba` backend.

Why hand-written. `permutohedral.py` expresses splat, blur and slice as whole-tensor
`embedding_bag` gathers, one pass per step, each writing a fresh (rows, C) tensor, and its mean
field adds whole passes over (N, C) tensors (messages, energies, exp, sums); no library offers
the lattice. Here each step is a loop compiled for this CPU with the C labels of a row
contiguous (the inner, vectorised dimension; rows padded to whole 8-float vectors), and what
the tensor ops cannot fuse is fused. The parts, one job a file:

* construction, all in compiled loops: `numba_lattice.py` (the enclosing simplices, the
  vertices numbered in the C++ hash table's first-use order, the blur neighbours);
* blur, the plain filter and the software prefetch: `numba_filter.py` (the d+1 passes in one
  cache-resident sweep where the lattice allows it, else one after another);
* here: slice + mean-field update + splat, one loop over the pixels: slice both kernels'
  blurred lattices at the pixel (barycentric weight x alpha x normalisation x Potts weight,
  folded into one weight), add -U, exp and normalise (`_exp`: a float32 exp that vectorises;
  numba's calls libm per value), and splat the new Q row straight into both lattices for the
  next iteration. A vertex's first splat in pixel order is its first use, so the splat
  overwrites the stale row there instead of adding, and no lattice is ever zeroed. The
  message, energy and Q tensors of the tensor-op mean field are never written; only the final
  Q is. The colour lattice's rows are prefetched a few pixels ahead. With the Python side:
  `NumbaLattice`, `NumbaKernel`, `mean_field`, `dense_crf`.

Arithmetic follows Krähenbühl's `permutohedral.cpp` (the float32 elevation, rounding, rank and
barycentric weights, the splat order, the blur kernel [1/2, 1, 1/2], alpha = 1 / (1 + 2^-d)),
so the lattice is the tensor-op one bit for bit, filtered values agree to float rounding and
the labels equal pydensecrf's up to float ties (tests/test_crf_numba.py). Two threads (the
torch thread count decides): the blur passes over vertex blocks, the pixel loop over pixel
blocks, each block splatting into its own lattice, summed before the blur (`numba.prange`).

What it gains (bench/bench_crf_torch.py, README "Measured here", one thread): the setup is
2.5-2.8x faster than the tensor-op lattice's, the iterations no faster: both are bound by
moving lattice rows through memory (the colour lattice's rows, met in scattered order by the
slice, the splat and its six blur passes, take most of an iteration), which compiling does
not change. 1.15-1.25x per image in all, short of the 1.5x issue 28 asks of a default: an
opt-in backend. Compiled functions are cached on disk (`cache=True`): the first call after
an install compiles them (~10 s a thread count), later processes load them (~1 s).
"""
from __future__ import annotations

import functools
import math
import threading
import time
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import Tensor

# numba's disk cache checks only this file's date: after editing _prefetch_row or _AHEAD_PIXELS
# there, touch this file (or clear __pycache__) so that _update_range compiles again
from seglab.densecrf.numba_filter import (_AHEAD_PIXELS, _PIPE_WINDOW, _blur, _filter,
                                          _prefetch_row, _scratch_shape, _window)
from seglab.densecrf.numba_lattice import _neighbours, _simplices, _vertices
from seglab.densecrf.permutohedral import mixed_radix

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:                      # the backend then says so (`require`)
    numba = None

AVAILABLE = numba is not None
_EXP_SAFE = 64.0           # as torch_crf: exp(64) * labels is far below float32's maximum


def require() -> None:
    """Raise ImportError with the fix when numba is not installed."""
    if numba is None:
        raise ImportError("the compiled CRF lattice (crf.backend=numba) needs numba: "
                          "`pip install numba` (or use crf.backend=torch: same labels)")


if numba is None:                                          # stubs: importing never fails
    def njit(*args, **kwargs):
        return (lambda f: f) if not (len(args) == 1 and callable(args[0])) else args[0]
    intrinsic = njit
    prange = range


# ------------------------------------------------------------------------------- the mean field

@intrinsic
def _as_f32(typingctx, x):
    """The bits of an int32 read as a float32 (LLVM bitcast: vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath=False, inline="always")
def _exp(x):
    """float32 exp(x) for x <= 88 (Cephes' expf: within 1.4 ulp here; x < -87.3 gives 1e-38,
    not 0 or a denormal: nothing next to a softmax's largest term, exp(0) = 1). Written so
    that a loop over labels vectorises: np.exp on float32 calls libm once per value."""
    x = min(max(x, np.float32(-87.33654)), np.float32(88.37626))
    big = np.float32(12582912.0)                    # 1.5 * 2^23: adding it rounds to an integer
    fx = (x * np.float32(1.44269504088896341) + big) - big
    r = x - fx * np.float32(0.693359375) + fx * np.float32(2.12194440e-4)
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * (r * r) + r + np.float32(1.0)
    return y * _as_f32((np.int32(fx) + np.int32(127)) << np.int32(23))


@njit(cache=True, fastmath=False)
def _update_range(p0, p1, nu, c_real, mu, shift_max, do_slice, do_splat, q_mode, q_out, nk,
                  va, sla, spa, ra, da, vb, slb, spb, rb, db, new_a, new_b):
    """Pixels p0..p1: energy = -U + slice_a + slice_b (or -U - (slice_a + slice_b) @ mu),
    Q = softmax(energy) (vectorised exp; a per-pixel max shift only when `shift_max`), Q
    written to q_out ((N, C) if q_mode 1, (C, N) if 2), and splatted into da, db (do_splat).

    The vertices are numbered in first use by (pixel, k), so the splat meets vertex new_a
    (new_b) first exactly when that is the vertex: it overwrites the row instead of adding
    to it, and no lattice is zeroed between iterations (new_* = -1: always add)."""
    cp = nu.shape[1]
    ka, kb = va.shape[1], vb.shape[1]
    e = np.empty(cp, np.float32)
    acc = np.empty(cp, np.float32)
    acc2 = np.empty(cp, np.float32)
    tile = np.empty((cp, 64), np.float32)
    zero = np.float32(0.0)
    has_mu = mu.shape[0] > 0
    # the last kernel's vertices (the bilateral one's, scattered over the lattice) are
    # fetched a few pixels ahead, the rows sliced and those splatted into
    vl = vb if nk > 1 else va
    rl, dl = (rb, db) if nk > 1 else (ra, da)
    r_base, d_base, row_bytes = rl.ctypes.data, dl.ctypes.data, cp * 4
    for p in range(p0, p1):
        if nk > 0 and p + _AHEAD_PIXELS < p1:
            for k in range(vl.shape[1]):
                o = vl[p + _AHEAD_PIXELS, k]
                if do_slice:
                    _prefetch_row(r_base, o, row_bytes)
                if do_splat:
                    _prefetch_row(d_base, o, row_bytes)
        for l in range(cp):
            e[l] = nu[p, l]
        if do_slice and nk > 0:
            for l in range(cp):
                acc[l] = zero
            for k in range(ka):
                o = va[p, k]
                w = sla[p, k]
                for l in range(cp):
                    acc[l] += w * ra[o, l]
            if nk > 1:
                for l in range(cp):
                    acc2[l] = zero
                for k in range(kb):
                    o = vb[p, k]
                    w = slb[p, k]
                    for l in range(cp):
                        acc2[l] += w * rb[o, l]
            if has_mu:                                  # -U - (m_a + m_b) @ mu
                if nk > 1:
                    for l in range(cp):
                        acc[l] += acc2[l]
                for l in range(c_real):
                    s = zero
                    for l2 in range(c_real):
                        s += acc[l2] * mu[l2, l]
                    e[l] = e[l] - s
            else:                                       # (-U + m_a) + m_b, the C++'s order
                for l in range(cp):
                    e[l] += acc[l]
                if nk > 1:
                    for l in range(cp):
                        e[l] += acc2[l]
        if shift_max:
            mx = e[0]
            for l in range(1, c_real):
                mx = max(mx, e[l])
            for l in range(cp):
                e[l] -= mx
        for l in range(cp):
            e[l] = _exp(e[l])
        for l in range(c_real, cp):
            e[l] = zero
        s0, s1, s2, s3 = e[0], e[1], e[2], e[3]         # eight lanes, then a fixed tree
        s4, s5, s6, s7 = e[4], e[5], e[6], e[7]
        for base in range(8, cp, 8):
            s0 += e[base]
            s1 += e[base + 1]
            s2 += e[base + 2]
            s3 += e[base + 3]
            s4 += e[base + 4]
            s5 += e[base + 5]
            s6 += e[base + 6]
            s7 += e[base + 7]
        total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
        for l in range(cp):
            e[l] = e[l] / total
        if q_mode == 1:
            for l in range(c_real):
                q_out[p, l] = e[l]
        elif q_mode == 2:                               # (C, N): 64 pixels at a time
            t = (p - p0) % 64
            for l in range(c_real):
                tile[l, t] = e[l]
            if t == 63 or p == p1 - 1:
                first = p - t
                for l in range(c_real):
                    for i in range(t + 1):
                        q_out[l, first + i] = tile[l, i]
        if do_splat and nk > 0:
            for k in range(ka):
                o = va[p, k]
                w = spa[p, k]
                if o == new_a:                          # first use: overwrite last iteration's
                    for l in range(cp):
                        da[o, l] = w * e[l]
                    new_a += 1
                else:
                    for l in range(cp):
                        da[o, l] += w * e[l]
            if nk > 1:
                for k in range(kb):
                    o = vb[p, k]
                    w = spb[p, k]
                    if o == new_b:
                        for l in range(cp):
                            db[o, l] = w * e[l]
                        new_b += 1
                    else:
                        for l in range(cp):
                            db[o, l] += w * e[l]


@njit(cache=True, fastmath=False)
def _update(nu, c_real, mu, shift_max, do_slice, do_splat, q_mode, q_out, nk,
            va, sla, spa, bufa, ra, sa, vb, slb, spb, bufb, rb, sb):
    """One thread: `_update_range` over all pixels (slab indices: r* blurred, s* splat)."""
    _update_range(0, nu.shape[0], nu, c_real, mu, shift_max, do_slice, do_splat, q_mode, q_out,
                  nk, va, sla, spa, bufa[ra], bufa[sa[0]], vb, slb, spb, bufb[rb], bufb[sb[0]],
                  0, 0)


@njit(cache=True, fastmath=False, parallel=True)
def _update_parallel(nu, c_real, mu, shift_max, do_slice, do_splat, q_mode, q_out, nk,
                     va, sla, spa, bufa, ra, sa, vb, slb, spb, bufb, rb, sb):
    """`_update` over len(sa) pixel blocks in parallel, block t splatting into slab sa[t]
    (block 0 overwrites at first use; the others add to zeroed slabs)."""
    n = nu.shape[0]
    blocks = sa.shape[0]
    for t in prange(blocks):
        _update_range(t * n // blocks, (t + 1) * n // blocks, nu, c_real, mu, shift_max,
                      do_slice, do_splat, q_mode, q_out, nk, va, sla, spa, bufa[ra],
                      bufa[sa[t]], vb, slb, spb, bufb[rb], bufb[sb[t]],
                      0 if t == 0 else -1, 0 if t == 0 else -1)


@njit(cache=True, fastmath=False)
def _neg_unary(unary, cp):
    """-U - max(-U) per pixel (exactly: min(U) - U), labels inner, padded to cp with zeros:
    (C, N) -> (N, cp), in blocks of pixels (the transposition stays in cache)."""
    c, n = unary.shape
    out = np.zeros((n, cp), np.float32)
    mins = np.empty(256, np.float32)
    for p0 in range(0, n, 256):
        p1 = min(p0 + 256, n)
        for p in range(p0, p1):
            mins[p - p0] = unary[0, p]
        for l in range(1, c):
            for p in range(p0, p1):
                mins[p - p0] = min(mins[p - p0], unary[l, p])
        for p in range(p0, p1):
            for l in range(c):
                out[p, l] = mins[p - p0] - unary[l, p]
    return out

# ------------------------------------------------------------------------------------ interface

def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _threads() -> int:
    """Threads for the compiled loops: torch's intra-op count (one knob for both backends)."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class NumbaLattice:
    """The lattice of `features` (N, d); `filter(values (N, C))` -> (N, C), as
    `PermutohedralLattice` (the same vertex numbering, weights and neighbours), compiled.

    `vertex` (N, d+1) int32, `weight` (N, d+1) float32 barycentric weights, `neighbours`
    (d+1, 2, num_vertices) int32 (num_vertices = absent), numpy arrays."""

    def __init__(self, features):
        require()
        f = _as_numpy(features, np.float32)
        if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
            raise ValueError(f"features must be (N, d) with N, d > 0, got {tuple(f.shape)}")
        if not np.isfinite(f).all():
            raise ValueError("features must be finite (check the standard deviations: none "
                             "may be 0)")
        n, d = f.shape
        self.num_points, self.dim = n, d
        self.alpha = 1.0 / (1.0 + 2.0 ** -d)
        f32 = np.float32
        inv_std_dev = float(f32(math.sqrt(2.0 / 3.0) * (d + 1)))       # the C++'s constants
        scale = np.array([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev for i in range(d)],
                         np.float32)
        rem, rank, bary, lo, hi, ok = _simplices(f, scale, f32(1.0 / (d + 1)))
        if not ok:
            raise ValueError("permutohedral lattice: features too large for the lattice "
                             "coordinates; use larger standard deviations")
        # codes: the first d coordinates in mixed radix, with margins of 2d each side (the
        # vertices lie within d of the remainder-0 point, their blur neighbours within d more)
        lo = lo - 2 * d
        radix = [int(h) - int(l) + 1 + 2 * d for h, l in zip(hi, lo)]
        code_range, strides = mixed_radix(radix)
        strides = np.array(strides, np.int64)
        direct = code_range <= max(4 * n * (d + 1), 1 << 16)
        vertex, codes, direct_table, table, bits = _vertices(
            rem, rank, lo.astype(np.int64), strides, code_range if direct else 0, direct)
        nb = _neighbours(codes, strides, direct_table, table, bits)     # (d+1, M, 2)
        self.num_vertices = codes.shape[0]
        self._nb, self._window = nb, int(_window(nb, _PIPE_WINDOW))
        # neighbours within a few thousand rows (the position-only kernel's lattice, built
        # row by row): all passes in one sweep; else (colour axes link vertices created far
        # apart) pass by pass
        self.pipelined = self._window <= _PIPE_WINDOW
        self._vertex = self.vertex = vertex
        self.weight = bary
        self._slice_weight = bary * np.float32(self.alpha)

    def first_new(self, threads: int) -> int:
        """1 + the largest vertex number of the first of `threads` pixel blocks: the rows it
        writes in the parallel splat (first-use numbering: exactly 0..that - 1)."""
        n = self.num_points
        block = self._vertex[:n // threads] if n // threads else self._vertex[:0]
        return int(block.max()) + 1 if block.size else 0

    @property
    def neighbours(self) -> np.ndarray:
        """(d+1, 2, num_vertices) int32: n1 and n2 of each vertex along each axis (absent =
        num_vertices), first-use numbering as PermutohedralLattice's."""
        return np.ascontiguousarray(self._nb.transpose(0, 2, 1))

    def filter(self, values, reverse: bool = False):
        """Approximate Gaussian filtering of `values` (N, C) over the features (one thread);
        a tensor in -> a tensor out."""
        if values.ndim != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be (N={self.num_points}, C), got {tuple(values.shape)}")
        out = _filter(_as_numpy(values, np.float32), self, self.weight, self._slice_weight,
                      reverse)
        return torch.from_numpy(out) if isinstance(values, Tensor) else out


class NumbaKernel:
    """One Potts-weighted, normalised Gaussian kernel on the compiled lattice: what
    torch_crf.PairwiseKernel is for the tensor-op lattice (`message`, `bound`, `dtype`,
    `scale`), plus the folded weights of the fused mean field: `splat_weight` (barycentric x
    the "before" normalisation) and `slice_weight` (barycentric x alpha x "after" x weight)."""

    dtype, scale = torch.float32, 1.0

    def __init__(self, features, weight: float, normalization: str):
        from seglab.densecrf.features import NORMALIZATIONS
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, "
                             f"got {normalization!r}")
        self.lattice = lat = NumbaLattice(features)
        n = lat.num_points
        norm = lat.filter(np.ones((n, 1), np.float32))[:, 0]
        norm64 = norm.astype(np.float64)                    # the C++ normalises in double
        before = after = None
        if normalization == "symmetric":
            before = after = (1.0 / np.sqrt(norm64 + 1e-20)).astype(np.float32)
        elif normalization == "after":
            after = (1.0 / (norm64 + 1e-20)).astype(np.float32)
        elif normalization == "before":
            before = (1.0 / (norm64 + 1e-20)).astype(np.float32)
        reach = norm if before is None else lat.filter(before[:, None])[:, 0]
        after = (np.full(n, weight, np.float32) if after is None
                 else after * np.float32(weight))
        self.bound = torch.from_numpy(np.abs(reach * after))
        self.splat_weight = lat.weight if before is None else lat.weight * before[:, None]
        self.slice_weight = lat._slice_weight * after[:, None]

    def message(self, q):
        """weight * normalised filter of q (N, C) -> (N, C) (a tensor in -> a tensor out), for
        torch_crf's mean field; `mean_field` below fuses it instead."""
        lat = self.lattice
        out = _filter(_as_numpy(q, np.float32), lat, self.splat_weight, self.slice_weight)
        return torch.from_numpy(out) if isinstance(q, Tensor) else out


@functools.lru_cache(maxsize=4)
def gaussian_kernel(height: int, width: int, xy_std: float, weight: float,
                    normalization: str) -> NumbaKernel:
    """The position-only kernel, built once per image size (as torch_crf.gaussian_kernel)."""
    from seglab.densecrf.features import kernel_features
    return NumbaKernel(kernel_features(height, width, xy_std), weight, normalization)


_POOL = threading.local()


def _pooled(name: str, shape) -> np.ndarray:
    """An uninitialised float32 array of `shape`, reusing this thread's buffer `name` across
    calls: ~100 MB of fresh pages per image would cost more page faults than the blur."""
    size = math.prod(shape)
    flat = getattr(_POOL, name, None)
    if flat is None or flat.size < size:
        flat = np.empty(size + size // 8, np.float32)
        setattr(_POOL, name, flat)
    return flat[:size].reshape(shape)


class _Slabs:
    """One kernel's lattice buffers in the fused mean field: T+1 slabs (M+1, cp); pixel block
    t = 0..T-1 splats into slab t, the blur sums and zeroes them and writes slab T."""

    def __init__(self, kernel: NumbaKernel, cp: int, threads: int, slot: int):
        lat = kernel.lattice
        self.kernel, self.threads = kernel, threads
        self.bufs = _pooled(f"bufs{slot}", (threads + 1, lat.num_vertices + 1, cp))
        if threads > 1:                               # block 0 writes rows < first_new only
            self.bufs[:threads] = 0.0
        self.bufs[:, -1] = 0.0                        # the absent neighbour's row
        self.scratch = _pooled(f"scratch{slot}", _scratch_shape(lat, cp, threads))
        self.scratch[:, -1] = 0.0                     # the absent neighbour's row
        self.result, self.splat_ids = threads, np.arange(threads, dtype=np.int64)

    def blur(self) -> None:
        _blur(self.bufs, self.threads, self.kernel.lattice, self.scratch, self.threads)


_EMPTY_I = np.zeros((0, 1), np.int32)
_EMPTY_F = np.zeros((0, 1), np.float32)
_EMPTY_B = np.zeros((1, 1, 1), np.float32)


def mean_field(unary, kernels: List[NumbaKernel], iterations: int,
               callback: Optional[Callable[[int, Tensor], None]] = None, shape=None,
               compat=None, timings: Optional[dict] = None) -> np.ndarray:
    """Q (C, N) float32 after `iterations` mean-field updates from unary (C, N), fused: one
    pixel loop per iteration slices both kernels, updates Q and splats it for the next one;
    between them, the blur passes. callback(iteration, Q (C, *shape) tensor) as torch_crf's.
    compat (C, C): energy -U - (sum of messages) @ compat instead of Potts' -U + messages.
    timings: a dict to add seconds to, per phase ("unary", "update", "blur 0", "blur 1")."""
    require()
    clock = time.perf_counter
    tick = clock()

    def lap(name: str) -> None:
        nonlocal tick
        if timings is not None:
            now = clock()
            timings[name] = timings.get(name, 0.0) + now - tick
            tick = now

    u = _as_numpy(unary, np.float32)
    c, n = u.shape
    cp = -(-c // 8) * 8                            # labels padded to whole 8-float vectors
    threads = _threads()
    if threads > 1:
        numba.set_num_threads(threads)
    nu = _neg_unary(u, cp)
    mu = _EMPTY_F if compat is None else _as_numpy(compat, np.float32)
    if compat is not None and mu.shape != (c, c):
        raise ValueError(f"compat must be ({c}, {c}) for {c} labels, got {mu.shape}")
    bound = sum((k.bound for k in kernels), torch.zeros(n))
    shift_max = compat is not None or not bool(bound.max() < _EXP_SAFE)
    slabs = [_Slabs(k, cp, threads, slot) for slot, k in enumerate(kernels[:2])]
    if len(kernels) > 2:
        raise ValueError("the fused mean field takes at most two kernels")
    update = _update if threads == 1 else _update_parallel
    shape = shape or (c, n)
    lap("unary")

    def step(do_slice: bool, do_splat: bool, q_mode: int, q_out) -> None:
        args = []
        for k in range(2):
            if k < len(slabs):
                s = slabs[k]
                args += [s.kernel.lattice._vertex, s.kernel.slice_weight, s.kernel.splat_weight,
                         s.bufs, s.result, s.splat_ids]
            else:
                args += [_EMPTY_I, _EMPTY_F, _EMPTY_F, _EMPTY_B, 0, np.zeros(threads, np.int64)]
        update(nu, c, mu, shift_max, do_slice, do_splat, q_mode, q_out, len(slabs), *args)
        lap("update")

    q_cn = np.empty((c, n), np.float32)
    q_nc = np.empty((n, c), np.float32) if callback is not None else q_cn
    mode = 1 if callback is not None else 2
    step(False, iterations > 0, mode if (callback is not None or iterations == 0) else 0, q_nc)
    if callback is not None:
        callback(0, torch.from_numpy(q_nc).t().reshape(shape))
    for it in range(1, iterations + 1):
        last = it == iterations
        for k, s in enumerate(slabs):
            s.blur()
            lap(f"blur {k}")
        step(True, not last, mode if (callback is not None or last) else 0, q_nc)
        if callback is not None:
            callback(it, torch.from_numpy(q_nc).t().reshape(shape))
    if callback is not None:
        q_cn = np.ascontiguousarray(q_nc.T)
    return q_cn


def dense_crf(img: Tensor, unary: Tensor, iterations: int, bi_w: float, bi_xy_std: float,
              bi_rgb_std: float, pos_w: float, pos_xy_std: float, normalization: str,
              callback=None, compat=None) -> Tensor:
    """torch_crf.dense_crf's model on the compiled lattice: img (H, W, 3) uint8, unary
    (C, H, W) CPU tensors -> Q (C, H, W) float32 tensor (checked by torch_crf)."""
    require()
    if img.device.type != "cpu" or unary.device.type != "cpu":
        raise ValueError("the compiled (numba) CRF lattice runs on the CPU; use the torch "
                         "backend on other devices")
    from seglab.densecrf.features import kernel_features
    c, h, w = unary.shape
    kernels = []                                   # a zero weight adds nothing: skip it
    if pos_w != 0:
        kernels.append(gaussian_kernel(h, w, float(pos_xy_std), float(pos_w), normalization))
    if bi_w != 0:
        features = kernel_features(h, w, bi_xy_std, img, bi_rgb_std)
        kernels.append(NumbaKernel(features, bi_w, normalization))
    q = mean_field(unary.float().reshape(c, h * w).numpy(), kernels, iterations, callback,
                   (c, h, w), compat)
    return torch.from_numpy(q).reshape(c, h, w)
