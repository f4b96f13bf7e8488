"""The recipe: one source of truth for every default, YAML presets on top, CLI overrides last.

    cfg = load_config("voc12", ["train.base_lr=2.5e-4", "data.root=/data"])
    cfg["train"]["base_lr"]  -> 0.00025

`DEFAULTS` below *is* the paper's recipe (docs/fidelity.md says where each value comes from);
presets in `configs/*.yaml` hold only what differs from it (`voc12.yaml` is empty on purpose).
Every script (train, evaluate, crf, infer) reads its settings through `load_config`, so each
takes `--config PRESET` and `section.key=value` overrides; their short flags (`--crf`,
`--split`, ...) are shorthands for config keys (`config_flag`). Every value is type- and
range-checked before anything starts (`validate`). Every run writes the resolved config into
its run folder (`save_config`), and training checkpoints carry it too.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
from pathlib import Path

import torch
import yaml

from seglab.densecrf.params import BACKENDS, NORMALIZATIONS, CRFParams
from seglab.data.registry import dataset_class
from seglab.data.transforms import NORMS
from seglab.models import build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

DEFAULTS = {
    "data": {
        "dataset": "voc",             # the layout under root (seglab/data/registry.py)
        "root": "data",               # folder that contains VOCdevkit/
        "train_split": "train_aug",   # 10,582 images (VOC 2012 train + SBD - VOC val)
        "val_split": "val",           # 1,449 images
        "num_classes": 0,             # 0: the data set's own (VOC 21, classes.txt of a folder);
                                      # an explicit value must agree with it
        "crop": 321,                  # Caffe data layer: random crop after scale + pad
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5],
        "mirror": True,
        "norm": "auto",               # auto: the architecture's; caffe: BGR 0..255 minus mean;
                                      # imagenet: RGB mean/std; tf: RGB scaled to [-1, 1]
        "workers": 2,
        "check": "auto",              # check every sample before training: auto | always | never
        "demo": False,                # generate the synthetic VOC-layout demo set if absent
        "demo_args": {},              # keyword arguments of seglab.data.demo.make_demo_dataset
    },
    "model": {
        "name": "deeplabv2",          # `python Implementation/model.py` lists the architectures
        "arch": {},                   # the architecture's options; {} = its published form
                                      # (DeepLab v2: ResNet-101, ASPP-L rates 6/12/18/24)
        # The recipe settings below say "auto" (null, 0): the checkpoint's, else the
        # architecture's, else DeepLab v2's (seglab/recipe.py resolves them; each script prints
        # and saves the result). DeepLab v2's: MSC [0.75, 0.5] max-fused, caffe Interp, the VOC
        # protocol padded to 513, Caffe input normalisation.
        "msc_scales": None,           # MSC: 1x plus these (e.g. [0.75, 0.5]); [] = single scale
        "interp": "auto",             # caffe: Interp, align_corners=True; pytorch: the port's
        "crf_layer": False,           # train through the dense CRF (CRF-as-RNN; the crf
                                      # section's params, fixed): loss += CE of its marginals
    },
    "train": {
        "init": "weights/init_coco.pth",  # scratch | imagenet | a converted/our checkpoint
        "iterations": 20000,          # 0: write the initialised network as final.pth (e.g.
                                      # a class-mapped one, to score it before training)
        "epochs": 0,                  # > 0: iterations = ceil(epochs x training images /
                                      # effective batch) instead (the folder preset's 30)
        "effective_batch": 10,        # = batch_per_step x accumulation x processes
        "batch_per_step": 10,         # lower it to fit GPU memory; accumulation makes up the rest
        "base_lr": 1.0e-3,            # paper (LargeFOV) and our mission; released solver: 2.5e-4
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "poly_power": 0.9,            # lr = base_lr * (1 - it / iterations) ** 0.9, every iteration
        "loss_targets": "caffe",      # caffe: label[::8, ::8] (and [::16, ::16]); nearest: the port's
        "aux_weight": None,           # loss weight of an auxiliary head; null = the architecture's
        "init_classes": {},           # class-mapped init (training/class_map.py): new class ->
                                      # old classes of the init checkpoint, e.g. {animal: [bird,
                                      # cat]}; equal names map by themselves
        "init_union": "exact",        # a class mapped from several old ones: exact (one row
                                      # each, merged by log-sum-exp) | fit | mean | max (one
                                      # linear row from theirs; training/class_map.py)
        "distill": None,              # weight of the distillation from the class-mapped init
                                      # (Learning without Forgetting; training/distill.py):
                                      # null = 1 when classes were mapped from train.init, else 0
        "distill_temperature": 2.0,   # its softmax temperature T (LwF's 2)
        "seed": 0,
        "checkpoint_every": 1000,
        "precision": "fp32",          # fp32 | bf16 (autocast on CUDA / CPUs with bf16)
        "channels_last": False,
        "deterministic": False,
        "tensorboard": False,         # write RUN/tensorboard/ (seglab/training/watch.py)
        "preview_every": 1000,        # ... with a panel of val predictions every N iterations
        "preview_images": 4,          # ... of the first N val images
        "val_every": 0,               # val mIoU every N iterations (0: off, as the paper)
        "val_images": 0,              # ... on the first N val images (0: all)
    },
    "eval": {
        "mode": "auto",               # voc: pad to 513, upsample, crop; full: whole image;
                                      # torchvision / vainf: those references' protocols
        "pad_to": 0,                  # the voc protocol's padded size (0: auto; DeepLab v2 513)
        "after_train": True,          # evaluate the final model on data.val_split
        "crf": True,                  # ... and also score it with the dense CRF
        "precision": "fp32",          # fp32 | bf16 for the network pass
        "flip": False,                # also the left-right mirror, max-fused (not in the paper)
        "msc_fusion": "auto",         # max (the paper) | mean of the class probabilities (TF's)
        "trimap": [],                 # also score bands of these widths (px) around boundaries
        "limit": 0,                   # only the first N images (0 = all)
        "loader_workers": 0,          # image-loading processes for the network pass
        "save_predictions": True,     # write pred/<id>.png (and pred_crf/)
        "recompute": False,           # ignore cached logits
    },
    "crf": dict(
        dataclasses.asdict(CRFParams()),  # the paper's ResNet-101 values (densecrf/params.py)
        params="",                    # a CRF parameter JSON (crf.py search's best.json) on top
        backend="pydensecrf",         # pydensecrf (C++) | torch | torch-fp16 (torch_crf.py)
        workers=0,                    # worker processes; 0 = all cores
        stream=False,                 # run the CRF beside the network pass (evaluate.py): a
                                      # gain only with cores to spare for both; on 2 cores
                                      # the two oversubscribe them (bench_stage_two.py)
    ),
    "infer": {
        "max_side": 1025,             # infer.py: longer sides above this run at this size
                                      # (0 = never cap); VOC images (<= 500 px) are never capped
        "overlay": False,             # also write colour overlays with a legend
        "save_probs": False,          # also write float16 softmax probabilities
    },
    "run": {
        "out": "runs",                # run folders are created under this
        "name": "",                   # default: <preset>-<timestamp>
        "device": "auto",             # auto | cpu | cuda | cuda:N
    },
}
FREE_FORM = ("data.demo_args", "model.arch", "train.init_classes")   # dicts checked by their owner, not against DEFAULTS

# Allowed values: a tuple of choices, or (minimum, maximum) bounds for numbers (None = open).
CHOICES = {
    "data.norm": ("auto", *NORMS),
    "data.check": ("auto", "always", "never"),
    "model.interp": ("auto", "caffe", "pytorch"),
    "train.loss_targets": ("caffe", "nearest"),
    "train.precision": ("fp32", "bf16"),
    "train.init_union": ("exact", "fit", "mean", "max"),
    "eval.mode": ("auto", "voc", "full", "torchvision", "vainf"),
    "eval.precision": ("fp32", "bf16"),
    "eval.msc_fusion": ("auto", "max", "mean"),
    "crf.normalization": tuple(NORMALIZATIONS),
    "crf.backend": BACKENDS,
}
BOUNDS = {
    "data.num_classes": (0, 255), "data.crop": (1, None), "data.workers": (0, None),
    "train.iterations": (0, None), "train.epochs": (0, None), "train.effective_batch": (1, None),
    "train.batch_per_step": (1, None), "train.base_lr": (0, None, "exclusive"),
    "train.momentum": (0, 1), "train.weight_decay": (0, None), "train.poly_power": (0, None),
    "train.seed": (0, None), "train.checkpoint_every": (1, None),
    "train.preview_every": (0, None), "train.preview_images": (1, None),
    "train.val_every": (0, None), "train.val_images": (0, None),
    "train.distill_temperature": (0, None, "exclusive"),
    "eval.pad_to": (0, None), "eval.limit": (0, None), "eval.loader_workers": (0, None),
    "crf.iterations": (0, None), "crf.bi_w": (0, None), "crf.pos_w": (0, None),
    "crf.bi_xy_std": (0, None, "exclusive"), "crf.bi_rgb_std": (0, None, "exclusive"),
    "crf.pos_xy_std": (0, None, "exclusive"), "crf.workers": (0, None),
    "infer.max_side": (0, None),
}
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class ConfigError(ValueError):
    """An unknown preset, an unknown key, or a value of the wrong type or out of range."""


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _merge(base: dict, update: dict, where: str) -> None:
    if not isinstance(update, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or 'top level'}' must be a "
                          f"mapping, got {update!r}")
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}' (known: {', '.join(base)})")
        if f"{where}{key}" in FREE_FORM:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' is a mapping, got {value!r}")
            base[key] = dict(base[key], **value)
        elif isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' is a section, got {value!r}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = _coerce(base[key], value, f"{where}{key}")


def _coerce(default, value, key: str):
    """Give `value` the type of the default: '1e-3' (YAML reads it as a string) -> 0.001. An
    integer field refuses 2.5, a number refuses nan/inf, a flag refuses anything but a bool."""
    if default is None or value is None or isinstance(default, (list, dict)):
        if isinstance(default, list) and not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list like [1, 2], got {value!r}")
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
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        if isinstance(default, int):
            if not number.is_integer():
                raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
            return int(number)
        return number
    if isinstance(value, (dict, list)):
        raise ConfigError(f"config key '{key}' must be a single value, got {value!r}")
    return str(value)


def validate(cfg: dict) -> dict:
    """Check every value against CHOICES and BOUNDS (and the architecture's options); returns
    cfg. Called by load_config, so nothing starts with a value out of range."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        if cfg[section][name] not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got "
                              f"{cfg[section][name]!r}")
    for key, (low, high, *exclusive) in BOUNDS.items():
        section, name = key.split(".")
        value = cfg[section][name]
        if (low is not None and (value < low or (exclusive and value == low))) or \
                (high is not None and value > high):
            rng = f"{'>' if exclusive else '>='} {low}" + (f" and <= {high}" if high else "")
            raise ConfigError(f"config key '{key}' must be {rng}; got {value!r}")
    if not DEVICE.match(str(cfg["run"]["device"])):
        raise ConfigError(f"config key 'run.device' must be auto, cpu, cuda or cuda:N; got "
                          f"{cfg['run']['device']!r}")
    for key in ("model.msc_scales", "data.scales"):
        section, name = key.split(".")
        values = cfg[section][name]
        if values is None and key == "model.msc_scales":
            continue                              # auto: seglab/recipe.py resolves it
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                   for v in values):
            raise ConfigError(f"config key '{key}' must be a list of positive numbers; got "
                              f"{values!r}")
    for key, null in (("aux_weight", "the architecture's"), ("distill", "auto")):
        value = cfg["train"][key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value < float("inf")):
            raise ConfigError(f"config key 'train.{key}' must be null ({null}) or a number >= 0; "
                              f"got {value!r}")
    if not all(isinstance(w, int) and w > 0 for w in cfg["eval"]["trimap"]):
        raise ConfigError(f"config key 'eval.trimap' must be a list of positive whole numbers "
                          f"(pixels); got {cfg['eval']['trimap']!r}")
    try:
        dataset_class(cfg["data"]["dataset"])
    except ValueError as e:
        raise ConfigError(f"config key 'data.dataset': {e}") from None
    arch = arch_from_config(cfg)
    if not arch["num_classes"]:  # 0: the data set's, decided later; any count checks the options
        arch["num_classes"] = len(arch.get("class_groups") or ()) or 2
    try:
        with torch.device("meta"):  # builds the network's shapes only: options checked, no memory
            build_model(arch)
    except (ValueError, TypeError, AssertionError, NotImplementedError) as e:
        raise ConfigError(f"config section 'model' ({arch['name']}): {e}") from None
    return cfg


def arch_from_config(cfg: dict) -> dict:
    """The arch dict (seglab/models: name, options, num_classes) a config describes."""
    m = cfg["model"]
    return dict(m["arch"], name=m["name"], num_classes=cfg["data"]["num_classes"])


def parse_override(text: str) -> dict:
    """'train.base_lr=2.5e-4' -> {'train': {'base_lr': 0.00025}} (values parsed as YAML)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    out = node = {}
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value ({e})") from None
    return out


def merge_overrides(cfg: dict, overrides=()) -> dict:
    """Apply `section.key=value` overrides to a config (e.g. a resumed run's) and validate."""
    for o in overrides:
        _merge(cfg, parse_override(o), "")
    return validate(cfg)


def upgrade_legacy(cfg: dict) -> dict:
    """A config saved before the model seam (flat model.depth, model.rates, ...; eval.crf_workers;
    data.norm 'caffe' for everything) in the current layout."""
    model = cfg.get("model", {})
    legacy = {k: model.pop(k) for k in ("depth", "width", "style", "frozen_bn", "rates")
              if k in model}
    if legacy:
        model.setdefault("name", "deeplabv2")
        model["arch"] = dict(model.get("arch") or {}, **legacy)
    if "crf_workers" in cfg.get("eval", {}):
        cfg.setdefault("crf", {})["workers"] = cfg["eval"].pop("crf_workers")
    return cfg


def load_config(preset: str = "voc12", overrides=()) -> dict:
    """DEFAULTS, then a preset (a name in configs/ or a YAML path), then `key=value` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config preset {preset!r}: expected {path} "
                          f"(presets: {', '.join(presets())})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config preset {path}: {e}") from None
    preset = data.pop("preset", path.stem) if isinstance(data, dict) else path.stem
    _merge(cfg, upgrade_legacy(data), "")
    cfg["preset"] = preset
    return merge_overrides(cfg, overrides)


def save_config(cfg: dict, run_dir) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg)), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# The command line: every script's --config, overrides and shorthand flags
# ---------------------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="voc12",
                        help=f"recipe preset or YAML file (presets: {', '.join(presets())}; "
                             "default: voc12, the paper's recipe)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override any config field, e.g. train.base_lr=2.5e-4 data.root=/data")


def config_flag(parser: argparse.ArgumentParser, flag: str, key: str, **kwargs) -> None:
    """A short flag for one config key (`--split` for data.val_split): its value, when given,
    is applied as the override key=value after the preset and the explicit overrides."""
    section, name = key.split(".")
    default = DEFAULTS[section][name]
    kwargs.setdefault("help", "")
    kwargs["help"] += f" (config {key}; default {default!r})"
    parser.add_argument(flag, dest=f"cfg:{key}", default=None, **kwargs)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parse_intermixed_args: `key=value` overrides may come before, between or after options."""
    return parser.parse_intermixed_args(argv)


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> dict:
    """The preset (or `base`, e.g. a resumed run's config), then the overrides, then the
    shorthand flags that were given."""
    cfg = base if base is not None else load_config(args.config, args.overrides)
    if base is not None:
        merge_overrides(cfg, args.overrides)
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    for key, value in flags.items():
        section, name = key.split(".")
        _merge(cfg, {section: {name: value}}, "")
    return validate(cfg)


def _dotted(tree: dict, prefix: str = "") -> set:
    keys = set()
    for key, value in (tree or {}).items():
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= _dotted(value, dotted + ".")
    return keys


def given_keys(args: argparse.Namespace) -> set:
    """The config keys ('model.name', 'model.arch.depth', ...) that the preset, the overrides or
    the shorthand flags of a command line set: what the user asked for, as opposed to
    DEFAULTS (train.py's --init takes the architecture from its checkpoint unless model.name is
    among them)."""
    path = Path(args.config)
    if not path.suffix:
        path = CONFIG_DIR / f"{args.config}.yaml"
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        preset = {}
    keys = _dotted(upgrade_legacy(preset) if isinstance(preset, dict) else {})
    for o in args.overrides:
        keys |= _dotted(parse_override(o))
    keys |= {k[4:] for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return keys
