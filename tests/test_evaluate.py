"""evaluate.py on a tiny synthetic VOC-layout set: scores agree with the saved predictions, the
logit cache is reused (and refused when another checkpoint made it), the CRF pass, the
trained-on warning and the command line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as ev
from seglab.evaluation.evaluate import EvalSettings, EvaluationError, default_out_dir, evaluate
from seglab.inference import predictor as inference
from seglab.checkpoint import atomic_save, make_checkpoint
from seglab.data.demo import make_demo_dataset
from seglab.data.images import load_image
from seglab.data.logit_cache import load_logits
from seglab.models.deeplabv2 import DeepLabV2

NUM_CLASSES = 5
VAL_IDS = ["val_0000", "val_0001", "val_0002"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=2, num_val=3,
                             size=(48, 64), classes=(1, 2, 3, 4))


def tiny_checkpoint(path, seed=0, **extra):
    torch.manual_seed(seed)
    net = DeepLabV2(num_classes=NUM_CLASSES, depth=14, width=8)
    with torch.no_grad():  # spread the predictions over several classes
        for conv in net.aspp.branches():
            conv.weight.mul_(300)
    return atomic_save(make_checkpoint(net.arch, net.state_dict(), **extra), path)


@pytest.fixture
def checkpoint(tmp_path):
    return tiny_checkpoint(tmp_path / "run" / "checkpoints" / "final.pth", trained_on="train_aug")


@pytest.fixture
def count_forwards(monkeypatch):
    """Counts the images that go through the network."""
    calls = []
    original = inference.Predictor.logits

    def counting(self, image):
        calls.append(tuple(image.shape))
        return original(self, image)
    monkeypatch.setattr(inference.Predictor, "logits", counting)
    return calls


def run(checkpoint, data_root, out, **kw):
    settings = EvalSettings(**dict(dict(data_root=str(data_root), split="val", pad_to=65,
                                        num_classes=NUM_CLASSES), **kw))
    return evaluate(checkpoint, settings, out_dir=out, show_progress=False)


def voc_file(root, folder, image_id, ext):
    return root / "VOCdevkit" / "VOC2012" / folder / f"{image_id}.{ext}"


def iou_from_files(pred_dir, root):
    """mIoU and pixel accuracy recomputed from the PNGs, without metrics.py."""
    inter, union, correct, total = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES), 0, 0
    for image_id in VAL_IDS:
        pred = np.array(Image.open(pred_dir / f"{image_id}.png"))
        gt = np.array(Image.open(voc_file(root, "SegmentationClass", image_id, "png")))
        valid = gt != 255
        correct += int((pred[valid] == gt[valid]).sum())
        total += int(valid.sum())
        for c in range(NUM_CLASSES):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    return (inter[present] / union[present]).mean(), correct / total


def test_scores_match_the_saved_predictions(tmp_path, checkpoint, data_root, capsys):
    out = tmp_path / "eval"
    scores = run(checkpoint, data_root, out)
    for name in ("scores.json", "per_class.txt", "config.json", "logits/cache.json"):
        assert (out / name).is_file(), name
    assert sorted(p.stem for p in (out / "logits").glob("*.npz")) == VAL_IDS
    saved = json.loads((out / "scores.json").read_text())
    assert saved["miou"] == pytest.approx(scores["miou"], abs=1e-12)
    assert saved["num_images"] == 3 and saved["split"] == "val" and saved["mode"] == "voc"
    miou, acc = iou_from_files(out / "pred", data_root)
    assert scores["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    assert 0 < scores["miou"] < 1
    printed = capsys.readouterr().out
    assert f"mIoU (no CRF): {100 * scores['miou']:.2f}%" in printed and "background" in printed
    # the saved labels are the predictor's, from the raw image (float16 cache: ties may differ)
    predictor = inference.Predictor(checkpoint, device="cpu")
    image_id = VAL_IDS[0]
    expect, _ = predictor.predict(load_image(voc_file(data_root, "JPEGImages", image_id, "jpg")),
                                  pad_to=65)
    pred = np.array(Image.open(out / "pred" / f"{image_id}.png"))
    assert pred.shape == (48, 64) and (pred == expect).mean() > 0.99
    logits, input_size, size = load_logits(out / "logits" / f"{image_id}.npz")
    assert logits.shape == (NUM_CLASSES, 9, 9) and input_size == (65, 65) and size == (48, 64)


def test_cached_logits_are_reused(tmp_path, checkpoint, data_root, count_forwards):
    out = tmp_path / "eval"
    first = run(checkpoint, data_root, out)
    assert len(count_forwards) == 3
    second = run(checkpoint, data_root, out)
    assert len(count_forwards) == 3  # no network pass the second time
    assert second["miou"] == first["miou"] and second["iou"] == first["iou"]
    assert second["network_images"] == 0
    run(checkpoint, data_root, out, recompute=True)
    assert len(count_forwards) == 6
    # a corrupt cache file is recomputed, the others are kept
    (out / "logits" / "val_0001.npz").write_bytes(b"garbage")
    third = run(checkpoint, data_root, out)
    assert len(count_forwards) == 7 and third["miou"] == first["miou"]


def test_cache_of_another_checkpoint_is_recomputed(tmp_path, checkpoint, data_root,
                                                   count_forwards, capsys):
    out = tmp_path / "eval"
    run(checkpoint, data_root, out)
    other = tiny_checkpoint(tmp_path / "other.pth", seed=1)
    scores = run(other, data_root, out)
    assert len(count_forwards) == 6
    assert "another checkpoint" in capsys.readouterr().err
    cached, _, _ = load_logits(out / "logits" / "val_0002.npz")
    x = inference.Predictor(other, device="cpu").transform("voc", 65).prepare(
        load_image(voc_file(data_root, "JPEGImages", "val_0002", "jpg")))[0]
    fresh = inference.Predictor(other, device="cpu").logits(x)
    torch.testing.assert_close(cached, fresh.half().float())
    assert json.loads((out / "logits" / "cache.json").read_text())["identity"] == \
        scores["identity"]
    # other settings (the full-image protocol) invalidate it too
    before = len(count_forwards)
    run(other, data_root, out, mode="full")
    assert len(count_forwards) == before + 3


def test_crf_scores(tmp_path, checkpoint, data_root):
    out = tmp_path / "eval"
    scores = run(checkpoint, data_root, out, crf=True, crf_workers=1, trimap_widths=(1, 3))
    saved = json.loads((out / "scores_crf.json").read_text())
    assert saved["miou"] == pytest.approx(scores["crf"]["miou"], abs=1e-12)
    miou, acc = iou_from_files(out / "pred_crf", data_root)
    assert scores["crf"]["miou"] == pytest.approx(miou, abs=1e-12)
    assert scores["crf"]["pixel_acc"] == pytest.approx(acc, abs=1e-12)
    assert saved["crf_params"]["bi_w"] == 4.0 and saved["crf_params"]["iterations"] == 10
    assert set(saved["trimap"]) == {"1", "3"}
    assert json.loads((out / "scores.json").read_text())["trimap"]["3"]["pixels"] > \
        saved["trimap"]["1"]["pixels"] > 0
    assert "with the dense CRF" in (out / "per_class.txt").read_text()


def test_trained_on_warning(tmp_path, data_root, capsys):
    bad = tiny_checkpoint(tmp_path / "trainval.pth", trained_on="trainval")
    run(bad, data_root, tmp_path / "a", limit=1)
    assert "WARNING" in capsys.readouterr().err
    good = tiny_checkpoint(tmp_path / "aug.pth", trained_on="train_aug")
    run(good, data_root, tmp_path / "b", limit=1)
    assert "WARNING" not in capsys.readouterr().err


def test_in_memory_model_and_limit(tmp_path, data_root):
    torch.manual_seed(0)
    net = DeepLabV2(num_classes=NUM_CLASSES, depth=14, width=8)
    with pytest.raises(ValueError, match="out_dir"):
        evaluate(net, EvalSettings(data_root=str(data_root), num_classes=NUM_CLASSES))
    scores = run(net, data_root, tmp_path / "e", limit=2, save_predictions=False)
    assert scores["num_images"] == 2 and scores["checkpoint"] == "in-memory model"
    assert not (tmp_path / "e" / "pred").exists()
    with pytest.raises(EvaluationError, match="num_classes"):
        run(net, data_root, tmp_path / "f", num_classes=21)


def test_command_line(tmp_path, checkpoint, data_root, capsys):
    args = ["--checkpoint", str(checkpoint), "--data-root", str(data_root), "--pad-to", "65",
            "--num-classes", str(NUM_CLASSES), "--limit", "2", "--full-image"]
    assert ev.main(args) == 0
    out = checkpoint.parent.parent / "eval_val"  # default: beside the run's checkpoints/
    scores = json.loads((out / "scores.json").read_text())
    assert scores["num_images"] == 2 and scores["mode"] == "full"
    config = json.loads((out / "config.json").read_text())
    assert config["split"] == "val" and config["pad_to"] == 65 and config["limit"] == 2
    assert ev.main(args[:-3] + ["--num-classes", "21"]) == 2
    assert "num_classes" in capsys.readouterr().err
    # the same settings through the config path: overrides and flags are one mechanism
    assert ev.main(["--checkpoint", str(checkpoint), f"data.root={data_root}", "eval.pad_to=65",
                    f"data.num_classes={NUM_CLASSES}", "eval.limit=1", "--out",
                    str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "scores.json").read_text())["num_images"] == 1
    assert ev.main(["--checkpoint", str(checkpoint), "eval.limt=1"]) == 2
    assert "eval.limt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0


def test_default_out_dir(tmp_path):
    assert default_out_dir(tmp_path / "run" / "checkpoints" / "x.pth", "val") == \
        (tmp_path / "run" / "eval_val").resolve()
    assert default_out_dir(tmp_path / "w" / "x.pth", "test") == \
        (tmp_path / "w" / "eval_test").resolve()


def test_cache_for_an_image_of_another_size_is_recomputed(tmp_path, checkpoint, data_root,
                                                          count_forwards, capsys):
    out = tmp_path / "eval"
    first = run(checkpoint, data_root, out)
    path = out / "logits" / "val_0000.npz"
    logits, _, _ = load_logits(path)
    from seglab.data.logit_cache import save_logits
    save_logits(path, logits, (65, 65), (40, 64))  # as if the image had been 40 rows high
    again = run(checkpoint, data_root, out)
    assert len(count_forwards) == 4 and "recomputing" in capsys.readouterr().err
    assert again["miou"] == first["miou"]


@pytest.mark.parametrize("mode", ["torchvision", "vainf"])
def test_resizing_protocols_score_the_resized_labels(tmp_path, checkpoint, data_root, mode):
    """torchvision: shorter side to 520, scored at that size; vainf: shorter side to 513 and
    the centre 513 crop. The saved predictions are compared with the label resized by hand
    (PIL nearest, then the crop), independently of seglab/data/protocols.py."""
    out = tmp_path / mode
    scores = run(checkpoint, data_root, out, mode=mode, crf=True, crf_workers=1)
    correct = total = 0
    for image_id in VAL_IDS:
        pred = np.array(Image.open(out / "pred" / f"{image_id}.png"))
        gt = Image.open(voc_file(data_root, "SegmentationClass", image_id, "png"))  # 64x48
        side = 520 if mode == "torchvision" else 513
        gt = np.array(gt.resize((int(side * 64 / 48), side), Image.NEAREST))
        if mode == "vainf":
            left = int(round((gt.shape[1] - 513) / 2.0))
            gt = gt[:, left:left + 513]
        assert pred.shape == gt.shape == ((520, 693) if mode == "torchvision" else (513, 513))
        valid = gt != 255
        correct += int((pred[valid] == gt[valid]).sum())
        total += int(valid.sum())
        crf_pred = np.array(Image.open(out / "pred_crf" / f"{image_id}.png"))
        assert crf_pred.shape == gt.shape
    assert scores["pixel_acc"] == pytest.approx(correct / total, abs=1e-12)
    assert scores["mode"] == mode and "crf" in scores
    again = run(checkpoint, data_root, out, mode=mode)  # the cache fits the protocol's sizes
    assert again["network_images"] == 0


def test_the_streamed_crf_scores_the_same_as_after_the_network(tmp_path, checkpoint, data_root):
    after = run(checkpoint, data_root, tmp_path / "a", crf=True, crf_workers=2)
    streamed = run(checkpoint, data_root, tmp_path / "s", crf=True, crf_workers=2,
                   crf_stream=True)
    assert streamed["network_images"] == after["network_images"] == 3
    assert streamed["crf"]["miou"] == after["crf"]["miou"]
    assert streamed["crf"]["iou"] == after["crf"]["iou"]
