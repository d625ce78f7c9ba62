"""Eager and TorchScript latency of resnet50 vs its compact version (half of every
prunable group removed), beside the fvcore FLOP ratio. Goal: latency ratio
within 1.2x of the FLOP ratio. Measured interleaved in one run; the compact
model compiled with `--absorb bias` (no border terms) is timed beside it.

Run: .venv/bin/python benchmarks/latency.py [--batch 8] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from fxprune import zoo
from fxprune.compile import CompileOptions
from fxprune.pipeline import compile_analysed, loaded_module, open_module
from fxprune.report import count_model
from fxprune.testing import randomize_batchnorm, zero_random

warnings.filterwarnings("ignore")


def timed(module, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        module(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = zoo.create_model(args.model).eval()
    randomize_batchnorm(model)
    shape = zoo.model_info(args.model).input_shape
    x = torch.randn((args.batch, *shape[1:]))
    analysed = open_module(loaded_module(model, x[:1], f"zoo:{args.model}"))
    traced = analysed.traced
    zero_random(traced.gm, 0.5)
    compact = compile_analysed(analysed).result.gm.eval()
    bias_fold = CompileOptions(absorb="bias")
    no_border = compile_analysed(analysed, options=bias_fold, verify=0).result.gm.eval()
    flops = count_model(traced.gm, x[:1]).flops / count_model(compact, x[:1]).flops
    variants = {"eager": (traced.gm.eval(), compact, no_border)}
    variants["torchscript"] = tuple(
        torch.jit.freeze(torch.jit.script(m)) for m in variants["eager"]
    )
    print(f"{args.model} batch {args.batch}, threads {torch.get_num_threads()}, "
          f"fvcore FLOP ratio {flops:.2f}x")  # fmt: skip
    for kind, models in variants.items():
        for _ in range(2):  # warm-up
            for m in models:
                timed(m, x)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(args.repeats):  # interleaved
            for m, t in zip(models, times, strict=True):
                t.append(timed(m, x))
        ta, tb, tc = (statistics.median(t) for t in times)
        ratio = ta / tb
        print(f"{kind:12} original {ta * 1e3:8.1f} ms  compact {tb * 1e3:8.1f} ms  "
              f"speed-up {ratio:.2f}x  (FLOP ratio / speed-up = {flops / ratio:.2f});  "
              f"--absorb bias {tc * 1e3:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
