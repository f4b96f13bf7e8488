"""Classes made of several classifier rows: the exact head for a class that unites old ones.

A network whose arch has `class_groups` = [k_0, k_1, ...] (one count per class) is built with
k_0 + k_1 + ... classifier rows, and its logits are merged: class c, owning the next k_c rows,
scores log sum over its rows of exp(z_r). Its softmax probability is then exactly the sum of its
rows' probabilities. Fine-tuning a VOC model on `background, person, animal` with animal = bird
+ cat + cow + dog + horse + sheep keeps six rows for animal, copied from the VOC classifier
(seglab/training/class_map.py), so before any training the network gives exactly the VOC
model's probabilities summed per new class; one linear row cannot (its score is linear in the
features, the union's is a log-sum-exp of six linear scores).

The merge is a forward hook on the network, so its state_dict keys, its rewrites and every
caller stay as they are; what the pipeline sees as `num_classes` is the number of classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def check_groups(groups, num_classes: int) -> list[int]:
    groups = [int(k) for k in groups]
    if len(groups) != num_classes or min(groups, default=1) < 1:
        raise ValueError(f"class_groups {groups} must give one count >= 1 for each of the "
                         f"{num_classes} classes")
    return groups


def merge(logits: torch.Tensor, groups) -> torch.Tensor:
    """(N, sum(groups), ...) logits -> (N, len(groups), ...): log-sum-exp within each group."""
    parts = torch.split(logits, list(groups), dim=1)
    return torch.cat([p if p.shape[1] == 1 else torch.logsumexp(p, 1, keepdim=True)
                      for p in parts], 1)


class MergeGroups:
    """The forward hook: merges a tensor output, or each tensor of a dict output (main and
    auxiliary heads)."""

    def __init__(self, groups):
        self.groups = list(groups)

    def __call__(self, module: nn.Module, inputs, output):
        if isinstance(output, dict):
            return {k: merge(v, self.groups) for k, v in output.items()}
        return merge(output, self.groups)


def attach(net: nn.Module, groups) -> nn.Module:
    net.register_forward_hook(MergeGroups(groups))
    return net
