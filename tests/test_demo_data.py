"""seglab/data/demo.py: the synthetic VOC-layout set is complete, deterministic, skipped when present,
and looks like VOC (classes from the chosen set, void bands on borders, class colours)."""
import json
import os
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from seglab.data.demo import DEMO_CLASSES, class_style, make_demo_dataset
from seglab.data.labels import IGNORE, load_label, voc_palette
from seglab.data.images import load_image

PARAMS = dict(num_train=5, num_val=3, size=(48, 64), seed=3)


def voc(root):
    return root / "VOCdevkit" / "VOC2012"


def all_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), **PARAMS)


def test_layout_and_lists(demo):
    base = voc(demo)
    lists = base / "ImageSets" / "Segmentation"
    train = [f"train_{i:04d}" for i in range(5)]
    val = [f"val_{i:04d}" for i in range(3)]
    assert (lists / "train.txt").read_text().split() == train
    assert (lists / "train_aug.txt").read_text().split() == train
    assert (lists / "val.txt").read_text().split() == val
    assert (lists / "trainval.txt").read_text().split() == train + val
    for i in train + val:
        image = Image.open(base / "JPEGImages" / f"{i}.jpg")
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 48)
        mask = Image.open(base / "SegmentationClass" / f"{i}.png")
        assert mask.mode == "P" and mask.size == (64, 48)
        palette = np.array(mask.getpalette()[:768], np.uint8).reshape(256, 3)
        np.testing.assert_array_equal(palette, voc_palette())
        assert (base / "SegmentationClassAug" / f"{i}.png").read_bytes() == \
            (base / "SegmentationClass" / f"{i}.png").read_bytes()
    assert json.loads((demo / "demo.json").read_text())["seed"] == 3
    assert not [p for p in demo.rglob(".*")], "no temp files left behind"


def test_labels_look_like_voc(demo):
    base = voc(demo)
    overlapping = 0
    for i in (base / "ImageSets/Segmentation/trainval.txt").read_text().split():
        label = load_label(base / "SegmentationClass" / f"{i}.png", (48, 64))
        values = set(np.unique(label).tolist())
        assert values <= {0, IGNORE, *DEMO_CLASSES}
        assert values & set(DEMO_CLASSES), "every image holds at least one object"
        assert IGNORE in values
        # a void band separates any two different classes: no 4-neighbours with two classes
        for a, b in ((label[:, 1:], label[:, :-1]), (label[1:], label[:-1])):
            assert not ((a != b) & (a != IGNORE) & (b != IGNORE)).any()
        objects = [c for c in values if c not in (0, IGNORE)]
        for a in objects:
            # the band is 1 px on each side of a border (at 48x64): two touching objects lie
            # 3 px apart, two with background between them at least 4
            near_a = cv2.dilate((label == a).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
            overlapping += any((near_a & (label == b)).any() for b in objects if b != a)
    assert overlapping > 0, "some objects touch or overlap others"


def test_classes_have_their_colour(demo):
    """Each object's interior is closer to its class colour than to any other demo class's."""
    base = voc(demo)
    colours = {c: class_style(c)[0] for c in DEMO_CLASSES}
    checked = 0
    for i in (base / "ImageSets/Segmentation/trainval.txt").read_text().split():
        image = load_image(base / "JPEGImages" / f"{i}.jpg").astype(np.float64)
        label = load_label(base / "SegmentationClass" / f"{i}.png")
        for c in set(np.unique(label).tolist()) - {0, IGNORE}:
            inside = cv2.erode((label == c).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            if inside.sum() < 10:
                continue
            mean = image[inside].mean(axis=0)
            assert min(colours, key=lambda k: np.linalg.norm(mean - colours[k])) == c
            checked += 1
    assert checked >= 4


def test_deterministic_bytes(tmp_path):
    a = make_demo_dataset(tmp_path / "a", **PARAMS)
    b = make_demo_dataset(tmp_path / "b", **PARAMS)
    files_a, files_b = all_files(a), all_files(b)
    assert [p.relative_to(a) for p in files_a] == [p.relative_to(b) for p in files_b]
    for fa, fb in zip(files_a, files_b):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
    # another seed draws other images; more images keep the first ones as they were
    c = make_demo_dataset(tmp_path / "c", **{**PARAMS, "seed": 4})
    jpg = "VOCdevkit/VOC2012/JPEGImages/train_0000.jpg"
    assert (c / jpg).read_bytes() != (a / jpg).read_bytes()
    d = make_demo_dataset(tmp_path / "d", **{**PARAMS, "num_train": 6})
    assert (d / jpg).read_bytes() == (a / jpg).read_bytes()


def test_existing_set_is_skipped_and_changed_parameters_rewrite(tmp_path):
    root = make_demo_dataset(tmp_path, **PARAMS)
    old = 1_000_000_000_000_000_000
    for p in all_files(root):
        os.utime(p, ns=(old, old))
    make_demo_dataset(tmp_path, **PARAMS)
    assert all(p.stat().st_mtime_ns == old for p in all_files(root)), "second run rewrote files"
    # a missing file makes it regenerate
    (voc(root) / "JPEGImages" / "val_0001.jpg").unlink()
    make_demo_dataset(tmp_path, **PARAMS)
    assert (voc(root) / "JPEGImages" / "val_0001.jpg").is_file()
    # other parameters: written again
    make_demo_dataset(tmp_path, **{**PARAMS, "seed": 9})
    assert json.loads((root / "demo.json").read_text())["seed"] == 9
    assert (voc(root) / "JPEGImages" / "train_0000.jpg").stat().st_mtime_ns != old


def test_tiny_set_is_fast_and_bad_classes_are_refused(tmp_path):
    start = time.perf_counter()
    make_demo_dataset(tmp_path / "tiny", num_train=4, num_val=2, size=(64, 64))
    assert time.perf_counter() - start < 3.0  # well under a second on an idle core
    for classes in ((0, 1), (21,), ()):
        with pytest.raises(ValueError, match="1..20"):
            make_demo_dataset(tmp_path / "bad", classes=classes)


def test_cli(tmp_path, capsys):
    from seglab.data import demo as demo_data
    demo_data.main(["--root", str(tmp_path), "--num-train", "2", "--num-val", "1",
                    "--size", "32", "40", "--classes", "3", "7"])
    assert "2 train + 1 val" in capsys.readouterr().out
    label = load_label(voc(tmp_path) / "SegmentationClass" / "train_0001.png", (32, 40))
    assert set(np.unique(label).tolist()) <= {0, 3, 7, IGNORE}
