"""Watching a run while it trains: TensorBoard (train.tensorboard) and periodic validation
(train.val_every).

    tensorboard --logdir runs/NAME/tensorboard

RUN/tensorboard/ holds, when train.tensorboard is on:
  loss/total, loss/<output>   every iteration: the loss as trained and each term of it (the MSC
                              branches 1x, 0.75x, 0.5x, max; or out and aux), equal to log.csv
  lr/<group>                  the learning rate of each parameter group (backbone, ASPP weights
                              and biases at their 1x/10x/20x, ...)
  speed/images_per_s          as log.csv; memory/peak_gib on CUDA (torch.cuda.max_memory_allocated)
  val/miou                    with train.val_every: mIoU on the val split (or its first
                              train.val_images images), also written to log.csv's val_miou
  preview/<id>                every train.preview_every iterations: image | ground truth |
                              prediction, drawn in the data set's own colours, for a fixed panel
                              of val images (the first train.preview_images of the split)
  config                      the resolved config, as text
A resumed run writes to the same folder and purges the events past its checkpoint
(SummaryWriter's purge_step), so no step appears twice.

Validation is off by default, as in the paper's recipe: DeepLab v2 trains a fixed 20,000
iterations and reports the final model. Selecting a checkpoint by its val score and then
reporting that score on the same val split (as some reimplementations do) turns val into
training data for model selection and reports an optimistic number; watch val here to see a
run go wrong, not to pick the best iteration.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from seglab.data.images import DataError, load_image
from seglab.data.labels import IGNORE, full_palette
from seglab.data.registry import dataset_class
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.inference.predictor import Predictor
from seglab.models import unwrap


class Watch:
    """What train.py writes besides log.csv; a no-op for every part that is off."""

    def __init__(self, cfg: dict, run_dir: Path, start: int, device):
        t = cfg["train"]
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), device
        self.preview_every, self.val_every = t["preview_every"], t["val_every"]
        self.writer = None
        if t["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is in requirements.txt; say how if absent
                raise RuntimeError(f"train.tensorboard=true needs the tensorboard package "
                                   f"(`pip install tensorboard`): {e}") from None
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=start + 1 if start else None)
            if not start:
                text = yaml.safe_dump(cfg, sort_keys=False)
                self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)
        self._panel = None

    @property
    def validates(self) -> bool:
        return self.val_every > 0

    def iteration(self, it: int, row: dict, names, optimizer, model) -> None:
        """After iteration `it` (1-based, as log.csv): scalars, then a preview or a validation
        when one is due (which may add val_miou to `row` before log.csv gets it)."""
        if self.validates and it % self.val_every == 0:
            row["val_miou"] = self.validate(it, model)
        if self.writer is None:
            return
        w = self.writer
        w.add_scalar("loss/total", row["loss"], it)
        for name in names:
            w.add_scalar(f"loss/{name}", row[f"loss_{name}"], it)
        for k, group in enumerate(optimizer.param_groups):
            w.add_scalar(f"lr/{group.get('name', k)}", group["lr"], it)
        w.add_scalar("speed/images_per_s", row["images_per_s"], it)
        if self.device.type == "cuda":
            w.add_scalar("memory/peak_gib", torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
                          it)
        if row.get("val_miou") is not None:
            w.add_scalar("val/miou", row["val_miou"], it)
        if self.preview_every and it % self.preview_every == 0:
            self.preview(it, model)

    def predictor(self, model):
        """The network as it is now, ready for inference with the run's recipe (a copy: the
        model being trained is untouched)."""
        m, e = self.cfg["model"], self.cfg["eval"]
        return Predictor(unwrap(model), device=self.device, msc_scales=tuple(m["msc_scales"]),
                         interp=m["interp"], norm=self.cfg["data"]["norm"],
                         msc_fusion=e["msc_fusion"], mode=e["mode"], pad_to=e["pad_to"])

    def panel_images(self):
        """The fixed preview panel: (id, RGB image, label) of the first val images."""
        if self._panel is None:
            d = self.cfg["data"]
            ds = dataset_class(d["dataset"])(d["root"], d["val_split"],
                                             num_classes=d["num_classes"])
            self._panel = [(ds.ids[i], load_image(ds.image_path(i)), ds.load_label(i))
                           for i in range(min(len(ds), self.cfg["train"]["preview_images"]))]
            self._palette = ds.palette
        return self._panel

    def preview(self, it: int, model) -> None:
        """image | ground truth | prediction for each panel image, in the data set's colours."""
        try:
            panel = self.panel_images()
        except (DataError, OSError) as e:  # no val split: say so once, keep training
            print(f"note: no preview panel ({e})", file=sys.stderr)
            self.preview_every = 0
            return
        predictor = self.predictor(model)
        colour = full_palette(self._palette[:self.cfg["data"]["num_classes"]])
        for image_id, image, label in panel:
            labels, _ = predictor.predict(image)
            truth = colour[np.where(label == IGNORE, IGNORE, label)]
            strip = np.concatenate([image, truth, colour[labels]], axis=1)
            self.writer.add_image(f"preview/{image_id}", strip, it, dataformats="HWC")
        model.train()

    def validate(self, it: int, model) -> float:
        """mIoU of the network as it is now on the val split (or its first train.val_images)."""
        settings = EvalSettings.from_config(self.cfg)
        settings.crf, settings.save_predictions, settings.recompute = False, False, True
        settings.limit = self.cfg["train"]["val_images"] or None
        scores = evaluate(self.predictor(model), settings,
                          out_dir=self.run_dir / "val_during_training", show_progress=False)
        model.train()
        print(f"\niteration {it}: val mIoU {100 * scores['miou']:.2f}", file=sys.stderr)
        return float(scores["miou"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
