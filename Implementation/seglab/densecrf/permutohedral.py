"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) in plain PyTorch tensor ops.

A fast approximate Gaussian filter over d-dimensional features,
out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j (j = i included), computed on the lattice A*_d as

1. **elevate** each feature vector into the hyperplane sum(x) = 0 of R^(d+1) (the matrix E of
   the paper, scaled so that the lattice blur matches a unit-variance Gaussian);
2. **enclosing simplex**: round to the nearest remainder-0 lattice point, rank the residual
   coordinates (the rank order names the simplex) and take the barycentric weights of its
   d+1 vertices;
3. **splat** each value onto those d+1 vertices with the barycentric weights;
4. **blur** along each of the d+1 lattice axes in turn with the kernel [1/2, 1, 1/2];
5. **slice**: read each point back from its d+1 vertices with the same weights, times the
   constant alpha = 1 / (1 + 2^-d).

Every constant, the float32 operation order of the elevation and rounding, and the blur follow
Krähenbühl's dense-CRF lattice (`permutohedral.cpp`, compiled into pydensecrf), so filtered values
agree with pydensecrf's to float rounding. Where that code keeps a hash table of vertex keys, we
code each vertex as one integer per remainder class (its quotients in mixed radix), sort each
class's codes once (numbering the vertices and grouping the points that splat onto each),
renumber the vertices in first-use order (the hash table's order, and good memory locality),
and find the blur neighbours by looking their codes up (a direct table, or a hash table).

Splat, blur and slice are sparse linear maps, built once per feature set as "embedding bags"
(`Bags`: per output row, a list of input rows and weights) and applied with
`torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)`: on the CPU that is
fbgemm's gather-and-sum kernel, 2-3x faster here than torch.sparse CSR products (MKL) on the
same maps; it runs on CUDA too. No library offers the lattice itself, hence this file.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_INT32_MAX = 2 ** 31 - 1
_DENSE = 0.9      # neighbours present: blur two steps a pass (PermutohedralLattice.passes)
_HASH_MULTIPLIER = 0x9E3779B1      # 2^32 / golden ratio, odd: Knuth's multiplicative hash


class Bags(NamedTuple):
    """A sparse linear map: output row r = sum over e in offsets[r]:offsets[r+1] of
    weights[e] * input row indices[e] (int32 or int64 indices and offsets, float32 weights)."""
    indices: Tensor
    offsets: Tensor
    weights: Tensor

    @property
    def num_rows(self) -> int:
        return self.offsets.numel() - 1

    def apply(self, table: Tensor) -> Tensor:
        """(num inputs, C) float32 -> (num_rows, C)."""
        return F.embedding_bag(self.indices, table, self.offsets, mode="sum",
                               per_sample_weights=self.weights, include_last_offset=True)

    def scaled(self, rows: Optional[Tensor] = None, inputs: Optional[Tensor] = None) -> "Bags":
        """diag(rows) @ self @ diag(inputs)."""
        weights = self.weights
        if inputs is not None:
            weights = weights * inputs.index_select(0, self.indices)
        if rows is not None:
            width = weights.numel() // max(self.num_rows, 1)
            uniform = torch.arange(0, weights.numel() + 1, max(width, 1), device=rows.device)
            if uniform.numel() == self.offsets.numel() and torch.equal(self.offsets.long(), uniform):
                weights = (weights.view(-1, width) * rows[:, None]).view(-1)    # e.g. the slice
            else:
                counts = torch.diff(self.offsets.long())
                weights = weights * torch.repeat_interleave(rows, counts, output_size=weights.numel())
        return Bags(self.indices, self.offsets, weights)


class PermutohedralLattice:
    """The lattice of `features` (N, d); `filter(values (N, C))` -> (N, C).

    Built once: `vertex` (N, d+1), the lattice vertices of each point's enclosing simplex;
    `weight` (N, d+1) float32, the barycentric weights; `neighbours` (d+1, 2, num_vertices),
    the two neighbours of each vertex along each lattice axis (num_vertices = absent); index
    tensors are int32 (int64 past 2^31 entries). `splat_bags`, `blur_bags` and `slice_bags`
    give the three steps as `Bags`; `passes()` the whole filter, as applied by `filter`.
    """

    def __init__(self, features: Tensor):
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be (N, d) with N, d > 0, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features must be finite (check the standard deviations: none may be 0)")
        self.num_points, self.dim = features.shape
        self.device = features.device
        self.alpha = 1.0 / (1.0 + 2.0 ** -self.dim)
        entries = self.num_points * (self.dim + 1)
        self.index_dtype = torch.int32 if entries <= _INT32_MAX else torch.long
        rank, remainder0, weight = _enclosing_simplex(features.float())
        keys, self._key_code = _vertex_keys(rank, remainder0)
        self._index_vertices(keys)
        self._class_weight = weight                              # (d+1, N): splat order
        self.weight = weight.t().contiguous()
        self._splat: Optional[Bags] = None
        self._blur: Optional[List[Bags]] = None
        self._passes: Dict[bool, List[Bags]] = {}
        self._slice: Optional[Bags] = None

    # ------------------------------------------------------------------------------ building
    def _index_vertices(self, keys: Tensor) -> None:
        """Number the vertices in first-use order (points ascending, then vertex k of each):
        sets `vertex`, `num_vertices`, `neighbours` and the splat grouping `_splat_entries`
        (class-major entries k * N + point, grouped by vertex, points ascending) with its
        `_splat_offsets`. keys: (d+1, N) vertex codes, one row per class.

        Each class is sorted on its own (vertices of different classes never coincide; a
        class's codes fit int32 more often than all codes do: a faster sort); concatenated,
        the classes give all entries in code order ("key order")."""
        d, n, dev, itype = self.dim, self.num_points, self.device, self.index_dtype
        orders, starts, codes, group_base = [], [], [], [0]
        for k in range(d + 1):
            sorted_codes, order = torch.sort(keys[k], stable=True)
            is_start = torch.ones(n, dtype=torch.bool, device=dev)
            torch.ne(sorted_codes[1:], sorted_codes[:-1], out=is_start[1:])
            start = is_start.nonzero().squeeze(1)
            orders.append(order + k * n)
            starts.append(start + k * n)
            codes.append(sorted_codes.index_select(0, start))
            group_base.append(group_base[-1] + start.numel())
        order, starts = torch.cat(orders), torch.cat(starts)
        entries, m = order.numel(), starts.numel()
        self.num_vertices = m
        # first use of each vertex: stable sorts put the group's first point first
        first = order.index_select(0, starts)
        first_use = (first % n) * (d + 1) + torch.div(first, n, rounding_mode="floor")
        used = torch.zeros(entries, dtype=torch.int32, device=dev).index_fill_(0, first_use, 1)
        new_id = torch.cumsum(used, 0, dtype=torch.int64).sub_(1).index_select(0, first_use)
        counts = torch.diff(starts, append=starts.new_full((1,), entries))
        group = torch.repeat_interleave(torch.arange(m, device=dev), counts, output_size=entries)
        vertex = torch.empty(entries, dtype=itype, device=dev)
        vertex.index_copy_(0, order, new_id.index_select(0, group).to(itype))
        self.vertex = vertex.view(d + 1, n).t().contiguous()

        # splat grouping: move each group of sorted entries to its vertex's new place
        old_id = torch.empty_like(new_id).index_copy_(0, new_id, torch.arange(m, device=dev))
        new_offsets = _offsets(counts.index_select(0, old_id))
        shift = (new_offsets[:-1].index_select(0, new_id) - starts).index_select(0, group)
        self._splat_entries = torch.empty_like(order).index_copy_(
            0, shift.add_(torch.arange(entries, device=dev)), order)
        self._splat_offsets = new_offsets.to(itype)
        self._find_neighbours(codes, group_base, new_id)

    def _find_neighbours(self, codes: List[Tensor], group_base: List[int], new_id: Tensor) -> None:
        """Sets `_n1` and `_n2` (d+1, m), the neighbours n1 = key - 1 but key_j + d and
        n2 = key + 1 but key_j - d (its inverse) of each vertex along each axis j, m where
        absent. In (class, quotients) form n1 has class c - 1 and quotients shifted by -[c = 0]
        (all) and +1 (coordinate j): each class's codes, shifted, are looked up in the
        previous class's sorted codes. new_id: key order -> vertex number."""
        d, m, dev, itype = self.dim, group_base[-1], self.device, self.index_dtype
        radix_total, strides, total_stride = self._key_code
        axis_shift = torch.tensor(strides + [0], dtype=codes[0].dtype, device=dev)[:, None]
        new_or_absent = torch.cat([new_id, new_id.new_full((1,), m)]).to(itype)
        n1 = torch.empty(d + 1, m, dtype=itype, device=dev)
        for c in range(d + 1):
            target = (c - 1) % (d + 1)
            queries = (codes[c] - (total_stride if c == 0 else 0)) + axis_shift   # (d+1, m_c)
            found = _lookup(codes[target], radix_total)(queries.view(-1))
            found = torch.where(found >= 0, found + group_base[target], m)
            n1.index_copy_(1, new_id[group_base[c]:group_base[c + 1]],
                           new_or_absent.index_select(0, found).view(d + 1, -1))
        n2 = torch.full((d + 1, m + 1), m, dtype=itype, device=dev)
        n2.scatter_(1, n1.long(), torch.arange(m, dtype=itype, device=dev).expand_as(n1))
        self._n1, self._n2 = n1, n2[:, :m]

    @property
    def neighbours(self) -> Tensor:
        """(d+1, 2, num_vertices): n1 and n2 of each vertex along each axis (absent = m)."""
        return torch.stack([self._n1, self._n2], 1)

    # ------------------------------------------------------------------------------ operators
    def splat_bags(self) -> Bags:
        """(N, C) -> (num_vertices, C): barycentric-weighted sums at the vertices."""
        if self._splat is None:
            points = (self._splat_entries % self.num_points).to(self.index_dtype)
            weights = self._class_weight.reshape(-1).index_select(0, self._splat_entries)
            self._splat = Bags(points, self._splat_offsets, weights)
        return self._splat

    def slice_bags(self) -> Bags:
        """(num_vertices, C) -> (N, C): barycentric interpolation, times alpha."""
        if self._slice is None:
            rows = torch.arange(0, self.vertex.numel() + 1, self.dim + 1, device=self.device)
            self._slice = Bags(self.vertex.view(-1), rows.to(self.index_dtype),
                               self.weight.view(-1) * self.alpha)
        return self._slice

    def blur_bags(self) -> List[Bags]:
        """d+1 maps (num_vertices, C) -> (num_vertices, C): [1/2, 1, 1/2] along axis j, each
        row holding n1 (if present), the vertex itself, n2 (if present)."""
        if self._blur is None:
            m, axes, dev = self.num_vertices, self.dim + 1, self.device
            n1, n2 = self._n1, self._n2
            has1, has2 = n1 < m, n2 < m
            rows = _offsets((has1.int() + has2.int() + 1).view(-1))        # all axes, one run
            at1 = rows[:-1].view(axes, m)
            at_own = at1 + has1
            total = int(rows[-1])
            dump = torch.full_like(at1, total)                               # absent: a spare slot
            indices = torch.empty(total + 1, dtype=self.index_dtype, device=dev)
            own = torch.arange(m, dtype=self.index_dtype, device=dev).expand(axes, m)
            indices.index_copy_(0, at_own.view(-1), own.reshape(-1))
            indices.index_copy_(0, torch.where(has1, at1, dump).view(-1), n1.view(-1))
            indices.index_copy_(0, torch.where(has2, at_own + 1, dump).view(-1), n2.reshape(-1))
            weights = torch.full((total,), 0.5, device=dev).index_fill_(0, at_own.view(-1), 1.0)
            self._blur = []
            for j in range(axes):
                lo, hi = int(rows[j * m]), int(rows[(j + 1) * m])
                self._blur.append(Bags(indices[lo:hi], (rows[j * m:(j + 1) * m + 1] - lo).to(
                    self.index_dtype), weights[lo:hi]))
        return self._blur

    def blur_map(self, axes: List[int]) -> Bags:
        """The blur steps along `axes` (applied in that order) as one map, 3^len(axes) entries
        a row: every path from the vertex through a neighbour (or itself) per step, weighted
        by the product of [1/2, 1, 1/2]. A path through an absent neighbour keeps weight 0 and
        stays on the row it would leave (padding: nothing to compact)."""
        m, dev = self.num_vertices, self.device
        paths = [torch.arange(m, dtype=self.index_dtype, device=dev)]
        weights = [torch.ones(m, device=dev)]
        for axis in reversed(axes):                  # the last step applied is the first hop
            hops, hop_weights = [], []
            for path, weight in zip(paths, weights):
                for side, factor in ((self._n1, 0.5), (None, 1.0), (self._n2, 0.5)):
                    if side is None:
                        hops.append(path)
                        hop_weights.append(weight)
                        continue
                    nxt = side[axis].index_select(0, path)
                    present = nxt < m
                    hops.append(torch.where(present, nxt, path))
                    hop_weights.append(weight * present * factor)
            paths, weights = hops, hop_weights
        width = len(paths)
        rows = torch.arange(0, width * m + 1, width, dtype=self.index_dtype, device=dev)
        return Bags(torch.stack(paths, 1).view(-1), rows, torch.stack(weights, 1).view(-1))

    def passes(self, reverse: bool = False) -> List[Bags]:
        """The whole filter as maps applied in turn: splat, blur (axes 0..d, or d..0 if
        reverse), slice. The passes are bound by streaming the lattice (num_vertices x C
        floats) through memory, so where nearly all neighbours are present (a dense lattice:
        the Gaussian kernel's) the blur goes two steps a pass (`blur_map`: 9 entries a row,
        1.3x faster here); elsewhere padding costs more than a pass saves (the bilateral
        kernel's lattice: 1.1x slower), and the steps stay compact (`blur_bags`)."""
        if reverse not in self._passes:
            axes = list(range(self.dim, -1, -1)) if reverse else list(range(self.dim + 1))
            if (self._n1 < self.num_vertices).float().mean() >= _DENSE:
                blur = [self.blur_map(axes[i:i + 2]) for i in range(0, len(axes), 2)]
            else:
                blur = [self.blur_bags()[j] for j in axes]
            self._passes[reverse] = [self.splat_bags()] + blur + [self.slice_bags()]
        return self._passes[reverse]

    def splat(self, values: Tensor) -> Tensor:
        """(N, C) -> (num_vertices, C): barycentric-weighted sums at the vertices."""
        return self.splat_bags().apply(values)

    def filter(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Approximate Gaussian filtering of `values` (N, C) over the features."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be (N={self.num_points}, C), got {tuple(values.shape)}")
        out = values.float().contiguous()
        for step in self.passes(reverse):
            out = step.apply(out)
        return out


def _enclosing_simplex(f: Tensor):
    """Features (N, d) -> rank (d+1, N) int8, nearest remainder-0 point (d+1, N) int32,
    barycentric weights (d+1, N) float32; coordinate-major (contiguous rows: faster here),
    float32 operations in the C++'s order."""
    n, d = f.shape
    dev = f.device
    f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)  # noqa: E731
    inv_std_dev = float(f32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d)]
    down, up = f32(1.0 / (d + 1)), f32(float(d + 1))

    # elevate (y = E p, p. 5 of Adams et al.), accumulated from the last coordinate down
    ft = f.t()
    elevated = torch.empty(d + 1, n, dtype=torch.float32, device=dev)
    running = torch.zeros(n, dtype=torch.float32, device=dev)
    for j in range(d, 0, -1):
        cf = ft[j - 1] * scale[j - 1]
        torch.sub(running, cf * float(j), out=elevated[j])
        running = running + cf
    elevated[0] = running

    # nearest remainder-0 point (round half to even, as SSE's cvtps does); its coordinate
    # sum, an integer held exactly in float32, says how far the point is off the plane
    v = torch.round(elevated * down)
    remainder0 = v * up
    if remainder0.abs().max() >= 2 ** 30:                       # held in int32 below
        raise ValueError("permutohedral lattice: features too large for the lattice "
                         "coordinates; use larger standard deviations")

    # rank of each residual coordinate, largest first (ties: the lower index ranks higher),
    # plus the sum (|sum| <= d+1); in int8, the smallest type: fewer bytes to move
    residual = elevated - remainder0
    rank = v.sum(0).to(torch.int8).expand(d + 1, n).clone()
    for i in range(d):
        lower = residual[i] < residual[i + 1:]                  # (d - i, N)
        rank[i] += lower.sum(0, dtype=torch.int8)
        rank[i + 1:] += ~lower
    shift = ((rank < 0).to(torch.int8) - (rank > d).to(torch.int8)) * (d + 1)
    rank += shift                                                # back onto the plane
    remainder0 = remainder0.int() + shift

    # barycentric weights (p. 10 of Adams et al.): with s[t] the residual / (d+1) of the
    # coordinate ranked d - t, b[t] = s[t] - s[t-1] and b[0] = s[0] + (1 - s[d]) (the C++
    # adds 1.0 in double there)
    v = (elevated - remainder0.float()) * down
    coordinate = torch.empty(d + 1, n, dtype=torch.long, device=dev).scatter_(
        0, rank.long(), torch.arange(d + 1, device=dev)[:, None].expand(d + 1, n))
    s = v.gather(0, coordinate.flip(0))
    bary = torch.empty(d + 1, n, dtype=torch.float32, device=dev)
    torch.sub(s[1:], s[:-1], out=bary[1:])
    bary[0] = s[0].double().add_(1.0 - s[d].double())
    return rank, remainder0, bary


def mixed_radix(radix: list[int]) -> tuple[int, list[int]]:
    """(code range, strides) of vertex codes in mixed radix `radix` (the last coordinate the
    fastest digit); too wide a range for int64 codes is a ValueError."""
    r = math.prod(radix)
    if r >= 2 ** 62:
        raise ValueError(f"permutohedral lattice: features span too many lattice cells to index "
                         f"({radix} per axis); use larger standard deviations")
    strides = [1] * len(radix)
    for i in range(len(radix) - 2, -1, -1):
        strides[i] = strides[i + 1] * radix[i + 1]
    return r, strides


def _vertex_keys(rank: Tensor, remainder0: Tensor):
    """One integer code per simplex vertex within its class: codes (d+1, N), row k for vertex
    k of each point, and (R, strides, sum of strides), the code's layout.

    Vertex k is remainder0 + the canonical vertex k permuted by rank; its coordinates are k or
    k - (d+1), so all of them share a remainder mod d+1 (its class, = k); within the class it
    is coded by its first d quotients in mixed radix (< R); key = class * R + code. The radix
    leaves a margin of one digit value each side for the vertices and one more for their blur
    neighbours. int32 codes where R allows (a faster sort), else int64."""
    d = rank.shape[0] - 1
    dev = rank.device
    q0 = torch.div(remainder0[:d], d + 1, rounding_mode="floor")           # exact: multiples
    lo = q0.amin(1) - 2                              # margins: simplex -1, neighbour -1
    radix = (q0.amax(1) + 2 - lo).tolist()           # neighbour +1, one spare digit value
    r, strides = mixed_radix(radix)
    code_type = torch.int32 if r <= _INT32_MAX else torch.long
    stride = torch.tensor(strides, dtype=code_type, device=dev)
    base = ((q0 - lo[:, None]).to(code_type) * stride[:, None]).sum(0, dtype=code_type)   # (N,)
    # quotient of coordinate i of vertex k is q0_i - [rank_i > d - k], so vertex k's code
    # drops by the strides of the coordinates ranked d-k+1..d (coordinate d has none)
    by_rank = torch.zeros(d + 1, rank.shape[1], dtype=code_type, device=dev)
    by_rank.scatter_(0, rank[:d].long(), stride[:, None].expand(d, rank.shape[1]))
    flipped = by_rank.flip(0)
    drop = torch.cumsum(flipped, 0, dtype=code_type).sub_(flipped)         # drop[k]
    return drop.neg_().add_(base), (r, strides, sum(strides))


def _lookup(keys: Tensor, key_range: int):
    """A function mapping queries (in [0, key_range)) to their index in the sorted distinct
    `keys`, -1 if absent. A direct table when the range is small; else a hash table (a
    multiplicative hash onto 8x as many slots as keys): a query whose slot holds exactly
    one key is settled by comparing with it, the few whose slot holds several by a binary
    search. (torch has no hash map; a binary search for every query was 3x slower here.)"""
    m, dev = keys.numel(), keys.device
    if key_range <= max(8 * m, 2 ** 16):
        table = torch.full((key_range,), -1, dtype=torch.long, device=dev)
        table.index_copy_(0, keys.long(), torch.arange(m, device=dev))
        return lambda query: table.index_select(0, query)
    if m == 0:
        return lambda query: torch.full(query.shape, -1, dtype=torch.long, device=dev)
    bits = max(4, math.ceil(math.log2(8 * m)))

    def slot(x: Tensor) -> Tensor:             # y * A mod 2^32, top bits; y < 2^31: no overflow
        y = x.long()
        if x.dtype == torch.long:
            y = (y ^ (y >> 31)) & 0x7FFFFFFF
        return ((y * _HASH_MULTIPLIER) & 0xFFFFFFFF) >> (32 - bits)

    key_slots = slot(keys)
    shared = torch.bincount(key_slots, minlength=1 << bits) > 1
    table = torch.full((1 << bits,), -1, dtype=torch.long, device=dev)
    table.index_copy_(0, key_slots, torch.arange(m, device=dev))
    table.masked_fill_(shared, -2)                                  # -2: ask the binary search

    def find(query: Tensor) -> Tensor:
        entry = table.index_select(0, slot(query))
        hit = keys.index_select(0, entry.clamp(min=0)) == query
        found = torch.where(hit & (entry >= 0), entry, -1)
        ask = (entry == -2).nonzero().squeeze(1)
        if ask.numel():
            asked = query.index_select(0, ask)
            idx = torch.searchsorted(keys, asked).clamp_(max=m - 1)
            found.index_copy_(0, ask, torch.where(keys.index_select(0, idx) == asked, idx, -1))
        return found
    return find


def _offsets(counts: Tensor) -> Tensor:
    """Row counts -> row offsets [0, c0, c0 + c1, ...] (int64)."""
    return torch.cat([counts.new_zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
