"""fxprune: channel pruning as a torch.fx compiler pass.

Implements Ye et al., "Rethinking the Smaller-Norm-Less-Informative Assumption
in Channel Pruning of Convolution Layers" (ICLR 2018): trace, analyse channel
groups, ISTA-train BatchNorm scales to exact zeros, compile the dead channels
away exactly, and export a verified TorchScript artifact.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fxprune.errors import FxpruneError  # noqa: E402

# The user-facing library calls, loaded on first use (importing fxprune stays cheap).
_LAZY = {
    "prune_": "fxprune.compile.in_place",
    "PruneReport": "fxprune.compile.in_place",
    "ista_for": "fxprune.train.in_loop",
    "Ista": "fxprune.train.in_loop",
    "IstaOptimizer": "fxprune.train.ista",
    "Monitor": "fxprune.train.ista",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


__all__ = [
    "FxpruneError",
    "Ista",
    "IstaOptimizer",
    "Monitor",
    "PruneReport",
    "__version__",
    "ista_for",
    "prune_",
]
