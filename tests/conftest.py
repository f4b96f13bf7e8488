"""Shared fixtures. Everything the tests read is generated here, on the fly."""
import random

import numpy as np
import pytest
import torch

# As train.py does: flush denormals before torch starts its threads (they inherit the flag);
# training steps that drive some softmax probabilities to ~1e-40 are otherwise several times slower.
torch.set_flush_denormal(True)
# One intra-op thread: the tests run mostly tiny models, whose many small parallel regions stall
# for whole scheduler slices when another process holds the second core (10-40x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def resnet101():
    """One full DeepLab v2 ResNet-101 (random weights), shared: building it takes ~1 s."""
    from seglab.models.deeplabv2 import DeepLabV2
    return DeepLabV2(num_classes=21).eval()


@pytest.fixture(scope="session")
def published_keys():
    """{key without 'base.': shape} of the published converted weights (shared/reference)."""
    from pathlib import Path
    path = Path(__file__).resolve().parent / "data" / "published_pth_keys.tsv"
    keys = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            keys[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys
