"""Convert published weights into our checkpoint format (and ours into the published port's).

    python Implementation/convert.py caffe IN.caffemodel OUT.pth [--num-classes N] [--trained-on S]
    python Implementation/convert.py pth IN.pth OUT.pth [--to-published]
    python Implementation/convert.py torchvision IN.pth|download OUT.pth
    python Implementation/convert.py tflite IN.tflite OUT.pth
    python Implementation/convert.py CONVERTER --help      # what each one takes, and where to get it

One converter per source of weights (the CONVERTERS table below; the key maps live in
seglab/weights/): the DeepLab v2 Caffe release (`caffe`: init.caffemodel, the MS-COCO model that
is the paper's starting point; train_iter_20000.caffemodel, trained on train_aug;
train2_iter_20000.caffemodel, fine-tuned on train+val: never score it on val), the published
PyTorch port (`pth`, and `--to-published` back), torchvision's ImageNet ResNets (`torchvision`),
Google's VOC-trained DeepLab v3 MobileNetV2 TF Lite files (`tflite`), torchvision's segmentation
models and VainF/DeepLabV3Plus-Pytorch checkpoints, the FCN Caffe release and torchvision's
ImageNet backbones of the classic networks. We never download weights for you, except with the
word `download` where torchvision's own download code serves.

Each conversion writes OUT (our checkpoint) and OUT.json (the resolved arguments and a summary).
Each checkpoint records what the weights are: `trained_on` (guessed from the file, or
--trained-on), the input normalisation the weights expect (`input_norm`: "caffe" = BGR 0..255
minus the mean, "imagenet" = RGB 0..1 with ImageNet mean/std, "tf" = RGB scaled to [-1, 1]), the
source's published test recipe (`recipe`: scales, fusion, resizing, protocol, with the source
cited; each module's RECIPE under seglab/weights/), the data set whose classes the head predicts
with their names and colours, and provenance (source file, sha256, converter, what was skipped
or dropped). evaluate.py and infer.py run a checkpoint with its recipe; evaluation reads
`trained_on` to warn loudly when the weights have seen the split being scored. ImageNet
backbones (`torchvision`, `imagenet_backbones`) carry no recipe and no classes: they are
starting points for training.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seglab.checkpoint import CheckpointError, atomic_save, label_facts, make_checkpoint, sha256
from seglab.data.registry import dataset_class
from seglab.weights import caffe, published, torchvision_imagenet
from seglab.weights import tflite
from seglab.weights import torchvision_seg as tv_seg, vainf
from seglab.weights import fcn_caffe, imagenet_backbones
from seglab.weights.caffe_proto import CaffeModelError
from seglab.weights.common import ConversionError
from seglab.weights.provenance import SPLIT_CONTENTS, guess_trained_on

# name -> (module with convert(args) -> dict, what INPUT is, where to download it). Each module
# states what its source is: INPUT_NORM (the input normalisation its weights expect), RECIPE
# (the source's test recipe), LABELS (the data sets its heads predict). A new source of weights
# is one module under seglab/weights/ plus one line here.
CONVERTERS = {
    "caffe": (caffe, "a DeepLab v2 .caffemodel (init.caffemodel, train_iter_20000.caffemodel, "
                     "...)", "http://liangchiehchen.com/projects/DeepLabv2_resnet.html"),
    "pth": (published, "the published PyTorch conversion (deeplabv2_resnet101_msc-vocaug-20000"
                       ".pth), or with --to-published one of our checkpoints back into it",
            "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
            "deeplabv2_resnet101_msc-vocaug-20000.pth"),
    "torchvision": (torchvision_imagenet, "torchvision ResNet-50/101 ImageNet weights (a local "
                                          "file, or `download`)",
                    "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
    "tflite": (tflite, "a TF Lite DeepLab v3 MobileNetV2 (.tflite, float or uint8)",
               " or ".join(tflite.URLS)),
    "torchvision-seg": (tv_seg, tv_seg.HELP, tv_seg.DOWNLOAD),
    "vainf": (vainf, vainf.HELP, vainf.DOWNLOAD),
    "imagenet_backbones": (imagenet_backbones, imagenet_backbones.HELP,
                           imagenet_backbones.DOWNLOAD),
    "fcn_caffe": (fcn_caffe, "an FCN-VGG16 Caffe release (fcn8s-heavy-pascal.caffemodel, "
                             "fcn16s/fcn32s-heavy-pascal, fcn8s-atonce-pascal)",
                  "http://dl.caffe.berkeleyvision.org/fcn8s-heavy-pascal.caffemodel"),
}

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="convert.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="converter", required=True)
    for name, (_, text, url) in CONVERTERS.items():
        p = sub.add_parser(name, help=text, description=f"{text}. Download: {url}")
        p.add_argument("input", help="input file" + (" or the word `download`"
                                                     if name == "torchvision" else ""))
        p.add_argument("output", help="output file (our checkpoint; OUTPUT.json gets the summary)")
        p.add_argument("--num-classes", type=int, default=None,
                       help="classes of the ASPP head (default: the file's VOC head, else 21)")
        p.add_argument("--trained-on", choices=sorted(SPLIT_CONTENTS), default=None,
                       help="what the weights were trained on (default: guessed from the file "
                            "name: train_iter_* = train_aug, train2_* = trainval, init = coco)")
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the ASPP init where the file has no head (default 0)")
        if name == "caffe":
            p.add_argument("--allow-partial", action="store_true",
                           help="keep tensors the caffemodel lacks at their init instead of "
                                "failing")
        if name == "pth":
            p.add_argument("--to-published", action="store_true",
                           help="INPUT is our checkpoint; write the published port's state_dict")
    return parser.parse_args(argv)


def what_it_is(module, arch: dict, left_at_init) -> dict:
    """The source's test recipe (module.RECIPE) and, where its head came from the file and is
    one of the source's published label sets (module.LABELS by class count), that data set's
    classes and colours. A head left at its init (another --num-classes, an init model whose
    classifier was dropped) predicts no classes yet: none are recorded."""
    facts = {}
    if getattr(module, "RECIPE", None):
        facts["recipe"] = dict(module.RECIPE)
    dataset = getattr(module, "LABELS", {}).get(arch["num_classes"])
    if dataset and not left_at_init:
        cls = dataset_class(dataset)
        names = list(cls.classes)[:arch["num_classes"]]
        facts.update(label_facts(dataset, names, cls.colors[:len(names)]))
    return facts


def provenance_of(args, result: dict) -> tuple[str | None, dict]:
    """(what the weights were trained on, the provenance record) of one conversion: --trained-on
    over the converter's knowledge over a guess from the file name; the source and its sha256
    as the converter found them (a download names its URL), else the input file's."""
    trained_on = (args.trained_on or result.get("trained_on")
                  or guess_trained_on(args.input, args.converter))
    local = args.input != "download" and Path(args.input).is_file()
    provenance = dict(
        source=result.get("source", str(args.input)),
        sha256=result["sha256"] if "sha256" in result else (sha256(args.input) if local else None),
        converter=args.converter, skipped=result["skipped"], dropped=result["dropped"],
        left_at_init=result["missing"], input_norm=CONVERTERS[args.converter][0].INPUT_NORM)
    provenance.update(result.get("provenance", {}))  # the converter's own facts
    return trained_on, provenance


def convert(args) -> dict:
    """Run the converter, write the checkpoint; returns the summary (OUT.json)."""
    module = CONVERTERS[args.converter][0]
    input_norm = module.INPUT_NORM
    result = module.convert(args)
    trained_on, provenance = provenance_of(args, result)
    ckpt = make_checkpoint(result["arch"], result["state_dict"], trained_on, provenance,
                           input_norm=input_norm,
                           **what_it_is(module, result["arch"], result["missing"]))
    atomic_save(ckpt, args.output)
    print(f"wrote {args.output}: {result['filled']} tensors filled from {provenance['source']}; "
          f"skipped {len(result['skipped'])}; dropped "
          f"{len(result['dropped'])}: {result['dropped'] or 'nothing'}; "
          f"{len(result['missing'])} left at init; trained_on={trained_on}; "
          f"input_norm={input_norm}; test recipe: "
          f"{(ckpt.get('recipe') or {}).get('source', 'none (a backbone)')}; classes: "
          f"{ckpt.get('dataset') or 'none recorded'}")
    if trained_on is None:
        print("note: could not tell what the weights were trained on from the file name; "
              "pass --trained-on so evaluation can warn about train/test overlap",
              file=sys.stderr)
    return dict(arch=result["arch"], trained_on=trained_on, provenance=provenance,
                filled=result["filled"], total=len(result["state_dict"]),
                recipe=ckpt.get("recipe"), dataset=ckpt.get("dataset"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if getattr(args, "to_published", False):
            summary = published.to_published(args)
            print(f"wrote {args.output}: {summary['keys']} published keys (base.*)")
        else:
            summary = convert(args)
    except (CaffeModelError, ConversionError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = dict(vars(args), trained_on=summary.get("trained_on"))
    sidecar = Path(str(args.output) + ".json")
    sidecar.write_text(json.dumps(dict(config=config, **summary), indent=2, default=str))
    return 0

if __name__ == "__main__":
    sys.exit(main())
