"""Fine-tuning without forgetting (seglab/training/distill.py): the distillation term against a
reference written another way, the teacher is the class-mapped init (zero term before the first
step), the logged total is the trained one, and a distilling run resumes bit-identically."""
import csv
import os
import signal

import pytest
import torch
import torch.nn.functional as F
import yaml

import train
from seglab.checkpoint import load_checkpoint
from seglab.training import loop
from seglab.training.distill import distillation_loss, known_classes
from test_finetune import old_checkpoint
from test_recipe import folder_dataset


def test_the_term_is_t_squared_times_the_kl_divergence_over_the_kept_classes():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5, 6) * 3, torch.randn(2, 4, 5, 6) * 3
    kept, t = [0, 2, 3], 2.0
    # a reference written another way: torch's kl_div on the renormalised kept classes
    log_s = F.log_softmax(student[:, kept] / t, 1)
    log_t = F.log_softmax(teacher[:, kept] / t, 1)
    want = t * t * F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(1).mean()
    got = distillation_loss(student, teacher, kept, t)
    assert torch.allclose(got, want, rtol=1e-5)
    # a class outside the kept ones does not count; the same scores cost nothing
    other = student.clone()
    other[:, 1] += 100
    assert torch.allclose(distillation_loss(other, teacher, kept, t), got, rtol=1e-5)
    assert distillation_loss(teacher, teacher, kept, t).abs() < 1e-6
    # a coarser teacher is resized to the student's grid
    assert distillation_loss(student, teacher[..., ::2, ::2], kept, t).isfinite()


def test_only_classes_that_start_from_old_rows_are_kept():
    cfg = {"train": {"init_classes": {}}}
    data = type("D", (), {"class_names": ["background", "widget", "gizmo"]})()
    ckpt = {"classes": ["background", "widget", "thing"], "arch": {"num_classes": 3}}
    assert known_classes(cfg, data, ckpt) == [0, 1]                  # gizmo: a fresh row
    assert known_classes({"train": {"init_classes": {"gizmo": ["thing"]}}}, data, ckpt) == [0, 1, 2]
    assert known_classes(cfg, data, None) == []                       # scratch / ImageNet
    same = {"classes": ["background", "widget", "gizmo"], "arch": {"num_classes": 3}}
    assert known_classes(cfg, data, same) == []                       # a continuation


def command(tmp_path, run, *extra):
    root = tmp_path / "my_data"
    if not root.is_dir():
        folder_dataset(root)
        old_checkpoint(tmp_path / "old.pth", classes=["background", "widget", "thing"])
    return ["--config", "folder", f"data.root={root}", "--init", str(tmp_path / "old.pth"),
            "--init-class", "gizmo=thing", "--run-dir", str(tmp_path / run),
            "train.effective_batch=2", "train.batch_per_step=2", "data.crop=33",
            "data.workers=0", "--no-eval", *extra]


def rows(run):
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_a_class_mapped_fine_tune_distils_from_its_init_and_logs_what_it_trains(tmp_path, capsys):
    assert train.main(command(tmp_path, "run", "train.iterations=3")) == 0
    err = capsys.readouterr().err
    assert "distillation from the class-mapped init" in err and "background, widget, gizmo" in err
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["train"]["distill"] == 1.0                     # resolved, not "auto"
    log = rows(tmp_path / "run")
    parts = [k for k in log[0] if k.startswith("loss_")]
    assert parts == ["loss_1x", "loss_0.75x", "loss_0.5x", "loss_max", "loss_distill"]
    # before the first step the network is its teacher: nothing to distil (MSC's 1x branch
    # in training mode against the bare network in eval mode; BatchNorm frozen)
    assert float(log[0]["loss_distill"]) < 1e-6
    assert float(log[-1]["loss_distill"]) > 0                 # then it moved, and is held back
    for row in log:                                           # every weight 1: the plain sum
        assert float(row["loss"]) == pytest.approx(sum(float(row[k]) for k in parts), rel=1e-9)
    # off: no teacher, no column
    assert train.main(command(tmp_path, "off", "train.iterations=1", "train.distill=0")) == 0
    assert "loss_distill" not in rows(tmp_path / "off")[0]
    assert yaml.safe_load((tmp_path / "off" / "config.yaml").read_text())["train"]["distill"] == 0


def test_distilling_without_a_teacher_is_an_error(tmp_path, capsys):
    root = folder_dataset(tmp_path / "my_data")
    assert train.main(["--config", "folder", f"data.root={root}", "--init", "scratch",
                       "--run-dir", str(tmp_path / "r"), "train.distill=1", "data.workers=0",
                       "model.arch.depth=14", "model.arch.width=8"]) == 2
    assert "train.distill=1 needs a teacher" in capsys.readouterr().err


def test_a_distilling_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The teacher is rebuilt from train.init at resume without drawing from the global RNG:
    interrupted after iteration 2 and resumed, the run ends bit-identical."""
    assert train.main(command(tmp_path, "full", "train.iterations=4")) == 0
    real = loop.training_loss
    calls = {"n": 0}

    def stop_in_iteration_3(*args, **kwargs):
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        calls["n"] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "training_loss", stop_in_iteration_3)
    assert train.main(command(tmp_path, "cut", "train.iterations=4")) == 143
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pth")["iteration"] == 3
    monkeypatch.setattr(loop, "training_loss", real)
    assert train.main(["--resume", str(tmp_path / "cut"), "--no-eval"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "final.pth")["model"]
    resumed = load_checkpoint(tmp_path / "cut" / "checkpoints" / "final.pth")["model"]
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [r["loss_distill"] for r in rows(tmp_path / "cut")] == \
        [r["loss_distill"] for r in rows(tmp_path / "full")]
