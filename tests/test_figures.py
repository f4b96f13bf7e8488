"""figures.py and seglab/figures/ on a tiny generated run: every figure is written as a real PNG,
the sizes in the network diagram and the taps in the atrous figure are the model's own, the
trimap it computes agrees with evaluate.py's, the MSC and CRF figures draw an image without a
label from the same logits the Predictor gives, and every image the README shows exists."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from seglab.data.transforms import EvalTransform
from seglab.densecrf.dense_crf import DenseCRF
from seglab.densecrf.params import CRFParams
from seglab.evaluation.evaluate import EvalSettings, evaluate
from seglab.figures import atrous, network
from seglab.figures import crf as crf_fig
from seglab.figures import msc as msc_fig
from seglab.figures import run as figrun
from seglab.figures import scores as scores_fig
from seglab.inference.predictor import Predictor
import figures
import train
from seglab.models.msc import MSC
from seglab.models.deeplabv2 import DeepLabV2
from seglab.models.resize import resize, scaled_size
from numerics import DEEP, assert_close_to_scale

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ["atrous_fov.png", "network.png", "msc.png", "crf_iterations.png",
            "training_curves.png", "per_class_iou.png", "trimap.png"]
TINY_ARCH = dict(num_classes=21, depth=14, width=8)
PAD_TO = 49


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A complete demo-style run folder: 3 training iterations of a ResNet-14 of width 8 on a
    few 40x48 synthetic images, then evaluate.py (MSC + CRF) on the val split."""
    tmp = tmp_path_factory.mktemp("figures")
    cfg = {
        "data": {"root": str(tmp / "demo"), "demo": True, "crop": 33, "workers": 0,
                 "demo_args": {"num_train": 4, "num_val": 3, "size": [40, 48], "seed": 1}},
        "model": {"arch": {"depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": False}},
        "train": {"init": "scratch", "iterations": 3, "effective_batch": 2, "batch_per_step": 1,
                  "base_lr": 0.01, "checkpoint_every": 3},
        "eval": {"after_train": False, "pad_to": PAD_TO},
        "run": {"out": str(tmp / "runs"), "name": "demo-tiny"},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(tmp / "tiny.yaml")]) == 0
    run = tmp / "runs" / "demo-tiny"
    evaluate(run / "checkpoints" / "final.pth",
             EvalSettings(data_root=str(tmp / "demo"), pad_to=PAD_TO, crf=True, crf_workers=1,
                          device="cpu"), out_dir=run / "eval_val", show_progress=False)
    return run


def test_every_figure_is_written_as_a_png(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(network, "NETWORK_ARCH", TINY_ARCH)  # the CLI default is ResNet-101
    out = tmp_path / "fig"
    assert figures.main(["--run", str(tiny_run), "--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPECTED)
    for name in EXPECTED:
        path = out / name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.load()
            assert image.width >= 600 and image.height >= 200, (name, image.size)
            # not a blank canvas: many distinct colours
            assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    printed = capsys.readouterr().out
    assert all(str(out / name) in printed for name in EXPECTED)


def test_only_selects_figures_by_letter_or_name(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "NETWORK_ARCH", TINY_ARCH)
    assert figures.selected(["network", "a"]) == ["a", "b"]
    assert figures.main(["--only", "b", "--out", str(tmp_path)]) == 0   # needs no run
    assert [p.name for p in tmp_path.iterdir()] == ["network.png"]
    with pytest.raises(figures.FigureError, match="unknown figure"):
        figures.selected(["z"])


def test_network_sizes_are_those_of_a_forward_pass():
    net, rows, fused = network.measure_network(TINY_ARCH, 321)
    assert [r["input"] for r in rows] == [(3, 321, 321), (3, 241, 241), (3, 161, 161)]
    assert [r["aspp"] for r in rows] == [(21, 41, 41), (21, 31, 31), (21, 21, 21)]
    assert fused == (21, 41, 41)
    # reference: the stages called one by one on the same scaled inputs
    x = torch.zeros(1, 3, 321, 321)
    b = net.backbone
    for row, scale in zip(rows, (1.0, 0.75, 0.5)):
        h = x if scale == 1.0 else resize(x, scaled_size((321, 321), scale))
        with torch.no_grad():
            h = b.pool1(torch.relu(b.conv1(h)))
            assert row["stem"] == tuple(h.shape[1:])
            for stage in ("res2", "res3", "res4", "res5"):
                h = getattr(b, stage)(h)
                assert row[stage] == tuple(h.shape[1:]), stage
        assert row["branches"] == [row["aspp"]] * 4


def test_atrous_taps_are_rate_apart_and_output_stride_is_8():
    for rate in (1, 6, 12):
        taps = atrous.atrous_taps(rate, 31)
        expected = np.zeros((31, 31), bool)
        for dy in (-rate, 0, rate):
            for dx in (-rate, 0, rate):
                expected[15 + dy, 15 + dx] = True
        assert np.array_equal(taps, expected), rate
    assert atrous.output_stride(321) == 8


def test_msc_branches_fuse_to_the_msc_output():
    torch.manual_seed(0)
    net = DeepLabV2(num_classes=5, depth=14, width=8).eval()
    x = torch.randn(1, 3, 49, 57)
    logits, upsampled, fused = msc_fig.msc_branches(net, x, (0.75, 0.5), "caffe")
    with torch.no_grad():
        reference = MSC(net, (0.75, 0.5), "caffe").eval()(x)
    assert [tuple(l.shape[-2:]) for l in logits] == [(7, 8), (5, 6), (4, 4)]
    assert all(tuple(u.shape[-2:]) == (7, 8) for u in upsampled)
    assert torch.equal(fused, reference)


def test_computed_trimap_matches_evaluate(tiny_run, tmp_path):
    widths = (1, 3, 10)
    run = figrun.load_run(tiny_run)
    plain, crf = scores_fig.compute_trimap(run, widths, workers=1)
    scores = evaluate(tiny_run / "checkpoints" / "final.pth",
                      EvalSettings(data_root=str(run.data_root()), pad_to=PAD_TO, crf=True,
                                   crf_workers=1, device="cpu", trimap_widths=widths,
                                   save_predictions=False),
                      out_dir=tmp_path / "ev", show_progress=False)
    for ours, theirs in ((plain, scores["trimap"]), (crf, scores["crf"]["trimap"])):
        assert sorted(ours) == list(widths)
        for w in widths:
            assert ours[w]["pixels"] == theirs[w]["pixels"] > 0
            assert ours[w]["pixel_acc"] == pytest.approx(theirs[w]["pixel_acc"], abs=1e-12)
    assert scores_fig.trimap_from_scores({"trimap": {"1": {"miou": 0.5}}}, (1,)) == \
        {1: {"miou": 0.5}}
    assert scores_fig.trimap_from_scores({"trimap": {"1": {}}}, (1, 2)) is None
    assert scores_fig.trimap_from_scores({}, (1,)) is None


def test_default_run_is_the_documented_demo_run_never_the_newest(tmp_path, monkeypatch, capsys):
    """A newer smoke run under runs/ must not become the figures' source (it once overwrote
    Figures/msc.png): the default is runs/demo, and without it figures.py stops and says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(figrun, "ROOT", tmp_path)
    with pytest.raises(figrun.FigureError, match="train.py --config demo"):
        figrun.default_run()
    for name, mtime in (("demo-old", 1000), ("demo-new", 2000), ("voc12-x", 3000)):
        final = tmp_path / "runs" / name / "checkpoints" / "final.pth"
        final.parent.mkdir(parents=True)
        final.write_bytes(b"x")
        os.utime(final, (mtime, mtime))
    with pytest.raises(figrun.FigureError, match="runs/demo"):
        figrun.default_run()
    assert figures.main(["--only", "msc", "--out", str(tmp_path / "fig")]) == 2
    assert not (tmp_path / "fig").exists()
    final = tmp_path / "runs" / "demo" / "checkpoints" / "final.pth"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"x")
    assert figrun.default_run() == Path("runs") / "demo" or \
        figrun.default_run().resolve() == (tmp_path / "runs" / "demo").resolve()


def test_missing_run_or_scores_are_explained(tmp_path, capsys, tiny_run):
    assert figures.main(["--run", str(tmp_path / "nope"), "--only", "c"]) == 2
    assert "train.py --config demo" in capsys.readouterr().err
    run = figrun.load_run(tiny_run)
    run.config = dict(run.config, data=dict(run.config["data"], val_split="test"))
    with pytest.raises(figrun.FigureError, match="evaluate.py .*--split test"):
        run.scores()


def test_msc_and_crf_figures_draw_an_image_without_a_label(tmp_path):
    """The photograph path: msc_figure / crf_figure take (image, label or None, network or
    logits). The fused logits msc_predict hands the CRF are the Predictor's (the inference
    path, rewrites off), and a figure without a label has one panel fewer (a taller row)."""
    torch.manual_seed(0)
    net = DeepLabV2(**TINY_ARCH).eval()
    rng = np.random.default_rng(0)
    image = (rng.random((37, 45, 3)) * 255).astype(np.uint8)
    label = rng.integers(0, 3, (37, 45)).astype(np.uint8)
    scales = (0.75, 0.5)
    pred = msc_fig.msc_predict(net, image, EvalTransform("voc", PAD_TO, norm="caffe"), scales,
                               "caffe")
    predictor = Predictor(net, device="cpu", fold_bn=False, channels_last=False,
                          shifted_aspp=False, msc_scales=scales, interp="caffe", norm="caffe")
    labels, logits = predictor.predict(image, "voc", PAD_TO)
    assert_close_to_scale(pred.fused, logits, DEEP)
    assert np.array_equal(pred.labels[-1], labels)
    assert len(pred.labels) == len(scales) + 2 and pred.labels[0].shape == image.shape[:2]

    sizes = {}
    for name, gt in (("with.png", label), ("without.png", None)):
        path = msc_fig.msc_figure(image, gt, net, EvalTransform("voc", PAD_TO, norm="caffe"),
                                  scales, "caffe", tmp_path, title="photo", name=name)
        with Image.open(path) as png:
            sizes[name] = png.size
    assert sizes["without.png"][1] > sizes["with.png"][1]   # 5 panels, not 6: taller

    params = CRFParams(iterations=10)
    path = crf_fig.crf_figure(image, None, pred.fused, params, "torch", tmp_path,
                              iterations=(1, 10), name="crf.png")
    assert path.is_file() and path.stat().st_size > 5000
    direct = DenseCRF(params, backend="torch")(image, pred.fused).argmax(0).astype(np.uint8)
    assert np.array_equal(crf_fig.crf_labels(image, pred.fused, params, 10, "torch"), direct)
    with pytest.raises(figrun.FigureError, match="do not fit the image"):
        crf_fig.crf_figure(image, None, pred.fused[:, :-1], params, "torch", tmp_path)


def readme_figures():
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"Figures/([\w.-]+\.png)", text)))


def test_every_image_the_readme_shows_exists():
    missing = [name for name in readme_figures() if not (ROOT / "Figures" / name).is_file()]
    assert not missing, f"README.md shows Figures/{missing} (regenerate: python " \
                        "Implementation/figures.py)"


def test_the_readme_shows_every_figure():
    shown = set(readme_figures())
    absent = [f.name for f in figures.FIGURES.values() if f.name not in shown]
    assert not absent, f"figures.py writes {absent} but README.md does not show them"


REAL = ROOT.parent / "shared" / "real" / "models" / "deeplabv3_mnv2_pascal_quant.tflite"


@pytest.mark.skipif(not REAL.is_file(), reason="needs Google's deeplabv3_mnv2_pascal_quant.tflite "
                    "(https://github.com/google-coral/test_data/raw/master/"
                    "deeplabv3_mnv2_pascal_quant.tflite) in ../shared/real/models")
def test_real_photo_figures_show_a_person_on_the_astronaut_photo(tmp_path):
    import convert
    ckpt = tmp_path / "mnv2.pth"
    assert convert.main(["tflite", str(REAL), str(ckpt)]) == 0
    assert figures.main(["--real", str(ckpt), "--out", str(tmp_path / "fig")]) == 0
    for name in ("msc_real.png", "crf_real.png", "overlay_real.png"):
        assert (tmp_path / "fig" / name).stat().st_size > 20000, name
    from seglab.figures.real import photo, real_network
    from seglab.figures.msc import msc_predict
    net, transform, (names, colors) = real_network(ckpt)
    assert names[15] == "person" and colors[15] == [192, 128, 128]   # the checkpoint's own
    labels = msc_predict(net, photo("astronaut"), transform, (), "caffe").fused.argmax(0)
    person = (labels == 15).float().mean().item()  # VOC class 15: person
    assert 0.2 < person < 0.8  # the astronaut fills a good part of the frame, not all of it
