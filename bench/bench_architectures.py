"""Every registered architecture side by side (DeepLab v2 first): parameters, GMACs at 513x513,
and CPU time per 513x513 image through the Predictor, single scale, in fp32 and bf16.

    python bench/bench_architectures.py [--quick] [--reps 5] [--threads N] [--archs a,b,...]

Columns:
  params      parameters for 21 classes (aux heads included: they are in the weight files,
              though inference never runs them)
  GMACs       multiply-accumulates of one 513x513 forward pass in eval mode, counted by
              torch.utils.flop_counter.FlopCounterMode on the meta device: it counts the FLOPs
              of convolutions and matrix products (2 per multiply-accumulate), so MACs =
              FLOPs / 2. Elementwise work (BN, activations, sums, resizes, pooling) is not
              counted; "GFLOPs" quoted elsewhere (the seed's) also count it, so they are more
              than twice these numbers. VainF's table's "FLOPs" (6.0G ... 83.4G) are within
              0.5-3% of these MACs, i.e. they count multiply-accumulates.
  fp32 s      seconds per 513x513 image through seglab.inference.predictor.Predictor with
              msc_scales=() (single scale), precision fp32: each architecture's own inference
              rewrites (BN folding where it has them), channels_last, inference_mode
  bf16 s      the same with precision="bf16" (autocast, conv weights cast once); "n/a" where
              the CPU has no native bf16 (AVX512-BF16 / AMX)
  bf16 x      median over rounds of fp32 time / bf16 time within the round (paired)

Timing: per architecture, one warm-up call per precision, then `--reps` rounds of one fp32 and
one bf16 call, interleaved (common.interleaved; the order alternates), so load on a shared
machine hits both alike;
the table shows each precision's best call (the least disturbed), the JSON every call. Inputs
are random 513x513 normalised images (the weights are random too: speed does not depend on
them). Run it on an idle machine: other processes slow every row.

`--quick` is a smoke check: every architecture at 129x129, one round, to
bench/results/architectures_quick.json (GMACs are still counted at 513).
Results: a printed table and bench/results/architectures.json (common.write_report: settings,
machine with the load average at the start and end, a row per architecture with every call).
"""
from __future__ import annotations

from common import RESULTS, interleaved, machine, paired, write_report  # noqa: E402
import argparse  # (common also puts Implementation/ on sys.path)
import sys
import warnings
import torch
from torch.utils.flop_counter import FlopCounterMode

from seglab.device import bf16_supported
from seglab.inference.predictor import Predictor
from seglab.models import ARCHITECTURES, DEFAULT, build_model

SIZE, NUM_CLASSES = 513, 21


def order(names=None) -> list[str]:
    """Registered architectures, DeepLab v2 first, then in registration order."""
    names = list(ARCHITECTURES) if not names else names
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown:
        sys.exit(f"error: unknown architecture(s) {unknown}; `python Implementation/model.py` "
                 "lists them")
    return sorted(names, key=lambda n: (n != DEFAULT, list(ARCHITECTURES).index(n)))


def count(name: str, size: int = SIZE) -> dict:
    """Parameters and MACs of one eval-mode forward pass at size x size, on the meta device."""
    with torch.device("meta"):
        net = build_model({"name": name, "num_classes": NUM_CLASSES}).eval()
    x = torch.empty(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return dict(parameters=sum(p.numel() for p in net.parameters()),
                gmacs=counter.get_total_flops() / 2e9)


def time_predictors(name: str, size: int, reps: int, precisions) -> dict:
    """{precision: [seconds per call]} for Predictor.logits on one size x size image,
    interleaved over `reps` rounds (the order alternating) after one warm-up call each."""
    torch.manual_seed(0)
    net = build_model({"name": name, "num_classes": NUM_CLASSES})
    predictors = {p: Predictor(net, device="cpu", precision=p, msc_scales=())
                  for p in precisions}
    del net
    x = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))
    calls = {p: (lambda k, p=p: predictors[p].logits(x)) for p in precisions}
    return interleaved(calls, reps, alternate=True)[0]


def row(name: str, size: int, reps: int, bf16: bool) -> dict:
    out = dict(name=name, **count(name))
    precisions = ("fp32", "bf16") if bf16 else ("fp32",)
    times = time_predictors(name, size, reps, precisions)
    out["seconds"] = times
    out["fp32_s"] = min(times["fp32"])
    if bf16:
        out["bf16_s"] = min(times["bf16"])
        out["bf16_speedup"] = paired(times["fp32"], times["bf16"])
    return out


def print_table(rows: list[dict], size: int) -> None:
    width = max(len(r["name"]) for r in rows)
    print(f"{'architecture':<{width}}  {'params':>12}  {'GMACs@513':>9}  "
          f"{f'fp32 s@{size}':>11}  {f'bf16 s@{size}':>11}  {'bf16 x':>6}")
    for r in rows:
        bf16 = f"{r['bf16_s']:>11.3f}  {r['bf16_speedup']:>6.2f}" if "bf16_s" in r else \
            f"{'n/a':>11}  {'':>6}"
        print(f"{r['name']:<{width}}  {r['parameters']:>12,}  {r['gmacs']:>9.2f}  "
              f"{r['fp32_s']:>11.3f}  {bf16}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check: 129x129, one round")
    p.add_argument("--reps", type=int, default=5, help="timed rounds per architecture")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--archs", default="", help="comma-separated names (default: all)")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    size, reps = (129, 1) if args.quick else (SIZE, args.reps)
    bf16 = bf16_supported(torch.device("cpu"))
    info = machine()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in order([n for n in args.archs.split(",") if n]):
            rows.append(row(name, size, reps, bf16))
            print(f"  {name}: fp32 {rows[-1]['fp32_s']:.3f} s", file=sys.stderr, flush=True)
    print_table(rows, size)
    out = args.out or RESULTS / ("architectures_quick.json" if args.quick else
                                 "architectures.json")
    write_report(dict(size=size, reps=reps, quick=args.quick, threads=torch.get_num_threads(),
                      archs=[r["name"] for r in rows], bf16_native=bf16, gmacs_size=SIZE),
                 info, rows, {}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
