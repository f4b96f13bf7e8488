"""The library behind the scripts in Implementation/, one sub-package per stage of the pipeline.

Layers, each importing only the ones before it (tests/test_layers.py checks it, function-local
imports included): files and devices (atomic, device, data) -> networks (models, with their
inference rewrites) -> what a file holds (recipe, checkpoint, weights, config) -> the stages
(densecrf, training, evaluation, inference, deploy, figures) -> the public names (api) -> the
scripts in Implementation/.

  data/        images and labels, the data sets behind one interface (VOC + SBD train_aug,
               Cityscapes, COCO-Stuff, ADE20K, your own folder, the synthetic demo), transforms,
               evaluation protocols and their scores (metrics), loaders, the up-front split
               check, the logit cache (the network's outputs on disk, read by stage two)
  models/      the architectures behind one seam (spec.py), MSC, the resizing conventions, the
               exact inference rewrites of their modules (rewrites.py)
  training/    the loss, the poly schedule, the training loop, init weights (class-mapped
               from a checkpoint's classes), distillation from that init, resumable state
  evaluation/  the evaluation of a model on a split (network pass, scores, CRF), the baseline
  densecrf/    stage two: the fully connected CRF (pydensecrf and a pure-PyTorch lattice),
               its parallel runner and its parameter search
  inference/   the Predictor, batch inference on files, overlays
  weights/     readers and converters for the published weight files
  deploy/      ONNX export, int8 quantisation, an ONNX-backed predictor
  figures/     the README's figures

Cross-cutting: config.py (the recipe and its overrides), recipe.py (how a model is tested:
its recipe, resolved command line > checkpoint > architecture > the paper's), checkpoint.py (our
file format), atomic.py (crash-safe writes), device.py (device choice).

From your own code (`pip install -e .` at the repository root, or Implementation/ on sys.path),
the public names are few (api.py):

    seglab.load(checkpoint, **settings) -> predictor: .predict(image) -> (labels, logits),
                                           .refine(image, logits) -> CRF labels,
                                           .classes, .palette, .recipe
    seglab.score(labels, truth, num_classes) -> {"miou", "iou", "pixel_acc", ...}
    seglab.architectures() -> {name: summary};  seglab.build_model(arch) -> nn.Module

They are imported on first use, so `import seglab` itself is cheap and any sub-package imports
alone.
"""
from __future__ import annotations

LAYERS = (("seglab.atomic", "seglab.device", "seglab.data"),
          ("seglab.models",),
          ("seglab.recipe", "seglab.checkpoint", "seglab.weights", "seglab.config",
           "seglab.densecrf.params"),       # the CRF's parameters: plain data the config checks
          ("seglab.densecrf", "seglab.training", "seglab.evaluation", "seglab.inference",
           "seglab.deploy", "seglab.figures"),
          ("seglab.api", "seglab"))
PUBLIC = {"load": "seglab.api", "score": "seglab.api", "architectures": "seglab.api",
          "build_model": "seglab.models"}
__all__ = sorted(PUBLIC)


def __getattr__(name: str):
    """The public names, imported when first used (PEP 562)."""
    if name in PUBLIC:
        import importlib
        return getattr(importlib.import_module(PUBLIC[name]), name)
    raise AttributeError(f"module 'seglab' has no attribute {name!r}")
