"""Data sets beyond VOC (seglab/data/{cityscapes,ade20k,cocostuff,folder}.py) on generated
miniature layouts: listing (against torchvision's own Cityscapes reader), label maps against
maps written out here from the published tables, refused labels that name the file, training,
evaluation and the CRF through the scripts (scores recomputed here from the written
predictions), and fine-tuning across class counts (seglab/training/init.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image
from scipy.io import savemat

import datasets
import evaluate
import train
from seglab.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from seglab.data.ade20k import ADE20KSegmentation
from seglab.data.cityscapes import CityscapesSegmentation
from seglab.data.cocostuff import CocoStuff10k, CocoStuff164k
from seglab.data.folder import FolderSegmentation, seeded_split
from seglab.data.images import DataError
from seglab.data.registry import DATASETS
from seglab.data.transforms import EvalTransform, TrainTransform
from seglab.models import build_model
from seglab.models import class_dependent
from seglab.training.init import TrainingError, load_init

H, W = 40, 48
# Raw annotation value -> class index, written out from the published tables (not from the code
# under test): Cityscapes' labels.py (road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2, pole
# 17 -> 5, vegetation 21 -> 8, sky 23 -> 10, person 24 -> 11, car 26 -> 13, bicycle 33 -> 18;
# unlabeled 0, ego vehicle 1, ground 6, guard rail 14 ignored), mmsegmentation's COCO-Stuff
# clsID_to_trID (id 11 "street sign" is unused), ADE20K's value - 1.
CITYSCAPES = {0: 255, 1: 255, 6: 255, 7: 0, 8: 1, 11: 2, 14: 255, 17: 5, 21: 8, 23: 10, 24: 11,
              26: 13, 33: 18}
COCO171 = {0: 0, 10: 10, 11: 255, 12: 11, 26: 24, 30: 26, 45: 40, 181: 170, 255: 255}
COCO182 = {k: k for k in COCO171}
ADE = {0: 255, 1: 0, 2: 1, 5: 4, 150: 149}
FOLDER = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 255: 255}


def raw_label(rng, values) -> np.ndarray:
    """An (H, W) map of 8x8 blocks of the given raw values, every value present."""
    values = np.array(sorted(values))
    blocks = rng.choice(values, size=(H // 8, W // 8))
    blocks.flat[:len(values)] = values
    return np.kron(blocks, np.ones((8, 8), blocks.dtype))


def write_image(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


def write_png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def make_cityscapes(root: Path, seed=0) -> dict:
    """{split: {id: raw label}}; cities as in the real layout."""
    rng, out = np.random.default_rng(seed), {}
    for split, cities, n in (("train", ("aachen", "bochum"), 2), ("val", ("lindau",), 2)):
        out[split] = {}
        for city in cities:
            for k in range(n):
                stem = f"{city}_{k:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng)
                out[split][stem] = raw_label(rng, CITYSCAPES)
                write_png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                          out[split][stem])
    return out


def make_ade20k(root: Path, seed=0) -> dict:
    rng, out, base = np.random.default_rng(seed), {}, root / "ADEChallengeData2016"
    for split, n in (("training", 4), ("validation", 2)):
        out[split] = {}
        for k in range(n):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{k + 1:08d}"
            write_image(base / "images" / split / f"{stem}.jpg", rng)
            out[split][stem] = raw_label(rng, ADE)
            write_png(base / "annotations" / split / f"{stem}.png", out[split][stem])
    return out


def make_cocostuff164k(root: Path, seed=0) -> dict:
    rng, out = np.random.default_rng(seed), {}
    for split, n in (("train2017", 4), ("val2017", 2)):
        out[split] = {}
        for k in range(n):
            stem = f"{k + 1 + 100 * (split == 'val2017'):012d}"
            write_image(root / "images" / split / f"{stem}.jpg", rng)
            out[split][stem] = raw_label(rng, COCO171)
            write_png(root / "annotations" / split / f"{stem}.png", out[split][stem])
    return out


def make_cocostuff10k(root: Path, seed=0) -> dict:
    """Raw ids as the 164k PNGs hold them; the .mat files store id + 1 (0 = unlabelled)."""
    rng, out = np.random.default_rng(seed), {}
    (root / "annotations").mkdir(parents=True)
    (root / "imageLists").mkdir()
    for split, n in (("train", 4), ("test", 2)):
        out[split] = {}
        for k in range(n):
            stem = f"COCO_{split}2014_{k:012d}"
            write_image(root / "images" / f"{stem}.jpg", rng)
            ids = raw_label(rng, COCO171)
            out[split][stem] = ids
            s = np.where(ids == 255, 0, ids.astype(np.uint16) + 1).astype(np.uint16)
            savemat(str(root / "annotations" / f"{stem}.mat"), {"S": s})
        (root / "imageLists" / f"{split}.txt").write_text("\n".join(out[split]) + "\n")
    return out


def make_folder(root: Path, seed=0, n=8) -> dict:
    """Five classes, no split lists (a seeded split), one PNG image among the JPEGs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nroad\ntree\nroof\nwater\n")
    every = {}
    for k in range(n):
        stem = f"tile_{k:03d}"
        write_image(root / "images" / f"{stem}.{'png' if k == 0 else 'jpg'}", rng)
        every[stem] = raw_label(rng, FOLDER)
        write_png(root / "masks" / f"{stem}.png", every[stem])
    split = seeded_split(every)
    return {s: {i: every[i] for i in ids} for s, ids in split.items()}


# name: (maker, class, {split role: split name}, oracle map, num_classes)
LAYOUTS = {
    "cityscapes": (make_cityscapes, CityscapesSegmentation, ("train", "val"), CITYSCAPES, 19),
    "ade20k": (make_ade20k, ADE20KSegmentation, ("training", "validation"), ADE, 150),
    "cocostuff164k": (make_cocostuff164k, CocoStuff164k, ("train2017", "val2017"), COCO171, 171),
    "cocostuff10k": (make_cocostuff10k, CocoStuff10k, ("train", "test"), COCO171, 171),
    "folder": (make_folder, FolderSegmentation, ("train", "val"), FOLDER, 5),
}


def oracle(raw: np.ndarray, table: dict) -> np.ndarray:
    out = np.full(raw.shape, 77, np.uint8)
    for k, v in table.items():
        out[raw == k] = v
    assert (out != 77).all()
    return out


@pytest.fixture(params=sorted(LAYOUTS))
def layout(request, tmp_path):
    make, cls, splits, table, n = LAYOUTS[request.param]
    root = tmp_path / request.param
    raw = make(root)
    return request.param, root, raw, cls, splits, table, n


def test_every_layout_loads_and_maps_its_labels(layout):
    name, root, raw, cls, splits, table, n = layout
    assert DATASETS[name] is cls
    for split in splits:
        ds = cls(root, split, num_classes=n)
        assert ds.ids == sorted(raw[split]) and len(ds) == len(raw[split])
        assert len(ds.class_names) == n and ds.palette.shape == (256, 3)
        for i, image_id in enumerate(ds.ids):
            expect = oracle(raw[split][image_id], table)
            np.testing.assert_array_equal(ds.load_label(i, (H, W)), expect)
            item = ds[i]  # no transform: Caffe-normalised image, the label as is
            assert item["id"] == image_id and item["size"] == (H, W)
            np.testing.assert_array_equal(item["label"].numpy(), expect)
            # label_path: a PNG of class indices, whatever the annotation format
            np.testing.assert_array_equal(np.array(Image.open(ds.label_path(i))), expect)
    ds = cls(root, splits[0], TrainTransform(crop=33, scales=(1.0,), mirror=False), num_classes=n)
    item = ds[(0, 5)]
    assert item["image"].shape == (3, 33, 33) and item["label"].shape == (33, 33)
    assert set(item["label"].unique().tolist()) <= set(table.values())
    ds = cls(root, splits[1], EvalTransform(pad_to=49), num_classes=n)
    assert ds[0]["image"].shape == (3, 49, 49) and ds[0]["label"].shape == (H, W)


def test_cityscapes_lists_what_torchvision_lists(tmp_path):
    raw = make_cityscapes(tmp_path)
    ours = CityscapesSegmentation(tmp_path, "train")
    theirs = torchvision.datasets.Cityscapes(str(tmp_path), split="train", target_type="semantic")
    assert sorted(map(str, (ours.image_path(i) for i in range(len(ours))))) == sorted(theirs.images)
    for k, image_path in enumerate(theirs.images):
        i = ours.ids.index(Path(image_path).name.replace("_leftImg8bit.png", ""))
        np.testing.assert_array_equal(np.array(theirs[k][1]), raw["train"][ours.ids[i]])
        np.testing.assert_array_equal(ours.load_label(i), oracle(np.array(theirs[k][1]),
                                                                 CITYSCAPES))
    assert ours.class_names[0] == "road" and ours.class_names[18] == "bicycle"
    assert tuple(ours.palette[0]) == (128, 64, 128) and tuple(ours.palette[13]) == (0, 0, 142)
    # the mapped copy carries the name of cityscapesScripts' createTrainIdLabelImgs output
    assert ours.label_path(0).name.endswith("_gtFine_labelTrainIds.png")


def test_mapped_copy_follows_the_annotation_and_stands_in_for_it(tmp_path):
    make_cityscapes(tmp_path)
    ds = CityscapesSegmentation(tmp_path, "val")
    mapped, labelids = ds.label_path(0), ds.raw_label_path(0)
    write_png(labelids, np.full((H, W), 26))  # edited annotation: all car
    assert (np.array(Image.open(ds.label_path(0))) == 13).all()  # rewritten, newer than before
    labelids.unlink()  # only the train-id files kept: read from them
    assert (ds.load_label(0) == 13).all() and ds.label_path(0) == mapped


def test_cocostuff_182_is_the_ports_identity_and_171_the_used_ids(tmp_path):
    raw = make_cocostuff164k(tmp_path / "164k")
    make_cocostuff10k(tmp_path / "10k")
    for cls, root, split in ((CocoStuff164k, tmp_path / "164k", "val2017"),
                             (CocoStuff10k, tmp_path / "10k", "test")):
        full = cls(root, split, num_classes=182)
        used = cls(root, split, num_classes=171)
        assert len(full.class_names) == 182 and full.class_names[11] == "street sign"
        assert len(used.class_names) == 171 and used.class_names[11] == "stop sign"
        assert used.class_names[-1] == full.class_names[-1] == "wood"
        for i in range(len(full)):
            ids = full.load_label(i)
            np.testing.assert_array_equal(used.load_label(i), oracle(ids, COCO171))
    # 164k with 182 classes reads the annotation PNGs as they are
    ds = CocoStuff164k(tmp_path / "164k", "val2017", num_classes=182)
    assert ds.label_path(0) == ds.raw_label_path(0)
    np.testing.assert_array_equal(ds.load_label(0), raw["val2017"][ds.ids[0]])
    with pytest.raises(DataError, match="data.num_classes=171"):
        CocoStuff164k(tmp_path / "164k", "val2017", num_classes=21)


def test_split_names_and_missing_layouts(tmp_path):
    make_ade20k(tmp_path / "ade")
    assert ADE20KSegmentation(tmp_path / "ade", "val").ids == \
        ADE20KSegmentation(tmp_path / "ade" / "ADEChallengeData2016", "validation").ids
    for cls, root, fix in ((CityscapesSegmentation, tmp_path / "none", "leftImg8bit"),
                           (ADE20KSegmentation, tmp_path / "none", "--download"),
                           (CocoStuff10k, tmp_path / "none", "imageLists"),
                           (CocoStuff164k, tmp_path / "none", "--download"),
                           (FolderSegmentation, tmp_path / "none", "classes.txt")):
        with pytest.raises(DataError, match=fix):
            cls(root, "val")
    with pytest.raises(DataError, match="no split 'bogus'"):
        CityscapesSegmentation(tmp_path, "bogus")


def test_folder_classes_palette_and_splits(tmp_path):
    raw = make_folder(tmp_path)
    train_ds, val_ds = FolderSegmentation(tmp_path, "train"), FolderSegmentation(tmp_path, "val")
    every = sorted(p.stem for p in (tmp_path / "masks").glob("*.png"))
    assert sorted(train_ds.ids + val_ds.ids) == every and not set(train_ds.ids) & set(val_ds.ids)
    assert len(val_ds) == 1 and val_ds.ids == sorted(raw["val"])  # round(0.1 x 8) = 1
    assert train_ds.class_names == ["background", "road", "tree", "roof", "water"]
    assert FolderSegmentation(tmp_path, "all").ids == every
    every_ds = FolderSegmentation(tmp_path, "all")
    assert every_ds.ids[0] == "tile_000" and every_ds.image_path(0).suffix == ".png"
    # lists win over the seeded split; a palette colours the classes
    (tmp_path / "val.txt").write_text("tile_003\ntile_005\n")
    (tmp_path / "palette.txt").write_text("0 0 0\n128 64 128\n0 128 0\n200 0 0\n0 0 255\n")
    ds = FolderSegmentation(tmp_path, "val", num_classes=5)
    assert ds.ids == ["tile_003", "tile_005"] and tuple(ds.palette[1]) == (128, 64, 128)
    with pytest.raises(DataError, match="data.num_classes=5"):
        FolderSegmentation(tmp_path, "val", num_classes=21)
    (tmp_path / "palette.txt").write_text("0 0 0\n")
    with pytest.raises(DataError, match="palette.txt"):
        FolderSegmentation(tmp_path, "val")


def test_seeded_split_is_a_seeded_permutation():
    ids = [f"x{k}" for k in range(20)]
    a, b = seeded_split(ids, 0.25, seed=3), seeded_split(list(reversed(ids)), 0.25, seed=3)
    assert a == b and len(a["val"]) == 5 and sorted(a["train"] + a["val"]) == sorted(ids)
    order = np.random.default_rng(3).permutation(20)
    assert a["val"] == sorted(sorted(ids)[k] for k in order[:5])
    assert seeded_split(ids, 0.25, seed=4) != a
    assert seeded_split(["one"], 0.5)["val"] == [] and len(seeded_split(ids[:2], 0.01)["val"]) == 1


def bad_label_cases(name, root, ds):
    """(write a bad annotation for image 0, pattern the error must contain)."""
    path = ds.raw_label_path(0)
    if name == "cocostuff10k":
        return [(lambda: savemat(str(path), {"S": np.full((H, W), 200, np.uint16)}), "200"),
                (lambda: savemat(str(path), {"S": np.zeros((H, W, 3), np.uint16)}), "not an")]
    out_of_range = {"cityscapes": 34, "ade20k": 151, "cocostuff164k": 182, "folder": 5}[name]
    return [(lambda: write_png(path, np.full((H, W), out_of_range)), str(out_of_range)),
            (lambda: Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(path), "RGB"),
            (lambda: write_png(path, np.zeros((H + 8, W))), "but its image")]


def test_bad_labels_are_refused_naming_the_file(layout):
    name, root, raw, cls, splits, table, n = layout
    ds = cls(root, splits[1], num_classes=n)
    for write_bad, pattern in bad_label_cases(name, root, ds):
        write_bad()
        reads = [lambda: ds.load_label(0, (H, W)), lambda: ds[0]]
        if ds.mapped_label_path(0) is not None:  # label_path writes the checked, mapped copy
            reads.append(lambda: ds.label_path(0))
        for read in reads:
            with pytest.raises(DataError) as info:
                read()
            assert str(ds.raw_label_path(0)) in str(info.value) and pattern in str(info.value)


def tiny_config(tmp_path, name, root, splits, n, **train_over) -> str:
    cfg = {"data": {"dataset": name, "root": str(root), "train_split": splits[0],
                    "val_split": splits[1], "num_classes": n, "crop": 33, "workers": 0},
           "model": {"arch": {"depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": False},
                     "msc_scales": []},
           "train": dict({"init": "scratch", "iterations": 3, "effective_batch": 2,
                          "batch_per_step": 2, "base_lr": 0.01, "checkpoint_every": 3},
                         **train_over),
           "eval": {"after_train": False, "pad_to": 49},
           "crf": {"workers": 1, "iterations": 2},
           "run": {"out": str(tmp_path / "runs")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def miou_of(folder: Path, labels: dict, n: int) -> float:
    """mIoU of the prediction PNGs in `folder` against `labels`, counted here."""
    m = np.zeros((n, n), np.int64)
    for image_id, gt in labels.items():
        pred = np.array(Image.open(folder / f"{image_id}.png")).astype(np.int64)
        keep = gt != 255
        m += np.bincount(n * gt[keep].astype(np.int64) + pred[keep], minlength=n * n).reshape(n, n)
    tp, union = np.diag(m), m.sum(0) + m.sum(1) - np.diag(m)
    return float((tp[union > 0] / union[union > 0]).mean())


def test_train_evaluate_and_crf_through_the_scripts(layout, tmp_path, capsys):
    name, root, raw, cls, splits, table, n = layout
    cfg = tiny_config(tmp_path, name, root, splits, n)
    run = tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert ckpt["arch"]["num_classes"] == n and ckpt["trained_on"] == splits[0]
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(run / "checkpoints" / "final.pth"), "--config", cfg,
                          "--out", str(out), "--crf"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    crf_scores = json.loads((out / "scores_crf.json").read_text())
    names = cls(root, splits[1], num_classes=n).class_names
    assert scores["num_images"] == len(raw[splits[1]]) and scores["class_names"] == names
    assert names[-1] in printed
    labels = {i: oracle(r, table) for i, r in raw[splits[1]].items()}
    assert scores["miou"] == pytest.approx(miou_of(out / "pred", labels, n))
    assert crf_scores["miou"] == pytest.approx(miou_of(out / "pred_crf", labels, n))


def test_a_class_count_that_does_not_fit_the_data_set_is_refused(tmp_path, capsys):
    make_cityscapes(tmp_path / "cs")
    cfg = tiny_config(tmp_path, "cityscapes", tmp_path / "cs", ("train", "val"), 21)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    assert "data.num_classes=19" in capsys.readouterr().err


# --- fine-tuning across class counts ----------------------------------------------------------

TINY = {"name": "deeplabv2", "depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": True}
HEAD = {"aspp.c0.weight", "aspp.c0.bias", "aspp.c1.weight", "aspp.c1.bias"}


def voc_checkpoint(path: Path, **arch) -> dict:
    torch.manual_seed(7)
    net = build_model(dict(TINY, num_classes=21, **arch))
    atomic_save(make_checkpoint(net.arch, net.state_dict(), trained_on="train_aug",
                                input_norm="caffe"), path)
    return net.state_dict()


def init_cfg(path) -> dict:
    return {"train": {"init": str(path)}}


def test_classifier_is_the_class_dependent_tensors():
    assert class_dependent(dict(TINY, num_classes=5)) == HEAD


def test_finetune_from_21_classes_loads_the_backbone_exactly(tmp_path):
    theirs = voc_checkpoint(tmp_path / "voc.pth")
    net = build_model(dict(TINY, num_classes=5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    note = load_init(net, init_cfg(tmp_path / "voc.pth"))
    after = net.state_dict()
    for k, v in after.items():
        if k in HEAD:  # re-initialised: the fresh build's ASPP, N(0, 0.01) and zero bias
            assert torch.equal(v, before[k]) and v.shape[0] == 5
        else:
            assert torch.equal(v, theirs[k]), k
    assert after["aspp.c0.bias"].abs().max() == 0 and 0.005 < after["aspp.c0.weight"].std() < 0.02
    assert "21 classes -> 5" in note and "re-initialised 4" in note
    assert {line.split()[0] for line in note.splitlines()[1:]} == HEAD
    # the same class count loads everything
    same = build_model(dict(TINY, num_classes=21))
    assert "every tensor loaded" in load_init(same, init_cfg(tmp_path / "voc.pth"))
    # a converted file without a classifier (init.caffemodel's) leaves the head as built
    ckpt = load_checkpoint(tmp_path / "voc.pth")
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("aspp.")}
    atomic_save(ckpt, tmp_path / "headless.pth")
    assert "aspp.c1.bias (absent -> (5,))" in load_init(
        build_model(dict(TINY, num_classes=5)), init_cfg(tmp_path / "headless.pth"))


def test_another_backbone_is_a_clear_error(tmp_path):
    voc_checkpoint(tmp_path / "wide.pth", width=16)
    with pytest.raises(TrainingError, match="width: checkpoint 16 vs requested 8"):
        load_init(build_model(dict(TINY, num_classes=5)), init_cfg(tmp_path / "wide.pth"))
    ckpt = load_checkpoint(tmp_path / "wide.pth")
    ckpt["arch"]["width"] = 8  # a file whose arch says 8 but whose tensors are 16 wide
    atomic_save(ckpt, tmp_path / "liar.pth")
    with pytest.raises(TrainingError, match="outside its classifier.*backbone"):
        load_init(build_model(dict(TINY, num_classes=5)), init_cfg(tmp_path / "liar.pth"))


def test_finetune_to_a_five_class_folder_through_train_py(tmp_path, capsys):
    voc_checkpoint(tmp_path / "voc.pth")
    make_folder(tmp_path / "mine")
    cfg = tiny_config(tmp_path, "folder", tmp_path / "mine", ("train", "val"), 5)
    run = tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run), "--init",
                       str(tmp_path / "voc.pth")]) == 0
    out = capsys.readouterr().err  # train.py's header: run folder, init, ...
    assert "21 classes -> 5" in out and "re-initialised 4 (the classifier)" in out
    assert all(f"  {k} (" in out for k in HEAD)
    assert load_checkpoint(run / "checkpoints" / "final.pth")["arch"]["num_classes"] == 5


# --- datasets.py ------------------------------------------------------------------------------

def test_cli_downloads_and_prepares(tmp_path, monkeypatch, capsys):
    fetched = []

    def fake_download(url, download_root, extract_root=None, **_):
        fetched.append(url)
        make_ade20k(Path(download_root))
    monkeypatch.setattr("seglab.data.ade20k.download_and_extract_archive", fake_download)
    root = tmp_path / "ade"
    assert datasets.main(["--dataset", "ade20k", "--root", str(root), "--download"]) == 0
    assert fetched == ["http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"]
    assert "training: 4 images, validation: 2 images" in capsys.readouterr().out
    mapped = root / "ADEChallengeData2016" / "annotations_trainid" / "validation"
    assert len(list(mapped.glob("*.png"))) == 2
    assert datasets.main(["--dataset", "ade20k", "--root", str(root), "--download"]) == 0
    assert len(fetched) == 1  # in place: nothing fetched again
    assert datasets.main(["--dataset", "cityscapes", "--root", str(tmp_path), "--download"]) == 2
    assert "login" in capsys.readouterr().err


def test_cli_folder_writes_a_seeded_split_once(tmp_path, capsys):
    make_folder(tmp_path)
    assert datasets.main(["--dataset", "folder", "--root", str(tmp_path), "--val-fraction", "0.25",
                          "--seed", "3"]) == 0
    assert "train: 6 images, val: 2 images, classes: 5" in capsys.readouterr().out
    every = sorted(p.stem for p in (tmp_path / "masks").glob("*.png"))
    split = seeded_split(every, 0.25, 3)
    assert (tmp_path / "val.txt").read_text().split() == split["val"]
    assert datasets.main(["--dataset", "folder", "--root", str(tmp_path), "--seed", "4"]) == 0
    assert (tmp_path / "val.txt").read_text().split() == split["val"]  # lists kept
    write_png(tmp_path / "masks" / f"{split['val'][0]}.png", np.full((H, W), 9))
    assert datasets.main(["--dataset", "folder", "--root", str(tmp_path)]) == 2
    assert f"{split['val'][0]}.png" in capsys.readouterr().err
