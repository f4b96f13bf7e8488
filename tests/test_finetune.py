"""Fine-tuning a model on your own classes: the architecture comes from --init, a refused start
leaves its run folder reusable, and the new classifier starts from the old one's rows
(seglab/training/class_map.py)."""
import math

import pytest
import torch

import train
from seglab.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from seglab.models import build_model
from seglab.training.class_map import class_mapping, map_rows, parse_class_map, union_weights
from seglab.models import class_dependent
from seglab.training.init import TrainingError, load_init, plan_class_groups
from test_recipe import TINY_ARCH, folder_dataset

OLD = ["background", "cat", "dog", "person", "car"]
NEW = ["background", "person", "animal"]
TINY = {"name": "deeplabv2", "depth": 14, "width": 8, "rates": [1, 2], "frozen_bn": True}


def old_checkpoint(path, classes=OLD, arch=TINY):
    torch.manual_seed(3)
    net = build_model(dict(arch, num_classes=len(classes)))
    for k, v in net.state_dict().items():   # a head that says something: rows far apart
        if k.startswith("aspp.") and v.is_floating_point():
            v.normal_(0, 0.3)
    atomic_save(make_checkpoint(net.arch, net.state_dict(), trained_on="train_aug",
                                classes=list(classes), dataset="mine",
                                palette=[[i, i, i] for i in range(len(classes))]), path)
    return net.eval()


def cfg_for(path, union="mean", classes=None):
    return {"train": {"init": str(path), "init_union": union,
                      "init_classes": classes or {}}}


def test_parse_and_match_by_name_then_by_the_explicit_map():
    explicit = parse_class_map(["animal=cat,dog"])
    assert explicit == parse_class_map({"animal": ["cat", "dog"]}) == {"animal": ["cat", "dog"]}
    assert class_mapping(NEW, OLD, explicit) == {0: [0], 1: [3], 2: [1, 2]}
    assert class_mapping(NEW, OLD, {}) == {0: [0], 1: [3]}               # animal: fresh
    with pytest.raises(ValueError, match="not classes of the init checkpoint"):
        class_mapping(NEW, OLD, {"animal": ["cat", "horse"]})
    with pytest.raises(ValueError, match="not classes of the data set"):
        class_mapping(NEW, OLD, {"vehicle": ["car"]})
    with pytest.raises(ValueError, match="NEW=OLD1,OLD2"):
        parse_class_map(["animal"])


def mapped_agreement(z_new, z_old, table):
    """Share of pixels whose new argmax equals the old argmax mapped to the new classes."""
    return float((z_new.argmax(1) == table[z_old.argmax(1)]).double().mean())


@pytest.mark.parametrize("union", ["fit", "mean", "max"])
def test_the_mapped_head_reproduces_the_old_models_mapped_prediction(tmp_path, union):
    """A second way: the new network's logits against the old network's, computed apart."""
    old = old_checkpoint(tmp_path / "old.pth")
    new = build_model(dict(TINY, num_classes=3))
    x = torch.randn(4, 3, 81, 81) * 50
    dataset = type("D", (), {"class_names": NEW, "__len__": lambda self: 4,
                             "__getitem__": lambda self, key: {"image": x[key[0]]}})()
    note = load_init(new, cfg_for(tmp_path / "old.pth", union, {"animal": ["cat", "dog"]}),
                     dataset)
    assert "background <- background; person <- person; animal <- cat + dog" in note
    with torch.no_grad():
        z_old, z_new = old(x), new.eval()(x)
    scale = z_old.abs().max()
    # single members: the very same scores
    assert (z_new[:, 0] - z_old[:, 0]).abs().max() <= 1e-5 * scale
    assert (z_new[:, 1] - z_old[:, 3]).abs().max() <= 1e-5 * scale
    # the union: the combination of its members' scores that the weights say, exactly
    rows, a, b = union_weights({0: [0], 1: [3], 2: [1, 2]}, union, [z for z in z_old])[2]
    if union == "mean":
        assert (rows, a, b) == ([1, 2], [0.5, 0.5], pytest.approx(math.log(2)))
    if union == "max":
        counts = torch.bincount(z_old.argmax(1).flatten(), minlength=5)
        assert rows == [1 if counts[1] >= counts[2] else 2] and (a, b) == ([1.0], 0)
    if union == "fit":
        assert rows == [1, 2]                            # a combination of the members' rows
    want = sum(w * z_old[:, r] for w, r in zip(a, rows)) + b
    assert (z_new[:, 2] - want).abs().max() <= 1e-4 * scale
    # and the fit reproduces the old mapped prediction at least as well as the mean does
    table = torch.tensor([0, 2, 2, 1, 0])        # car: not a new class; background, as scored
    agree = mapped_agreement(z_new, z_old, table)
    mean = map_rows({k: v for k, v in new.state_dict().items() if k.startswith("aspp.")},
                    load_checkpoint(tmp_path / "old.pth")["model"],
                    sorted(class_dependent(new.arch)), {0: [0], 1: [3], 2: [1, 2]})
    by_mean = build_model(dict(TINY, num_classes=3))
    by_mean.load_state_dict({**new.state_dict(), **mean})
    with torch.no_grad():
        agree_mean = mapped_agreement(by_mean.eval()(x), z_old, table)
    assert agree >= agree_mean - (1e-9 if union == "fit" else 1.0)
    assert 0.5 < agree <= 1.0


def test_unmapped_rows_keep_their_fresh_init_and_counts_may_match(tmp_path):
    old_checkpoint(tmp_path / "old.pth", classes=["background", "car", "bus"])
    new = build_model(dict(TINY, num_classes=3))           # same count, other names and order
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    dataset = type("D", (), {"class_names": ["bus", "background", "tram"]})()
    note = load_init(new, cfg_for(tmp_path / "old.pth"), dataset)
    ckpt = load_checkpoint(tmp_path / "old.pth")["model"]
    for k in class_dependent(new.arch):
        got = new.state_dict()[k]
        assert torch.equal(got[0], ckpt[k][2]) and torch.equal(got[1], ckpt[k][0])
        assert torch.equal(got[2], fresh[k][2])            # tram: nothing to start from
    assert "tram <- new (fresh init)" in note


def test_map_rows_adds_log_k_to_one_bias_only():
    fresh = {"w": torch.zeros(2, 3), "b1": torch.zeros(2), "b2": torch.zeros(2)}
    old = {"w": torch.arange(9.0).view(3, 3), "b1": torch.ones(3), "b2": torch.ones(3)}
    out = map_rows(fresh, old, ["w", "b1", "b2"], {1: [0, 1, 2]})
    assert out["w"][1].tolist() == [3.0, 4.0, 5.0]
    assert out["b1"][1] == pytest.approx(1 + math.log(3)) and out["b2"][1] == 1.0


def test_train_takes_the_architecture_from_init_and_maps_classes(tmp_path, capsys):
    """The README's own-data command: no model.*, no data.num_classes, no --force after a
    refused start."""
    mnv2 = {"name": "deeplabv3_mnv2_tf", "depth_multiplier": 0.35, "output_stride": 16}
    old_checkpoint(tmp_path / "old.pth", classes=["background", "widget", "thing"], arch=mnv2)
    root = folder_dataset(tmp_path / "my_data")
    run = tmp_path / "run"
    common = ["--config", "folder", f"data.root={root}", "--run-dir", str(run),
              "train.iterations=1", "train.effective_batch=2", "train.batch_per_step=2",
              "data.crop=33", "data.workers=0", "--no-eval"]
    # an explicit architecture that conflicts with the checkpoint stays an error ...
    assert train.main([*common, "--init", str(tmp_path / "old.pth"), "model.name=deeplabv2",
                       *TINY_ARCH]) == 2
    assert "another architecture" in capsys.readouterr().err
    assert (run / "config.yaml").is_file()                 # the refused start wrote its config
    # ... and the corrected command reuses the folder without --force
    assert train.main([*common, "--init", str(tmp_path / "old.pth"),
                       "--init-class", "gizmo=thing"]) == 0
    err = capsys.readouterr().err
    assert "architecture deeplabv3_mnv2_tf taken from the init checkpoint" in err
    assert "class-mapped init: background <- background; widget <- widget; gizmo <- thing" in err
    ckpt = load_checkpoint(run / "checkpoints" / "final.pth")
    assert ckpt["arch"]["name"] == "deeplabv3_mnv2_tf" and ckpt["arch"]["depth_multiplier"] == 0.35
    assert ckpt["recipe"]["msc_scales"] == [] and ckpt["input_norm"] == "tf"
    # a run that trained is protected again
    assert train.main([*common, "--init", str(tmp_path / "old.pth")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_class_map_without_names_to_map_from_is_an_error(tmp_path):
    net = build_model(dict(TINY, num_classes=4))
    atomic_save(make_checkpoint(net.arch, net.state_dict()), tmp_path / "anon.pth")
    dataset = type("D", (), {"class_names": NEW})()
    with pytest.raises(TrainingError, match="states no class names"):
        load_init(build_model(dict(TINY, num_classes=3)),
                  cfg_for(tmp_path / "anon.pth", classes={"animal": ["cat"]}), dataset)
    # without a map, an anonymous 4-class head is simply re-initialised, as before
    assert "re-initialised" in load_init(build_model(dict(TINY, num_classes=3)),
                                         cfg_for(tmp_path / "anon.pth"), dataset)


def test_the_exact_head_gives_the_old_probabilities_summed_per_class(tmp_path):
    """train.init_union=exact: animal keeps the rows of cat and dog, merged by log-sum-exp; the
    new softmax is the old one summed per new class (a second way: computed from the old
    network's own output), up to float rounding."""
    old = old_checkpoint(tmp_path / "old.pth")
    x = torch.randn(2, 3, 65, 65) * 50
    dataset = type("D", (), {"class_names": NEW, "__len__": lambda self: 2,
                             "__getitem__": lambda self, key: {"image": x[key[0]]}})()
    cfg = dict(cfg_for(tmp_path / "old.pth", "exact", {"animal": ["cat", "dog"]}),
               model={"name": "deeplabv2", "arch": {}})
    assert "class groups [1, 1, 2]" in plan_class_groups(cfg, dataset)
    new = build_model(dict(TINY, num_classes=3, **cfg["model"]["arch"]))
    assert new.arch["class_groups"] == [1, 1, 2] and new.arch["num_classes"] == 3
    assert new.aspp.c0.weight.shape[0] == 4                 # four rows for three classes
    note = load_init(new, cfg, dataset)
    assert "animal <- cat + dog" in note
    with torch.no_grad():
        p_old, p_new = old(x).softmax(1), new.eval()(x).softmax(1)
    kept = torch.stack([p_old[:, 0], p_old[:, 3], p_old[:, 1] + p_old[:, 2]], 1)
    want = kept / kept.sum(1, keepdim=True)        # car: not a class here, its mass renormalised
    assert p_new.shape == want.shape and (p_new - want).abs().max() < 1e-5
    # it trains and saves as any network: the checkpoint rebuilds the same grouped head
    atomic_save(make_checkpoint(new.arch, new.state_dict()), tmp_path / "grouped.pth")
    again = build_model(load_checkpoint(tmp_path / "grouped.pth")["arch"])
    again.load_state_dict(new.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), new(x))


def test_zero_iterations_writes_the_initialised_network(tmp_path):
    """train.iterations=0: the class-mapped network as it is, as final.pth, scored like any."""
    old_checkpoint(tmp_path / "old.pth", classes=["background", "widget", "thing"])
    root = folder_dataset(tmp_path / "my_data")
    run = tmp_path / "run"
    assert train.main(["--config", "folder", f"data.root={root}", "--run-dir", str(run),
                       "--init", str(tmp_path / "old.pth"), "--init-class", "gizmo=thing",
                       "train.iterations=0", "data.workers=0", "eval.crf=false"]) == 0
    final = load_checkpoint(run / "checkpoints" / "final.pth")
    old = load_checkpoint(tmp_path / "old.pth")["model"]
    assert torch.equal(final["model"]["aspp.c0.weight"][2], old["aspp.c0.weight"][2])
    assert final["classes"] == ["background", "widget", "gizmo"]
    assert (run / "eval_val" / "scores.json").is_file()
