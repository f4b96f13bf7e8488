"""Fine-tuning without forgetting: distillation from the class-mapped init (train.distill).

A class-mapped init (class_map.py) starts the new network where the old model was: before any
training it predicts the old model's classes mapped to the new ones. Fine-tuning on a few images
then moves it away from that, also on what the few images do not show: with no cat among ten
training photos, every step pushes the `cat` score down on pixels that are not cats, and nothing
holds it up on the cats of other photos (bench/finetune_real.py measured it: a 4-class
`background, person, cat, dog` model fell from 91.6 to 44.9 mIoU, its cat IoU to 0).

Learning without Forgetting (Li & Hoiem, ECCV 2016, Sec. 3) keeps the old model's responses as a
second target: the loss adds lambda_o x the cross-entropy between the old network's and the new
network's softmax at temperature T, on every training input, with lambda_o = 1 and T = 2 (their
values; the distillation loss of Hinton et al. 2015, Sec. 2, multiplied by T^2 so its gradients
keep the scale of the hard-label loss, as they advise). Semantic segmentation applies it per
pixel (Michieli & Zanuttigh, "Incremental learning techniques for semantic segmentation", ICCVW
2019, L'_D on the output; Cermelli et al., MiB, CVPR 2020). Here:

  teacher   the network as the class-mapped init left it, frozen (a second copy, built the same
            way: resume rebuilds it from train.init, so a resumed run distils from the same
            teacher; built with the global RNG untouched, so resume stays bit-identical)
  classes   the new classes that started from old rows (the mapping's); a class with a fresh
            row has nothing to keep. Both softmaxes are taken over those classes only (LwF
            keeps the old task's outputs; a new class is the new task's)
  pixels    all of them, the ignored ones (255) included: on those the old model's answer is
            the only target there is, and they are what it must not forget
  output    the network's full-resolution-branch logits (the 1x branch of MSC, `out` of an
            auxiliary head), at their own resolution

`train.distill` is lambda_o: null (auto) = 1 when the init is a checkpoint whose classes were
mapped to the data set's (a fine-tune onto your own classes), else 0 (the paper's recipe starts
from an init whose classifier is new: nothing to distil). `train.distill_temperature` is T.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from seglab.models import build_model
from seglab.training.init import TrainingError, init_checkpoint, init_mapping, load_init


class Distillation(NamedTuple):
    """What a distilling run adds to its loss: weight x the term over `classes`."""
    weight: float
    classes: list[int]
    teacher: torch.nn.Module
    temperature: float


def distill_weight(cfg: dict, known: list[int]) -> float:
    """lambda_o: train.distill, or for null 1 when some classes start from the init's rows."""
    weight = cfg["train"]["distill"]
    return float(weight) if weight is not None else (1.0 if known else 0.0)


def known_classes(cfg: dict, dataset, ckpt: dict | None) -> list[int]:
    """The data set's classes whose classifier rows start from the init checkpoint's (equal
    names, or train.init_classes), in order; [] when nothing is mapped (another init, or the
    same classes as the checkpoint: a continuation, not a new task)."""
    mapping = init_mapping(cfg, dataset, ckpt) if ckpt is not None else None
    return sorted(mapping) if mapping else []


def build_teacher(cfg: dict, arch: dict, dataset, device) -> torch.nn.Module:
    """The class-mapped init as a frozen network in eval mode, without touching the global RNG
    (so that a run and its resume draw the same random numbers)."""
    with torch.random.fork_rng(devices=[]):
        teacher = build_model(arch)
        load_init(teacher, cfg, dataset)
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def main_output(outputs) -> torch.Tensor:
    """The full-resolution-branch logits of what a network returns in training."""
    if isinstance(outputs, dict):
        return outputs["out"]
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, classes: list[int],
                      temperature: float = 2.0) -> torch.Tensor:
    """T^2 x the per-pixel cross-entropy between softmax(teacher / T) and softmax(student / T)
    over `classes`, minus the teacher's entropy (i.e. the KL divergence, whose gradient is the
    same): mean over pixels, then over images."""
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher.float(), size=student.shape[-2:], mode="bilinear",
                                align_corners=False)
    index = torch.tensor(classes, device=student.device)
    s = F.log_softmax(student.float().index_select(1, index) / temperature, dim=1)
    t = F.log_softmax(teacher.float().index_select(1, index) / temperature, dim=1)
    kl = (t.exp() * (t - s)).sum(1)                       # (B, h, w)
    return temperature ** 2 * kl.flatten(1).mean(1).mean()


def with_distillation(loss, d: Distillation):
    """(outputs, label, image) -> the loss plus weight x the distillation term, whose value
    becomes one more part (Step logs weight x part, so the logged total is the trained one)."""
    def total(outputs, label, image):
        value, parts = loss(outputs, label, image)
        with torch.no_grad():
            target = main_output(d.teacher(image))
        term = distillation_loss(main_output(outputs), target, d.classes, d.temperature)
        return value + d.weight * term, list(parts) + [term]
    return total


def distillation(cfg: dict, net, dataset, device) -> Distillation | None:
    """This run's distillation from its class-mapped init (rebuilt the same way at resume), or
    None when it does not distil."""
    if cfg["train"]["distill"] == 0:       # resolved off (train.py): no checkpoint to read
        return None
    weight, classes = plan_distillation(cfg, dataset, init_checkpoint(cfg))
    if weight <= 0:
        return None
    teacher = build_teacher(cfg, net.arch, dataset, device)
    if cfg["train"]["channels_last"] and device.type == "cuda":
        teacher = teacher.to(memory_format=torch.channels_last)
    return Distillation(weight, classes, teacher, cfg["train"]["distill_temperature"])


def plan_distillation(cfg: dict, dataset, ckpt: dict | None) -> tuple[float, list[int]]:
    """(lambda_o, the classes to distil) for this run; train.distill > 0 with nothing to
    distil from (no mapped classes, or the init checkpoint gone at resume) is an error."""
    known = known_classes(cfg, dataset, ckpt)
    weight = distill_weight(cfg, known)
    if weight > 0 and not known:
        raise TrainingError(
            f"train.distill={weight:g} needs a teacher: an init checkpoint whose classes map to "
            f"the data set's (train.init={cfg['train']['init']}: "
            f"{'not found' if ckpt is None else 'no class maps'}). Set train.distill=0 or "
            "point train.init at that checkpoint.")
    return weight, known


def describe_distillation(cfg: dict, dataset, classes: list[int]) -> str:
    """The log line: weight, temperature and the classes kept."""
    t = cfg["train"]
    if not t["distill"]:
        return "no distillation (train.distill=0): the mapped classes may drift freely"
    names = [dataset.class_names[i] for i in classes]
    return (f"distillation from the class-mapped init (Learning without Forgetting): weight "
            f"{t['distill']:g}, temperature {t['distill_temperature']:g}, over "
            f"{', '.join(names)}")
