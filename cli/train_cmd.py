"""`fxprune train`, `fxprune finetune`, `fxprune evaluate`: thin commands over fxprune.train.

Progress is one line per epoch on stderr; results go to stdout. Domain errors
are FxpruneError subclasses, turned into one line by the CLI's main.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from fxprune.cli.options import Arch, Force, Weights
from fxprune.errors import DataError, UsageError
from fxprune.train.procedure import RECALIBRATION_BATCHES
from fxprune.train.progress import event_lines

Data = Annotated[str, typer.Option("--data", help="Data set: synthetic, synthetic:N, cifar10:DIR, "
                                   "imagefolder:DIR, sklearn-digits.")]  # fmt: skip
ImageSize = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Square side the images are resized to (default: 32; imagefolder: the model's).",
    ),
]
Augment = Annotated[
    str | None,
    typer.Option(
        help="none, standard (flip,crop), paper (flip,crop,jitter,standardize) or a comma "
        "list of those; default standard (digits: none)."
    ),
]
Out = Annotated[Path, typer.Option("--out", help="Checkpoint to write (rewritten every epoch).")]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Global batch size.")]
Lr = Annotated[float, typer.Option("--lr", help="Learning rate μ (SGD with momentum).")]
Schedule = Annotated[
    str,
    typer.Option(help="LR schedule: cosine, step, none, or auto (none under ISTA, else cosine)."),
]
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
    schedule: Schedule = "auto",
    mode: Annotated[
        str, typer.Option(help="ista (the paper), slimming, sfp, l1 or none.")
    ] = "ista",
    rho: Annotated[
        str | None,
        typer.Option(
            help="ISTA strength ρ, or a schedule 0.0002:30000,0.001 (ρ until step 30000, "
            "then 0.001; 0.0002:5ep,0.001 by epochs); default: ρ·lasso = the first batch's CE, "
            "at least ln(classes)."
        ),
    ] = None,
    optimizer: Annotated[
        str, typer.Option(help="sgd (momentum on all but γ), adam or adamw (β1 = 0 on γ).")
    ] = "sgd",
    ema: Annotated[
        float | None,
        typer.Option(help="Evaluate and keep an EMA of the weights with this decay (0.999)."),
    ] = None,
    until_plateau: Annotated[
        bool,
        typer.Option(
            "--until-plateau",
            help="Stop before --epochs once cross-entropy, sparsity and lasso are flat.",
        ),
    ] = False,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="γ–W rescaling factor α (1: off); default: rescaled γ ≈ 100·μ·λ·ρ (the paper), "
            "at least 0.1 when ρ is automatic too."
        ),
    ] = None,
    group_ista: Annotated[
        bool, typer.Option("--group-ista", help="Also penalise residual streams (group lasso).")
    ] = False,
    snapshot_at: Annotated[
        str, typer.Option("--snapshot-at", help="Sparsity levels to snapshot, e.g. 0.3,0.5.")
    ] = "",
    sparsity: Annotated[float, typer.Option(help="slimming: final fraction of γ zeroed.")] = 0.5,
    rate: Annotated[float, typer.Option(help="sfp / l1: fraction of filters per layer.")] = 0.3,
    slimming_lambda: Annotated[float, typer.Option(help="slimming: L1 strength.")] = 1e-4,
    recalibrate_bn: Annotated[
        int,
        typer.Option(
            "--recalibrate-bn",
            help="Train batches that re-estimate BatchNorm statistics after each pruning "
            "epoch (0: off); a shrinking γ leaves them stale.",
        ),
    ] = RECALIBRATION_BATCHES,
    resume: Resume = None,
    device: Device = "cpu",
    seed: Seed = 0,
    weights: Weights = None,
    image_size: ImageSize = None,
    augment: Augment = None,
    force: Force = False,
    arch: Arch = None,
) -> None:
    """Train SOURCE on DATA; in ISTA mode BatchNorm γ reach exact zeros for `fxprune compile`."""
    from fxprune.train import TrainConfig

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, schedule=schedule,
        weight_decay=weight_decay, mode=mode, rho=parse_rho(rho), alpha=alpha,
        group_ista=group_ista, optimizer=optimizer, ema=ema, until_plateau=until_plateau,
        snapshot_at=parse_levels(snapshot_at), seed=seed, device=device, sfp_rate=rate,
        l1_rate=rate, slimming_lambda=slimming_lambda, sparsity=sparsity,
        recalibrate=recalibrate_bn,
    )  # fmt: skip
    run_training(source, DataOptions(data, image_size, augment), out, config, resume=resume,
                 weights=weights, force=force, arch=arch)  # fmt: skip


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
    image_size: ImageSize = None,
    augment: Augment = None,
    force: Force = False,
    arch: Arch = None,
) -> None:
    """Fine-tune a compact model (plain training, no penalty)."""
    from fxprune.train import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule,
                         mode="none", seed=seed, device=device)  # fmt: skip
    run_training(str(compact), DataOptions(data, image_size, augment), out, config,
                 resume=resume, weights=None, force=force, arch=arch)  # fmt: skip


def evaluate_command(
    source: Annotated[str, typer.Argument(help="Model or checkpoint to evaluate.")],
    data: Data,
    batch_size: BatchSize = 256,
    weights: Weights = None,
    image_size: ImageSize = None,
    augment: Augment = None,
    arch: Arch = None,
) -> None:
    """Test loss and accuracy of SOURCE on DATA."""
    from fxprune.pipeline import load_model
    from fxprune.train import evaluate

    loaded = load_model(source, weights=weights, arch=arch)
    bundle = DataOptions(data, image_size, augment).load(loaded, batch_size=batch_size, seed=0)
    check_classes(loaded.module, bundle)
    loss, accuracy = evaluate(loaded.module, bundle.test)
    typer.echo(f"{source} on {data}: loss {loss:.4f}  accuracy {accuracy:.2%}")


def parse_rho(text: str | None) -> float | str | None:
    """A plain number stays a float; a schedule is checked by TrainConfig."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def parse_levels(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(
            f"--snapshot-at '{text}' is not a list of fractions like 0.3,0.5"
        ) from None


@dataclass(frozen=True)
class DataOptions:
    """--data, --image-size and --augment, as given."""

    spec: str
    image_size: int | None = None
    augment: str | None = None

    def load(self, loaded, *, batch_size: int, seed: int):
        """The DataBundle; an imagefolder's default side is the model's input side."""
        size = self.image_size
        if size is None and self.spec.startswith("imagefolder:"):
            size = loaded.input_shape[-1]
        from fxprune.train.data import load_data

        return load_data(self.spec, batch_size=batch_size, seed=seed, image_size=size,
                         augment=self.augment)  # fmt: skip


def check_classes(model: torch.nn.Module, bundle) -> None:
    x = torch.zeros(bundle.input_shape)
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(next(model.parameters()).device))
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise DataError(
            f"the model does not run on {bundle.name} images of shape {bundle.input_shape} "
            f"({first}): give --image-size to match the model"
        ) from None
    if out.ndim != 2 or out.shape[1] != bundle.num_classes:
        raise DataError(
            f"the model outputs {tuple(out.shape)} but {bundle.name} has {bundle.num_classes} "
            "classes: give a model with a matching classifier"
        )


def run_training(source, data, out, config, *, resume, weights, force, arch=None) -> None:
    from fxprune.files import check_target
    from fxprune.pipeline import load_model, loaded_module, open_module
    from fxprune.train import train

    same = resume is not None and Path(resume).absolute() == Path(out).absolute()
    check_target(out, force=force or same, protect=[source] if Path(source).is_file() else [])
    loaded = load_model(source, weights=weights, arch=arch)
    if loaded.architecture is None:
        raise UsageError(
            f"{source} is a pickled module and fxprune writes checkpoints as data only: train "
            "zoo:NAME, torchvision:NAME or pkg.mod:factory with --weights instead"
        )
    bundle = data.load(loaded, batch_size=config.batch_size, seed=config.seed)
    check_classes(loaded.module, bundle)
    analysed = open_module(loaded_module(loaded.module, torch.randn(bundle.input_shape), source))
    result = train(
        loaded.module, bundle, config, gm=analysed.traced.gm, analysis=analysed.analysis,
        out_path=out,
        resume=resume, progress=print_epoch, architecture=loaded.architecture,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 reports (and wrote the files)
    for reason in result.refused:
        typer.echo(f"rescaling refused for {reason}", err=True)
    stopped = " (plateau)" if result.epochs < config.epochs else ""
    typer.echo(
        f"wrote {out}: test accuracy {result.test_accuracy:.2%}, "
        f"γ sparsity {result.sparsity:.1%} after {result.epochs} epochs{stopped}"
    )
    for snapshot in result.snapshots:
        typer.echo(f"snapshot {snapshot}")
    reached = max([r["sparsity"] for r in result.history] + [result.sparsity])
    for level in result.unreached:
        typer.echo(f"no snapshot at {level:.0%}: γ sparsity reached {reached:.1%}", err=True)


def print_epoch(event: dict) -> None:
    """Training progress on stderr: quarter-epoch lines, one line per epoch, advice."""
    for line in event_lines(event):
        print(line, file=sys.stderr, flush=True)


__all__ = [
    "BatchSize",
    "Augment",
    "Data",
    "DataOptions",
    "Device",
    "Epochs",
    "ImageSize",
    "Lr",
    "Out",
    "Resume",
    "Schedule",
    "Seed",
    "check_classes",
    "evaluate_command",
    "finetune_command",
    "parse_levels",
    "parse_rho",
    "print_epoch",
    "register",
    "run_training",
    "train_command",
]
