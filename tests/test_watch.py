"""Training you can watch: TensorBoard event files read back with TensorBoard's own reader, equal
to log.csv, with image panels and periodic validation; a resumed run continues the stream."""
import csv

import pytest

import train
from seglab.training import loop
from test_train import tiny_config

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def events(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def log_rows(run):
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_tensorboard_scalars_equal_the_log_and_panels_are_drawn(tmp_path):
    cfg = tiny_config(tmp_path, iterations=2)
    run = tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run), "train.tensorboard=true",
                       "train.preview_every=2", "train.preview_images=2", "train.val_every=1",
                       "train.val_images=1"]) == 0
    acc = events(run)
    tags = acc.Tags()
    assert {"loss/total", "loss/1x", "loss/0.75x", "loss/0.5x", "loss/max", "val/miou",
            "speed/images_per_s"} <= set(tags["scalars"])
    assert any(t.startswith("lr/") for t in tags["scalars"])
    assert len(tags["images"]) == 2 and all(t.startswith("preview/val_") for t in tags["images"])
    image = acc.Images(tags["images"][0])[0]
    assert image.step == 2 and image.width == 3 * 48       # image | truth | prediction
    assert "config" in "".join(tags["tensors"])
    rows = log_rows(run)
    for name, column in (("loss/total", "loss"), ("loss/max", "loss_max"),
                         ("val/miou", "val_miou")):
        logged = [(e.step, e.value) for e in acc.Scalars(name)]
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx([float(r[column]) for r in rows],
                                                       rel=1e-6)   # float32 in the event file
    # the loss logged is the loss trained: the sum of the MSC outputs' losses
    for r in rows:
        parts = sum(float(r[f"loss_{n}"]) for n in ("1x", "0.75x", "0.5x", "max"))
        assert float(r["loss"]) == pytest.approx(parts, rel=1e-12)


def test_a_resumed_run_appends_without_duplicate_steps(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)                             # 6 iterations, checkpoints at 3, 6
    run = tmp_path / "run"
    real, calls = loop.training_loss, {"n": 0}

    def dies_in_iteration_5(*a):                            # like kill -9: no checkpoint at 4
        calls["n"] += 1
        if calls["n"] == 9:                                 # 2 micro-batches per iteration
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(loop, "training_loss", dies_in_iteration_5)
    assert train.main(["--config", cfg, "--run-dir", str(run), "train.tensorboard=true",
                       "train.preview_every=0"]) == 130
    assert [e.step for e in events(run).Scalars("loss/total")] == [1, 2, 3, 4]
    monkeypatch.setattr(loop, "training_loss", real)
    assert train.main(["--resume", str(run)]) == 0
    logged = events(run).Scalars("loss/total")
    assert [e.step for e in logged] == [1, 2, 3, 4, 5, 6]   # 4 from the resumed run, once
    assert [e.value for e in logged] == pytest.approx([float(r["loss"]) for r in log_rows(run)],
                                                      rel=1e-6)
