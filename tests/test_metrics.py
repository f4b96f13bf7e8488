"""metrics.py: the confusion matrix and its scores against brute-force loops, and the trimap
bands on hand-made masks."""
import math

import numpy as np
import pytest
import torch

from seglab.data.metrics import ConfusionMatrix, TrimapEvaluator, boundary_mask, format_table, trimap_band


def random_pair(rng, shape=(23, 31), num_classes=6, void_fraction=0.15, block=1):
    """A random (pred, gt) pair; gt is made of block x block squares of one label."""
    cells = rng.integers(0, num_classes, (-(-shape[0] // block), -(-shape[1] // block)))
    gt = np.kron(cells, np.ones((block, block), np.int64))[:shape[0], :shape[1]]
    gt[rng.random(shape) < void_fraction] = 255
    pred = np.where(rng.random(shape) < 0.6, np.where(gt == 255, 0, gt),
                    rng.integers(0, num_classes, shape))
    return pred.astype(np.uint8), gt.astype(np.uint8)


def brute_force_scores(pairs, num_classes):
    """Scores from per-class loops over boolean masks (no confusion matrix)."""
    tp, gt_n, pred_n, correct, total = [0] * num_classes, [0] * num_classes, [0] * num_classes, 0, 0
    for pred, gt in pairs:
        valid = gt != 255
        total += int(valid.sum())
        correct += int(((pred == gt) & valid).sum())
        for c in range(num_classes):
            tp[c] += int(((pred == c) & (gt == c)).sum())
            gt_n[c] += int((gt == c).sum())
            pred_n[c] += int(((pred == c) & valid).sum())
    iou = [tp[c] / (gt_n[c] + pred_n[c] - tp[c]) if gt_n[c] + pred_n[c] - tp[c] else math.nan
           for c in range(num_classes)]
    present = [v for v in iou if not math.isnan(v)]
    acc = [tp[c] / gt_n[c] for c in range(num_classes) if gt_n[c]]
    fw = sum(gt_n[c] / total * iou[c] for c in range(num_classes) if gt_n[c])
    return dict(pixel_acc=correct / total, mean_class_acc=sum(acc) / len(acc), iou=iou,
                miou=sum(present) / len(present), fw_iou=fw, classes_present=len(present))


def test_confusion_matrix_matches_brute_force():
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng) for _ in range(4)]
    cm = ConfusionMatrix(num_classes=6)
    for pred, gt in pairs:
        cm.update(pred, gt)
    # every cell against a direct count
    for g in range(6):
        for p in range(6):
            count = sum(int(((gt == g) & (pred == p)).sum()) for pred, gt in pairs)
            assert cm.matrix[g, p] == count
    assert cm.matrix.dtype == np.int64
    got, want = cm.scores(), brute_force_scores(pairs, 6)
    for key in ("pixel_acc", "mean_class_acc", "miou", "fw_iou"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert got["iou"] == pytest.approx(want["iou"], abs=1e-12)
    assert got["classes_present"] == want["classes_present"] == 6


def test_absent_class_is_nan_and_left_out_of_the_mean():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 3]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 4, 1, 3]], np.uint8)  # 4 only predicted on void
    s = ConfusionMatrix(num_classes=5).update(pred, gt).scores()
    assert math.isnan(s["iou"][2]) and math.isnan(s["iou"][4])   # never seen, never counted
    assert s["iou"][:2] == pytest.approx([2 / 3, 3 / 4]) and s["iou"][3] == 1.0
    assert s["classes_present"] == 3
    assert s["miou"] == pytest.approx((2 / 3 + 3 / 4 + 1) / 3)
    assert "3 of 5 classes" in s["miou_note"]
    assert s["pixel_acc"] == pytest.approx(6 / 7)


def test_perfect_prediction_scores_one():
    rng = np.random.default_rng(2)
    _, gt = random_pair(rng, num_classes=21)
    pred = np.where(gt == 255, 7, gt)  # whatever is predicted on void does not count
    s = ConfusionMatrix().update(pred, gt).scores()
    assert s["miou"] == s["pixel_acc"] == s["mean_class_acc"] == s["fw_iou"] == 1.0


def test_torch_input_merge_and_errors():
    rng = np.random.default_rng(3)
    (p1, g1), (p2, g2) = random_pair(rng), random_pair(rng)
    a = ConfusionMatrix(6).update(torch.from_numpy(p1).long(), torch.from_numpy(g1))
    b = ConfusionMatrix(6).update(p2, g2)
    both = ConfusionMatrix(6).update(np.concatenate([p1, p2]), np.concatenate([g1, g2]))
    np.testing.assert_array_equal(a.merge(b).matrix, both.matrix)
    with pytest.raises(ValueError, match="outside 0..5"):
        ConfusionMatrix(6).update(np.zeros((2, 2)), np.full((2, 2), 9))
    with pytest.raises(ValueError, match="outside 0..5"):
        ConfusionMatrix(6).update(np.full((2, 2), 6), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="pixels"):
        ConfusionMatrix(6).update(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="merge"):
        ConfusionMatrix(6).merge(ConfusionMatrix(5))


def test_format_table_lists_every_class():
    gt = np.array([[0, 1], [1, 1]], np.uint8)
    s = ConfusionMatrix(3).update(gt, gt).scores()
    table = format_table(s, ["background", "cat", "dog"])
    lines = table.splitlines()
    assert any(line.startswith("background") and "100.00" in line for line in lines)
    assert any(line.startswith("dog") and "n/a" in line for line in lines)
    assert any(line.startswith("mean IoU") and "100.00" in line for line in lines)
    assert s["miou_note"] in table
    with pytest.raises(ValueError):
        format_table(s, ["only one name"])


# ---------------------------------------------------------------------------------------------
# Trimap
# ---------------------------------------------------------------------------------------------

def test_void_band_is_a_euclidean_disk_around_void_pixels():
    gt = np.zeros((7, 7), np.uint8)
    gt[3, 3] = 255
    width1 = np.zeros((7, 7), bool)
    width1[[2, 4, 3, 3], [3, 3, 2, 4]] = True              # the 4 neighbours at distance 1
    np.testing.assert_array_equal(trimap_band(gt, 1), width1)
    width2 = np.array([[0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 1, 0, 0],
                       [0, 1, 1, 0, 1, 1, 0],             # the void pixel itself is never scored
                       [0, 0, 1, 1, 1, 0, 0],
                       [0, 0, 0, 1, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0]], bool)       # sqrt(2) is in, sqrt(5) is out
    np.testing.assert_array_equal(trimap_band(gt, 2), width2)
    assert not trimap_band(np.zeros((4, 4), np.uint8), 5).any()   # no void: no band


def test_edge_band_on_a_hand_made_mask():
    gt = np.zeros((4, 6), np.uint8)
    gt[:, 3:] = 1                      # a vertical edge between columns 2 and 3
    gt[0, 0] = 255                     # void counts as its own label, and is never in a band
    np.testing.assert_array_equal(boundary_mask(gt, "edges"), np.array(
        [[1, 1, 1, 1, 0, 0],
         [1, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 0, 0]], bool))
    np.testing.assert_array_equal(trimap_band(gt, 1, boundary="edges"), np.array(
        [[0, 1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1, 0],
         [0, 1, 1, 1, 1, 0]], bool))
    with pytest.raises(ValueError, match="boundary"):
        trimap_band(gt, 1, boundary="diagonal")


def test_band_equals_brute_force_distances():
    rng = np.random.default_rng(4)
    gt = rng.integers(0, 3, (15, 17)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.05] = 255
    voids = np.argwhere(gt == 255)
    for width in (1, 2, 3, 5):
        want = np.zeros(gt.shape, bool)
        for y in range(gt.shape[0]):
            for x in range(gt.shape[1]):
                d2 = ((voids - [y, x]) ** 2).sum(1).min()
                want[y, x] = d2 <= width * width and gt[y, x] != 255
        np.testing.assert_array_equal(trimap_band(gt, width), want)


@pytest.mark.parametrize("boundary", ["void", "edges"])
def test_trimap_evaluator_equals_masked_confusion_matrices(boundary):
    rng = np.random.default_rng(5)
    widths = (1, 2, 4, 7)
    ev = TrimapEvaluator(widths, num_classes=6, boundary=boundary)
    pairs = [random_pair(rng, (40, 50), void_fraction=0.01, block=10) for _ in range(3)]
    for pred, gt in pairs:
        ev.update(pred, gt)
    scores = ev.scores()
    assert sorted(scores) == list(widths)
    for w in widths:
        want = ConfusionMatrix(6)
        for pred, gt in pairs:
            band = trimap_band(gt, w, boundary)
            want.update(pred[band], gt[band])
        np.testing.assert_array_equal(ev.matrices[w].matrix, want.matrix)
        assert scores[w]["miou"] == pytest.approx(want.scores()["miou"])
        assert scores[w]["pixels"] == want.matrix.sum()
    assert scores[1]["pixels"] < scores[7]["pixels"]
    merged = TrimapEvaluator(widths, 6, boundary).merge(ev)
    np.testing.assert_array_equal(merged.matrices[4].matrix, ev.matrices[4].matrix)
    with pytest.raises(ValueError, match="integers"):
        TrimapEvaluator((1.5,))
