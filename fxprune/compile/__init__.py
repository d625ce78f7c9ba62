"""Stage 5, compile: constant propagation and dead-channel elimination on an
analysed graph, producing a compact GraphModule that computes the same function.

`liveness` (which channels are constant or dead), `removal` (which classes go),
`rewrite` (slice modules, fold constants), `literal_args` (fix literal sizes),
`dce` (side-effect-aware dead code), `zeroing` (thresholds and sparsity that
make channels zero before compiling), `plan` (a compile's structural decisions
as data, replayed to rebuild a checkpoint), `compiler` (the pass itself).
"""

from fxprune.compile.compiler import ABSORB_MODES, CompileOptions, CompileResult, compile_model
from fxprune.compile.dependence import ConstantOutputError, check_input_dependence, dependence
from fxprune.compile.plan import ChannelPlan
from fxprune.compile.replay import replay_steps
from fxprune.compile.zeroing import (
    DEFAULT_MIN_KEEP,
    apply_sparsity,
    apply_threshold,
    prunable_classes,
    zero_classes,
)

__all__ = [
    "ABSORB_MODES",
    "DEFAULT_MIN_KEEP",
    "ChannelPlan",
    "ConstantOutputError",
    "CompileOptions",
    "CompileResult",
    "apply_sparsity",
    "apply_threshold",
    "check_input_dependence",
    "compile_model",
    "dependence",
    "prunable_classes",
    "replay_steps",
    "zero_classes",
]
