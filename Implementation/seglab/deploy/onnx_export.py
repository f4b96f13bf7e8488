"""Any network behind the model seam to one ONNX file, and the check that the file computes what
PyTorch computes.

    facts = export_onnx("runs/voc12/checkpoints/final.pth", "model.onnx", msc=True)
    check = compare_with_torch("model.onnx", torch_model(...), inputs)

What goes into the file: the network exactly as `Predictor` builds it for fp32 inference
(seglab/inference/predictor.py: the architecture's `prepare_inference` rewrites, here with frozen
BN folded into the convolutions and the ASPP left as its plain dilated convolutions, which ONNX
runtimes already run well), optionally inside MSC (seglab/models/msc.py: the image at 1x and each
scale, the smaller logits upsampled with the checkpoint's resize convention and fused by max).
Input `image` (N, 3, H, W): the normalised image (seglab/data/transforms.py; the normalisation is
in the metadata, not in the graph, so `--norm` still works at inference); output `logits`
(N, C, h, w) at the architecture's output stride, not upsampled, as every network of the seam.
Batch, height and width are dynamic: the MSC branch sizes are computed in the graph from the
input size (Caffe's Interp arithmetic), so one file serves every image size; so is TensorFlow's
SAME padding (asymmetric on even sizes) of the TF Lite DeepLab v3, which pads explicitly by
symbolic amounts under export (deeplabv3_mnv2_tf.TFConv2d). The check uses sizes of both
parities, so a graph right for one parity only is caught. `fixed_size` exports for one size
only (e.g. 513 x 513, what the VOC protocol feeds and the TF Lite releases take).

The graph comes from torch.export through `torch.onnx.export(dynamo=True)` (the exporter PyTorch
maintains; the TorchScript exporter is deprecated), written as one self-contained file (weights
inside, no external data: every network here is far below protobuf's 2 GB) with the facts a
predictor needs as JSON in the model's metadata (`metadata_props["seglab"]`): architecture,
classes, normalisation, resize convention, MSC scales, output stride, precision, and the source
checkpoint's identity, training split and provenance.

The check (`compare_with_torch`): the same normalised inputs through PyTorch (fp32) and through
onnxruntime; the largest absolute difference of the logits over the largest absolute logit
("max relative difference") and the share of pixels whose full-resolution label (argmax after
the upsampling of `full_resolution_logits`) is the same. A label may differ only at a near-tie:
where PyTorch's two best logits are closer than 2 x TOLERANCE x its largest |logit| (what the
allowed rounding can move), rounding alone can swap them (random weights give such ties); any
other differing label ("flips beyond ties") fails the export.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch

from seglab.checkpoint import sha256
from seglab.data.demo import DEMO_CLASSES, draw_sample
from seglab.data.transforms import EvalTransform
from seglab.deploy.onnx_file import (FORMAT, INPUT, OUTPUT, VERSION, ExportError, open_session,
                                     write_onnx)
from seglab.inference.predictor import Predictor
from seglab.models import unwrap
from seglab.models.resize import full_resolution_logits

OPSET = 18
TOLERANCE = 1e-4   # max relative difference of fp32 logits, ONNX vs PyTorch


def torch_predictor(source, msc: bool = False, msc_scales=None, interp=None,
                    norm=None, msc_fusion=None) -> Predictor:
    """The fp32 CPU Predictor whose `model` is what gets exported: BN folded, plain ASPP, NCHW.
    `msc=False` gives the bare network; with `msc=True` the MSC scales come from `msc_scales`,
    else from the checkpoint's recipe (seglab/recipe.py)."""
    scales = () if not msc else (None if msc_scales is None else tuple(msc_scales))
    predictor = Predictor(source, device="cpu", precision="fp32", fold_bn=True,
                          channels_last=False, shifted_aspp=False, msc_scales=scales,
                          interp=interp, norm=norm, msc_fusion=msc_fusion)
    if msc and not predictor.msc_scales:
        raise ExportError("--msc asked for, but the checkpoint's recipe is single scale "
                          "(msc_scales []); give the scales with model.msc_scales=[0.75,0.5]")
    return predictor


def metadata(predictor: Predictor, precision: str = "fp32", **extra) -> dict:
    """What a predictor needs to run the file (and the logit cache to identify it)."""
    arch = unwrap(predictor.model).arch
    ckpt = predictor.checkpoint or {}
    source = dict(identity=predictor.identity, trained_on=ckpt.get("trained_on"),
                  provenance=ckpt.get("provenance") or {}, input_norm=ckpt.get("input_norm"),
                  recipe_source=(ckpt.get("recipe") or {}).get("source"))
    return dict(format=FORMAT, version=VERSION, arch=arch, num_classes=predictor.num_classes,
                norm=predictor.norm, interp=predictor.interp,
                msc_scales=list(predictor.msc_scales), msc_fusion=predictor.msc_fusion,
                mode=predictor.mode, pad_to=predictor.pad_to, dataset=ckpt.get("dataset"),
                classes=predictor.classes, palette=predictor.palette,
                output_stride=predictor.output_stride,
                precision=precision, input=INPUT, output=OUTPUT, source=source, **extra)


def example_input(output_stride: int, fixed_size=None) -> torch.Tensor:
    """A traced input: batch 2 and sizes that are neither 0/1 nor equal (so torch.export keeps
    batch, height and width symbolic), small enough to trace fast; `fixed_size` (H, W) if set."""
    size = fixed_size or (6 * output_stride + 1, 8 * output_stride + 1)
    return torch.randn(2, 3, *size)


def to_onnx(model: torch.nn.Module, example: torch.Tensor, fixed_size=None,
            opset: int = OPSET) -> onnx.ModelProto:
    """torch.export -> ONNX with a dynamic batch and, unless `fixed_size`, dynamic height and
    width."""
    dims = {0: torch.export.Dim("batch", min=1, max=256)}
    if not fixed_size:
        dims.update({2: torch.export.Dim("height", min=16, max=8192),
                     3: torch.export.Dim("width", min=16, max=8192)})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=(dims,), optimize=True, verbose=False)
        except Exception as e:  # torch.export or the ONNX translation refused the graph
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            hint = ("" if fixed_size else " A network whose padding depends on the input size "
                    "(e.g. TensorFlow SAME padding) may only export for one size: try "
                    "--fixed-size 513 513.")
            raise ExportError(f"torch.onnx.export failed: {first}.{hint}") from e
    return program.model_proto


def check_inputs(norm: str, output_stride: int, images=None, sizes=((320, 385), (513, 448)),
                 fixed_size=None, seed: int = 0) -> list[torch.Tensor]:
    """Normalised (1, 3, H, W) inputs for the round-trip check: `images` (RGB uint8 arrays) if
    given, else synthetic VOC-like scenes (seglab/data/demo.py) of `sizes` (even and odd, tall
    and wide: the dynamic height and width and any size-dependent padding are exercised). Each
    goes in at its own size, or with `fixed_size` padded bottom/right to it (the VOC protocol)."""
    if images is None:
        if fixed_size:
            sizes = [(fixed_size[0] * 3 // 4, fixed_size[1]), (fixed_size[0], fixed_size[1] // 2)]
        images = [draw_sample(np.random.default_rng([seed, k]), size, DEMO_CLASSES)[0]
                  for k, size in enumerate(sizes)]
    inputs = []
    for image in images:
        x, _ = EvalTransform(mode="full", norm=norm, stride=output_stride).prepare(image)
        if fixed_size:
            if x.shape[-2] > fixed_size[0] or x.shape[-1] > fixed_size[1]:
                raise ExportError(f"a check image of {tuple(x.shape[-2:])} does not fit the "
                                  f"fixed input size {tuple(fixed_size)}")
            x = torch.nn.functional.pad(x, (0, fixed_size[1] - x.shape[-1],
                                            0, fixed_size[0] - x.shape[-2]))
        inputs.append(x[None])
    return inputs


def compare_with_torch(onnx_path, model: torch.nn.Module, inputs, interp: str = "caffe",
                       session=None) -> dict:
    """Run `inputs` through PyTorch and the ONNX file: {"max_rel_diff", "label_agreement",
    "flips_beyond_ties", "sizes"} (see the module docstring). `session`: an open onnxruntime
    session of the file."""
    session = session or open_session(onnx_path)
    worst, same, total, flips, sizes = 0.0, 0, 0, 0, []
    for x in inputs:
        with torch.inference_mode():
            ref = model(x).float()
        out = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])
        if out.shape != ref.shape:
            raise ExportError(f"ONNX output {tuple(out.shape)} != PyTorch {tuple(ref.shape)} "
                              f"for input {tuple(x.shape)}")
        worst = max(worst, float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
        size = tuple(x.shape[-2:])
        for a, b in zip(out, ref):
            fa = full_resolution_logits(a, size, size, interp)
            fb = full_resolution_logits(b, size, size, interp)
            differ = fa.argmax(0) != fb.argmax(0)
            top2 = fb.topk(min(2, fb.shape[0]), dim=0).values
            margin = top2[0] - top2[-1]
            flips += int((differ & (margin > 2 * TOLERANCE * fb.abs().max())).sum())
            same, total = same + int((~differ).sum()), total + differ.numel()
        sizes.append(list(size))
    return dict(max_rel_diff=worst, label_agreement=same / max(total, 1),
                flips_beyond_ties=flips, sizes=sizes)


def export_onnx(source, out, msc: bool = False, msc_scales=None, interp=None, norm=None,
                fixed_size=None, check: bool = True, check_images=None, msc_fusion=None,
                opset: int = OPSET) -> dict:
    """Export a checkpoint (path or dict) or model to `out` (dynamic height and width, or
    `fixed_size` (H, W)); with `check`, compare the file with PyTorch on two input sizes (or
    `check_images`) and raise ExportError beyond TOLERANCE or below 100% label agreement.
    Returns the metadata plus the check's numbers."""
    predictor = torch_predictor(source, msc, msc_scales, interp, norm, msc_fusion)
    model = predictor.model.eval()
    fixed_size = tuple(int(s) for s in fixed_size) if fixed_size else None
    proto = to_onnx(model, example_input(predictor.output_stride, fixed_size), fixed_size, opset)
    meta = metadata(predictor, fixed_size=list(fixed_size) if fixed_size else None)
    write_onnx(proto, out, meta)
    facts = dict(meta, file=str(out), sha256=sha256(out))
    if check:
        result = compare_with_torch(out, model, check_inputs(
            predictor.norm, predictor.output_stride, check_images, fixed_size=fixed_size),
            predictor.interp)
        facts["check"] = result
        if result["max_rel_diff"] > TOLERANCE or result["flips_beyond_ties"]:
            raise ExportError(f"{out} does not reproduce PyTorch: max relative difference "
                              f"{result['max_rel_diff']:.2e} (allowed {TOLERANCE:.0e}), labels "
                              f"{100 * result['label_agreement']:.3f}% equal, "
                              f"{result['flips_beyond_ties']} differing away from a near-tie. "
                              "The file is kept for inspection; please report the architecture.")
    return facts
