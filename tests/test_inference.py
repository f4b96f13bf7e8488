"""seglab/models/rewrites.py (BN folding, the shifted-sum ASPP) and the Predictor (checkpoint settings, VOC
protocol, bf16, channels_last)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglab.checkpoint import atomic_save, make_checkpoint
from seglab.recipe import PAPER
from seglab.data.labels import class_names
from seglab.device import DeviceError, bf16_supported, select_device
from seglab.inference.predictor import Predictor, state_dict_digest
from seglab.models.rewrites import ShiftedASPP, cast_conv_weights, fold_frozen_bn
from seglab.models.deeplabv2 import ASPP, DeepLabV2
from seglab.models.msc import MSC
from seglab.models.resnet import ConvBN, FrozenBatchNorm2d
from seglab.models import unwrap
from seglab.data.transforms import CAFFE_MEAN_BGR
from numerics import DEEP, ONE_OP, assert_close_to_scale, assert_labels_agree


def tiny_net(seed=0, num_classes=5, **kw):
    """A tiny DeepLab v2 with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    net = DeepLabV2(num_classes=num_classes, depth=14, width=8, **kw).eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return net


def save_tiny_checkpoint(path, net, **extra):
    return atomic_save(make_checkpoint(net.arch, net.state_dict(), **extra), path)


# --- BN folding ------------------------------------------------------------------------------

def test_fold_frozen_bn_matches_unfolded_model():
    net = tiny_net()
    folded = fold_frozen_bn(net)
    x = torch.randn(2, 3, 65, 49) * 40
    with torch.no_grad():
        ref, out = net(x), folded(x)
    assert_close_to_scale(out, ref, DEEP)
    assert_labels_agree(out, ref, DEEP, dim=1)
    # every BN is gone from the copy, none from the original
    units = [m for m in folded.modules() if isinstance(m, ConvBN)]
    assert units and all(isinstance(m.bn, torch.nn.Identity) and m.conv.bias is not None
                         for m in units)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in net.modules()) == len(units)


def test_folded_conv_equals_the_bn_formula_written_out():
    """One ConvBN: the folded conv equals gamma * (conv(x) - mean) / sqrt(var + eps) + beta."""
    torch.manual_seed(1)
    unit = ConvBN(4, 6, 3, stride=2, dilation=2).eval()
    bn = unit.bn
    bn.running_mean.normal_(0, 1)
    bn.running_var.uniform_(0.2, 4)
    bn.weight.data.normal_(1, 0.5)
    bn.bias.data.normal_(0, 1)
    x = torch.randn(3, 4, 11, 13)
    with torch.no_grad():
        y = F.conv2d(x, unit.conv.weight, None, 2, 2, 2)
        std = torch.sqrt(bn.running_var + bn.eps)[:, None, None]
        expect = ((y - bn.running_mean[:, None, None]) / std * bn.weight[:, None, None]
                  + bn.bias[:, None, None])
        got = fold_frozen_bn(unit)(x)
    assert_close_to_scale(got, expect, ONE_OP)


def test_fold_ignores_train_mode_of_unfrozen_bn():
    """Trainable BN (training from scratch) folds its running statistics: equal to eval mode."""
    net = tiny_net(frozen_bn=False)
    net.train()
    folded = fold_frozen_bn(net)
    assert not folded.training
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        ref = net.eval()(x)
        assert_close_to_scale(folded(x), ref, DEEP)


# --- the Predictor ----------------------------------------------------------------------------

def test_predictor_matches_the_eval_pipeline_written_out(tmp_path):
    """predict() = pad with the mean to 65 (caffe norm), MSC max over 1, 0.75, 0.5 with Caffe
    Interp, upsample x8 with align_corners, crop: recomputed here from the unfolded network."""
    net = tiny_net()
    ckpt = save_tiny_checkpoint(tmp_path / "c.pth", net, trained_on="train_aug")
    pred = Predictor(ckpt, device="cpu")
    assert pred.msc_scales == tuple(PAPER["msc_scales"])
    assert pred.interp == "caffe" and pred.norm == "caffe" and pred.num_classes == 5
    assert pred.identity.startswith("sha256:")

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)
    labels, logits = pred.predict(image, mode="voc", pad_to=65)

    x = torch.zeros(1, 3, 65, 65)
    bgr = image[:, :, ::-1].astype(np.float32) - np.array(CAFFE_MEAN_BGR, np.float32)
    x[0, :, :40, :57] = torch.from_numpy(bgr.transpose(2, 0, 1).copy())
    with torch.no_grad():
        y1 = net(x)                                                   # 9x9
        y75 = net(F.interpolate(x, size=(49, 49), mode="bilinear", align_corners=True))
        y50 = net(F.interpolate(x, size=(33, 33), mode="bilinear", align_corners=True))
        up = lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=True)
        fused = torch.max(torch.max(y1, up(y75, (9, 9))), up(y50, (9, 9)))
        full = up(fused, (65, 65))[0, :, :40, :57]
    assert logits.shape == (5, 40, 57) and logits.dtype == torch.float32
    assert_close_to_scale(logits, full, DEEP)
    assert labels.dtype == np.uint8 and labels.shape == (40, 57)
    assert_labels_agree(torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 5)
                        .permute(2, 0, 1), full, DEEP)


def test_predictor_reads_settings_from_the_checkpoint(tmp_path):
    net = tiny_net()
    cfg = {"model": {"msc_scales": [0.5], "interp": "pytorch"}, "data": {"norm": "caffe"}}
    ckpt = save_tiny_checkpoint(tmp_path / "c.pth", net, config=cfg, input_norm="imagenet")
    pred = Predictor(ckpt, device="cpu")
    assert pred.msc_scales == (0.5,) and pred.interp == "pytorch" and pred.norm == "imagenet"
    assert isinstance(pred.model, MSC) and pred.model.scales == (0.5,)
    single = Predictor(ckpt, device="cpu", msc_scales=(), norm="caffe")
    assert isinstance(single.model, DeepLabV2) and single.norm == "caffe"
    # full-image mode: no padding, logits at (H-1)//8+1
    image = np.full((30, 45, 3), 128, np.uint8)
    x, size = single.transform("full").prepare(image)
    assert single.logits(x).shape == (5, 4, 6) and size == (30, 45)
    labels, logits = single.predict(image, mode="full")
    assert labels.shape == (30, 45) and logits.shape == (5, 30, 45)


def test_predictor_copies_a_model_and_keeps_its_msc_settings():
    net = tiny_net()
    msc = MSC(net, scales=(0.75,), interp="pytorch").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pred = Predictor(msc, device="cpu")
    assert pred.msc_scales == (0.75,) and pred.interp == "pytorch"
    assert msc.training  # untouched
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    assert pred.identity == "weights:" + state_dict_digest(net)
    # a bare DeepLabV2 gets the paper's MSC
    assert Predictor(net, device="cpu").msc_scales == tuple(PAPER["msc_scales"])


# --- ASPP as one 1x1 convolution + shifted sums -----------------------------------------------

@pytest.mark.parametrize("hw", [(65, 65), (41, 30), (7, 9), (1, 1), (25, 13)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shifted_aspp_equals_the_four_dilated_convolutions(hw, channels_last):
    # sizes where rates 12, 18, 24 reach past the map (7x9, 1x1) leave only some taps
    torch.manual_seed(hw[0])
    aspp = ASPP(32, 5, (6, 12, 18, 24)).eval()
    for conv in aspp.branches():
        torch.nn.init.normal_(conv.weight, 0, 0.05)
        torch.nn.init.normal_(conv.bias)
    shifted = ShiftedASPP(aspp)
    x = torch.randn(2, 32, *hw)
    if channels_last:
        x, shifted = x.contiguous(memory_format=torch.channels_last), \
            shifted.to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, out = aspp(x), shifted(x)
    assert out.shape == reference.shape == (2, 5, *hw)
    assert_close_to_scale(out, reference, ONE_OP)


def test_shifted_aspp_tap_written_out():
    # one branch, rate 2, a single non-zero tap (ky, kx) = (0, 2): out[i, j] = w * x[i - 2, j + 2]
    aspp = ASPP(1, 1, (2,))
    with torch.no_grad():
        aspp.c0.weight.zero_()
        aspp.c0.weight[0, 0, 0, 2] = 3.0
        aspp.c0.bias.fill_(0.5)
    x = torch.arange(1.0, 26.0).view(1, 1, 5, 5)
    expected = torch.full((5, 5), 0.5)
    for i in range(5):
        for j in range(5):
            if 0 <= i - 2 < 5 and 0 <= j + 2 < 5:
                expected[i, j] += 3.0 * x[0, 0, i - 2, j + 2]
    with torch.no_grad():
        assert torch.equal(ShiftedASPP(aspp)(x)[0, 0], expected)


def test_folding_and_channels_last_keep_the_logits():
    net = tiny_net()
    x = torch.randn(2, 3, 65, 65) * 40
    plain = Predictor(net, device="cpu", fold_bn=False, channels_last=False,
                      shifted_aspp=False).logits(x)
    fast = Predictor(net, device="cpu", fold_bn=True, channels_last=True).logits(x)
    assert isinstance(unwrap(Predictor(net, device="cpu").model).aspp, ShiftedASPP)
    assert Predictor(net, device="cpu").settings()["shifted_aspp"] is True
    assert plain.shape == (2, 5, 9, 9) and plain.is_contiguous()
    assert_close_to_scale(fast, plain, DEEP)
    assert_labels_agree(fast, plain, DEEP, dim=1)


def test_bf16_agrees_with_fp32_on_99_percent_of_pixels():
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    net = tiny_net(seed=0)
    x = torch.randn(2, 3, 129, 129) * 50
    fp32 = Predictor(net, device="cpu", precision="fp32")
    bf16 = Predictor(net, device="cpu", precision="bf16", channels_last=True)
    assert bf16.precision == "bf16"
    a, b = fp32.logits(x), bf16.logits(x)
    assert b.dtype == torch.float32
    assert not torch.equal(a, b)  # bf16 really ran
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.99


def test_bf16_weights_cast_once_equal_autocast_casting_them_every_call():
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    net = tiny_net(seed=1)
    x = torch.randn(1, 3, 65, 65) * 50
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        every_call = net(x)
        cast_once = cast_conv_weights(net, torch.bfloat16)(x)
    assert next(net.aspp.c0.parameters()).dtype == torch.bfloat16
    assert torch.equal(every_call, cast_once)


def test_bf16_falls_back_to_fp32_with_a_warning(monkeypatch):
    from seglab.inference import predictor as inference
    monkeypatch.setattr(inference, "bf16_supported", lambda device: False)
    with pytest.warns(RuntimeWarning, match="bf16 is not supported"):
        pred = Predictor(tiny_net(), device="cpu", precision="bf16")
    assert pred.precision == "fp32"


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="precision"):
        Predictor(tiny_net(), device="cpu", precision="fp16")
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            select_device("cuda")


def test_class_names():
    assert class_names(3) == ["background", "aeroplane", "bicycle"]
    assert class_names(23)[-2:] == ["21", "22"]


def test_in_memory_identity_changes_with_the_weights():
    a, b = tiny_net(seed=0), tiny_net(seed=0)
    assert state_dict_digest(a) == state_dict_digest(b)
    with torch.no_grad():
        b.aspp.c0.bias[0] += 1e-3
    assert state_dict_digest(a) != state_dict_digest(b)


def test_inplace_activations_give_the_same_numbers():
    from seglab.models.rewrites import InplaceBottleneck, InplaceResNet, use_inplace_activations
    import copy
    net = tiny_net()
    fast = use_inplace_activations(copy.deepcopy(net))
    assert isinstance(fast.backbone, InplaceResNet)
    assert all(isinstance(b, InplaceBottleneck) for b in fast.backbone.res3)
    assert list(fast.state_dict()) == list(net.state_dict())
    x = torch.randn(1, 3, 41, 41) * 30
    with torch.inference_mode():
        assert torch.equal(fast(x), net(x))
