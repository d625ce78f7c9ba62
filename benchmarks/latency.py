"""Eager, TorchScript and onnxruntime latency of a model vs its compact version
(half of every prunable group removed), beside the fvcore FLOP ratio. Goal: latency
ratio within 1.2x of the FLOP ratio. Measured interleaved in one run; the compact
model compiled with `--absorb bias` (no border terms) is timed beside it.

`--breakdown` times every conv of the folded original and compact models by kind
(1x1, kxk, depthwise, the rest) in eager mode: where the speed-up falls short of
the FLOP ratio, and why (ops whose cost falls with the width, not its square).

Run: .venv/bin/python benchmarks/latency.py [--model resnet50|mobilenet_v2|yolov8n]
     [--batch 8] [--repeats 10] [--threads 1] [--breakdown]
"""

from __future__ import annotations

import argparse
import collections
import copy
import statistics
import time
import warnings

import torch
from torch import nn
from vs_torch_pruning import build, input_shape  # benchmarks/: the same models

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
    parser.add_argument("--breakdown", action="store_true", help="eager time per conv kind")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model)
    randomize_batchnorm(model)
    x = torch.randn((args.batch, *input_shape(args.model, 224)[1:]))
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
    # `fxprune compile --channels-last`: 4-D weights stored channels-last (both sides)
    last = {f"{k}+CL": copy.deepcopy(m).to(memory_format=torch.channels_last)
            for k, m in (("original+fold", original_fused), ("compact+fold", fused))}  # fmt: skip
    eager = {"original": original, "original+fold": original_fused, "compact": compact,
             "compact+fold": fused, "--absorb bias": no_border,
             "--round-to 8 +fold": rounded_fused, **last}  # fmt: skip
    flops8 = count_model(original, x[:1]).flops / count_model(rounded, x[:1]).flops
    print(f"{args.model} batch {args.batch}, threads {torch.get_num_threads()}, "
          f"fvcore FLOP ratio {flops:.2f}x ({flops8:.2f}x with --round-to 8)")  # fmt: skip
    if args.breakdown:
        breakdown(original_fused, fused, x, args.repeats)
    variants = {"eager": eager}
    # frozen TorchScript; oneDNN-prepacked convolutions (what optimize_for_inference does
    # on CPU); onnxruntime. A runtime that cannot take the model says why and is left out.
    makers = {"torchscript": lambda m: torch.jit.freeze(torch.jit.script(m)),
              "ts+optimize": lambda m: torch.jit.optimize_for_inference(torch.jit.script(m)),
              "onnxruntime": lambda m: onnx_session(m, x)}  # fmt: skip
    for kind, make in makers.items():
        if kind == "onnxruntime" and not args.onnx:
            continue
        try:
            # onnxruntime lays tensors out itself: channels-last weights change nothing there
            chosen = {k: m for k, m in eager.items() if kind != "onnxruntime" or k not in last}
            variants[kind] = {k: make(m) for k, m in chosen.items()}
        except Exception as exc:  # a result of the benchmark, printed
            print(f"{kind:12} cannot run this model: {type(exc).__name__}: {str(exc)[:80]}")
    for kind, models in variants.items():
        ms = interleaved(models, x, args.repeats)
        pairs = [("original", "compact"), ("original+fold", "compact+fold")]
        pairs += [("original+fold+CL", "compact+fold+CL")] if "compact+fold+CL" in ms else []
        for base, small in pairs:
            ratio = ms[base] / ms[small]
            print(
                f"{kind:12} {base:14} {ms[base]:8.1f} ms  {small:13} {ms[small]:8.1f} ms  "
                f"speed-up {ratio:.2f}x  (FLOP ratio / speed-up = {flops / ratio:.2f})"
            )
        if "compact+fold+CL" in ms:  # against the faster of the two originals
            best = min(ms["original+fold"], ms["original+fold+CL"]) / ms["compact+fold+CL"]
            print(f"{kind:12} compact+fold+CL against the faster folded original: speed-up "
                  f"{best:.2f}x  (FLOP ratio / speed-up = {flops / best:.2f})")  # fmt: skip
        print(f"{kind:12} --absorb bias {ms['--absorb bias']:.1f} ms")
        ratio8 = ms["original+fold"] / ms["--round-to 8 +fold"]
        print(
            f"{kind:12} --round-to 8 +fold {ms['--round-to 8 +fold']:.1f} ms  "
            f"speed-up {ratio8:.2f}x  (FLOP ratio / speed-up = {flops8 / ratio8:.2f})"
        )


def _kind(module: nn.Module) -> str | None:
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "conv {}x{}".format(*module.kernel_size)


def _per_kind(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """kind -> [ms, MFLOPs, layers] per forward pass (eager; "rest": everything else)."""
    stats: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    started: dict[int, float] = {}

    def pre(module, _inputs):
        started[id(module)] = time.perf_counter()

    def post(module, _inputs, out):
        entry = stats[_kind(module)]
        entry[0] += 1e3 * (time.perf_counter() - started[id(module)])
        weight = module.weight
        entry[1] += weight[0].numel() * out.numel() / 1e6  # multiply-adds
        entry[2] += 1

    convs = [m for m in model.modules() if _kind(m)]
    hooks = [m.register_forward_pre_hook(pre) for m in convs]
    hooks += [m.register_forward_hook(post) for m in convs]
    with torch.no_grad():
        for _ in range(2):
            model(x)
        stats.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        total = 1e3 * (time.perf_counter() - start)
    for hook in hooks:
        hook.remove()
    stats["rest"] = [total - sum(v[0] for v in stats.values()), 0.0, 0]
    return {k: [v[0] / repeats, v[1] / repeats, v[2] / repeats] for k, v in stats.items()}


def breakdown(original: nn.Module, compact: nn.Module, x: torch.Tensor, repeats: int) -> None:
    """Print eager time per conv kind, original vs compact (both folded)."""
    before, after = _per_kind(original, x, repeats), _per_kind(compact, x, repeats)
    total0, total1 = sum(v[0] for v in before.values()), sum(v[0] for v in after.values())
    print(f"breakdown (eager, folded, timed per layer): {total0:.1f} ms -> {total1:.1f} ms")
    for kind, (ms0, mflop0, layers) in before.items():
        ms1, mflop1, _ = after.get(kind, [0.0, 0.0, 0])
        flop = f"FLOP ratio {mflop0 / mflop1:5.2f}" if mflop1 else " " * 16
        rate = f"GMAC/s {mflop0 / ms0:5.1f} -> {mflop1 / ms1:5.1f}" if mflop1 else ""
        print(f"  {kind:10} {layers:3.0f} layers {ms0:7.2f} -> {ms1:6.2f} ms "
              f"({100 * ms1 / total1:4.1f}% of compact)  speed-up {ms0 / ms1:5.2f}  {flop}  "
              f"{rate}")  # fmt: skip
    # each conv kind at the original's own rate (GMAC/s), the rest as measured: what the
    # op mix allows; the gap to the measurement is narrow layers running slower
    ideal = after["rest"][0] + sum(
        before[k][0] * after[k][1] / before[k][1] for k in before if k != "rest" and k in after
    )
    print(f"  convs at the original's GMAC/s: {ideal:.2f} ms, speed-up {total0 / ideal:.2f}; "
          f"measured {total0 / total1:.2f}")  # fmt: skip


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
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as torch's
    # no busy-waiting between runs: its spinning threads would take the cores from the
    # next model timed in this process (2-thread runs were slower than 1-thread ones)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        buffer.getvalue(), options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda inp: session.run(None, {name: inp.numpy()})


if __name__ == "__main__":
    main()
