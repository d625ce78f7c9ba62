"""The paper's CIFAR-10 experiments (Ye et al. 2018, Tables 1 and 2) on fxprune.

For each model (the ConvNet, ResNet-20): train it normally, then ISTA-train a
copy at each ρ (one pruned model per ρ, like the paper's models A/B/C), compile
the dead channels away, check the compact model against the ISTA-trained one,
and print the paper-style table beside the paper's own numbers.

    # the real experiment (CIFAR-10 python batches in a local folder; hours on a GPU)
    python benchmarks/paper_cifar10.py --data cifar10:/path/to/cifar-10-batches-py \\
        --device cuda --out docs/paper-results.md
    # a smoke run on the built-in data (about a minute on 2 CPU cores)
    python benchmarks/paper_cifar10.py --data synthetic --epochs-scale 0.01

No data is downloaded. Epoch counts are the full-scale schedule times
`--epochs-scale` (at least one epoch each). The ρ values are starting points:
the paper tunes ρ and α per model by watching the monitor (see docs/paper.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fxprune.analysis import analyse
from fxprune.demo import compile_trained
from fxprune.errors import FxpruneError
from fxprune.load import load_source
from fxprune.report import ModelSummary, count_model, summary_table
from fxprune.trace import trace_model
from fxprune.train import TrainConfig, train
from fxprune.train.data import load_data


@dataclass(frozen=True)
class Recipe:
    """One model's experiment at full scale."""

    source: str
    pretrain_epochs: int
    ista_epochs: int
    lr: float
    ista_lr: float
    rhos: tuple[float, ...]
    alpha: float
    paper: tuple[tuple[str, int, float], ...]  # (name, params, accuracy %) as published


RECIPES = {
    "convnet": Recipe(
        source="zoo:convnet",
        pretrain_epochs=160,
        ista_epochs=60,
        lr=0.05,
        ista_lr=0.02,
        rhos=(0.002, 0.004, 0.008),
        alpha=0.2,
        paper=(
            ("base", 1_986_760, 89.0),
            ("A", 309_655, 89.5),
            ("B", 207_583, 87.6),
            ("C", 144_935, 86.0),
        ),
    ),  # fmt: skip
    "resnet20": Recipe(
        source="zoo:resnet20",
        pretrain_epochs=160,
        ista_epochs=60,
        lr=0.1,
        ista_lr=0.02,
        rhos=(0.002, 0.004),
        alpha=0.2,
        paper=(("base", 281_304, 92.0), ("A", 176_596, 90.9), ("B", 90_504, 88.8)),
    ),  # fmt: skip
}


def say(message: str) -> None:
    print(f"[paper] {message}", file=sys.stderr, flush=True)


def scaled(epochs: int, scale: float) -> int:
    return max(1, round(epochs * scale))


def run_model_recipe(name: str, recipe: Recipe, args: argparse.Namespace) -> str:
    """Train, ISTA-train at each ρ, compile and verify; the markdown section for `name`."""
    data = load_data(args.data, batch_size=args.batch_size, seed=0, train_size=args.train_size,
                     test_size=args.test_size)  # fmt: skip
    loaded = load_source(recipe.source, input_shape=data.input_shape)
    base_model = loaded.module
    rhos = args.rho or recipe.rhos
    alpha = args.alpha or recipe.alpha
    traced = trace_model(base_model, loaded.example)
    analysis = analyse(traced.gm)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    epochs = scaled(recipe.pretrain_epochs, args.epochs_scale)
    say(f"{name}: training normally for {epochs} epochs on {args.data}")
    base = train(base_model, data, TrainConfig(epochs=epochs, lr=recipe.lr, device=args.device),
                 gm=traced.gm, analysis=analysis, out_path=work / "base.pt",
                 source=recipe.source, progress=_progress(f"{name} base"))  # fmt: skip
    base_counts = count_model(traced.gm, loaded.example)
    rows = [ModelSummary.from_counts(base_counts, 100 * base.test_accuracy)]
    names, notes = ["base"], []
    for index, rho in enumerate(rhos):
        label = chr(ord("A") + index)
        model = copy.deepcopy(base_model)
        traced = trace_model(model, loaded.example)
        analysis = analyse(traced.gm)
        config = TrainConfig(epochs=scaled(recipe.ista_epochs, args.epochs_scale),
                             lr=recipe.ista_lr, mode="ista", rho=rho, alpha=alpha,
                             device=args.device)  # fmt: skip
        say(f"{name} {label}: ISTA for {config.epochs} epochs, rho={rho}, alpha={alpha}")
        ista = train(model, data, config, gm=traced.gm, analysis=analysis,
                     out_path=work / f"ista-{label}.pt", source=recipe.source,
                     progress=_progress(f"{name} {label}"))  # fmt: skip
        _, result, error, accuracy = compile_trained(model.cpu(), loaded.example, data.test)
        rows.append(
            ModelSummary.from_counts(count_model(result.gm, loaded.example), 100 * accuracy)
        )
        names.append(f"{label} (ρ={rho})")
        notes.append(
            f"- {label}: ρ={rho}, α={alpha}, channel sparsity {100 * ista.sparsity:.1f}%, "
            f"ISTA-trained {100 * ista.test_accuracy:.2f}% → compiled {100 * accuracy:.2f}%, "
            f"max relative error of the compiled model {error:.1e}"
        )
    paper = "\n".join(f"| {n} | {p:,} | {a:.1f} |" for n, p, a in recipe.paper)
    return "\n".join([
        f"## {name} ({recipe.source})", "",
        "Ours (fvcore parameters and FLOPs; accuracy on the test split):", "",
        summary_table(rows, names=names, fmt="github"), "", *notes, "",
        "The paper (CIFAR-10):", "", "| model | params | accuracy (%) |", "|---|---|---|", paper,
        "",
    ])  # fmt: skip


def _progress(stage: str):
    def report(record: dict) -> None:
        if record.get("event") != "epoch":
            return
        say(f"{stage} epoch {record['epoch']}/{record['epochs']} "
            f"ce={record['ce']:.3f} sparsity={record['sparsity']:.3f} "
            f"test_accuracy={record['accuracy']:.3f}")  # fmt: skip

    return report


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default="synthetic",
        help="cifar10:DIR (the paper's data) or synthetic (a smoke run)",
    )
    parser.add_argument("--model", choices=["convnet", "resnet20", "both"], default="both")
    parser.add_argument(
        "--epochs-scale",
        type=float,
        default=1.0,
        help="multiply every epoch count (e.g. 0.01 for a smoke run)",
    )
    parser.add_argument(
        "--rho",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        help="comma-separated ρ values, one pruned model each",
    )
    parser.add_argument("--alpha", type=float, help="γ-W rescaling factor α")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-size", type=int, help="cap the training examples")
    parser.add_argument("--test-size", type=int, help="cap the test examples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("out/paper"), help="where checkpoints go")
    parser.add_argument("--out", type=Path, help="also write the markdown results here")
    args = parser.parse_args(argv)
    if args.epochs_scale <= 0:
        parser.error("--epochs-scale must be > 0")
    return args  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.manual_seed(0)
    started = time.perf_counter()
    chosen = list(RECIPES) if args.model == "both" else [args.model]
    try:
        sections = [run_model_recipe(name, RECIPES[name], args) for name in chosen]
    except FxpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    command = (f"python benchmarks/paper_cifar10.py --data {args.data} --model {args.model} "
               f"--epochs-scale {args.epochs_scale}")  # fmt: skip
    seconds = time.perf_counter() - started
    title = "# fxprune on the paper's CIFAR-10 experiments"
    header = f"{title}\n\nGenerated by `{command}` in {seconds:.0f} s.\n"
    text = "\n".join([header, *sections])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
