"""The run a figure reads: a train.py run folder (config.yaml, log.csv, checkpoints/final.pth,
eval_<split>/ with scores*.json and the logit cache), found as runs/demo by default.

  Run                the folder and its config, with the settings its evaluation used (split,
                     interpolation, protocol, CRF parameters and backend, data root)
  load_run           a Run from a folder path, its config read through seglab.config
  default_run        the documented demo run, runs/demo, never whichever run is newest
  load_trained_net   the network of the run's final checkpoint, in eval mode
  label_of, cached_full_logits   one val image's label map and its cached full-size logits
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from seglab.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from seglab.config import ConfigError, arch_from_config, load_config
from seglab.data.labels import load_label
from seglab.data.voc import VOCSegmentation
from seglab.densecrf.dense_crf import import_pydensecrf
from seglab.densecrf.params import CRFParams
from seglab.data.logit_cache import LogitCacheError, cache_path, cached_ids, load_logits
from seglab.models import build_model
from seglab.models.resize import full_resolution_logits
from seglab.recipe import explicit_recipe, resolve_recipe

ROOT = Path(__file__).resolve().parents[3]  # the repository
CANDIDATES = 12                            # val images (c) and (d) choose their example from
DEMO_RUN = Path("runs") / "demo"
DEMO_HINT = ("run `python Implementation/train.py --config demo --run-dir runs/demo` first (or "
             "pass --run RUN_DIR)")


class FigureError(RuntimeError):
    """A figure's input is missing or unusable; the message names the file and the fix."""


@dataclasses.dataclass
class Run:
    """What the figures read from a run folder (train.py's layout)."""
    path: Path
    config: dict

    @property
    def split(self) -> str:
        return self.config.get("data", {}).get("val_split", "val")

    @property
    def num_classes(self) -> int:
        return int(self.config.get("data", {}).get("num_classes") or 21)

    @property
    def eval_dir(self) -> Path:
        return self.path / f"eval_{self.split}"

    def model_setting(self, key: str):
        """A model.* setting of the run; a recipe key left at auto (a run written before the
        config was resolved before saving) is resolved as training resolves it."""
        value = self.config["model"][key]
        if value is None or value == "auto":
            arch = dict(arch_from_config(self.config), num_classes=self.num_classes)
            value = resolve_recipe(explicit_recipe(self.config), None, arch)[0][key]
        return value

    def require(self, relative: str, fix: str) -> Path:
        path = self.path / relative
        if not path.exists():
            raise FigureError(f"{path} not found: {fix}")
        return path

    def scores(self, crf: bool = False) -> dict:
        name = "scores_crf.json" if crf else "scores.json"
        fix = (f"evaluate the run with `python Implementation/evaluate.py --checkpoint "
               f"{self.path / 'checkpoints' / 'final.pth'} --split {self.split}"
               f"{' --crf' if crf else ''} --out {self.eval_dir}`")
        return json.loads(self.require(f"{self.eval_dir.name}/{name}", fix).read_text())

    def crf_params(self):
        """The CRF parameters the run's evaluation used, else a best.json of a CRF search in
        the run folder, else the paper's values."""
        path = self.eval_dir / "scores_crf.json"
        if path.is_file():
            params = json.loads(path.read_text()).get("crf_params")
            if params:
                return CRFParams(**params)
        found = sorted(self.path.rglob("best.json"))
        return CRFParams.from_json(found[0]) if found else CRFParams()

    def crf_backend(self) -> str:
        """The backend the run's CRF evaluation used; pydensecrf falls back to the pure-PyTorch
        lattice (same labels) where it is not installed."""
        path = self.eval_dir / "scores_crf.json"
        backend = json.loads(path.read_text()).get("crf_backend") if path.is_file() else None
        if backend in (None, "pydensecrf"):
            return "pydensecrf" if import_pydensecrf() is not None else "torch"
        return backend

    def interp(self) -> str:
        path = self.eval_dir / "scores.json"
        if path.is_file():
            return json.loads(path.read_text()).get("interp") or self.model_setting("interp")
        return self.model_setting("interp")

    def eval_protocol(self) -> tuple[str, int]:
        """(mode, pad_to) the run's evaluation used (its scores.json, else its config)."""
        path = self.eval_dir / "scores.json"
        scores = json.loads(path.read_text()) if path.is_file() else {}
        ev = self.config["eval"]
        return scores.get("mode") or ev["mode"], int(scores.get("pad_to") or ev["pad_to"])

    def data_root(self) -> Path:
        """The data root the run was evaluated on (relative paths: to the current folder, else
        to the repository)."""
        info = self.eval_dir / "config.json"
        root = json.loads(info.read_text()).get("data_root") if info.is_file() else None
        root = Path(root or self.config["data"]["root"])
        for candidate in ([root] if root.is_absolute() else [Path.cwd() / root, ROOT / root]):
            if (candidate / "VOCdevkit" / "VOC2012").is_dir():
                return candidate
        raise FigureError(f"the data of run {self.path} ({root}/VOCdevkit/VOC2012) was not found; "
                          "re-create the demo set with `python Implementation/train.py --config "
                          "demo` or run from the folder the run was made in")

    def val_images(self, limit: int | None = None, with_logits: bool = True) -> list[dict]:
        """[{id, image_path, label_path, logits_path}] of the val images (with cached logits
        only, unless `with_logits` is False), in split order."""
        cache = self.eval_dir / "logits"
        ds = VOCSegmentation(self.data_root(), self.split, num_classes=self.num_classes)
        have = set(ds.ids)
        if with_logits:
            try:
                have = set(cached_ids(cache))
            except LogitCacheError as e:
                raise FigureError(f"{e} (evaluate {self.path / 'checkpoints/final.pth'})") from e
        items = [dict(id=ds.ids[i], image_path=ds.image_path(i), label_path=ds.label_path(i),
                      logits_path=cache_path(cache, ds.ids[i]))
                 for i in range(len(ds)) if ds.ids[i] in have]
        if not items:
            raise FigureError(f"no cached logits of the {self.split} images in {cache}: evaluate "
                              f"the run with `python Implementation/evaluate.py --checkpoint "
                              f"{self.path / 'checkpoints/final.pth'} --out {self.eval_dir}`")
        return items[:limit] if limit else items


def load_run(path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise FigureError(f"run folder {path} not found; {DEMO_HINT}")
    cfg_path = path / "config.yaml"
    try:
        config = load_config(cfg_path) if cfg_path.is_file() else load_config("voc12")
    except ConfigError as e:
        raise FigureError(f"cannot read the run's config: {e}") from e
    return Run(path, config)


def default_run() -> Path:
    """The documented demo run, runs/demo (the README's quickstart writes it), here or in the
    repository: never whichever run happens to be newest."""
    for base in (Path.cwd(), ROOT):
        if (base / DEMO_RUN / "checkpoints" / "final.pth").is_file():
            return base / DEMO_RUN
    raise FigureError(f"no {DEMO_RUN}/checkpoints/final.pth here or in {ROOT}: {DEMO_HINT}")


def load_trained_net(run: Run):
    """(network in eval mode, its input normalisation) from the run's final checkpoint."""
    path = run.require("checkpoints/final.pth", f"train the run to the end; {DEMO_HINT}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise FigureError(str(e)) from e
    net = build_model(ckpt["arch"])
    load_model_weights(net, ckpt, str(path))
    return net.eval(), resolve_recipe({}, ckpt, net.arch)[0]["norm"]


def label_of(item: dict, num_classes: int, size=None) -> np.ndarray:
    return load_label(item["label_path"], image_size=size, num_classes=num_classes)


def cached_full_logits(item: dict, interp: str) -> torch.Tensor:
    logits, input_size, size = load_logits(item["logits_path"])
    return full_resolution_logits(logits, input_size, size, interp)
