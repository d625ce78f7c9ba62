"""`fxprune train`, `fxprune finetune`, `fxprune evaluate`: thin commands over fxprune.train.

Progress is one line per epoch on stderr; results go to stdout. Domain errors
are FxpruneError subclasses, turned into one line by the CLI's main.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from fxprune.cli.options import Force, Weights
from fxprune.errors import CheckpointError, DataError, UsageError
from fxprune.train.progress import event_lines

Data = Annotated[str, typer.Option("--data", help="Data set: synthetic, synthetic:N, cifar10:DIR, "
                                   "imagefolder:DIR.")]  # fmt: skip
Out = Annotated[Path, typer.Option("--out", help="Checkpoint to write (rewritten every epoch).")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Global batch size.")]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate μ (SGD with momentum).")]
Schedule = Annotated[str, typer.Option(help="LR schedule: cosine, step or none.")]
Device = Annotated[str, typer.Option(help="cpu or cuda.")]
Seed = Annotated[int, typer.Option(help="Seed of the data order and all randomness.")]
Resume = Annotated[
    Path | None, typer.Option("--resume", help="Continue the run saved in this checkpoint.")
]


def register(app: typer.Typer) -> None:
    """Add the train, finetune and evaluate commands to `app`."""
    app.command("train")(train_command)
    app.command("finetune")(finetune_command)
    app.command("evaluate")(evaluate_command)


def train_command(
    source: Annotated[
        str,
        typer.Argument(
            help="Model: zoo:NAME, torchvision:NAME, pkg.mod:factory or an fxprune .pt."
        ),
    ],  # fmt: skip
    data: Data,
    out: Out,
    epochs: Epochs = 10,
    batch_size: BatchSize = 64,
    lr: Lr = 0.05,
    momentum: Annotated[float, typer.Option(help="SGD momentum.")] = 0.9,
    weight_decay: Annotated[
        float, typer.Option(help="Weight decay (never on penalised γ).")
    ] = 5e-4,
    schedule: Schedule = "cosine",
    mode: Annotated[
        str, typer.Option(help="ista (the paper), slimming, sfp, l1 or none.")
    ] = "ista",
    rho: Annotated[
        float | None,
        typer.Option(help="ISTA strength ρ; default: CE = ρ·lasso on the first batch."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="γ–W rescaling factor α (1: off).")] = 1.0,
    group_ista: Annotated[
        bool, typer.Option("--group-ista", help="Also penalise residual streams (group lasso).")
    ] = False,
    snapshot_at: Annotated[
        str, typer.Option("--snapshot-at", help="Sparsity levels to snapshot, e.g. 0.3,0.5.")
    ] = "",
    sparsity: Annotated[float, typer.Option(help="slimming: final fraction of γ zeroed.")] = 0.5,
    rate: Annotated[float, typer.Option(help="sfp / l1: fraction of filters per layer.")] = 0.3,
    slimming_lambda: Annotated[float, typer.Option(help="slimming: L1 strength.")] = 1e-4,
    resume: Resume = None,
    device: Device = "cpu",
    seed: Seed = 0,
    weights: Weights = None,
    force: Force = False,
) -> None:
    """Train SOURCE on DATA; in ISTA mode BatchNorm γ reach exact zeros for `fxprune compile`."""
    from fxprune.train import TrainConfig

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, schedule=schedule,
        weight_decay=weight_decay, mode=mode, rho=rho, alpha=alpha, group_ista=group_ista,
        snapshot_at=parse_levels(snapshot_at), seed=seed, device=device, sfp_rate=rate,
        l1_rate=rate, slimming_lambda=slimming_lambda, sparsity=sparsity,
    )  # fmt: skip
    run_training(source, data, out, config, resume=resume, weights=weights, force=force)


def finetune_command(
    compact: Annotated[Path, typer.Argument(help="A compiled (or any fxprune) checkpoint.")],
    data: Data,
    out: Out,
    epochs: Epochs = 5,
    batch_size: BatchSize = 64,
    lr: Lr = 0.01,
    schedule: Schedule = "cosine",
    resume: Resume = None,
    device: Device = "cpu",
    seed: Seed = 0,
    force: Force = False,
) -> None:
    """Fine-tune a compact model (plain training, no penalty)."""
    from fxprune.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                         mode="none", seed=seed, device=device)  # fmt: skip
    run_training(str(compact), data, out, config, resume=resume, weights=None, force=force)


def evaluate_command(
    source: Annotated[str, typer.Argument(help="Model or checkpoint to evaluate.")],
    data: Data,
    batch_size: BatchSize = 256,
    weights: Weights = None,
) -> None:
    """Test loss and accuracy of SOURCE on DATA."""
    from fxprune.load import load_source
    from fxprune.train import evaluate
    from fxprune.train.data import load_data

    loaded = load_source(source, weights=weights)
    bundle = load_data(data, batch_size=batch_size)
    check_classes(loaded.module, bundle)
    loss, accuracy = evaluate(loaded.module, bundle.test)
    typer.echo(f"{source} on {data}: loss {loss:.4f}  accuracy {accuracy:.2%}")


def parse_levels(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(
            f"--snapshot-at '{text}' is not a list of fractions like 0.3,0.5"
        ) from None


def architecture_of(source: str) -> dict:
    """What a checkpoint should name as the architecture of a model loaded from `source`."""
    path = Path(source)
    if not path.is_file():
        return {"source": source}
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    arch = ckpt.get("architecture") if isinstance(ckpt, dict) else None
    if not arch or arch.get("kind") not in ("source", "python"):
        raise CheckpointError(f"{path} names no architecture: train from zoo:NAME with --weights")
    return {"source": arch["source"]} if arch["kind"] == "source" else {"code": arch["code"]}


def check_classes(model: torch.nn.Module, bundle) -> None:
    x = torch.zeros(bundle.input_shape)
    model.eval()
    with torch.no_grad():
        out = model(x.to(next(model.parameters()).device))
    if out.ndim != 2 or out.shape[1] != bundle.num_classes:
        raise DataError(
            f"the model outputs {tuple(out.shape)} but {bundle.name} has {bundle.num_classes} "
            "classes: give a model with a matching classifier"
        )


def run_training(source, data, out, config, *, resume, weights, force) -> None:
    from fxprune.files import check_target
    from fxprune.load import load_source
    from fxprune.pipeline import loaded_module, open_module
    from fxprune.train import train
    from fxprune.train.data import load_data

    same = resume is not None and Path(resume).absolute() == Path(out).absolute()
    check_target(out, force=force or same, protect=[source] if Path(source).is_file() else [])
    loaded = load_source(source, weights=weights)
    bundle = load_data(data, batch_size=config.batch_size, seed=config.seed)
    check_classes(loaded.module, bundle)
    analysed = open_module(loaded_module(loaded.module, torch.randn(bundle.input_shape), source))
    result = train(
        loaded.module, bundle, config, gm=analysed.traced.gm, analysis=analysed.analysis,
        out_path=out,
        resume=resume, progress=print_epoch, **architecture_of(source),
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports (and wrote the files)
    for reason in result.refused:
        typer.echo(f"rescaling refused for {reason}", err=True)
    typer.echo(
        f"wrote {out}: test accuracy {result.test_accuracy:.2%}, "
        f"γ sparsity {result.sparsity:.1%} after {config.epochs} epochs"
    )
    for snapshot in result.snapshots:
        typer.echo(f"snapshot {snapshot}")


def print_epoch(event: dict) -> None:
    """Training progress on stderr: quarter-epoch lines, one line per epoch, advice."""
    for line in event_lines(event):
        print(line, file=sys.stderr, flush=True)


__all__ = [
    "BatchSize",
    "Data",
    "Device",
    "Epochs",
    "Lr",
    "Out",
    "Resume",
    "Schedule",
    "Seed",
    "architecture_of",
    "check_classes",
    "evaluate_command",
    "finetune_command",
    "parse_levels",
    "print_epoch",
    "register",
    "run_training",
    "train_command",
]
