"""`fxprune serve`, `fxprune export`, `fxprune plot`, `fxprune bench`: deployment commands.

Thin commands over fxprune.serve, fxprune.export and fxprune.report.
Progress goes to stderr, results to stdout; domain errors are FxpruneError
subclasses, turned into one line by the CLI's main.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fxprune.cli.options import Arch, Force, InputShape, SourceArg, TrustPickle, Weights


def register(app: typer.Typer) -> None:
    """Add the serve, export, plot and bench commands to `app`."""
    app.command("serve")(serve_command)
    app.command("export")(export_command)
    app.command("plot")(plot_command)
    app.command("bench")(bench_command)


def _err(message: str) -> None:
    typer.echo(message, err=True)


def serve_command(
    artifact: Annotated[
        Path, typer.Argument(help="A TorchScript (.ts) or torch.export (.pt2) artifact")
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 exposes it to the network)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port, printed)")] = 8080,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Run up to N queued samples as one batch")
    ] = 8,
    workers: Annotated[
        int, typer.Option(help="Server processes (each loads the model; threads are split)")
    ] = 1,
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", help="Reject larger request bodies with 413")
    ] = 16.0,
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", help="N,C,H,W for artifacts without fxprune metadata"),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn log level: warning, info, debug")
    ] = "warning",
    max_samples: Annotated[
        int, typer.Option("--max-samples", help="Reject requests with more samples (413)")
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            help="Close connections that send no complete request head within this many seconds",
        ),
    ] = 10.0,
) -> None:
    """Serve an artifact over HTTP: GET /health, GET /metadata, POST /predict."""
    from fxprune.load import parse_input_shape
    from fxprune.serve import ServeConfig, require_serve_extra, serve

    require_serve_extra()
    config = ServeConfig(
        artifact=artifact, host=host, port=port, max_batch=max_batch, workers=workers,
        max_body_mb=max_body_mb, input_shape=parse_input_shape(input_shape), log_level=log_level,
        max_samples=max_samples, request_timeout=request_timeout,
    )  # fmt: skip

    def ready(url: str, loaded) -> None:
        batch = "any batch" if loaded.fixed_batch is None else f"static batch {loaded.fixed_batch}"
        shape = "x".join(map(str, loaded.input_shape))
        _err(f"[fxprune] serving {loaded.path.name} ({loaded.format}, input {shape}, {batch}) "
             f"on {url} with {workers} worker(s), max batch {max_batch}")  # fmt: skip
        _err(f"[fxprune] listening on {url}")

    serve(config, on_ready=ready)
    _err("[fxprune] server stopped")


def export_command(
    source: SourceArg,
    fmt: Annotated[str, typer.Option("--format", help="torchscript, pt2 or onnx")],
    out: Annotated[Path, typer.Option("--out", help="The artifact file to write")],
    input_shape: InputShape = None,
    weights: Weights = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version (recorded in the file)")] = 18,
    force: Force = False,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
) -> None:
    """Export a model (traced by torch.fx) as TorchScript, torch.export .pt2 or ONNX, verified.

    A compact checkpoint (`fxprune compile --save-checkpoint`) exports the compiled model.
    The file is written atomically and only after it loads back with the same outputs.
    """
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import export_source

    result = export_source(source, fmt, out, input_shape=parse_input_shape(input_shape),
                           weights=weights, opset=opset, force=force,
                           trust_pickle=trust_pickle, arch=arch)  # fmt: skip
    for note in result.warnings:
        _err(f"warning: {note}")
    error = "not verified" if result.max_rel_error is None else f"{result.max_rel_error:.2e}"
    typer.echo(f"exported {source} as {result.format} ({result.method}); "
               f"max relative error vs the model: {error}")  # fmt: skip
    typer.echo(f"wrote {result.path}")


def bench_command(
    source: SourceArg,
    compact: Annotated[
        str | None,
        typer.Argument(
            help="The compact model (e.g. a compact checkpoint); default: compile "
            "SOURCE (exact zeros, or --sparsity)"
        ),
    ] = None,  # fmt: skip
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated")] = "1,8",
    repeats: Annotated[int, typer.Option(help="Timed runs per model and batch size")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed runs first")] = 2,
    threads: Annotated[
        int | None, typer.Option(help="torch intra-op threads (default: torch's choice)")
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Without COMPACT: zero this fraction of channels before compiling"),
    ] = None,
    torchscript: Annotated[
        bool, typer.Option("--torchscript/--no-torchscript", help="Also time frozen TorchScript")
    ] = True,
    input_shape: InputShape = None,
    weights: Weights = None,
    fmt: Annotated[str, typer.Option("--format", help="text, github or json")] = "text",
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
) -> None:
    """Latency and throughput of SOURCE vs its compact version, measured interleaved."""
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import load_model
    from fxprune.report.bench import BenchConfig, bench_models, parse_batches

    config = BenchConfig(batches=parse_batches(batch), repeats=repeats, warmup=warmup,
                         threads=threads, torchscript=torchscript)  # fmt: skip
    shape = parse_input_shape(input_shape)
    loaded = load_model(
        source, weights=weights, input_shape=shape, trust_pickle=trust_pickle, arch=arch
    )
    if compact is None:
        _err(f"[fxprune] compiling {source} for the compact side")
        small = _compile_for_bench(loaded, sparsity)
    else:
        small = load_model(compact, input_shape=shape, trust_pickle=trust_pickle, arch=arch).module
    _err(f"[fxprune] timing batches {config.batches}, {config.repeats} repeats each")
    result = bench_models(loaded.module, small, loaded.example, config)
    for note in result.notes:
        _err(f"warning: {note}")
    if fmt != "json":
        typer.echo(result.header())
    typer.echo(result.table(fmt))


def _compile_for_bench(loaded, sparsity: float | None):
    from fxprune.errors import UsageError
    from fxprune.pipeline import compile_analysed, open_module

    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise UsageError(f"--sparsity must be in [0, 1), not {sparsity}")
    compiled = compile_analysed(open_module(loaded), sparsity=sparsity)
    if not compiled.result.changed:
        _err("warning: nothing to prune (no exact zeros): both sides are the same model; "
             "give COMPACT or --sparsity")  # fmt: skip
    return compiled.result.gm


def plot_command(
    sources: Annotated[
        list[str] | None,
        typer.Argument(help="Models to compare (base first): sources or compact checkpoints"),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Image to write (.png, .pdf, .svg)")] = Path(
        "channels.png"
    ),
    log: Annotated[
        Path | None,
        typer.Option("--log", help="Training log (X.jsonl beside fxprune train --out X.pt)"),
    ] = None,
    names: Annotated[str | None, typer.Option(help="Comma-separated legend names")] = None,
    title: Annotated[str | None, typer.Option(help="Figure title")] = None,
    input_shape: InputShape = None,
    force: Force = False,
    trust_pickle: TrustPickle = False,
    arch: Arch = None,
) -> None:
    """Per-layer channel widths before/after as bars; with --log, the training curves."""
    from fxprune.errors import UsageError
    from fxprune.files import check_target
    from fxprune.load import parse_input_shape
    from fxprune.pipeline import load_model
    from fxprune.report import count_model
    from fxprune.report.plot import plot_report, read_training_log

    sources = sources or []
    labels = names.split(",") if names else [Path(s).stem if ":" not in s else s for s in sources]
    if len(labels) != len(sources):
        raise UsageError(f"--names has {len(labels)} names for {len(sources)} models")
    check_target(out, force=force, protect=[s for s in sources if Path(s).exists()])
    records = read_training_log(log) if log is not None else None
    shape = parse_input_shape(input_shape)
    models = []
    for label, source in zip(labels, sources, strict=True):
        loaded = load_model(source, input_shape=shape, trust_pickle=trust_pickle, arch=arch)
        models.append((label, count_model(loaded.module, loaded.example)))
    written = plot_report(out, models, records, force=force, title=title)
    typer.echo(f"wrote {written}")


__all__ = [
    "bench_command",
    "export_command",
    "plot_command",
    "register",
    "serve_command",
]
