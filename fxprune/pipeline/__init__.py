"""The front door as a library call: load → trace → analyse → zero → compile →
verify → export → report. Every CLI command, the demo and the benchmarks go
through these functions; nothing here prints or exits.

- `stages`: `load_model` (the one loader of every command: checkpoints are data,
  their compile steps are replayed, nothing read from a file runs),
  `open_source` / `open_module` (load → trace → analyse), `compile_analysed`
  (zero → compile → verify against the original, NaN-aware), `artifact_metadata`
  (the one `fxprune.json` schema) and `export_model` (write and verify an
  artifact in any of `EXPORT_FORMATS`).
- `commands`: `compile_source` and `prune_source`, the whole `fxprune compile`
  and `fxprune prune` commands as one call each.
"""

from fxprune.pipeline.commands import (
    CompileConfig,
    CompileOutcome,
    PruneConfig,
    compile_source,
    compiled_architecture,
    emitted_weights_path,
    prune_source,
)
from fxprune.pipeline.stages import (
    EXPORT_FORMATS,
    Analysed,
    Compiled,
    Progress,
    artifact_metadata,
    compile_analysed,
    export_model,
    export_source,
    load_model,
    loaded_module,
    open_module,
    open_source,
    zero_channels,
)

__all__ = [
    "Analysed",
    "CompileConfig",
    "CompileOutcome",
    "Compiled",
    "EXPORT_FORMATS",
    "Progress",
    "PruneConfig",
    "artifact_metadata",
    "compiled_architecture",
    "compile_analysed",
    "compile_source",
    "emitted_weights_path",
    "export_model",
    "export_source",
    "load_model",
    "loaded_module",
    "open_module",
    "open_source",
    "prune_source",
    "zero_channels",
]
