"""OnnxPredictor: an exported (fp32) or quantised (int8) ONNX file behind the interface of
seglab.inference.predictor.Predictor, so evaluation, inference and the benchmarks run it
unchanged.

    predictor = OnnxPredictor("model_int8.onnx")
    labels, logits = predictor.predict(image_rgb_uint8)      # (H, W) uint8, (C, H, W) float32

The facts PyTorch's Predictor reads from a checkpoint (classes, input normalisation, resize
convention, MSC scales, output stride, training split) come from the file's metadata
(onnx_export.py). The MSC scales and the precision are part of the graph: asking for other ones
is an error that says how to get them (export again; quantise with export.py int8), never a
silent fallback. The normalisation stays outside the graph, so `norm=` overrides it as for
Predictor. `transform` and `predict` are Predictor's own methods (the same padding and the same
`full_resolution_logits`), so the two predictors differ only in what runs the network.

onnxruntime runs the file on the CPU (CPUExecutionProvider, all graph optimisations, which fuse
the QDQ pairs of an int8 file into integer convolutions); `device="cuda"` uses the
CUDAExecutionProvider where the onnxruntime-gpu build provides it.
"""
from __future__ import annotations

import torch

from seglab.checkpoint import label_set, sha256
from seglab.deploy.onnx_file import INPUT, OUTPUT, open_session, read_metadata
from seglab.inference.predictor import Predictor
from seglab.recipe import resolve_recipe


class OnnxPredictor:
    """An ONNX file of ours (export.py onnx / int8) ready for inference.

    Attributes as Predictor: device, precision (the file's: "fp32" or "int8"), norm, interp,
    msc_scales, num_classes, output_stride, checkpoint (the source checkpoint's facts from the
    metadata: trained_on, provenance), identity (sha256 of the .onnx file), session, metadata,
    fixed_size ((H, W) for a file exported with --fixed-size, which takes only that size).
    `precision="fp32"` (the default everywhere) means "as the file was written"; "bf16" is a
    PyTorch path and an error here. `msc_scales` / `interp` / `msc_fusion` are in the graph:
    they must match the file when given.
    `flip=True` also runs the mirrored image and max-fuses, as Predictor's `eval.flip`.
    """

    transform = Predictor.transform
    predict = Predictor.predict
    refine = Predictor.refine
    describe = Predictor.describe

    def __init__(self, path, device="auto", precision: str = "fp32", msc_scales=None,
                 interp=None, norm=None, flip: bool = False, msc_fusion=None,
                 threads: int = 0, mode=None, pad_to=None):
        meta = read_metadata(path)
        self.path, self.metadata = str(path), meta
        self.precision = meta["precision"]
        if precision not in ("fp32", self.precision):
            raise ValueError(f"{path} holds a {self.precision} network; precision "
                             f"{precision!r} is not something an ONNX file can switch to. Use "
                             "the .pth checkpoint for bf16, or `export.py int8` for int8.")
        meta.setdefault("msc_fusion", "max")
        asked = dict(msc_scales=None if msc_scales is None else [float(s) for s in msc_scales],
                     interp=interp, msc_fusion=msc_fusion if meta["msc_scales"] else None)
        for name, value in asked.items():
            if value is not None and value != meta[name]:
                raise ValueError(f"{path} was exported with {name}={meta[name]!r}, not "
                                 f"{value!r}: export the checkpoint again with the {name} "
                                 "you want (export.py onnx --msc / --msc-scales)")
        source = meta.get("source") or {}
        # the file's recipe: what is in the graph, then the settings the metadata states
        stated = {k: meta[k] for k in ("msc_scales", "interp", "msc_fusion", "mode", "pad_to")
                  if meta.get(k) is not None}
        self.checkpoint = dict(arch=meta["arch"], trained_on=source.get("trained_on"),
                               provenance=source.get("provenance") or {},
                               input_norm=meta["norm"], recipe=stated,
                               dataset=meta.get("dataset"), classes=meta.get("classes"),
                               palette=meta.get("palette"))
        explicit = {k: v for k, v in dict(norm=norm, mode=mode, pad_to=pad_to).items()
                    if v is not None}
        self.recipe, self.recipe_sources = resolve_recipe(explicit, self.checkpoint, meta["arch"])
        self.msc_scales, self.interp = tuple(meta["msc_scales"]), meta["interp"]
        self.msc_fusion, self.norm = meta["msc_fusion"], self.recipe["norm"]
        self.mode, self.pad_to = self.recipe["mode"], self.recipe["pad_to"]
        self.num_classes, self.output_stride = meta["num_classes"], meta["output_stride"]
        self.classes, self.palette = label_set(self.checkpoint, self.num_classes)
        self.fixed_size = tuple(meta["fixed_size"]) if meta.get("fixed_size") else None
        self.flip = bool(flip)
        self.identity = "sha256:" + sha256(path)
        self.session = open_session(path, str(device), threads)
        self.device = torch.device("cuda" if "CUDAExecutionProvider" in
                                   self.session.get_providers()[:1] else "cpu")
        self._transforms = {}

    def settings(self) -> dict:
        """Everything that shapes the logits, e.g. for a logit cache's identity."""
        return dict(identity=self.identity, msc_scales=list(self.msc_scales), interp=self.interp,
                    norm=self.norm, precision=self.precision, flip=self.flip,
                    msc_fusion=self.msc_fusion, runtime="onnxruntime",
                    source=self.metadata.get("source", {}).get("identity"),
                    quantization=self.metadata.get("quantization"))

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """Network logits for one normalised image [3, H', W'] (or a batch [N, 3, H', W']):
        FloatTensor (C, h, w) (or (N, C, h, w)) on the CPU."""
        batched = image.dim() == 4
        x = (image if batched else image[None]).detach().cpu().float()
        y = self._run(x)
        if self.flip:  # as Predictor's FlipMax: the mirrored image too, mirrored back, max-fused
            y = torch.max(y, self._run(x.flip(-1)).flip(-1))
        return y if batched else y[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_size and tuple(x.shape[-2:]) != self.fixed_size:
            raise ValueError(f"{self.path} was exported for {self.fixed_size[0]}x"
                             f"{self.fixed_size[1]} inputs only (--fixed-size), got "
                             f"{x.shape[-2]}x{x.shape[-1]}: use the VOC protocol with "
                             f"eval.pad_to={self.fixed_size[0]} (images up to that size)")
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x.contiguous().numpy()})[0])
