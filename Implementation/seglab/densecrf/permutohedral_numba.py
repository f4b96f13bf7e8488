"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) compiled with numba, and the
dense CRF's mean field (Krähenbühl & Koltun, NIPS 2011) fused around it: the `numba` backend.

Why hand-written. `permutohedral.py` expresses splat, blur and slice as whole-tensor
`embedding_bag` gathers, one pass per step, each writing a fresh (rows, C) tensor, and its mean
field adds whole passes over (N, C) tensors (messages, energies, exp, sums); no library offers
the lattice. Here each step is a loop compiled for this CPU with the C labels of a row
contiguous (the inner, vectorised dimension; rows padded to whole 8-float vectors), and what
the tensor ops cannot fuse is fused:

* construction, all in compiled loops (the tensor-op lattice sorts): the enclosing simplex of
  each point; its vertices coded as one integer (a mixed radix of the first d lattice
  coordinates) and numbered in first-use order by one hash table (a direct table when the
  code range is small: the position-only kernel), the C++ hash table's order, so `vertex`
  equals `PermutohedralLattice.vertex`; the blur neighbours n1 = key - 1 but key_j + d (a
  constant code offset per axis j, looked up) and n2 = key + 1 but key_j - d (n1's inverse);
* blur: new = own + (n1 + n2) / 2 along each axis with the neighbour table (absent neighbours
  read a zero row). Where every neighbour lies within a few thousand rows (the position-only
  lattice, built row by row) the d+1 passes run in one sweep, each a fixed lag behind the
  previous one and writing a small ring buffer that stays in cache: the lattice crosses
  memory once, not d+1 times. The colour lattice links vertices created far apart, so there
  the passes run one after another;
* slice + mean-field update + splat, one loop over the pixels: slice both kernels' blurred
  lattices at the pixel (barycentric weight x alpha x normalisation x Potts weight, folded
  into one weight), add -U, exp and normalise (`_exp`: a float32 exp that vectorises; numba's
  calls libm per value), and splat the new Q row straight into both lattices for the next
  iteration. A vertex's first splat in pixel order is its first use, so the splat overwrites
  the stale row there instead of adding, and no lattice is ever zeroed. The message, energy
  and Q tensors of the tensor-op mean field are never written; only the final Q is;
* software prefetch (`_prefetch_row`) of the rows met through the neighbour table and of the
  colour lattice's rows a few pixels ahead: addresses no hardware prefetcher guesses (what
  fbgemm's embedding-bag kernels do for the tensor-op lattice).

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

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:                      # the backend then says so (`require`)
    numba = None

AVAILABLE = numba is not None
_EXP_SAFE = 64.0           # as torch_crf: exp(64) * labels is far below float32's maximum
_PIPE_WINDOW = 8192        # the pipelined blur's largest lag (rows): rings of 3 lags stay cached
_AHEAD_ROWS = 16           # software prefetch distance: blur rows ahead ...
_AHEAD_PIXELS = 4          # ... and pixels ahead (measured best here, 15-25% faster loops)


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
    cgutils = None


# ------------------------------------------------------------------------------------ building

@njit(cache=True, fastmath=False)
def _simplices(features, scale, down):
    """Per point: the nearest remainder-0 point (first d coordinates), the rank of each
    coordinate (d+1) and the barycentric weights (d+1), in the C++'s float32 order; with the
    per-coordinate min and max of the remainder-0 points (the code layout), and whether
    every elevated coordinate was small enough to round exactly (|y / (d+1)| < 2^22)."""
    n, d = features.shape
    rem_out = np.empty((n, d), np.int32)
    rank_out = np.empty((n, d + 1), np.int8)
    bary_out = np.empty((n, d + 1), np.float32)
    lo = np.full(d, 2 ** 30, np.int64)
    hi = np.full(d, -2 ** 30, np.int64)
    elev = np.empty(d + 1, np.float32)
    res = np.empty(d + 1, np.float32)
    rem = np.empty(d + 1, np.int64)
    rk = np.empty(d + 1, np.int64)
    b = np.empty(d + 2, np.float32)
    big = np.float32(12582912.0)             # 1.5 * 2^23: x + big - big rounds half to even
    ok = True
    for p in range(n):
        sm = np.float32(0.0)
        for j in range(d, 0, -1):                       # elevate: y = E f
            cf = features[p, j - 1] * scale[j - 1]
            elev[j] = sm - np.float32(j) * cf
            sm = sm + cf
        elev[0] = sm
        total = 0
        for i in range(d + 1):                          # nearest remainder-0 point (SSE's
            x = elev[i] * down                          # round half to even)
            ok = ok and abs(x) < np.float32(4194304.0)
            v = np.int64((x + big) - big)
            rem[i] = v * (d + 1)
            total += v
        for i in range(d + 1):
            res[i] = elev[i] - np.float32(rem[i])
            rk[i] = total
        for i in range(d):                              # rank, largest residual first
            for j in range(i + 1, d + 1):
                lower = np.int64(res[i] < res[j])
                rk[i] += lower
                rk[j] += 1 - lower
        for i in range(d + 1):                          # back onto the plane
            if rk[i] < 0:
                rk[i] += d + 1
                rem[i] += d + 1
            elif rk[i] > d:
                rk[i] -= d + 1
                rem[i] -= d + 1
        for i in range(d + 2):
            b[i] = np.float32(0.0)
        for i in range(d + 1):                          # barycentric (p. 10 of Adams et al.)
            v32 = (elev[i] - np.float32(rem[i])) * down
            b[d - rk[i]] += v32
            b[d - rk[i] + 1] -= v32
        b[0] = np.float32(np.float64(b[0]) + (1.0 + np.float64(b[d + 1])))
        for i in range(d + 1):
            rank_out[p, i] = rk[i]
            bary_out[p, i] = b[i]
        for i in range(d):
            rem_out[p, i] = rem[i]
            lo[i] = min(lo[i], rem[i])
            hi[i] = max(hi[i], rem[i])
    return rem_out, rank_out, bary_out, lo, hi, ok


@njit(cache=True, fastmath=False, inline="always")
def _slot(code, mask, bits):
    """Multiplicative hash (Knuth) of an int64 code onto 2^bits slots."""
    h = np.uint64(code) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64(h >> np.uint64(64 - bits)) & mask


@njit(cache=True, fastmath=False, inline="always")
def _find(code, direct, table, bits):
    """Vertex number of `code`, -1 if absent: direct (R,) int32 indexed by code, if not
    empty; else table (slots, 2) int64 rows (code, vertex), code -1 = empty slot (open
    addressing, linear probing)."""
    if direct.shape[0] > 0:
        return np.int64(direct[code])
    mask = (np.int64(1) << bits) - 1
    s = _slot(code, mask, bits)
    while True:
        k = table[s, 0]
        if k == code:
            return table[s, 1]
        if k == -1:
            return -1
        s = (s + 1) & mask


@njit(cache=True, fastmath=False)
def _vertices(rem, rank, lo, strides, code_range, direct):
    """Number the vertices of every point's simplex in first-use order (points ascending,
    then vertex k = 0..d of each: the C++ hash table's order): vertex (N, d+1) int32, codes
    (M,) int64, and the lookup table for `_find`.

    Vertex k of a point is its remainder-0 point plus the canonical simplex's vertex k
    permuted by rank: coordinate i gains k, less d+1 where rank_i > d - k, so its code is
    base + k * sum(strides) - (d+1) * (the strides of the coordinates ranked above d - k)."""
    n, d = rem.shape
    vertex = np.empty((n, d + 1), np.int32)
    codes = np.empty(n * (d + 1), np.int64)
    total = np.int64(0)
    for i in range(d):
        total += strides[i]
    if direct:
        bits = 0
        table = np.full((0, 2), -1, np.int64)
        direct_table = np.full(code_range, -1, np.int32)
    else:
        bits = 16
        table = np.full((1 << bits, 2), -1, np.int64)
        direct_table = np.full(0, -1, np.int32)
    mask = (np.int64(1) << bits) - 1
    m = 0
    last = np.full(d + 1, -1, np.int64)                 # the previous point's codes
    last_id = np.zeros(d + 1, np.int32)
    by_rank = np.zeros(d + 1, np.int64)
    for p in range(n):
        base = np.int64(0)
        for r in range(d + 1):
            by_rank[r] = 0
        for i in range(d):
            base += (rem[p, i] - lo[i]) * strides[i]
            by_rank[rank[p, i]] = strides[i]
        drop = np.int64(0)
        for k in range(d + 1):
            if k > 0:
                drop += by_rank[d - k + 1]
            code = base + k * total - (d + 1) * drop
            if code == last[k]:
                vertex[p, k] = last_id[k]
                continue
            if direct:
                v = direct_table[code]
                if v < 0:
                    v = m
                    direct_table[code] = v
                    codes[m] = code
                    m += 1
            else:
                s = _slot(code, mask, bits)
                while True:
                    key = table[s, 0]
                    if key == code:
                        v = table[s, 1]
                        break
                    if key == -1:
                        v = m
                        table[s, 0] = code
                        table[s, 1] = v
                        codes[m] = code
                        m += 1
                        break
                    s = (s + 1) & mask
                if 2 * m > mask + 1:                    # keep the load <= 1/2: double
                    bits += 1
                    mask = (np.int64(1) << bits) - 1
                    table = np.full((1 << bits, 2), -1, np.int64)
                    for u in range(m):
                        s = _slot(codes[u], mask, bits)
                        while table[s, 0] != -1:
                            s = (s + 1) & mask
                        table[s, 0] = codes[u]
                        table[s, 1] = u
            vertex[p, k] = v
            last[k] = code
            last_id[k] = v
    return vertex, codes[:m].copy(), direct_table, table, bits


@njit(cache=True, fastmath=False)
def _neighbours(codes, strides, direct, table, bits):
    """(d+1, M, 2) int32: n1 and n2 of every vertex along every axis, M where absent. Along
    axis j, n1 = key - 1 but key_j + d (code - shift_j) is looked up; n2 = key + 1 but
    key_j - d is its inverse (n2(u) = v where n1(v) = u)."""
    m = codes.shape[0]
    d = strides.shape[0]
    total = np.int64(0)
    for i in range(d):
        total += strides[i]
    nb = np.empty((d + 1, m, 2), np.int32)
    for j in range(d + 1):
        shift = total - ((d + 1) * strides[j] if j < d else 0)
        for v in range(m):
            nb[j, v, 1] = m
        for v in range(m):
            u = _find(codes[v] - shift, direct, table, bits)
            if u >= 0:
                nb[j, v, 0] = u
                nb[j, u, 1] = v
            else:
                nb[j, v, 0] = m
    return nb


# ------------------------------------------------------------------------------------ filtering

@intrinsic
def _prefetch_address(typingctx, address):
    """Software prefetch of the cache line at an address (LLVM's prefetch: read, keep in all
    levels), as fbgemm's embedding-bag kernels do: a lattice row met through the neighbour
    table or a pixel's vertices is at an address no hardware prefetcher can guess."""
    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p] + [ir.IntType(32)] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = lambda x: ir.Constant(ir.IntType(32), x)  # noqa: E731
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(types.uintp), codegen


@njit(cache=True, fastmath=False, inline="always")
def _prefetch_row(base, row, row_bytes):
    """Prefetch every cache line of row `row` of a C-contiguous array at address `base`."""
    start = base + row * row_bytes
    for off in range(0, row_bytes + 63, 64):
        _prefetch_address(start + min(off, row_bytes - 1))


@njit(cache=True, fastmath=False)
def _splat(values, vertex, weight, out):
    """out (M+1, C) += the barycentric-weighted rows of values (N, C) (out zeroed by the caller)."""
    n, c = values.shape
    k1 = vertex.shape[1]
    for p in range(n):
        for k in range(k1):
            o = vertex[p, k]
            w = weight[p, k]
            for l in range(c):
                out[o, l] += w * values[p, l]


@njit(cache=True, fastmath=False)
def _slice(values, vertex, weight, out):
    """out (N, C) = sum over the point's vertices of weight * values row."""
    n, c = out.shape
    k1 = vertex.shape[1]
    for p in range(n):
        for l in range(c):
            out[p, l] = np.float32(0.0)
        for k in range(k1):
            o = vertex[p, k]
            w = weight[p, k]
            for l in range(c):
                out[p, l] += w * values[o, l]



@njit(cache=True, fastmath=False)
def _window(nb, limit):
    """The largest |neighbour - vertex| of the neighbour table (the pipelined blur's lag),
    or limit + 1 as soon as it exceeds `limit`."""
    m = nb.shape[1]
    window = 0
    for j in range(nb.shape[0]):
        for v in range(m):
            u = nb[j, v, 0]                      # (n2 is n1's inverse: the same distances)
            if u < m:
                window = max(window, abs(u - v))
        if window > limit:
            return limit + 1
    return window


@njit(cache=True, fastmath=False, inline="always")
def _blur_rows(v0, v1, j, nb, inp, in_ring, out, out_ring, mask):
    """Blur vertices v0..v1 along axis j: out[v] = inp[v] + (inp[n1] + inp[n2]) / 2 (the
    C++'s order). A whole lattice holds vertex x at row x (absent, x = M: row M, zero); a
    ring at row x & mask (absent: its last row, zero)."""
    m = nb.shape[1]
    c = out.shape[1]
    zero_row = mask + 1
    half = np.float32(0.5)
    base, row_bytes = inp.ctypes.data, c * 4
    for v in range(v0, v1):
        if not in_ring and v + _AHEAD_ROWS < v1:   # a whole lattice: fetch the neighbours
            for side in range(2):
                _prefetch_row(base, nb[j, v + _AHEAD_ROWS, side], row_bytes)
        a = nb[j, v, 0]
        b = nb[j, v, 1]
        iv = v
        if in_ring:
            iv = v & mask
            a = a & mask if a < m else zero_row
            b = b & mask if b < m else zero_row
        ov = v & mask if out_ring else v
        for l in range(c):
            out[ov, l] = inp[iv, l] + half * (inp[a, l] + inp[b, l])


@njit(cache=True, fastmath=False, inline="always")
def _gather_splats(bufs, slabs, v0, v1):
    """Add the splat slabs 1..slabs-1 (other threads' pixels) into slab 0, rows v0..v1, and
    zero them."""
    c = bufs.shape[2]
    for t in range(1, slabs):
        for v in range(v0, v1):
            for l in range(c):
                bufs[0, v, l] += bufs[t, v, l]
                bufs[t, v, l] = np.float32(0.0)


@njit(cache=True, fastmath=False)
def _blur_pipe(bufs, nb, window, rings, reverse):
    """All d+1 blur passes in one sweep over the vertices (one thread): pass j runs `lag`
    vertices behind pass j-1 (lag >= window, so the neighbours it reads are done), and
    passes 0..d-1 write rings of 4 lags (they stay in cache) instead of whole lattices: the
    lattice streams through memory once instead of d+1 times. Reads slab 0 of bufs (the
    splat) and writes the result into slab 1."""
    d1, m = nb.shape[0], nb.shape[1]
    lag = max(window, 64)
    mask = rings.shape[1] - 2
    src, dst = bufs[0], bufs[1]
    for step in range(0, m + (d1 - 1) * lag, lag):
        for jp in range(d1):
            v0 = step - jp * lag
            if v0 < 0 or v0 >= m:
                continue
            v1 = min(v0 + lag, m)
            j = d1 - 1 - jp if reverse else jp
            if jp == 0:
                _blur_rows(v0, v1, j, nb, src, False, rings[0], True, mask)
            elif jp == d1 - 1:
                _blur_rows(v0, v1, j, nb, rings[jp - 1], True, dst, False, mask)
            else:
                _blur_rows(v0, v1, j, nb, rings[jp - 1], True, rings[jp], True, mask)


@njit(cache=True, fastmath=False)
def _blur_plain(bufs, scratch, nb, reverse):
    """The d+1 blur passes one after another (one thread), each streaming the lattice: for
    lattices whose neighbours lie too far apart to pipeline. Reads slab 0 (the splat),
    writes the result into slab 1; `scratch`: a third lattice."""
    d1, m = nb.shape[0], nb.shape[1]
    # the last pass writes slab 1; before it they alternate with slab 0 (free after pass 0),
    # pass 0 writing the scratch when d+1 is even
    for jp in range(d1):
        j = d1 - 1 - jp if reverse else jp
        to_result = (d1 - 1 - jp) % 2 == 0
        if jp == 0:
            _blur_rows(0, m, j, nb, bufs[0], False, bufs[1] if to_result else scratch, False, 0)
        elif to_result:
            _blur_rows(0, m, j, nb, scratch if jp == 1 else bufs[0], False, bufs[1], False, 0)
        else:
            _blur_rows(0, m, j, nb, bufs[1], False, bufs[0], False, 0)


@njit(cache=True, fastmath=False, parallel=True)
def _blur_parallel(bufs, slabs, scratch, nb, reverse, chunks, first_new):
    """`_blur_plain` with each pass split into `chunks` parallel pieces; first the splat
    slabs 1..slabs-1 (per pixel block) are added into slab 0 (and zeroed); last, slab 0's
    rows from `first_new` on (the vertices pixel block 0 never meets) are zeroed."""
    d1, m = nb.shape[0], nb.shape[1]
    for t in prange(chunks):
        _gather_splats(bufs, slabs, m * t // chunks, m * (t + 1) // chunks)
    for jp in range(d1):
        j = d1 - 1 - jp if reverse else jp
        to_result = (d1 - 1 - jp) % 2 == 0
        for t in prange(chunks):
            a, b = m * t // chunks, m * (t + 1) // chunks
            if jp == 0:
                _blur_rows(a, b, j, nb, bufs[0], False, bufs[slabs] if to_result else scratch,
                           False, 0)
            elif to_result:
                _blur_rows(a, b, j, nb, scratch if jp == 1 else bufs[0], False, bufs[slabs],
                           False, 0)
            else:
                _blur_rows(a, b, j, nb, bufs[slabs], False, bufs[0], False, 0)
    for t in prange(chunks):
        a, b = m * t // chunks, m * (t + 1) // chunks
        bufs[0, max(a, first_new):max(b, first_new)] = 0.0


def _scratch_shape(lattice, c: int, threads: int) -> tuple:
    """The blur's third buffer: the pipelined blur's d rings (a power of two >= 3 lags of
    rows, plus a zero row), or the pass-by-pass blur's scratch lattice (row M zero)."""
    nb = lattice._nb
    if lattice.pipelined and threads == 1:
        size = 1 << max(6, math.ceil(math.log2(3 * max(lattice._window, 64) + 1)))
        return (nb.shape[0] - 1, size + 1, c)
    return (1, nb.shape[1] + 1, c)


def _scratch(lattice, c: int, threads: int) -> np.ndarray:
    rings = np.empty(_scratch_shape(lattice, c, threads), np.float32)
    rings[:, -1] = 0.0                                # the absent neighbour's row
    return rings


def _blur(bufs, slabs, lattice, scratch, threads, reverse=False) -> None:
    """Blur the splat slabs 0..slabs-1 of bufs (summed) into slab `slabs`: pipelined where
    the lattice allows it (one thread), else pass by pass. Threads: slabs 1.. and the rows of
    slab 0 that its pixel block does not write are left zero for the next splat."""
    nb = lattice._nb
    if threads > 1:
        _blur_parallel(bufs, slabs, scratch[0], nb, reverse, 4 * threads,
                       lattice.first_new(threads))
    elif lattice.pipelined:
        _blur_pipe(bufs, nb, lattice._window, scratch, reverse)
    else:
        _blur_plain(bufs, scratch[0], nb, reverse)


def _filter(values, lattice, splat_weight, slice_weight, reverse=False):
    """The lattice filter of values (N, C) float32 (one thread): splat, blur, slice."""
    vertex, nb = lattice._vertex, lattice._nb
    m, c = nb.shape[1], values.shape[1]
    bufs = np.zeros((2, m + 1, c), np.float32)
    _splat(values, vertex, splat_weight, bufs[0])
    _blur(bufs, 1, lattice, _scratch(lattice, c, 1), 1, reverse)
    out = np.empty_like(values)
    _slice(bufs[1], vertex, slice_weight, out)
    return out


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
        code_range = math.prod(radix)
        if code_range >= 2 ** 62:
            raise ValueError(f"permutohedral lattice: features span too many lattice cells to "
                             f"index ({radix} per axis); use larger standard deviations")
        strides = [1] * d
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * radix[i + 1]
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
