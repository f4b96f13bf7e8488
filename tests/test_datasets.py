"""datasets.py: the VOC loader on a generated VOC-layout folder (checked against torchvision's own
VOCSegmentation), the SBD -> train_aug conversion on small generated .mat files, and the errors
for missing data."""
import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

import datasets
from seglab.data import sbd as sbd_lib, voc as voc_lib
from seglab.data.sbd import build_train_aug, read_sbd_mask, train_aug_ids
from seglab.data.voc import VOCSegmentation
from seglab.data.demo import DEMO_CLASSES, make_demo_dataset
from seglab.data.labels import IGNORE, DataError, load_label, save_label_png, voc_palette
from seglab.data.images import load_image
from seglab.data.transforms import EvalTransform, TrainTransform, normalize

SIZE = (40, 56)  # H, W


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("voc"), num_train=5, num_val=3, size=SIZE,
                             seed=1)


def voc(root):
    return root / "VOCdevkit" / "VOC2012"


# --- the loader on a VOC-layout folder -------------------------------------------------------

def test_ids_paths_and_plain_items(demo):
    ds = VOCSegmentation(demo)  # split train_aug, labels from SegmentationClassAug
    assert ds.split == "train_aug" and len(ds) == 5
    assert ds.ids == [f"train_{i:04d}" for i in range(5)]
    assert ds.image_path(2) == voc(demo) / "JPEGImages" / "train_0002.jpg"
    assert ds.label_path(2) == voc(demo) / "SegmentationClassAug" / "train_0002.png"
    val = VOCSegmentation(demo, "val")
    assert val.ids == ["val_0000", "val_0001", "val_0002"]
    assert val.label_path(0) == voc(demo) / "SegmentationClass" / "val_0000.png"
    assert VOCSegmentation(demo, "val", label_dir="SegmentationClassAug").label_path(0) == \
        voc(demo) / "SegmentationClassAug" / "val_0000.png"
    for i in range(len(val)):
        item = val[i]
        assert set(item) == {"image", "label", "id", "size"}
        assert item["id"] == val.ids[i] and item["size"] == SIZE
        image = load_image(val.image_path(i))
        assert torch.equal(item["image"], normalize(image))  # no transform: Caffe-normalised
        assert item["label"].dtype == torch.int64
        assert np.array_equal(item["label"].numpy(), load_label(val.label_path(i)))


def test_train_items_by_index_and_seed(demo):
    crop = 32
    ds = VOCSegmentation(demo, "train", TrainTransform(crop=crop))
    allowed = {0, IGNORE, *DEMO_CLASSES}
    for i in range(len(ds)):
        item = ds[(i, 11)]
        assert set(item) == {"image", "label", "id", "size"}
        assert item["id"] == f"train_{i:04d}" and item["size"] == SIZE
        assert item["image"].shape == (3, crop, crop) and item["image"].dtype == torch.float32
        assert item["label"].shape == (crop, crop) and item["label"].dtype == torch.int64
        assert set(torch.unique(item["label"]).tolist()) <= allowed
        # what the item holds is the transform applied with np.random.default_rng(seed)
        x, y = TrainTransform(crop=crop)(load_image(ds.image_path(i)), load_label(ds.label_path(i)),
                                         np.random.default_rng(11))
        assert torch.equal(item["image"], x) and torch.equal(item["label"], y)
    same = [ds[(1, 5)], ds[(1, 5)]]
    assert torch.equal(same[0]["image"], same[1]["image"])
    assert torch.equal(same[0]["label"], same[1]["label"])
    others = {ds[(1, s)]["image"].numpy().tobytes() for s in range(6)}
    assert len(others) == 6, "different seeds give different augmentations"
    plain = ds[3]  # an int index alone: seed = index
    assert torch.equal(plain["image"], ds[(3, 3)]["image"])


def test_eval_items_keep_the_original_label(demo):
    ds = VOCSegmentation(demo, "val", EvalTransform("voc", pad_to=65))
    item = ds[1]
    assert item["image"].shape == (3, 65, 65) and item["size"] == SIZE
    assert torch.equal(item["image"][:, :SIZE[0], :SIZE[1]],
                       normalize(load_image(ds.image_path(1))))
    assert (item["image"][:, SIZE[0]:] == 0).all()
    assert np.array_equal(item["label"].numpy(), load_label(ds.label_path(1)))


def test_any_transform_is_called_with_image_label_and_the_sample_rng(demo):
    """The one transform signature: (image, label, rng) -> (image, label); rng is seeded by
    the sample seed (ds[(i, seed)]), the image index by default."""
    def transform(image, label, rng):
        return (image.sum(), rng.integers(1 << 30)), label.sum()
    ds = VOCSegmentation(demo, "val", transform=transform)
    item = ds[(0, 7)]
    assert item["image"][0] == load_image(ds.image_path(0)).sum()
    assert item["image"][1] == np.random.default_rng(7).integers(1 << 30)
    assert item["label"] == load_label(ds.label_path(0)).sum()
    assert ds[1]["image"][1] == np.random.default_rng(1).integers(1 << 30)


def test_torchvision_reads_the_same_folder_identically(demo):
    for split in ("train", "val"):
        theirs = torchvision.datasets.VOCSegmentation(str(demo), year="2012", image_set=split,
                                                      download=False)
        ours = VOCSegmentation(demo, split)
        assert len(theirs) == len(ours)
        for i in range(len(ours)):
            image, mask = theirs[i]
            assert os.path.basename(theirs.images[i]) == f"{ours.ids[i]}.jpg"
            assert np.array_equal(np.asarray(image), load_image(ours.image_path(i)))
            assert np.array_equal(np.asarray(mask), load_label(ours.label_path(i)))
            assert mask.mode == "P"


# --- errors for missing data -----------------------------------------------------------------

def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DataError) as info:
        VOCSegmentation(tmp_path / "nowhere", "val")
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "VOCdevkit" / "VOC2012") in message
    assert "--download" in message and voc_lib.VOC_URL in message and voc_lib.SBD_URL in message


def test_missing_split_lists(demo, tmp_path):
    with pytest.raises(DataError) as info:
        VOCSegmentation(demo, "test")
    message = str(info.value)
    assert str(voc(demo) / "ImageSets" / "Segmentation" / "test.txt") in message
    assert "--download" in message
    bare = tmp_path / "VOCdevkit" / "VOC2012"
    bare.mkdir(parents=True)
    with pytest.raises(DataError) as info:
        VOCSegmentation(tmp_path)  # train_aug: built from SBD
    assert "train_aug.txt" in str(info.value) and "SBD" in str(info.value)
    assert "--download" in str(info.value)


def copy_demo(demo, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(demo, root)
    return root


def test_missing_or_bad_files_name_the_file(demo, tmp_path):
    root = copy_demo(demo, tmp_path)
    (voc(root) / "JPEGImages" / "val_0001.jpg").unlink()
    (voc(root) / "SegmentationClassAug" / "train_0002.png").unlink()
    with pytest.raises(DataError) as info:
        VOCSegmentation(root, "val")[1]
    # the other images are there: the split list names a file that is not, so fix the list
    assert str(voc(root) / "JPEGImages" / "val_0001.jpg") in str(info.value)
    assert "val.txt" in str(info.value) and "Remove the id from the list" in str(info.value)
    assert "--download" not in str(info.value)
    with pytest.raises(DataError) as info:
        VOCSegmentation(root)[2]
    assert str(voc(root) / "SegmentationClassAug" / "train_0002.png") in str(info.value)
    assert "train_aug.txt" in str(info.value)
    shutil.rmtree(voc(root) / "SegmentationClassAug")  # no train_aug masks at all: build them
    with pytest.raises(DataError) as info:
        VOCSegmentation(root)[2]
    assert "SBD" in str(info.value) and "--download" in str(info.value)

    label = load_label(voc(root) / "SegmentationClass" / "val_0000.png")
    label[0, 0] = 37
    save_label_png(voc(root) / "SegmentationClass" / "val_0000.png", label)
    with pytest.raises(DataError, match=r"\[37\]") as info:
        VOCSegmentation(root, "val")[0]
    assert "val_0000.png" in str(info.value)
    assert VOCSegmentation(root, "val", check_labels=False)[0]["label"][0, 0] == 37
    assert VOCSegmentation(root, "val", num_classes=38)[0]["label"][0, 0] == 37

    save_label_png(voc(root) / "SegmentationClass" / "val_0002.png", label[:-1])
    with pytest.raises(DataError, match="match its image") as info:
        VOCSegmentation(root, "val")[2]
    assert "val_0002.png" in str(info.value)

    (voc(root) / "JPEGImages" / "val_0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="corrupt") as info:
        VOCSegmentation(root, "val")[0]
    assert "val_0000.jpg" in str(info.value)


# --- SBD -> train_aug ------------------------------------------------------------------------

VOC_TRAIN = ["2008_000002", "2008_000003", "2008_000007"]
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2008_000003", "2009_000001", "2007_000033", "2009_000002"]
SBD_VAL = ["2010_000001", "2007_000042", "2008_000007"]
TRAIN_AUG = ["2008_000002", "2008_000003", "2008_000007", "2009_000001", "2009_000002",
             "2010_000001"]


def write_list(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_voc_and_sbd(tmp_path):
    """A small VOC layout (PNG labels with 255 borders) and an SBD layout (cls/*.mat as SBD
    writes them: struct GTcls with Segmentation, Boundaries, CategoriesPresent); every file's
    content is distinct. Returns (root, sbd, {id: VOC label}, {id: SBD label})."""
    rng = np.random.default_rng(0)
    root, sbd = tmp_path / "data", tmp_path / "data" / "SBD"
    base = voc(root)
    lists = base / "ImageSets" / "Segmentation"
    write_list(lists / "train.txt", VOC_TRAIN)
    write_list(lists / "val.txt", VOC_VAL)
    write_list(sbd / "train.txt", SBD_TRAIN)
    write_list(sbd / "val.txt", SBD_VAL)
    (sbd / "cls").mkdir(parents=True)
    (base / "JPEGImages").mkdir()
    voc_labels, sbd_labels = {}, {}
    for n, i in enumerate(sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))):
        h, w = 12 + n, 15 + 2 * n
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            base / "JPEGImages" / f"{i}.jpg")
        if i in VOC_TRAIN + VOC_VAL:
            label = rng.integers(0, 21, (h, w)).astype(np.uint8)
            label[0] = IGNORE
            save_label_png(base / "SegmentationClass" / f"{i}.png", label)
            voc_labels[i] = label
        if i in SBD_TRAIN + SBD_VAL:
            label = rng.integers(0, 21, (h, w)).astype(np.uint8)
            scipy.io.savemat(sbd / "cls" / f"{i}.mat", {"GTcls": {
                "Segmentation": label, "Boundaries": np.zeros((21, 1), np.uint8),
                "CategoriesPresent": np.unique(label)[1:].astype(np.uint8)}})
            sbd_labels[i] = label
    return root, sbd, voc_labels, sbd_labels


def aug_dir(root):
    return voc(root) / "SegmentationClassAug"


def check_train_aug(root, voc_labels, sbd_labels):
    """Every train_aug PNG: a VOC-palette PNG holding VOC's label where VOC has one, else SBD's."""
    assert sorted(p.name for p in aug_dir(root).iterdir()) == [f"{i}.png" for i in TRAIN_AUG]
    for i in TRAIN_AUG:
        expect = voc_labels[i] if i in voc_labels else sbd_labels[i]
        with Image.open(aug_dir(root) / f"{i}.png") as png:
            assert png.mode == "P"
            assert np.array_equal(np.array(png.getpalette()[:768], np.uint8).reshape(256, 3),
                                  voc_palette())
        assert np.array_equal(load_label(aug_dir(root) / f"{i}.png", expect.shape), expect)


def test_list_arithmetic():
    got = train_aug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL)
    expect = []
    for i in VOC_TRAIN + SBD_TRAIN + SBD_VAL:
        if i not in VOC_VAL and i not in expect:
            expect.append(i)
    assert got == sorted(expect) == TRAIN_AUG
    assert train_aug_ids(["b", "a", "a"], [], ["c"], ["a"]) == ["a", "b", "c"]
    assert train_aug_ids(["a"], ["a", "b"], ["b"], ["b", "c"]) == ["c"]


def test_sbd_mat_is_read_as_sbd_stores_it(tmp_path):
    _, sbd, _, sbd_labels = make_voc_and_sbd(tmp_path)
    path = sbd / "cls" / "2009_000001.mat"
    raw = scipy.io.loadmat(str(path), struct_as_record=False, squeeze_me=True)["GTcls"]
    assert raw.Segmentation.dtype == np.uint8 and raw.Segmentation.ndim == 2
    got = read_sbd_mask(path)
    assert got.dtype == np.uint8 and np.array_equal(got, sbd_labels["2009_000001"])
    (tmp_path / "junk.mat").write_bytes(b"MATLAB junk")
    with pytest.raises(DataError) as info:
        read_sbd_mask(tmp_path / "junk.mat")
    assert str(tmp_path / "junk.mat") in str(info.value)
    scipy.io.savemat(tmp_path / "flat.mat", {"GTcls": {"Segmentation": np.zeros((2, 2, 2))}})
    with pytest.raises(DataError, match="not an"):
        read_sbd_mask(tmp_path / "flat.mat")


def test_build_train_aug(tmp_path):
    root, sbd, voc_labels, sbd_labels = make_voc_and_sbd(tmp_path)
    counts = build_train_aug(root, sbd, progress=False)
    assert counts == {"train_aug": 6, "val": 2}
    lists = voc(root) / "ImageSets" / "Segmentation"
    assert (lists / "train_aug.txt").read_text() == "".join(f"{i}\n" for i in TRAIN_AUG)
    check_train_aug(root, voc_labels, sbd_labels)
    # VOC's own PNG wins where both exist (and is copied byte for byte)
    for i in ("2008_000003", "2008_000007"):
        assert not np.array_equal(voc_labels[i], sbd_labels[i])
        assert (aug_dir(root) / f"{i}.png").read_bytes() == \
            (voc(root) / "SegmentationClass" / f"{i}.png").read_bytes()
    # the loader reads the result, with its label checks
    ds = VOCSegmentation(root, "train_aug")
    assert ds.ids == TRAIN_AUG
    for n in range(len(ds)):
        assert np.array_equal(ds[n]["label"].numpy(),
                              {**sbd_labels, **voc_labels}[TRAIN_AUG[n]])


def test_build_train_aug_is_idempotent(tmp_path):
    root, sbd, voc_labels, sbd_labels = make_voc_and_sbd(tmp_path)
    build_train_aug(root, sbd, progress=False)
    written = list(aug_dir(root).iterdir()) + [voc(root) / "ImageSets/Segmentation/train_aug.txt"]
    old = 1_000_000_000_000_000_000
    for p in written:
        os.utime(p, ns=(old, old))
    assert build_train_aug(root, sbd, progress=False) == {"train_aug": 6, "val": 2}
    assert [p.stat().st_mtime_ns for p in written] == [old] * len(written), "rewrote files"
    check_train_aug(root, voc_labels, sbd_labels)


def test_failed_write_leaves_no_half_png_and_resumes(tmp_path, monkeypatch):
    root, sbd, voc_labels, sbd_labels = make_voc_and_sbd(tmp_path)
    real_save, calls = Image.Image.save, []

    def save_then_die(self, fp, *args, **kwargs):  # the 2nd PNG from SBD dies half-written
        calls.append(fp)
        if len(calls) == 2:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n half of a file")
            raise OSError("No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(OSError, match="No space"):
        build_train_aug(root, sbd, progress=False)
    monkeypatch.undo()
    names = sorted(p.name for p in aug_dir(root).iterdir())
    # sorted ids: two VOC copies, one SBD PNG, then the failure on 2009_000002
    assert names == ["2008_000002.png", "2008_000003.png", "2008_000007.png", "2009_000001.png"]
    for name in names:  # whatever is there is whole
        load_label(aug_dir(root) / name)
    assert not (voc(root) / "ImageSets/Segmentation/train_aug.txt").exists()
    old = 1_000_000_000_000_000_000
    for name in names:
        os.utime(aug_dir(root) / name, ns=(old, old))
    build_train_aug(root, sbd, progress=False)  # resumes: converts only what is missing
    assert all((aug_dir(root) / n).stat().st_mtime_ns == old for n in names)
    check_train_aug(root, voc_labels, sbd_labels)


def test_failed_copy_leaves_no_half_png(tmp_path, monkeypatch):
    root, sbd, voc_labels, sbd_labels = make_voc_and_sbd(tmp_path)

    def copy_then_die(src, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(open(src, "rb").read()[:30])
        raise OSError("Input/output error")

    monkeypatch.setattr(sbd_lib.shutil, "copyfile", copy_then_die)
    with pytest.raises(OSError, match="Input/output"):
        build_train_aug(root, sbd, progress=False)
    monkeypatch.undo()
    assert list(aug_dir(root).iterdir()) == []
    build_train_aug(root, sbd, progress=False)
    check_train_aug(root, voc_labels, sbd_labels)


def test_real_count_assertion(tmp_path):
    root, sbd, _, _ = make_voc_and_sbd(tmp_path)
    with pytest.raises(DataError) as info:
        build_train_aug(root, sbd, expect_real_counts=True, progress=False)
    message = str(info.value)
    for part in ("train_aug has 6 ids and val 2", "10582", "1449", "VOC train 3 (expect 1,464)",
                 "VOC val 2 (expect 1,449)", "SBD train 4 (expect 8,498)",
                 "SBD val 3 (expect 2,857)"):
        assert part in message, part
    assert not aug_dir(root).exists() or not list(aug_dir(root).iterdir())
    # with the real VOC train list size the check is on by default
    write_list(voc(root) / "ImageSets/Segmentation/train.txt", [f"x{n}" for n in range(1464)])
    with pytest.raises(DataError, match="VOC train 1464"):
        build_train_aug(root, sbd, progress=False)


def test_missing_sbd_inputs(tmp_path):
    root, sbd, _, _ = make_voc_and_sbd(tmp_path)
    (sbd / "cls" / "2010_000001.mat").unlink()
    with pytest.raises(DataError) as info:
        build_train_aug(root, sbd, progress=False)
    assert str(sbd / "cls" / "2010_000001.mat") in str(info.value)
    (sbd / "val.txt").unlink()
    with pytest.raises(DataError) as info:
        build_train_aug(root, sbd, progress=False)
    assert str(sbd / "val.txt") in str(info.value) and "--sbd-root" in str(info.value)
    with pytest.raises(DataError) as info:
        build_train_aug(tmp_path / "elsewhere", sbd, progress=False)
    assert "train.txt" in str(info.value) and "--download" in str(info.value)


def test_download_uses_torchvision_then_builds_train_aug(tmp_path, monkeypatch):
    """No network here: torchvision's classes are replaced by stand-ins that lay the files out
    as torchvision's downloads do, and record how they were called."""
    source, _, voc_labels, sbd_labels = make_voc_and_sbd(tmp_path / "source")
    calls = []

    def fake_voc(root, year, image_set, download):
        calls.append(("voc", root, year, image_set, download))
        shutil.copytree(source / "VOCdevkit", os.path.join(root, "VOCdevkit"))

    def fake_sbd(root, image_set, mode, download):
        calls.append(("sbd", root, image_set, mode, download))
        shutil.copytree(source / "SBD", root)

    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", fake_voc)
    monkeypatch.setattr(torchvision.datasets, "SBDataset", fake_sbd)
    root = tmp_path / "data"
    assert sbd_lib.download(root) == {"train_aug": 6, "val": 2}
    assert calls == [("voc", str(root), "2012", "train", True),
                     ("sbd", str(root / "SBD"), "train", "segmentation", True)]
    check_train_aug(root, voc_labels, sbd_labels)
    calls.clear()  # a second --download finds both data sets in place and fetches nothing
    assert sbd_lib.download(root) == {"train_aug": 6, "val": 2} and calls == []
    check_train_aug(root, voc_labels, sbd_labels)


def test_cli(tmp_path, capsys):
    root, sbd, _, _ = make_voc_and_sbd(tmp_path)
    assert datasets.main(["--root", str(root), "--sbd-root", str(sbd)]) == 0
    assert "train_aug: 6 ids, val: 2 ids" in capsys.readouterr().out
    assert datasets.main(["--root", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--download" in err
    with pytest.raises(SystemExit) as info:
        datasets.main(["--help"])
    assert info.value.code == 0 and "--sbd-root" in capsys.readouterr().out
