"""Class-mapped initialisation: start a new classifier from what the init checkpoint knew.

Fine-tuning a VOC model on `background, person, animal` with a freshly initialised 3-class
classifier throws away what the model knew about people and animals: a few examples of a class
cannot teach a random classifier row what the old one had learned. Since checkpoints carry their
class names (seglab/checkpoint.py), each new class can start from the old rows:

  - a new class whose name equals an old class's name starts as that class's row (weights and
    bias of every class-dependent tensor: the ASPP branches of DeepLab v2, a 1x1 classifier,
    an auxiliary head), so its score is the old score;
  - a new class defined as a union of old ones (`train.init_classes={animal: [bird, cat, cow,
    dog, horse, sheep]}`) starts from a combination of its members' rows. Every head here is
    linear in its class rows (the class-dependent convolutions, then sums and resizing), so the
    row sum_m a_m row_m, with b added to one bias, scores z = sum_m a_m z_m + b exactly. What
    the union's score should be is log sum_m exp(z_m) (its probability is the sum of its
    members'), which no single row gives. `train.init_union` chooses:
      exact   (default) no single row: the class keeps one row per member, each a copy, and
              the network merges them by log-sum-exp (seglab/models/class_groups.py), so before
              training it gives the old model's probabilities summed per new class, exactly;
    or one linear row, with (a, b):
      fit     the weights of the member rows and the offset (k + 1 numbers per
              union, started at the mean below) fitted so that the new softmax matches the old
              model's probabilities summed over each union, on the training images
              (cross-entropy, L-BFGS on the old model's cached scores: seconds). Letting every
              old row take part (C_old weights) fitted the training images better and scored
              2 points lower on held-out images (bench/finetune_real.py): members only;
      mean    a_m = 1/k, b = log k: mean(z_m) + log k, exact when the members agree;
      max     the row of the member the old model predicts most on the training images.
    `bench/finetune_real.py` measures the three against the old model's mapped prediction
    (README, "Your own data");
  - any other class keeps the fresh initialisation the architecture gives it.

Before any training the new network's argmax then reproduces the old model's prediction mapped
to the new classes as closely as a linear head allows. Which tensors are the classifier is
found exactly by `models.class_dependent` (the tensors whose shape follows num_classes).
"""
from __future__ import annotations

import math

import torch

UNIONS = ("exact", "fit", "mean", "max")


def parse_class_map(spec) -> dict[str, list[str]]:
    """{new class: [old classes]} from a config value: a mapping (YAML: {animal: [bird, cat]})
    or a list of 'new=old1,old2' strings (train.py --init-class)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for text in spec:
            if "=" not in str(text):
                raise ValueError(f"--init-class {text!r} must look like NEW=OLD1,OLD2")
            new, old = str(text).split("=", 1)
            items.append((new, old.split(",")))
    out = {}
    for new, old in items:
        members = [old] if isinstance(old, str) else list(old)
        members = [str(m).strip() for m in members if str(m).strip()]
        if not members:
            raise ValueError(f"init class map: {new!r} names no old class")
        out[str(new).strip()] = members
    return out


def class_mapping(new_names, old_names, explicit: dict) -> dict[int, list[int]]:
    """{new index: [old indices]}: the explicit map first, then equal names. A name in the
    explicit map that is not a new class, or a member that is not an old class, is an error
    naming the known ones."""
    new_index = {n: i for i, n in enumerate(new_names)}
    old_index = {n: i for i, n in enumerate(old_names)}
    unknown_new = [n for n in explicit if n not in new_index]
    if unknown_new:
        raise ValueError(f"init class map names {unknown_new}, which are not classes of the "
                         f"data set ({', '.join(new_names)})")
    mapping = {}
    for name, members in explicit.items():
        missing = [m for m in members if m not in old_index]
        if missing:
            raise ValueError(f"init class map: {missing} are not classes of the init checkpoint "
                             f"({', '.join(old_names)})")
        mapping[new_index[name]] = [old_index[m] for m in members]
    for name, i in new_index.items():
        if i not in mapping and name in old_index:
            mapping[i] = [old_index[name]]
    return mapping


def union_weights(mapping: dict, union: str = "mean", old_scores=None) -> dict:
    """{new index: (rows: old indices, a: the weight of each, b: the bias offset)} of every
    mapped class (a single member: its row, weight 1, offset 0). `old_scores`: the old model's
    logits on training images, a list of (C_old, h, w) tensors, which "max" and "fit" need."""
    if union not in UNIONS:
        raise ValueError(f"train.init_union must be one of {UNIONS}, got {union!r}")
    union = "fit" if union == "exact" else union   # a network without class groups: one row
    out = {}
    for new, members in mapping.items():
        k = len(members)
        if k == 1 or union == "mean" or old_scores is None:
            out[new] = (list(members), [1.0 / k] * k, math.log(k))
        elif union == "max":
            counts = sum(torch.bincount(z.argmax(0).flatten(), minlength=z.shape[0])
                         for z in old_scores)
            out[new] = ([max(members, key=lambda m: int(counts[m]))], [1.0], 0.0)
    if union == "fit" and old_scores is not None and any(len(m) > 1 for m in mapping.values()):
        out.update(fit_unions(mapping, old_scores))
    return out


def fit_unions(mapping: dict, old_scores, steps: int = 50) -> dict:
    """(rows, a, b) of every union, fitted jointly: the new classes' scores (single members:
    the old score; unions: sum over its members m of a_m z_m, plus b) under a softmax against
    the old model's probabilities summed per new class, cross-entropy over the pixels whose old
    probability mass is mostly on mapped classes. Started at the mean (a = 1/k, b = log k);
    L-BFGS."""
    z = torch.cat([s.flatten(1) for s in old_scores], 1).double()       # (C_old, pixels)
    p = torch.softmax(z, 0)
    new = sorted(mapping)
    target = torch.stack([p[mapping[n]].sum(0) for n in new])            # (C_mapped, pixels)
    keep = target.sum(0) > 0.5                   # the old model's mass is on mapped classes
    z, target = z[:, keep], (target / target.sum(0, keepdim=True))[:, keep]
    unions = [n for n in new if len(mapping[n]) > 1]
    params = {n: torch.tensor([1.0 / len(mapping[n])] * len(mapping[n]) +
                              [math.log(len(mapping[n]))], dtype=torch.float64,
                              requires_grad=True) for n in unions}
    optimizer = torch.optim.LBFGS(list(params.values()), max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        scores = torch.stack([params[n][:-1] @ z[mapping[n]] + params[n][-1] if n in params
                              else z[mapping[n][0]] for n in new])
        value = -(target * torch.log_softmax(scores, 0)).sum(0).mean()
        value.backward()
        return value
    optimizer.step(loss)
    return {n: (list(mapping[n]), params[n].detach()[:-1].tolist(),
                float(params[n].detach()[-1])) for n in unions}


def class_groups_of(mapping: dict, num_classes: int) -> list[int]:
    """The rows of each class for the exact head: one per member, one for an unmapped class."""
    return [len(mapping.get(c, [None])) for c in range(num_classes)]


def grouped_rows(mapping: dict, groups) -> tuple[dict, dict]:
    """(row -> [old member], row -> (rows, weights, offset)) for the exact head: row r of the
    network (classes own consecutive rows) is a copy of one member's row; unmapped classes' rows
    keep their fresh init."""
    rows, weights, start = {}, {}, 0
    for c, k in enumerate(groups):
        for j, member in enumerate(mapping.get(c, [])):
            rows[start + j] = [member]
            weights[start + j] = ([member], [1.0], 0.0)
        start += k
    return rows, weights


def map_rows(fresh: dict, old: dict, keys, mapping: dict, weights: dict | None = None) -> dict:
    """The class-dependent tensors `keys` of the new network: `fresh` (its own init) with the
    row of each mapped class the combination `weights` gives (union_weights; default: the
    mean + log k) of its members' rows in `old` (the init checkpoint's tensors)."""
    weights = weights or union_weights(mapping)
    out = {k: fresh[k].clone() for k in keys}
    biases = sorted(k for k in keys if old[k].dim() == 1)
    for new in mapping:
        rows_of, a, b = weights[new]
        a = torch.tensor(a, dtype=torch.float64)
        for k in keys:
            rows = old[k][rows_of].double()
            out[k][new] = (a.view(-1, *[1] * (rows.dim() - 1)) * rows).sum(0).to(out[k].dtype)
        if b and biases:                       # the offset, once, on one bias of the classifier
            out[biases[0]][new] += b
    return out


def describe_mapping(mapping: dict, new_names, old_names, union: str, weights=None) -> str:
    """The line the training log prints."""
    lines = []
    for i, name in enumerate(new_names):
        if i in mapping:
            members = [old_names[m] for m in mapping[i]]
            how = ""
            if len(members) > 1 and union == "exact":
                how = f" (exact: {len(members)} rows, log-sum-exp)"
            elif len(members) > 1:
                rows, a, b = (weights or union_weights(mapping))[i]
                top = sorted(zip(a, rows), key=lambda t: -abs(t[0]))[:len(members) + 2]
                how = (f" ({union}: " + ", ".join(f"{w:+.2f} {old_names[r]}" for w, r in top) +
                       f"{', ...' if len(rows) > len(top) else ''}; offset {b:.2f})")
            lines.append(f"{name} <- {' + '.join(members)}{how}")
        else:
            lines.append(f"{name} <- new (fresh init)")
    return "class-mapped init: " + "; ".join(lines)


@torch.no_grad()
def old_scores(net, images) -> list:
    """The init network's logits (C_old, h, w) on `images` (normalised tensors [3, H, W])."""
    net.eval()
    return [net(x[None])[0].float() for x in images]
