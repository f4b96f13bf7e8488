"""How a model is tested: the inference recipe that travels with its weights, and the one resolver
that decides each of its settings.

A network's weights are only half of a result: Google's VOC MobileNetV2 scores 79.94 mIoU on our
20 real VOC images at one scale and 71.25 through DeepLab v2's three-scale max fusion. So every
checkpoint carries the recipe its weights are meant to be tested with, and every script resolves
each setting in one order:

    command line (and preset)  >  checkpoint  >  architecture  >  PAPER (DeepLab v2's recipe)

The settings (RECIPE_FIELDS: where each lives in the config, and the value that means "not
given", so a preset or a `section.key=value` override is what makes a value explicit):

    msc_scales  the scales added to 1x for multi-scale inputs ([] = single scale)
    msc_fusion  max (DeepLab v2) | mean of the class probabilities (TF DeepLab's multi-scale test)
    interp      caffe (Interp: align_corners=True) | pytorch (the published port's F.interpolate)
    mode        the evaluation protocol: voc | full | torchvision | vainf (seglab/data/protocols.py)
    pad_to      the size the voc protocol pads to (513 for VOC)
    norm        the input normalisation: caffe | imagenet | tf

A checkpoint states them in `recipe` (with `source`: where the values come from) and
`input_norm`; training checkpoints written before recipes existed state them in their training
`config`; converted checkpoints written before then state none, and fall to their architecture
(`Architecture.recipe` and `input_norm`), then to PAPER, so they load as DeepLab v2 always did.
"""
from __future__ import annotations

from seglab.models import architecture

# recipe key -> (config section, config key, the config value that means "not given")
RECIPE_FIELDS = {
    "msc_scales": ("model", "msc_scales", None),
    "msc_fusion": ("eval", "msc_fusion", "auto"),
    "interp": ("model", "interp", "auto"),
    "mode": ("eval", "mode", "auto"),
    "pad_to": ("eval", "pad_to", 0),
    "norm": ("data", "norm", "auto"),
}
# DeepLab v2's test recipe (the Caffe release's test prototxt: MSC 1, 0.75, 0.5 max-fused, Interp,
# images padded to 513 with the mean): the last level of the resolution.
PAPER = {"msc_scales": [0.75, 0.5], "msc_fusion": "max", "interp": "caffe", "mode": "voc",
         "pad_to": 513, "norm": "caffe"}
SOURCES = ("command line", "checkpoint", "architecture", "paper")


def _normal(key: str, value):
    if key == "msc_scales":
        return [float(s) for s in value]
    if key == "pad_to":
        return int(value)
    return value


def explicit_recipe(cfg: dict) -> dict:
    """The recipe settings a config gives explicitly (preset or override), nothing else."""
    out = {}
    for key, (section, name, unset) in RECIPE_FIELDS.items():
        value = cfg.get(section, {}).get(name, unset)
        if value != unset and value is not None:
            out[key] = _normal(key, value)
    return out


def checkpoint_recipe(ckpt: dict | None) -> dict:
    """The recipe a checkpoint states: its `recipe` and `input_norm`; for a training checkpoint
    from before recipes, the settings of its training config."""
    ckpt = ckpt or {}
    stated = dict(ckpt.get("recipe") or {})
    stated.pop("source", None)
    if not stated and isinstance(ckpt.get("config"), dict):
        stated = explicit_recipe(ckpt["config"])
    if ckpt.get("input_norm"):
        stated["norm"] = ckpt["input_norm"]
    return {k: _normal(k, v) for k, v in stated.items() if k in RECIPE_FIELDS and v is not None}


def architecture_recipe(arch) -> dict:
    """What an architecture declares about itself (seglab/models/spec.py: `recipe`,
    `input_norm`)."""
    spec = architecture(arch)
    return {**{k: _normal(k, v) for k, v in spec.recipe.items()}, "norm": spec.input_norm}


def resolve_recipe(explicit: dict, ckpt: dict | None, arch) -> tuple[dict, dict]:
    """(recipe, source of each setting): each key from the first level that states it."""
    levels = (explicit, checkpoint_recipe(ckpt), architecture_recipe(arch), PAPER)
    recipe, sources = {}, {}
    for key in RECIPE_FIELDS:
        for name, level in zip(SOURCES, levels):
            if key in level:
                recipe[key], sources[key] = _normal(key, level[key]), name
                break
    return recipe, sources


def describe(recipe: dict, sources: dict | None = None) -> str:
    """One line: 'recipe: scales 1+0.75+0.5 fused by max, interp caffe, protocol voc (pad 513),
    input caffe [checkpoint: ...; architecture: ...]'."""
    scales = "+".join(f"{s:g}" for s in [1.0, *recipe["msc_scales"]])
    text = (f"recipe: scales {scales}" +
            (f" fused by {recipe['msc_fusion']}" if recipe["msc_scales"] else " (single scale)") +
            f", interp {recipe['interp']}, protocol {recipe['mode']}" +
            (f" (pad {recipe['pad_to']})" if recipe["mode"] == "voc" else "") +
            f", input {recipe['norm']}")
    if sources:
        by = {}
        for key, source in sources.items():
            by.setdefault(source, []).append(key)
        text += " [" + "; ".join(f"{s}: {', '.join(by[s])}" for s in SOURCES if s in by) + "]"
    return text


def fill_config(cfg: dict, recipe: dict) -> dict:
    """Write a resolved recipe into a config (in place), so the saved config is the resolved one."""
    for key, (section, name, _) in RECIPE_FIELDS.items():
        cfg[section][name] = list(recipe[key]) if key == "msc_scales" else recipe[key]
    return cfg


def recipe_record(recipe: dict, source: str) -> dict:
    """The `recipe` field of a checkpoint: the settings without `norm` (stored as `input_norm`)
    and where they come from."""
    return {**{k: v for k, v in recipe.items() if k != "norm"}, "source": source}
