"""Deployment (seglab/deploy, export.py): the ONNX file computes what PyTorch computes (fp32: max
relative difference <= 1e-4, every label the same) at two sizes through one file, single scale
and with MSC; evaluate.py and infer.py run the file and give the checkpoint's scores and labels;
an int8 file is really quantised (per-channel int8 weights) and agrees with fp32 on a small model
whose logits mean something; on the real TF Lite DeepLab v3 model when ../shared/real exists."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

import evaluate  # noqa: E402
import export  # noqa: E402
import infer  # noqa: E402
from seglab.checkpoint import atomic_save, make_checkpoint  # noqa: E402
from seglab.data.demo import make_demo_dataset  # noqa: E402
from seglab.data.images import load_image  # noqa: E402
from seglab.data.transforms import normalize  # noqa: E402
from seglab.deploy import load_predictor  # noqa: E402
from seglab.deploy.onnx_export import TOLERANCE, check_inputs, compare_with_torch  # noqa: E402
from seglab.deploy.onnx_file import ExportError, open_session  # noqa: E402
from seglab.deploy.quantize import CalibrationCrops, quantize_onnx, quantize_pt2e  # noqa: E402
from seglab.deploy.runtime import OnnxPredictor  # noqa: E402
from seglab.inference.predictor import Predictor  # noqa: E402
from seglab.models import build_model  # noqa: E402
from seglab.models.resnet import FrozenBatchNorm2d  # noqa: E402
from numerics import assert_close_to_scale, assert_labels_agree

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
TINY = dict(name="deeplabv2", num_classes=21, depth=14, width=4, rates=[2, 4])


def tiny_net(seed=0):
    """A tiny DeepLab v2 with random weights and non-trivial frozen BN statistics."""
    torch.manual_seed(seed)
    net = build_model(TINY).eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net


def fit_readout(net, samples, ridge=1e-2):
    """The ASPP replaced by a ridge-regression readout of the backbone (centre tap of c0) fitted
    to one-hot labels: logits with margins like a trained model's, in seconds."""
    feats, targets = [], []
    with torch.no_grad():
        for image, label in samples:
            sub = torch.from_numpy(label[::8, ::8].astype(np.int64))
            f = net.backbone(normalize(image)[None])[0, :, :sub.shape[0], :sub.shape[1]]
            f, sub = f.flatten(1).T.double(), sub.reshape(-1)
            keep = sub != 255
            feats.append(f[keep])
            targets.append(torch.nn.functional.one_hot(sub[keep], 21).double())
    x, y = torch.cat(feats), torch.cat(targets)
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.linalg.solve(xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=x.dtype),
                           xs.T @ y)
    with torch.no_grad():
        for conv in net.aspp.branches():
            conv.weight.zero_()
            conv.bias.zero_()
        net.aspp.c0.weight[:, :, 1, 1] = w[:-1].T.float()
        net.aspp.c0.bias.copy_(w[-1].float())
    return net


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(root, num_train=6, num_val=3, size=(64, 80), seed=3)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo):
    """A fitted tiny checkpoint (MSC 0.75/0.5 in its config), its fp32 ONNX files (single scale,
    MSC) and an int8 one."""
    from seglab.data.voc import VOCSegmentation
    tmp = tmp_path_factory.mktemp("export")
    train = VOCSegmentation(demo, "train")
    samples = [(load_image(train.image_path(i)), train.load_label(i)) for i in range(len(train))]
    net = fit_readout(tiny_net(), samples)
    ckpt = atomic_save(make_checkpoint(net.arch, net.state_dict(), trained_on="train_aug",
                                       input_norm="caffe"), tmp / "tiny.pth")
    out = dict(ckpt=ckpt, single=tmp / "single.onnx", msc=tmp / "msc.onnx",
               int8=tmp / "int8.onnx")
    assert export.main(["onnx", "--checkpoint", str(ckpt), "--out", str(out["single"])]) == 0
    assert export.main(["int8", "--checkpoint", str(ckpt), "--out", str(out["int8"]), "--msc",
                        "--calibration", str(demo), "--split", "train", "--crop", "65",
                        "--crops", "6", "--fp32-out", str(out["msc"])]) == 0
    return out


class _FixedSession:
    """An onnxruntime session stand-in that answers with given logits."""
    def __init__(self, logits):
        self.logits = logits

    def run(self, names, feeds):
        return [self.logits.numpy()]


def test_the_check_forgives_a_label_swapped_at_a_near_tie_only():
    """Float rounding may swap two logits that PyTorch has nearly tied (random weights make such
    ties), and the check lets that pass; a label flipped where PyTorch is sure fails it."""
    ref = torch.zeros(1, 2, 6, 6)
    ref[0, 0] = 5.0                                      # label 0 everywhere, by a margin of 5
    ref[0, 1, 2, 3] = 5.0 - 1e-6                         # ... except a near-tie at one pixel
    model = lambda x: ref.clone()                        # noqa: E731
    x = torch.zeros(1, 3, 6, 6)
    tie = ref.clone()
    tie[0, 1, 2, 3] = 5.0 + 1e-6                         # rounding-size change: the label swaps
    result = compare_with_torch("unused.onnx", model, [x], session=_FixedSession(tie))
    assert result["label_agreement"] < 1.0 and result["flips_beyond_ties"] == 0
    sure = tie.clone()
    sure[0, 1, 0, 0] = 6.0                               # a confident label changed
    result = compare_with_torch("unused.onnx", model, [x], session=_FixedSession(sure))
    assert result["flips_beyond_ties"] > 0


def test_single_scale_file_reproduces_pytorch_at_two_sizes(files):
    model = Predictor(files["ckpt"], device="cpu", msc_scales=(), channels_last=False,
                      shifted_aspp=False).model
    inputs = check_inputs("caffe", 8, sizes=((57, 90), (96, 41)))  # odd/even, wide/tall
    result = compare_with_torch(files["single"], model, inputs)
    assert result["max_rel_diff"] <= TOLERANCE and result["flips_beyond_ties"] == 0
    report = json.loads(Path(str(files["single"]) + ".json").read_text())
    assert report["check"]["max_rel_diff"] <= TOLERANCE and report["msc_scales"] == []


def test_one_file_is_dynamic_in_height_and_width(files):
    graph_input = onnx.load(str(files["msc"]), load_external_data=False).graph.input[0]
    dims = graph_input.type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    session = open_session(files["msc"])
    model = Predictor(files["ckpt"], device="cpu", channels_last=False, shifted_aspp=False).model
    shapes = set()
    for size in ((57, 90), (96, 41), (81, 81)):
        x = torch.randn((1, 3) + size, generator=torch.Generator().manual_seed(sum(size)))
        out = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() <= TOLERANCE * np.abs(ref).max()
        shapes.add(out.shape)
    assert len(shapes) == 3


def test_msc_file_matches_the_default_pytorch_predictor(files, demo):
    """A second way: the PyTorch Predictor's own fast path (shifted-sum ASPP, channels_last, BN
    folded its way), not the module that was exported, on the demo val images."""
    ours, theirs = OnnxPredictor(files["msc"]), Predictor(files["ckpt"], device="cpu")
    assert ours.msc_scales == theirs.msc_scales == (0.75, 0.5)
    for path in sorted((demo / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("val*.jpg")):
        image = load_image(path)
        for mode in ("voc", "full"):
            a, la = ours.predict(image, mode=mode, pad_to=81)
            b, lb = theirs.predict(image, mode=mode, pad_to=81)
            assert_close_to_scale(la, lb, TOLERANCE)
            assert_labels_agree(la, lb, TOLERANCE)


def test_evaluate_and_infer_run_the_onnx_file_with_the_checkpoints_results(files, demo,
                                                                          tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(demo)}, "eval": {"pad_to": 81}}))
    scores = {}
    for name in ("ckpt", "msc"):
        out = tmp_path / name
        assert evaluate.main(["--checkpoint", str(files[name]), "--config", str(cfg),
                              "--out", str(out)]) == 0
        scores[name] = json.loads((out / "scores.json").read_text())
        images = demo / "VOCdevkit" / "VOC2012" / "JPEGImages"
        assert infer.main(["--checkpoint", str(files[name]), str(images), "--out",
                           str(tmp_path / f"infer_{name}"), "--pad-to", "81"]) == 0
    assert scores["msc"]["precision"] == "fp32" and scores["msc"]["num_images"] == 3
    assert scores["msc"]["miou"] == scores["ckpt"]["miou"] > 0
    for png in sorted((tmp_path / "infer_ckpt" / "pred").rglob("*.png")):
        other = tmp_path / "infer_msc" / png.relative_to(tmp_path / "infer_ckpt")
        assert np.array_equal(np.asarray(load_image(png)), np.asarray(load_image(other)))


def test_int8_file_is_quantised_per_channel_and_agrees_with_fp32(files, demo):
    graph = onnx.load(str(files["int8"])).graph
    init = {t.name: t for t in graph.initializer}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear"
                 and init.get(n.input[0]) is not None and len(init[n.input[0]].dims) == 4]
    assert len(weight_dq) >= 10
    for node in weight_dq:
        weight, scale = init[node.input[0]], init[node.input[1]]
        assert weight.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel
    q, f = load_predictor(str(files["int8"])), load_predictor(str(files["msc"]))
    assert q.precision == "int8" and f.precision == "fp32"
    assert q.settings()["quantization"]["crops"] == 6
    same = total = 0
    from seglab.data.voc import VOCSegmentation
    val = VOCSegmentation(demo, "val")
    for i in range(len(val)):
        image = load_image(val.image_path(i))
        a, la = q.predict(image, pad_to=81)
        b, lb = f.predict(image, pad_to=81)
        assert not torch.equal(la, lb)  # really another computation
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total >= 0.97


def test_percentile_calibration_in_chunks_with_float_linear_convs(files, demo, tmp_path):
    """Every crop read (6 in chunks of 3), the convolutions no activation follows left float
    (their weights have no DequantizeLinear), the rest int8, labels close to fp32."""
    out = tmp_path / "percentile.onnx"
    crops = CalibrationCrops(demo, 6, 65, "caffe", split="train")
    meta = quantize_onnx(files["msc"], out, crops, method="percentile", float_linear=True,
                         chunk=4)
    assert meta["precision"] == "int8" and meta["quantization"]["crops"] == 6
    graph = onnx.load(str(out)).graph
    init = {t.name for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    dq_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] in init}
    float_convs = [n for n in convs if n.input[1] not in dq_weights]
    assert len(float_convs) == meta["quantization"]["float_convs"] > 0
    assert len(float_convs) < len(convs)
    assert not {"Relu", "Clip"} & {m.op_type for m in graph.node for n in float_convs
                                    if n.output[0] in m.input}
    q, f = OnnxPredictor(out), OnnxPredictor(files["msc"])
    same = total = 0
    for path in sorted((demo / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("val*.jpg")):
        a, b = q.predict(load_image(path), pad_to=81)[0], f.predict(load_image(path), pad_to=81)[0]
        same, total = same + int((a == b).sum()), total + a.size
    assert same / total >= 0.97


def test_pt2e_int8_module_is_quantised_and_agrees_with_fp32(files, demo):
    """torchao's PT2E flow (X86 Inductor quantizer), uncompiled: quantize/dequantize nodes
    around the convolutions, calibrated on demo crops, labels close to fp32 on other images."""
    crops = CalibrationCrops(demo, 4, 65, "caffe", split="train")
    module = quantize_pt2e(files["ckpt"], crops, compile=False)
    targets = [str(n.target) for n in module.graph.nodes if n.op == "call_function"]
    assert sum("dequantize_per_channel" in t for t in targets) >= 10  # per-channel weights
    fp32 = Predictor(files["ckpt"], device="cpu", msc_scales=())
    same = total = 0
    for path in sorted((demo / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("val*.jpg")):
        x, _ = fp32.transform("voc", 81).prepare(load_image(path))
        with torch.no_grad():
            a, b = module(x[None])[0], fp32.logits(x)
        assert not torch.equal(a, b)
        same, total = same + int((a.argmax(0) == b.argmax(0)).sum()), total + a[0].numel()
    assert same / total >= 0.97


def test_wrong_uses_of_an_onnx_file_fail_clearly(files, tmp_path):
    with pytest.raises(ValueError, match="bf16"):
        OnnxPredictor(files["msc"], precision="bf16")
    with pytest.raises(ValueError, match="msc_scales"):
        OnnxPredictor(files["msc"], msc_scales=())
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(files["single"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(ExportError, match="export.py"):
        OnnxPredictor(foreign)
    assert export.main(["onnx", "--checkpoint", str(tmp_path / "missing.pth"),
                        "--out", str(tmp_path / "x.onnx")]) == 2


def test_a_fixed_size_file_takes_that_size_only(files, tmp_path):
    out = tmp_path / "fixed.onnx"
    assert export.main(["onnx", "--checkpoint", str(files["ckpt"]), "--out", str(out),
                        "--fixed-size", "65", "81"]) == 0
    ours = OnnxPredictor(out)
    assert ours.logits(torch.zeros(1, 3, 65, 81)).shape[-2:] == (9, 11)
    with pytest.raises(ValueError, match="65x81 inputs only"):
        ours.logits(torch.zeros(1, 3, 57, 81))


@pytest.mark.skipif(not (REAL / "models" / "deeplabv3_mnv2_pascal_quant.tflite").is_file(),
                    reason="needs ../shared/real (the TF Lite DeepLab v3 from "
                           "https://github.com/google-coral/test_data and VOC 2012 val images)")
def test_real_model_export_round_trip_on_real_images(tmp_path):
    convert = pytest.importorskip("convert")
    if "tflite" not in convert.CONVERTERS:
        pytest.skip("the TF Lite converter (convert.py tflite) is not in this tree")
    ckpt = tmp_path / "mnv2.pth"
    assert convert.main(["tflite", str(REAL / "models" / "deeplabv3_mnv2_pascal_quant.tflite"),
                         str(ckpt)]) == 0
    images = sorted((REAL / "voc_dev").rglob("*.jpg"))[:2]
    out = tmp_path / "mnv2.onnx"
    # dynamic height and width, although its TF SAME padding depends on each size's parity
    assert export.main(["onnx", "--checkpoint", str(ckpt), "--out", str(out),
                        "--check-images", str(images[0].parent)]) == 0
    check = json.loads(Path(str(out) + ".json").read_text())["check"]
    assert check["max_rel_diff"] <= TOLERANCE and check["flips_beyond_ties"] == 0
    ours, theirs = OnnxPredictor(out), Predictor(ckpt, device="cpu", msc_scales=())
    for path in images:
        image = load_image(path)
        for mode in ("voc", "full"):        # padded to 513, and at the photo's own size
            assert_labels_agree(ours.predict(image, mode)[1], theirs.predict(image, mode)[1],
                                TOLERANCE)
    odd = load_image(images[0])[:321, :402]            # odd height, even width
    assert_labels_agree(ours.predict(odd, "full")[1], theirs.predict(odd, "full")[1], TOLERANCE)
