"""crf.py: the pydensecrf wrapper against direct pydensecrf calls, the CRF's effect on a
synthetic scene, the parallel runner against the serial one, and the parameter search."""
import csv
import dataclasses
import json
import shutil
import sys

import numpy as np
import pytest
import yaml
import torch
from PIL import Image
from scipy import ndimage

import crf
from seglab.data import labels
from seglab.data.images import load_image
from seglab.densecrf import dense_crf
from seglab.densecrf.dense_crf import DenseCRF, load_crf_inputs, unary_from_logits
from seglab.densecrf.params import CRFParams
from seglab.densecrf.runner import CRFJob, run_crf
from seglab.densecrf.search import pick_subset, search_grid
from seglab.data.logit_cache import load_logits, save_logits
from seglab.models.resize import full_resolution_logits
from seglab.data.metrics import ConfusionMatrix, boundary_mask, trimap_band

try:
    import pydensecrf.densecrf as dcrf
except ImportError:  # the other tests run the torch backend (the wrapper falls back to it)
    dcrf = None
needs_pydensecrf = pytest.mark.skipif(dcrf is None, reason="pydensecrf is not installed "
                                      "(pip install pydensecrf2)")

COLOURS = np.array([[40, 90, 160], [200, 60, 50], [90, 180, 70]])


def make_scene(h=60, w=80, seed=0, sigma=4.0, noise=0.5):
    """A three-region image (background, disk, rectangle; flat colours + noise), its true mask,
    and logits (3, h, w) = a blurred (sigma px), noisy one-hot of the mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.45) * w, 0.25 * h
    mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    y0, x0 = int(rng.uniform(0.2, 0.4) * h), int(rng.uniform(0.6, 0.7) * w)
    mask[y0:y0 + h // 2, x0:x0 + w // 4] = 2
    image = np.clip(COLOURS[mask] + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    onehot = np.eye(3)[mask].transpose(2, 0, 1) * 4.0
    logits = np.stack([ndimage.gaussian_filter(c, sigma) for c in onehot])
    logits += rng.normal(0, noise, logits.shape)
    return image, mask, torch.from_numpy(logits.astype(np.float32))


def direct_pydensecrf(image, unary, p: CRFParams, normalization):
    """The CRF called the way pydensecrf's README does (explicit per-axis stds and kernel)."""
    c, h, w = unary.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(unary.reshape(c, -1).copy(order="C"))
    d.addPairwiseGaussian(sxy=(p.pos_xy_std, p.pos_xy_std), compat=p.pos_w,
                          kernel=dcrf.DIAG_KERNEL, normalization=normalization)
    d.addPairwiseBilateral(sxy=(p.bi_xy_std, p.bi_xy_std), srgb=(p.bi_rgb_std,) * 3,
                           rgbim=image.copy(order="C"), compat=p.bi_w, kernel=dcrf.DIAG_KERNEL,
                           normalization=normalization)
    return np.array(d.inference(p.iterations)).reshape(c, h, w)


def test_params_are_the_papers_and_round_trip_through_json(tmp_path):
    p = CRFParams()
    assert p.to_dict() == dict(iterations=10, bi_w=4, bi_xy_std=67, bi_rgb_std=3, pos_w=3,
                               pos_xy_std=1, normalization="after", compat=None)
    q = CRFParams(iterations=5, bi_w=5, bi_xy_std=80, bi_rgb_std=4, normalization="symmetric")
    assert CRFParams.from_json(q.to_json(tmp_path / "best.json")) == q
    (tmp_path / "typo.json").write_text(json.dumps({"bi_ww": 4}))
    with pytest.raises(ValueError, match="typo.json.*bi_ww"):
        CRFParams.from_json(tmp_path / "typo.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CRFParams.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="normalization"):
        CRFParams(normalization="before")


def test_unary_is_clipped_negative_log_softmax():
    logits = torch.tensor([[[0.0, 30.0]], [[1.0, 0.0]], [[2.0, -30.0]]])  # (3, 1, 2)
    u = unary_from_logits(logits)
    assert u.dtype == np.float32 and u.shape == (3, 2) and u.flags.c_contiguous
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(u[:, 0], -np.log(e / e.sum()), rtol=1e-6)
    # column 2: p ~ 1, e^-30 (clipped to 1e-5), e^-60 (clipped)
    np.testing.assert_allclose(u[:, 1], [0.0, -np.log(1e-5), -np.log(1e-5)], atol=1e-6)


@pytest.mark.parametrize("normalization", ["after", "symmetric"])
@needs_pydensecrf
def test_wrapper_equals_a_direct_pydensecrf_call(normalization):
    image, _, logits = make_scene(37, 53, seed=1)
    p = CRFParams(iterations=5, bi_w=5, bi_xy_std=40, bi_rgb_std=4, pos_w=2, pos_xy_std=2,
                  normalization=normalization)
    q = DenseCRF(p)(image, logits)
    unary = unary_from_logits(logits).reshape(logits.shape)   # checked on its own above
    want = direct_pydensecrf(image, unary, p, getattr(
        dcrf, {"after": "NORMALIZE_AFTER", "symmetric": "NORMALIZE_SYMMETRIC"}[normalization]))
    assert q.dtype == np.float32 and q.shape == (3, 37, 53)
    np.testing.assert_array_equal(q, want)
    # the two normalisations are really different models
    other = "symmetric" if normalization == "after" else "after"
    assert not np.array_equal(DenseCRF(CRFParams(**{**p.to_dict(), "normalization": other}))(
        image, logits), q)


def test_zero_iterations_is_the_network_prediction():
    image, _, logits = make_scene(seed=2)
    q = DenseCRF(CRFParams(iterations=0))(image, logits)
    np.testing.assert_allclose(q, torch.softmax(logits, 0).numpy(), atol=1e-6)
    np.testing.assert_array_equal(q.argmax(0), logits.argmax(0).numpy())


def test_crf_raises_accuracy_most_near_boundaries():
    for seed in range(3):
        image, mask, logits = make_scene(seed=seed)
        before = logits.argmax(0).numpy() == mask
        after = DenseCRF()(image, logits).argmax(0) == mask
        near = trimap_band(mask, 3, boundary="edges")
        assert after.mean() > before.mean() + 0.02, seed            # ~96.5% -> ~100%
        assert after[near].mean() > before[near].mean() + 0.08, seed  # ~88% -> ~100%
        assert after.mean() > 0.99


def test_bad_images_are_rejected():
    image, _, logits = make_scene(20, 30)
    with pytest.raises(ValueError, match="uint8"):
        DenseCRF()(image.astype(np.float32), logits)
    with pytest.raises(ValueError, match="uint8"):
        DenseCRF()(image[..., 0], logits)
    with pytest.raises(ValueError, match="20x30.*upsample"):
        DenseCRF()(image, logits[:, :10])


def test_missing_pydensecrf_falls_back_to_the_torch_crf_with_a_note(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)  # import now fails
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setattr(dense_crf, "_NOTED", set())
    image, _, logits = make_scene(20, 30)
    crf = DenseCRF()
    assert crf.backend == "torch"
    DenseCRF()  # the note comes once
    err = capsys.readouterr().err
    assert err.count("pip install pydensecrf2") == 1 and "crf.backend=torch" in err
    assert crf(image, logits).shape == logits.shape


@needs_pydensecrf
def test_torch_backend_gets_every_parameter():
    """The torch backend through the wrapper equals pydensecrf through the wrapper for settings
    far from the defaults, and each parameter changes the result: a parameter the wrapper failed
    to pass on would show as a difference."""
    image, _, logits = make_scene(40, 50, noise=1.5)
    p = CRFParams(iterations=7, bi_w=5, bi_xy_std=20, bi_rgb_std=6, pos_w=2, pos_xy_std=3,
                  normalization="symmetric")
    torch_q = DenseCRF(p, backend="torch", device="cpu")(image, logits)
    ref_q = DenseCRF(p, backend="pydensecrf")(image, logits)
    assert torch_q.shape == (3, 40, 50) and torch_q.dtype == np.float32
    np.testing.assert_allclose(torch_q, ref_q, atol=2e-3)
    for change in (dict(iterations=1), dict(bi_w=0.5), dict(bi_xy_std=3), dict(bi_rgb_std=60),
                   dict(pos_w=20), dict(pos_xy_std=10), dict(normalization="after")):
        other = DenseCRF(dataclasses.replace(p, **change), backend="torch")(image, logits)
        assert np.abs(other - torch_q).max() > 1e-2, change


def test_torch_fp16_backend_runs_the_half_precision_lattice(monkeypatch):
    """`torch-fp16` reaches torch_crf with lattice="fp16" (and `torch` with "fp32"): the two
    differ by half-precision rounding, not more."""
    seen = []
    real = dense_crf.torch_crf.dense_crf
    monkeypatch.setattr(dense_crf.torch_crf, "dense_crf",
                        lambda *a, **kw: seen.append(kw["lattice"]) or real(*a, **kw))
    image, _, logits = make_scene(40, 50, noise=1.5)
    q16 = DenseCRF(backend="torch-fp16")(image, logits)
    q32 = DenseCRF(backend="torch")(image, logits)
    assert seen == ["fp16", "fp32"]
    assert 0 < np.abs(q16 - q32).max() < 2e-2
    assert (q16.argmax(0) == q32.argmax(0)).mean() > 0.999


# ---------------------------------------------------------------------------------------------
# The runner and the CLI, on a small VOC-layout folder with a logit cache
# ---------------------------------------------------------------------------------------------

IDS = ["2008_000001", "2008_000002", "2008_000003", "2008_000004"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """VOCdevkit/VOC2012 with 4 images (60x80 JPEGs), void-outlined masks, a val list, and a
    cache of 1/8-resolution logits as the evaluation writes them (input padded to 65x81)."""
    root = tmp_path_factory.mktemp("voc")
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(IDS) + "\n")
    cache = root / "logits"
    for k, image_id in enumerate(IDS):
        image, mask, _ = make_scene(65, 81, seed=10 + k)   # the padded network input
        _, _, logits = make_scene(65, 81, seed=10 + k, sigma=2.0, noise=0.3)
        Image.fromarray(image[:60, :80]).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        gt = mask[:60, :80].copy()
        gt[boundary_mask(gt, "edges")] = 255                    # VOC-style void outlines
        labels.save_label_png(voc / "SegmentationClass" / f"{image_id}.png", gt)
        save_logits(cache / f"{image_id}.npz", logits[:, ::8, ::8], (65, 81), (60, 80))
    return root, voc, cache


def jobs_for(voc_dir, cache, out=None, gt=False):
    return [CRFJob(i, str(voc_dir / "JPEGImages" / f"{i}.jpg"), str(cache / f"{i}.npz"),
                   str(out / f"{i}.png") if out else None,
                   str(voc_dir / "SegmentationClass" / f"{i}.png") if gt else None) for i in IDS]


def test_parallel_equals_serial_and_a_failure_is_reported(voc, tmp_path):
    _, voc_dir, cache = voc
    jobs = jobs_for(voc_dir, cache, tmp_path / "serial", gt=True)
    jobs.insert(2, CRFJob("2008_999999", str(voc_dir / "JPEGImages" / "2008_999999.jpg"),
                          str(cache / "2008_000001.npz")))  # the image does not exist
    serial, serial_failed = run_crf(jobs, workers=1, return_labels=True, trimap_widths=(1, 3),
                                    progress=False)
    parallel_jobs = [j._replace(out_path=j.out_path and j.out_path.replace("serial", "parallel"))
                     for j in jobs]
    parallel, parallel_failed = run_crf(parallel_jobs, workers=2, return_labels=True,
                                        trimap_widths=(1, 3), progress=False)
    for failed in (serial_failed, parallel_failed):
        assert [f.image_id for f in failed] == ["2008_999999"]
        assert "2008_999999.jpg" in failed[0].error and "not found" in failed[0].error
    assert [r.image_id for r in serial] == [r.image_id for r in parallel] == IDS  # job order
    for s, p in zip(serial, parallel):
        np.testing.assert_array_equal(s.labels, p.labels)
        np.testing.assert_array_equal(s.confusion.matrix, p.confusion.matrix)
        np.testing.assert_array_equal(s.trimap.matrices[3].matrix, p.trimap.matrices[3].matrix)
        np.testing.assert_array_equal(labels.load_label(p.out_path), s.labels)
    # each result is the wrapper applied to the upsampled cached logits, scored against the gt
    for job, r in zip(jobs_for(voc_dir, cache, gt=True), serial):
        image = load_image(job.image_path)
        logits = full_resolution_logits(*load_logits(job.logits_path))
        want = DenseCRF()(image, logits).argmax(0)
        np.testing.assert_array_equal(r.labels, want)
        gt = labels.load_label(job.gt_path)
        want_cm = ConfusionMatrix(3).update(want, gt)
        np.testing.assert_array_equal(r.confusion.matrix, want_cm.matrix)
    # the CRF helps on these images too (logits at 1/8 resolution, upsampled x8)
    no_crf, _ = run_crf(jobs_for(voc_dir, cache, gt=True), CRFParams(iterations=0), workers=1,
                        progress=False)
    acc = [sum(r.confusion.matrix.trace() for r in rs) / sum(r.confusion.matrix.sum() for r in rs)
           for rs in (no_crf, serial)]
    assert acc[1] > acc[0]


def test_mismatched_cache_is_a_clear_failure(voc, tmp_path):
    _, voc_dir, cache = voc
    save_logits(tmp_path / "small.npz", torch.zeros(3, 5, 6), (33, 41), (30, 40))
    job = CRFJob("x", str(voc_dir / "JPEGImages" / f"{IDS[0]}.jpg"), str(tmp_path / "small.npz"))
    results, failed = run_crf([job], workers=1, progress=False)
    assert results == [] and "30x40" in failed[0].error and "small.npz" in failed[0].error
    image, unary = load_crf_inputs(job.image_path, cache / f"{IDS[0]}.npz")
    assert image.shape == (60, 80, 3) and unary.shape == (3, 60 * 80)


def test_search_finds_the_best_setting_of_a_tiny_grid(voc, tmp_path):
    root, voc_dir, cache = voc
    out = tmp_path / "crf_search"
    code = crf.main(["search", "--cache", str(cache), "--data-root", str(root), "--out", str(out),
                     "--num-images", "3", "--seed", "1", "--bi-w", "1", "6",
                     "--bi-xy-std", "5", "60", "--bi-rgb-std", "3", "--workers", "1"])
    assert code == 0
    ids = (out / "ids.txt").read_text().split()
    assert ids == pick_subset(IDS, 3, seed=1) and len(set(ids)) == 3
    # score every setting independently: the wrapper + a confusion matrix per setting
    mious = {}
    for p in search_grid([1, 6], [5, 60], [3]):
        cm = ConfusionMatrix(3)
        for i in ids:
            image = load_image(voc_dir / "JPEGImages" / f"{i}.jpg")
            logits = full_resolution_logits(*load_logits(cache / f"{i}.npz"))
            cm.update(DenseCRF(p)(image, logits).argmax(0),
                      labels.load_label(voc_dir / "SegmentationClass" / f"{i}.png"))
        mious[(p.bi_w, p.bi_xy_std)] = cm.scores()["miou"]
    assert len(set(mious.values())) == 4                       # the settings really differ
    planted = max(mious, key=mious.get)
    assert planted == (6, 60)                                  # strong, wide bilateral term wins
    best = CRFParams.from_json(out / "best.json")
    assert (best.bi_w, best.bi_xy_std, best.bi_rgb_std) == (6, 60, 3)
    assert best.pos_w == 3 and best.pos_xy_std == 1 and best.iterations == 10
    rows = list(csv.DictReader(open(out / "search.csv")))
    assert len(rows) == 4 and rows[0]["rank"] == "1"
    for row in rows:
        assert float(row["miou"]) == pytest.approx(mious[(float(row["bi_w"]),
                                                          float(row["bi_xy_std"]))], abs=1e-12)
        assert row["images"] == "3"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["grid"] == {"bi_w": [1, 6], "bi_xy_std": [5, 60], "bi_rgb_std": [3]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["no_crf"]["miou"] < summary["best"]["miou"]


def test_apply_cli_writes_pngs_and_its_config(voc, tmp_path, capsys):
    root, voc_dir, cache = voc
    params = CRFParams(bi_w=5).to_json(tmp_path / "best.json")
    out = tmp_path / "apply"
    assert crf.main(["apply", "--cache", str(cache), "--data-root", str(root), "--out", str(out),
                     "--params", str(params), "--iterations", "4", "--workers", "1"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["crf"]["bi_w"] == 4.0 and config["crf"]["iterations"] == 4  # the config ...
    assert config["crf_params"] == dict(CRFParams(bi_w=5, iterations=4).to_dict())
    p = CRFParams(bi_w=5, iterations=4)
    for i in IDS:
        image = load_image(voc_dir / "JPEGImages" / f"{i}.jpg")
        want = DenseCRF(p)(image, full_resolution_logits(*load_logits(cache / f"{i}.npz")))
        np.testing.assert_array_equal(labels.load_label(out / f"{i}.png"), want.argmax(0))
    # an image without its JPEG: reported in failures.txt, the others still written, exit 1
    shutil.copytree(cache, tmp_path / "cache")
    save_logits(tmp_path / "cache" / "2008_000099.npz", torch.zeros(3, 8, 10), (57, 73), (50, 70))
    out2 = tmp_path / "apply2"
    assert crf.main(["apply", "--cache", str(tmp_path / "cache"), "--data-root", str(root),
                     "--out", str(out2), "--workers", "1"]) == 1
    assert (out2 / "failures.txt").read_text().startswith("2008_000099\t")
    assert sorted(p.stem for p in out2.glob("*.png")) == IDS
    assert crf.main(["apply", "--cache", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "logit cache folder not found" in capsys.readouterr().err
    for command in ("apply", "search"):
        with pytest.raises(SystemExit) as exit_info:
            crf.main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--workers" in capsys.readouterr().out


def test_cross_validated_search_never_scores_an_image_with_parameters_tuned_on_it():
    """Per-image confusions built by hand: on the images of fold A setting 1 is best, on those
    of fold B setting 2. Each fold must be scored with the *other* fold's choice."""
    from seglab.densecrf.search import cross_validate

    def cm(correct, wrong):
        m = ConfusionMatrix(2)
        m.matrix[0, 0], m.matrix[1, 1], m.matrix[0, 1] = correct, correct, wrong
        return m

    ids = ["i0", "i1", "i2", "i3", "i4", "i5"]
    order = pick_subset(ids, len(ids), seed=0)  # how cross_validate deals the folds
    fold_a = set(order[0::2])
    good_for = lambda k, i: (k == 1) == (i in fold_a)  # noqa: E731
    candidates = [CRFParams(iterations=0), CRFParams(bi_w=1), CRFParams(bi_w=2)]
    confusions = {0: {i: cm(50, 50) for i in ids}}
    for k in (1, 2):
        confusions[k] = {i: cm(90, 10) if good_for(k, i) else cm(10, 90) for i in ids}
    cv = cross_validate(candidates, confusions, ids, folds=2, seed=0)
    assert len(cv["chosen"]) == 2
    for fold in cv["chosen"]:
        scored = set(fold["scored_on"])
        assert scored in (fold_a, set(ids) - fold_a)
        assert fold["params"]["bi_w"] == (2.0 if scored == fold_a else 1.0)
    # every image was scored with the setting that is worse for it: below the baseline
    assert cv["crf"]["pixel_acc"] < cv["no_crf"]["pixel_acc"]
