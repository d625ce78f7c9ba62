"""Modules the compiler emits into compact models.

They live below every stage so that the analysis can recognise them when a
compiled model is traced again (A → B → C), and TorchScript can script them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BorderTerm(nn.Module):
    """What removed constant input channels contributed to a zero-padded conv.

    Σ_c v_c · conv(ones, W[:, c]) = conv(ones, K), K = Σ_c v_c·W[:, c:c+1]:
    exact at the borders too, where the paper's bias fold is not. Computed on
    a 1×1×H×W ones tensor, zero-padded by `pad` (F.pad order, asymmetric for
    an even kernel with padding="same"), and broadcast over the batch.
    """

    def __init__(self, kernel: torch.Tensor, stride, pad, dilation) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel)
        self.stride = [int(s) for s in stride]
        self.pad = [int(p) for p in pad]
        self.dilation = [int(d) for d in dilation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
        ones = F.pad(ones, self.pad)
        if self.kernel.dim() == 3:
            return F.conv1d(ones, self.kernel, None, self.stride, 0, self.dilation)
        if self.kernel.dim() == 4:
            return F.conv2d(ones, self.kernel, None, self.stride, 0, self.dilation)
        return F.conv3d(ones, self.kernel, None, self.stride, 0, self.dilation)


class ConvWithBorder(nn.Module):
    """A user's conv, pruned in place, plus the border term of the constant input
    channels it no longer reads (`fxprune.prune_(..., border="wrap")`). The conv
    keeps its own class; this wrapper takes its place in the parent module."""

    def __init__(self, conv: nn.Module, border: BorderTerm) -> None:
        super().__init__()
        self.conv = conv
        self.border = border

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.border(x)


__all__ = ["BorderTerm", "ConvWithBorder"]
