"""The CUDA paths, each against the CPU: training (bf16, channels_last), inference (bf16,
channels_last) and the torch dense CRF with its float16 lattice. Skipped without a CUDA device
(CI has none); bench/gpu_check.sh runs them on a lent GPU machine."""
import csv

import numpy as np
import pytest
import torch

import train
from seglab.checkpoint import load_checkpoint
from seglab.densecrf.torch_crf import dense_crf
from seglab.inference.predictor import Predictor
from test_crf_torch import scene
from test_inference import tiny_net
from test_train import tiny_config
from numerics import assert_close_to_scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_in_bf16_channels_last_lowers_the_loss(tmp_path):
    run = tmp_path / "run"
    overrides = ["run.device=cuda", "train.precision=bf16", "train.channels_last=true",
                 "train.iterations=30", "train.checkpoint_every=30"]
    assert train.main(["--config", tiny_config(tmp_path), "--run-dir", str(run)] + overrides) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    with open(run / "log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_on_cuda_matches_the_cpu(precision):
    net = tiny_net(seed=3)
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cpu_labels, cpu_logits = Predictor(net, device="cpu").predict(image)
    labels, logits = Predictor(net, device="cuda", precision=precision).predict(image)
    assert labels.shape == cpu_labels.shape
    if precision == "fp32":
        # cuDNN may pick TF32 convolutions (10-bit mantissa): 1e-3 of the scale
        assert_close_to_scale(logits, cpu_logits, 1e-3)
    assert (labels == cpu_labels).mean() > (0.999 if precision == "fp32" else 0.97)


def test_fp16_lattice_on_cuda_matches_the_cpu():
    img, unary = scene(120, 160, 21, seed=280)
    cpu = dense_crf(img, unary, 10)
    gpu = dense_crf(img, unary, 10, device="cuda", lattice="fp16")
    assert np.isfinite(gpu).all()
    assert (gpu.argmax(0) == cpu.argmax(0)).mean() >= 0.999
