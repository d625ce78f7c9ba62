"""Option and argument types shared by the fxprune commands (typer `Annotated` aliases)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SourceArg = Annotated[
    str, typer.Argument(help="zoo:NAME, torchvision:NAME, pkg.module:factory or a .pt file")
]
InputShape = Annotated[
    str | None,
    typer.Option("--input-shape", help="Example input shape N,C,H,W (default per model)"),
]
Submodule = Annotated[
    str | None, typer.Option("--submodule", help="Trace only this submodule, e.g. backbone")
]
Weights = Annotated[
    Path | None, typer.Option("--weights", help="A state_dict to load into the model (strict)")
]
TrustPickle = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow files that unpickle arbitrary objects (runs code)"),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files")]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="pkg.module:factory a checkpoint is built on; fxprune imports a factory only "
        "when you name it here",
    ),
]

Frontend = Annotated[
    str,
    typer.Option(
        "--frontend",
        help="auto (fx, then torch.export when fx cannot trace), fx or export",
    ),
]


__all__ = [
    "Arch",
    "Force",
    "Frontend",
    "InputShape",
    "SourceArg",
    "Submodule",
    "TrustPickle",
    "Weights",
]
