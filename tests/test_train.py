"""Stage one: loss targets, poly lr, accumulation, exact resume, DDP equivalence, errors."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from seglab.training import schedule
import train
from seglab.training import loop
from seglab.checkpoint import CheckpointError, load_checkpoint
from seglab.training.loss import caffe_targets, msc_loss, nearest_targets
from seglab.models.msc import MSC
from seglab.models import param_groups
from seglab.models.deeplabv2 import DeepLabV2
from numerics import DEEP, assert_close_to_scale

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **train_over):
    """A tiny but complete recipe: synthetic demo data, ResNet-14 of width 8, crop 33."""
    cfg = {
        "data": {"root": str(tmp_path / "demo"), "demo": True, "crop": 33, "workers": 0,
                 "demo_args": {"num_train": 6, "num_val": 2, "size": [40, 48], "seed": 1}},
        "model": {"arch": {"depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": False}},
        "train": {"init": "scratch", "iterations": 6, "effective_batch": 2, "batch_per_step": 1,
                  "base_lr": 0.01, "checkpoint_every": 3, **train_over},
        "eval": {"after_train": False},
        "run": {"out": str(tmp_path / "runs")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def final_weights(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / "final.pth")["model"]


# --- loss targets ---------------------------------------------------------------------------

def test_caffe_label_subsampling_picks_every_8th_and_16th_pixel():
    label = torch.arange(321 * 321).reshape(1, 321, 321) % 21
    base = (41, 41)
    lg, tg = caffe_targets(label, torch.zeros(1, 21, 41, 41), base, "caffe")
    assert torch.equal(tg, label[:, ::8, ::8]) and tg[0, 1, 1] == label[0, 8, 8]
    lg, tg = caffe_targets(label, torch.zeros(1, 21, 21, 21), base, "caffe")
    assert torch.equal(tg, label[:, ::16, ::16])
    # 0.75x: logits 31x31 are upsampled to 41x41 (Caffe Interp), targets label[::8, ::8]
    small = torch.randn(1, 21, 31, 31)
    lg, tg = caffe_targets(label, small, base, "caffe")
    assert lg.shape[-2:] == (41, 41) and torch.equal(tg, label[:, ::8, ::8])
    assert torch.allclose(lg[..., 0, 0], small[..., 0, 0]) and torch.allclose(lg[..., -1, -1], small[..., -1, -1])
    with pytest.raises(ValueError, match="8k\\+1"):
        # an even crop: 320 gives 41x41 logits, but label[::8, ::8] is 40x40
        caffe_targets(torch.zeros(1, 320, 320, dtype=torch.long), torch.zeros(1, 21, 41, 41), (41, 41), "caffe")


def test_nearest_targets_resize_like_pil():
    from PIL import Image
    import numpy as np
    label = torch.randint(0, 21, (1, 50, 50))
    _, tg = nearest_targets(label, torch.zeros(1, 21, 13, 17))
    pil = np.array(Image.fromarray(label[0].numpy().astype("uint8")).resize((17, 13), Image.NEAREST))
    assert torch.equal(tg[0], torch.from_numpy(pil).long())


def test_loss_ignores_255_and_averages_per_image():
    logits = torch.randn(2, 3, 5, 5)
    label = torch.randint(0, 3, (2, 5, 5))
    label[0, :4] = 255  # image 0 has only 5 valid pixels
    total, parts = msc_loss([logits], label, "nearest")
    ref = torch.stack([torch.nn.functional.cross_entropy(logits[i:i + 1], label[i:i + 1], ignore_index=255)
                       for i in range(2)]).mean()
    assert torch.allclose(total, ref)


# --- optimisation -----------------------------------------------------------------------------

def test_poly_lr_of_every_group():
    """Known values of lr = 1e-3 x mult x (1 - it/20000)^0.9, computed beforehand (bc -l):
    it 5000: 0.75^0.9 = 0.771890...; it 10000: 0.5^0.9 = 0.535887...; it 19999: 0.00005^0.9."""
    net = DeepLabV2(num_classes=3, depth=14, width=8)
    opt = torch.optim.SGD(param_groups(net, 1e-3, 5e-4), lr=1e-3, momentum=0.9)
    mult = {"backbone": 1, "aspp_weight": 10, "aspp_bias": 20}
    known = {0: 1e-3, 5000: 7.71890e-4, 10000: 5.35887e-4, 19999: 1.34609e-7}
    for it, lr in known.items():
        schedule.set_poly_lr(opt, 1e-3, it, 20000, 0.9)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(lr * mult[g["name"]], rel=1e-4), (it, g["name"])
    assert schedule.poly_lr(1e-3, 0, 100) == 1e-3 and schedule.poly_lr(1e-3, 100, 100) == 0


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = MSC(DeepLabV2(num_classes=4, depth=14, width=8)).train()  # frozen BN
    x = torch.randn(4, 3, 33, 33)
    y = torch.randint(0, 4, (4, 33, 33))
    y[1, :10] = 255

    def grads(chunks):
        model.zero_grad()
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks)):
            (msc_loss(model(xc), yc)[0] / chunks).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    for a, b in zip(grads(1), grads(2)):
        assert_close_to_scale(a, b, DEEP, what="gradient")


def test_overfitting_a_tiny_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model = MSC(DeepLabV2(num_classes=3, depth=14, width=8, rates=(1, 2), frozen_bn=False)).train()
    x = torch.randn(2, 3, 33, 33)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    opt = torch.optim.SGD(param_groups(model, 0.01, 0), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = msc_loss(model(x), y)[0]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --- the whole script: resume, DDP, errors ------------------------------------------------------

@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, signum, status):
    """A real signal arrives during iteration 4 (BatchNorm trainable, so a checkpoint taken in
    the middle of a forward pass would carry half-updated running statistics): the iteration
    finishes, the checkpoint holds iteration 4 exactly, and the resumed run ends bit-identical
    to an uninterrupted one."""
    cfg = tiny_config(tmp_path)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "full")]) == 0
    reference = final_weights(tmp_path / "full")

    real = loop.training_loss

    def signal_in_iteration_4(outputs, label, *a):
        if loop_state["calls"] == 6:  # 2 micro-batches per iteration: iteration 4's first
            os.kill(os.getpid(), signum)
        loop_state["calls"] += 1
        return real(outputs, label, *a)

    loop_state = {"calls": 0}
    monkeypatch.setattr(loop, "training_loss", signal_in_iteration_4)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "cut")]) == status
    last = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pth")
    assert last["iteration"] == 4
    assert last["model"]["backbone.conv1.bn.num_batches_tracked"].item() == 4 * 2 * 3  # x3 MSC
    monkeypatch.setattr(loop, "training_loss", real)
    assert train.main(["--resume", str(tmp_path / "cut")]) == 0
    resumed = final_weights(tmp_path / "cut")
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    with open(tmp_path / "cut" / "log.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]


def test_two_process_gloo_matches_single_process(tmp_path):
    cfg = tiny_config(tmp_path)
    over = ["model.arch.frozen_bn=true", "train.effective_batch=2", "train.iterations=3"]
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "one"), "train.batch_per_step=2", *over]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "Implementation")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "Implementation" / "train.py"), "--config", cfg, "--run-dir", str(tmp_path / "two"),
           "train.batch_per_step=1", *over]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for k in one:
        assert_close_to_scale(one[k].float(), two[k].float(), DEEP, what=k)
    torch.manual_seed(0)  # train.py seeds with train.seed=0 before building the model
    init = DeepLabV2(num_classes=21, depth=14, width=8, rates=(1, 2)).state_dict()
    assert not torch.allclose(init["aspp.c0.weight"], one["aspp.c0.weight"])  # it did train


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    code = train.main(["--config", cfg, "data.demo=false", f"data.root={tmp_path / 'nowhere'}",
                       "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "download" in err


def test_missing_resume_path_is_an_error_not_a_restart(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "no-such-run" in err and "last.pth" in err
    assert not (tmp_path / "no-such-run").exists()


def test_resume_with_another_architecture_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path, iterations=3)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "a")]) == 0
    assert train.main(["--resume", str(tmp_path / "a"), "model.arch.width=16"]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path, checkpoint_every=1)
    calls = {"n": 0}
    real = loop.training_loss

    def poisoned(outputs, *a):
        calls["n"] += 1
        total, parts = real(outputs, *a)
        if calls["n"] > 4:  # iteration 3 (2 micro-steps per iteration)
            total = total * float("nan")
            parts = [p * float("nan") for p in parts]
        return total, parts

    monkeypatch.setattr(loop, "training_loss", poisoned)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "r")]) == 2
    assert "non-finite loss" in capsys.readouterr().err
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")
    assert last["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_checkpoint_contents(tmp_path):
    cfg = tiny_config(tmp_path, iterations=3)
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "r")]) == 0
    ck = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")
    assert ck["iteration"] == 3 and ck["trained_on"] == "train_aug"
    assert {"optimizer", "rng", "config", "arch", "model"} <= set(ck)
    assert (tmp_path / "r" / "config.yaml").is_file()
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["model"]["arch"]["depth"] == 14
    with pytest.raises(CheckpointError, match="weights-only"):
        from seglab.training.state import load_training_checkpoint
        load_training_checkpoint(tmp_path / "r" / "checkpoints" / "final.pth")
