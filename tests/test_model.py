"""DeepLab v2 model: sizes, parameter counts, frozen BN, ASPP, MSC and the Caffe resize."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglab.models import param_groups
from seglab.models.deeplabv2 import ASPP, DeepLabV2
from seglab.models.msc import MSC
from seglab.models.resnet import FrozenBatchNorm2d, ResNet
from seglab.models.resize import caffe_scaled_size, resize
from numerics import ONE_OP, assert_close_to_scale


def count(m, trainable=False):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


def tiny(**kw):
    kw = dict(num_classes=5, depth=14, width=8, **kw)
    return DeepLabV2(**kw)


# --- parameter counts and key names -------------------------------------------------------

def test_parameter_counts_match_the_release(resnet101):
    assert count(resnet101) == 44_048_532
    assert count(resnet101, trainable=True) == 43_943_188
    assert count(resnet101.aspp) == 1_548_372


def test_every_published_tensor_has_exactly_one_home(resnet101, published_keys):
    """The 632 published keys map one-to-one onto ours with equal shapes."""
    ours = {k: tuple(v.shape) for k, v in resnet101.state_dict().items()}
    assert len(ours) == len(published_keys) == 632
    mapped = {}
    for key, shape in published_keys.items():
        k = published_to_ours(key)
        assert k in ours, (key, k)
        assert ours[k] == shape, key
        mapped[k] = key
    assert len(mapped) == 632  # no two published tensors share a home


def published_to_ours(key):
    """Written independently of convert.py: layerN.blockK -> backbone.res{N}.{caffe name}."""
    parts = key.split(".")
    if parts[0] == "aspp":
        return key
    stage = int(parts[0][len("layer"):])
    if stage == 1:
        return "backbone." + ".".join(parts[1:])
    n = {2: 3, 3: 4, 4: 23, 5: 3}[stage]
    k = int(parts[1][len("block"):])
    name = ("a", "b", "c")[k - 1] if n <= 3 else ("a" if k == 1 else f"b{k - 1}")
    return f"backbone.res{stage}.{name}." + ".".join(parts[2:])


# --- spatial sizes, strides and dilations --------------------------------------------------

@pytest.mark.parametrize("size,out", [(321, 41), (513, 65)])
def test_output_stride_8(resnet101, size, out):
    with torch.no_grad():
        y = resnet101(torch.zeros(1, 3, size, size))
    assert y.shape == (1, 21, out, out)


def test_stage_strides_and_dilations(resnet101):
    bb = resnet101.backbone
    assert bb.conv1.conv.stride == (2, 2) and bb.conv1.conv.kernel_size == (7, 7)
    assert bb.conv1.conv.padding == (3, 3) and bb.pool1.ceil_mode
    expect = {2: (1, 1, 3), 3: (2, 1, 4), 4: (1, 2, 23), 5: (1, 4, 3)}
    for s, (stride, dil, n) in expect.items():
        stage = getattr(bb, f"res{s}")
        assert len(stage) == n
        for j, block in enumerate(stage):
            assert block.reduce.conv.stride == ((stride, stride) if j == 0 else (1, 1))
            assert block.conv3x3.conv.stride == (1, 1)
            assert block.conv3x3.conv.dilation == (dil, dil)
            assert block.conv3x3.conv.padding == (dil, dil)
            assert (block.shortcut is not None) == (j == 0)
            assert all(m.bias is None for m in block.modules() if isinstance(m, torch.nn.Conv2d))
    assert list(bb.res4._modules)[:3] == ["a", "b1", "b2"] and list(bb.res4._modules)[-1] == "b22"
    assert list(bb.res2._modules) == ["a", "b", "c"]


def test_pytorch_style_moves_stride_to_3x3():
    bb = ResNet(depth=50, style="pytorch")
    assert bb.res3.a.reduce.conv.stride == (1, 1)
    assert bb.res3.a.conv3x3.conv.stride == (2, 2)
    assert not bb.pool1.ceil_mode
    # caffe (ceil) and pytorch (floor) pooling differ on even sizes: 320 -> 160 -> 81 vs 80
    assert ResNet(depth=14, width=8)(torch.zeros(1, 3, 320, 320)).shape[-1] == 41
    assert ResNet(depth=14, width=8, style="pytorch")(torch.zeros(1, 3, 320, 320)).shape[-1] == 40


# --- frozen batch norm ---------------------------------------------------------------------

def test_frozen_bn_keeps_statistics_after_a_training_step():
    net = tiny()
    net.train()
    bns = [m for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = {k: v.clone() for k, v in net.state_dict().items() if "bn." in k}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = net(torch.randn(2, 3, 65, 65) * 50).logsumexp(1).mean()
    loss.backward()
    opt.step()
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(m.weight.grad is None for m in bns)
    # ... while the convolutions did change
    assert not torch.equal(net.backbone.conv1.conv.weight, tiny().backbone.conv1.conv.weight)


def test_unfrozen_bn_trains_and_updates_statistics():
    net = tiny(frozen_bn=False).train()
    bn = net.backbone.conv1.bn
    assert bn.training and bn.weight.requires_grad
    net(torch.randn(2, 3, 65, 65))
    assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_frozen_bn_uses_running_statistics():
    bn = FrozenBatchNorm2d(3).train()
    bn.running_mean.copy_(torch.tensor([1., 2., 3.]))
    bn.running_var.copy_(torch.tensor([4., 9., 16.]))
    bn.weight.data.copy_(torch.tensor([2., 2., 2.]))
    bn.bias.data.copy_(torch.tensor([0., 1., 0.]))
    x = torch.randn(2, 3, 4, 4)
    ref = (x - bn.running_mean.view(1, 3, 1, 1)) / torch.sqrt(bn.running_var.view(1, 3, 1, 1) + 1e-5)
    ref = ref * 2 + bn.bias.view(1, 3, 1, 1)
    assert_close_to_scale(bn(x), ref, ONE_OP)


# --- ASPP ------------------------------------------------------------------------------------

def test_aspp_branches_are_summed_atrous_convs():
    aspp = ASPP(16, 4)
    assert aspp.rates == (6, 12, 18, 24)
    x = torch.randn(1, 16, 30, 30)
    ref = sum(F.conv2d(x, c.weight, c.bias, padding=r, dilation=r)
              for c, r in zip(aspp.branches(), (6, 12, 18, 24)))
    assert_close_to_scale(aspp(x), ref, ONE_OP)
    w = torch.cat([c.weight.flatten() for c in aspp.branches()])
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert all(torch.count_nonzero(c.bias) == 0 for c in aspp.branches())
    assert len(ASPP(16, 4, rates=(12,)).branches()) == 1  # LargeFOV


# --- Caffe Interp and MSC ---------------------------------------------------------------------

def test_caffe_scaled_sizes():
    assert caffe_scaled_size(321, 0.5) == 161
    assert caffe_scaled_size(321, 0.75) == 241
    assert caffe_scaled_size(513, 0.5) == 257
    assert caffe_scaled_size(513, 0.75) == 385


def bilinear_align_corners_reference(img, out_h, out_w):
    """Explicit bilinear sampling, Caffe Interp style: output pixel i samples input at
    i * (in-1)/(out-1)."""
    c, h, w = img.shape
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(y)), h - 1); y1 = min(y0 + 1, h - 1); dy = y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(x)), w - 1); x1 = min(x0 + 1, w - 1); dx = x - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * img[:, y0, x0] + (1 - dy) * dx * img[:, y0, x1]
                            + dy * (1 - dx) * img[:, y1, x0] + dy * dx * img[:, y1, x1])
    return out


@pytest.mark.parametrize("hw,out", [((9, 13), (5, 7)), ((7, 7), (19, 19)), ((5, 8), (13, 3))])
def test_caffe_resize_equals_explicit_bilinear(hw, out):
    img = torch.randn(2, *hw, dtype=torch.float64)
    ours = resize(img[None], out, "caffe")[0].numpy()
    np.testing.assert_allclose(ours, bilinear_align_corners_reference(img.numpy(), *out), atol=1e-12)


def test_msc_branch_sizes_at_321():
    msc = MSC(tiny(), interp="caffe").train()
    outs = msc(torch.randn(1, 3, 321, 321))
    assert [tuple(o.shape[-2:]) for o in outs] == [(41, 41), (31, 31), (21, 21), (41, 41)]
    # the published port resizes inputs with F.interpolate: 321 -> 240 and 160 (not 241, 161)
    seen = []
    net = tiny()
    net.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    MSC(net, interp="pytorch").train()(torch.randn(1, 3, 321, 321))
    assert seen == [321, 240, 160]


def test_msc_eval_is_max_of_upsampled_branches():
    net = tiny().eval()
    msc = MSC(net).eval()
    x = torch.randn(1, 3, 97, 97)
    with torch.no_grad():
        fused = msc(x)
        b1 = net(x)
        # Caffe sizes written out by hand: 97 -> 73 (0.75), 49 (0.5)
        b075 = net(F.interpolate(x, size=(73, 73), mode="bilinear", align_corners=True))
        b05 = net(F.interpolate(x, size=(49, 49), mode="bilinear", align_corners=True))
        up = lambda t: F.interpolate(t, size=b1.shape[-2:], mode="bilinear", align_corners=True)
        ref = torch.stack([b1, up(b075), up(b05)]).amax(0)
    assert fused.shape == b1.shape == (1, 5, 13, 13)
    assert torch.equal(fused, ref)
    msc.train()
    with torch.no_grad():
        assert torch.equal(msc(x)[-1], ref)


# --- parameter groups ------------------------------------------------------------------------

def test_param_groups_multipliers_and_membership():
    net = tiny()
    groups = {g["name"]: g for g in param_groups(MSC(net), 1e-3, 5e-4)}
    assert set(groups) == {"backbone", "aspp_weight", "aspp_bias"}  # frozen BN excluded
    assert groups["backbone"]["lr"] == pytest.approx(1e-3) and groups["backbone"]["weight_decay"] == 5e-4
    assert groups["aspp_weight"]["lr"] == pytest.approx(1e-2) and groups["aspp_weight"]["weight_decay"] == 5e-4
    assert groups["aspp_bias"]["lr"] == pytest.approx(2e-2) and groups["aspp_bias"]["weight_decay"] == 0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(groups["aspp_weight"]["params"]) == ids(c.weight for c in net.aspp.branches())
    assert ids(groups["aspp_bias"]["params"]) == ids(c.bias for c in net.aspp.branches())
    convs = [m.weight for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert ids(groups["backbone"]["params"]) == ids(convs)
    free = {g["name"]: g for g in param_groups(tiny(frozen_bn=False), 1e-3, 5e-4)}
    assert free["bn"]["weight_decay"] == 0 and free["bn"]["lr_mult"] == 1


# --- the published port's MSC inputs ------------------------------------------------------------

def bilinear_step(image: np.ndarray, scale: float) -> np.ndarray:
    """Bilinear sampling of an (H, W) array at a step of exactly 1/scale, half-pixel centres
    (output j reads input (j + 0.5) / scale - 0.5, clamped at the edges), floor(scale * size)
    outputs per axis: written out loop by loop, independently of torch."""
    def taps(n_in):
        n_out = int(np.floor(n_in * scale))
        rows = []
        for j in range(n_out):
            src = max((j + 0.5) / scale - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            rows.append((i0, i1, src - i0))
        return rows
    out = np.zeros((int(np.floor(image.shape[0] * scale)), int(np.floor(image.shape[1] * scale))))
    for y, (y0, y1, wy) in enumerate(taps(image.shape[0])):
        for x, (x0, x1, wx) in enumerate(taps(image.shape[1])):
            top = (1 - wx) * image[y0, x0] + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0] + wx * image[y1, x1]
            out[y, x] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize("scale", [0.5, 0.75])
def test_port_option_samples_at_a_step_of_one_over_s(scale):
    from seglab.models.msc import scale_input
    torch.manual_seed(0)
    x = torch.randn(1, 1, 41, 37, dtype=torch.float64)
    ours = scale_input(x, scale, "pytorch")[0, 0].numpy()
    expect = bilinear_step(x[0, 0].numpy(), scale)
    assert ours.shape == expect.shape == (int(41 * scale), int(37 * scale))
    np.testing.assert_allclose(ours, expect, rtol=0, atol=1e-12)
    # what the option did before: a size= call samples at a step of in/out, not 1/s
    by_size = F.interpolate(x, size=ours.shape, mode="bilinear", align_corners=False)[0, 0]
    assert np.abs(by_size.numpy() - expect).max() > 1e-3


def test_mean_fusion_averages_the_branch_probabilities():
    """fusion="mean": log of the mean softmax over the upsampled branches, computed by hand."""
    torch.manual_seed(0)
    net = tiny().eval()
    with torch.no_grad():  # logits far from zero, so the fusions differ
        for conv in net.aspp.branches():
            conv.weight.mul_(300)
    msc = MSC(net, (0.75, 0.5), fusion="mean").eval()
    x = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        branches = msc.upsampled(msc.branch_logits(x))
        expect = torch.stack([b.softmax(1) for b in branches]).mean(0)
        fused = msc(x)
        by_max = MSC(net, (0.75, 0.5)).eval()(x)
    torch.testing.assert_close(fused.softmax(1), expect, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fused.softmax(1), by_max.softmax(1), atol=1e-3)
    with pytest.raises(ValueError, match="fusion"):
        MSC(net, fusion="median")
