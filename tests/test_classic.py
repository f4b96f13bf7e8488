"""The classic networks (FCN, U-Net, SegNet, PSPNet, GCN, DUC-HDC): parameter counts equal to
public reference implementations, output sizes, FCN's crops and upsampling, SegNet's unpooling,
HDC's rates, every network trained and evaluated through the scripts, and the two converters
(torchvision ImageNet backbones; the FCN Caffe release, on a synthetic caffemodel written by
tests/caffe_writer.py with the release's layer names spelled out here)."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from PIL import Image

import caffe_writer as cw
import evaluate
import infer
import train
from convert import main as convert_main
from seglab.checkpoint import load_checkpoint
from seglab.config import load_config
from seglab.models import ARCHITECTURES, build_model, param_groups
from torchvision.models import resnet as tv_resnet
from seglab.models.fcn import FCNVGG
from seglab.models.segnet import SegNet
from numerics import DEEP, ONE_OP, assert_close_to_scale

# Parameter counts (21 classes) of public reference implementations, computed by running (or,
# for Caffe prototxts, counting) their code outside this repository:
#   seed    ZijunDeng/pytorch-semantic-segmentation @ 4a1721f9a3284788336430efb140288096c6dd09
#   seed0   the same repository @ 2c72b7185776dd82eb09625c598a58749dd1519b (models/fcn{8,16,32}.py:
#           FCN{8,16,32}ResNet (ResNet-152), FCN{8,16,32}DenseNet (DenseNet-201))
#   unet    jvanvugt/pytorch-unet @ 7e577223d048ace32c35c3f1e18f36cc9a8d1971,
#           UNet(in_channels=3, n_classes=21): "the exact version used in the original paper"
#   segnet  alexgkendall/SegNet-Tutorial @ bb68b64e72cb004b3ed927fee0f5624dd8097498,
#           Example_Models/segnet_pascal.prototxt (conv weights + biases, BN scale + shift)
#   semseg  hszhao/semseg @ 4f274c3f276778228bc14a4565822d46359f0cc8, PSPNet(layers=101,
#           classes=21): 68,073,706, of which its deep-stem ResNet-101 has 123,776 more than
#           torchvision's ResNet-101 (model/resnet.py resnet101() vs torchvision resnet101)
#   duc     TuSimple/TuSimple-DUC @ f3b05b21cf3252baf89c7b88667f55cc74cd5418,
#           get_symbol_duc_hdc(label_num=21) run against a stand-in for mxnet.symbol that counts
#           parameters: 141,719,744, with the same deep stem (123,776 more than torchvision's)
DEEP_STEM = 123_776
REFERENCE_COUNTS = [
    ("fcn8s_vgg16", {}, 134_489_759, "seed FCN8s"),
    ("fcn16s_vgg16", {}, 134_815_994, "seed FCN16VGG"),
    ("fcn32s_vgg16", {}, 136_152_917, "seed FCN32VGG"),
    ("fcn8s_resnet152", {}, 58_346_143, "seed0 FCN8ResNet"),
    ("fcn16s_resnet152", {}, 58_667_002, "seed0 FCN16ResNet"),
    ("fcn32s_resnet152", {}, 59_993_173, "seed0 FCN32ResNet"),
    ("fcn8s_densenet201", {}, 18_286_815, "seed0 FCN8DenseNet"),
    ("fcn16s_densenet201", {}, 18_612_538, "seed0 FCN16DenseNet"),
    ("fcn32s_densenet201", {}, 19_939_605, "seed0 FCN32DenseNet"),
    ("unet", {}, 31_033_045, "unet UNet"),
    ("unet", {"batch_norm": True, "skip": "resize"}, 31_044_821, "seed UNet"),
    ("segnet_vgg16bn", {}, 29_455_125, "segnet segnet_pascal.prototxt"),
    ("segnet_vgg16bn", {"num_classes": 11}, 29_449_355, "segnet Models/segnet_train.prototxt"),
    ("pspnet_resnet101", {}, 68_073_706 - DEEP_STEM, "semseg PSPNet, torchvision stem"),
    ("pspnet_resnet101", {"aux_head": "1x1", "bn_momentum": 0.95}, 65_606_250, "seed PSPNet"),
    ("gcn_resnet152", {"k": 7, "upsample": "bilinear"}, 59_369_620, "seed GCN"),
    ("duc_hdc_resnet101", {}, 141_719_744 - DEEP_STEM, "duc release, torchvision stem"),
    ("duc_hdc_resnet101", {"depth": 152, "duc_rates": [1], "duc_bn_relu": True}, 82_920_448,
     "seed ResNetDUCHDC"),
    ("duc_hdc_resnet101", {"depth": 152, "duc_rates": [1], "duc_bn_relu": True,
                           "res4_rates": [2], "res5_rates": [4]}, 82_920_448, "seed ResNetDUC"),
]
CLASSIC = [n for n in ARCHITECTURES if n.startswith(("fcn8s_", "fcn16s_", "fcn32s_")) or n in (
    "unet", "segnet_vgg16bn", "pspnet_resnet101", "gcn_resnet152", "duc_hdc_resnet101")]
# A tiny form of each (tests only: ResNet-10 / DenseNet-13, narrow VGG / U-Net / heads).
TINY = {"vgg16": {"width": 4, "fc_width": 8}, "resnet152": {"depth": 10},
        "densenet201": {"depth": 13}, "unet": {"width": 4}, "segnet_vgg16bn": {"width": 4},
        "pspnet_resnet101": {"depth": 10, "head_width": 16}, "gcn_resnet152": {"depth": 10},
        "duc_hdc_resnet101": {"depth": 10, "duc_rates": [3]}}


def block_dilations(layer) -> list[int]:
    """The dilation of each block's 3x3 convolution (Bottleneck conv2, BasicBlock conv1)."""
    return [(b.conv2 if isinstance(b, tv_resnet.Bottleneck) else b.conv1).dilation[0]
            for b in layer]


def tiny(name):
    return TINY.get(name) or TINY[name.split("_", 1)[1]]


def count(arch):
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(arch).parameters())


def test_every_classic_network_is_registered():
    assert len(CLASSIC) == 14 and {n for n, *_ in REFERENCE_COUNTS} == set(CLASSIC)


@pytest.mark.parametrize("name,options,expected,reference", REFERENCE_COUNTS)
def test_parameter_counts_equal_the_references(name, options, expected, reference):
    assert count(dict({"name": name, "num_classes": 21}, **options)) == expected, reference


def test_gcn_k15_with_deconvolutions_adds_what_the_paper_describes():
    """The paper's GCN (k = 15, Fig. 2: 5 deconvolutions) vs the seed's (k = 7, bilinear): each
    of the 4 global convolutions has two k x 1 + 1 x k branches (cin -> C -> C), each deconv
    is C x C x 4 x 4."""
    c, ins = 21, (256, 512, 1024, 2048)
    gcm = lambda k: sum(2 * (cin * c * k + c + c * c * k + c) for cin in ins)  # noqa: E731
    default = count({"name": "gcn_resnet152", "num_classes": c})
    assert default == 59_369_620 - gcm(7) + gcm(15) + 5 * c * c * 16


@pytest.mark.parametrize("name", CLASSIC)
@pytest.mark.parametrize("size", [(1, 1), (17, 23), (33, 33), (40, 9)])
def test_output_size(name, size):
    """Full-resolution decoders give the input size, odd sizes included; PSPNet gives stride 8."""
    torch.manual_seed(0)
    net = build_model(dict(tiny(name), name=name, num_classes=5)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, *size))
    stride = ARCHITECTURES[name].output_stride(net.arch)
    assert out.shape == (1, 5, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", CLASSIC)
def test_published_forms_at_voc_sizes(name):
    """Full-size networks (meta device: shapes only) on a VOC image (500 x 375) and the padded
    513 x 513 evaluation input; PSPNet's training outputs too."""
    with torch.device("meta"):
        net = build_model({"name": name, "num_classes": 21}).eval()
        stride = ARCHITECTURES[name].output_stride(net.arch)
        for h, w in ((375, 500), (513, 513)):
            assert net(torch.empty(1, 3, h, w)).shape == (1, 21, (h - 1) // stride + 1,
                                                          (w - 1) // stride + 1)
        if name == "pspnet_resnet101":
            out = net.train()(torch.empty(2, 3, 473, 473))
            assert out["out"].shape == out["aux"].shape == (2, 21, 60, 60)


def test_unet_overlap_tile_geometry_and_mirroring():
    from seglab.models.unet import mirror_pad, valid_tile
    assert valid_tile(388) == (572, 388)  # the paper's Fig. 1 tile
    assert all(valid_tile(h)[1] >= h and valid_tile(h)[0] - valid_tile(h)[1] == 184
               for h in range(1, 600))
    for h, w in ((36, 36), (5, 7), (2, 9), (1, 4)):  # pads much wider than the image
        x = torch.randn(1, 2, h, w)
        ref = np.pad(x.numpy(), ((0, 0), (0, 0), (92, 100), (92, 3)), mode="reflect")
        assert np.array_equal(mirror_pad(x, 92, 100, 92, 3).numpy(), ref)


def test_fcn_crop_offsets_are_the_releases():
    """voc-fcn8s/16s/32s deploy.prototxt (fcn.berkeleyvision.org): crop_param offsets 5 / 9 / 31,
    5 / 27 and 19; ours are derived from the layer geometry."""
    for stride, offsets in ((8, [5, 9, 31]), (16, [5, 27]), (32, [19])):
        assert FCNVGG(21, stride, width=4, fc_width=8).offsets == offsets


def test_fcn_upsampling_is_bilinear_fixed_or_learned_and_scores_start_at_zero():
    net = FCNVGG(3, 8, width=4, fc_width=8)
    k4 = torch.tensor([0.25, 0.75, 0.75, 0.25])  # bilinear x2: 1 - |x - 1.5| / 2
    assert torch.allclose(net.upscore2.weight[1, 1], k4[:, None] * k4[None, :])
    assert net.upscore2.weight[0, 1].abs().sum() == 0  # one kernel per class
    assert all(not getattr(net, n).weight.requires_grad for n in net.upsamplers)
    learned = FCNVGG(3, 8, 4, 8, learn_upsampling=True)
    assert all(getattr(learned, n).weight.requires_grad for n in learned.upsamplers)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        assert getattr(net, name).weight.abs().sum() == 0 == getattr(net, name).bias.abs().sum()
    # A constant score map upsampled by the fixed x8 kernel stays constant inside the map.
    y = net.upscore8(torch.ones(1, 3, 6, 6))
    assert torch.allclose(y[:, :, 8:-8, 8:-8], torch.ones(1, 3, y.shape[-2] - 16, y.shape[-1] - 16))
    # The release's solver: biases at twice the lr and without decay; fixed deconvs not trained.
    net.arch = {"name": "fcn8s_vgg16"}
    groups = {g["name"]: g for g in param_groups(net, 1e-3, 5e-4)}
    assert groups["bias"]["lr_mult"] == 2 and groups["bias"]["weight_decay"] == 0
    trained = {id(p) for g in groups.values() for p in g["params"]}
    assert id(net.upscore8.weight) not in trained and id(net.fc6.weight) in trained


def test_segnet_unpooling_puts_values_at_the_recorded_indices():
    torch.manual_seed(0)
    net = SegNet(3, width=4).eval()
    seen = {}
    start, stop = net.stages[-1]
    net.encoder[stop - 2].register_forward_hook(lambda m, i, o: seen.update(pre=o.clone()))
    net.decoder[0][0].register_forward_hook(lambda m, i, o: seen.update(unpooled=i[0].clone()))
    with torch.no_grad():
        net(torch.randn(1, 3, 35, 45))  # stage 5 input 3 x 3: ceil pooling to 2 x 2
    pre, unpooled = seen["pre"][0].numpy(), seen["unpooled"][0].numpy()
    assert pre.shape == unpooled.shape == (32, 3, 3)
    expected = np.zeros_like(pre)
    for c in range(pre.shape[0]):  # 2x2 windows, the last one clipped (Caffe rounds up)
        for i in range(0, 3, 2):
            for j in range(0, 3, 2):
                window = pre[c, i:i + 2, j:j + 2]
                a, b = np.unravel_index(np.argmax(window), window.shape)
                expected[c, i + a, j + b] = window[a, b]
    assert np.array_equal(unpooled, expected)
    assert (unpooled != 0).sum() > 32  # post-ReLU maps: most windows have a positive maximum


def test_hdc_rates_and_no_gridding():
    with torch.device("meta"):
        net = build_model({"name": "duc_hdc_resnet101", "num_classes": 21})
    res4, res5 = block_dilations(net.backbone.layer3), block_dilations(net.backbone.layer4)
    assert res4 == [1, 2, 5, 9] * 5 + [1, 2, 5] and res5 == [5, 9, 17]  # Sec. 3.2, 23 + 3 blocks

    def support(rates):
        """Pixels that reach one output through a stack of 3x3 convolutions at `rates`."""
        x = torch.zeros(1, 1, 81, 81)
        x[0, 0, 40, 40] = 1
        for r in rates:
            x = F.conv2d(x, torch.ones(1, 1, 3, 3), padding=r, dilation=r)
        return (x[0, 0] > 0).numpy()

    hdc = support(res4[:4])
    reach = sum(res4[:4])
    assert hdc[40 - reach:41 + reach, 40 - reach:41 + reach].all()  # a solid square: no holes
    gridded = support([2, 2, 2, 2])  # the seed's plain "DUC": every other pixel only
    assert not gridded[40 - 8:41 + 8, 40 - 8:41 + 8].all() and gridded[::2, ::2].any()


def test_pspnet_trains_with_the_aux_head_at_stride_8():
    torch.manual_seed(0)
    net = build_model(dict(tiny("pspnet_resnet101"), name="pspnet_resnet101", num_classes=5))
    out = net.train()(torch.randn(2, 3, 33, 41))
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 5, 5, 6)
    assert ARCHITECTURES["pspnet_resnet101"].loss_weights == (1.0, 0.4)
    assert [b.conv1.dilation[0] for b in net.backbone.layer4] == [4]  # OS 8, dilated
    with pytest.raises(ValueError, match="batch_per_step >= 2"):  # the seed's batch-1 breakage
        net(torch.randn(1, 3, 33, 33))


def run_config(tmp_path, name):
    cfg = {"data": {"root": str(tmp_path.parent / "demo"), "demo": True, "crop": 33, "workers": 0,
                    "demo_args": {"num_train": 4, "num_val": 2, "size": [40, 48], "seed": 1}},
           "model": {"name": name, "arch": tiny(name)},
           "train": {"init": "scratch", "iterations": 3, "effective_batch": 2,
                     "batch_per_step": 2, "base_lr": 0.01, "checkpoint_every": 3},
           "eval": {"pad_to": 49}, "crf": {"workers": 1, "iterations": 2},
           "run": {"out": str(tmp_path / "runs")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("name", CLASSIC)
def test_each_network_trains_and_evaluates_through_the_scripts(tmp_path, name):
    cfg, run = run_config(tmp_path, name), tmp_path / "run"
    assert train.main(["--config", cfg, "--run-dir", str(run)]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert ckpt["arch"]["name"] == name and ckpt["input_norm"] == ARCHITECTURES[name].input_norm
    with open(run / "log.csv") as f:
        header, *rows = f.read().splitlines()
    assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[2])) for r in rows)
    # each trains and tests with its own recipe, single scale, not DeepLab v2's MSC
    assert ckpt["recipe"]["msc_scales"] == [] and ckpt["config"]["model"]["msc_scales"] == []
    assert not any(c.startswith("loss_0.") for c in header.split(","))
    torch.manual_seed(0)  # train.seed: the network as initialised; training must have moved it
    init = build_model(ckpt["arch"]).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in ckpt["model"].items()
               if v.is_floating_point())
    scores = json.loads((run / "eval_val" / "scores_crf.json").read_text())
    assert scores["num_images"] == 2 and 0 <= scores["miou"] <= 1 and scores["crf_params"]
    assert scores["msc_scales"] == [] and scores["recipe"]["sources"]["msc_scales"] == "checkpoint"
    out = tmp_path / "again"
    assert evaluate.main(["--checkpoint", str(run / "checkpoints" / "final.pth"), "--config",
                          cfg, "--out", str(out), "--crf"]) == 0
    again = json.loads((out / "scores_crf.json").read_text())
    assert again["miou"] == pytest.approx(scores["miou"])
    image = next((tmp_path.parent / "demo").rglob("val_0000.jpg"))
    assert infer.main(["--checkpoint", str(run / "checkpoints" / "final.pth"), str(image),
                       "--out", str(tmp_path / "infer"), "--device", "cpu"]) == 0
    with Image.open(next((tmp_path / "infer" / "pred").rglob("*.png"))) as im:
        assert im.size == Image.open(image).size


def test_presets_load_and_name_their_networks():
    for preset, name in (("fcn32s_vgg16", "fcn32s_vgg16"), ("fcn8s_vgg16_atonce", "fcn8s_vgg16"),
                         ("pspnet_resnet101", "pspnet_resnet101"), ("unet", "unet"),
                         ("segnet_vgg16bn", "segnet_vgg16bn"), ("gcn_resnet152", "gcn_resnet152"),
                         ("duc_hdc_resnet101", "duc_hdc_resnet101")):
        assert load_config(preset)["model"]["name"] == name, preset
    assert load_config("pspnet_resnet101")["train"]["aux_weight"] == 0.4


# --- torchvision ImageNet backbones ----------------------------------------------------------

def save(sd, path):
    torch.save(sd, path)
    return str(path)


def test_resnet_backbone_gives_torchvision_features_and_trains_from_it(tmp_path, capsys):
    torch.manual_seed(0)
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    sd = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    out = tmp_path / "gcn.pth"
    assert convert_main(["imagenet_backbones", f"gcn_resnet152={save(sd, tmp_path / 'r.pth')}",
                         str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"]["depth"] == 10 and ckpt["arch"]["frozen_bn"] is True
    assert ckpt["trained_on"] == "imagenet" and ckpt["input_norm"] == "imagenet"
    assert ckpt["provenance"]["dropped"] == ["fc.weight (ImageNet classifier)",
                                             "fc.bias (ImageNet classifier)"]
    net = build_model(ckpt["arch"])
    net.load_state_dict(ckpt["model"])
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        b, tv = net.eval().backbone, tv.eval()
        ours = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        ref = torch.flatten(tv.avgpool(ours), 1)
        assert_close_to_scale(tv.fc(ref), tv(x), DEEP)  # the same features as torchvision's
    cfg = run_config(tmp_path, "gcn_resnet152")  # pretrained init -> frozen BN, same arch
    assert train.main(["--config", cfg, "--run-dir", str(tmp_path / "run"), "--init", str(out),
                       "train.iterations=1", "train.checkpoint_every=1", "--no-eval"]) == 0
    assert "gcn.pth" in capsys.readouterr().err


def test_densenet_backbone_with_the_old_key_spelling(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.DenseNet(32, (1, 1, 1, 1), 64)
    sd = {re.sub(r"(denselayer\d+\.(norm|conv))([12])\.", r"\1.\3.", k): v
          for k, v in tv.state_dict().items()  # torchvision's files: norm.1, conv.2, ...
          if not k.endswith("num_batches_tracked")}  # ... and no BatchNorm counters
    assert "features.denseblock1.denselayer1.norm.1.weight" in sd
    out = tmp_path / "fcn.pth"
    assert convert_main(["imagenet_backbones", f"fcn8s_densenet201={save(sd, tmp_path / 'd.pth')}",
                         str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    net = build_model(ckpt["arch"]).eval()
    net.load_state_dict(ckpt["model"])
    assert ckpt["arch"]["depth"] == 13
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close_to_scale(net.tap_features(x)[32], tv.eval().features(x), DEEP)


def tiny_vgg_file(tmp_path, batch_norm=False):
    from seglab.models.backbones import vgg16_features
    sd = {f"features.{k}": v for k, v in vgg16_features(batch_norm, width=4).state_dict().items()}
    sd.update({"classifier.0.weight": torch.randn(8, 32 * 49), "classifier.0.bias": torch.randn(8),
               "classifier.3.weight": torch.randn(8, 8), "classifier.3.bias": torch.randn(8),
               "classifier.6.weight": torch.randn(1000, 8), "classifier.6.bias": torch.randn(1000)})
    return sd, save(sd, tmp_path / f"vgg{'_bn' if batch_norm else ''}.pth")


def test_vgg16_classifier_becomes_fc6_fc7_and_presets_name_the_arch(tmp_path, monkeypatch):
    sd, path = tiny_vgg_file(tmp_path)
    out = tmp_path / "fcn.pth"
    assert convert_main(["imagenet_backbones", f"fcn8s_vgg16_atonce={path}", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"]["name"] == "fcn8s_vgg16" and ckpt["arch"]["scale_skips"] is True
    assert (ckpt["arch"]["width"], ckpt["arch"]["fc_width"]) == (4, 8)
    net = build_model(ckpt["arch"])
    net.load_state_dict(ckpt["model"])
    pool5 = torch.randn(2, 32, 7, 7)
    with torch.no_grad():  # "convolutionalization": the 7x7 conv on pool5 is the Linear layer
        fc6 = net.fc6(pool5).flatten(1)
    assert_close_to_scale(fc6, F.linear(pool5.flatten(1), sd["classifier.0.weight"],
                                        sd["classifier.0.bias"]), ONE_OP)
    calls = []
    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict",
                        lambda self, progress=True: calls.append(progress) or sd)
    assert convert_main(["imagenet_backbones", "fcn32s_vgg16=download", str(tmp_path / "d")]) == 0
    source = torch.load(tmp_path / "d", weights_only=True)["provenance"]["source"]
    assert calls == [True] and source.endswith("vgg16-397923af.pth")


def test_segnet_takes_vgg16_bn_and_bad_inputs_are_clear_errors(tmp_path, capsys):
    _, bn = tiny_vgg_file(tmp_path, batch_norm=True)
    assert convert_main(["imagenet_backbones", f"segnet_vgg16bn={bn}", str(tmp_path / "s")]) == 0
    _, plain = tiny_vgg_file(tmp_path)
    for text, message in ((f"segnet_vgg16bn={plain}", "needs torchvision's vgg16_bn"),
                          (f"unet={plain}", "U-Net has no ImageNet backbone"),
                          (plain, "must be NAME=FILE"),
                          (f"nope={plain}", "neither an architecture")):
        assert convert_main(["imagenet_backbones", text, str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


# --- the FCN Caffe release (layer names of voc-fcn8s/deploy.prototxt, fcn.berkeleyvision.org) --

VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16().features
CAFFE_CONVS = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
               for i in range(1, n + 1)]
UPSCORES = {32: [("upscore", 64)], 16: [("upscore2", 4), ("upscore16", 32)],
            8: [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]}


def fcn_caffemodel(stride, classes=3, seed=0, omit=(), extra=(), scales=None):
    """(bytes, {our key: array}) of a width-4 FCN-VGG16 (fc 8) in the release's naming."""
    rng = np.random.default_rng(seed)
    layers, expected = [(2, cw.layer_v2("data", "Input"))], {}

    def add(name, type_, module, arrays):
        blobs = []
        for i, a in enumerate(arrays):
            legacy = (len(layers) + i) % 3 == 1  # some blobs in the legacy num/channels/h/w form
            dims = a.shape if a.ndim == 4 else (1, 1, 1, a.size)
            blobs.append(cw.blob(a, shape=None if legacy else a.shape,
                                 legacy=dims if legacy else None))
        if name not in omit:
            layers.append((2, cw.layer_v2(name, type_, blobs)))
            expected.update({f"{module}.{p}": a for p, a in zip(("weight", "bias"), arrays)})

    rand = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    cin = 3
    for name, index in zip(CAFFE_CONVS, VGG16_CONVS):
        cout = 4 * min(2 ** (int(name[4]) - 1), 8)
        add(name, "Convolution", f"features.{index}", [rand(cout, cin, 3, 3), rand(cout)])
        layers.append((2, cw.layer_v2(name.replace("conv", "relu"), "ReLU")))
        cin = cout
    for name, shape in (("fc6", (8, 32, 7, 7)), ("fc7", (8, 8, 1, 1)),
                        ("score_fr", (classes, 8, 1, 1)), ("score_pool4", (classes, 32, 1, 1)),
                        ("score_pool3", (classes, 16, 1, 1))):
        if not name.startswith("score_pool") or stride <= (16 if "4" in name else 8):
            add(name, "Convolution", name, [rand(*shape), rand(shape[0])])
    for name, k in UPSCORES[stride]:
        add(name, "Deconvolution", name, [rand(classes, classes, k, k)])
    for name, value in (scales or {}).items():
        layers.append((2, cw.layer_v2(name, "Scale", [cw.blob([value], shape=(1,))])))
    for name, arrays in extra:
        add(name, "Convolution", name, arrays)
    layers.append((2, cw.layer_v2("score", "Crop")))
    return cw.net(layers), expected


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_fcn_caffemodel_converts_to_exactly_the_written_values(tmp_path, stride):
    data, expected = fcn_caffemodel(stride)
    path = tmp_path / f"fcn{stride}s-heavy-pascal.caffemodel"
    path.write_bytes(data)
    assert convert_main(["fcn_caffe", str(path), str(tmp_path / "out.pth")]) == 0
    ckpt = torch.load(tmp_path / "out.pth", weights_only=True)
    assert ckpt["arch"]["name"] == f"fcn{stride}s_vgg16" and ckpt["arch"]["num_classes"] == 3
    assert (ckpt["arch"]["width"], ckpt["arch"]["fc_width"], ckpt["arch"]["scale_skips"]) == (
        4, 8, False)
    assert ckpt["trained_on"] == "trainval_aug" and ckpt["input_norm"] == "caffe"
    assert (ckpt["recipe"]["mode"], ckpt["recipe"]["msc_scales"]) == ("full", [])
    assert sorted(expected) == sorted(ckpt["model"])  # every tensor filled, nothing else
    for key, value in expected.items():
        assert np.array_equal(ckpt["model"][key].numpy(), value), key
    net = build_model(ckpt["arch"]).eval()
    net.load_state_dict(ckpt["model"])
    assert net(torch.randn(1, 3, 21, 30)).shape == (1, 3, 21, 30)


def test_fcn_caffemodel_variants_and_errors(tmp_path, capsys):
    def convert(data, *flags):
        (tmp_path / "m.caffemodel").write_bytes(data)
        return convert_main(["fcn_caffe", str(tmp_path / "m.caffemodel"), str(tmp_path / "o"),
                             *flags])

    atonce = {"scale_pool4": 0.01, "scale_pool3": 0.0001}
    assert convert(fcn_caffemodel(8, scales=atonce)[0]) == 0  # the at-once release
    assert torch.load(tmp_path / "o", weights_only=True)["arch"]["scale_skips"] is True
    assert convert(fcn_caffemodel(8)[0], "--num-classes", "5") == 0  # head: FCN's own init
    ckpt = torch.load(tmp_path / "o", weights_only=True)
    assert ckpt["arch"]["num_classes"] == 5 and len(ckpt["provenance"]["dropped"]) == 6
    assert ckpt["model"]["score_fr.weight"].abs().sum() == 0
    assert torch.allclose(ckpt["model"]["upscore2.weight"][0, 0].sum(), torch.tensor(4.0))
    for data, message in (
            (fcn_caffemodel(8, scales={"scale_pool4": 0.5, "scale_pool3": 1e-4})[0], "0.01"),
            (fcn_caffemodel(8, omit=("score_pool4",))[0], "score_pool4.weight"),
            (fcn_caffemodel(16, extra=[("fc8", [np.ones((3, 8, 1, 1), np.float32)])])[0],
             "'fc8'"),
            (fcn_caffemodel(32, extra=[("conv1_1", [np.ones((4, 3, 3, 3), np.float32),
                                                    np.ones(4, np.float32)])])[0], "twice")):
        assert convert(data) == 2
        assert message in capsys.readouterr().err
