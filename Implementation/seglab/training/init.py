"""Where training starts from (train.init): scratch, ImageNet, or a checkpoint of ours.

The paper starts from the MS-COCO model of the Caffe release (convert it with convert.py).
Pretrained weights imply frozen BatchNorm where the architecture has that option; torchvision's
ImageNet ResNet implies the torchvision block form and ImageNet input normalisation.

Fine-tuning to another class count: a checkpoint of ours trained on another data set (21 VOC
classes -> your 5) fills every tensor whose name and shape fit. The tensors that do not are
re-initialised as the architecture builds them, and they may only be its classifier: the tensors
whose shape depends on num_classes (models.class_dependent), plus, for converted files that ship without one, the head modules
`aspp.` / `classifier.` / `head.`. Every re-initialised tensor is named in the line this returns
(train.py prints it). Any other mismatch (another backbone depth or width, another
architecture) is an error naming the difference. The loading is weights.common.
load_across_classes, the one convert.py uses for a file's head of another class count.
"""
from __future__ import annotations

from pathlib import Path

from seglab.checkpoint import CheckpointError, check_arch, load_checkpoint
from seglab.data.labels import VOC_CLASSES
from seglab.models import architecture, build_model, class_dependent
from seglab.training.class_map import (class_groups_of, class_mapping, describe_mapping,
                                       grouped_rows, map_rows, old_scores, parse_class_map,
                                       union_weights)
from seglab.weights.common import ConversionError, load_across_classes
from seglab.weights.torchvision_imagenet import load_torchvision_state, torchvision_to_ours


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent batch settings, bad init)."""


def init_checkpoint(cfg: dict) -> dict | None:
    """The facts of the checkpoint train.init names (memory-mapped: its weights are not read;
    load_init reads them), or None for scratch / imagenet / a file that does not exist
    (load_init reports it)."""
    init = str(cfg["train"]["init"])
    if init == "scratch" or init.startswith("imagenet") or not Path(init).is_file():
        return None
    ckpt = load_checkpoint(init, mmap=True)
    return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng")}


def adopt_architecture(cfg: dict, ckpt: dict | None, given: set) -> str | None:
    """Build the init checkpoint's architecture (name and options, every option but the class
    count) when the command line and preset name none; options they give explicitly
    (model.arch.KEY) are kept, and a conflict with the checkpoint is reported by load_init.
    Returns a note saying what was taken, or None."""
    if ckpt is None or "model.name" in given:
        return None
    arch = {k: v for k, v in dict(ckpt.get("arch") or {}).items() if k != "num_classes"}
    name = arch.pop("name", None) or "deeplabv2"
    explicit = {k.split(".", 2)[2] for k in given if k.startswith("model.arch.")}
    cfg["model"]["name"] = name
    cfg["model"]["arch"] = {**arch, **{k: v for k, v in cfg["model"]["arch"].items()
                                      if k in explicit}}
    return f"architecture {name} taken from the init checkpoint {cfg['train']['init']}"


def prepare_init(cfg: dict) -> None:
    """Adjust the config to what train.init implies (before the network is built)."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return
    if "frozen_bn" in architecture(cfg["model"]["name"]).defaults():
        cfg["model"]["arch"]["frozen_bn"] = True
    if init.startswith("imagenet"):
        if cfg["model"]["name"] != "deeplabv2":
            raise TrainingError("train.init=imagenet fills DeepLab v2's ResNet from torchvision's "
                                f"ImageNet weights; {cfg['model']['name']} loads its backbone "
                                "from a converted checkpoint instead (see convert.py --help)")
        cfg["model"]["arch"]["style"], cfg["data"]["norm"] = "pytorch", "imagenet"


HEAD_PREFIXES = ("aspp.", "classifier.", "head.")   # the head a converted file may lack


def _fill(net, state: dict, where) -> None:
    """Load `state` into `net`; only the classifier head (the architecture's newly initialised
    layers: any key the state lacks) may stay as initialised."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    head = {k for k in net.state_dict() if k.startswith(HEAD_PREFIXES)}
    if unexpected or any(k not in head for k in missing):
        raise TrainingError(f"{where} does not fit the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")


def fill_across_classes(net, ckpt: dict, where) -> tuple[int, list[str]]:
    """Copy every tensor of `ckpt` whose name and shape fit `net` (weights.common.
    load_across_classes); the rest of `net` keeps its fresh init and must be its classifier.
    Returns (tensors loaded, the re-initialised keys as "name (checkpoint shape -> our
    shape)")."""
    ours = net.arch
    try:  # every option but the class count must match
        check_arch(dict(ckpt, arch=dict(ckpt["arch"], num_classes=ours["num_classes"],
                                         class_groups=ours.get("class_groups"))), ours, where)
        return load_across_classes(net, ckpt["model"], optional=HEAD_PREFIXES)
    except (CheckpointError, ConversionError) as e:
        raise TrainingError(f"{where} {e}" if isinstance(e, ConversionError) else str(e)) from None


def stated_classes(ckpt: dict) -> list[str] | None:
    """The class names a checkpoint's head was trained on: the ones it states, VOC's for a
    21-class checkpoint from before names were recorded, else None (unknown)."""
    if ckpt.get("classes"):
        return list(ckpt["classes"])
    if (ckpt.get("arch") or {}).get("num_classes") == len(VOC_CLASSES) and \
            "recipe" not in ckpt and "dataset" not in ckpt:
        return list(VOC_CLASSES)
    return None


def init_mapping(cfg: dict, dataset, ckpt: dict) -> dict[int, list[int]] | None:
    """{new class: [old classes]} of the class-mapped init from checkpoint `ckpt` (equal names,
    then train.init_classes; class_map.py), or None when there is nothing to map: a side without
    class names, or the checkpoint's own classes (a continuation). The one place the mapping is
    decided: the classifier rows (map_classes), their groups (plan_class_groups) and what is
    distilled (distill.py) all follow it."""
    t = cfg["train"]
    new_names = list(getattr(dataset, "class_names", None) or [])
    old_names = stated_classes(ckpt)
    explicit = parse_class_map(t["init_classes"])
    if not new_names or old_names is None or (new_names == old_names and not explicit):
        if explicit:
            raise TrainingError(f"train.init_classes is set but {t['init']} states no class "
                                "names to map from")
        return None
    try:
        return class_mapping(new_names, old_names, explicit)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def map_classes(net, ckpt: dict, fresh: dict, cfg: dict, dataset) -> str | None:
    """Class-mapped initialisation (class_map.py) of the classifier rows of `net`, from the
    init checkpoint's rows; `fresh` holds the classifier as the architecture initialised it.
    Returns the log line listing the mapping, or None when there is nothing to map."""
    t = cfg["train"]
    mapping = init_mapping(cfg, dataset, ckpt)
    if mapping is None:
        return None
    new_names, old_names = list(dataset.class_names), stated_classes(ckpt)
    keys = [k for k in fresh if k in ckpt["model"]
            and ckpt["model"][k].shape[0] == len(old_names)]
    groups = net.arch.get("class_groups")
    if groups:   # the exact head: one row per member (class_groups.py), each a copy
        rows, weights = grouped_rows(mapping, groups)
        net.load_state_dict(map_rows(fresh, ckpt["model"], keys, rows, weights), strict=False)
        return describe_mapping(mapping, new_names, old_names, "exact")
    scores = None
    if t["init_union"] != "mean" and any(len(m) > 1 for m in mapping.values()):
        old_net = build_model(ckpt["arch"])   # the old network on up to 20 training crops
        old_net.load_state_dict(ckpt["model"])
        scores = old_scores(old_net, [dataset[(i, i)]["image"]
                                      for i in range(min(len(dataset), 20))])
    weights = union_weights(mapping, t["init_union"], scores)
    net.load_state_dict(map_rows(fresh, ckpt["model"], keys, mapping, weights), strict=False)
    return describe_mapping(mapping, new_names, old_names, t["init_union"], weights)


def plan_class_groups(cfg: dict, dataset, ckpt: dict | None = None) -> str | None:
    """train.init_union=exact: where a class of the data set unites several classes of the
    init checkpoint, give the network one classifier row per member (model.arch.class_groups,
    seglab/models/class_groups.py), before it is built. `ckpt`: the init checkpoint's facts if
    already read (init_checkpoint). Returns a note, or None."""
    t = cfg["train"]
    if t["init_union"] != "exact":
        return None
    ckpt = ckpt if ckpt is not None else init_checkpoint(cfg)
    mapping = init_mapping(cfg, dataset, ckpt) if ckpt is not None else None
    if mapping is None:
        return None
    groups = class_groups_of(mapping, len(dataset.class_names))
    if max(groups) == 1:
        return None
    cfg["model"]["arch"]["class_groups"] = groups
    return (f"class groups {groups}: a class that unites k old classes keeps k classifier "
            "rows, merged by log-sum-exp (exact: its probability is the sum of theirs)")


def load_init(net, cfg: dict, dataset=None) -> str:
    """Fill the network from train.init: scratch | imagenet[=FILE] | a checkpoint of ours.
    With a checkpoint and the training `dataset`, the new classifier rows start from the old
    ones where class names match or train.init_classes maps them (class_map.py). Returns a line
    saying what was loaded (which tensors were re-initialised, which classes mapped)."""
    init = str(cfg["train"]["init"])
    if init == "scratch":
        return "scratch (PyTorch default init; DeepLab v2's ASPP N(0, 0.01))"
    if init.startswith("imagenet"):
        src = init.split("=", 1)[1] if "=" in init else "download"
        try:
            state = torchvision_to_ours(load_torchvision_state(src))
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainingError(f"cannot use ImageNet weights {src}: {e}") from None
        _fill(net, state, f"ImageNet weights {src}")
        return f"torchvision ImageNet ResNet ({src})"
    path = Path(init)
    if not path.is_file():
        raise TrainingError(
            f"init weights {path} not found. The paper starts from the MS-COCO model: download "
            "init.caffemodel (see README) and run `python Implementation/convert.py caffe "
            f"init.caffemodel {path}`, or pass --init imagenet / --init scratch.")
    ckpt = load_checkpoint(path)
    head = class_dependent(net.arch)
    fresh = {k: v.clone() for k, v in net.state_dict().items() if k in head}
    loaded, reinit = fill_across_classes(net, ckpt, path)
    mapped = map_classes(net, ckpt, fresh, cfg, dataset) if dataset is not None else None
    theirs = (ckpt.get("arch") or {}).get("num_classes")
    line = f"{path} (trained on {ckpt.get('trained_on')}"
    line += f", {theirs} classes -> {net.arch['num_classes']})" if theirs != net.arch[
        "num_classes"] else ")"
    if mapped:
        line += f"\n{mapped}"
    if not reinit:
        return line + "; every tensor loaded"
    return (line + f"; loaded {loaded} tensors, re-initialised {len(reinit)} (the "
            "classifier):\n  " + "\n  ".join(reinit))
