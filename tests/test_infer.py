"""infer.py: folders in, VOC palette PNGs out; odd image formats; a corrupt file is skipped and
reported, and the exit status says so."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

import infer
from seglab.inference.batch import find_images
from seglab.inference.overlay import overlay
from seglab.checkpoint import atomic_save, make_checkpoint
from seglab.inference.predictor import Predictor
from seglab.data.labels import voc_palette
from seglab.data.images import load_image
from seglab.models.deeplabv2 import DeepLabV2

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    net = DeepLabV2(num_classes=NUM_CLASSES, depth=14, width=8)
    with torch.no_grad():  # a larger readout spreads the predictions over several classes
        for conv in net.aspp.branches():
            conv.weight.mul_(300)
    return atomic_save(make_checkpoint(net.arch, net.state_dict(), trained_on="train_aug"),
                       tmp_path / "tiny.pth")


@pytest.fixture
def images(tmp_path):
    """A folder with a grayscale, an RGBA, a 16-bit PNG, an upper-case .JPG in a subfolder,
    a corrupt PNG and a text file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8), "L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), "RGBA").save(
        folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (30, 36), dtype=np.uint16)).save(folder / "deep16.png")
    Image.fromarray(rng.integers(0, 256, (25, 28, 3), dtype=np.uint8)).save(
        folder / "sub" / "photo.JPG")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


GOOD = {"gray": (40, 52), "rgba": (33, 47), "deep16": (30, 36), "sub/photo": (25, 28)}


def check_palette_png(path, shape):
    """A VOC palette PNG of the given size with class values < NUM_CLASSES; returns the labels."""
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.array(im.getpalette()[:768], np.uint8).reshape(256, 3),
                              voc_palette())
        labels = np.array(im)
    assert labels.shape == shape and labels.dtype == np.uint8
    assert labels.max() < NUM_CLASSES
    return labels


def test_folder_with_a_corrupt_file(tmp_path, checkpoint, images, capsys):
    out = tmp_path / "out"
    status = infer.main(["--checkpoint", str(checkpoint), str(images), "--out", str(out),
                         "--device", "cpu", "--pad-to", "65"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "4 image(s) written" in printed and "1 failed" in printed
    assert "FAILED" in printed and "broken.png" in printed
    written = sorted(p.relative_to(out / "pred").as_posix() for p in (out / "pred").rglob("*.png"))
    assert written == sorted(f"photos/{name}.png" for name in GOOD)
    # palette PNG round trip: the file holds exactly the predictor's labels
    predictor = Predictor(checkpoint, device="cpu")
    seen = set()
    for name, shape in GOOD.items():
        labels = check_palette_png(out / "pred" / "photos" / f"{name}.png", shape)
        source = next(images.glob(f"{name}.*"))
        expect, _ = predictor.predict(load_image(source), mode="voc", pad_to=65)
        assert np.array_equal(labels, expect)
        seen |= set(np.unique(labels).tolist())
    assert len(seen) > 1  # the check above is not trivially all-background
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["eval"]["mode"] == "voc" and config["eval"]["pad_to"] == 65


def test_subprocess_exit_status_and_summary(tmp_path, checkpoint, images):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the script finds its siblings by itself
    result = subprocess.run([sys.executable, str(ROOT / "Implementation" / "infer.py"),
                             "--checkpoint", str(checkpoint), str(images / "broken.png"),
                             str(images / "gray.png"), "--out", str(out), "--pad-to", "65",
                             "--device", "cpu"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "broken.png" in result.stdout and "1 failed" in result.stdout
    check_palette_png(out / "pred" / "gray.png", (40, 52))
    assert not (out / "pred" / "broken.png").exists()


def test_all_good_inputs_exit_zero_with_overlay_probs_and_crf(tmp_path, checkpoint, images):
    out = tmp_path / "out"
    status = infer.main(["--checkpoint", str(checkpoint), str(images / "rgba.png"),
                         "--out", str(out), "--device", "cpu", "--full-image", "--overlay",
                         "--save-probs", "--crf"])
    assert status == 0
    labels = check_palette_png(out / "pred" / "rgba.png", (33, 47))
    check_palette_png(out / "pred_crf" / "rgba.png", (33, 47))
    probs = np.load(out / "probs" / "rgba.npy")
    assert probs.dtype == np.float16 and probs.shape == (NUM_CLASSES, 33, 47)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
    assert (probs.argmax(0) == labels).mean() > 0.99
    with Image.open(out / "overlay" / "rgba.png") as im:
        assert im.width > 47 and im.height >= 33 and im.mode == "RGB"
        pixels = np.array(im)
    tinted = labels > 0  # the overlay's image part: image and class colours blended 1:1
    image = load_image(images / "rgba.png")
    expect = np.rint(0.5 * image[tinted] + 0.5 * voc_palette()[labels[tinted]])
    assert np.abs(pixels[:33, :47][tinted].astype(int) - expect.astype(int)).max() <= 1


def test_overlay_tints_objects_and_lists_the_classes_found():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:10] = 3
    labels[0, 0] = 255
    names = ["background", "aeroplane", "bicycle", "bird"]
    canvas = np.array(overlay(image, labels, names))
    assert canvas.shape[0] >= 20 and canvas.shape[1] > 30
    part, obj = canvas[:20, :30], labels == 3
    assert np.array_equal(part[~obj], image[~obj])  # background and void untouched
    blend = (image[obj].astype(float) + voc_palette()[3]) / 2
    assert np.abs(part[obj] - blend).max() <= 0.5 + 1e-9
    legend = canvas[:, 30:]
    bird, bicycle = voc_palette()[3], voc_palette()[2]
    assert (legend == bird).all(-1).any()        # a swatch for the class found
    assert not (legend == bicycle).all(-1).any()  # none for a class absent


def test_find_images_names(tmp_path):
    folder = tmp_path / "in"
    (folder / "deep" / "er").mkdir(parents=True)
    for name in ("a.jpg", "a.PNG", "b.webp", "deep/er/c.bmp", "deep/er/skip.gif"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "single.jpeg"
    single.write_bytes(b"x")
    found, missing = find_images([folder, single, tmp_path / "nope"])
    names = {path.name: name.as_posix() for path, name in found}
    assert names == {"a.jpg": "in/a_jpg", "a.PNG": "in/a_png", "b.webp": "in/b",
                     "c.bmp": "in/deep/er/c", "single.jpeg": "single"}
    assert missing == [(str(tmp_path / "nope"), "no such file or folder")]


def test_missing_input_counts_as_a_failure(tmp_path, checkpoint, images, capsys):
    status = infer.main(["--checkpoint", str(checkpoint), str(images / "gray.png"),
                         str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "o"),
                         "--device", "cpu", "--pad-to", "65"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "nope.jpg" in printed and "1 image(s) written" in printed


def test_help():
    with pytest.raises(SystemExit) as e:
        infer.main(["--help"])
    assert e.value.code == 0
