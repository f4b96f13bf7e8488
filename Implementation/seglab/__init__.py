"""The library behind the scripts in Implementation/, one sub-package per stage of the pipeline:

  data/        images and labels, data sets (VOC, SBD train_aug, the synthetic demo), transforms,
               loaders
  models/      the architectures behind one seam (spec.py), MSC, the resizing conventions
  training/    the loss, the poly schedule, the training loop, init weights, resumable state
  evaluation/  metrics, the logit cache, the evaluation of a model on a split
  densecrf/    stage two: the fully connected CRF (pydensecrf and a pure-PyTorch lattice),
               its parallel runner and its parameter search
  inference/   device, speed rewrites, the Predictor
  weights/     readers and converters for the published weight files
  figures/     the README's figures

Cross-cutting: config.py (the recipe and its overrides), checkpoint.py (our file format),
atomic.py (crash-safe writes), device.py.
"""
