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
code each vertex as one integer (its remainder class, then its quotients in mixed radix), sort
all N (d+1) codes at once (one stable sort: it numbers the vertices and groups the points that
splat onto each), renumber the vertices in first-use order (the hash table's order, and good
memory locality), and find the blur neighbours by looking their codes up in the sorted codes.

Splat, blur and slice are sparse linear maps, built once per feature set as "embedding bags"
(`Bags`: per output row, a list of input rows and weights) and applied with
`torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)`: on the CPU that is
fbgemm's JIT-compiled gather-and-sum kernel, 2-3x faster here than torch.sparse CSR products
(MKL) on the same maps; it runs on CUDA too. No library offers the lattice itself, hence this file.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_INT32_MAX = 2 ** 31 - 1


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

    def with_weights(self, weights: Tensor) -> "Bags":
        return Bags(self.indices, self.offsets, weights.contiguous())


class PermutohedralLattice:
    """The lattice of `features` (N, d); `filter(values (N, C))` -> (N, C).

    Built once: `vertex` (N, d+1), the lattice vertices of each point's enclosing simplex;
    `weight` (N, d+1) float32, the barycentric weights; `neighbours` (d+1, 2, num_vertices),
    the two neighbours of each vertex along each lattice axis (num_vertices = absent); index
    tensors are int32 (int64 past 2^31 entries). `splat_bags`, `blur_bags` and `slice_bags`
    give the three steps as `Bags`, optionally with a per-point scale folded in.
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
        self.weight = weight.t().contiguous()
        self._blur: Optional[List[Bags]] = None
        self._slice: Optional[Bags] = None

    # ------------------------------------------------------------------------------ building
    def _index_vertices(self, keys: Tensor) -> None:
        """Number the vertices in first-use order (points ascending, then vertex k of each):
        sets `vertex`, `num_vertices`, `neighbours` and the splat grouping `_splat_entries`
        (class-major entries k * N + point, grouped by vertex, points ascending) with its
        `_splat_offsets`. keys: (d+1, N) vertex codes, class-major."""
        d, n, dev, itype = self.dim, self.num_points, self.device, self.index_dtype
        entries = keys.numel()
        sorted_keys, order = torch.sort(keys.reshape(-1), stable=True)
        is_start = torch.ones(entries, dtype=torch.bool, device=dev)
        torch.ne(sorted_keys[1:], sorted_keys[:-1], out=is_start[1:])
        starts = is_start.nonzero().squeeze(1)                  # group starts, key order
        m = starts.numel()
        first = order[starts]                                   # stable: the group's first point
        first_use = (first % n) * (d + 1) + torch.div(first, n, rounding_mode="floor")
        used = torch.zeros(entries, dtype=torch.int32, device=dev)
        used[first_use] = 1
        new_id = torch.cumsum(used, 0, dtype=torch.int64).sub_(1)[first_use]   # key order -> new
        group = torch.cumsum(is_start, 0, dtype=torch.int64).sub_(1)       # sorted position -> group
        vertex = torch.empty(entries, dtype=torch.long, device=dev)
        vertex[order] = new_id[group]
        self.vertex = vertex.view(d + 1, n).t().contiguous().to(itype)
        self.num_vertices = m

        # splat grouping: move each group of sorted entries to its vertex's new place
        counts = torch.diff(starts, append=starts.new_full((1,), entries))
        old_id = torch.empty_like(new_id)
        old_id[new_id] = torch.arange(m, device=dev)                       # new -> key order
        new_offsets = _offsets(counts[old_id])
        shift = (new_offsets[:-1][new_id] - starts)[group]
        splat_entries = torch.empty_like(order)
        splat_entries[shift + torch.arange(entries, device=dev)] = order
        self._splat_entries = splat_entries
        self._splat_offsets = new_offsets.to(itype)
        n1 = self._find_neighbours(sorted_keys[starts].long())
        self._set_neighbours(n1, new_id, old_id)

    def _find_neighbours(self, unique_keys: Tensor) -> Tensor:
        """(d+1, m) long: the neighbour n1 = key - 1 but key_j + d of each vertex (key order)
        along each axis j, as an index into unique_keys, m where absent. In (class, quotients)
        form n1 has class c - 1 and quotients shifted by -[c = 0] (all) and +1 (coordinate j)."""
        d, m = self.dim, unique_keys.numel()
        radix_total, strides, total_stride = self._key_code
        step = torch.where(unique_keys < radix_total, d * radix_total - total_stride, -radix_total)
        base = unique_keys + step
        axis_shift = torch.tensor(strides + [0], dtype=torch.long, device=self.device)
        queries = (base.unsqueeze(0) + axis_shift.unsqueeze(1)).view(-1)
        key_range = (d + 1) * radix_total
        if key_range <= max(4 * queries.numel(), 2 ** 16):        # small: a direct table
            table = torch.full((key_range,), m, dtype=torch.long, device=self.device)
            table[unique_keys] = torch.arange(m, device=self.device)
            return table[queries].view(d + 1, m)
        found = torch.searchsorted(unique_keys, queries).clamp_(max=m - 1)
        return torch.where(unique_keys[found] == queries, found, m).view(d + 1, m)

    def _set_neighbours(self, n1: Tensor, new_id: Tensor, old_id: Tensor) -> None:
        """`neighbours` (d+1, 2, m) in the new numbering: n1 given (key order), n2 its inverse
        (n2(n1(v)) = v); the absent ones (= m) all land in a spare column m, dropped after."""
        m = self.num_vertices
        new_or_absent = torch.cat([new_id, new_id.new_full((1,), m)])
        n1 = new_or_absent[n1.index_select(1, old_id)]
        n2 = torch.full((self.dim + 1, m + 1), m, dtype=torch.long, device=self.device)
        n2.scatter_(1, n1, torch.arange(m, device=self.device).expand_as(n1))
        self.neighbours = torch.stack([n1, n2[:, :m]], 1).to(self.index_dtype)

    # ------------------------------------------------------------------------------ operators
    def splat_bags(self, scale: Optional[Tensor] = None) -> Bags:
        """(N, C) -> (num_vertices, C): the values scale[:, None] * v splatted."""
        points = self._splat_entries % self.num_points
        classes = torch.div(self._splat_entries, self.num_points, rounding_mode="floor")
        weights = self.weight.view(-1)[points * (self.dim + 1) + classes]
        if scale is not None:
            weights = weights * scale[points]
        return Bags(points.to(self.index_dtype), self._splat_offsets, weights)

    def slice_bags(self, scale: Optional[Tensor] = None) -> Bags:
        """(num_vertices, C) -> (N, C): barycentric interpolation, times alpha * scale."""
        if self._slice is None:
            rows = torch.arange(0, self.vertex.numel() + 1, self.dim + 1, device=self.device)
            self._slice = Bags(self.vertex.view(-1), rows.to(self.index_dtype),
                               self.weight.view(-1) * self.alpha)
        if scale is None:
            return self._slice
        return self._slice.with_weights((self._slice.weights.view(self.num_points, -1)
                                         * scale[:, None]).view(-1))

    def blur_bags(self) -> List[Bags]:
        """d+1 maps (num_vertices, C) -> (num_vertices, C): [1/2, 1, 1/2] along axis j,
        the absent neighbours left out."""
        if self._blur is None:
            m, axes, dev = self.num_vertices, self.dim + 1, self.device
            own = torch.arange(m, dtype=self.index_dtype, device=dev).expand(axes, m)
            n1, n2 = self.neighbours.unbind(1)
            columns = torch.stack([n1, own, n2], 2)                      # (axes, m, 3)
            present = columns < m
            weights = torch.tensor([0.5, 1.0, 0.5], device=dev).expand(axes, m, 3)
            indices, weights = columns[present], weights[present]
            offsets = _offsets(present.sum(2).view(-1))
            self._blur = []
            for j in range(axes):
                rows = offsets[j * m:(j + 1) * m + 1]
                lo, hi = int(rows[0]), int(rows[-1])
                self._blur.append(Bags(indices[lo:hi], (rows - lo).to(self.index_dtype),
                                       weights[lo:hi]))
        return self._blur

    # ------------------------------------------------------------------------------ filtering
    def splat(self, values: Tensor) -> Tensor:
        """(N, C) -> (num_vertices, C): barycentric-weighted sums at the vertices."""
        return self.splat_bags().apply(values)

    def blur(self, lattice: Tensor, reverse: bool = False) -> Tensor:
        """[1/2, 1, 1/2] along each lattice axis in turn (0..d, or d..0 if reverse)."""
        blur = self.blur_bags()
        for step in (blur[::-1] if reverse else blur):
            lattice = step.apply(lattice)
        return lattice

    def slice(self, lattice: Tensor) -> Tensor:
        """(num_vertices, C) -> (N, C): barycentric interpolation, times alpha."""
        return self.slice_bags().apply(lattice)

    def filter(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Approximate Gaussian filtering of `values` (N, C) over the features."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be (N={self.num_points}, C), got {tuple(values.shape)}")
        return self.slice(self.blur(self.splat(values.float().contiguous()), reverse))


def _enclosing_simplex(f: Tensor):
    """Features (N, d) -> rank (d+1, N) long, nearest remainder-0 point (d+1, N) long,
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
    total = v.sum(0).long()

    # rank of each residual coordinate, largest first (ties: the lower index ranks higher)
    residual = elevated - remainder0
    rank = total.expand(d + 1, n).clone()
    for i in range(d):
        lower = residual[i] < residual[i + 1:]                  # (d - i, N)
        rank[i] += lower.sum(0)
        rank[i + 1:] += ~lower
    shift = (d + 1) * ((rank < 0).long() - (rank > d).long())    # back onto the plane
    rank += shift
    remainder0 = remainder0.long() + shift

    # barycentric weights (p. 10 of Adams et al.)
    v = (elevated - remainder0.float()) * down
    bary = torch.zeros(d + 2, n, dtype=torch.float32, device=dev)
    bary.scatter_add_(0, d - rank, v)
    bary.scatter_add_(0, d - rank + 1, -v)
    bary[0] += 1.0 + bary[d + 1]
    return rank, remainder0, bary[: d + 1]


def _vertex_keys(rank: Tensor, remainder0: Tensor):
    """One integer code per simplex vertex: keys (d+1, N), vertex k of each point, and
    (R, strides, sum of strides), the code's layout.

    Vertex k is remainder0 + the canonical vertex k permuted by rank; its coordinates are k or
    k - (d+1), so all of them share a remainder mod d+1 (its class, = k) and it is coded as
    class * R + (its first d quotients in mixed radix, < R). The radix leaves a margin of one
    digit value each side for the vertices and one more for their blur neighbours."""
    d = rank.shape[0] - 1
    dev = rank.device
    q0 = torch.div(remainder0[:d], d + 1, rounding_mode="floor")           # exact: multiples
    lo = q0.amin(1) - 2                              # margins: simplex -1, neighbour -1
    radix = (q0.amax(1) + 2 - lo).tolist()           # neighbour +1, one spare digit value
    r = math.prod(radix)
    if r * (d + 1) >= 2 ** 62:
        raise ValueError(f"permutohedral lattice: features span too many lattice cells to index "
                         f"({radix} per axis); use larger standard deviations")
    strides = [1] * d
    for i in range(d - 2, -1, -1):
        strides[i] = strides[i + 1] * radix[i + 1]
    stride = torch.tensor(strides, dtype=torch.long, device=dev)
    base = ((q0 - lo[:, None]) * stride[:, None]).sum(0)                    # (N,)
    # quotient of coordinate i of vertex k is q0_i - [rank_i > d - k], so vertex k's code
    # drops by the strides of the coordinates ranked d-k+1..d (coordinate d has none)
    by_rank = torch.zeros_like(rank)
    by_rank.scatter_(0, rank[:d], stride[:, None].expand(d, rank.shape[1]))
    flipped = by_rank.flip(0)
    drop = torch.cumsum(flipped, 0) - flipped                               # drop[k]
    classes = torch.arange(d + 1, device=dev)[:, None] * r
    keys = base - drop + classes
    if r * (d + 1) <= _INT32_MAX:
        keys = keys.int()                            # a faster sort
    return keys, (r, strides, sum(strides))


def _offsets(counts: Tensor) -> Tensor:
    """Row counts -> row offsets [0, c0, c0 + c1, ...] (int64)."""
    return torch.cat([counts.new_zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
