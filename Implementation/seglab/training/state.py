"""Everything a training checkpoint holds beyond the weights, and how it comes back.

Resume is exact because the data stream is positional (loaders.TrainSampler: sample p of the
whole job always gets the same image and the same augmentation), so the only state to carry is
the iteration, the optimizer (momentum buffers) and the RNGs. RNG states are stored as tensors
and plain lists so the file loads with `weights_only=True`.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from seglab.checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint
from seglab.models import unwrap
from seglab.recipe import explicit_recipe, recipe_record

LAST, FINAL = "last.pth", "final.pth"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(run_dir, model, optimizer, iteration: int, cfg: dict,
                             final: bool = False, labels: dict | None = None) -> Path:
    """Write checkpoints/last.pth atomically (and final.pth, weights only, at the end). Both
    carry what the weights are: the run's resolved recipe (seglab/recipe.py) and `labels`, the
    data set's class names and colours (checkpoint.label_facts)."""
    net = unwrap(model)
    common = dict(trained_on=cfg["data"]["train_split"], input_norm=cfg["data"]["norm"],
                  recipe=recipe_record(explicit_recipe(cfg), "train.py"), **(labels or {}),
                  config=cfg, iteration=iteration,
                  provenance={"source": "train.py", "run_dir": str(run_dir)})
    ckpt = make_checkpoint(net.arch, net.state_dict(), optimizer=optimizer.state_dict(),
                           rng=rng_state(), **common)
    path = atomic_save(ckpt, Path(run_dir) / "checkpoints" / LAST)
    if final:
        atomic_save(make_checkpoint(net.arch, net.state_dict(), **common),
                    Path(run_dir) / "checkpoints" / FINAL)
    return path


def resolve_resume(path) -> Path:
    """--resume takes a run folder or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist. Give a run folder that "
                              "has checkpoints/last.pth, or a checkpoint file.")
    return path


def load_training_checkpoint(path) -> dict:
    ckpt = load_checkpoint(path)
    missing = [k for k in ("optimizer", "iteration", "config", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is a weights-only checkpoint (no {', '.join(missing)}); "
                              "to start a new run from it use --init, not --resume.")
    return ckpt
