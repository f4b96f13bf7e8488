"""Google's TF Lite DeepLab v3 MobileNetV2, converted (convert.py tflite), on this CPU through our
Predictor, side by side with the TF Lite interpreter running the release file itself.

    python bench/bench_tflite.py [--models quant dm05 float257] [--images 20] [--reps 3]
                                 [--threads 2] [--profile]

Needs ../shared/real/ (the three .tflite files and the VOC images; see its README for the
public URLs) and `pip install ai-edge-litert`.

Rows, per model:
  tflite     the interpreter (ai-edge-litert, XNNPACK delegate, --threads threads) on the
             release file: uint8 weights and activations for `quant` / `dm05`, float32 for
             `float257`
  fp32       our Predictor (seglab/inference/predictor.py), fp32, NCHW
  fp32_cl    our Predictor, fp32, channels_last (the Predictor's default)
  bf16       our Predictor, bf16 autocast (weights cast once), NCHW
  bf16_cl    our Predictor, bf16 autocast, channels_last
One call = a prepared input (the image padded to the model's input size: uint8 for the
interpreter, normalised to [-1, 1] for ours) -> labels at the input size. The uint8 graphs end in
RESIZE_BILINEAR + ARG_MAX at 513, so ours includes the same: logits, the bilinear upsampling
(align_corners=True, as the graph and full_resolution_logits) and the argmax, the last two done
channels-last (common.labels_at: the pipeline's labels, checked once per image, in a quarter of
the time of full_resolution_logits(...).argmax(0)); the float graph outputs 257x257
logits, so the interpreter row includes numpy's argmax. Inputs: the first --images VOC val
images, padded bottom/right to 513 (`float257`: longer side resized to 257 first, as in
issue 14). Torch runs --threads intra-op threads, like the interpreter.

Timing: all rows of a model in one process, interleaved (common.interleaved): after one warm-up call
each, --reps rounds over the images, one call per row per image, so load from other processes hits
every row alike. The table shows the best and median time per image, and "x tflite": the median over
(round, image) of this row's time / the interpreter's on the same image in the same round; "cpu s"
the median process CPU time per call (all threads, spin-waits included), which other load on the
machine disturbs less than the wall time.
Agreement: the share of image pixels (the padding cropped off, as evaluation does) whose label
equals our fp32 row's, and the interpreter's.
Target (issue 14): our fastest row within 2x of the interpreter's uint8 time, with >= 99% label
agreement with our fp32. --profile adds a torch.profiler table of our fastest row on one image
(top operators by self CPU time, and the share per kind: 1x1 conv, depthwise, 3x3, resize,
argmax, elementwise), which says where the time goes.

Results: a printed table and bench/results/tflite.json (common.write_report: the settings, the
machine with the load average at the start and end, a row per model and row with every time;
each model's input size and profile in the summary).
"""
from __future__ import annotations

from common import (REAL, finish, interleaved, labels_at, machine, paired, voc_ids,  # noqa: E402
                    write_report)  # (common also puts Implementation/ on sys.path)
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from seglab.checkpoint import make_checkpoint
from seglab.data.images import load_image
from seglab.inference.predictor import Predictor
from seglab.models import build_model
from seglab.models.resize import full_resolution_logits
from seglab.weights.tflite import URLS, graph_to_state_dict, infer_arch, read_tflite

RESULTS = Path(__file__).resolve().parent / "results" / "tflite.json"
MODELS = {"quant": "deeplabv3_mnv2_pascal_quant.tflite",
          "dm05": "deeplabv3_mnv2_dm05_pascal_quant.tflite",
          "float257": "deeplabv3_257_mv_gpu.tflite"}
ROWS = {  # name: (description, Predictor settings)
    "fp32": ("ours, fp32, NCHW", dict(precision="fp32", channels_last=False)),
    "fp32_cl": ("ours, fp32, channels_last", dict(precision="fp32", channels_last=True)),
    "bf16": ("ours, bf16 autocast, NCHW", dict(precision="bf16", channels_last=False)),
    "bf16_cl": ("ours, bf16 autocast, channels_last", dict(precision="bf16", channels_last=True)),
}


def interpreter(path: Path, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        sys.exit("bench_tflite.py needs the TF Lite interpreter: pip install ai-edge-litert")
    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def images(count: int, size: int) -> list[np.ndarray]:
    """The first `count` VOC val images; longer side resized to `size` when smaller than 513."""
    voc, ids = voc_ids(REAL / "voc_dev", "val", count)
    out = []
    for image_id in ids:
        image = load_image(voc / "JPEGImages" / f"{image_id}.jpg")
        if max(image.shape[:2]) > size:
            h, w = image.shape[:2]
            s = size / max(h, w)
            image = np.asarray(Image.fromarray(image).resize((round(w * s), round(h * s)),
                                                             Image.BILINEAR))
        out.append(image)
    return out


def tflite_row(it, image: np.ndarray):
    """(prepared input, call -> labels) of the interpreter; padding normalises to 0."""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    size = int(inp["shape"][1])
    canvas = np.full((size, size, 3), 128 if inp["dtype"] == np.uint8 else 127.5, np.float32)
    canvas[:image.shape[0], :image.shape[1]] = image
    x = (canvas if inp["dtype"] == np.uint8 else (canvas - 127.5) / 127.5)[None]
    x = x.astype(inp["dtype"])

    def call():
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])[0]
        return y if y.ndim == 2 else y.argmax(-1)
    return call


def ours_row(predictor: Predictor, image: np.ndarray, size: int):
    """(call -> labels at the input size) of one Predictor on the prepared input; checks once
    that `labels_at` gives the pipeline's labels (full_resolution_logits + argmax(0))."""
    x, _ = predictor.transform("voc", size).prepare(image)
    logits = predictor.logits(x)
    pipeline = full_resolution_logits(logits, (size, size), (size, size)).argmax(0).numpy()
    fast = labels_at(logits, size).numpy()
    if not np.array_equal(fast, pipeline):
        print(f"note: labels_at differs from full_resolution_logits().argmax(0) on "
              f"{np.mean(fast != pipeline):.2e} of the pixels (a tie)")

    def call():
        return labels_at(predictor.logits(x), size).numpy()
    return call


def build_rows(name: str, threads: int, images_: list) -> tuple[dict, dict, int]:
    """{row: [call per image]}, {row: description}, the input size."""
    path = REAL / "models" / MODELS[name]
    graph = read_tflite(path)
    arch = infer_arch(graph)
    state_dict, _ = graph_to_state_dict(graph, build_model(arch), path)
    ckpt = make_checkpoint(arch, state_dict, input_norm="tf", provenance=dict(source=str(path)))
    it = interpreter(path, threads)
    size = int(it.get_input_details()[0]["shape"][1])
    calls = {"tflite": [tflite_row(it, im) for im in images_]}
    descriptions = {"tflite": f"TF Lite interpreter, XNNPACK, {threads} threads"}
    for row, (description, settings) in ROWS.items():
        predictor = Predictor(ckpt, device="cpu", msc_scales=(), **settings)
        if predictor.precision != settings["precision"]:
            continue  # bf16 not supported here (Predictor warned)
        calls[row] = [ours_row(predictor, im, size) for im in images_]
        descriptions[row] = description
    return calls, descriptions, size


def time_model(name: str, args) -> dict:
    images_ = images(args.images, 257 if name == "float257" else 513)
    calls, descriptions, size = build_rows(name, args.threads, images_)
    n = len(images_)
    labels = {row: [] for row in calls}

    def keep(row, k, out):                      # the first round over the images
        if k < n:
            labels[row].append(out[:images_[k].shape[0], :images_[k].shape[1]])
    # a round of common.interleaved = one image: round k runs image k % n
    times, cpu = interleaved({row: (lambda k, fns=fns: fns[k % n]()) for row, fns in calls.items()},
                             args.reps * n, keep=keep, progress=f"{name}: images x rounds")
    rows = []
    for row in calls:
        agree = {ref: float(np.mean(np.concatenate(
            [(a == b).ravel() for a, b in zip(labels[row], labels[ref])])))
            for ref in ("fp32", "tflite") if ref in labels}
        rows.append(dict(model=name, name=row, description=descriptions[row], times=times[row],
                         cpu_times=cpu[row], cpu_median_s=float(np.median(cpu[row])),
                         best_s=min(times[row]), median_s=float(np.median(times[row])),
                         x_tflite=paired(times[row], times["tflite"]),
                         agreement_fp32=agree.get("fp32"), agreement_tflite=agree["tflite"]))
    result = dict(model=name, file=MODELS[name], input_size=size, rows=rows)
    if args.profile:
        fastest = min((r for r in rows if r["name"] != "tflite"), key=lambda r: r["median_s"])
        result["profile"] = profile(calls[fastest["name"]][0], fastest["name"], name)
    return result


KINDS = (("conv 1x1", lambda n, s: "conv" in n and ", 1, 1]" in s),
         ("conv", lambda n, s: "conv" in n),
         ("resize", lambda n, s: "upsample" in n or "interp" in n),
         ("argmax", lambda n, s: "argmax" in n),
         ("elementwise", lambda n, s: any(k in n for k in ("clamp", "relu", "hardtanh", "add",
                                                            "copy", "pad", "cat", "mean"))))


def profile(call, row: str, model: str) -> dict:
    """Where the time of one call goes: torch.profiler's top operators, and the share by kind
    (1x1 convs, other convs incl. depthwise and the 3x3 stem, resize, argmax, elementwise)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call()
    events = prof.key_averages(group_by_input_shape=True)
    print(f"\nprofile of {model} / {row} (one image):")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=32,
                       max_shapes_column_width=60))
    total = sum(e.self_cpu_time_total for e in events) or 1
    shares = {}
    for e in events:
        name, shapes = e.key.lower(), str(e.input_shapes)
        kind = next((k for k, test in KINDS if test(name, shapes)), "other")
        shares[kind] = shares.get(kind, 0.0) + e.self_cpu_time_total / total
    print("share of self CPU time: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in
                                                 sorted(shares.items(), key=lambda kv: -kv[1])))
    return dict(row=row, shares=shares, total_ms=total / 1000)


def table(results: list) -> str:
    head = (f"{'model':<10}{'row':<9}{'description':<40}{'best s':>8}{'median s':>9}"
            f"{'x tflite':>9}{'cpu s':>7}{'agree fp32':>11}{'agree tflite':>13}")
    lines = [head, "-" * len(head)]
    for result in results:
        for r in result["rows"]:
            fp32 = f"{100 * r['agreement_fp32']:10.2f}%" if r["agreement_fp32"] is not None \
                else f"{'-':>11}"
            lines.append(f"{r['model']:<10}{r['name']:<9}{r['description']:<40}"
                         f"{r['best_s']:8.3f}{r['median_s']:9.3f}{r['x_tflite']:8.2f}x"
                         f"{r['cpu_median_s']:7.3f}{fp32}"
                         f"{100 * r['agreement_tflite']:12.2f}%")
    return "\n".join(lines)


def verdict(results: list) -> str:
    """The issue's target on the uint8 models: fastest of ours <= 2x tflite, >= 99% agreement."""
    lines = []
    for result in results:
        if result["model"] == "float257":
            continue
        ours = [r for r in result["rows"] if r["name"] != "tflite"]
        best = min(ours, key=lambda r: r["median_s"])
        met = best["x_tflite"] <= 2.0 and best["agreement_fp32"] >= 0.99
        lines.append(f"{result['model']}: fastest ours = {best['name']} at {best['x_tflite']:.2f}x "
                     f"the interpreter, {100 * best['agreement_fp32']:.2f}% agreement with fp32: "
                     f"target (<= 2x, >= 99%) {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--images", type=int, default=20, help="VOC val images (first N)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds over the images")
    p.add_argument("--threads", type=int, default=2, help="threads, ours and the interpreter's")
    p.add_argument("--profile", action="store_true", help="profile our fastest row")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args(argv)
    missing = [f for f in MODELS.values() if not (REAL / "models" / f).is_file()]
    if missing or not (REAL / "voc_dev").is_dir():
        print(f"needs {REAL} with the TF Lite models ({', '.join(URLS)}) and VOC images; "
              f"missing: {missing or ['voc_dev']}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    results = [time_model(name, args) for name in args.models]
    finish(info)
    print(f"\n{info['cpu']}, {info['cores']} cores, {args.threads} threads, torch "
          f"{info['torch']}; {args.images} images x {args.reps} rounds after 1 warm-up; load "
          f"average {info['load_average_at_start'][0]:.2f} at the start, "
          f"{info['load_average_at_end'][0]:.2f} at the end")
    print(table(results))
    print(verdict(results))
    rows = [r for result in results for r in result["rows"]]
    summary = {r["model"]: {k: v for k, v in r.items() if k not in ("model", "rows")}
               for r in results}
    write_report(dict(models=args.models, images=args.images, reps=args.reps,
                      threads=args.threads, profile=args.profile), info, rows, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
