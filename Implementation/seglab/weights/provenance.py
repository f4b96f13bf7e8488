"""What weights were trained on, and the warning evaluation gives when they saw the split it
scores (a `trainval` model scored on `val` measures memorisation, not generalisation)."""
from __future__ import annotations

import sys
from pathlib import Path


# Which image sets each training split contains ("sbd": SBD images outside VOC val).
SPLIT_CONTENTS = {
    "train": {"train"}, "val": {"val"}, "test": {"test"},
    "trainval": {"train", "val"},
    "train_aug": {"train", "sbd"},
    "trainval_aug": {"train", "val", "sbd"},
    "coco": {"coco"}, "imagenet": {"imagenet"},
}


def guess_trained_on(path, converter: str) -> str | None:
    """The release's naming: train_iter_* = train_aug, train2_* = trainval (train+val),
    init.caffemodel = MS-COCO; the published port's file says `vocaug`; torchvision = ImageNet."""
    name = Path(str(path)).name.lower()
    if converter == "torchvision":
        return "imagenet"
    if "train2" in name or "trainval" in name:
        return "trainval"
    if name.startswith("train_iter") or "vocaug" in name or "train_aug" in name:
        return "train_aug"
    if name.startswith("init") or "coco" in name:
        return "coco"
    return None


def _contents(split) -> set:
    splits = [split] if isinstance(split, str) else list(split or [])
    return set().union(*[SPLIT_CONTENTS.get(s, {s}) for s in splits])


def warn_if_trained_on(ckpt: dict, split: str, stream=None) -> bool:
    """Print a loud warning to stderr and return True when the checkpoint's `trained_on` includes
    the images of `split` (e.g. a `trainval` model scored on `val`)."""
    trained_on = ckpt.get("trained_on")
    overlap = _contents(trained_on) & _contents(split)
    if not trained_on or not overlap:
        return False
    source = (ckpt.get("provenance") or {}).get("source", "this checkpoint")
    bar = "!" * 78
    print("\n".join([
        bar,
        f"!! WARNING: the weights were trained on {trained_on!r}, which contains the images of",
        f"!! {split!r} ({', '.join(sorted(overlap))}). Scores on {split!r} measure memorisation,",
        "!! not generalisation: do not report them as results. (The release's train2_* models",
        "!! were fine-tuned on train+val for the test server; score train_iter_* models on val.)",
        f"!! source: {source}",
        bar]), file=stream or sys.stderr)
    return True
