"""The permutohedral lattice's construction (Adams, Baek & Davis, Eurographics 2010), compiled
with numba: from the points' features to the vertex numbering, the barycentric weights and the
blur neighbours, all in compiled loops (the tensor-op lattice of `permutohedral.py` sorts).

* the enclosing simplex of each point (`_simplices`): the nearest remainder-0 point, the rank
  of each coordinate and the barycentric weights, in the float32 order of Krähenbühl's
  `permutohedral.cpp` (elevation, rounding, rank), so the lattice is the tensor-op one bit for
  bit;
* its vertices (`_vertices`) coded as one integer (a mixed radix of the first d lattice
  coordinates) and numbered in first-use order by one hash table (a direct table when the
  code range is small: the position-only kernel), the C++ hash table's order, so `vertex`
  equals `PermutohedralLattice.vertex`;
* the blur neighbours (`_neighbours`): n1 = key - 1 but key_j + d (a constant code offset per
  axis j, looked up) and n2 = key + 1 but key_j - d (n1's inverse).

numba is optional: without it the kernels stay plain Python functions (never called: the
backend's `require` says what to install), so this module always imports.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit
except ImportError:                      # permutohedral_numba.require says so
    numba = None

if numba is None:                                          # stubs: importing never fails
    def njit(*args, **kwargs):
        return (lambda f: f) if not (len(args) == 1 and callable(args[0])) else args[0]


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
