"""Models know what they are: the test recipe, class names and colours travel with the weights
(seglab/recipe.py, checkpoint.label_set), and every script uses them unless told otherwise."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

import datasets
import evaluate
import infer
import train
from seglab.checkpoint import load_checkpoint, make_checkpoint
from seglab.config import load_config
from seglab.data.images import DataError, load_image
from seglab.data.labels import VOC_CLASSES, voc_palette
from seglab.data.protocols import PROTOCOLS
from seglab.data.registry import DATASETS, resolve_num_classes
from seglab.inference.predictor import Predictor
from seglab.models.msc import MSC
from seglab.recipe import PAPER, RECIPE_FIELDS, describe, explicit_recipe, resolve_recipe
from seglab.weights import caffe, fcn_caffe, published, tflite, torchvision_seg, vainf
from test_inference import save_tiny_checkpoint, tiny_net

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
MNV2 = REAL / "models" / "deeplabv3_mnv2_pascal_quant.tflite"
TINY_ARCH = ["model.arch.depth=14", "model.arch.width=8", "model.arch.rates=[1,2]",
             "model.arch.frozen_bn=false"]


# --- the resolver ------------------------------------------------------------------------------

def test_each_setting_comes_from_the_first_level_that_states_it():
    arch = {"name": "deeplabv3_mnv2_tf", "num_classes": 21}
    ckpt = {"recipe": {"msc_fusion": "mean", "mode": "full", "source": "a test"},
            "input_norm": "caffe"}
    recipe, sources = resolve_recipe({"mode": "vainf"}, ckpt, arch)
    assert recipe == {"msc_scales": [], "msc_fusion": "mean", "interp": "caffe",
                      "mode": "vainf", "pad_to": 513, "norm": "caffe"}
    assert sources == {"msc_scales": "architecture", "msc_fusion": "checkpoint",
                       "interp": "paper", "mode": "command line", "pad_to": "paper",
                       "norm": "checkpoint"}
    # the architecture level: DeepLab v2 declares its MSC, every other network is single scale
    assert resolve_recipe({}, None, {"name": "deeplabv2"})[0] == PAPER
    assert resolve_recipe({}, None, {"name": "unet"})[0]["msc_scales"] == []
    line = describe(recipe, sources)
    assert line.startswith("recipe: scales 1 (single scale)") and "command line: mode" in line


def test_a_config_states_only_what_a_preset_or_an_override_sets():
    assert explicit_recipe(load_config("voc12")) == {}            # the paper: all from the model
    assert explicit_recipe(load_config("demo")) == {"pad_to": 161}
    assert explicit_recipe(load_config("unet")) == {"msc_scales": []}
    given = explicit_recipe(load_config("voc12", ["model.msc_scales=[]", "eval.mode=full",
                                                  "data.norm=tf"]))
    assert given == {"msc_scales": [], "mode": "full", "norm": "tf"}
    assert set(RECIPE_FIELDS) == set(PAPER)


def test_the_predictor_runs_what_the_checkpoint_states(tmp_path):
    """A second way: not the resolver's answer, the network the Predictor actually builds."""
    net = tiny_net()
    single = make_checkpoint(net.arch, net.state_dict(), recipe={
        "msc_scales": [], "mode": "full", "source": "test"}, input_norm="imagenet")
    p = Predictor(single, device="cpu")
    assert not isinstance(p.model, MSC) and (p.mode, p.norm) == ("full", "imagenet")
    assert p.transform().mode == "full"
    msc = Predictor(single, device="cpu", msc_scales=(0.5,), mode="voc", pad_to=65)
    assert isinstance(msc.model, MSC) and msc.model.scales == (0.5,)
    assert msc.recipe_sources["msc_scales"] == "command line"
    image = np.random.default_rng(0).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    labels, logits = p.predict(image)                     # its protocol: the unpadded image
    assert logits.shape == (5, 30, 41) and labels.shape == (30, 41)


def test_old_checkpoints_load_as_voc_with_the_recipe_they_were_trained_with(tmp_path):
    net = tiny_net()
    bare = make_checkpoint(net.arch, net.state_dict())         # a converted file of last round
    assert "recipe" not in bare and "classes" not in bare
    p = Predictor(bare, device="cpu")
    assert p.recipe == PAPER and set(p.recipe_sources.values()) == {"architecture", "paper"}
    assert p.classes == list(VOC_CLASSES[:5])
    assert p.palette == voc_palette()[:5].tolist()
    trained = make_checkpoint(net.arch, net.state_dict(), input_norm="caffe", config={
        "model": {"msc_scales": [0.5], "interp": "pytorch"}, "eval": {"mode": "voc",
                                                                      "pad_to": 97}})
    p = Predictor(trained, device="cpu")
    assert (p.msc_scales, p.interp, p.pad_to) == ((0.5,), "pytorch", 97)
    assert p.recipe_sources["msc_scales"] == "checkpoint"


@pytest.mark.parametrize("module", [caffe, published, tflite, torchvision_seg, vainf, fcn_caffe])
def test_every_converter_states_its_sources_test_protocol(module):
    recipe = module.RECIPE
    assert set(recipe) == set(RECIPE_FIELDS) - {"norm"} | {"source"}
    assert recipe["mode"] in PROTOCOLS and len(recipe["source"]) > 30
    assert all(name in DATASETS for name in module.LABELS.values())
    assert resolve_recipe({}, {"recipe": recipe}, {"name": "deeplabv2"})[1]["mode"] == "checkpoint"


# --- classes, colours, data sets -----------------------------------------------------------------

def folder_dataset(root: Path, extra_image: bool = False) -> Path:
    """A 3-class folder set with its own names and colours: 6 images of two shapes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nwidget\ngizmo\n")
    (root / "palette.txt").write_text("10 20 30\n250 200 0\n0 180 250\n")
    for k in range(6):
        image = rng.integers(0, 60, (48, 56, 3)).astype(np.uint8)
        mask = np.zeros((48, 56), np.uint8)
        mask[8:30, 6:26], mask[20:44, 30:52] = 1, 2
        image[mask == 1] = (230, 60, 40)
        image[mask == 2] = (40, 90, 230)
        mask[0, :] = 255
        Image.fromarray(image).save(root / "images" / f"{k:03d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{k:03d}.png")
    if extra_image:
        Image.fromarray(image).save(root / "images" / "no_mask_yet.jpg")
    return root


def test_a_folder_model_draws_its_own_classes_in_its_own_colours(tmp_path, capsys, monkeypatch):
    root = folder_dataset(tmp_path / "my_data", extra_image=True)
    assert datasets.main(["--dataset", "folder", "--root", str(root)]) == 0
    assert "no_mask_yet.jpg" in capsys.readouterr().err     # an image in no split is named
    run = tmp_path / "run"
    assert train.main(["--config", "folder", f"data.root={root}", "--init", "scratch",
                       "--run-dir", str(run), "train.iterations=2", "train.effective_batch=2",
                       "train.batch_per_step=2", "data.crop=33", "data.workers=0",
                       "--no-eval", *TINY_ARCH]) == 0   # no data.num_classes: classes.txt says 3
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert ckpt["arch"]["num_classes"] == 3 and ckpt["dataset"] == "folder"
    assert ckpt["classes"] == ["background", "widget", "gizmo"]
    assert ckpt["palette"] == [[10, 20, 30], [250, 200, 0], [0, 180, 250]]

    import seglab.inference.batch as batch
    seen = []
    real_overlay = batch.overlay
    monkeypatch.setattr(batch, "overlay", lambda image, labels, names, colors=None: (
        seen.append((names, colors)) or real_overlay(image, labels, names, colors=colors)))
    out = tmp_path / "infer"
    assert infer.main(["--checkpoint", str(run / "checkpoints" / "final.pth"),
                       str(root / "images" / "000.png"), "--overlay", "--out", str(out),
                       "--device", "cpu"]) == 0
    assert seen == [(["background", "widget", "gizmo"], ckpt["palette"])]
    with Image.open(out / "pred" / "000.png") as im:
        assert im.mode == "P" and im.getpalette()[:9] == [10, 20, 30, 250, 200, 0, 0, 180, 250]
    # the legend's swatch of every class found is drawn in that class's colour
    labels = np.asarray(Image.open(out / "pred" / "000.png"))
    picture = np.asarray(Image.open(out / "overlay" / "000.png").convert("RGB"))[:, 56:]
    for c in np.unique(labels):
        assert (picture == ckpt["palette"][c]).all(-1).any()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["classes"] == ["background", "widget", "gizmo"]
    assert saved["model"]["msc_scales"] == [0.75, 0.5]   # DeepLab v2 trained with its MSC


def test_num_classes_follows_the_data_set_and_a_disagreement_names_both(tmp_path, capsys):
    root = folder_dataset(tmp_path / "d")
    assert resolve_num_classes("folder", root) == 3
    assert resolve_num_classes("voc", "unused") == 21
    assert resolve_num_classes("voc", "unused", 5) == 5          # a VOC-layout subset
    assert resolve_num_classes("cocostuff164k", "unused", 182) == 182
    with pytest.raises(DataError, match="num_classes=5 disagrees .* which has 3 classes"):
        resolve_num_classes("folder", root, 5)
    with pytest.raises(DataError, match="which has 19"):
        resolve_num_classes("cityscapes", "unused", 21)
    assert train.main(["--config", "folder", f"data.root={root}", "data.num_classes=5",
                       "--init", "scratch", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "data.num_classes=5" in err and "3 classes" in err and "Traceback" not in err


def test_data_sets_declare_their_colours():
    from seglab.data.ade20k import ADE20KSegmentation
    from seglab.data.cityscapes import CityscapesSegmentation
    from seglab.data.cocostuff import CocoStuff164k
    assert ADE20KSegmentation.colors.shape == (150, 3)
    assert ADE20KSegmentation.colors[0].tolist() == [120, 120, 120]        # wall
    assert CityscapesSegmentation.colors[0].tolist() == [128, 64, 128]     # road
    coco = CocoStuff164k.__new__(CocoStuff164k)       # no files: only the class-level table
    coco.num_classes, coco.colors = 171, None
    colours = coco.palette[:171]                                          # generated: distinct
    assert len({tuple(c) for c in colours.tolist()}) == 171


# --- infer: EXIF orientation ---------------------------------------------------------------------

def test_infer_labels_a_phone_photo_in_the_orientation_it_is_shown(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "c.pth", tiny_net())
    stored = np.random.default_rng(1).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    stored[:, :20] = 250                                   # a bright band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6                                       # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert shown.shape == (64, 40, 3)
    assert (load_image(path, exif_orientation=True) == shown).all()
    assert load_image(path).shape == (40, 64, 3)           # data sets: the stored pixels
    out = tmp_path / "out"
    assert infer.main(["--checkpoint", str(ckpt), str(path), "--out", str(out),
                       "--device", "cpu", "--pad-to", "65"]) == 0
    labels = np.asarray(Image.open(out / "pred" / "phone.png"))
    expect, _ = Predictor(ckpt, device="cpu").predict(shown, pad_to=65)
    assert labels.shape == (64, 40) and (labels == expect).all()


# --- the real model: Google's MobileNetV2, converted, with no override ---------------------------

@pytest.mark.skipif(not MNV2.is_file(), reason="needs ../shared/real (Google's TF Lite models "
                                               "and 20 real VOC val images); absent here")
def test_converted_mobilenet_scores_single_scale_without_an_override(tmp_path, capsys):
    import convert
    ckpt = tmp_path / "mnv2.pth"
    assert convert.main(["tflite", str(MNV2), str(ckpt)]) == 0
    assert evaluate.main(["--checkpoint", str(ckpt), f"data.root={REAL / 'voc_dev'}",
                          "--out", str(tmp_path / "ev")]) == 0
    assert "recipe: scales 1 (single scale)" in capsys.readouterr().err
    scores = json.loads((tmp_path / "ev" / "scores.json").read_text())
    assert scores["msc_scales"] == [] and scores["recipe"]["sources"]["msc_scales"] == "checkpoint"
    # the README's single-scale number, measured on the AMD EPYC and the AMX Xeon alike
    assert 100 * scores["miou"] == pytest.approx(79.94, abs=0.05)
    assert scores["class_names"][15] == "person"
