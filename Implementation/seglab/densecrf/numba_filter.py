"""The permutohedral lattice's filtering steps, compiled with numba: splat, blur and slice on a
lattice built by `numba_lattice.py`, with the C labels of a row contiguous (the inner,
vectorised dimension). Krähenbühl's `permutohedral.cpp` arithmetic: the splat order, the blur
kernel [1/2, 1, 1/2].

* blur: new = own + (n1 + n2) / 2 along each axis with the neighbour table (absent neighbours
  read a zero row). Where every neighbour lies within a few thousand rows (the position-only
  lattice, built row by row) the d+1 passes run in one sweep, each a fixed lag behind the
  previous one and writing a small ring buffer that stays in cache: the lattice crosses
  memory once, not d+1 times. The colour lattice links vertices created far apart, so there
  the passes run one after another. With threads, the passes run over vertex blocks
  (`numba.prange`), after summing the per-pixel-block splat slabs;
* software prefetch (`_prefetch_row`) of the rows met through the neighbour table (and, in
  the fused mean field of `permutohedral_numba.py`, of the colour lattice's rows a few pixels
  ahead): addresses no hardware prefetcher guesses (what fbgemm's embedding-bag kernels do
  for the tensor-op lattice);
* `_filter`: the plain filter (splat, blur, slice; one thread), for `NumbaLattice.filter` and
  the kernels' normalisation.

numba is optional: without it the kernels stay plain Python functions (never called: the
backend's `require` says what to install), so this module always imports.
"""
from __future__ import annotations

import math

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:                      # permutohedral_numba.require says so
    numba = None

_PIPE_WINDOW = 8192        # the pipelined blur's largest lag (rows): rings of 3 lags stay cached
_AHEAD_ROWS = 16           # software prefetch distance: blur rows ahead ...
_AHEAD_PIXELS = 4          # ... and pixels ahead (measured best here, 15-25% faster loops)


if numba is None:                                          # stubs: importing never fails
    def njit(*args, **kwargs):
        return (lambda f: f) if not (len(args) == 1 and callable(args[0])) else args[0]
    intrinsic = njit
    prange = range
    cgutils = None


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
    """out (M+1, C) += the barycentric-weighted rows of values (N, C) (out zeroed by the
    caller)."""
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
