"""An up-front check of a whole split, so a bad sample stops training before it starts, not at
iteration 999: every image decodes, every label is a single-channel index mask of its image's
size with values in 0..num_classes-1 or 255. Runs in threads (PIL decodes outside the GIL).

data.check: "auto" checks splits of up to AUTO_LIMIT images (a few seconds); "always" checks any
split (VOC train_aug: about a minute on 2 cores); "never" skips it. A sample that goes bad anyway
stops training with a checkpoint (seglab/training/loop.py).
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from seglab.data.images import DataError, load_image

AUTO_LIMIT = 2000
SHOWN = 10


def _check_one(dataset, i: int) -> str | None:
    try:
        image = load_image(dataset._require(dataset.image_path(i), "image"))
        dataset.load_label(i, image.shape[:2])
    except DataError as e:
        return str(e)
    return None


def check_split(dataset, mode: str = "auto", workers: int = 2, progress: bool = True) -> int:
    """Check every sample of `dataset`; raise one DataError listing the bad ones. Returns the
    number of samples checked (0 when skipped)."""
    if mode == "never" or (mode == "auto" and len(dataset) > AUTO_LIMIT):
        if mode == "auto":
            print(f"note: not checking the {len(dataset)} samples up front (data.check=auto "
                  f"checks up to {AUTO_LIMIT}); data.check=always does", file=sys.stderr)
        return 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = [e for e in tqdm(pool.map(lambda i: _check_one(dataset, i), range(len(dataset))),
                                  total=len(dataset), desc="checking the split", unit="img",
                                  disable=not progress, leave=False) if e]
    if errors:
        more = f"\n  ... and {len(errors) - SHOWN} more" if len(errors) > SHOWN else ""
        raise DataError(f"{len(errors)} of {len(dataset)} samples of the training split are "
                        "unusable:\n  " + "\n  ".join(errors[:SHOWN]) + more)
    return len(dataset)
