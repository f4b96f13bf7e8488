"""The tutorial figures on a real photograph with a real VOC-trained network: MSC, the CRF
iterations, and an inference overlay, drawn with Google's DeepLab v3 MobileNetV2 (converted with
`convert.py tflite`) on a public-domain photo that ships with scikit-image, so anyone can redraw
them: `python Implementation/figures.py --real weights/mnv2_dm1.pth`.

The photo has no ground truth: the panels show what the network and the CRF do, without scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage import data as skdata

from seglab.checkpoint import label_set, load_checkpoint, load_model_weights
from seglab.data.transforms import EvalTransform
from seglab.densecrf.dense_crf import import_pydensecrf
from seglab.densecrf.params import CRFParams
from seglab.figures.crf import crf_figure
from seglab.figures.msc import msc_figure, msc_predict
from seglab.figures.run import FigureError
from seglab.inference.overlay import overlay
from seglab.models import architecture, build_model
from seglab.recipe import resolve_recipe

PHOTOS = ("astronaut", "chelsea", "coffee")
SCALES = (0.75, 0.5)


def real_network(checkpoint):
    """(network in eval mode, its EvalTransform at 513, (class names, colours)) from one of our
    checkpoints; the input normalisation is the checkpoint's (seglab/recipe.py)."""
    try:
        ckpt = load_checkpoint(checkpoint)
    except Exception as e:  # CheckpointError: the message already says what and where
        raise FigureError(str(e)) from None
    net = build_model(ckpt["arch"])
    load_model_weights(net, ckpt, str(checkpoint))
    norm = resolve_recipe({}, ckpt, net.arch)[0]["norm"]
    stride = architecture(net.arch).output_stride(net.arch)
    return (net.eval(), EvalTransform("voc", 513, norm=norm, stride=stride),
            label_set(ckpt, net.arch["num_classes"]))


def photo(name: str) -> np.ndarray:
    if name not in PHOTOS:
        raise FigureError(f"unknown photo {name!r}: choose from {', '.join(PHOTOS)}")
    return np.ascontiguousarray(getattr(skdata, name)()[..., :3])


def fig_real(checkpoint, out: Path, name: str = "astronaut") -> list[Path]:
    """msc_real.png, crf_real.png and overlay_real.png for scikit-image's `name` photo."""
    net, transform, (names, colors) = real_network(checkpoint)
    image = photo(name)
    title = f"scikit-image\n'{name}' photo"
    written = [msc_figure(image, None, net, transform, SCALES, "caffe", out, title=title,
                          name="msc_real.png")]
    single = msc_predict(net, image, transform, (), "caffe")
    backend = "pydensecrf" if import_pydensecrf() is not None else "torch"
    written.append(crf_figure(image, None, single.fused, CRFParams(), backend, out, title=title,
                              name="crf_real.png"))
    labels = single.fused.argmax(0).numpy().astype(np.uint8)
    target = Path(out) / "overlay_real.png"
    overlay(image, labels, names, colors=colors).save(target)
    written.append(target)
    return written
