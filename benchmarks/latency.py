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
from fxprune.compile.fusions import fuse_for_deployment
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
    parser.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = zoo.create_model(args.model).eval()
    randomize_batchnorm(model)
    shape = zoo.model_info(args.model).input_shape
    x = torch.randn((args.batch, *shape[1:]))
    analysed = open_module(loaded_module(model, x[:1], f"zoo:{args.model}"))
    traced = analysed.traced
    zero_random(traced.gm, 0.5)
    # random weights: a random-init network barely depends on its input, which is not
    # what this benchmark measures
    compact = compile_analysed(analysed, allow_constant=True).result.gm.eval()
    bias_fold = CompileOptions(absorb="bias")
    no_border = compile_analysed(
        analysed, options=bias_fold, verify=0, allow_constant=True
    ).result.gm.eval()
    fused, _ = fuse_for_deployment(compact)
    # widths kept a multiple of 8 (the cheapest constant channels kept): vector-friendly
    round8 = CompileOptions(round_to=8)
    rounded = compile_analysed(
        analysed, options=round8, verify=0, allow_constant=True
    ).result.gm.eval()
    rounded_fused, _ = fuse_for_deployment(rounded)
    original = traced.gm.eval()
    # the original with its BNs folded too: the fair baseline for a deployed artifact
    original_fused, _ = fuse_for_deployment(original)
    flops = count_model(original, x[:1]).flops / count_model(compact, x[:1]).flops
    eager = {"original": original, "original+fold": original_fused, "compact": compact,
             "compact+fold": fused, "--absorb bias": no_border,
             "--round-to 8 +fold": rounded_fused}  # fmt: skip
    flops8 = count_model(original, x[:1]).flops / count_model(rounded, x[:1]).flops
    variants = {"eager": eager}
    variants["torchscript"] = {k: torch.jit.freeze(torch.jit.script(m)) for k, m in eager.items()}
    # oneDNN-prepacked convolutions (what optimize_for_inference does on CPU)
    variants["ts+optimize"] = {
        k: torch.jit.optimize_for_inference(torch.jit.script(m)) for k, m in eager.items()
    }
    if args.onnx:
        variants["onnxruntime"] = {k: onnx_session(m, x) for k, m in eager.items()}
    print(f"{args.model} batch {args.batch}, threads {torch.get_num_threads()}, "
          f"fvcore FLOP ratio {flops:.2f}x ({flops8:.2f}x with --round-to 8)")  # fmt: skip
    for kind, models in variants.items():
        ms = interleaved(models, x, args.repeats)
        for base, small in (("original", "compact"), ("original+fold", "compact+fold")):
            ratio = ms[base] / ms[small]
            print(
                f"{kind:12} {base:14} {ms[base]:8.1f} ms  {small:13} {ms[small]:8.1f} ms  "
                f"speed-up {ratio:.2f}x  (FLOP ratio / speed-up = {flops / ratio:.2f})"
            )
        print(f"{kind:12} --absorb bias {ms['--absorb bias']:.1f} ms")
        ratio8 = ms["original+fold"] / ms["--round-to 8 +fold"]
        print(
            f"{kind:12} --round-to 8 +fold {ms['--round-to 8 +fold']:.1f} ms  "
            f"speed-up {ratio8:.2f}x  (FLOP ratio / speed-up = {flops8 / ratio8:.2f})"
        )


def interleaved(models: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds per model, timed A B C A B C ... after two warm-ups."""
    for _ in range(2):
        for m in models.values():
            timed(m, x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            times[k].append(timed(m, x))
    return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def onnx_session(module, x: torch.Tensor):
    """An onnxruntime session of `module` (legacy exporter: static shapes) as a callable."""
    import io

    import onnxruntime

    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=18)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda inp: session.run(None, {name: inp.numpy()})


if __name__ == "__main__":
    main()
