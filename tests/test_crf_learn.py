"""Stage two, learned: the differentiable mean field, the label compatibility in every backend,
`crf.py learn`, and the CRF as a trainable layer (model.crf_layer)."""
import csv
import json

import numpy as np
import pytest
import torch

import crf
import train
from seglab.densecrf import learn
from seglab.densecrf import torch_crf as tc
from seglab.densecrf.dense_crf import DenseCRF, unary_from_logits
from seglab.densecrf.layer import DenseCRFLayer, denormalize
from seglab.densecrf.params import CRFParams, crf_params_from_config
from seglab.data.transforms import normalize
from test_crf import IDS, make_scene, voc  # noqa: F401  (voc: the module's VOC-layout fixture)
from test_crf_torch import scene
from test_train import tiny_config


def symmetric(c, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.0, 2.0, (c, c))
    return (a + a.T) / 2


# --- the differentiable mean field -------------------------------------------------------------

def test_gradients_match_finite_differences():
    """float64 on a tiny image: d(loss)/d(weights, compat, unary) against finite differences,
    with and without checkpointed iterations."""
    img, unary = scene(7, 9, 3, seed=3)
    c, h, w = unary.shape
    kernels = tc.differentiable_kernels(torch.from_numpy(img), h, w, 8.0, 20.0, 2.0,
                                        dtype=torch.float64)
    u = torch.from_numpy(unary).double().reshape(c, -1).t().contiguous().requires_grad_()
    weights = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    mu = torch.tensor(symmetric(c), requires_grad=True)
    target = torch.randn(h * w, c, dtype=torch.float64)
    for checkpoint in (False, True):
        def f(ww, mm, uu=u):
            return (tc.mean_field_differentiable(uu, kernels, ww, mm, 4, checkpoint) *
                    target).sum()
        inputs = (weights, mu) + ((u,) if not checkpoint else ())
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(   # Potts (compat None)
        lambda ww: tc.mean_field_differentiable(u.detach(), kernels, ww, None, 4).exp()[:, 1].sum(),
        (weights,))


def test_differentiable_forward_equals_the_inference_path():
    img, unary = scene(30, 40, 5, seed=1)
    c, h, w = unary.shape
    kernels = tc.differentiable_kernels(torch.from_numpy(img), h, w, 20.0, 10.0, 1.0)
    u = torch.from_numpy(unary).reshape(c, -1).t()
    for compat in (None, symmetric(c)):
        q = tc.dense_crf(img, unary, 10, bi_w=4, bi_xy_std=20, bi_rgb_std=10, pos_w=3,
                         pos_xy_std=1, compat=compat)
        mu = None if compat is None else torch.tensor(compat, dtype=torch.float32)
        log_q = tc.mean_field_differentiable(u, kernels, torch.tensor([3.0, 4.0]), mu, 10)
        np.testing.assert_allclose(log_q.exp().t().reshape(c, h, w).numpy(), q, atol=1e-5)
    # Potts as a matrix (1 - identity) is Potts: the same marginals up to rounding
    potts = tc.dense_crf(img, unary, 10, bi_w=4, bi_xy_std=20, bi_rgb_std=10, compat=1 - np.eye(c))
    np.testing.assert_allclose(potts, tc.dense_crf(img, unary, 10, bi_w=4, bi_xy_std=20,
                                                   bi_rgb_std=10), atol=1e-5)


# --- the compatibility in the parameters and in every backend -----------------------------------

@pytest.mark.parametrize("compat", [None, "symmetric"])
def test_fixed_parameter_labels_equal_pydensecrfs(compat):
    pytest.importorskip("pydensecrf.densecrf")
    image, _, logits = make_scene(50, 70, seed=4, noise=1.5)
    p = CRFParams(bi_xy_std=30, bi_rgb_std=8,
                  compat=None if compat is None else symmetric(3, seed=2).tolist())
    q_torch = DenseCRF(p, backend="torch")(image, logits)
    q_pyd = DenseCRF(p, backend="pydensecrf")(image, logits)
    np.testing.assert_array_equal(q_torch.argmax(0), q_pyd.argmax(0))
    np.testing.assert_allclose(q_torch, q_pyd, atol=1e-4)
    if compat is not None:   # the matrix changes the result (it is not silently ignored)
        plain = DenseCRF(CRFParams(bi_xy_std=30, bi_rgb_std=8), backend="pydensecrf")
        assert np.abs(plain(image, logits) - q_pyd).max() > 1e-2


def test_compat_validates_and_round_trips(tmp_path):
    m = symmetric(3).tolist()
    p = CRFParams(bi_w=2.5, compat=m)
    back = CRFParams.from_json(p.to_json(tmp_path / "p.json"))
    assert back == p and json.loads((tmp_path / "p.json").read_text())["compat"] == m
    assert CRFParams.from_json(CRFParams().to_json(tmp_path / "potts.json")).compat is None
    assert crf_params_from_config({"params": str(tmp_path / "p.json")}) == p
    hash(p)                                                   # frozen and hashable
    np.testing.assert_array_equal(CRFParams().compat_matrix(3), 1 - np.eye(3))
    for bad, match in (([[0, 1], [2, 0]], "symmetric"), ([[0, 1, 2], [1, 0, 2]], "square"),
                       ([[0, float("nan")], [float("nan"), 0]], "finite"), ("potts", "matrix")):
        with pytest.raises(ValueError, match=match):
            CRFParams(compat=bad)
    with pytest.raises(ValueError, match="3x3"):
        DenseCRF(CRFParams(compat=symmetric(3).tolist()), backend="torch")(
            np.zeros((4, 5, 3), np.uint8), torch.zeros(4, 4, 5))


# --- fitting ------------------------------------------------------------------------------------

def synthetic_set(n, seed):
    """Scenes whose noisy logits the CRF cleans up: the right CRF weights are large."""
    out = []
    for k in range(n):
        image, mask, logits = make_scene(48, 64, seed=seed + k, sigma=1.0, noise=2.5)
        out.append(learn.prepare(f"s{k}", image, unary_from_logits(logits), mask, scale=1))
    return out


def test_learning_improves_loss_and_val_miou_over_the_start():
    train_set, val_set = synthetic_set(3, 0), synthetic_set(2, 100)
    start = CRFParams(bi_w=0.05, pos_w=0.05, iterations=5)
    opts = learn.FitOptions(steps=12, lr=0.3, scale=1, eval_every=1)
    learned, best, history = learn.fit_setting(train_set, learn.Setting(20.0, 10.0, 1.0), start,
                                               opts, val_set)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_miou"] > history[0]["val_miou"] + 0.02
    assert learned.bi_w > 0.5 and best["fit_miou"] >= history[0]["fit_miou"]
    again, _, history2 = learn.fit_setting(train_set, learn.Setting(20.0, 10.0, 1.0), start,
                                           opts, val_set)
    assert again == learned and history2 == history       # deterministic
    full, _, h_full = learn.fit_setting(train_set, learn.Setting(20.0, 10.0, 1.0), start,
                                        learn.FitOptions(compat="full", steps=4, lr=0.3, scale=2),
                                        val_set)
    assert full.compat is not None and h_full[-1]["loss"] < h_full[0]["loss"]
    np.testing.assert_allclose(np.array(full.compat), np.array(full.compat).T)


def test_batched_images_do_not_reach_across():
    """Two images in one lattice give each the marginals it gets alone."""
    items = synthetic_set(2, 7)
    setting, p = learn.Setting(20.0, 10.0, 1.0), CRFParams(iterations=5)
    joint = learn._batches(items, setting, p, 1, False, 2)[0]
    log_q = learn._forward(joint, torch.tensor([3.0, 4.0]), None, 5, False)
    n = items[0].unary.shape[0]
    for k, it in enumerate(items):
        alone = learn._batches([it], setting, p, 1, False, 1)[0]
        q = learn._forward(alone, torch.tensor([3.0, 4.0]), None, 5, False).exp()
        part = log_q.exp()[k * n:(k + 1) * n]
        full = torch.zeros(n, 3)
        full[:, joint.classes] = part
        mine = torch.zeros(n, 3)
        mine[:, alone.classes] = q
        assert (full - mine).abs().mean() < 1e-3     # the lattice is not shift-invariant
        assert (full.argmax(1) == mine.argmax(1)).float().mean() > 0.99


# --- the command line ---------------------------------------------------------------------------

def test_learn_cli_writes_params_that_apply_reads(voc, tmp_path, capsys):  # noqa: F811
    root, voc_dir, cache = voc
    out = tmp_path / "learn"
    common = ["--cache", str(cache), "--data-root", str(root), "--workers", "1"]
    assert crf.main(["learn", *common, "--out", str(out), "--folds", "2", "--steps", "2",
                     "--bi-xy-std", "20", "--bi-rgb-std", "10", "--fit-scale", "2",
                     "--iterations", "3", "--compat", "full"]) == 0
    text = capsys.readouterr()
    assert "2-fold cross-validation" in text.out and "val_miou" in text.err
    learned = CRFParams.from_json(out / "learned.json")
    assert learned.compat is not None and learned.bi_xy_std == 20 and learned.iterations == 3
    cv = json.loads((out / "cross_validation.json").read_text())
    assert cv["folds"] == 2 and len(cv["chosen"]) == 2 and 0 < cv["crf"]["miou"] <= 1
    assert sorted(i for c in cv["chosen"] for i in c["scored_on"]) == sorted(IDS)
    with open(out / "learn.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["stage"] for r in rows} == {"all", "fold 0", "fold 1"} and len(rows) == 9
    for backend in ("pydensecrf", "torch"):
        applied = tmp_path / f"apply_{backend}"
        assert crf.main(["apply", *common, "--out", str(applied), "--params",
                         str(out / "learned.json"), "--backend", backend]) == 0
        assert sorted(p.stem for p in applied.glob("*.png")) == IDS
    # bad input: one clear line, exit 2
    assert crf.main(["learn", *common, "--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert "steps must be a positive whole number" in capsys.readouterr().err
    assert crf.main(["learn", *common, "--out", str(tmp_path / "x"), "--folds", "9"]) == 2
    assert "--folds must be between 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        crf.main(["learn", "--help"])
    assert exit_info.value.code == 0
    assert "--compat" in capsys.readouterr().out


# --- the CRF as a layer -------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["caffe", "imagenet", "tf"])
def test_denormalize_inverts_the_transform(norm):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    back = denormalize(normalize(image, norm)[None], norm)[0]
    np.testing.assert_allclose(back.numpy(), image, atol=1e-3)


def test_layer_refines_and_passes_gradients():
    image, mask, logits = make_scene(40, 56, seed=2, noise=2.0)
    layer = DenseCRFLayer(CRFParams(iterations=5, bi_xy_std=20, bi_rgb_std=10),
                          learn_compat=True, num_classes=3)
    small = torch.nn.functional.interpolate(logits[None], size=(10, 14), mode="bilinear",
                                            align_corners=True).requires_grad_()
    log_q = layer(small, torch.from_numpy(image)[None])
    assert log_q.shape == (1, 3, 40, 56)
    torch.testing.assert_close(log_q.exp().sum(1), torch.ones(1, 40, 56))
    loss = torch.nn.functional.nll_loss(log_q, torch.from_numpy(mask).long()[None])
    loss.backward()
    assert small.grad.abs().sum() > 0 and layer.log_weights.grad.abs().sum() > 0
    assert layer.compat.grad.abs().sum() > 0
    assert layer.learned_params().compat is not None


def test_crf_layer_training_runs_and_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path, iterations=8, checkpoint_every=8)
    over = ["model.crf_layer=true", "crf.iterations=3", "crf.bi_xy_std=10", "crf.bi_rgb_std=10"]
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "crf"), *over]) == 0
    with open(tmp_path / "crf" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and "loss_crf" in rows[0]
    crf_loss = [float(r["loss_crf"]) for r in rows]
    assert np.mean(crf_loss[-3:]) < np.mean(crf_loss[:3])
