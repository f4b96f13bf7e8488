"""The poly learning-rate policy, applied every iteration as in Caffe:
lr = base_lr * lr_mult * (1 - iteration / max_iterations) ** power."""
from __future__ import annotations


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    return base_lr * (1.0 - iteration / max_iterations) ** power


def set_poly_lr(optimizer, base_lr: float, iteration: int, max_iterations: int, power: float = 0.9):
    """Set every group's lr for `iteration` (groups carry their `lr_mult`); returns the base lr."""
    lr = poly_lr(base_lr, iteration, max_iterations, power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1)
    return lr
