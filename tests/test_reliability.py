"""Nothing lost, no wrong result in silence, no traceback where a message belongs: the probes of
the reliability review, each re-run as written (tests/test_train.py covers resume after SIGINT
and SIGTERM with trainable BatchNorm)."""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import crf
import evaluate
import infer
import train
from seglab.checkpoint import CheckpointError, atomic_save, load_checkpoint, make_checkpoint
from seglab.config import ConfigError, load_config
from seglab.data.demo import make_demo_dataset
from seglab.data.images import DataError, load_image
from seglab.densecrf.params import CRFParams
from seglab.device import DeviceError, select_device
from seglab.data.logit_cache import save_logits
from seglab.models.deeplabv2 import DeepLabV2

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, **sections):
    cfg = {"data": {"root": str(tmp_path / "demo"), "demo": True, "crop": 33, "workers": 0,
                    "demo_args": {"num_train": 4, "num_val": 2, "size": [40, 48], "seed": 1}},
           "model": {"arch": {"depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": False}},
           "train": {"init": "scratch", "iterations": 2, "effective_batch": 2,
                     "batch_per_step": 2, "base_lr": 0.01, "checkpoint_every": 1},
           "eval": {"after_train": False}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# 1. the demo generator never writes into a folder it did not make -----------------------------

def test_demo_generator_refuses_a_folder_of_someone_elses(tmp_path, capsys):
    mine = tmp_path / "myvoc"
    (mine / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation").mkdir(parents=True)
    lists = mine / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt"
    lists.write_text("my_own_image\n")
    assert train.main(["--config", "demo", f"data.root={mine}", "--run-dir",
                       str(tmp_path / "r")]) == 2
    assert "did not write" in capsys.readouterr().err
    assert lists.read_text() == "my_own_image\n"
    assert sorted(p.name for p in mine.rglob("*")) == ["ImageSets", "Segmentation", "VOC2012",
                                                        "VOCdevkit", "train.txt"]
    # a folder it made itself is its own to rewrite (and so is an old demo set with demo.json)
    make_demo_dataset(tmp_path / "demo", num_train=1, num_val=1, size=(16, 16))
    make_demo_dataset(tmp_path / "demo", num_train=2, num_val=1, size=(16, 16))


# 2, 3. a run folder is never overwritten, and has one writer ------------------------------------

def test_existing_run_folder_is_refused_without_resume_or_force(tmp_path, capsys):
    cfg = tiny(tmp_path)
    run = tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 0
    log = (run / "log.csv").read_text()
    last = (run / "checkpoints" / "last.pth").read_bytes()
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "log.csv").read_text() == log
    assert (run / "checkpoints" / "last.pth").read_bytes() == last
    assert train.main(["--config", cfg, "--run-dir", str(run), "--force"]) == 0


def test_a_second_writer_is_refused_while_the_first_lives_even_after_kill_9(tmp_path, capsys):
    cfg = tiny(tmp_path)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from seglab.training.run_dir import claim_run_dir; lock = claim_run_dir(sys.argv[2]);"
         "print('held', flush=True); time.sleep(60)", str(ROOT / "Implementation"), str(run)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        assert train.main(["--config", cfg, "--run-dir", str(run)]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 0  # the lock died with it
    (run / "checkpoints" / ".last.pth.abc123.tmp").write_bytes(b"half a checkpoint")
    assert train.main(["--resume", str(run), "train.iterations=3"]) == 0
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the orphan was cleaned


# 5. non-finite logits are refused before the CRF --------------------------------------------------

def test_crf_refuses_non_finite_logits_and_names_the_file(tmp_path, capsys):
    root = make_demo_dataset(tmp_path / "demo", num_train=1, num_val=2, size=(24, 32))
    cache = tmp_path / "cache"
    for k, image_id in enumerate(["val_0000", "val_0001"]):
        logits = torch.randn(21, 4, 5)
        if k == 1:
            logits[3, 1, 1] = float("nan")
            logits[0, 2, 2] = float("inf")
        save_logits(cache / f"{image_id}.npz", logits, (33, 33), (24, 32))
    assert crf.main(["apply", "--cache", str(cache), "--data-root", str(root), "--out",
                     str(tmp_path / "out"), "--workers", "1", "--backend", "torch"]) == 1
    failures = (tmp_path / "out" / "failures.txt").read_text()
    assert "val_0001" in failures and "NaN/Inf" in failures and "val_0001.npz" in failures
    assert (tmp_path / "out" / "val_0000.png").is_file()
    assert not (tmp_path / "out" / "val_0001.png").exists()


# 6. + every value typed and ranged up front ---------------------------------------------------------

@pytest.mark.parametrize("override,words", [
    ("train.iterations=2.5", "whole number"), ("train.epochs=-1", ">= 0"),
    ("train.iterations=-5", ">= 0"), ("train.batch_per_step=0", ">= 1"),
    ("train.checkpoint_every=0", ">= 1"), ("train.base_lr=-1", "> 0"),
    ("train.precision=fp16", "fp32, bf16"), ("run.device=gpu", "cuda:N"),
    ("data.crop=big", "number"), ("eval.trimap=[1, -2]", "positive"),
    ("train.base_lr=.nan", "finite"), ("model.msc_scales=0.5", "list"),
])
def test_config_values_are_checked_before_anything_starts(tmp_path, capsys, override, words):
    assert train.main(["--config", tiny(tmp_path), "--run-dir", str(tmp_path / "r"),
                       override]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_overrides_may_come_between_and_after_options(tmp_path):
    assert train.main(["--no-eval", "train.iterations=1", "--config", tiny(tmp_path),
                       "--run-dir", str(tmp_path / "r"), "train.seed=3"]) == 0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["train"]["iterations"] == 1 and saved["train"]["seed"] == 3


# 7. run.device=cuda names its device --------------------------------------------------------------

def test_device_cuda_without_an_index_gets_one(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    assert select_device("cuda") == torch.device("cuda", 0)
    assert select_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert all(d.index is not None for d in chosen)
    with pytest.raises(DeviceError, match="2 CUDA device"):
        select_device("cuda:5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        select_device("cuda")


# bad samples: found up front, or mid-run with a checkpoint ----------------------------------------

def break_sample(root: Path, image_id="train_0001"):
    jpeg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated


def test_a_bad_sample_is_found_before_training_starts(tmp_path, capsys):
    cfg = tiny(tmp_path)
    make_demo_dataset(tmp_path / "demo", num_train=4, num_val=2, size=(40, 48), seed=1)
    break_sample(tmp_path / "demo")
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train_0001.jpg" in err and "1 of 4 samples" in err
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_sample_mid_run_stops_with_a_checkpoint_and_no_traceback(tmp_path, capsys,
                                                                       workers):
    cfg = tiny(tmp_path, train={"iterations": 6, "checkpoint_every": 100},
               data={"check": "never", "workers": workers})
    make_demo_dataset(tmp_path / "demo", num_train=4, num_val=2, size=(40, 48), seed=1)
    break_sample(tmp_path / "demo", "train_0000")
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train_0000.jpg" in err and "--resume" in err
    assert "Traceback" not in err and "DataLoader worker" not in err
    done = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")["iteration"]
    assert 0 <= done < 6


def test_an_empty_split_is_a_message(tmp_path, capsys):
    cfg = tiny(tmp_path)
    root = make_demo_dataset(tmp_path / "demo", num_train=4, num_val=2, size=(40, 48), seed=1)
    lists = root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "train_aug.txt").write_text("")
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "r")]) == 2
    assert "empty" in capsys.readouterr().err
    net = DeepLabV2(num_classes=21, depth=14, width=8, rates=(1, 2))
    ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp_path / "c.pth")
    (lists / "val.txt").write_text("")
    assert evaluate.main(["--checkpoint", str(ckpt), f"data.root={root}"]) == 2
    assert "empty" in capsys.readouterr().err


# weights files: clear messages, never the advice to turn weights_only off -----------------------

class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/seglab_pwned",))


@pytest.mark.parametrize("content", ["empty", "random", "pickle"])
def test_bad_weight_files_get_our_message(tmp_path, capsys, content):
    path = tmp_path / "weights.pth"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=False" not in message
    assert message.rstrip().endswith(".") and ": ." not in message
    assert not Path("/tmp/seglab_pwned").exists()
    images = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images)
    assert infer.main(["--checkpoint", str(path), str(images), "--out",
                       str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert train.main(["--config", tiny(tmp_path), "--run-dir", str(tmp_path / "r"),
                       f"--init=imagenet={path}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "weights_only=False" not in err and "Traceback" not in err


def test_a_full_disk_during_a_checkpoint_says_what_and_where(tmp_path, monkeypatch):
    def no_space(obj, f, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")
    monkeypatch.setattr(torch, "save", no_space)
    target = tmp_path / "ck" / "last.pth"
    with pytest.raises(CheckpointError) as info:
        atomic_save({"a": 1}, target)
    assert str(target) in str(info.value) and "disk" in str(info.value)
    assert not list(target.parent.glob(".*.tmp")) and not target.exists()


def test_outputs_that_cannot_be_written_are_a_message(tmp_path, capsys):
    net = DeepLabV2(num_classes=21, depth=14, width=8, rates=(1, 2))
    ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp_path / "c.pth")
    root = make_demo_dataset(tmp_path / "demo", num_train=1, num_val=1, size=(24, 32))
    taken = tmp_path / "file"
    taken.write_text("x")
    assert evaluate.main(["--checkpoint", str(ckpt), f"data.root={root}", "--out",
                          str(taken)]) == 2
    assert infer.main(["--checkpoint", str(ckpt), str(root), "--out", str(taken)]) == 2
    assert train.main(["--config", tiny(tmp_path), "--run-dir", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count(str(taken)) >= 3 and "Traceback" not in err


# CRF parameter files: every field typed ------------------------------------------------------------

@pytest.mark.parametrize("value,words", [('"4"', "bi_w"), ("null", "bi_w"),
                                         ("Infinity", "bi_w"), ("true", "bi_w")])
def test_crf_parameter_files_name_the_bad_field(tmp_path, value, words):
    path = tmp_path / "p.json"
    path.write_text('{"bi_w": %s}' % value)
    with pytest.raises(ValueError, match=words):
        CRFParams.from_json(path)


# large photos: bounded memory, clear refusal beyond PIL's guard -------------------------------------

def test_a_large_photo_runs_at_a_capped_size_with_full_size_labels(tmp_path):
    net = DeepLabV2(num_classes=21, depth=14, width=8, rates=(1, 2))
    ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp_path / "c.pth")
    photo = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1300, 3), np.uint8)).save(photo)
    assert infer.main(["--checkpoint", str(ckpt), str(photo), "--out", str(tmp_path / "o"),
                       "--max-side", "257", "--pad-to", "257", "model.msc_scales=[]"]) == 0
    labels = Image.open(tmp_path / "o" / "pred" / "big.png")
    assert labels.size == (1300, 900)


def test_an_image_beyond_pils_guard_gets_a_message_not_corrupt(tmp_path, monkeypatch):
    photo = tmp_path / "huge.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(photo)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="too large to open safely"):
        load_image(photo)
