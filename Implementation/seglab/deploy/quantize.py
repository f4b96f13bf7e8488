"""int8 post-training quantisation, calibrated on training crops, through the two maintained
paths for x86 CPUs:

  quantize_checkpoint  onnxruntime's static quantisation in the QDQ format (the format its CPU
                       kernels are optimised for): a checkpoint is exported to fp32 ONNX
                       (onnx_export.py), prepared (`quant_pre_process`: shape inference and graph
                       optimisation), calibrated, and written as one int8 .onnx file that
                       OnnxPredictor, evaluate.py and infer.py run. Weights int8 per output
                       channel (symmetric), activations uint8 per tensor (asymmetric), full 8-bit
                       range: the settings onnxruntime's documentation gives for x86 CPUs with
                       VNNI (u8 x s8 products then accumulate without saturation).
  quantize_pt2e        torchao's PT2E flow (torchao.quantization.pt2e; PyTorch 2.14 moved it out
                       of torch.ao): torch.export, the X86 Inductor quantizer's default static
                       config (uint8 activations per tensor with histogram observers, int8
                       weights per channel), calibration, convert; `torch.compile` then lowers it
                       to oneDNN int8 kernels. In-process only (the benchmark's second int8
                       path), and only for networks its pattern matcher takes: DeepLab v2
                       single scale yes; the TF-SAME convolutions of deeplabv3_mnv2_tf (an
                       nn.Conv2d subclass with its own forward) and DeepLab v2's MSC graph no, and
                       it says so (ValueError) instead of returning an unquantised module.

Calibration data (`CalibrationCrops`): `count` crops of `crop` x `crop` pixels, made as training
makes them (seglab/data/transforms.py TrainTransform: random scale 0.5-1.5, pad with the mean
colour, random crop, mirror), drawn from the training split of a VOC-layout data root or from
every image under a plain folder, deterministic for a seed. A few hundred crops by default (the
usual PTQ budget: activation ranges stop moving well before that); tests use a handful.
Calibration methods (onnxruntime's calibrators): "minmax" (each activation's observed range over
all crops; the default), "percentile" (the range that holds 99.999% of its values: rare outliers
clipped) and "entropy" (the range that minimises the KL divergence of the quantised histogram).
The crops are fed a few at a time (onnxruntime's strided collection): the histogram calibrators
would otherwise keep every activation of every crop in memory until the end, which a ResNet-101
cannot afford for hundreds of crops.

Mixed precision (`float_linear`): the convolutions that no activation follows stay float. On
Google's MobileNetV2 DeepLab v3 (voc_dev, two folds, three calibration seeds; bench_deploy.py)
those 18 of 55 convolutions held most of the int8 loss: full int8 lost 1.1-2.3 mIoU (98.2-98.6%
of labels equal to fp32), with them in float -0.6 to +0.4 (98.5-98.8%), at no measurable cost in
speed (they are small 1x1 convolutions). For a ResNet the same rule would keep every residual
branch's last convolution in float, a large share of the work: off by default.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from seglab.checkpoint import sha256
from seglab.data.images import DataError, load_image
from seglab.data.registry import dataset_class
from seglab.data.transforms import VOC_SCALES, TrainTransform
from seglab.data.voc import voc_dir
from seglab.deploy.onnx_export import (check_inputs, compare_with_torch, export_onnx,
                                       torch_predictor)
from seglab.deploy.onnx_file import INPUT, OUTPUT, open_session, read_metadata, write_onnx
from seglab.inference.batch import find_images

METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CROPS, DEFAULT_CROP = 300, 321
PERCENTILE = 99.999   # "percentile": each activation's range covers this share of its values
DEFAULT_METHOD = "minmax"


# ---------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------

def calibration_sources(root, split: str = "train_aug") -> list[Path]:
    """Image files to calibrate on: `split` of a VOC-layout root, else every image below `root`
    (a folder), or `root` itself when it is a list of image files."""
    if isinstance(root, (list, tuple)):
        return [Path(p) for p in root]
    root = Path(root)
    if voc_dir(root).is_dir():
        ds = dataset_class("voc")(root, split, None, check_labels=False)
        return [ds.image_path(i) for i in range(len(ds))]
    images, missing = find_images([root])
    if missing or not images:
        raise DataError(f"no calibration images under {root}: give a VOC-layout data root "
                        "(its training split is used) or a folder of .jpg/.png images")
    return [path for path, _ in images]


class CalibrationCrops:
    """`count` normalised training crops (1, 3, crop, crop), made on the fly (a few hundred
    513 x 513 crops would be a gigabyte in memory): crop k comes from image k mod len(images)
    (the images shuffled once by `seed`) with its own random scale, crop and mirror."""

    def __init__(self, root, count: int = DEFAULT_CROPS, crop: int = DEFAULT_CROP,
                 norm: str = "caffe", split: str = "train_aug", seed: int = 0,
                 scales=VOC_SCALES):
        self.paths = calibration_sources(root, split)
        self.count, self.seed = int(count), seed
        self.order = np.random.default_rng(seed).permutation(len(self.paths))
        self.transform = TrainTransform(crop=crop, scales=scales, mirror=True, norm=norm)

    def __len__(self):
        return self.count

    def __iter__(self):
        for k in range(self.count):
            image = load_image(self.paths[self.order[k % len(self.paths)]])
            dummy = np.zeros(image.shape[:2], np.uint8)
            x, _ = self.transform(image, dummy, np.random.default_rng([self.seed, k]))
            yield x[None]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over `count` crops from an iterator, served
    in chunks (`set_range`, which quantize_static's "CalibStridedMinMax" option drives) so that
    the histogram calibrators hold one chunk's activations at a time, not every crop's."""

    def __init__(self, crops, count: int):
        self.crops, self.count, self.seen, self.left = iter(crops), count, 0, count

    def __len__(self):
        return self.count

    def set_range(self, start_index: int, end_index: int):
        self.left = end_index - start_index

    def get_next(self):
        x = next(self.crops, None) if self.left > 0 else None
        if x is None:
            return None
        self.seen, self.left = self.seen + 1, self.left - 1
        return {INPUT: x.numpy()}


# ---------------------------------------------------------------------------------------------
# onnxruntime: static QDQ quantisation of an ONNX file
# ---------------------------------------------------------------------------------------------

def linear_convs(path) -> list[str]:
    """The convolutions of an ONNX graph that no activation (Relu, Clip) follows: MobileNetV2's
    linear bottleneck projections and the classifier. Their outputs are signed, wide and feed
    the residual sums, the activations that per-tensor uint8 fits worst."""
    graph = onnx.load_model(str(path), load_external_data=False).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    return [n.name for n in graph.node if n.op_type == "Conv"
            and not {"Relu", "Clip"} & set(consumers.get(n.output[0], []))]


def quantize_onnx(fp32_path, out, crops, method: str = DEFAULT_METHOD, per_channel: bool = True,
                  float_linear: bool = False, chunk: int = 4, **facts) -> dict:
    """Quantise an fp32 file of ours to int8 QDQ, calibrated on `crops` (a sized iterable of
    (1, 3, h, w) tensors, e.g. CalibrationCrops; read once, `chunk` at a time) with `method`;
    copies its metadata with precision "int8" and a `quantization` record, returned.
    `float_linear` keeps the `linear_convs` in float (mixed precision)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    meta = read_metadata(fp32_path)
    if meta["precision"] != "fp32":
        raise ValueError(f"{fp32_path} is already {meta['precision']}: quantise the fp32 file")
    started = time.perf_counter()
    reader = _Reader(crops, len(crops))
    chunk = max(1, min(int(chunk), len(crops)))
    while len(crops) % chunk:  # onnxruntime's strided collection needs equal chunks
        chunk -= 1
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantised = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        excluded = linear_convs(prepared) if float_linear else []
        with contextlib.redirect_stdout(io.StringIO()):  # its per-chunk progress prints
            quantize_static(str(prepared), str(quantised), reader, quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=calibrate, nodes_to_exclude=excluded,
                            extra_options={"CalibStridedMinMax": chunk,
                                           "CalibPercentile": PERCENTILE})
        quantization = dict(runtime="onnxruntime", format="QDQ", method=method,
                            per_channel=per_channel, float_convs=len(excluded),
                            activations="uint8 per tensor",
                            weights="int8 per channel" if per_channel else "int8 per tensor",
                            crops=reader.seen, seconds=round(time.perf_counter() - started, 1),
                            fp32_sha256=sha256(fp32_path), **facts)
        meta = dict(meta, precision="int8", quantization=quantization)
        write_onnx(onnx.load_model(str(quantised)), out, meta)
    return meta


def quantize_checkpoint(source, out, calibration, count: int = DEFAULT_CROPS,
                        crop: int = DEFAULT_CROP, msc: bool = False, msc_scales=None,
                        split: str = "train_aug", seed: int = 0, fp32_out=None, fixed_size=None,
                        norm=None, check_images=None, msc_fusion=None,
                        method: str = DEFAULT_METHOD, float_linear: bool = False) -> dict:
    """Checkpoint (or model) -> checked fp32 ONNX (`fp32_out`, else a temp file) -> int8 QDQ
    `out`, calibrated on `count` crops of the training images under `calibration` (crops of
    `fixed_size` for a fixed-size file). Returns the int8 file's metadata with "fp32_check"
    (fp32 ONNX vs PyTorch) and "int8_check" (int8 vs fp32 ONNX on the same check inputs)."""
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(fp32_out or Path(tmp) / "fp32.onnx")
        facts = export_onnx(source, fp32, msc=msc, msc_scales=msc_scales, norm=norm,
                            fixed_size=fixed_size, check_images=check_images,
                            msc_fusion=msc_fusion)
        if fixed_size:  # the file takes one size: calibrate at it
            if fixed_size[0] != fixed_size[1]:
                raise ValueError(f"int8 calibration of a fixed-size file needs a square size "
                                 f"(crops are square), got {tuple(fixed_size)}")
            crop = int(fixed_size[0])
        crops = CalibrationCrops(calibration, count, crop, facts["norm"], split, seed)
        meta = quantize_onnx(fp32, out, crops, method, float_linear=float_linear,
                             calibration=str(calibration),
                             split=split, crop=crop, seed=seed)
        fp32_session = open_session(fp32)
        inputs = check_inputs(facts["norm"], facts["output_stride"], check_images,
                              fixed_size=facts.get("fixed_size"))
        int8_check = compare_with_torch(
            out, lambda x: torch.from_numpy(fp32_session.run([OUTPUT], {INPUT: x.numpy()})[0]),
            inputs, facts["interp"])
    return dict(meta, fp32_check=facts["check"], int8_check=int8_check)


# ---------------------------------------------------------------------------------------------
# torchao PT2E: int8 in PyTorch (X86 Inductor quantizer)
# ---------------------------------------------------------------------------------------------

def drop_zero_additions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove `x + 0` nodes (Python's sum() starts from 0: DeepLab v2's ASPP sum exports as
    add(conv, 0)), which the X86 quantizer's conv + add pattern cannot annotate (it asserts)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch.ops.aten.add.Tensor,
                                                          torch.ops.aten.add.Scalar) \
                and len(node.args) == 2 and isinstance(node.args[1], (int, float)) \
                and node.args[1] == 0 and node.kwargs.get("alpha", 1) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def quantize_pt2e(source, crops, msc: bool = False, compile: bool = True):
    """An int8 PyTorch module of a checkpoint (or model) through torchao's PT2E flow, calibrated
    on `crops` (normalised (1, 3, h, w) tensors). With `compile`, the result is torch.compile'd
    (Inductor freezing on, which the int8 oneDNN lowering needs); the first call per input size
    then compiles. Raises ValueError when the quantizer found nothing to quantise: it matches
    convolutions by the module that made them (nn.Conv2d itself; a subclass with its own forward,
    like the TF-SAME conv of deeplabv3_mnv2_tf, is not recognised in torchao 0.18)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    model = torch_predictor(source, msc=msc).model.eval()
    crops = iter(crops)
    first = next(crops)
    with torch.no_grad():
        # calibrate on crops, run on whole images: height and width stay symbolic (DYNAMIC:
        # guards that the solver cannot prove, like Caffe's ceil-mode pooling rule, do not fail)
        dims = ({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC},)
        exported = drop_zero_additions(
            torch.export.export(model, (first,), dynamic_shapes=dims).module())
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config())
        try:
            prepared = prepare_pt2e(exported, quantizer)
        except (AssertionError, NotImplementedError, ValueError) as e:  # a pattern it rejects
            raise ValueError(f"torchao's X86 Inductor quantizer cannot take this network ({e}); "
                             "use the onnxruntime path (export.py int8)") from e
        prepared(first)
        for x in crops:
            prepared(x)
        converted = convert_pt2e(prepared)
    quantised = sum(1 for n in converted.graph.nodes if "quantize_per_tensor" in str(n.target))
    if not quantised:
        raise ValueError("torchao's X86 Inductor quantizer annotated no operation of this "
                         "network (it recognises convolutions by their nn.Conv2d module); use "
                         "the onnxruntime path (export.py int8)")
    if not compile:
        return converted
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    return torch.compile(converted)
