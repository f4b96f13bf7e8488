"""transforms.py: normalisation against hand-computed values, and the invariants of the Caffe
training transform (random scale, pad, crop, mirror) and of the evaluation transform over many
seeds."""
import numpy as np
import pytest
import torch

from seglab.data.labels import IGNORE
from seglab.data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, VOC_SCALES, EvalTransform, TrainTransform, mean_fill_rgb, normalize, normalize_array, voc_padded_size

SEEDS = range(150)


def test_constants():
    assert CAFFE_MEAN_BGR == (104.008, 116.669, 122.675)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    assert VOC_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5)
    t = TrainTransform()
    assert (t.crop, t.scales, t.mirror, t.norm) == (321, VOC_SCALES, True, "caffe")
    e = EvalTransform()
    assert (e.mode, e.pad_to, e.norm) == ("voc", 513, "caffe")


def test_normalize_caffe_by_hand():
    image = np.array([[[10, 20, 30], [255, 0, 128]]], np.uint8)  # 1 x 2 pixels, RGB
    out = normalize(image, "caffe")
    assert out.dtype == torch.float32 and out.shape == (3, 1, 2)
    # channel 0 is blue, 1 green, 2 red; 0..255 scale, minus the BGR mean, no std
    expect = [[[30 - 104.008, 128 - 104.008]],
              [[20 - 116.669, 0 - 116.669]],
              [[10 - 122.675, 255 - 122.675]]]
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-4)


def test_normalize_imagenet_by_hand():
    image = np.array([[[10, 20, 30], [255, 0, 128]]], np.uint8)
    out = normalize(image, "imagenet")
    assert out.dtype == torch.float32 and out.shape == (3, 1, 2)
    expect = [[[(10 / 255 - 0.485) / 0.229, (255 / 255 - 0.485) / 0.229]],
              [[(20 / 255 - 0.456) / 0.224, (0 / 255 - 0.456) / 0.224]],
              [[(30 / 255 - 0.406) / 0.225, (128 / 255 - 0.406) / 0.225]]]
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-5)


def test_normalize_random_image_against_a_loop():
    image = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    caffe, imagenet = normalize(image, "caffe").numpy(), normalize(image, "imagenet").numpy()
    for y in range(5):
        for x in range(4):
            r, g, b = (float(v) for v in image[y, x])
            np.testing.assert_allclose(caffe[:, y, x], [b - 104.008, g - 116.669, r - 122.675],
                                       atol=1e-4)
            np.testing.assert_allclose(
                imagenet[:, y, x], [(r / 255 - 0.485) / 0.229, (g / 255 - 0.456) / 0.224,
                                    (b / 255 - 0.406) / 0.225], atol=1e-5)


@pytest.mark.parametrize("norm", ["caffe", "imagenet"])
def test_mean_fill_normalises_to_zero(norm):
    fill = np.array(mean_fill_rgb(norm), np.float64)
    np.testing.assert_allclose(normalize_array(fill[None, None], norm), 0.0, atol=1e-5)
    if norm == "caffe":
        assert mean_fill_rgb(norm) == (122.675, 116.669, 104.008)


def test_unknown_norm_and_mode():
    with pytest.raises(ValueError, match="caffe"):
        normalize(np.zeros((2, 2, 3), np.uint8), "bgr")
    with pytest.raises(ValueError):
        TrainTransform(norm="torch")
    with pytest.raises(ValueError, match="full"):
        EvalTransform(mode="crop")
    with pytest.raises(ValueError):
        TrainTransform(scales=(0.0, 1.0))
    with pytest.raises(ValueError, match="sizes differ"):
        TrainTransform(crop=4)(np.zeros((5, 5, 3), np.uint8), np.zeros((5, 6), np.uint8),
                               np.random.default_rng(0))


# --- TrainTransform invariants, many seeds ---------------------------------------------------

def scene(height, width, seed=0, classes=(0, 3, 7, 255)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.asarray(classes, np.uint8)[rng.integers(len(classes), size=(height, width))]
    return image, label


@pytest.mark.parametrize("norm", ["caffe", "imagenet"])
@pytest.mark.parametrize("size,crop", [((36, 44), 24), ((20, 28), 40)])
def test_output_size_dtype_and_label_values(size, crop, norm):
    image, label = scene(*size, classes=(0, 3, 7))
    t = TrainTransform(crop=crop, norm=norm)
    for seed in SEEDS:
        x, y = t(image, label, np.random.default_rng(seed))
        assert x.shape == (3, crop, crop) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.shape == (crop, crop) and y.dtype == torch.int64 and y.is_contiguous()
        assert set(torch.unique(y).tolist()) <= {0, 3, 7, IGNORE}
    if crop > max(size) * max(VOC_SCALES):  # always padded: 255 appears, ...
        assert IGNORE in torch.unique(y).tolist()
    x1, y1 = t(image, label, np.random.default_rng(7))
    x2, y2 = t(image, label, np.random.default_rng(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # a pure function of the seed


def test_different_seeds_give_different_augmentations():
    image, label = scene(30, 30)
    t = TrainTransform(crop=20)
    outputs = {t(image, label, np.random.default_rng(s))[1].numpy().tobytes() for s in range(20)}
    assert len(outputs) > 10


def coordinate_scene(height, width):
    """Image whose red channel is 4 * x and green 4 * y; labels holding x and y."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([4 * x, 4 * y, np.full_like(x, 50)], axis=2).astype(np.uint8)
    return image, x.astype(np.uint8), y.astype(np.uint8)


def red_green(x: torch.Tensor):
    """Undo the Caffe normalisation: (red, green) on the 0..255 scale."""
    return x[2].numpy() + CAFFE_MEAN_BGR[2], x[1].numpy() + CAFFE_MEAN_BGR[1]


def test_image_and_label_are_cropped_and_mirrored_together():
    height, width, crop = 40, 50, 32
    image, label_x, label_y = coordinate_scene(height, width)
    t = TrainTransform(crop=crop, scales=(1.0,))
    mirrored, offsets = 0, set()
    for seed in SEEDS:
        x, lx = t(image, label_x, np.random.default_rng(seed))
        _, ly = t(image, label_y, np.random.default_rng(seed))
        red, green = red_green(x)
        np.testing.assert_allclose(red, 4 * lx.numpy(), atol=1e-3)
        np.testing.assert_allclose(green, 4 * ly.numpy(), atol=1e-3)
        step = np.diff(lx.numpy(), axis=1)
        assert (step == 1).all() or (step == -1).all()  # a crop, mirrored or not
        assert (np.diff(ly.numpy(), axis=0) == 1).all()
        mirrored += int(step[0, 0] == -1)
        offsets.add((int(ly[0, 0]), int(lx.min())))
    assert 0.3 < mirrored / len(SEEDS) < 0.7
    # the offsets range over the whole valid range, 0..H-crop and 0..W-crop
    assert {o[0] for o in offsets} == set(range(height - crop + 1))
    assert {o[1] for o in offsets} == set(range(width - crop + 1))


def test_mirror_off_never_mirrors():
    image, label_x, _ = coordinate_scene(20, 30)
    t = TrainTransform(crop=16, mirror=False)
    for seed in SEEDS:
        _, lx = t(image, label_x, np.random.default_rng(seed))
        assert (np.diff(lx.numpy(), axis=1) >= 0).all()


def test_scaled_image_and_label_stay_aligned():
    """With every scale, the bilinear image and the nearest label still agree to a pixel, and a
    mirrored image always comes with a mirrored label."""
    image, label_x, label_y = coordinate_scene(40, 56)
    t = TrainTransform(crop=32)
    for seed in SEEDS:
        x, lx = t(image, label_x, np.random.default_rng(seed))
        _, ly = t(image, label_y, np.random.default_rng(seed))
        red, green = red_green(x)
        valid = lx.numpy() != IGNORE
        assert valid.any()
        assert np.abs(red / 4 - lx.numpy())[valid].max() <= 1.0
        assert np.abs(green / 4 - ly.numpy())[valid].max() <= 1.0


def test_padding_values_and_scales_drawn_from_the_set():
    height, width, crop = 20, 28, 48  # even the 1.5x image (30 x 42) is smaller than the crop
    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.full((height, width), 5, np.uint8)
    sizes = {(round(height * s), round(width * s)): s for s in VOC_SCALES}
    for norm in ("caffe", "imagenet"):
        seen, mirrored = set(), 0
        t = TrainTransform(crop=crop, norm=norm)
        for seed in SEEDS:
            x, y = (v.numpy() for v in t(image, label, np.random.default_rng(seed)))
            valid = y != IGNORE
            rows, cols = np.nonzero(valid)
            h, w = rows.max() + 1, cols.max() - cols.min() + 1
            assert (h, w) in sizes, "the scaled size must come from a factor of the set"
            seen.add(sizes[(h, w)])
            assert valid.sum() == h * w and rows.min() == 0  # a rectangle at the top ...
            assert cols.min() == 0 or cols.max() == crop - 1  # ... left, or right when mirrored
            mirrored += int(cols.min() > 0)
            assert set(y[valid].tolist()) == {5}
            assert (x[:, ~valid] == 0).all(), "padded pixels normalise to exactly 0"
            assert (x[:, valid] != 0).any()
        assert seen == set(VOC_SCALES)
        assert 0 < mirrored < len(SEEDS)


def test_scales_are_picked_uniformly():
    image, label = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    t = TrainTransform(crop=16, mirror=False)
    counts = {}
    for seed in range(1000):
        y = t(image, label, np.random.default_rng(seed))[1].numpy()
        side = int((y[0] != IGNORE).sum())
        counts[side] = counts.get(side, 0) + 1
    assert set(counts) == {4, 6, 8, 10, 12}
    assert all(140 < c < 260 for c in counts.values()), counts


# --- EvalTransform ---------------------------------------------------------------------------

def test_voc_padded_size():
    assert [voc_padded_size(s) for s in (1, 375, 500, 513)] == [513] * 4
    assert [voc_padded_size(s) for s in (514, 520, 521, 522, 529, 530)] == \
        [521, 521, 521, 529, 529, 537]
    for s in range(514, 700):
        p = voc_padded_size(s)
        assert p % 8 == 1 and p >= s > p - 8
    assert voc_padded_size(70, pad_to=65) == 73


@pytest.mark.parametrize("norm", ["caffe", "imagenet"])
def test_eval_voc_pads_to_513_with_zero(norm):
    image = np.random.default_rng(2).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    x, size = EvalTransform("voc", norm=norm).prepare(image)
    assert size == (375, 500) and x.shape == (3, 513, 513) and x.dtype == torch.float32
    assert torch.equal(x[:, :375, :500], normalize(image, norm))
    assert (x[:, 375:, :] == 0).all() and (x[:, :, 500:] == 0).all()


def test_eval_voc_above_pad_to_goes_to_the_next_8k_plus_1():
    image = np.random.default_rng(3).integers(0, 256, (530, 514, 3), dtype=np.uint8)
    x, size = EvalTransform("voc").prepare(image)
    assert size == (530, 514) and x.shape == (3, 537, 521)
    assert torch.equal(x[:, :530, :514], normalize(image))
    assert (x[:, 530:] == 0).all() and (x[:, :, 514:] == 0).all()
    x, size = EvalTransform("voc", pad_to=65).prepare(image[:64, :70])
    assert size == (64, 70) and x.shape == (3, 65, 73)


def test_eval_full_is_the_image_as_is():
    image = np.random.default_rng(4).integers(0, 256, (37, 51, 3), dtype=np.uint8)
    for norm in ("caffe", "imagenet"):
        x, size = EvalTransform("full", norm=norm).prepare(image)
        assert size == (37, 51) and torch.equal(x, normalize(image, norm))
