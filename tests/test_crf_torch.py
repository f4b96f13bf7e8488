"""The pure-PyTorch dense CRF (seglab/densecrf/torch_crf.py) and its permutohedral lattice
(seglab/densecrf/permutohedral.py).

References written another way: pydensecrf (Krähenbühl's C++ lattice) on generated scenes, an
exact O(N^2) mean field with explicit Gaussian kernels on a tiny image, the filter taken step by
step (against the fused passes), a Python dict (against the vertex lookups), and clusters filtered
apart (against the int64-code path).
"""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from seglab.densecrf import permutohedral
from seglab.densecrf.torch_crf import PairwiseKernel, dense_crf, gaussian_kernel, kernel_features
from seglab.densecrf.permutohedral import PermutohedralLattice
from numerics import assert_close_to_scale, assert_labels_agree


def scene(h, w, c, seed=0, noise=1.5):
    """(image (H, W, 3) uint8, unary (C, H, W) float32): ellipses of random labels, each label
    a colour plus noise; unary = -log softmax of blurred noisy one-hot logits (clip 1e-5)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ay, ax = rng.uniform(.1, .4) * h, rng.uniform(.1, .4) * w
        lab[((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 < 1] = rng.integers(0, c)
    colours = rng.integers(0, 256, (c, 3))
    img = gaussian_filter(colours[lab] + rng.normal(0, 12, (h, w, 3)), (1, 1, 0))
    img = np.clip(img, 0, 255).astype(np.uint8)
    logits = np.eye(c)[lab].transpose(2, 0, 1) * 3 + rng.normal(0, noise, (c, h, w))
    logits = gaussian_filter(logits, (0, 3, 3)) * 2
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return img, (-np.log(np.clip(p, 1e-5, None))).astype(np.float32)


def pydensecrf_q(img, unary, iterations, normalization, bi_w=4.0, bi_xy_std=67.0, bi_rgb_std=3.0,
                 pos_w=3.0, pos_xy_std=1.0):
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    norm = {"after": dcrf.NORMALIZE_AFTER, "symmetric": dcrf.NORMALIZE_SYMMETRIC,
            "before": dcrf.NORMALIZE_BEFORE, "none": dcrf.NO_NORMALIZATION}[normalization]
    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary.reshape(c, -1)))
    if pos_w:
        d.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w, normalization=norm)
    if bi_w:
        d.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=np.ascontiguousarray(img),
                               compat=bi_w, normalization=norm)
    return np.array(d.inference(iterations)).reshape(c, h, w)


# --- pydensecrf ---------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w, c", [(37, 53, 5), (64, 48, 7), (120, 160, 21)])
@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_labels_and_marginals_match_pydensecrf(h, w, c, normalization):
    img, unary = scene(h, w, c, seed=h + w)
    ref = pydensecrf_q(img, unary, 10, normalization)
    q = dense_crf(img, unary, 10, normalization=normalization)
    assert q.dtype == np.float32 and q.shape == (c, h, w)
    changed = ref.argmax(0) != unary.argmin(0)
    assert changed.mean() > 0.005                        # the CRF does something here
    # measured: every label equal, max |dQ| ~1e-6 (float32 rounding of the same sums)
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.9999
    np.testing.assert_allclose(q, ref, atol=2e-5)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_fp16_lattice_stays_close_to_pydensecrf(normalization):
    """The float16 lattice (the torch-fp16 backend) is not exact: its marginals move by ~1e-3
    (11-bit rounding of every pass) but the labels stay pydensecrf's nearly everywhere."""
    img, unary = scene(120, 160, 21, seed=280)
    ref = pydensecrf_q(img, unary, 10, normalization)
    q16 = dense_crf(img, unary, 10, normalization=normalization, lattice="fp16")
    q32 = dense_crf(img, unary, 10, normalization=normalization)
    assert q16.dtype == np.float32 and np.isfinite(q16).all()
    assert (q16.argmax(0) == ref.argmax(0)).mean() >= 0.999
    err16, err32 = np.abs(q16 - ref).max(), np.abs(q32 - ref).max()
    assert 1e-5 < err16 < 2e-2 and err32 < 2e-5         # really half precision, still close


def test_fp16_lattice_scales_large_sums_instead_of_overflowing():
    """Without normalisation, a flat 500x500 image and a 400 px bilateral kernel sum over 2^17
    (points x weights) into a vertex, twice float16's maximum (65504): the power-of-two scale
    keeps every pass finite, and the result stays near the float32 lattice's."""
    img = np.full((500, 500, 3), 90, np.uint8)
    unary = np.random.default_rng(5).uniform(0, 2, (3, 500, 500)).astype(np.float32)
    kw = dict(normalization="none", pos_w=0.0, bi_w=1e-4, bi_xy_std=400.0)
    kernel = PairwiseKernel(kernel_features(500, 500, 400.0, torch.from_numpy(img), 3.0), 1e-4,
                            "none", lattice="fp16")
    assert kernel.scale <= 2 ** -3                        # peak > 2^17: unscaled, it overflows
    q16, q32 = dense_crf(img, unary, 3, lattice="fp16", **kw), dense_crf(img, unary, 3, **kw)
    assert np.isfinite(q16).all()
    np.testing.assert_allclose(q16, q32, atol=2e-2)      # measured 6e-3 (energies ~13)


@pytest.mark.parametrize("normalization", ["before", "none"])
def test_other_normalizations_match_pydensecrf(normalization):
    img, unary = scene(29, 41, 4, seed=3)
    params = dict(bi_w=0.5, bi_xy_std=5.0, bi_rgb_std=20.0, pos_w=0.5, pos_xy_std=2.0)
    ref = pydensecrf_q(img, unary, 5, normalization, **params)
    q = dense_crf(img, unary, 5, normalization=normalization, **params)
    np.testing.assert_allclose(q, ref, atol=1e-4)


@pytest.mark.parametrize("d", [2, 5])
def test_lattice_filter_matches_pydensecrfs_lattice(d):
    """Raw (unnormalised) filtering. With two labels, one Potts kernel of weight w and no
    normalisation, one mean-field step gives log(Q1_0 / Q1_1) = U1 - U0 + w * filter(Q0_0 - Q0_1),
    so pydensecrf's filter output can be read back and compared with the lattice's."""
    h, w, weight = 23, 31, 0.2
    img, unary = scene(h, w, 2, seed=d, noise=2.0)
    kernel = dict(bi_w=0, pos_w=weight, pos_xy_std=1.5) if d == 2 else \
        dict(pos_w=0, bi_w=weight, bi_xy_std=4.0, bi_rgb_std=15.0)
    q1 = pydensecrf_q(img, unary, 1, "none", **kernel).astype(np.float64)
    ref = (np.log(q1[0] / q1[1]) - (unary[1] - unary[0])) / weight
    q0 = torch.softmax(-torch.from_numpy(unary).reshape(2, -1).t(), 1)
    features = (kernel_features(h, w, 1.5) if d == 2 else
                kernel_features(h, w, 4.0, torch.from_numpy(img), 15.0))
    ours = PermutohedralLattice(features).filter(q0[:, :1] - q0[:, 1:]).reshape(h, w).numpy()
    assert np.abs(ref).max() > 0.5                       # a signal, not just noise
    np.testing.assert_allclose(ours, ref, atol=2e-4)


@pytest.mark.parametrize("h, w, c", [(1, 1, 3), (1, 7, 2), (9, 1, 4), (2, 2, 21)])
def test_degenerate_shapes_match_pydensecrf(h, w, c):
    rng = np.random.default_rng(h * 10 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    unary = rng.uniform(0, 3, (c, h, w)).astype(np.float32)
    np.testing.assert_allclose(dense_crf(img, unary, 10), pydensecrf_q(img, unary, 10, "after"),
                               atol=1e-6)


def test_extreme_energies_stay_finite():
    """Unaries far from 0 (exp would under/overflow) and unnormalised messages in the
    hundreds (no normalisation with the paper's wide bilateral kernel) still match."""
    img, unary = scene(20, 30, 4, seed=8)
    for shifted in (unary + 800.0, unary * 40.0 - 300.0):
        ref, q = pydensecrf_q(img, shifted, 5, "after"), dense_crf(img, shifted, 5)
        # float32 sums at |energy| ~ 800 round to ~6e-5 (in pydensecrf too): |dQ| ~2e-4 of the
        # marginals' scale, 1; a label may flip only where two marginals are that close
        assert_close_to_scale(q, ref, 1e-3)
        assert_labels_agree(q, ref, 1e-3)
    ref = pydensecrf_q(img, unary, 5, "none")
    q = dense_crf(img, unary, 5, normalization="none")
    assert np.isfinite(q).all()
    assert (q.argmax(0) == ref.argmax(0)).mean() >= 0.999
    np.testing.assert_allclose(q, ref, atol=1e-4)


def test_one_label_gives_certainty():
    img, unary = scene(21, 34, 3, seed=1)
    q = dense_crf(img, unary[:1], 10)
    assert np.array_equal(q, np.ones((1, 21, 34), np.float32))
    assert np.array_equal(pydensecrf_q(img, unary[:1], 10, "after"), q)


# --- exact mean field ---------------------------------------------------------------------------

def exact_mean_field(img, unary, iterations, feature_scale=1.0, bi_w=4.0, bi_xy_std=67.0,
                     bi_rgb_std=3.0, pos_w=3.0, pos_xy_std=1.0):
    """Normalise-after mean field with explicit kernels exp(-|f_i - f_j|^2 / 2), all pairs."""
    c, h, w = unary.shape
    yy, xx = np.mgrid[:h, :w].reshape(2, -1).astype(np.float64)
    rgb = img.reshape(-1, 3).astype(np.float64)
    xy = np.stack([xx, yy], 1)
    kernels = []
    for weight, feats in [(pos_w, xy / pos_xy_std),
                          (bi_w, np.concatenate([xy / bi_xy_std, rgb / bi_rgb_std], 1))]:
        feats = feats * feature_scale
        k = np.exp(-0.5 * ((feats[:, None] - feats[None]) ** 2).sum(-1))
        kernels.append(weight * k / k.sum(1, keepdims=True))

    def softmax(e):
        e = np.exp(e - e.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    neg_u = -unary.reshape(c, -1).T.astype(np.float64)
    q = softmax(neg_u)
    for _ in range(iterations):
        q = softmax(neg_u + sum(k @ q for k in kernels))
    return q.T.reshape(c, h, w)


def quadrants(seed, h=10, w=12, c=4):
    """A tiny scene where the CRF matters: four colour quadrants (noise sd 20), one label each,
    unary = -log softmax(one-hot + N(0, 1)) so that ~15% of the labels are wrong."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    lab[:, w // 2:] = 1
    lab[h // 2:, :] += 2
    img = np.clip(rng.integers(0, 256, (c, 3))[lab] + rng.normal(0, 20, (h, w, 3)), 0, 255)
    logits = np.eye(c)[lab].transpose(2, 0, 1) + rng.normal(0, 1.0, (c, h, w))
    p = np.exp(logits) / np.exp(logits).sum(0)
    return img.astype(np.uint8), (-np.log(p)).astype(np.float32)


def test_close_to_exact_mean_field_within_the_lattice_error():
    """The lattice's kernel is only roughly Gaussian: its raw weights are off by 0.3-0.6 on
    such tiny images, and normalisation cancels most of that. Measured on 8 such scenes after
    one update: max |dQ| 0.03-0.08, mean |dQ| 0.0019-0.0032; after ten, 97.5-100% equal
    labels. The exact mean field with kernels of the wrong width (features x 2 or x 0.5) is
    0.015-0.031 away in mean |dQ|, so the bounds below tell a right lattice from a wrong one."""
    img, unary = quadrants(seed=0)
    one = dense_crf(img, unary, 1)
    error = np.abs(one - exact_mean_field(img, unary, 1))
    assert error.max() < 0.1 and error.mean() < 0.005
    ten, exact_ten = dense_crf(img, unary, 10), exact_mean_field(img, unary, 10)
    assert (exact_ten.argmax(0) != unary.argmin(0)).mean() > 0.1        # the CRF matters here
    assert (ten.argmax(0) == exact_ten.argmax(0)).mean() >= 0.95
    for wrong_width in (2.0, 0.5):
        wrong = exact_mean_field(img, unary, 1, feature_scale=wrong_width)
        assert np.abs(one - wrong).mean() > 0.01


# --- the lattice itself -------------------------------------------------------------------------

def test_lattice_structure():
    torch.manual_seed(0)
    features = torch.randn(500, 3) * 2
    lat = PermutohedralLattice(features)
    assert lat.weight.shape == lat.vertex.shape == (500, 4)
    assert (lat.weight >= -1e-6).all()
    np.testing.assert_allclose(lat.weight.sum(1).numpy(), 1.0, atol=1e-5)
    assert all(len(set(v)) == 4 for v in lat.vertex.tolist())     # d+1 distinct vertices
    m = lat.num_vertices
    assert lat.vertex.max() == m - 1 and torch.unique(lat.vertex).numel() == m
    for j in range(4):                                   # n2 undoes n1 along every axis
        n1, n2 = lat.neighbours[j]
        assert (n1 < m).any()
        found = n1 < m
        assert torch.equal(n2[n1[found]], torch.arange(m)[found])
    # splatting ones conserves the total; filtering is linear
    assert lat.splat(torch.ones(500, 1)).sum().item() == pytest.approx(500, rel=1e-5)
    a, b = torch.randn(500, 2), torch.randn(500, 2)
    np.testing.assert_allclose(lat.filter(2 * a + b).numpy(),
                               (2 * lat.filter(a) + lat.filter(b)).numpy(), atol=1e-4, rtol=1e-4)


def test_far_apart_points_do_not_interact():
    """Two clusters 100 standard deviations apart filter exactly like each cluster alone."""
    torch.manual_seed(1)
    a, b = torch.randn(40, 2), torch.randn(30, 2) + 100
    va, vb = torch.rand(40, 3), torch.rand(30, 3)
    both = PermutohedralLattice(torch.cat([a, b])).filter(torch.cat([va, vb]))
    np.testing.assert_allclose(both[:40].numpy(), PermutohedralLattice(a).filter(va).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both[40:].numpy(), PermutohedralLattice(b).filter(vb).numpy(),
                               rtol=1e-6, atol=1e-6)


def step_by_step(lat, values, reverse=False):
    """The filter as the paper writes it: splat, each blur step alone, slice."""
    out = lat.splat_bags().apply(values)
    for step in (lat.blur_bags()[::-1] if reverse else lat.blur_bags()):
        out = step.apply(out)
    return lat.slice_bags().apply(out)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_filter_passes_equal_the_steps(kind):
    """`filter` runs `passes()`: on a dense lattice (a pixel grid, the Gaussian kernel's) the
    blur goes two steps a pass through 9-entry rows padded with zero weights; on a sparse one
    (colours, the bilateral kernel's) step by step. Either way, the same sums as splat, d+1
    separate blur steps and slice, both directions, to float rounding."""
    torch.manual_seed(2)
    if kind == "dense":
        features = kernel_features(40, 50, 1.0)
    else:
        img = torch.from_numpy(scene(40, 50, 3, seed=9)[0])
        features = kernel_features(40, 50, 10.0, img, 8.0)
    lat = PermutohedralLattice(features)
    n1 = lat.neighbours[:, 0]
    present = (n1 < lat.num_vertices).float().mean().item()
    paired = len(lat.passes()) < lat.dim + 3
    assert paired == (kind == "dense") and paired == (present >= permutohedral._DENSE)
    values = torch.rand(features.shape[0], 4)
    for reverse in (False, True):
        ref = step_by_step(lat, values, reverse)
        np.testing.assert_allclose(lat.filter(values, reverse).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    if kind == "dense":                       # the two directions differ at the grid's border
        assert not torch.allclose(lat.filter(values), lat.filter(values, reverse=True), atol=1e-5)


@pytest.mark.parametrize("key_range", [3_000, 5_000_000, 2 ** 40])
def test_vertex_lookup_matches_a_dict(key_range):
    """The neighbour lookup: a direct table (small range), a hash table with a binary search for
    shared slots (int32 range, int64 range), against a Python dict."""
    gen = torch.Generator().manual_seed(key_range % 1000)
    dtype = torch.int32 if key_range < 2 ** 31 else torch.long
    keys = torch.unique(torch.randint(0, key_range, (2000,), generator=gen)).to(dtype)
    queries = torch.cat([keys[torch.randperm(keys.numel(), generator=gen)[:1500]],
                         torch.randint(0, key_range, (3000,), generator=gen).to(dtype)])
    found = permutohedral._lookup(keys, key_range)(queries)
    where = {int(k): i for i, k in enumerate(keys)}
    assert found.tolist() == [where.get(int(q), -1) for q in queries]
    assert (found >= 0).sum() >= 1500


def test_far_apart_clusters_in_five_dimensions():
    """Two 5-D clusters 1e4 standard deviations apart: their lattice codes need int64 (the
    mixed-radix range passes 2^31) and hashed lookups; each filters as if alone."""
    torch.manual_seed(3)
    a, b = torch.randn(300, 5) * 2, torch.randn(200, 5) * 2 + 1e4
    va, vb = torch.rand(300, 2), torch.rand(200, 2)
    both = PermutohedralLattice(torch.cat([a, b]))
    assert both._key_code[0] > 2 ** 31
    out = both.filter(torch.cat([va, vb]))
    np.testing.assert_allclose(out[:300].numpy(), PermutohedralLattice(a).filter(va).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[300:].numpy(), PermutohedralLattice(b).filter(vb).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_gaussian_kernel_is_built_once_per_size():
    img, unary = scene(19, 23, 3, seed=7)
    gaussian_kernel.cache_clear()
    first = dense_crf(img, unary, 3)
    again = dense_crf(img, unary, 3)
    info = gaussian_kernel.cache_info()
    assert (info.hits, info.misses) == (1, 1)
    assert np.array_equal(first, again)
    dense_crf(img, unary, 3, pos_xy_std=2.0)                  # other settings: another entry
    assert gaussian_kernel.cache_info().misses == 2
    gaussian_kernel.cache_clear()
    assert np.array_equal(dense_crf(img, unary, 3), first)


# --- API ----------------------------------------------------------------------------------------

def test_callback_sees_every_iteration():
    img, unary = scene(17, 22, 3, seed=2)
    seen = {}
    final = dense_crf(img, unary, 5, callback=lambda it, q: seen.__setitem__(it, q.clone()))
    assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    expected0 = torch.softmax(-torch.from_numpy(unary), 0)
    np.testing.assert_allclose(seen[0].numpy(), expected0.numpy(), atol=1e-6)
    np.testing.assert_allclose(seen[1].numpy(), dense_crf(img, unary, 1), atol=1e-6)
    assert np.array_equal(seen[5].numpy(), final)


def test_tensors_in_tensor_out():
    img, unary = scene(15, 19, 3, seed=4)
    q = dense_crf(torch.from_numpy(img), torch.from_numpy(unary), 3)
    assert isinstance(q, torch.Tensor) and q.device.type == "cpu"
    np.testing.assert_allclose(q.numpy(), dense_crf(img, unary, 3), atol=1e-6)


def test_zero_iterations_and_zero_weights_give_the_unary_softmax():
    img, unary = scene(11, 13, 4, seed=5)
    expected = torch.softmax(-torch.from_numpy(unary), 0).numpy()
    np.testing.assert_allclose(dense_crf(img, unary, 0), expected, atol=1e-6)
    np.testing.assert_allclose(dense_crf(img, unary, 4, bi_w=0, pos_w=0), expected, atol=1e-6)


def test_bad_inputs_say_what_is_wrong():
    img, unary = scene(8, 9, 2)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), unary)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dense_crf(img, unary[:, :, :-1])
    with pytest.raises(ValueError, match="normalization"):
        dense_crf(img, unary, normalization="sym")
    with pytest.raises(ValueError, match="standard deviations"):
        dense_crf(img, unary, bi_rgb_std=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    img, unary = scene(48, 64, 6, seed=6)
    cpu = dense_crf(img, unary, 10)
    gpu = dense_crf(img, unary, 10, device="cuda")
    assert isinstance(gpu, np.ndarray)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    q = dense_crf(torch.from_numpy(img).cuda(), torch.from_numpy(unary).cuda(), 10)
    assert q.device.type == "cuda"
    np.testing.assert_allclose(q.cpu().numpy(), cpu, atol=1e-4)
