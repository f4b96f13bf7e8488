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
code each vertex key as (remainder class, mixed-radix integer), sort the codes class by class
(numbering the vertices and grouping the points that splat onto each), find the blur
neighbours by a sorted search, and renumber the vertices in first-use order (the hash table's
order, and good memory locality). Splat, blur and slice are then sparse CSR matrices built
once per feature set: filtering C value channels costs d+3 sparse-dense products, CPU or GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
from torch import Tensor


class PermutohedralLattice:
    """The lattice of `features` (N, d); `filter(values (N, C))` -> (N, C).

    Built once: `vertex` (N, d+1) long, the lattice vertices of each point's enclosing simplex;
    `weight` (N, d+1) float32, the barycentric weights; `neighbours` (d+1, 2, num_vertices)
    long, the two neighbours of each vertex along each lattice axis (num_vertices = absent).
    `splat_matrix`, `blur_matrices` and `slice_matrix` give the three steps as sparse CSR
    matrices (int32 indices), optionally with a per-point scale folded in.
    """

    def __init__(self, features: Tensor):
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be (N, d) with N, d > 0, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features must be finite (check the standard deviations: none may be 0)")
        self.num_points, self.dim = features.shape
        self.device = features.device
        self.alpha = 1.0 / (1.0 + 2.0 ** -self.dim)
        rank, remainder0, self.weight = self._enclosing_simplex(features.float())
        self._index_vertices(rank, remainder0)
        self._splat: Optional[Tensor] = None
        self._slice: Optional[Tensor] = None
        self._blur: Optional[List[Tensor]] = None

    # ------------------------------------------------------------------------------ building
    def _enclosing_simplex(self, f: Tensor):
        """Elevated point -> rank (N, d+1) long, nearest remainder-0 point (N, d+1) long,
        barycentric weights (N, d+1) float32; float32 operations in the C++'s order."""
        d, n, dev = self.dim, f.shape[0], f.device
        f32 = lambda x: torch.tensor(x, dtype=torch.float32, device=dev)  # noqa: E731
        inv_std_dev = float(f32(math.sqrt(2.0 / 3.0) * (d + 1)))
        scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev) for i in range(d)]
        down, up = f32(1.0 / (d + 1)), f32(float(d + 1))

        # elevate (y = E p, p. 5 of Adams et al.), accumulated from the last coordinate down
        elevated = torch.empty(n, d + 1, dtype=torch.float32, device=dev)
        running = torch.zeros(n, dtype=torch.float32, device=dev)
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * scale[j - 1]
            elevated[:, j] = running - cf * float(j)
            running = running + cf
        elevated[:, 0] = running

        # nearest remainder-0 point (round half to even, as SSE's cvtps does); its coordinate
        # sum, an integer held exactly in float32, says how far the point is off the plane
        v = torch.round(elevated * down)
        remainder0 = v * up
        total = v.sum(1).long()

        # rank of each residual coordinate, largest first (ties: the lower index ranks higher)
        residual = elevated - remainder0
        rank = [total.clone() for _ in range(d + 1)]
        for i in range(d):
            for j in range(i + 1, d + 1):
                lower = (residual[:, i] < residual[:, j]).long()
                rank[i] += lower
                rank[j] += 1 - lower
        rank = torch.stack(rank, 1)
        shift = (d + 1) * ((rank < 0).long() - (rank > d).long())    # back onto the plane
        rank = rank + shift
        remainder0 = remainder0.long() + shift

        # barycentric weights (p. 10 of Adams et al.)
        v = (elevated - remainder0.float()) * down
        bary = torch.zeros(n, d + 2, dtype=torch.float32, device=dev)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        return rank, remainder0, bary[:, : d + 1].contiguous()

    def _index_vertices(self, rank: Tensor, remainder0: Tensor) -> None:
        """Number the lattice vertices (`vertex`), group the points splatting onto each
        (`_order`, `_counts`), and find every vertex's blur neighbours (`neighbours`).

        Vertex k of a point's simplex is remainder0 + the canonical vertex k permuted by rank;
        its coordinates are k or k - (d+1), so all d stored coordinates of a vertex share a
        remainder mod d+1 (its class, = k) and it is coded as class * R + (its quotients in
        mixed radix, < R). Sorting numbers them in code order; they are renumbered after."""
        d, n, dev = self.dim, self.num_points, self.device
        q0 = torch.div(remainder0[:, :d], d + 1, rounding_mode="floor")   # exact: multiples
        lo = q0.amin(0) - 2                              # margins: simplex -1, neighbour -1
        radix = (q0.amax(0) + 2 - lo).tolist()           # neighbour +1, one spare digit value
        r = math.prod(radix)
        if r * (d + 1) >= 2 ** 62:
            raise ValueError(f"permutohedral lattice: features span too many lattice cells to index "
                             f"({radix} per axis); use larger standard deviations")
        stride = [1] * d
        for i in range(d - 2, -1, -1):
            stride[i] = stride[i + 1] * radix[i + 1]
        stride = torch.tensor(stride, dtype=torch.long, device=dev)
        base = ((q0 - lo) * stride).sum(1)                               # (N,)
        # quotient of coordinate i of vertex k is q0_i - [rank_i > d - k], so vertex k's code
        # drops by the strides of the coordinates ranked d-k+1..d (coordinate d has none)
        by_rank = torch.zeros(n, d + 1, dtype=torch.long, device=dev)
        by_rank.scatter_(1, rank, torch.cat([stride, stride.new_zeros(1)]).expand(n, d + 1))
        drop = torch.cumsum(by_rank.flip(1), 1) - by_rank.flip(1)          # drop[:, k]

        # sort class by class (int32 keys where they fit: a faster sort); a stable sort keeps
        # the points of each vertex in ascending order, as the C++ accumulates them
        key_dtype = torch.int32 if r < 2 ** 31 else torch.long
        vertex = torch.empty(d + 1, n, dtype=torch.long, device=dev)
        quotients, orders, counts, first = [], [], [], [0]
        for k in range(d + 1):
            keys, order = torch.sort(drop[:, k].neg().add_(base).to(key_dtype), stable=True)
            unique, inverse, count = torch.unique_consecutive(keys, return_inverse=True,
                                                              return_counts=True)
            vertex[k, order] = inverse + first[-1]
            quotients.append(unique.long())
            orders.append(order * (d + 1) + k)
            counts.append(count)
            first.append(first[-1] + unique.numel())
        m = first[-1]
        order, counts = torch.cat(orders), torch.cat(counts)

        # neighbours along axis j: n1 = key - 1 but key_j + d; n2 = key + 1 but key_j - d, the
        # inverse step (n2(n1(v)) = v), so only n1 is looked up. In (class, quotients) form n1
        # has class c - 1 and quotients shifted by -[c = 0] (all) and +1 (coordinate j); each
        # class's queries are sorted, searched in the previous class's sorted quotients.
        n1 = torch.full((d + 1, m), m, dtype=torch.long, device=dev)
        total_stride = int(stride.sum())
        for c in range(d + 1):
            target = (c - 1) % (d + 1)
            lookup = _sorted_lookup(quotients[target], r)
            shifted = quotients[c] - (total_stride if c == 0 else 0)
            for j in range(d + 1):
                found = lookup(shifted + (int(stride[j]) if j < d else 0))
                n1[j, first[c]:first[c + 1]] = torch.where(found >= 0, found + first[target], m)
        self._renumber_by_first_use(vertex.t(), n1, order, counts)

    def _renumber_by_first_use(self, vertex: Tensor, n1: Tensor, order: Tensor, counts: Tensor) -> None:
        """Renumber the vertices in the order the points first use them (the insertion order
        of the C++ hash table): vertices of nearby pixels then sit nearby in memory, which
        makes the sparse products 1.5-3x faster. Sets `vertex`, `neighbours` (n1 given, n2 its
        inverse), `num_vertices`, and the splat grouping `_order` (entries of vertex.view(-1)
        grouped by vertex, points ascending) with its group sizes `_counts`."""
        m, dev = counts.numel(), self.device
        entries = vertex.numel()
        first = torch.full((m,), entries, dtype=torch.long, device=dev).scatter_reduce_(
            0, vertex.reshape(-1), torch.arange(entries, device=dev), "amin")
        used_first = torch.zeros(entries, dtype=torch.long, device=dev)
        used_first[first] = 1
        new_id = (torch.cumsum(used_first, 0) - 1)[first]               # old -> new
        old_id = torch.empty_like(new_id)
        old_id[new_id] = torch.arange(m, device=dev)                      # new -> old
        self.vertex = new_id[vertex]
        self.num_vertices = m
        new_id_or_absent = torch.cat([new_id, new_id.new_full((1,), m)])
        n1 = new_id_or_absent[n1[:, old_id]]
        # n2 inverts n1; the absent ones (= m) all land in a spare column m, dropped after
        n2 = torch.full((self.dim + 1, m + 1), m, dtype=torch.long, device=dev)
        n2.scatter_(1, n1, torch.arange(m, device=dev).expand_as(n1))
        self.neighbours = torch.stack([n1, n2[:, :m]], 1)
        # move each vertex's group of splat entries to its new place, keeping its order
        old_start = _offsets(counts)[:-1][old_id]
        self._counts = counts[old_id]
        new_start = _offsets(self._counts)[:-1]
        shift = torch.repeat_interleave(old_start - new_start, self._counts)
        self._order = order[shift + torch.arange(order.numel(), device=dev)]

    # ------------------------------------------------------------------------------ operators
    def splat_matrix(self, scale: Optional[Tensor] = None) -> Tensor:
        """Sparse CSR (num_vertices, N): `splat_matrix(s) @ v` splats the values s[:, None] * v."""
        if self._splat is None:
            points = self._order // (self.dim + 1)       # grouped by vertex, points ascending
            self._splat = _csr(_offsets(self._counts), points, self.weight.reshape(-1)[self._order],
                               (self.num_vertices, self.num_points))
            self._splat_points = points
        if scale is None:
            return self._splat
        return _with_values(self._splat, self._splat.values() * scale[self._splat_points])

    def slice_matrix(self, scale: Optional[Tensor] = None) -> Tensor:
        """Sparse CSR (N, num_vertices): `slice_matrix(s) @ lattice` slices, times alpha * s."""
        if self._slice is None:
            columns, pos = torch.sort(self.vertex, 1)
            values = torch.gather(self.weight, 1, pos) * self.alpha
            rows = torch.arange(0, self.vertex.numel() + 1, self.dim + 1, device=self.device)
            self._slice = _csr(rows, columns.reshape(-1), values.reshape(-1),
                               (self.num_points, self.num_vertices))
        if scale is None:
            return self._slice
        values = self._slice.values().view(self.num_points, -1) * scale[:, None]
        return _with_values(self._slice, values.view(-1))

    def blur_matrices(self) -> List[Tensor]:
        """d+1 sparse CSR (num_vertices, num_vertices): [1/2, 1, 1/2] along lattice axis j."""
        if self._blur is None:
            m = self.num_vertices
            own = torch.arange(m, device=self.device)
            self._blur = []
            for n1, n2 in self.neighbours:
                # the row's columns n1, own, n2 in ascending order (absent = m sort last)
                low, high = torch.minimum(n1, n2), torch.maximum(n1, n2)
                first, last = torch.minimum(low, own), torch.maximum(high, own)
                columns = torch.stack([first, low + high + own - first - last, last], 1)
                values = torch.where(columns == own[:, None], 1.0, 0.5).float()
                present = columns < m
                keep = present.view(-1).nonzero().squeeze(1)
                self._blur.append(_csr(_offsets(present.sum(1)), columns.view(-1)[keep],
                                       values.view(-1)[keep], (m, m)))
        return self._blur

    # ------------------------------------------------------------------------------ filtering
    def splat(self, values: Tensor) -> Tensor:
        """(N, C) -> (num_vertices, C): barycentric-weighted sums at the vertices."""
        return self.splat_matrix() @ values

    def blur(self, lattice: Tensor, reverse: bool = False) -> Tensor:
        """[1/2, 1, 1/2] along each lattice axis in turn (0..d, or d..0 if reverse)."""
        blur = self.blur_matrices()
        for step in (blur[::-1] if reverse else blur):
            lattice = step @ lattice
        return lattice

    def slice(self, lattice: Tensor) -> Tensor:
        """(num_vertices, C) -> (N, C): barycentric interpolation, times alpha."""
        return self.slice_matrix() @ lattice

    def filter(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Approximate Gaussian filtering of `values` (N, C) over the features."""
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(f"values must be (N={self.num_points}, C), got {tuple(values.shape)}")
        return self.slice(self.blur(self.splat(values.float().contiguous()), reverse))


def _sorted_lookup(keys: Tensor, key_range: int):
    """A function mapping int64 queries to their index in the sorted distinct `keys`, -1 if
    absent: a dense table when the key range is small, else a binary search."""
    m = keys.numel()
    if key_range <= max(8 * m, 2 ** 16):
        table = torch.full((key_range + 1,), -1, dtype=torch.long, device=keys.device)
        table[keys] = torch.arange(m, device=keys.device)
        return lambda query: table[query.clamp(0, key_range)]

    def search(query: Tensor) -> Tensor:
        idx = torch.searchsorted(keys, query).clamp_(max=max(m - 1, 0))
        return torch.where(keys[idx] == query, idx, -1) if m else torch.full_like(query, -1)
    return search


def _offsets(counts: Tensor) -> Tensor:
    """Row counts -> CSR row offsets [0, c0, c0 + c1, ...]."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _with_values(matrix: Tensor, values: Tensor) -> Tensor:
    """The CSR `matrix` pattern (shared index tensors) with new values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(matrix.crow_indices(), matrix.col_indices(), values.contiguous(),
                                       matrix.shape)


def _csr(row_offsets: Tensor, columns: Tensor, values: Tensor, shape) -> Tensor:
    """A sparse CSR matrix with int32 indices (MKL and cuSPARSE take them without a copy)."""
    if max(shape) >= 2 ** 31 or columns.numel() >= 2 ** 31:
        index_dtype = torch.long
    else:
        index_dtype = torch.int32
    with warnings.catch_warnings():                 # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_offsets.to(index_dtype), columns.to(index_dtype),
                                       values.contiguous(), shape)
