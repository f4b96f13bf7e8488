"""Google's TF Lite DeepLab v3 MobileNetV2 releases (.tflite) -> our `deeplabv3_mnv2_tf` checkpoint.

    python Implementation/convert.py tflite deeplabv3_mnv2_pascal_quant.tflite mnv2.pth

Reading: the flatbuffer through the PyPI package `tflite` (the TF Lite schema's generated
readers; no TensorFlow), into plain Python (`read_tflite`: tensors with shape, type,
quantisation and values; operators with their options). Mapping (`graph_to_state_dict`): the
operators are walked in graph order while each tensor is given a *role* (which of our modules
made it), so every operator is checked against the structure of seglab/models/deeplabv3_mnv2_tf.py:
  CONV_2D / DEPTHWISE_CONV_2D  the next backbone conv (stem; per block expand, depthwise,
                               project), or in the head the conv on the pooled map (image
                               pooling), on the backbone output (aspp0), on the concatenation
                               (projection) and on the projection (classifier). Input role,
                               weight shape, stride, dilation, SAME padding and the fused
                               activation must all equal our module's.
  ADD                          a block's residual: its projection + the block input
  AVERAGE_POOL_2D              the image pooling: a window over the whole backbone output
  RESIZE_BILINEAR              align_corners=True only: the pooled features back to the map, or
                               the logits upsampled (our pipeline does that in
                               full_resolution_logits, the same way)
  CONCATENATION                [resized image pooling, aspp0] along channels
  QUANTIZE / ARG_MAX           requantisation (no weights) / the argmax the pipeline takes itself
Anything else, or an operator that does not fit, stops the conversion with a message that names
the first such operator. TF Lite stores conv weights OHWI (-> our OIHW) and depthwise weights
1HW(C*M) (-> (C*M, 1, H, W)). Quantised tensors are dequantised as (q - zero_point) x scale, per
channel along the quantised dimension where the file has several scales; int32 biases as
q x scale. The depth multiplier, output stride and class count are read from the tensors.

Why by hand: no public library maps a TF Lite graph onto PyTorch modules without TensorFlow
(tflite2onnx/onnx2torch would give an anonymous graph, not our architecture's modules).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from seglab.checkpoint import sha256
from seglab.models import build_model
from seglab.models.deeplabv3_mnv2_tf import STEM_CHANNELS, scaled_channels
from seglab.weights.common import ConversionError, merge_into

try:
    import tflite as tfl
except ImportError:  # convert.py's other converters work without it
    tfl = None

ARCH = "deeplabv3_mnv2_tf"
URLS = ("https://github.com/google-coral/test_data/raw/master/deeplabv3_mnv2_pascal_quant.tflite",
        "https://github.com/google-coral/test_data/raw/master/"
        "deeplabv3_mnv2_dm05_pascal_quant.tflite",
        "https://storage.googleapis.com/download.tensorflow.org/models/tflite/gpu/"
        "deeplabv3_257_mv_gpu.tflite")
_CORAL = ("VOC 2012 train_aug, per TensorFlow DeepLab's model zoo (8-bit MobileNetV2 models, "
          "74.26% / 69.65% val mIoU at depth 1.0 / 0.5): likely, not proven, that these files "
          "are exactly those checkpoints")
# sha256 -> (release, trained_on, what is known), for the files at the URLs above.
RELEASES = {
    "350af47fd346ea6d74b58833a351f583ba860e9806ec5bd292ff8d8f1f249398":
        ("google-coral/test_data deeplabv3_mnv2_pascal_quant.tflite", "train_aug", _CORAL),
    "0470d2a782aa54eeeb99d32e7b6b3fb7722905c7c4f5d26bd957ec861366d48b":
        ("google-coral/test_data deeplabv3_mnv2_dm05_pascal_quant.tflite", "train_aug", _CORAL),
    "68a539782c2c6a72f8aac3724600124a85ed977162b44e84cbae5db717c933c6":
        ("TensorFlow deeplabv3_257_mv_gpu.tflite", None,
         "unknown: 21 PASCAL VOC classes, but the training data of this GPU-delegate demo model "
         "is not documented"),
}
# How TensorFlow DeepLab tests these models on VOC: eval.py with eval_scales [1.0] (one scale), no
# flip, each image padded to eval_crop_size 513x513 (local_test_mobilenetv2.sh; the model zoo's
# 75.32 / 74.26 mIoU are single-scale numbers); inputs scaled to [-1, 1].
RECIPE = {"msc_scales": [], "msc_fusion": "mean", "interp": "caffe", "mode": "voc", "pad_to": 513,
          "source": "TensorFlow DeepLab eval.py (eval_scales 1.0, eval_crop_size 513x513, no "
          "flip; local_test_mobilenetv2.sh, g3doc/model_zoo.md)"}
LABELS = {21: "voc"}
# The input normalisation the weights expect (checkpoint `input_norm`): TF DeepLab's MobileNetV2
# preprocessing: RGB scaled to [-1, 1].
INPUT_NORM = "tf"
MULTIPLIERS = (1.0, 0.5, 0.75, 0.35, 1.3, 1.4)   # MobileNetV2's published depth multipliers
ACTIVATION = {0: None, 1: "relu", 3: "relu6"}   # TF Lite ActivationFunctionType -> ours
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


@dataclasses.dataclass
class Tensor:
    name: str
    shape: tuple
    dtype: type
    values: np.ndarray | None          # constant data as stored (None for activations)
    scale: np.ndarray | None = None    # quantisation, or None for float tensors
    zero_point: np.ndarray | None = None
    axis: int = 0                      # the quantised dimension (per-channel scales)


@dataclasses.dataclass
class Op:
    index: int
    type: str
    inputs: list
    outputs: list
    options: dict


@dataclasses.dataclass
class Graph:
    tensors: list
    ops: list
    inputs: list
    outputs: list


def dequantize(q, scale, zero_point, axis: int = 0) -> np.ndarray:
    """(q - zero_point) x scale in float64, returned as float32; `scale` (and `zero_point`) hold
    one value, or one per index of dimension `axis` (per-channel quantisation)."""
    q = np.asarray(q, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    zero = np.asarray(0 if zero_point is None else zero_point, dtype=np.float64).reshape(-1)
    if scale.size > 1:
        if q.shape[axis] != scale.size or zero.size not in (1, scale.size):
            raise ConversionError(f"{scale.size} quantisation scales for dimension {axis} of a "
                                  f"tensor of shape {q.shape}")
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape if zero.size > 1 else [1] * q.ndim)
    return ((q - zero) * scale).astype(np.float32)


def tensor_values(tensor: Tensor) -> np.ndarray:
    """The float32 values of a constant tensor, dequantised if it is quantised."""
    if tensor.values is None:
        raise ConversionError(f"tensor {tensor.name!r} has no constant data")
    if tensor.scale is None or tensor.dtype in (np.float32, np.float16):
        return tensor.values.astype(np.float32)
    return dequantize(tensor.values, tensor.scale, tensor.zero_point, tensor.axis)


def _options(op, name: str) -> dict:
    """The builtin options we check, as a dict (empty for operators we do not look into)."""
    table = op.BuiltinOptions()
    kinds = {"CONV_2D": tfl.Conv2DOptions, "DEPTHWISE_CONV_2D": tfl.DepthwiseConv2DOptions,
             "AVERAGE_POOL_2D": tfl.Pool2DOptions, "RESIZE_BILINEAR": tfl.ResizeBilinearOptions,
             "CONCATENATION": tfl.ConcatenationOptions, "ADD": tfl.AddOptions}
    if table is None or name not in kinds:
        return {}
    o = kinds[name]()
    o.Init(table.Bytes, table.Pos)
    getters = {"stride": ("StrideH", "StrideW"), "dilation": ("DilationHFactor", "DilationWFactor"),
               "filter": ("FilterHeight", "FilterWidth")}
    out = {k: tuple(getattr(o, g)() for g in gs) for k, gs in getters.items() if hasattr(o, gs[0])}
    for key, getter in (("padding", "Padding"), ("activation", "FusedActivationFunction"),
                        ("depth_multiplier", "DepthMultiplier"), ("axis", "Axis"),
                        ("align_corners", "AlignCorners"),
                        ("half_pixel_centers", "HalfPixelCenters")):
        if hasattr(o, getter):
            out[key] = getattr(o, getter)()
    if "padding" in out:
        out["padding"] = "SAME" if out["padding"] == tfl.Padding.SAME else "VALID"
    return out


def _tensor(model, t) -> Tensor:
    dtype = DTYPES.get(t.Type())
    shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    raw = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() < model.BuffersLength() else 0
    values = None
    if not isinstance(raw, int) and raw.size and dtype is not None:
        values = raw.view(dtype).reshape(shape)
    q, scale, zero, axis = t.Quantization(), None, None, 0
    if q is not None and q.ScaleLength():
        scale = q.ScaleAsNumpy().astype(np.float64)
        zero = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(1)
        axis = q.QuantizedDimension()
    return Tensor(t.Name().decode(errors="replace"), shape, dtype, values, scale, zero, axis)


def read_tflite(path) -> Graph:
    """The first subgraph of a .tflite file as plain Python (raises ConversionError)."""
    if tfl is None:
        raise ConversionError("reading .tflite files needs the PyPI package `tflite` "
                              "(pip install tflite)")
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file (download: {', '.join(URLS)})")
    data = path.read_bytes()
    try:
        model = tfl.Model.GetRootAs(data, 0)
        graph = model.Subgraphs(0)
        tensors = [_tensor(model, graph.Tensors(i)) for i in range(graph.TensorsLength())]
        ops = []
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = tfl.opcode2name(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
            ops.append(Op(k, name, [int(i) for i in op.InputsAsNumpy()],
                          [int(i) for i in op.OutputsAsNumpy()], _options(op, name)))
        inputs = [int(i) for i in graph.InputsAsNumpy()]
        outputs = [int(i) for i in graph.OutputsAsNumpy()]
    except ConversionError:
        raise
    except Exception as e:  # truncated or foreign bytes: the flatbuffer readers fail anywhere
        raise ConversionError(f"cannot read {path} as a TF Lite flatbuffer: {e!r}") from e
    return Graph(tensors, ops, inputs, outputs)


def infer_arch(graph: Graph, num_classes: int | None = None) -> dict:
    """Our arch dict from the graph: the depth multiplier from the stem's width (the published
    multiplier that gives it, else width / 32; the mapping then checks every conv), the output
    stride = 2 ^ (stride-2 convs), the classes from the last conv."""
    convs = [op for op in graph.ops if op.type in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    if not convs or graph.tensors[convs[0].inputs[1]].shape[1:] != (3, 3, 3):
        raise ConversionError("the graph does not start with a 3x3 convolution of an RGB image: "
                              "not a DeepLab v3 MobileNetV2")
    stem = graph.tensors[convs[0].inputs[1]].shape[0]
    depth = next((m for m in MULTIPLIERS if scaled_channels(STEM_CHANNELS, m) == stem),
                 stem / STEM_CHANNELS)
    output_stride = 2 ** sum(op.options.get("stride") == (2, 2) for op in convs)
    classes = graph.tensors[convs[-1].inputs[1]].shape[0]
    if num_classes is not None and num_classes != classes:
        raise ConversionError(f"the file's classifier has {classes} classes, not "
                              f"--num-classes {num_classes}")
    return dict(name=ARCH, num_classes=int(classes), depth_multiplier=float(depth),
                output_stride=int(output_stride))


def conv_plan(net) -> tuple[dict, dict, str]:
    """Our convolutions by the role of their input: {input role: [(key, module, output role)]}
    (a list: the backbone's are taken in order), the residual ADDs {frozenset of input roles:
    output role}, and the role of the backbone output."""
    plan, adds, role = {}, {}, "input"
    def add(key, module, source, out):  # noqa: E306
        plan.setdefault(source, []).append((key, module, out))
    add("backbone.stem", net.backbone.stem, role, "stem")
    role = "stem"
    for i, block in enumerate(net.backbone.blocks):
        p, source = f"backbone.blocks.{i}", role
        if block.expand is not None:
            add(f"{p}.expand", block.expand, source, f"{p}.expand")
            source = f"{p}.expand"
        add(f"{p}.depthwise", block.depthwise, source, f"{p}.depthwise")
        add(f"{p}.project", block.project, f"{p}.depthwise",
            f"{p}.project" if block.residual else p)
        if block.residual:
            adds[frozenset((f"{p}.project", role))] = p
        role = p
    add("head.image_pooling", net.head.image_pooling, "pool", "image_pooling")
    add("head.aspp0", net.head.aspp0, role, "aspp0")
    add("head.project", net.head.project, "concat", "projection")
    add("classifier", net.classifier, "projection", "logits")
    return plan, adds, role


def _conv_tensors(graph: Graph, op: Op, key: str, module) -> dict:
    """Our weight and bias from one conv op, after checking it against `module`."""
    weight = graph.tensors[op.inputs[1]]
    depthwise = op.type == "DEPTHWISE_CONV_2D"
    ours = tuple(module.weight.shape)
    theirs = ((weight.shape[3], 1) + weight.shape[1:3] if depthwise and len(weight.shape) == 4
              else (weight.shape[0], weight.shape[3]) + weight.shape[1:3]
              if len(weight.shape) == 4 else weight.shape)
    kernel = module.kernel_size
    expected = dict(type="DEPTHWISE_CONV_2D" if module.groups > 1 else "CONV_2D", weight=ours,
                    stride=module.stride, dilation=module.dilation,
                    activation=module.activation, padding="SAME")
    found = dict(type=op.type, weight=theirs, stride=op.options.get("stride"),
                 dilation=op.options.get("dilation"),
                 activation=ACTIVATION.get(op.options.get("activation"), "unsupported"),
                 padding="SAME" if kernel == (1, 1) and module.stride == (1, 1)  # SAME == VALID
                 else op.options.get("padding"))
    diff = {k: (found[k], v) for k, v in expected.items() if found[k] != v}
    if diff:
        raise ConversionError(f"{key}: " + ", ".join(f"{k} {a} in the file, {b} in our model"
                                                     for k, (a, b) in diff.items()))
    w = tensor_values(weight)
    w = w[0].transpose(2, 0, 1)[:, None] if depthwise else w.transpose(0, 3, 1, 2)
    bias = tensor_values(graph.tensors[op.inputs[2]]) if len(op.inputs) > 2 and \
        op.inputs[2] >= 0 else np.zeros(ours[0], np.float32)
    return {f"{key}.weight": torch.from_numpy(np.ascontiguousarray(w)),
            f"{key}.bias": torch.from_numpy(np.ascontiguousarray(bias.reshape(-1)))}


def _walk_op(graph: Graph, op: Op, roles: dict, plan: dict, adds: dict, backbone: str,
             mapped: dict, dropped: list) -> str:
    """The role of `op`'s output, after checking the op (ConversionError says why not)."""
    source = [roles.get(i) for i in op.inputs if i >= 0 and graph.tensors[i].values is None]
    first = source[0] if source else None
    if op.type in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        if not plan.get(first):
            raise ConversionError(f"a convolution on {first or 'an unknown tensor'}, where our "
                                  "model has none")
        key, module, out = plan[first].pop(0)
        mapped.update(_conv_tensors(graph, op, key, module))
        return out
    if op.type == "ADD" and frozenset(source) in adds and not op.options.get("activation"):
        return adds[frozenset(source)]
    if op.type == "AVERAGE_POOL_2D" and first == backbone:
        if op.options.get("filter") != graph.tensors[op.inputs[0]].shape[1:3]:
            raise ConversionError(f"average pool {op.options.get('filter')} is not global over "
                                  f"{graph.tensors[op.inputs[0]].shape[1:3]}")
        return "pool"
    if op.type == "RESIZE_BILINEAR" and first in ("image_pooling", "logits", "upsampled"):
        if not op.options.get("align_corners") or op.options.get("half_pixel_centers"):
            raise ConversionError("bilinear resize without align_corners=True")
        if first != "image_pooling":
            dropped.append(f"op {op.index} RESIZE_BILINEAR (the logits upsampled: the pipeline "
                           "does it, align_corners=True)")
        return "resized_pooling" if first == "image_pooling" else "upsampled"
    if op.type == "QUANTIZE" and first is not None:
        return first
    if op.type == "CONCATENATION" and source == ["resized_pooling", "aspp0"] and \
            op.options.get("axis") in (3, -1):
        return "concat"
    if op.type == "ARG_MAX" and first in ("logits", "upsampled"):
        dropped.append(f"op {op.index} ARG_MAX (the pipeline takes the argmax itself)")
        return "labels"
    raise ConversionError(f"does not fit DeepLab v3 MobileNetV2 (inputs: {source})")


def graph_to_state_dict(graph: Graph, net, path="the graph") -> tuple[dict, list]:
    """Map every operator of `graph` onto `net` (a DeepLabV3MobileNetV2 of the inferred arch):
    (complete state_dict, the ops dropped with why). Errors name the first op that did not
    fit."""
    plan, adds, backbone = conv_plan(net)
    roles = {graph.inputs[0]: "input"}
    mapped, dropped = {}, []
    for op in graph.ops:
        try:
            out = _walk_op(graph, op, roles, plan, adds, backbone, mapped, dropped)
        except ConversionError as e:
            name = graph.tensors[op.outputs[0]].name if op.outputs else "?"
            raise ConversionError(f"{path}: op {op.index} {op.type} (output {name!r}) {e}") \
                from None
        for t in op.outputs:
            roles[t] = out
    left = [key for convs in plan.values() for key, _, _ in convs]
    if left:
        raise ConversionError(f"{path}: the graph ends before our model's {left[0]} "
                              f"({len(left)} convolutions unfilled)")
    state_dict, _ = merge_into(net, mapped, required_prefix="")
    return state_dict, dropped


def describe_input(graph: Graph) -> dict:
    """Input size and encoding: float, or uint8 with real = (q - zero_point) x scale."""
    t = graph.tensors[graph.inputs[0]]
    out = dict(input_size=list(t.shape[1:3]), input_dtype=np.dtype(t.dtype).name)
    if t.scale is not None:
        out["input_quantization"] = dict(scale=float(t.scale[0]), zero_point=int(t.zero_point[0]))
    return out


def convert(args) -> dict:
    """convert.py's contract: dict(arch, state_dict, filled, skipped, dropped, missing), plus the
    facts about the file (provenance; trained_on where the release is known by its sha256)."""
    graph = read_tflite(args.input)
    arch = infer_arch(graph, args.num_classes)
    try:
        net = build_model(arch)
    except ValueError as e:
        raise ConversionError(f"{args.input}: {e}") from None
    state_dict, dropped = graph_to_state_dict(graph, net, args.input)
    digest = sha256(args.input)
    release, trained_on, known = RELEASES.get(digest,
                                              (None, None, "unknown: not one of the releases "
                                               "this converter knows; pass --trained-on"))
    facts = dict(release=release, trained_on_note=known, **describe_input(graph),
                 operators=len(graph.ops), quantized=graph.tensors[graph.inputs[0]].scale
                 is not None)
    print(f"{args.input}: {facts}")
    return dict(arch=arch, state_dict=state_dict, filled=len(state_dict), skipped=[],
                dropped=dropped, missing=[], provenance=facts, trained_on=trained_on,
                sha256=digest)
