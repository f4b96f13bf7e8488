"""Weight conversion: Caffe .caffemodel (decoded without Caffe), the published PyTorch port, and
torchvision's ResNet, each mapped onto DeepLabV2 exactly; and the decoder's behaviour on bad files.

Synthetic caffemodels come from tests/caffe_writer.py (an independent protobuf writer); the
Caffe layer names are spelled out here from the release's naming, not taken from convert.py."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import caffe_writer as cw
from seglab.weights.caffe_proto import CaffeModelError, iter_layers, read_caffemodel
from convert import main
from seglab.weights.caffe import caffe_to_ours
from seglab.weights.common import ConversionError
from seglab.weights.provenance import warn_if_trained_on
from seglab.weights.published import ours_to_published, published_to_ours
from seglab.weights.torchvision_imagenet import load_torchvision_state, torchvision_to_ours
from seglab.models import build_model
from seglab.models.deeplabv2 import DeepLabV2
from numerics import DEEP, assert_close_to_scale

ROOT = Path(__file__).resolve().parents[1]
TINY_BLOCKS = {2: ["a"], 3: ["a"], 4: ["a"], 5: ["a"]}
R101_BLOCKS = {2: ["a", "b", "c"], 3: ["a", "b1", "b2", "b3"],
               4: ["a"] + [f"b{i}" for i in range(1, 23)], 5: ["a", "b", "c"]}
BN_FACTORS = [1.0, 2.0, 0.5, 1024.0, 0.0]  # powers of two: mean * f / f is exact; 0: Caffe's rule


def tiny(num_classes=5):
    return DeepLabV2(num_classes=num_classes, depth=14, width=8).eval()


def caffe_units(blocks):
    """(conv, bn, scale layer names, our ConvBN prefix) of every conv in the release's naming."""
    units = [("conv1", "bn_conv1", "scale_conv1", "backbone.conv1")]
    for stage, labels in blocks.items():
        for j, b in enumerate(labels):
            branches = [("2a", "reduce"), ("2b", "conv3x3"), ("2c", "increase")]
            for branch, unit in branches + ([("1", "shortcut")] if j == 0 else []):
                s = f"{stage}{b}_branch{branch}"
                units.append((f"res{s}", f"bn{s}", f"scale{s}", f"backbone.res{stage}.{b}.{unit}"))
    return units


def synthetic_caffemodel(net, blocks, variant="v2", head="fc1_voc12", copies=True,
                         head_classes=None, omit=(), extra=(), seed=0):
    """Encode a caffemodel for `net` with random blobs; return (bytes, {our key: expected tensor}).

    variant: "v2" (`layer`), "v1" (`layers`) or "mixed". Blobs alternate between `shape` and
    legacy dims, packed and unpacked floats; the res05/res075 copies carry *other* values."""
    rng = np.random.default_rng(seed)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    layers, expected, count = [], {}, [0]

    def add(name, type_, blobs, replacement=False):
        i = count[0]
        count[0] += 1
        if name in omit and not replacement:
            return
        version = {"v2": 2, "v1": 1, "mixed": 1 + i % 2}[variant]
        make = cw.layer_v2 if version == 2 else cw.layer_v1
        layers.append((version, make(name, type_, blobs)))

    def enc(a, i):
        legacy = i % 3 == 1
        dims = a.shape if a.ndim == 4 else (1, 1, 1, a.size)
        return cw.blob(a, shape=None if legacy else a.shape, legacy=dims if legacy else None,
                       packed=i % 4 != 2 or a.size > 5000, packed_dims=i % 2 == 0,
                       with_diff=i % 5 == 3)

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def layer_blobs(conv_shape, i, f):
        c = conv_shape[0]
        w, mean, var = rand(*conv_shape), rand(c), rng.uniform(0.5, 2, c).astype(np.float32)
        gamma, beta = rng.uniform(0.5, 1.5, c).astype(np.float32), rand(c)
        stats = [mean * np.float32(f or 1), var * np.float32(f or 1), np.array([f], np.float32)]
        blobs = ([enc(w, i)], [enc(s, i + k) for k, s in enumerate(stats)],
                 [enc(gamma, i), enc(beta, i + 1)])
        return (w, mean, var, gamma, beta), blobs

    add("data", "Data", [])
    for i, (conv, bn, scale, prefix) in enumerate(caffe_units(blocks)):
        f = BN_FACTORS[i % len(BN_FACTORS)]
        shape = shapes[f"{prefix}.conv.weight"]
        (w, mean, var, gamma, beta), (cb, bb, sb) = layer_blobs(shape, i, f)
        add(conv, "Convolution", cb)
        add(bn, "BatchNorm", bb)
        add(scale, "Scale", sb)
        add(conv.replace("res", "relu", 1), "ReLU", [])
        if copies:
            for tag in ("res05", "res075"):
                _, (cb2, bb2, sb2) = layer_blobs(w.shape, i + 1, 3.0)
                add(f"{conv}_{tag}", "Convolution", cb2)
                add(f"{bn}_{tag}", "BatchNorm", bb2)
                add(f"{scale}_{tag}", "Scale", sb2)
        zero = f == 0  # Caffe: a zero factor gives zero statistics, not inf
        expected.update({f"{prefix}.conv.weight": w, f"{prefix}.bn.weight": gamma,
                         f"{prefix}.bn.bias": beta,
                         f"{prefix}.bn.running_mean": mean * 0 if zero else mean,
                         f"{prefix}.bn.running_var": var * 0 if zero else var})
    add("pool1", "Pooling", [])
    c_in = shapes["aspp.c0.weight"][1]
    classes = head_classes or shapes["aspp.c0.weight"][0]
    for i in range(len(net.aspp.rates)):
        w, b = rand(classes, c_in, 3, 3), rand(classes)
        add(f"{head}_c{i}", "Convolution", [cw.blob(w, shape=w.shape, double=i == 1),
                                           enc(b, i)])
        if copies:
            for tag in ("res05", "res075"):
                add(f"{head}_c{i}_{tag}", "Convolution",
                    [enc(rand(*w.shape), 0), enc(rand(classes), 0)])
        if head == "fc1_voc12" and head_classes is None:
            expected.update({f"aspp.c{i}.weight": w, f"aspp.c{i}.bias": b})
    add(head, "Eltwise", [])
    add("loss", "SoftmaxWithLoss", [])
    for name, type_, blobs in extra:
        add(name, type_, blobs, replacement=True)
    return cw.net(layers), {k: torch.from_numpy(v) for k, v in expected.items()}


def convert_file(tmp_path, data, net, name="model.caffemodel", **kw):
    path = tmp_path / name
    path.write_bytes(data)
    return caffe_to_ours(path, net, **kw)


# --- Caffe: exact values in the right places ------------------------------------------------

@pytest.mark.parametrize("variant", ["v2", "v1", "mixed"])
def test_caffemodel_converts_to_exactly_the_written_values(tmp_path, variant):
    net = tiny()
    data, expected = synthetic_caffemodel(net, TINY_BLOCKS, variant)
    result = convert_file(tmp_path, data, net)
    state = result.state_dict
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    n_units = len(caffe_units(TINY_BLOCKS))
    assert sorted(result.filled) == sorted(expected) and result.missing == []
    assert len(expected) == len([k for k in state if not k.endswith("num_batches_tracked")])
    assert all(state[k].item() == 0 for k in state if k.endswith("num_batches_tracked"))
    assert len(result.skipped) == 2 * (3 * n_units + 4) and result.dropped == []
    assert all(("res05" in s) != ("res075" in s) for s in result.skipped)
    net.load_state_dict(state)  # strict: every key, every shape


def test_batchnorm_statistics_are_divided_by_the_scale_factor(tmp_path):
    """A non-power-of-two factor (Caffe's moving average gives ~999.98) as Caffe computes it."""
    net = tiny()
    data, expected = synthetic_caffemodel(net, TINY_BLOCKS, copies=False)
    layers = read_caffemodel(_write(tmp_path, data))
    bn = next(l for l in layers if l.name == "bn2a_branch2a")
    f = np.float32(999.982)
    mean = np.random.default_rng(1).standard_normal(bn.blobs[0].data.shape).astype(np.float32)
    bn.blobs[0].data, bn.blobs[2].data = mean * f, np.array([f], np.float32)
    state = caffe_to_ours(layers, net).state_dict
    got = state["backbone.res2.a.reduce.bn.running_mean"].numpy()
    mean = mean.ravel()  # this blob was written with the legacy 1x1x1xN dims
    np.testing.assert_allclose(got, mean, rtol=1e-6)
    assert np.array_equal(got, (mean * f) * (np.float32(1) / f))


def _write(tmp_path, data, name="model.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_resnet101_release_names_all_map(tmp_path):
    """The full ResNet-101 name set of the release (res3b1..b3, res4b1..b22, 21-class ASPP),
    at width 8 to stay small, through the CLI: every one of the 632 tensors comes from the file."""
    net = DeepLabV2(num_classes=21, depth=101, width=8)
    data, expected = synthetic_caffemodel(net, R101_BLOCKS, "v2")
    path = _write(tmp_path, data, "train_iter_20000.caffemodel")
    out = tmp_path / "voc.pth"
    assert main(["caffe", str(path), str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == net.arch and len(ckpt["model"]) == 632
    for key, value in expected.items():
        assert torch.equal(ckpt["model"][key], value), key
    assert len(expected) == 632 - 104  # every tensor but the 104 BatchNorm counters
    assert ckpt["trained_on"] == "train_aug" and ckpt["input_norm"] == "caffe"
    # the release's test recipe and VOC's classes travel with the weights
    recipe = ckpt["recipe"]
    assert (recipe["msc_scales"], recipe["msc_fusion"], recipe["mode"], recipe["pad_to"]) == (
        [0.75, 0.5], "max", "voc", 513) and "test.prototxt" in recipe["source"]
    assert ckpt["dataset"] == "voc" and ckpt["classes"][15] == "person"
    assert ckpt["palette"][15] == [192, 128, 128]
    prov = ckpt["provenance"]
    assert prov["sha256"] == hashlib.sha256(data).hexdigest() and prov["converter"] == "caffe"
    assert prov["source"] == str(path) and prov["input_norm"] == "caffe"
    assert len(prov["skipped"]) == 2 * (3 * 104 + 4) and prov["dropped"] == []
    sidecar = json.loads(Path(str(out) + ".json").read_text())
    assert sidecar["config"]["converter"] == "caffe" and sidecar["filled"] == 632


def test_init_caffemodel_fills_the_backbone_and_drops_fc1_coco(tmp_path, capsys):
    net = tiny()
    data, expected = synthetic_caffemodel(net, TINY_BLOCKS, head="fc1_coco", head_classes=91)
    path = _write(tmp_path, data, "init.caffemodel")
    out = tmp_path / "init.pth"
    assert main(["caffe", str(path), str(out), "--num-classes", "5"]) == 0
    ckpt = torch.load(out, weights_only=True)
    for key, value in expected.items():
        assert torch.equal(ckpt["model"][key], value), key
    torch.manual_seed(0)  # the converter's --seed default: the ASPP keeps its N(0, 0.01) init
    fresh = build_model(ckpt["arch"]).state_dict()
    aspp = [k for k in fresh if k.startswith("aspp.")]
    assert len(aspp) == 8 and all(torch.equal(ckpt["model"][k], fresh[k]) for k in aspp)
    assert ckpt["trained_on"] == "coco"
    dropped = [d.split()[0] for d in ckpt["provenance"]["dropped"]]
    assert dropped == [f"fc1_coco_c{i}" for i in range(4)]
    assert sorted(ckpt["provenance"]["left_at_init"]) == sorted(aspp)
    assert "dropped 4" in capsys.readouterr().out


def test_a_head_with_another_class_count_is_dropped(tmp_path):
    data, expected = synthetic_caffemodel(tiny(5), TINY_BLOCKS, copies=False)
    net3 = tiny(3)
    result = convert_file(tmp_path, data, net3)
    assert len(result.dropped) == 4 and "5 classes" in result.dropped[0]
    assert sorted(result.missing) == sorted(k for k in net3.state_dict() if k.startswith("aspp."))
    assert torch.equal(result.state_dict["aspp.c2.weight"], net3.state_dict()["aspp.c2.weight"])
    assert torch.equal(result.state_dict["backbone.res5.a.increase.conv.weight"],
                       expected["backbone.res5.a.increase.conv.weight"])


def test_train2_model_is_marked_and_warns_on_val(tmp_path, capsys):
    data, _ = synthetic_caffemodel(tiny(), TINY_BLOCKS, copies=False)
    path = _write(tmp_path, data, "train2_iter_20000.caffemodel")
    assert main(["caffe", str(path), str(tmp_path / "t2.pth")]) == 0
    ckpt = torch.load(tmp_path / "t2.pth", weights_only=True)
    assert ckpt["trained_on"] == "trainval"
    capsys.readouterr()
    assert warn_if_trained_on(ckpt, "val") is True
    err = capsys.readouterr().err
    assert "WARNING" in err and "'val'" in err and str(path) in err and err.count("\n") >= 5
    assert warn_if_trained_on(ckpt, "test") is False


@pytest.mark.parametrize("trained_on,split,warns", [
    ("train_aug", "val", False), ("train_aug", "train", True), ("trainval", "val", True),
    ("val", "val", True), ("coco", "val", False), (None, "val", False),
    (["train_aug", "val"], "val", True), ("trainval_aug", "val", True)])
def test_warn_if_trained_on(trained_on, split, warns, capsys):
    assert warn_if_trained_on({"trained_on": trained_on}, split) is warns
    assert ("WARNING" in capsys.readouterr().err) is warns


# --- Caffe: errors ---------------------------------------------------------------------------

def test_truncated_file_names_the_layer(tmp_path):
    data, _ = synthetic_caffemodel(tiny(), TINY_BLOCKS, copies=False)
    cut = len(data) // 2
    with pytest.raises(CaffeModelError, match=rf"truncated at byte {cut}.*") as e:
        read_caffemodel(_write(tmp_path, data[:cut]))
    layers = [l.name for l in iter_layers(data)]
    name = str(e.value).split("in layer '")[1].split("'")[0]
    assert name in layers and "model.caffemodel" in str(e.value)


@pytest.mark.parametrize("seed", range(8))
def test_random_garbage_is_a_clear_error(tmp_path, seed):
    garbage = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(CaffeModelError, match="caffemodel"):
        read_caffemodel(_write(tmp_path, garbage))


def _one_layer(blob_bytes):
    return cw.net([(2, cw.layer_v2("conv1", "Convolution", [blob_bytes]))])


@pytest.mark.parametrize("data,message", [
    (cw.key(100, 2) + cw.varint(2 ** 62) + b"abc", f"needs {2 ** 62} bytes"),
    (cw.length_field(100, cw.string_field(1, "conv1") + cw.key(7, 2) + cw.varint(2 ** 40) + b"\x00" * 8),
     f"claims {2 ** 40} bytes"),
    (cw.key(100, 2) + b"\xff" * 11 + b"\x01", "longer than 10 bytes"),
    (cw.key(100, 3) + b"\x00", "group"),
    (cw.key(100, 7), "invalid wire type"),
    (_one_layer(cw.blob(np.ones(4), legacy=(2 ** 30, 2 ** 30, 2 ** 30, 2 ** 30))), "declares shape"),
    (_one_layer(cw.blob(np.ones(6)) + cw.length_field(7, cw.int_field(1, -2))),
     "negative blob dimension"),
    (_one_layer(cw.length_field(5, b"\x00" * 7)), "not a multiple of 4"),
    (cw.length_field(100, cw.string_field(2, "Convolution")), "without a name"),
    (b"PK\x03\x04" + b"\x00" * 40, "zip archive"),
    (b"", "no layers found"),
])
def test_malformed_files_give_their_errors(tmp_path, data, message):
    with pytest.raises(CaffeModelError, match=message):
        read_caffemodel(_write(tmp_path, data))


def test_mutated_files_never_crash_the_decoder():
    """Random byte flips and cuts of a small file: decoded, or a CaffeModelError; nothing else."""
    layers = [(2, cw.layer_v2("conv1", "Convolution", [cw.blob(np.arange(6.0), shape=(1, 6))])),
              (1, cw.layer_v1("bn_conv1", "BatchNorm", [cw.blob(np.ones(2), legacy=(1, 1, 1, 2),
                                                                packed=False)]))]
    data = cw.net(layers)
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), rng.integers(1, 4)):
            b[pos] = rng.integers(0, 256)
        b = bytes(b[:rng.integers(1, len(b) + 1)]) if rng.random() < 0.3 else bytes(b)
        try:
            list(iter_layers(b))
            outcomes["ok"] += 1
        except CaffeModelError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 20


def test_wrong_shape_names_the_layer_and_both_shapes(tmp_path):
    net = tiny()
    bad = np.zeros((8, 3, 5, 5), np.float32)
    data, _ = synthetic_caffemodel(net, TINY_BLOCKS, copies=False, omit=("conv1",),
                                   extra=[("conv1", "Convolution", [cw.blob(bad, shape=bad.shape)])])
    with pytest.raises(ConversionError, match=r"'conv1'.*\(8, 3, 5, 5\).*\(8, 3, 7, 7\)"):
        convert_file(tmp_path, data, net)


def test_unmapped_layer_is_an_error(tmp_path):
    net = tiny()
    data, _ = synthetic_caffemodel(net, TINY_BLOCKS, copies=False, extra=[
        ("res6a_branch2a", "Convolution", [cw.blob(np.ones((2, 2, 1, 1)), shape=(2, 2, 1, 1))])])
    with pytest.raises(ConversionError, match="'res6a_branch2a'.*no home"):
        convert_file(tmp_path, data, net)


def test_missing_layer_is_an_error_unless_partial(tmp_path):
    net = tiny()
    data, _ = synthetic_caffemodel(net, TINY_BLOCKS, copies=False, omit=("bn3a_branch2b",))
    with pytest.raises(ConversionError, match=r"unfilled: backbone\.res3\.a\.conv3x3\.bn\.running_mean, "
                                              r"backbone\.res3\.a\.conv3x3\.bn\.running_var"):
        convert_file(tmp_path, data, net)
    result = convert_file(tmp_path, data, net, allow_partial=True)
    assert result.missing == ["backbone.res3.a.conv3x3.bn.running_mean",
                              "backbone.res3.a.conv3x3.bn.running_var"]


def test_batchnorm_with_wrong_blob_count_is_an_error(tmp_path):
    net = tiny()
    data, _ = synthetic_caffemodel(net, TINY_BLOCKS, copies=False, omit=("bn_conv1",), extra=[
        ("bn_conv1", "BatchNorm", [cw.blob(np.ones(8), shape=(8,))] * 2)])
    with pytest.raises(ConversionError, match="'bn_conv1'.*2 blobs.*has 3"):
        convert_file(tmp_path, data, net)


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    path = _write(tmp_path, b"\x08" + b"\xff" * 20)
    assert main(["caffe", str(path), str(tmp_path / "out.pth")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()


def test_script_help_runs_standalone():
    script = ROOT / "Implementation" / "convert.py"
    out = subprocess.run([sys.executable, str(script), "caffe", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--num-classes" in out.stdout
    assert "liangchiehchen.com" in out.stdout


# --- the published port ----------------------------------------------------------------------

def _published_state(published_keys, seed=0):
    """Random values with the exact published keys and shapes, scaled so a forward pass stays finite."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in published_keys.items():
        if key.endswith("num_batches_tracked"):
            v = torch.randint(0, 1000, shape, generator=g)
        elif key.endswith("running_var"):
            v = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 4:
            v = torch.randn(shape, generator=g) * (shape[1] * shape[2] * shape[3]) ** -0.5
        else:
            v = torch.randn(shape, generator=g) * 0.1 + (key.endswith("bn.weight"))
        sd["base." + key] = v
    return sd


def test_published_round_trip_is_lossless_and_runs(resnet101, published_keys):
    sd = _published_state(published_keys)
    ours = published_to_ours(sd)
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in resnet101.state_dict().items()}
    # a few homes spelled out: the last block of res4 is b22, res3's last is b3, res2's is c
    for our_key, key in [("res4.b22.conv3x3.conv.weight", "layer4.block23.conv3x3.conv.weight"),
                         ("res3.b3.increase.bn.running_var", "layer3.block4.increase.bn.running_var"),
                         ("res2.c.reduce.bn.bias", "layer2.block3.reduce.bn.bias"),
                         ("conv1.bn.running_mean", "layer1.conv1.bn.running_mean")]:
        assert ours["backbone." + our_key] is sd["base." + key]
    back = ours_to_published(ours)
    assert list(back) == list(sd) and len(back) == 632
    assert all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    saved = {k: v.clone() for k, v in resnet101.state_dict().items()}
    try:
        resnet101.load_state_dict(ours)  # strict
        with torch.no_grad():
            y = resnet101(torch.randn(1, 3, 33, 33))
        assert y.shape == (1, 21, 5, 5) and torch.isfinite(y).all() and y.abs().max() > 0
    finally:
        resnet101.load_state_dict(saved)


def test_published_keys_without_base_prefix_are_accepted(published_keys):
    sd = {k: torch.zeros(s) for k, s in list(published_keys.items())[:6]}
    assert sorted(published_to_ours(sd)) == sorted("backbone.conv1." + k[len("layer1.conv1."):] for k in sd)


def test_pth_cli_both_ways(tmp_path):
    net = tiny()
    published = ours_to_published(net.state_dict())
    src = tmp_path / "deeplabv2_resnet101_msc-vocaug-20000.pth"
    torch.save({"state_dict": published}, src)
    out, back = tmp_path / "ours.pth", tmp_path / "back.pth"
    assert main(["pth", str(src), str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == net.arch and ckpt["trained_on"] == "train_aug"
    assert ckpt["input_norm"] == "caffe" and ckpt["provenance"]["converter"] == "pth"
    assert (ckpt["recipe"]["mode"], ckpt["recipe"]["interp"], ckpt["recipe"]["msc_scales"]) == (
        "full", "pytorch", [0.75, 0.5]) and "kazuto1011" in ckpt["recipe"]["source"]
    assert all(torch.equal(ckpt["model"][k], v) for k, v in net.state_dict().items())
    assert main(["pth", str(out), str(back), "--to-published"]) == 0
    restored = torch.load(back, weights_only=True)
    assert list(restored) == list(published)
    assert all(torch.equal(restored[k], v) for k, v in published.items())


class NotAllowed:
    """A pickled object weights_only loading must refuse."""


@pytest.mark.parametrize("payload,message", [
    ("garbage", "cannot read"), ("pickle", "cannot read"), ("torchvision", "torchvision"),
    ("ours", "--to-published")])
def test_pth_bad_inputs(tmp_path, capsys, payload, message):
    path = tmp_path / "in.pth"
    if payload == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 10)
    elif payload == "pickle":
        torch.save({"x": NotAllowed()}, path)
    elif payload == "torchvision":
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, path)
    else:
        torch.save({"format": "deeplab-v2", "model": {}}, path)
    assert main(["pth", str(path), str(tmp_path / "out.pth")]) == 2
    assert message in capsys.readouterr().err


# --- torchvision ------------------------------------------------------------------------------

def _random_torchvision(builder):
    tv = builder(weights=None).eval()
    for m in tv.modules():  # random BN statistics, so their mapping is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return tv


def test_torchvision_backbone_gives_the_same_features():
    tv = _random_torchvision(torchvision.models.resnet50)
    ours = DeepLabV2(num_classes=5, depth=50, style="pytorch", strides=(1, 2, 2, 2),
                     dilations=(1, 1, 1, 1)).eval()
    mapped = torchvision_to_ours(tv.state_dict())
    assert sorted(mapped) == sorted(k for k in ours.state_dict() if k.startswith("backbone."))
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert unexpected == [] and all(k.startswith("aspp.") for k in missing)
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(t))))
        got = ours.backbone(x)
    assert got.shape == ref.shape == (1, 2048, 3, 3) and ref.abs().max() > 0.1
    assert_close_to_scale(got, ref, DEEP)


def test_torchvision_resnet101_keys_map_onto_our_backbone(resnet101):
    sd = torchvision.models.resnet101(weights=None).state_dict()
    mapped = torchvision_to_ours(sd)
    ours = {k: tuple(v.shape) for k, v in resnet101.state_dict().items() if k.startswith("backbone.")}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours  # shapes match in both styles
    assert mapped["backbone.res4.b22.conv3x3.conv.weight"] is sd["layer3.22.conv2.weight"]
    assert mapped["backbone.res2.a.shortcut.bn.running_var"] is sd["layer1.0.downsample.1.running_var"]


def test_torchvision_cli_local_file_and_download(tmp_path, monkeypatch):
    sd = _random_torchvision(torchvision.models.resnet50).state_dict()
    del sd["bn1.num_batches_tracked"]  # old files lack the counter
    src = tmp_path / "resnet50-0676ba61.pth"
    torch.save(sd, src)
    out = tmp_path / "imagenet.pth"
    assert main(["torchvision", str(src), str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"]["style"] == "pytorch" and ckpt["arch"]["depth"] == 50
    assert ckpt["input_norm"] == "imagenet" and ckpt["trained_on"] == "imagenet"
    assert ckpt["provenance"]["dropped"] == ["fc.weight (ImageNet classifier)",
                                             "fc.bias (ImageNet classifier)"]
    assert torch.equal(ckpt["model"]["backbone.res5.c.increase.bn.running_mean"],
                       sd["layer4.2.bn3.running_mean"])
    assert ckpt["model"]["backbone.conv1.bn.num_batches_tracked"].item() == 0

    calls = []
    monkeypatch.setattr(torchvision.models.ResNet101_Weights, "get_state_dict",
                        lambda self, progress=True: calls.append(progress) or sd)
    assert main(["torchvision", "download", str(tmp_path / "dl.pth")]) == 0
    ckpt = torch.load(tmp_path / "dl.pth", weights_only=True)
    assert calls == [True] and ckpt["provenance"]["source"].endswith("resnet101-63fe2227.pth")
    assert load_torchvision_state("download") is sd and calls == [True, True]  # train.py's path
    local = load_torchvision_state(src)
    assert list(local) == list(sd) and all(torch.equal(local[k], sd[k]) for k in sd)
