"""Deployment: a trained network as an ONNX file, int8 post-training quantisation, and a
predictor that runs the file.

  onnx_export.py   any network behind the model seam (seglab/models/spec.py) to ONNX, single
                   scale or with the MSC max fusion, dynamic batch/height/width, checked against
                   PyTorch in onnxruntime on the same inputs
  quantize.py      int8 post-training quantisation calibrated on training crops: onnxruntime's
                   static QDQ quantisation (the file that evaluate.py/infer.py run) and torchao's
                   PT2E flow with the X86 Inductor quantizer (in-process, for the benchmark)
  runtime.py       OnnxPredictor: the interface of seglab.inference.predictor.Predictor over an
                   onnxruntime session

`load_predictor(path, ...)` is the one door evaluate.py and infer.py go through: an .onnx file
gives an OnnxPredictor, anything else (a checkpoint path or dict, a model) a Predictor, and a
predictor passes through unchanged.
"""
from __future__ import annotations

from pathlib import Path


def load_predictor(source, device="auto", precision: str = "fp32", norm=None, **kwargs):
    """A predictor for `source`: an OnnxPredictor for a `.onnx` path, the PyTorch Predictor for
    a checkpoint (path or dict) or a model; an object that already is a predictor (has `logits`
    and `settings`) is returned as it is."""
    if hasattr(source, "logits") and hasattr(source, "settings"):
        return source
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".onnx":
        from seglab.deploy.runtime import OnnxPredictor
        return OnnxPredictor(source, device=device, precision=precision, norm=norm, **kwargs)
    from seglab.inference.predictor import Predictor
    return Predictor(source, device=device, precision=precision, norm=norm, **kwargs)
