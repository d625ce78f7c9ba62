"""fxprune vs Torch-Pruning, side by side in one run, on the same models and zeros.

For each model: random BN statistics, half of every prunable channel group's γ
set to exactly 0 (fxprune's test pattern, copied into the user's module), then

- fxprune: trace → analyse → compile (the compact GraphModule), and
- Torch-Pruning 1.6: DependencyGraph.build_dependency → prune exactly the
  zero-γ channels of every BatchNorm (groups checked with check_pruning_group),

each timed on a fresh copy of the model (median of --repeats, the two sides
interleaved, Python's garbage collected before each, one thread, imports
excluded; what each side's time includes is printed with the table: neither
verifies). Where Torch-Pruning fails, the time it
ran until the failure is shown as a lower bound. Also the output error of each
pruned model against the zeroed original (Torch-Pruning drops the removed
channels' constants β, so its error is not 0 unless β is 0) and the eager
latency of both pruned models at batch 1. Ratios are fxprune / Torch-Pruning:
below 1 means fxprune is faster.

With --breakdown, a second table gives each side's milliseconds by stage (fxprune:
trace and shapes, analysis, liveness, decisions, rewrite, and "finish":
lint, dead code and generating the compact model's code; Torch-Pruning: building
its dependency graph, and pruning).

    .venv/bin/python benchmarks/vs_torch_pruning.py [--models resnet50,...] [--repeats 3]
        [--breakdown]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import time
import warnings
from collections.abc import Iterator

import torch
from tabulate import tabulate
from torch import nn

from fxprune import zoo
from fxprune.compile import compile_model
from fxprune.errors import VerificationError
from fxprune.pipeline import loaded_module, open_module
from fxprune.testing import randomize_batchnorm, zero_random
from fxprune.verify import relative_error, run_model

MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "googlenet", "resnext50_32x4d",
          "densenet201", "yolov8n")  # fmt: skip

warnings.filterwarnings("ignore")
WHAT_IS_TIMED = """\
timed on each side (model already built and zeroed, garbage collected first, imports
excluded, nothing verified):
  fxprune: trace (fx, or torch.export where fx cannot) + shapes on the meta device +
           channel analysis + compile (liveness; the constants' values from each node
           run on tiny inputs, or else one forward pass at an eighth of the input
           size; rewrite; the compact GraphModule's code generated)
  TP:      DependencyGraph.build_dependency (one forward pass of the example, traced
           through autograd) + pruning the zero-γ channels of every BatchNorm
  neither side's time includes a verification forward pass; the error columns are
  measured afterwards."""


def build(name: str) -> nn.Module:
    """A zoo (torchvision) model, or Ultralytics' YOLOv8n from its yaml (no download)."""
    if name.startswith("yolo"):
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics.nn.tasks import DetectionModel

        return DetectionModel(f"{name}.yaml", verbose=False).eval()
    return zoo.create_model(name).eval()


def input_shape(name: str, size: int) -> tuple[int, ...]:
    if name.startswith("yolo"):
        return (1, 3, size, size)
    return zoo.model_info(name).input_shape[:2] + (size, size)


def zeroed_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """A model with random BN statistics and fxprune's zero pattern."""
    model = build(name)
    randomize_batchnorm(model)
    return apply_zeros(model, torch.randn(shape))


def apply_zeros(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` with half of every prunable group's γ zeroed (fxprune's test pattern)."""
    analysed = open_module(loaded_module(model, x))
    zero_random(analysed.traced.gm, 0.5, seed=0)
    model.load_state_dict(analysed.traced.gm.state_dict(), strict=False)
    return model


def fxprune_prune(model: nn.Module, x: torch.Tensor) -> nn.Module:
    # like Torch-Pruning, work on what is handed over: the model's layers are traced
    # without a defensive copy and the trace becomes the compact model (`consume`)
    analysed = open_module(loaded_module(model, x), owned=True)
    return compile_model(analysed.traced, consume=True).gm


def tp_prune(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]:
        idxs = torch.nonzero(bn.weight.detach() == 0).flatten().tolist()
        if not idxs or len(idxs) == bn.num_features:
            continue
        group = graph.get_pruning_group(bn, tp.prune_batchnorm_out_channels, idxs=idxs)
        if graph.check_pruning_group(group):
            group.prune()
    return model


def timed(prune, model: nn.Module, x: torch.Tensor) -> tuple[float, object]:
    """(seconds, pruned model or the exception it raised) on a fresh copy of `model`.

    Python's garbage collector runs first: otherwise a full collection of the
    previous run's garbage (the other side's, in alternation) lands at random in
    the timed run and adds 20-250 ms to it (Torch-Pruning on mobilenet_v3_large
    measured 45 ms or 70-320 ms by luck)."""
    fresh = copy.deepcopy(model)
    gc.collect()
    start = time.perf_counter()
    try:
        pruned = prune(fresh, x)
    except Exception as exc:  # a Torch-Pruning failure is a result of the comparison
        pruned = exc
    return time.perf_counter() - start, pruned


def output_error(expected, model: nn.Module, x: torch.Tensor) -> float | str:
    try:
        actual = run_model(model, x)
    except Exception as exc:  # e.g. Torch-Pruning cut a C2f block's split widths apart
        return f"fails to run: {type(exc).__name__}"
    try:
        return relative_error(expected, actual)
    except VerificationError as exc:  # e.g. Torch-Pruning pruned an output's channels
        return f"differs: {str(exc)[:40]}"


def latency(model: nn.Module, x: torch.Tensor, repeats: int = 10) -> float:
    run_model(model, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_model(model, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def side_by_side(model: nn.Module, x: torch.Tensor, repeats: int) -> tuple:
    """(fxprune s, its model, Torch-Pruning s, its model or exception): medians of
    `repeats` runs, the two sides alternating (load on a shared machine hits both)."""
    fx_times, tp_times = [], []
    for _ in range(repeats):
        fx_s, fx_model = timed(fxprune_prune, model, x)
        tp_s, tp_model = timed(tp_prune, model, x)
        fx_times.append(fx_s)
        tp_times.append(tp_s)
        if isinstance(tp_model, Exception):
            break  # the time until Torch-Pruning fails is a lower bound of its time
    return statistics.median(fx_times), fx_model, statistics.median(tp_times), tp_model


def warm_up(size: int) -> None:
    """One untimed run of each side on resnet18: first calls (lazy imports, kernel
    selection, caches) would otherwise land on the first model of the table."""
    shape = (1, 3, size, size)
    model, x = zeroed_model("resnet18", shape), torch.randn(shape)
    timed(fxprune_prune, model, x)
    timed(tp_prune, model, x)


def prepared(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """The zeroed model and its input, built once for both tables."""
    shape = input_shape(name, size)
    return zeroed_model(name, shape), torch.randn(shape)


def compare(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> list:
    expected = run_model(model, x)
    fx_s, fx_model, tp_s, tp_model = side_by_side(model, x, repeats)
    ratio = f"{fx_s / tp_s:.3g}"
    fx_err, fx_ms = output_error(expected, fx_model, x), 1000 * latency(fx_model, x)
    if isinstance(tp_model, Exception):
        tp_col, ratio = f"≥{tp_s:.3g} (failed)", f"≤{ratio}"
        tp_err, tp_ms = f"{type(tp_model).__name__}: {str(tp_model)[:40]}", float("nan")
    else:
        tp_col, tp_err = f"{tp_s:.3g}", output_error(expected, tp_model, x)
        tp_ms = float("nan") if isinstance(tp_err, str) else 1000 * latency(tp_model, x)
    fx_err, tp_err = (f"{e:.3g}" if isinstance(e, float) else e for e in (fx_err, tp_err))
    return [name, fx_s, tp_col, ratio, fx_err, tp_err, fx_ms, tp_ms]


def fx_stages() -> list[tuple[str, object, str]]:
    """(label, owner, attribute): where fxprune's time goes."""
    from fxprune.compile import compiler
    from fxprune.pipeline import stages

    return [("trace+shapes", stages, "trace_model"), ("analyse", stages, "analyse"),
            ("liveness", compiler, "find_liveness"), ("decide", compiler, "_decide"),
            ("rewrite", compiler.Rewriter, "apply")]  # fmt: skip


@contextlib.contextmanager
def stage_timers(stages: list[tuple[str, object, str]]) -> Iterator[dict[str, float]]:
    """While inside, time every call of each `owner.attribute`; yields the seconds
    spent in each, by label."""
    totals = {label: 0.0 for label, _, _ in stages}
    originals = [(owner, attr, getattr(owner, attr)) for _, owner, attr in stages]
    for (label, owner, attr), (_, _, original) in zip(stages, originals, strict=True):

        def timed_call(*args, _f=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, attr, timed_call)
    try:
        yield totals
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def breakdown(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> list:
    """Milliseconds per stage on each side, from the fastest of `repeats` runs of each."""
    import torch_pruning as tp

    fx_best, tp_best = None, None
    for _ in range(repeats):
        with stage_timers(fx_stages()) as parts:
            total, _ = timed(fxprune_prune, model, x)
        parts["finish"] = total - sum(parts.values())  # lint, dead code, code generation
        fx_best = min(fx_best or (total, parts), (total, parts), key=lambda r: r[0])
        with stage_timers([("build", tp.DependencyGraph, "build_dependency")]) as parts:
            total, _ = timed(tp_prune, model, x)
        parts["prune"] = total - parts["build"]
        tp_best = min(tp_best or (total, parts), (total, parts), key=lambda r: r[0])
    fx_ms = [1000 * v for v in (fx_best[0], *fx_best[1].values())]
    return [name, *fx_ms, *(1000 * v for v in (tp_best[0], *tp_best[1].values()))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also print each side's time by stage (fastest of --repeats)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warm_up(args.size)
    rows, parts = [], []
    for name in args.models.split(","):  # one model in memory at a time
        model, x = prepared(name, args.size)
        rows.append(compare(name, model, x, args.repeats))
        if args.breakdown:
            parts.append(breakdown(name, model, x, args.repeats))
    headers = ["model", "fxprune s", "Torch-Pruning s", "ratio fx/TP", "fxprune error",
               "TP error", "fxprune ms (b1)", "TP ms (b1)"]  # fmt: skip
    print(f"threads {args.threads}, input {args.size}x{args.size}, median of {args.repeats} "
          "(fxprune and Torch-Pruning interleaved)")  # fmt: skip
    print(WHAT_IS_TIMED)
    print(tabulate(rows, headers=headers, floatfmt=".3g"))
    if args.breakdown:
        labels = [label for label, _, _ in fx_stages()] + ["finish"]
        print("\nmilliseconds by stage, fastest run of each side (finish: lint, dead code, "
              "the compact model's code)")  # fmt: skip
        print(tabulate(parts, headers=["model", "fxprune", *labels, "TP", "TP build",
                                       "TP prune"], floatfmt=".1f"))  # fmt: skip


if __name__ == "__main__":
    main()
