"""`fxprune prune`: prune the user's own model in place and save it as its library would.

A thin command over `fxprune.pipeline.prune_source`; progress goes to stderr,
results to stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fxprune.cli.options import Force, InputShape, SourceArg, TrustPickle, Weights


def register(app: typer.Typer) -> None:
    """Add the prune command to `app`."""
    app.command("prune")(prune_command)


def prune_command(
    source: SourceArg,
    out: Annotated[Path, typer.Option("--out", help="Where to write the pruned model (.pt)")],
    weights: Weights = None,
    input_shape: InputShape = None,
    threshold: Annotated[
        float | None, typer.Option(help="Zero BN γ with |γ| ≤ T before pruning")
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option(help="Zero this fraction of channels (smallest |γ|·cost)")
    ] = None,
    border: Annotated[
        str,
        typer.Option(
            help="keep: keep constant channels a padded conv reads (no class changes); "
            "wrap: remove them, wrapping that conv with its exact border term"
        ),
    ] = "keep",
    whole_module: Annotated[
        bool,
        typer.Option(
            "--whole-module",
            help="torch.save the whole module (pickle: loading it "
            "runs code) instead of its state_dict",
        ),
    ] = False,
    verify: Annotated[int, typer.Option(help="Check the pruned model on N inputs")] = 3,
    trust_pickle: TrustPickle = False,
    force: Force = False,
) -> None:
    """Shrink the model's own Conv/BN/Linear layers in place (same classes, same
    function) and save it: by default its state_dict, which
    `fxprune.compile.in_place_save.load_pruned(base_model, state)` loads into a
    freshly built base model."""
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import PruneConfig, prune_source

    config = PruneConfig(
        source=source, out=out, weights=weights, input_shape=parse_input_shape(input_shape),
        threshold=threshold, sparsity=sparsity, border=border, whole_module=whole_module,
        trust_pickle=trust_pickle, force=force, verify=verify,
    )  # fmt: skip
    report = prune_source(config, progress=lambda msg: typer.echo(f"[fxprune] {msg}", err=True))
    typer.echo(report.summary())
    typer.echo(f"wrote {out}")
