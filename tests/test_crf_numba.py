"""The compiled lattice (permutohedral_numba.py, crf.backend=numba) against the tensor-op lattice
(permutohedral.py) and pydensecrf.

The lattices must be the same lattice (vertex numbering, barycentric weights, neighbours) and
filter to float rounding; the fused mean field must give pydensecrf's labels wherever its two
best marginals are not a near-tie (a float tie may flip either way). Small images only: the
compiled functions load from numba's cache (the first run in a fresh checkout compiles them,
~15 s on a busy 2-core machine).
"""
import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed: the compiled CRF lattice "
                                    "(crf.backend=numba) is optional (`pip install numba`)")

from seglab.densecrf import permutohedral_numba as pn  # noqa: E402
from seglab.densecrf.dense_crf import DenseCRF, resolve_backend  # noqa: E402
from seglab.densecrf.params import CRFParams  # noqa: E402
from seglab.densecrf.permutohedral import PermutohedralLattice  # noqa: E402
from seglab.densecrf.torch_crf import PairwiseKernel, dense_crf, kernel_features  # noqa: E402
from test_crf_torch import pydensecrf_q, scene  # noqa: E402

TIE = 1e-4        # pydensecrf's top-2 marginals closer than this: either label is right


def assert_close_to_scale(got, want, rel):
    """|got - want| <= rel * max|want| (rounding scales with the values summed, not with
    each output: a fixed atol is no bound)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    err, bound = np.abs(got - want).max(), rel * np.abs(want).max()
    assert err <= bound, f"max |difference| {err:.3g} > {rel:g} x scale = {bound:.3g}"


def assert_labels_match(q, ref):
    """argmax equal wherever pydensecrf's best two marginals differ by more than TIE."""
    top2 = np.sort(ref, 0)[-2:] if ref.shape[0] > 1 else None
    decided = (top2[1] - top2[0] > TIE) if top2 is not None else np.ones(ref.shape[1:], bool)
    differ = (q.argmax(0) != ref.argmax(0)) & decided
    assert not differ.any(), f"{int(differ.sum())} of {int(decided.sum())} decided labels differ"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def features(kind, h=30, w=40, seed=0):
    img = torch.from_numpy(scene(h, w, 5, seed=seed)[0])
    return kernel_features(h, w, 1.5) if kind == "gaussian" else \
        kernel_features(h, w, 6.0, img, 12.0)


# --- the lattice ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "bilateral"])
def test_same_lattice_as_the_tensor_op_one(kind):
    """Vertex numbering (first use), barycentric weights and blur neighbours are identical."""
    f = features(kind)
    ours, ref = pn.NumbaLattice(f), PermutohedralLattice(f)
    assert ours.num_vertices == ref.num_vertices
    assert np.array_equal(ours.vertex, ref.vertex.numpy())
    assert np.array_equal(ours.weight, ref.weight.numpy())          # bit for bit
    assert np.array_equal(ours.neighbours, ref.neighbours.numpy())


@pytest.mark.parametrize("kind", ["gaussian", "bilateral"])
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "pass-by-pass"])
@pytest.mark.parametrize("reverse", [False, True])
def test_filter_equals_the_tensor_op_lattice(kind, pipelined, reverse):
    """Both blur schedules (one sweep with rings, or d+1 passes), both axis orders, a
    non-contiguous input: the same sums as embedding_bag's to a few ulps of the scale."""
    f = features(kind)
    ours, ref = pn.NumbaLattice(f), PermutohedralLattice(f)
    ours.pipelined = pipelined
    values = torch.rand(7, f.shape[0], generator=torch.Generator().manual_seed(1)).t() * 3 - 1
    assert not values.is_contiguous()
    got = ours.filter(values, reverse=reverse)
    assert isinstance(got, torch.Tensor)
    assert_close_to_scale(got, ref.filter(values, reverse=reverse), 1e-6)
    assert_close_to_scale(ours.filter(values.numpy()[:, :1]), ref.filter(values[:, :1]), 1e-6)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_kernel_message_equals_the_tensor_op_kernel(normalization):
    """The kernel (normalisation and weight folded in) as torch_crf's PairwiseKernel."""
    f = features("bilateral")
    ours, ref = pn.NumbaKernel(f, 4.0, normalization), PairwiseKernel(f, 4.0, normalization)
    q = torch.softmax(torch.randn(f.shape[0], 6, generator=torch.Generator().manual_seed(2)), 1)
    assert_close_to_scale(ours.message(q), ref.message(q), 1e-6)
    assert_close_to_scale(ours.bound, ref.bound, 1e-6)


def test_features_too_spread_are_refused():
    with pytest.raises(ValueError, match="standard deviations"):
        pn.NumbaLattice(torch.tensor([[0.0, 0.0], [1e7, 1e7]]))
    with pytest.raises(ValueError, match="finite"):
        pn.NumbaLattice(torch.tensor([[0.0, float("nan")]]))


# --- the fused mean field ---------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_labels_equal_pydensecrf_21_labels(normalization):
    img, unary = scene(60, 80, 21, seed=21)
    ref = pydensecrf_q(img, unary, 10, normalization)
    q = dense_crf(img, unary, 10, normalization=normalization, lattice="numba")
    assert q.dtype == np.float32 and q.shape == unary.shape
    assert (ref.argmax(0) != unary.argmin(0)).mean() > 0.005       # the CRF does something
    assert_labels_match(q, ref)
    assert_close_to_scale(q, ref, 1e-5)                             # measured ~5e-7
    assert_close_to_scale(q, dense_crf(img, unary, 10, normalization=normalization), 1e-5)


def test_one_label_and_many_labels(monkeypatch):
    """Also the pass-by-pass blur in the mean field (that of large colour lattices)."""
    monkeypatch.setattr(pn, "_PIPE_WINDOW", 0)
    img, unary = scene(23, 31, 40, seed=4)
    q1 = dense_crf(img, unary[:1], 10, lattice="numba")
    assert np.array_equal(q1, np.ones((1, 23, 31), np.float32))
    ref = pydensecrf_q(img, unary, 10, "after")                     # 40 labels: 5 x 8 floats
    q = dense_crf(img, unary, 10, lattice="numba")
    assert_labels_match(q, ref)
    assert_close_to_scale(q, ref, 1e-5)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
def test_two_threads_give_the_same_marginals(normalization, two_threads):
    """The parallel loops (pixel blocks splatting into their own lattices, summed by the
    blur; the blur in vertex blocks): the same labels, marginals to rounding. Small: two
    OpenMP threads crawl on a loaded 2-core machine."""
    img, unary = scene(24, 32, 21, seed=9)
    q2 = dense_crf(img, unary, 10, normalization=normalization, lattice="numba")
    torch.set_num_threads(1)
    q1 = dense_crf(img, unary, 10, normalization=normalization, lattice="numba")
    assert_close_to_scale(q2, q1, 1e-5)
    assert_labels_match(q2, pydensecrf_q(img, unary, 10, normalization))


def test_non_contiguous_inputs_and_callback():
    """A flipped image and a transposed-then-back unary tensor (neither contiguous); the
    callback sees Q after 0..iterations updates, the last one the result."""
    img, unary = scene(37, 29, 6, seed=5)
    img_view = img[:, ::-1]
    u_view = torch.from_numpy(np.ascontiguousarray(unary.transpose(0, 2, 1))).transpose(1, 2)
    assert not img_view.flags.c_contiguous and not u_view.is_contiguous()
    seen = []
    q = dense_crf(img_view, u_view, 5, lattice="numba",
                  callback=lambda it, qi: seen.append((it, qi.clone())))
    ref = pydensecrf_q(np.ascontiguousarray(img_view), unary, 5, "after")
    assert isinstance(q, torch.Tensor) and q.shape == unary.shape
    assert_labels_match(q.numpy(), ref)
    assert [it for it, _ in seen] == list(range(6))
    assert torch.equal(seen[-1][1], q)


def test_zero_iterations_and_zero_weights():
    img, unary = scene(20, 24, 4, seed=6)
    q0 = dense_crf(img, unary, 0, lattice="numba")
    e = np.exp(unary.min(0) - unary)
    np.testing.assert_allclose(q0, e / e.sum(0), rtol=1e-6)
    for kw in (dict(pos_w=0.0), dict(bi_w=0.0), dict(pos_w=0.0, bi_w=0.0)):
        assert_labels_match(dense_crf(img, unary, 5, lattice="numba", **kw),
                            pydensecrf_q(img, unary, 5, "after", **kw))


def test_potts_as_a_compatibility_matrix_gives_the_same_marginals():
    """compat = 1 - identity is Potts up to a per-pixel constant (cancels in the softmax)."""
    img, unary = scene(25, 30, 5, seed=7)
    potts = dense_crf(img, unary, 5, lattice="numba")
    as_matrix = dense_crf(img, unary, 5, lattice="numba", compat=1.0 - np.eye(5))
    assert_close_to_scale(as_matrix, potts, 1e-5)


def test_backend_dispatch_and_fallback(monkeypatch, capsys):
    img, unary = scene(30, 40, 21, seed=8)
    logits = torch.from_numpy(-unary)
    q = DenseCRF(CRFParams(), backend="numba")(img, logits)
    assert_labels_match(q, DenseCRF(CRFParams(), backend="torch")(img, logits))
    assert resolve_backend("numba") == "numba"
    monkeypatch.setattr(pn, "AVAILABLE", False)
    assert resolve_backend("numba") == "torch"
    assert "numba is not installed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CPU"):
        pn.dense_crf(torch.zeros(2, 2, 3, dtype=torch.uint8, device="meta"),
                     torch.zeros(2, 2, 2, device="meta"), 1, 1.0, 1.0, 1.0, 1.0, 1.0, "after")
