"""SBD's extra annotations turned into VOC's `train_aug`, and the download of VOC + SBD.

`train_aug` = (VOC train ∪ SBD train ∪ SBD val) − VOC val = 10,582 ids; `val` = 1,449 ids.
torchvision's SBDataset "train"/"val" is SBD's own 8,498/2,857 split, whose val overlaps VOC
val: it is an input here, never a training list on its own.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torchvision
from scipy.io import loadmat
from tqdm import tqdm

from seglab.atomic import atomic_output
from seglab.data.images import DataError
from seglab.data.labels import save_label_png
from seglab.data.voc import HOW_TO_GET, REAL_COUNTS, read_ids, voc_dir


def read_sbd_mask(path: Path) -> np.ndarray:
    """SBD's cls/<id>.mat: struct GTcls with field Segmentation (H, W) of class indices."""
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:
        raise DataError(f"cannot read SBD annotation {path}: {e}. Re-extract SBD's benchmark.tgz.") from e
    if seg.ndim != 2 or seg.min(initial=0) < 0 or seg.max(initial=0) > 255:
        raise DataError(f"SBD annotation {path}: GTcls.Segmentation is not an (H, W) map of class "
                        f"indices 0..255 (shape {seg.shape}); re-extract SBD's benchmark.tgz.")
    return seg.astype(np.uint8)


def train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) -> list[str]:
    """(VOC train ∪ SBD train ∪ SBD val) − VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def build_train_aug(root, sbd_root, expect_real_counts: bool | None = None,
                    progress: bool = True) -> dict:
    """Write SegmentationClassAug/ and train_aug.txt; idempotent (present PNGs are kept) and
    safe to kill (every PNG is written to a temp file and renamed)."""
    base, sbd = voc_dir(root), Path(sbd_root)
    lists = base / "ImageSets" / "Segmentation"
    voc_train, voc_val = read_ids(lists / "train.txt"), read_ids(lists / "val.txt")
    for name in ("train.txt", "val.txt"):
        if not (sbd / name).is_file():
            raise DataError(f"SBD list {sbd / name} not found: --sbd-root must hold cls/, img/, "
                            f"train.txt and val.txt (SBD's benchmark_RELEASE/dataset). {HOW_TO_GET}")
    sbd_train, sbd_val = read_ids(sbd / "train.txt"), read_ids(sbd / "val.txt")
    ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    if expect_real_counts is None:
        expect_real_counts = len(voc_train) == REAL_COUNTS["train"]
    if expect_real_counts and (len(ids) != REAL_COUNTS["train_aug"] or len(voc_val) != REAL_COUNTS["val"]):
        raise DataError(
            f"train_aug has {len(ids)} ids and val {len(voc_val)}; the real data gives "
            f"{REAL_COUNTS['train_aug']} and {REAL_COUNTS['val']}. Found: VOC train {len(voc_train)} "
            f"(expect 1,464), VOC val {len(voc_val)} (expect 1,449), SBD train {len(sbd_train)} "
            f"(expect 8,498), SBD val {len(sbd_val)} (expect 2,857): the list whose size differs is "
            "incomplete or from another release.")
    out = base / "SegmentationClassAug"
    out.mkdir(parents=True, exist_ok=True)
    voc_pngs = base / "SegmentationClass"
    for i in tqdm(ids, desc="train_aug masks", disable=not progress):
        target = out / f"{i}.png"
        if target.is_file():
            continue
        if (voc_pngs / f"{i}.png").is_file():  # VOC's own annotation wins
            with atomic_output(target) as tmp:
                shutil.copyfile(voc_pngs / f"{i}.png", tmp)
        else:
            mat = sbd / "cls" / f"{i}.mat"
            if not mat.is_file():
                raise DataError(f"{i} is in the SBD lists but {mat} is missing; re-extract SBD.")
            save_label_png(target, read_sbd_mask(mat))
    listing = "".join(f"{i}\n" for i in ids)
    target = lists / "train_aug.txt"
    if not target.is_file() or target.read_text() != listing:  # a rerun leaves it untouched
        with atomic_output(target) as tmp:
            tmp.write_text(listing)
    return {"train_aug": len(ids), "val": len(voc_val)}


def download(root) -> dict:
    """Fetch VOC 2012 and SBD with torchvision's own download code, then build train_aug.

    A data set already in place is not fetched again: torchvision would re-extract the 2 GB VOC
    tar, and its SBD code fails when SBD's folders already exist (it moves them into place)."""
    root = Path(root)
    base, sbd = voc_dir(root), root / "SBD"
    if not ((base / "JPEGImages").is_dir() and (base / "SegmentationClass").is_dir()
            and (base / "ImageSets" / "Segmentation" / "val.txt").is_file()):
        torchvision.datasets.VOCSegmentation(str(root), year="2012", image_set="train",
                                             download=True)
    if not ((sbd / "cls").is_dir() and (sbd / "train.txt").is_file()
            and (sbd / "val.txt").is_file()):
        torchvision.datasets.SBDataset(str(sbd), image_set="train", mode="segmentation",
                                       download=True)
    return build_train_aug(root, sbd)
