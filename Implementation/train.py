"""Stage one: train a segmentation network with its recipe (default: DeepLab v2, the paper's).

    python Implementation/train.py                      # the paper's recipe on VOC 2012 train_aug
    python Implementation/train.py --config demo        # CPU demo on the synthetic VOC-layout set
    python Implementation/train.py --resume runs/NAME   # continue exactly where it stopped
    torchrun --nproc_per_node=4 Implementation/train.py # DistributedDataParallel, same effective batch

The recipe (seglab/config.py DEFAULTS): SGD, momentum 0.9, weight decay 5e-4, base lr 1e-3 with
1x/10x/20x groups (the architecture's param_groups), poly power 0.9 every iteration, 20,000
iterations, effective batch 10 = batch_per_step x accumulation x processes, crop 321, MSC loss on
the four outputs (seglab/training/loss.py). Everything goes into one run folder: config.yaml,
log.csv, checkpoints/, and the evaluation of the final model (eval_val/). A run folder is never
overwritten: continue it with --resume, or start over with --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from seglab.checkpoint import CheckpointError
from seglab.config import (ConfigError, add_config_arguments, arch_from_config, config_from_args,
                           given_keys, parse_args as parse_config_args, save_config,
                           upgrade_legacy)
from seglab.data.check import check_split
from seglab.data.demo import make_demo_dataset
from seglab.data.images import DataError
from seglab.data.folder import warn_unlabelled
from seglab.data.registry import resolve_num_classes, training_dataset
from seglab.device import DeviceError
from seglab.evaluation.evaluate import EvalSettings, EvaluationError, evaluate
from seglab.evaluation.baseline import background_baseline
from seglab.training.distributed import barrier, setup_distributed, teardown
from seglab.models import normalize_arch
from seglab.recipe import RECIPE_FIELDS, describe, explicit_recipe, fill_config, resolve_recipe
from seglab.training.class_map import parse_class_map
from seglab.training.init import (TrainingError, adopt_architecture, init_checkpoint,
                                  plan_class_groups, prepare_init)
from seglab.training.distill import describe_distillation, plan_distillation
from seglab.training.loop import Interrupted, train
from seglab.training.run_dir import RunDirError, claim_run_dir, make_run_dir
from seglab.training.state import load_training_checkpoint, resolve_resume

EXPECTED = (ConfigError, CheckpointError, DataError, DeviceError, EvaluationError, RunDirError,
            TrainingError)


def evaluate_final(cfg: dict, checkpoint: Path, run_dir: Path, show_progress=True) -> dict:
    """Score the final model on data.val_split (and with the CRF), next to the baseline."""
    # the recipe is the final checkpoint's, which is the run's resolved one (saved with it)
    settings = dataclasses.replace(EvalSettings.from_config(cfg),
                                   **{key: None for key in RECIPE_FIELDS})
    scores = evaluate(checkpoint, settings, out_dir=run_dir / "eval_val",
                      show_progress=show_progress)
    d = cfg["data"]
    lines = [f"val mIoU ({d['val_split']}, {d['root']}): {100 * scores['miou']:.2f}"]
    if "crf" in scores:
        lines.append(f"val mIoU with CRF: {100 * scores['crf']['miou']:.2f}")
    lines.append(f"all-background baseline: {100 * background_baseline(cfg):.2f}")
    print("\n".join(lines))
    return scores


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Stage one: train with the paper's recipe (defaults = config preset voc12: "
                    "DeepLab v2 on VOC 2012 train_aug). Any config field can be overridden as "
                    "section.key=value, before or after the options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--init", help="scratch | imagenet | imagenet=FILE | a converted checkpoint "
                                  "or one of ours (overrides train.init). A checkpoint also "
                                  "gives the architecture and its recipe (scales, input "
                                  "normalisation) unless model.name / the recipe keys are set")
    p.add_argument("--init-class", action="append", default=[], metavar="NEW=OLD1,OLD2",
                   help="class-mapped init: start class NEW of the data set from the classes "
                        "OLD1, OLD2 of the --init checkpoint (repeatable; equal names map by "
                        "themselves; adds to train.init_classes)")
    p.add_argument("--resume", metavar="RUN_DIR|FILE",
                   help="continue a run exactly from its checkpoints/last.pth")
    p.add_argument("--run-dir", help="run folder (default: run.out/<preset>-<timestamp>)")
    p.add_argument("--force", action="store_true",
                   help="start over in a --run-dir that already holds a run")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation of the final model on the val split")
    return parse_config_args(p, argv)


def resolve(args) -> tuple[dict, Path, dict | None, dict | None]:
    """(config, run folder, resume checkpoint or None, the init checkpoint's facts or None)
    from the command line."""
    if args.resume:
        path = resolve_resume(args.resume)
        resume = load_training_checkpoint(path)
        cfg = config_from_args(args, base=upgrade_legacy(resume["config"]))
        return cfg, Path(args.run_dir) if args.run_dir else path.parent.parent, resume, None
    cfg = config_from_args(args)
    if args.init:
        cfg["train"]["init"] = args.init
    try:
        cfg["train"]["init_classes"] = {**parse_class_map(cfg["train"]["init_classes"]),
                                        **parse_class_map(args.init_class)}
    except ValueError as e:
        raise ConfigError(str(e)) from None
    init = init_checkpoint(cfg)
    note = adopt_architecture(cfg, init, given_keys(args))
    prepare_init(cfg)
    # the training and test recipe: command line > init checkpoint > architecture > the paper's
    recipe, sources = resolve_recipe(explicit_recipe(cfg), init, arch_from_config(cfg))
    fill_config(cfg, recipe)
    d = cfg["data"]
    d["num_classes"] = resolve_num_classes(d["dataset"], d["root"], d["num_classes"])
    normalize_arch(arch_from_config(cfg))              # an option the checkpoint gave is valid
    print("\n".join(filter(None, [note, describe(recipe, sources)])), file=sys.stderr)
    return cfg, Path(args.run_dir) if args.run_dir else make_run_dir(cfg), None, init


def prepare_data(cfg: dict, rank: int):
    """The training set (the demo generated first if asked for), checked up front."""
    d = cfg["data"]
    if d["demo"] and rank == 0:
        make_demo_dataset(d["root"], **d["demo_args"])
    barrier()
    dataset = training_dataset(cfg)
    if d["dataset"] == "folder" and rank == 0:
        warn_unlabelled(d["root"])
    if len(dataset) == 0:
        raise DataError(f"the training split {d['train_split']!r} under {d['root']} is empty "
                        f"({dataset.list_path}): nothing to train on. Check the split list.")
    if rank == 0:
        check_split(dataset, d["check"], d["workers"])
    return dataset


def main(argv=None) -> int:
    args = parse_args(argv)
    # Flush denormals to zero before torch starts its worker threads (they inherit the flag):
    # softmax gradients of classes a model has learned to rule out underflow into denormals,
    # which made late CPU iterations of the demo ~3x slower. Changes nothing above 1e-38.
    torch.set_flush_denormal(True)
    try:
        cfg, run_dir, resume, init = resolve(args)
        rank, _, _ = setup_distributed()
        lock = claim_run_dir(run_dir, resume=bool(resume), force=args.force) if rank == 0 else None
        dataset = prepare_data(cfg, rank)
        groups = None if resume else plan_class_groups(cfg, dataset, init)
        if groups and rank == 0:
            print(groups, file=sys.stderr)
        if not resume:   # the resolved weight goes into config.yaml (resume needs no guess)
            cfg["train"]["distill"], known = plan_distillation(cfg, dataset, init)
            if known and rank == 0:
                print(describe_distillation(cfg, dataset, known), file=sys.stderr)
        t = cfg["train"]
        if t["epochs"] and not resume and "train.iterations" not in given_keys(args):
            # a length in passes over the data; an explicit train.iterations wins, and a
            # resumed run keeps the count it started with
            t["iterations"] = -(-t["epochs"] * len(dataset) // t["effective_batch"])
        elif not resume:
            t["epochs"] = 0                          # the saved config: what decided the length
        if rank == 0:
            save_config(cfg, run_dir)
        final = train(cfg, run_dir, dataset, resume)
        teardown()
        if rank == 0 and not args.no_eval and cfg["eval"]["after_train"]:
            evaluate_final(cfg, final, run_dir)
        del lock
    except Interrupted as e:
        print(f"{e}; continue with `python Implementation/train.py --resume {run_dir}`",
              file=sys.stderr)
        return 130 if e.signal_name == "SIGINT" else 143
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a run folder that is not writable, a full disk
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
