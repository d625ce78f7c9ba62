"""fxprune: channel pruning as a torch.fx compiler pass.

Implements Ye et al., "Rethinking the Smaller-Norm-Less-Informative Assumption
in Channel Pruning of Convolution Layers" (ICLR 2018): trace, analyse channel
groups, ISTA-train BatchNorm scales to exact zeros, compile the dead channels
away exactly, and export a verified TorchScript artifact.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fxprune.errors import FxpruneError  # noqa: E402

__all__ = ["FxpruneError", "__version__"]
