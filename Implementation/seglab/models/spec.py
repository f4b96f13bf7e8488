"""What the pipeline needs to know about an architecture: the model seam.

Training, evaluation, inference, the checkpoint format and the speed rewrites see a network only
through its `Architecture`, declared next to its code (e.g. `seglab/models/deeplabv2.py`) and
listed by name in `seglab/models/__init__.py`. A new architecture is one file with a module
`ARCHITECTURE` plus one line in that list.

Fields:
  name            the value of `arch["name"]` in configs and checkpoints
  build           build(**kwargs) -> nn.Module; kwargs are the architecture's keyword arguments
                  (num_classes always among them). Its forward returns logits at `output_stride`
                  in eval mode; in train mode either the same logits (MSC then wraps the network:
                  `train_outputs="msc"`) or a dict {"out": logits, "aux": logits} (`"aux"`)
  summary         one line for the catalogue (`python Implementation/model.py`)
  input_norm      how images are normalised for it: "caffe" (BGR 0..255 minus the mean),
                  "imagenet" (RGB mean/std) or "tf" (RGB scaled to [-1, 1])
  output_stride   output_stride(arch) -> input pixels per logit cell
  param_groups    param_groups(net, base_lr, weight_decay) -> SGD groups, each with `lr_mult`
  train_outputs   "msc" (the DeepLab v2 loss on MSC's outputs) or "aux" (main + auxiliary head)
  loss_weights    the weight of each training output: MSC's are all 1; "aux" gives (main, aux)
  prepare_inference  optional (net, options) -> net: exact speed rewrites for inference
                  (BN folding, in-place activations, the shifted ASPP); the default is net.eval()
  training_options  options that shape no tensor (lr multipliers, BN momentum, output stride):
                  a checkpoint made with other values still fits the network
  recipe          the architecture's own inference and training recipe, where it differs from
                  DeepLab v2's (seglab/recipe.py: msc_scales, msc_fusion, interp, mode, pad_to):
                  single scale unless it says otherwise; DeepLab v2 declares its MSC (0.75, 0.5).
                  A checkpoint's own recipe and the command line come before it.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Optional

import torch.nn as nn

from seglab.data.transforms import NORMS as INPUT_NORMS  # the one list of normalisations


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[..., nn.Module]
    summary: str
    input_norm: str
    output_stride: Callable[[dict], int]
    param_groups: Callable[[nn.Module, float, float], list]
    train_outputs: str = "msc"
    loss_weights: tuple = (1.0,)
    prepare_inference: Optional[Callable] = None
    training_options: tuple = ()
    recipe: dict = dataclasses.field(default_factory=lambda: {"msc_scales": ()})

    def __post_init__(self):
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"{self.name}: input_norm must be one of {INPUT_NORMS}")
        if self.train_outputs not in ("msc", "aux"):
            raise ValueError(f"{self.name}: train_outputs must be 'msc' or 'aux'")
        unknown = set(self.recipe) - {"msc_scales", "msc_fusion", "interp", "mode", "pad_to"}
        if unknown:
            raise ValueError(f"{self.name}: unknown recipe keys {sorted(unknown)}")

    def defaults(self) -> dict:
        """The keyword arguments of `build` with their defaults (the published form)."""
        return {k: p.default for k, p in inspect.signature(self.build).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def arch(self, **kwargs) -> dict:
        """A complete, normalised arch dict: name + every keyword argument (defaults filled in),
        lists instead of tuples, so checkpoints compare and serialise the same way."""
        known = self.defaults()
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ValueError(f"architecture {self.name!r} has no option(s) {unknown}; its "
                             f"options are {sorted(known)}")
        merged = dict(known, **kwargs)
        return dict(name=self.name, **{k: list(v) if isinstance(v, tuple) else v
                                       for k, v in merged.items()})


def simple_param_groups(net: nn.Module, base_lr: float, weight_decay: float,
                        head_prefixes=(), head_lr_mult: float = 1.0,
                        backbone_lr_mult: float = 1.0) -> list[dict]:
    """SGD groups for a network without a Caffe solver of its own: weights with weight decay,
    norm parameters and biases without, the head (`head_prefixes`) at `head_lr_mult` x lr and the
    rest at `backbone_lr_mult` x lr."""
    groups: dict[tuple, list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        head = any(name.startswith(h) for h in head_prefixes)
        decay = p.dim() > 1
        groups.setdefault((head, decay), []).append(p)
    out = []
    for (head, decay), params in sorted(groups.items()):
        mult = head_lr_mult if head else backbone_lr_mult
        out.append(dict(params=params, name=f"{'head' if head else 'backbone'}"
                                            f"{'' if decay else '_no_decay'}",
                        lr=base_lr * mult, lr_mult=mult,
                        weight_decay=weight_decay if decay else 0.0))
    return out
