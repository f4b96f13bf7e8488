"""Stage two of DeepLab: the fully connected CRF (Krähenbühl & Koltun 2011) on cached logits.

    python Implementation/crf.py search --cache runs/eval/logits --data-root data \
        --out runs/crf_search
    python Implementation/crf.py apply --cache runs/eval/logits --data-root data \
        --params runs/crf_search/best.json --out runs/crf_val
    python Implementation/crf.py learn --cache runs/eval/logits --data-root data \
        --out runs/crf_learn [--compat full] [--folds 2]

`apply` writes CRF label PNGs for every cached image; `search` is the paper's grid search of the
bilateral term (Sec. 4.1) on a seeded subset of val images, reusing the cached logits (the paper
then refines the steps around the best values: run it again with finer --bi-* lists); `learn`
fits the kernel weights (and with --compat full a label compatibility matrix, as CRF-as-RNN)
by gradient descent on the same cached logits, the bandwidths from a small outer grid, and
writes learned.json (read by `apply --params` and `evaluate.py --crf-params` as a best.json).

Settings come from the same config as training and evaluation (`--config`, `section.key=value`,
section `crf`); the flags are shorthands for config keys. The library is seglab/densecrf/:
  params.py       CRFParams: the paper's ResNet-101 values, normalisation, the search grid
  dense_crf.py    one image: raw RGB + logits -> marginals (pydensecrf, or torch_crf.py)
  runner.py       many images in parallel worker processes
  search.py       the grid search
  learn.py        the gradient fit (torch_crf.mean_field_differentiable)
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from seglab.config import (ConfigError, add_config_arguments, config_flag, config_from_args,
                           save_config)
from seglab.config import parse_args as parse_config_args
from seglab.data.images import DataError
from seglab.data.registry import dataset_class, resolve_num_classes
from seglab.densecrf.params import (BACKENDS, PAPER_GRID, CRFParams, crf_params_from_config,
                                    is_torch_backend)
from seglab.densecrf.runner import CRFFailure, CRFJob, run_crf
from seglab.densecrf.search import (best_setting, cross_validate, params_of, pick_subset,
                                   score_grid, search, search_grid)
from seglab.data.logit_cache import LogitCacheError, cache_path, cached_ids
from seglab.recipe import PAPER

EXPECTED = (ConfigError, DataError, LogitCacheError, FileNotFoundError, ValueError, ImportError,
            RuntimeError)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def find_image(folder: Path, image_id: str) -> Path:
    """<folder>/<id>.jpg (or .jpeg/.png); the .jpg path if none exists (the job then fails
    with a clear 'not found')."""
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{image_id}{ext}").is_file():
            return folder / f"{image_id}{ext}"
    return folder / f"{image_id}.jpg"


def use_cache_recipe(cfg: dict, cache: Path) -> None:
    """The resizing and protocol the cached logits were made with (their cache.json, written by
    evaluate.py), where the command line does not set them; DeepLab v2's for a cache without
    one. The CRF reads the logits exactly as evaluation did."""
    info = cache / "cache.json"
    made = json.loads(info.read_text()) if info.is_file() else {}
    for section, key in (("model", "interp"), ("eval", "mode"), ("eval", "pad_to")):
        if cfg[section][key] in ("auto", 0):
            cfg[section][key] = made.get(key) or PAPER[key]
    print(f"recipe of the cached logits: interp {cfg['model']['interp']}, protocol "
          f"{cfg['eval']['mode']} (pad {cfg['eval']['pad_to']})"
          f"{'' if made else ' (no cache.json: the paper' + chr(39) + 's)'}", file=sys.stderr)


def cached_split(cfg: dict, cache: Path, split: str | None):
    """(data set of the split or None, the cached ids to use): every cached image, or those of
    `split` (in the data set's own order)."""
    ids = cached_ids(cache)
    if not ids:
        raise FileNotFoundError(f"no cached logits (*.npz) in {cache}: run evaluate.py with this "
                                "cache folder first")
    if not split:
        return None, ids
    d = cfg["data"]
    dataset = dataset_class(d["dataset"])(d["root"], split, num_classes=resolve_num_classes(
        d["dataset"], d["root"], d["num_classes"]))
    have = set(ids)
    ids = [i for i in dataset.ids if i in have]
    if not ids:
        raise ValueError(f"none of the cached images in {cache} is in the {split!r} split")
    return dataset, ids


def write_failures(out: Path, failures: list[CRFFailure]) -> None:
    if failures:
        lines = [f"{f.image_id}\t{f.error}" for f in failures]
        (out / "failures.txt").write_text("\n".join(lines) + "\n")
        print(f"{len(failures)} job(s) failed, listed in {out / 'failures.txt'}:", file=sys.stderr)
        for line in lines[:10]:
            print("  " + line, file=sys.stderr)


def cmd_apply(args, cfg: dict) -> int:
    params = crf_params_from_config(cfg["crf"])
    dataset, ids = cached_split(cfg, args.cache, args.split)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(dict(cfg, command="apply", cache=str(args.cache), num_images=len(ids),
                     crf_params=params.to_dict()), out)
    if args.images or dataset is None:
        folder = Path(args.images) if args.images else \
            dataset_class(cfg["data"]["dataset"]).image_folder(cfg["data"]["root"])
        paths = {i: find_image(folder, i) for i in ids}
    else:
        index = {image_id: k for k, image_id in enumerate(dataset.ids)}
        paths = {i: dataset.image_path(index[i]) for i in ids}
    jobs = [CRFJob(i, str(paths[i]), str(cache_path(args.cache, i)), str(out / f"{i}.png"))
            for i in ids]
    results, failures = run_crf(jobs, params, cfg["crf"]["workers"] or None,
                                cfg["crf"]["backend"], crf_device(cfg), cfg["model"]["interp"],
                                mode=cfg["eval"]["mode"])
    write_failures(out, failures)
    print(f"wrote {len(results)} CRF label PNGs to {out}")
    return 1 if failures else 0


def crf_device(cfg: dict) -> str:
    device = cfg["run"]["device"]
    return "cpu" if not is_torch_backend(cfg["crf"]["backend"]) or device == "auto" else device


def write_search(out: Path, rows: list[dict], best: dict) -> list[dict]:
    """search.csv (every setting, best first) and best.json; returns the ranked rows."""
    ranked = sorted(rows, key=lambda r: -r["miou"] if not math.isnan(r["miou"]) else math.inf)
    columns = [f.name for f in dataclasses.fields(CRFParams)] + [
        "miou", "pixel_acc", "mean_class_acc", "images"]
    with open(out / "search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank"] + columns)
        writer.writeheader()
        for rank, r in enumerate(ranked, 1):
            writer.writerow(dict(rank=rank, **{k: r[k] for k in columns}))
    params_of(best).to_json(out / "best.json")
    return ranked


def print_search(ranked: list[dict], baseline: dict, best: dict, out: Path, top: int) -> None:
    print(f"\n{'w_bi':>6}{'xy_std':>8}{'rgb_std':>9}{'mIoU %':>9}{'pix acc %':>11}")
    for r in ranked[:top]:
        print(f"{r['bi_w']:6g}{r['bi_xy_std']:8g}{r['bi_rgb_std']:9g}"
              f"{100 * r['miou']:9.2f}{100 * r['pixel_acc']:11.2f}")
    print(f"no CRF on the same {baseline['images']} images: mIoU {100 * baseline['miou']:.2f}, "
          f"pixel acc {100 * baseline['pixel_acc']:.2f}")
    print(f"best: w_bi={best['bi_w']:g} theta_alpha={best['bi_xy_std']:g} "
          f"theta_beta={best['bi_rgb_std']:g} -> {out / 'best.json'} "
          "(use with `crf.py apply --params` or `evaluate.py --crf --crf-params`)")


def cmd_search(args, cfg: dict) -> int:
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    base = crf_params_from_config(cfg["crf"])  # the grid sets the bilateral term
    dataset, cached = cached_split(cfg, args.cache, args.split or cfg["data"]["val_split"])
    ids = pick_subset(cached, args.num_images, args.seed)
    if len(ids) < args.num_images:
        print(f"note: only {len(ids)} cached images available; searching on all of them",
              file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ids.txt").write_text("\n".join(ids) + "\n")
    grid = {k: getattr(args, k) or PAPER_GRID[k] for k in PAPER_GRID}
    settings = search_grid(**grid, base=base)
    save_config(dict(cfg, command="search", cache=str(args.cache), base_params=base.to_dict(),
                     grid=grid, num_settings=len(settings), ids_file=str(out / "ids.txt")), out)
    index = {image_id: k for k, image_id in enumerate(dataset.ids)}
    jobs = [CRFJob(i, str(dataset.image_path(index[i])), str(cache_path(args.cache, i)),
                   gt_path=str(dataset.label_path(index[i]))) for i in ids]
    grid_results = score_grid(jobs, settings, cfg["crf"]["workers"] or None,
                              cfg["crf"]["backend"], crf_device(cfg), cfg["model"]["interp"],
                              mode=cfg["eval"]["mode"])
    rows, baseline, failures = search(jobs, settings, grid=grid_results)
    write_failures(out, failures)
    if len({r["images"] for r in rows}) > 1:
        print("warning: settings were scored on different numbers of images (see failures.txt);"
              " their mIoUs are not comparable", file=sys.stderr)
    best = best_setting(rows)
    ranked = write_search(out, rows, best)
    summary = {"best": best, "no_crf": baseline, "num_images": len(ids),
               "num_settings": len(settings), "failures": len(failures)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_search(ranked, baseline, best, out, args.top)
    if args.folds:
        cv = cross_validate(grid_results[0], grid_results[1], ids, args.folds, args.seed)
        (out / "cross_validation.json").write_text(json.dumps(cv, indent=2) + "\n")
        print(f"{args.folds}-fold cross-validation (each image scored with the setting tuned on "
              f"the other folds): CRF mIoU {100 * cv['crf']['miou']:.2f}, no CRF "
              f"{100 * cv['no_crf']['miou']:.2f} -> {out / 'cross_validation.json'}")
    return 1 if failures else 0


def score_held_out(jobs: list[CRFJob], params: CRFParams, cfg: dict, desc: str):
    """{image id: ConfusionMatrix} of the CRF with `params` at full resolution, and failures."""
    results, failures = run_crf(jobs, params, cfg["crf"]["workers"] or None,
                                cfg["crf"]["backend"], crf_device(cfg), cfg["model"]["interp"],
                                progress=False, desc=desc, mode=cfg["eval"]["mode"])
    return {r.image_id: r.confusion for r in results}, failures


def cmd_learn(args, cfg: dict) -> int:
    from tqdm import tqdm
    from seglab.densecrf import learn
    from seglab.densecrf.search import pooled
    from seglab.data.metrics import ConfusionMatrix

    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    start = crf_params_from_config(cfg["crf"])
    if args.bi_w is not None:
        if len(args.bi_w) != 1:
            raise ValueError("learn takes one --bi-w value (the start)")
        start = dataclasses.replace(start, bi_w=args.bi_w[0])
    if start.iterations < 1:
        raise ValueError("learn needs crf.iterations >= 1 (--iterations)")
    opts = learn.FitOptions(compat=args.compat, steps=args.steps, lr=args.lr,
                            scale=args.fit_scale, compat_l2=args.compat_l2, seed=args.seed)
    grid = learn.fit_grid(args.bi_xy_std, args.bi_rgb_std, [start.pos_xy_std])
    dataset, cached = cached_split(cfg, args.cache, args.split or cfg["data"]["val_split"])
    ids = pick_subset(cached, args.num_images, args.seed)
    parts = learn.fold_parts(ids, args.folds, args.seed) if args.folds else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ids.txt").write_text("\n".join(ids) + "\n")
    save_config(dict(cfg, command="learn", cache=str(args.cache), start_params=start.to_dict(),
                     fit=dataclasses.asdict(opts), grid=[s._asdict() for s in grid],
                     ids_file=str(out / "ids.txt")), out)
    index = {image_id: k for k, image_id in enumerate(dataset.ids)}
    jobs = {i: CRFJob(i, str(dataset.image_path(index[i])), str(cache_path(args.cache, i)),
                      gt_path=str(dataset.label_path(index[i]))) for i in ids}
    tic = time.time()
    items = {i: learn.load_fit_image(i, j.image_path, j.logits_path, j.gt_path, opts.scale,
                                     cfg["model"]["interp"], cfg["eval"]["mode"])
             for i, j in tqdm(jobs.items(), desc="load", unit="img", leave=False)}
    rows = []
    tasks = [learn.Task("all", tuple(ids), (), setting) for setting in grid]  # longest first
    tasks += [learn.Task(f"fold {f}", tuple(i for g, part in enumerate(parts) if g != f
                                            for i in part), tuple(test), setting)
              for f, test in enumerate(parts) for setting in grid]
    workers = min(cfg["crf"]["workers"] or os.cpu_count() or 1, len(tasks))
    with tqdm(total=len(tasks) * (opts.steps + 1), unit="step",
              desc=f"CRF learn ({args.compat}; {len(grid)} bandwidth settings x "
                   f"{len(parts) + 1} fit(s), {workers} process(es))") as bar:
        fits = learn.run_tasks(tasks, items, start, opts, workers, bar,
                               lambda key, row: rows.append(dict(stage=key, **row)))
    cv = None
    if parts:
        c = next(iter(items.values())).unary.shape[1]
        held_out, chosen, failures = ConfusionMatrix(c), [], []
        for f, test in enumerate(parts):
            fold_params, results = fits[f"fold {f}"]
            confusions, failed = score_held_out([jobs[i] for i in test], fold_params, cfg,
                                                f"fold {f}")
            failures += failed
            cm = pooled(confusions, test)
            if cm is not None:
                held_out.merge(cm)
            chosen.append(dict(fold=f, tuned_on=len(ids) - len(test), scored_on=test,
                               params=fold_params.to_dict(),
                               tuned_miou=max(r["fit_miou"] for r in results)))
        baseline, failed = score_held_out(list(jobs.values()),
                                          dataclasses.replace(start, iterations=0), cfg, "no CRF")
        failures += failed
        cv = dict(folds=args.folds, seed=args.seed, crf=held_out.scores(),
                  no_crf=pooled(baseline, ids).scores(), chosen=chosen)
        (out / "cross_validation.json").write_text(json.dumps(cv, indent=2) + "\n")
        write_failures(out, failures)
    learned, results = fits["all"]
    learned.to_json(out / "learned.json")
    columns = ["stage", "bi_xy_std", "bi_rgb_std", "pos_xy_std", "step", "loss", "fit_miou",
               "val_miou", "bi_w", "pos_w"]
    with open(out / "learn.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] if k in r else r["setting"][k] for k in columns})
    summary = dict(learned=learned.to_dict(), num_images=len(ids), seconds=time.time() - tic,
                   settings=[dict(params=r["params"].to_dict(), fit_miou=r["fit_miou"],
                                  loss=r["loss"], seconds=r["seconds"]) for r in results],
                   fit=dataclasses.asdict(opts))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"learned ({args.compat}): w_bi={learned.bi_w:.3f} w_pos={learned.pos_w:.3f} "
          f"theta_alpha={learned.bi_xy_std:g} theta_beta={learned.bi_rgb_std:g} -> "
          f"{out / 'learned.json'} (use with `crf.py apply --params` or `evaluate.py --crf "
          "--crf-params`)")
    if cv is not None:
        print(f"{args.folds}-fold cross-validation (each image scored with the parameters "
              f"fitted on the other folds): CRF mIoU {100 * cv['crf']['miou']:.2f}, no CRF "
              f"{100 * cv['no_crf']['miou']:.2f} -> {out / 'cross_validation.json'}")
    return 1 if cv is not None and (out / "failures.txt").exists() else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("apply", "search", "learn"),
                   help="apply: CRF label PNGs for every cached image; search: grid search of "
                        "the bilateral term (stage two); learn: fit the kernel weights (and "
                        "the label compatibility) by gradient descent")
    add_config_arguments(p)
    p.add_argument("--cache", required=True, type=Path,
                   help="folder of cached logits <id>.npz (written by evaluate.py)")
    p.add_argument("--out", required=True, type=Path, help="run folder for the outputs")
    config_flag(p, "--data-root", "data.root", help="folder that holds the data set")
    p.add_argument("--split", default=None,
                   help="only images of this split (apply: default every cached image; "
                        "search: default data.val_split)")
    p.add_argument("--images", type=Path,
                   help="apply: folder of <id>.jpg images (default: the data set's)")
    config_flag(p, "--params", "crf.params",
                help="CRF parameter JSON (e.g. a search's best.json)")
    config_flag(p, "--iterations", "crf.iterations", type=int, help="mean-field iterations")
    config_flag(p, "--pos-w", "crf.pos_w", type=float, help="Gaussian kernel weight w_pos")
    config_flag(p, "--pos-xy-std", "crf.pos_xy_std", type=float,
                help="Gaussian kernel theta_gamma, px")
    config_flag(p, "--normalization", "crf.normalization", choices=("after", "symmetric"),
                help="message normalisation ('after' = DeepLab's CRF binary)")
    config_flag(p, "--workers", "crf.workers", type=int, help="worker processes (0 = all cores)")
    config_flag(p, "--backend", "crf.backend", choices=BACKENDS,
                help="pydensecrf (C++); torch (densecrf/torch_crf.py, no build needed, the same "
                     "labels); torch-fp16 (its lattice in float16: faster, labels not exact, "
                     "agreement in bench/bench_crf_torch.py)")
    config_flag(p, "--device", "run.device", help="device for the torch backends (cpu, cuda)")
    config_flag(p, "--interp", "model.interp", choices=("caffe", "pytorch"),
                help="logit upsampling: caffe = Interp, align_corners=True")
    p.add_argument("--bi-w", dest="bi_w", type=float, nargs="+",
                   help="w_bi: one value (apply; learn: the start) or the grid (search: "
                        "default 3 4 5 6)")
    p.add_argument("--bi-xy-std", dest="bi_xy_std", type=float, nargs="+",
                   help="theta_alpha, px: one value or the grid (search: 30 40 ... 100; "
                        "learn's outer grid: 40 70 100)")
    p.add_argument("--bi-rgb-std", dest="bi_rgb_std", type=float, nargs="+",
                   help="theta_beta: one value or the grid (search: 3 4 5 6; learn: 3 5)")
    p.add_argument("--num-images", type=int, default=100,
                   help="search, learn: images in the subset (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="search, learn: subset and fold shuffle seed")
    p.add_argument("--folds", type=int, default=0,
                   help="search, learn: also K-fold cross-validate (each image scored with the "
                        "setting tuned on the other folds), e.g. 2; 0 = no")
    p.add_argument("--compat", choices=("potts", "full"), default="potts",
                   help="learn: the label compatibility to fit: potts (the weights only) or "
                        "full (also a symmetric C x C matrix, CRF-as-RNN) (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10,
                   help="learn: Adam steps per bandwidth setting (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="learn: Adam learning rate on the log-weights (default: %(default)s)")
    p.add_argument("--fit-scale", type=int, default=4,
                   help="learn: fit on every k-th pixel of every k-th row (the kernels' pixel "
                        "stds divided by k; scored at full resolution) (default: %(default)s)")
    p.add_argument("--compat-l2", type=float, default=1e-3,
                   help="learn --compat full: penalty on the squared distance of the matrix "
                        "from Potts (default: %(default)s)")
    p.add_argument("--top", type=int, default=10, help="search: settings to print")
    return parse_config_args(p, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        use_cache_recipe(cfg, Path(args.cache))
        if args.command == "apply":
            for name in PAPER_GRID:
                values = getattr(args, name)
                if values is not None:
                    if len(values) != 1:
                        raise ValueError(f"apply takes one --{name.replace('_', '-')} value")
                    cfg["crf"][name] = values[0]
            return cmd_apply(args, config_from_args(args, base=cfg))
        if args.command == "learn":
            return cmd_learn(args, cfg)
        return cmd_search(args, cfg)
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an --out that is a file, a folder that is not writable, a full disk
        print(f"error: cannot write {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
