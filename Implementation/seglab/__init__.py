"""The library behind the scripts in Implementation/, one sub-package per stage of the pipeline:

  data/        images and labels, the data sets behind one interface (VOC + SBD train_aug,
               Cityscapes, COCO-Stuff, ADE20K, your own folder, the synthetic demo), transforms,
               evaluation protocols, loaders, the up-front split check
  models/      the architectures behind one seam (spec.py), MSC, the resizing conventions
  training/    the loss, the poly schedule, the training loop, init weights, resumable state
  evaluation/  metrics, the logit cache, the evaluation of a model on a split
  densecrf/    stage two: the fully connected CRF (pydensecrf and a pure-PyTorch lattice),
               its parallel runner and its parameter search
  inference/   device, speed rewrites, the Predictor
  weights/     readers and converters for the published weight files
  deploy/      ONNX export, int8 quantisation, an ONNX-backed predictor
  figures/     the README's figures

Cross-cutting: config.py (the recipe and its overrides), checkpoint.py (our file format),
atomic.py (crash-safe writes), device.py.
"""
