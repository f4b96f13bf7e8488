"""DeepLab v2's arch dict for weights read from a file: depth and width from the tensors."""
from __future__ import annotations

from seglab.models.resnet import DEPTHS
from seglab.weights.common import ConversionError, blocks_per_stage

ASPP_RATES = [6, 12, 18, 24]


def deeplab_arch(num_classes: int, depth: int, width: int, style: str) -> dict:
    """DeepLab v2's kwargs (ASPP-L, output stride 8) for a given backbone."""
    return dict(name="deeplabv2", num_classes=num_classes, depth=depth, rates=list(ASPP_RATES), style=style,
                frozen_bn=True, width=width, strides=[1, 2, 1, 1], dilations=[1, 1, 2, 4])


def infer_arch(sd: dict, style: str, num_classes: int | None = None) -> dict:
    """DeepLabV2 kwargs from one of our state_dicts (backbone, maybe ASPP): width from conv1,
    depth from the blocks per stage, classes from aspp.c0 (or `num_classes`, default 21)."""
    stages = blocks_per_stage(sd, r"backbone\.res([2-5])\.([a-z]\d*)\.")
    counts = tuple(len(stages.get(s, ())) for s in range(2, 6))
    depth = next((d for d, c in DEPTHS.items() if c == counts), None)
    if depth is None or "backbone.conv1.conv.weight" not in sd:
        raise ConversionError(f"the weights have {counts} blocks in res2..res5 (and conv1: "
                              f"{'backbone.conv1.conv.weight' in sd}); model.py knows "
                              f"{ {d: c for d, c in DEPTHS.items()} }")
    branches = len({k.split(".")[1] for k in sd if k.startswith("aspp.")})
    if branches not in (0, len(ASPP_RATES)):
        raise ConversionError(f"the weights have {branches} ASPP branches; DeepLab v2 has 4")
    if num_classes is None:
        num_classes = int(sd["aspp.c0.weight"].shape[0]) if "aspp.c0.weight" in sd else 21
    return deeplab_arch(num_classes, depth, int(sd["backbone.conv1.conv.weight"].shape[0]), style)
