"""The `fxprune` command: thin typer commands over the library.

Domain errors (FxpruneError) become one line on stderr and exit code 1 (2 for
usage errors); `--debug` shows the traceback instead, for bug reports.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

import fxprune
from fxprune.cli.options import (
    Arch,
    Force,
    Frontend,
    InputShape,
    SourceArg,
    Submodule,
    TrustPickle,
    Weights,
)
from fxprune.errors import FxpruneError

app = typer.Typer(
    name="fxprune",
    help="Channel pruning as a torch.fx compiler pass (Ye et al., ICLR 2018).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
zoo_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fxprune {fxprune.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for bug reports")] = False,
) -> None:
    """fxprune: trace, analyse, ISTA-train, compile and export pruned CNNs."""
    STATE["debug"] = debug


def err(message: str) -> None:
    typer.echo(message, err=True)


@zoo_app.command("list")
def zoo_list(
    pattern: Annotated[str | None, typer.Argument(help="fnmatch pattern, e.g. 'resnet*'")] = None,
    kind: Annotated[
        str | None, typer.Option(help="cifar, classification, segmentation, video, detection")
    ] = None,
) -> None:
    """List the registered models with their kind and default input shape."""
    from tabulate import tabulate

    from fxprune import zoo

    rows = []
    for name in zoo.list_models(pattern, kind=kind):
        info = zoo.model_info(name)
        shape = "x".join(str(d) for d in info.input_shape)
        rows.append([name, info.kind, shape, info.submodule or ""])
    typer.echo(tabulate(rows, headers=["model", "kind", "input", "submodule"]))
    typer.echo(f"{len(rows)} models")


@app.command()
def trace(
    source: SourceArg,
    input_shape: InputShape = None,
    submodule: Submodule = None,
    weights: Weights = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
    penalties: Annotated[
        bool, typer.Option("--penalties", help="Also print the ISTA penalty λ of each BN (Eq. 2)")
    ] = False,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
    frontend: Frontend = "auto",
) -> None:
    """Trace a model and print its channel groups: what can be pruned together, and why not."""
    if fmt not in ("table", "json"):
        raise typer.BadParameter("--format must be table or json")
    traced, analysis = _trace_source(
        source, weights, input_shape, submodule, trust_pickle, arch, frontend
    )
    lambdas = _penalties(traced, analysis) if penalties else None
    if fmt == "json":
        data = analysis.to_json()
        data["leaves"] = traced.leaves
        data["frontend"] = traced.frontend
        data["notes"] = traced.notes
        if lambdas is not None:
            data["penalties"] = lambdas
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    typer.echo(_groups_table(analysis))
    for name, reason in traced.leaves.items():
        typer.echo(f"leaf module {name}: {reason}")
    if lambdas is not None:
        from tabulate import tabulate

        typer.echo(tabulate(sorted(lambdas.items()), headers=["BN layer", "λ (Eq. 2)"]))
    typer.echo(f"front end: {traced.frontend}")
    typer.echo(analysis.summary())


def _trace_source(source, weights, input_shape, submodule, trust_pickle, arch, frontend="auto"):
    """load → trace → analyse through the pipeline, as `trace` and `doctor` need it."""
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import open_source

    analysed = open_source(source, weights=weights, input_shape=parse_input_shape(input_shape),
                           submodule=submodule or None, trust_pickle=trust_pickle,
                           arch=arch, frontend=frontend)  # fmt: skip
    return analysed.traced, analysed.analysis


def _penalties(traced, analysis) -> dict[str, float]:
    from fxprune.train.ista import layer_penalties

    return {k: float(v) for k, v in layer_penalties(traced.gm, analysis).items()}


def _groups_table(analysis) -> str:
    from tabulate import tabulate

    def names(sites) -> str:
        shown = [s.module for s in sites[:3]]
        return ", ".join(shown) + (f" +{len(sites) - 3}" if len(sites) > 3 else "")

    rows = [
        [g.index, g.width, names(g.producers), names(g.bn_sites), names(g.consumers), g.status]
        for g in analysis.groups
    ]
    headers = ["id", "width", "producers", "BN sites", "consumers", "status"]
    return tabulate(rows, headers=headers, maxcolwidths=[None, None, 40, 40, 40, 60])


@app.command("compile")
def compile_cmd(
    source: SourceArg,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="The artifact to write: TorchScript (.ts), or torch.export with .pt2"
        ),
    ],
    weights: Weights = None,
    input_shape: InputShape = None,
    submodule: Submodule = None,
    threshold: Annotated[
        float | None, typer.Option(help="Zero BN γ with |γ| ≤ T before compiling")
    ] = None,
    sparsity: Annotated[
        float | None, typer.Option(help="Zero this fraction of channels (smallest |γ|·cost)")
    ] = None,
    absorb: Annotated[
        str, typer.Option(help="exact (default) or bias: the paper's fold, inexact at borders")
    ] = "exact",
    emit_py: Annotated[
        Path | None, typer.Option("--emit-py", help="Also write standalone Python source + .pt")
    ] = None,
    save_checkpoint: Annotated[
        Path | None, typer.Option("--save-checkpoint", help="Also write an fxprune checkpoint")
    ] = None,
    report: Annotated[Path | None, typer.Option("--report", help="Write a JSON report")] = None,
    verify: Annotated[
        int, typer.Option(help="Check the compact model on N random inputs before writing")
    ] = 3,
    fuse: Annotated[
        bool, typer.Option("--fuse/--no-fuse", help="Fold BatchNorms into convs in the artifact")
    ] = True,
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last",
            help="Store the artifact's conv weights channels-last (faster oneDNN convs on CPU, "
            "same outputs; 4-D outputs come back channels-last too)",
        ),
    ] = False,
    round_to: Annotated[
        int, typer.Option("--round-to", help="Keep every layer's width a multiple of N")
    ] = 1,
    min_width: Annotated[
        int, typer.Option("--min-width", help="Keep at least N channels in every layer")
    ] = 1,
    min_keep: Annotated[
        float | None,
        typer.Option(
            help="--threshold/--sparsity leave every channel group at least this "
            "fraction of its channels, and at least one (default 0.1; 0: no floor)"
        ),
    ] = None,
    allow_constant: Annotated[
        bool,
        typer.Option(
            "--allow-constant",
            help="Write the model even if its output no longer depends on its input",
        ),
    ] = False,
    trust_pickle: TrustPickle = False,
    force: Force = False,
    arch: Arch = None,
    frontend: Frontend = "auto",
    pt2_fallback: Annotated[
        bool,
        typer.Option(
            "--pt2-fallback",
            help="If TorchScript cannot capture the compact model, write a torch.export "
            ".pt2 beside --out instead",
        ),
    ] = False,
) -> None:
    """Remove dead channels exactly and write a verified TorchScript (or .pt2) artifact."""
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import CompileConfig, compile_source

    config = CompileConfig(
        source=source, out=out, weights=weights, input_shape=parse_input_shape(input_shape),
        submodule=submodule, threshold=threshold, sparsity=sparsity, absorb=absorb,
        emit_py=emit_py, save_checkpoint=save_checkpoint, report_json=report,
        trust_pickle=trust_pickle, force=force, verify=verify, fuse=fuse,
        channels_last=channels_last, round_to=round_to,
        frontend=frontend, pt2_fallback=pt2_fallback,
        min_width=min_width, allow_constant=allow_constant, arch=arch,
        **({} if min_keep is None else {"min_keep": min_keep}),
    )  # fmt: skip
    outcome = compile_source(config, progress=lambda msg: err(f"[fxprune] {msg}"))
    result = outcome.result
    typer.echo(outcome.table())
    if outcome.drift is not None:
        typer.echo(
            f"zeroed {outcome.zeroed} channels; output drift from zeroing: {outcome.drift:.3e}"
        )
    if not result.changed:
        typer.echo(_nothing_to_prune(threshold, sparsity))
    label = "max relative error vs original"
    if absorb == "bias":
        label += " (paper's bias fold: inexact at padded borders)"
    typer.echo(f"removed {result.removed_classes} of {result.total_classes} channels; "
               f"{label}: {outcome.max_error:.2e}")  # fmt: skip
    if outcome.fused_batchnorms:
        typer.echo(f"folded {outcome.fused_batchnorms} BatchNorms into convs in the artifact")
    for note in outcome.artifact_warnings:
        err(f"warning: {note}")
    for path in outcome.written:
        typer.echo(f"wrote {path}")


def _nothing_to_prune(threshold: float | None, sparsity: float | None) -> str:
    if threshold is None and sparsity is None:
        hint = "train with ISTA, or use --threshold/--sparsity"
    else:
        hint = "the zeroed channels sit in frozen groups or feed padded borders; see fxprune trace"
    return (
        f"nothing to prune: no channel is constant or dead ({hint}); "
        "the artifact is the unchanged model"
    )


@app.command()
def report(
    sources: Annotated[list[str], typer.Argument(help="Models (sources or .ts artifacts)")],
    fmt: Annotated[str, typer.Option("--format", help="text, github, latex, csv or json")] = "text",
    names: Annotated[str | None, typer.Option(help="Comma-separated row names")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Also measure test accuracy on this data set (synthetic, cifar10:DIR)"),
    ] = None,
    input_shape: InputShape = None,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
) -> None:
    """Paper-style table: parameters, fvcore FLOPs, accuracy and layer widths per model."""
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import load_model
    from fxprune.report import ModelSummary, count_model, summary_table

    labels = names.split(",") if names else [Path(s).stem if ":" not in s else s for s in sources]
    if len(labels) != len(sources):
        raise typer.BadParameter(f"--names has {len(labels)} names for {len(sources)} models")
    shape = parse_input_shape(input_shape)
    bundle = _report_data(data)
    if bundle is not None and shape is None:
        shape = bundle.input_shape
    rows = []
    for source in sources:
        loaded = load_model(source, input_shape=shape, trust_pickle=trust_pickle, arch=arch)
        accuracy = _accuracy(loaded.module, bundle) if bundle is not None else None
        rows.append(ModelSummary.from_counts(count_model(loaded.module, loaded.example), accuracy))
    typer.echo(summary_table(rows, names=labels, fmt=fmt))


def _report_data(spec: str | None):
    if spec is None:
        return None
    from fxprune.train.data import load_data

    return load_data(spec, batch_size=256)


def _accuracy(model, bundle) -> float:
    """Test accuracy in percent, after checking the classifier fits the data."""
    from fxprune.cli.train_cmd import check_classes
    from fxprune.train import evaluate

    check_classes(model, bundle)
    return 100 * evaluate(model, bundle.test)[1]


@app.command()
def doctor(
    source: SourceArg,
    input_shape: InputShape = None,
    submodule: Submodule = None,
    weights: Weights = None,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
) -> None:
    """Trace, analyse and compile with random zeros; print what was frozen and why."""
    from collections import Counter

    from fxprune.errors import VerificationError
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import compile_analysed, open_source
    from fxprune.testing import zero_random

    analysed = open_source(source, weights=weights, input_shape=parse_input_shape(input_shape),
                           submodule=submodule or None, trust_pickle=trust_pickle,
                           arch=arch)  # fmt: skip
    traced, analysis = analysed.traced, analysed.analysis
    typer.echo(analysis.summary())
    reasons = Counter(r for g in analysis.groups for r in set(g.frozen.values()))
    for reason, count in reasons.most_common():
        typer.echo(f"frozen ({count} group(s)): {reason}")
    for name, reason in traced.leaves.items():
        typer.echo(f"leaf module {name}: {reason}")
    zeroed = zero_random(traced.gm, 0.5, seed=0)
    try:
        compiled = compile_analysed(analysed)
    except VerificationError as exc:
        typer.echo(f"random zeros: {zeroed} channels zeroed: MISMATCH (please report this model)")
        raise typer.Exit(1) from exc
    typer.echo(f"random zeros: {zeroed} channels zeroed, {compiled.result.removed_classes} "
               f"removed, max relative error {compiled.max_error:.2e}: OK")  # fmt: skip


def _register_optional_commands() -> None:
    """Command modules that register themselves on the app (train, deploy)."""
    import importlib

    for name in ("train_cmd", "deploy_cmd", "prune_cmd"):
        try:
            module = importlib.import_module(f"fxprune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fxprune.cli.{name}":
                raise
            continue
        module.register(app)


_register_optional_commands()


def run() -> None:
    """Console entry point: one line on stderr for user errors, never a traceback."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TorchScript.*")
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except FxpruneError as exc:
        if STATE["debug"]:
            raise
        err(f"error: {exc}")
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err("aborted")
        sys.exit(130)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, click_exceptions()):
            sys.exit(_usage_error(exc))
        if STATE["debug"]:
            raise
        err(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
        sys.exit(3)


def click_exceptions() -> tuple[type[Exception], ...]:
    """The ClickException classes typer may raise: typer ≥ 0.2x bundles its own click
    (``typer._click``), whose classes are not ``click.ClickException``; older typer
    raises click's own. Found through ``typer.BadParameter``'s bases, not by name."""
    bases = [c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"]
    try:
        import click

        bases.append(click.ClickException)
    except ImportError:  # typer without a separate click
        pass
    return tuple(dict.fromkeys(bases))


def _usage_error(exc: Exception) -> int:
    """One line on stderr for a command-line mistake; the exit code (2 for usage errors).

    A bare group (`fxprune zoo`) prints its help instead, as click would.
    """
    if type(exc).__name__ == "NoArgsIsHelpError":
        exc.show()  # type: ignore[attr-defined]
        return 2
    message = " ".join(exc.format_message().split()) or type(exc).__name__  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err(f"error: {message}{hint}")
    return int(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    run()


__all__ = [
    "STATE",
    "compile_cmd",
    "doctor",
    "err",
    "main",
    "report",
    "run",
    "trace",
    "zoo_list",
]
