"""The model seam, and the catalogue of every architecture the pipeline can train.

    python Implementation/model.py            # name, parameters (21 classes), output stride, input

Library use:

    from model import build_model, ARCHITECTURES
    net = build_model({"name": "deeplabv2", "num_classes": 21})   # DeepLab v2, ResNet-101

Each architecture lives in its own file under `seglab/models/` and declares what the pipeline
needs from it in an `Architecture` (seglab/models/spec.py); `seglab/models/__init__.py` lists
them in a plain dict. DeepLab v2 itself is `seglab/models/deeplabv2.py` (ASPP, the network) on
`seglab/models/resnet.py` (the Caffe-form ResNet-101), with MSC in `seglab/models/msc.py`.
"""
from __future__ import annotations

import argparse
import sys

import torch

from seglab.models import (ARCHITECTURES, architecture, build_model, normalize_arch,  # noqa: F401
                           param_groups, unwrap)
from seglab.models.deeplabv2 import ASPP, DeepLabV2  # noqa: F401  (the paper's names, re-exported)
from seglab.models.msc import MSC  # noqa: F401


def parameter_count(arch: dict) -> int:
    """Parameters of the network, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        net = build_model(arch)
    return sum(p.numel() for p in net.parameters())


def catalogue(num_classes: int = 21) -> list[dict]:
    rows = []
    for name, spec in ARCHITECTURES.items():
        arch = normalize_arch({"name": name, "num_classes": num_classes})
        rows.append(dict(name=name, parameters=parameter_count(arch),
                         output_stride=spec.output_stride(arch), input_norm=spec.input_norm,
                         summary=spec.summary))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="List every architecture by name with its parameter "
                                            "count, output stride and input normalisation.")
    p.add_argument("--num-classes", type=int, default=21, help="classes (default: 21, VOC)")
    args = p.parse_args(argv)
    rows = catalogue(args.num_classes)
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  {'parameters':>12}  {'stride':>6}  {'input':<8}  description")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['parameters']:>12,}  {r['output_stride']:>6}  "
              f"{r['input_norm']:<8}  {r['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
