"""The model seam: a toy architecture registered in a few lines runs through train.py and
evaluate.py (MSC, CRF) end to end, and the catalogue lists every architecture."""
import json

import pytest
import torch
import torch.nn as nn
import yaml

import evaluate
import model
import train
from seglab.checkpoint import load_checkpoint
from seglab.inference.predictor import Predictor
from seglab.models import ARCHITECTURES
from seglab.models.spec import Architecture, simple_param_groups


class Toy(nn.Module):
    """Two convolutions, output stride 4."""

    def __init__(self, num_classes: int = 21, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 5, stride=4, padding=2), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.body(x))


TOY = Architecture(name="toy", build=Toy, summary="a toy", input_norm="imagenet",
                   output_stride=lambda arch: 4,
                   param_groups=lambda net, lr, wd: simple_param_groups(
                       net, lr, wd, head_prefixes=("classifier.",), head_lr_mult=10))


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "toy", TOY)


def config(tmp_path, **model):
    cfg = {"data": {"root": str(tmp_path / "demo"), "demo": True, "crop": 33, "workers": 0,
                    "demo_args": {"num_train": 6, "num_val": 2, "size": [40, 48], "seed": 1}},
           "model": dict({"name": "toy", "arch": {"width": 6}}, **model),
           "train": {"init": "scratch", "iterations": 30, "effective_batch": 2,
                     "batch_per_step": 2, "base_lr": 0.02, "checkpoint_every": 30},
           "eval": {"pad_to": 49},
           "crf": {"workers": 1, "iterations": 2},
           "run": {"out": str(tmp_path / "runs")}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("msc_scales", [[0.75, 0.5], []])
def test_a_toy_architecture_trains_and_evaluates_through_the_scripts(toy, tmp_path, msc_scales):
    cfg = config(tmp_path, msc_scales=msc_scales)
    run = tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert ckpt["arch"] == {"name": "toy", "num_classes": 21, "width": 6}
    assert ckpt["input_norm"] == "imagenet"  # the architecture's, through data.norm=auto
    with open(run / "log.csv") as f:
        losses = [float(line.split(",")[2]) for line in f.readlines()[1:]]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # it learned
    scores = json.loads((run / "eval_val" / "scores_crf.json").read_text())
    assert scores["num_images"] == 2 and 0 < scores["miou"] <= 1
    assert scores["msc_scales"] == msc_scales
    # evaluate.py on its own, from the checkpoint alone
    out = tmp_path / "again"
    assert evaluate.main(["--checkpoint", str(run / "checkpoints" / "final.pth"), "--config", cfg,
                          "--out", str(out), "--crf"]) == 0
    again = json.loads((out / "scores_crf.json").read_text())
    assert again["miou"] == pytest.approx(scores["miou"])
    predictor = Predictor(run / "checkpoints" / "final.pth", device="cpu")
    assert predictor.output_stride == 4 and predictor.norm == "imagenet"
    assert predictor.logits(torch.zeros(3, 49, 49)).shape[-2:] == (13, 13)


def test_an_unknown_architecture_or_option_is_a_clear_error(toy, tmp_path, capsys):
    cfg = config(tmp_path)
    assert train.main(["--config", cfg, "model.name=nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert train.main(["--config", cfg, "model.arch.depth=50"]) == 2
    assert "no option(s) ['depth']" in capsys.readouterr().err


def test_the_catalogue_lists_every_architecture(toy, capsys):
    assert model.main([]) == 0
    out = capsys.readouterr().out
    assert "deeplabv2" in out and "44,048,532" in out and "toy" in out
    rows = {r["name"]: r for r in model.catalogue()}
    assert rows["toy"]["parameters"] == 3 * 8 * 25 + 8 + 8 * 21 + 21
    assert rows["toy"]["output_stride"] == 4 and rows["deeplabv2"]["output_stride"] == 8
    assert rows["deeplabv2"]["input_norm"] == "caffe"
