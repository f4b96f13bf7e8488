"""The recipe: one source of truth for every default, YAML presets on top, CLI overrides last.

    cfg = load_config("voc12", ["train.base_lr=2.5e-4", "data.root=/data"])
    cfg["train"]["base_lr"]  -> 0.00025

`DEFAULTS` below *is* the paper's recipe (DESIGN.md section 3); presets in `configs/*.yaml` hold
only what differs from it (`voc12.yaml` is empty on purpose). Every run writes the resolved
config into its run folder (`save_config`), and checkpoints carry it too.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

DEFAULTS = {
    "data": {
        "root": "data",               # folder that contains VOCdevkit/
        "train_split": "train_aug",   # 10,582 images (VOC 2012 train + SBD - VOC val)
        "val_split": "val",           # 1,449 images
        "num_classes": 21,
        "crop": 321,                  # Caffe data layer: random crop after scale + pad
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5],
        "mirror": True,
        "norm": "caffe",              # caffe: BGR 0..255 minus mean; imagenet: RGB mean/std
        "workers": 2,
        "demo": False,                # generate the synthetic VOC-layout demo set if absent
        "demo_args": {},              # keyword arguments of demo_data.make_demo_dataset
    },
    "model": {
        "depth": 101,                 # ResNet-101
        "width": 64,
        "style": "caffe",             # stride on the first 1x1 conv (MSRA/Caffe release)
        "frozen_bn": True,
        "rates": [6, 12, 18, 24],     # ASPP-L; [12] gives DeepLab-LargeFOV
        "msc_scales": [0.75, 0.5],    # MSC: 1x plus these, fused by max
        "interp": "caffe",            # caffe: Interp, align_corners=True; pytorch: the port's
    },
    "train": {
        "init": "weights/init_coco.pth",  # scratch | imagenet | a converted/our checkpoint
        "iterations": 20000,
        "effective_batch": 10,        # = batch_per_step x accumulation x processes
        "batch_per_step": 10,         # lower it to fit GPU memory; accumulation makes up the rest
        "base_lr": 1.0e-3,            # paper (LargeFOV) and our mission; released solver: 2.5e-4
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "poly_power": 0.9,            # lr = base_lr * (1 - it / iterations) ** 0.9, every iteration
        "loss_targets": "caffe",      # caffe: label[::8, ::8] (and [::16, ::16]); nearest: the port's
        "seed": 0,
        "checkpoint_every": 1000,
        "precision": "fp32",          # fp32 | bf16 (autocast on CUDA / CPUs with bf16)
        "channels_last": False,
        "deterministic": False,
        "tensorboard": False,
    },
    "eval": {
        "mode": "voc",                # voc: pad to 513, upsample x8, crop; full: whole image
        "pad_to": 513,
        "after_train": True,          # evaluate the final model on data.val_split
        "crf": True,                  # ... and also score it with the dense CRF
        "crf_workers": 0,             # 0 = all cores
    },
    "run": {
        "out": "runs",                # run folders are created under this
        "name": "",                   # default: <preset>-<timestamp>
        "device": "auto",             # auto | cpu | cuda | cuda:N
    },
}


class ConfigError(ValueError):
    """An unknown preset, an unknown key, or a value of the wrong type."""


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _merge(base: dict, update: dict, where: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(base)})")
        if isinstance(base[key], dict) and key != "demo_args":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' is a section, got {value!r}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = _coerce(base[key], value, f"{where}{key}")


def _coerce(default, value, key: str):
    """Give `value` the type of the default: '1e-3' (YAML reads it as a string) -> 0.001."""
    if default is None or value is None or isinstance(default, (list, dict)):
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
        if isinstance(default, int) and number.is_integer():
            return int(number)
        return number
    return str(value)


def parse_override(text: str) -> dict:
    """'train.base_lr=2.5e-4' -> {'train': {'base_lr': 0.00025}} (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    out = node = {}
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
    return out


def load_config(preset: str = "voc12", overrides=()) -> dict:
    """DEFAULTS, then a preset (a name in configs/ or a YAML path), then `key=value` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config preset {preset!r}: expected {path} "
                          f"(presets: {', '.join(presets())})")
    _merge(cfg, yaml.safe_load(path.read_text()) or {}, "")
    for o in overrides:
        _merge(cfg, parse_override(o), "")
    cfg["preset"] = path.stem
    return cfg


def save_config(cfg: dict, run_dir) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False))
    return path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="voc12",
                        help=f"recipe preset or YAML file (presets: {', '.join(presets())}; "
                             "default: voc12, the paper's recipe)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any config field, e.g. train.base_lr=2.5e-4 data.root=/data")
