"""The ONNX file format of this project, and opening a file in onnxruntime.

A file written by export.py is a plain ONNX model (input `image`: the normalised image
(N, 3, H, W); output `logits`: (N, C, h, w) at the output stride) whose
`metadata_props["seglab"]` holds, as JSON, what a predictor needs to run it: architecture,
classes, input normalisation, resize convention, MSC scales, output stride, precision ("fp32" or
"int8"), the source checkpoint's identity, training split and provenance, and for int8 files
how they were calibrated. `write_onnx` writes it (one file with the weights inside, atomically),
`read_metadata` reads the JSON back without the weights, `open_session` opens the file in
onnxruntime (imported only there, so the rest of the project works without onnxruntime).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from seglab.atomic import atomic_output
from seglab.device import DeviceError

META_KEY = "seglab"
FORMAT, VERSION = "seglab-onnx", 1
INPUT, OUTPUT = "image", "logits"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ExportError(ValueError):
    """A model that cannot be exported as asked, or a file that is not one of ours."""


def write_onnx(proto: onnx.ModelProto, out, meta: dict) -> Path:
    """Set the seglab metadata on `proto` and write it to `out` atomically."""
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, default=str)
    proto.producer_name = "seglab"
    with atomic_output(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out)


def read_metadata(path) -> dict:
    """The seglab metadata of an ONNX file (its weights are not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # not a protobuf, a truncated file
        raise ExportError(f"cannot read {path} as ONNX ({e}). Write it with "
                          "`python Implementation/export.py onnx`.") from None
    entries = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in entries:
        raise ExportError(f"{path} has no '{META_KEY}' metadata: it was not written by "
                          "`python Implementation/export.py`, so its input normalisation and "
                          "output stride are unknown. Export the checkpoint with it.")
    meta = json.loads(entries[META_KEY])
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: metadata format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running an .onnx file needs onnxruntime: pip install onnxruntime "
                          "(onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def open_session(path, device: str = "cpu", threads: int = 0):
    """An onnxruntime InferenceSession of `path` on `device` ("auto", "cpu" or "cuda[:N]";
    auto = CUDA where this onnxruntime has it), all graph optimisations on (they fuse an int8
    file's QuantizeLinear/DequantizeLinear pairs into integer kernels); `threads` intra-op
    threads (0: onnxruntime's default, one per physical core)."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    device = str(device)
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if kind not in PROVIDERS:
        raise DeviceError(f"onnxruntime runs on cpu or cuda, not {device!r}")
    if PROVIDERS[kind] not in available:
        raise DeviceError(f"device {device!r} asked for, but this onnxruntime has only "
                          f"{available}; install onnxruntime-gpu or use --device cpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    # no busy-waiting between runs: the upsampling and argmax that follow each run (PyTorch)
    # need the same cores (measured: faster end to end, and much steadier under load)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [PROVIDERS["cpu"]]
    if kind == "cuda":
        index = int(device.split(":")[1]) if ":" in device else 0
        providers = [(PROVIDERS["cuda"], {"device_id": index}), PROVIDERS["cpu"]]
    return ort.InferenceSession(str(path), options, providers=providers)
