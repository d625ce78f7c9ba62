"""ISTA (Ye et al. 2018) against Network Slimming, L1-filter and SFP on real data: sklearn-digits.

For each seed, on scikit-learn's 1,797 UCI digit scans (upscaled to 32×32, fixed
split of 1,437 train / 360 test images):

1. base: `--model` (default zoo:resnet20 at 16×16, so three seeds fit on two
   CPU cores; zoo:convnet, the paper's ConvNet, needs --image-size 32) trained
   normally;
2. ISTA A, B, C chained as in the paper: ISTA-train the base at ρ_A, compile the
   dead channels away (exact), fine-tune; ISTA-train that compiled model at ρ_B,
   compile, fine-tune; then ρ_C. Chained in-process from the compiled
   GraphModule (the data-only checkpoints of compiled models had not landed
   on main when this was written, so there is no checkpoint round trip);
3. Network Slimming (Liu et al. 2017, L1 subgradient on γ, then one global γ
   threshold), L1-filter (Li et al. 2017, one-shot per-layer rate, then
   training with the filters held at zero) and SFP (He et al. 2018, soft filter
   pruning every epoch), each from the same base, pruned to the FLOPs of ISTA
   model B (±5 %, bisection on their own knob), compiled and fine-tuned with the
   same budget.

Parameters and FLOPs are fvcore's counts of the compiled models; accuracy is on
the test split, mean ± std over the seeds. The paper's CIFAR-10 ConvNet numbers
are printed beside for reference (their data, not ours).

    python benchmarks/paper_digits.py --jobs 3             # 3 seeds, the table in docs/paper.md
    python benchmarks/paper_digits.py --seeds 0,1,2,3,4 --model zoo:convnet --image-size 32
"""

from __future__ import annotations

import argparse
import copy
import functools
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from fxprune.analysis import analyse
from fxprune.compile import compile_model
from fxprune.errors import FxpruneError
from fxprune.load import load_source
from fxprune.report import count_model
from fxprune.trace import trace_model
from fxprune.train import TrainConfig, evaluate, train
from fxprune.train.data import load_data
from fxprune.train.ista import penalty_targets
from fxprune.verify import relative_error, run_model

PAPER = {  # Ye et al. 2018, Tables 1 and 2 (CIFAR-10): params, accuracy %
    "zoo:convnet": (("base", 1_986_760, 89.0), ("A", 309_655, 89.5), ("B", 207_583, 87.6),
                    ("C", 144_935, 86.0)),
    "zoo:resnet20": (("base", 281_304, 92.0), ("A", 176_596, 90.9), ("B", 90_504, 88.8)),
}  # fmt: skip
FLOP_TOLERANCE = 0.05


@dataclass(frozen=True)
class Budget:
    """Epochs and hyper-parameters of one run (defaults fit `make bench` on 2 CPU cores)."""

    base_epochs: int = 4
    prune_epochs: int = 2
    finetune_epochs: int = 1
    lr: float = 0.05
    ista_lr: float = 0.02
    finetune_lr: float = 0.01
    rhos: tuple[float | str, ...] = (0.0005, 0.001, 0.002)
    slimming_lambda: float = 1e-3
    batch_size: int = 64
    source: str = "zoo:resnet20"
    ema: float | None = None  # the paper evaluates model A with an EMA of the weights
    until_plateau: bool = False  # stop ISTA early on the paper's three criteria
    device: str = "cpu"

    def config(self, seed: int, **overrides) -> TrainConfig:
        """A TrainConfig with this budget's batch size, device and `seed`."""
        return TrainConfig(batch_size=self.batch_size, device=self.device, seed=seed, **overrides)


@dataclass
class Measured:
    """One compiled model: fvcore params and FLOPs, test accuracy (%), max relative error."""

    params: int
    flops: int
    accuracy: float
    error: float = 0.0
    note: str = ""


@dataclass
class Row:
    name: str
    runs: list[Measured] = field(default_factory=list)


def say(message: str) -> None:
    print(f"[digits] {message}", file=sys.stderr, flush=True)


def traced_of(model: nn.Module, example: torch.Tensor):
    traced = trace_model(model, example)
    return traced, analyse(traced.gm)


def fit(model: nn.Module, data, config: TrainConfig, example: torch.Tensor):
    """Train `model` in place with fxprune's trainer; returns (model, TrainResult)."""
    traced, analysis = traced_of(model, example)
    result = train(model, data, config, gm=traced.gm, analysis=analysis, out_path=None)
    return model, result


def compiled(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, float]:
    """The compiled model and its max relative error against `model` on 8 random inputs."""
    model = model.cpu().eval()
    traced, _ = traced_of(model, example)
    result = compile_model(traced)
    x = torch.randn(8, *example.shape[1:])
    return result.gm, relative_error(run_model(model, x), run_model(result.gm, x))


def measure(model: nn.Module, example: torch.Tensor, data, error: float = 0.0, note: str = ""):
    counts = count_model(model, example)
    accuracy = 100 * evaluate(model, data.test)[1]
    return Measured(counts.params, counts.flops, accuracy, error, note)


def finetune(model: nn.Module, data, budget: Budget, example: torch.Tensor, seed: int):
    config = budget.config(seed, epochs=budget.finetune_epochs, lr=budget.finetune_lr,
                           mode="none")  # fmt: skip
    return fit(model, data, config, example)[0]


# -- FLOP matching -------------------------------------------------------------------


def zero_fraction(model: nn.Module, example, order: Callable[[nn.Module, list], list], f: float):
    """A copy of `model` with γ = 0 for the first `f` of each ranking `order` returns."""
    copy_ = copy.deepcopy(model)
    traced, analysis = traced_of(copy_, example)
    targets = penalty_targets(traced.gm, analysis)
    with torch.no_grad():
        for module, positions in order(copy_, targets, f):
            copy_.get_submodule(module).weight[positions] = 0
    return copy_


def per_layer(model, targets, f):
    """L1 / SFP: the same fraction in every layer, smallest filter norms first."""
    picks = []
    for t in targets:  # the FLOPs depend only on the count per layer, as in the trainer
        count = min(int(f * len(t.positions)), len(t.positions) - 1)
        picks.append((t.module, torch.as_tensor(t.positions[:count], dtype=torch.long)))
    return picks


def global_gamma(model, targets, f):
    """Slimming: one global threshold on |γ|."""
    scored = [(float(model.get_submodule(t.module).weight[p].abs()), t.module, int(p))
              for t in targets for p in t.positions]  # fmt: skip
    scored.sort()
    chosen = scored[: int(f * len(scored))]
    return [(m, torch.as_tensor([p for _, mm, p in chosen if mm == m], dtype=torch.long))
            for m in {m for _, m, _ in chosen}]  # fmt: skip


def match_flops(model, example, order, target: int) -> tuple[float, int]:
    """Bisection on the fraction f so the compiled model's FLOPs are within ±5 % of `target`."""
    low, high, best = 0.0, 0.99, (0.0, count_model(model, example).flops)
    for _ in range(10):
        f = (low + high) / 2
        flops = count_model(compiled(zero_fraction(model, example, order, f), example)[0],
                            example).flops  # fmt: skip
        if abs(flops - target) < abs(best[1] - target):
            best = (f, flops)
        if abs(flops - target) <= FLOP_TOLERANCE * target:
            return f, flops
        low, high = (f, high) if flops > target else (low, f)
    return best


# -- the methods -----------------------------------------------------------------------


def ista_chain(base, data, budget, example, seed) -> list[Measured]:
    """A → B → C: ISTA, compile, fine-tune, each stage starting from the last compiled model."""
    model, rows = copy.deepcopy(base), []
    for label, rho in zip("ABC", budget.rhos, strict=False):
        config = budget.config(
            seed, epochs=budget.prune_epochs, lr=budget.ista_lr, mode="ista", rho=rho,
            ema=budget.ema, until_plateau=budget.until_plateau,
        )  # fmt: skip
        model, result = fit(model, data, config, example)
        small, error = compiled(model, example)
        say(
            f"seed {seed} {label}: ρ={rho} α={result.history[-1]['alpha']:.3g} sparsity "
            f"{result.sparsity:.1%} ISTA {100 * result.test_accuracy:.1f}% error {error:.1e}"
        )
        model = finetune(small, data, budget, example, seed)
        note = f"sparsity {result.sparsity:.0%}, before fine-tune {result.test_accuracy:.1%}"
        rows.append(measure(model, example, data, error, note))
    return rows


def baseline(name, base, data, budget, example, seed, target_flops, rate=None) -> Measured:
    """Slimming, L1 or SFP from `base`, pruned to `target_flops`, compiled, fine-tuned.
    `rate`: L1/SFP's per-layer fraction when already matched (it does not depend on
    the weights)."""
    model = copy.deepcopy(base)
    common = dict(epochs=budget.prune_epochs, lr=budget.ista_lr)
    if name == "slimming":  # train with the L1 subgradient, then one global threshold
        config = budget.config(seed, mode="slimming", sparsity=0.0,
                               slimming_lambda=budget.slimming_lambda, **common)  # fmt: skip
        fit(model, data, config, example)
        f, _ = match_flops(model, example, global_gamma, target_flops)
        model = zero_fraction(model, example, global_gamma, f)
    else:  # the per-layer rate that gives the target FLOPs
        f = rate if rate is not None else match_flops(model, example, per_layer, target_flops)[0]
        mode = {"l1": "l1", "sfp": "sfp"}[name]
        fit(model, data, budget.config(seed, mode=mode, l1_rate=f, sfp_rate=f, **common), example)
    small, error = compiled(model, example)
    model = finetune(small, data, budget, example, seed)
    return measure(model, example, data, error, f"fraction {f:.2f}")


def one_seed(seed: int, data, budget: Budget, example) -> dict[str, Measured]:
    torch.manual_seed(seed)
    base = load_source(budget.source, seed=seed, input_shape=tuple(example.shape)).module
    config = budget.config(seed, epochs=budget.base_epochs, lr=budget.lr, mode="none")
    base, _ = fit(base, data, config, example)
    rows = {"base": measure(base, example, data)}
    say(f"seed {seed} base: {rows['base'].accuracy:.1f}%")
    for label, m in zip("ABC", ista_chain(base, data, budget, example, seed), strict=False):
        rows[f"ISTA {label}"] = m
    target = rows["ISTA B"].flops
    rate = match_flops(base, example, per_layer, target)[0]
    for name in ("slimming", "l1", "sfp"):
        rows[name] = baseline(name, base, data, budget, example, seed, target, rate)
        say(f"seed {seed} {name}: {rows[name].accuracy:.1f}% at {rows[name].flops:,} FLOPs")
    return rows


# -- the table ---------------------------------------------------------------------------

ORDER = ("base", "ISTA A", "ISTA B", "ISTA C", "slimming", "l1", "sfp")
LABELS = {"slimming": "Network Slimming", "l1": "L1-filter", "sfp": "SFP"}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: list[dict[str, Measured]], source: str) -> list[str]:
    base_flops = statistics.fmean(r["base"].flops for r in results)
    paper = {f"ISTA {n}" if n != "base" else n: (p, a) for n, p, a in PAPER.get(source, ())}
    lines = ["| model | params | FLOPs | FLOPs % | accuracy % (mean ± std) | max rel. error "
             "| paper, CIFAR-10: params · accuracy % |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key in ORDER:
        runs = [r[key] for r in results]
        params, flops = (
            statistics.fmean(m.params for m in runs),
            statistics.fmean(m.flops for m in runs),
        )
        acc, std = mean_std([m.accuracy for m in runs])
        ref = paper.get(key)
        ref_text = f"{ref[0]:,} · {ref[1]:.1f}" if ref else "–"
        error = max(m.error for m in runs)
        lines.append(f"| {LABELS.get(key, key)} | {params:,.0f} | {flops:,.0f} | "
                     f"{100 * flops / base_flops:.1f} | {acc:.2f} ± {std:.2f} | {error:.1e} | "
                     f"{ref_text} |")  # fmt: skip
    return lines


def verdicts(results: list[dict[str, Measured]]) -> list[str]:
    """ISTA B against each baseline at matched FLOPs: a win or loss only when the means
    differ by more than the two standard deviations together, else a tie."""
    ista, ista_std = mean_std([r["ISTA B"].accuracy for r in results])
    lines = []
    for key in ("slimming", "l1", "sfp"):
        acc, std = mean_std([r[key].accuracy for r in results])
        flops = statistics.fmean(r[key].flops / r["ISTA B"].flops for r in results)
        margin = ista - acc
        word = (
            "wins" if margin > ista_std + std else "loses" if -margin > ista_std + std else "ties"
        )
        lines.append(
            f"- ISTA B {word} against {LABELS[key]} ({ista:.2f} vs {acc:.2f} %, "
            f"difference {margin:+.2f}, their FLOPs {100 * flops:.1f} % of B's)"
        )
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (≥ 3 for a std)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every epoch count")
    parser.add_argument("--rho", help="ρ of A,B,C (default 0.0005,0.001,0.002)")
    parser.add_argument("--out", help="also write the markdown here")
    parser.add_argument("--train-size", type=int, help="cap the training images (smoke runs)")
    parser.add_argument("--model", default="zoo:resnet20", help="zoo:resnet20 or zoo:convnet")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    parser.add_argument("--image-size", type=int, default=16, help="side (zoo:convnet needs 32)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def scaled_budget(args: argparse.Namespace) -> Budget:
    b = Budget()
    e = {k: max(1, round(getattr(b, k) * args.scale))
         for k in ("base_epochs", "prune_epochs", "finetune_epochs")}  # fmt: skip
    rhos = tuple(float(v) for v in args.rho.split(",")) if args.rho else b.rhos
    return Budget(**{**b.__dict__, **e, "rhos": rhos, "source": args.model})


def run_seed(seed: int, *, budget: Budget, args: argparse.Namespace) -> dict[str, Measured]:
    """One seed from scratch (in this process or a worker): data, base, ISTA, baselines."""
    torch.set_num_threads(args.threads)
    data = load_data("sklearn-digits", batch_size=budget.batch_size,
                     train_size=args.train_size, image_size=args.image_size)  # fmt: skip
    return one_seed(seed, data, budget, torch.zeros(data.input_shape))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    budget = scaled_budget(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        work = functools.partial(run_seed, budget=budget, args=args)
        if args.jobs > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                results = list(pool.map(work, args.seeds))
        else:
            results = [work(seed) for seed in args.seeds]
    except FxpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seeds = ",".join(map(str, args.seeds))
    command = (f"python benchmarks/paper_digits.py --model {args.model} --image-size "
               f"{args.image_size} --seeds {seeds} --scale {args.scale:g}")  # fmt: skip
    if args.rho:
        command += f" --rho {args.rho}"
    if args.train_size:
        command += f" --train-size {args.train_size}"
    text = "\n".join([
        f"Generated by `{command}` in {time.perf_counter() - started:.0f} s "
        f"({args.jobs} processes × {args.threads} thread); {len(args.seeds)} seeds; epochs: base "
        f"{budget.base_epochs}, each pruning stage {budget.prune_epochs}, fine-tune "
        f"{budget.finetune_epochs}; ρ of A/B/C {', '.join(map(str, budget.rhos))}.", "",
        *table(results, budget.source), "", "At B's FLOPs (±5 %):", "", *verdicts(results), "",
    ])  # fmt: skip
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
