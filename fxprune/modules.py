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

    The term depends only on the input's spatial size, so it is computed once
    for `size` (the compiler passes the traced input's size) and kept in a
    buffer that is not part of the state_dict: an input of that size, dtype and
    device reads the buffer, any other input (and `torch.jit.trace`, which would
    freeze the choice) computes the term. Loading a state_dict recomputes it;
    `with_kernel` makes a term with another kernel (never assign `kernel`).
    """

    def __init__(self, kernel: torch.Tensor, stride, pad, dilation, size=None) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel)
        self.stride = [int(s) for s in stride]
        self.pad = [int(p) for p in pad]
        self.dilation = [int(d) for d in dilation]
        self.size = [int(s) for s in size] if size is not None else []
        self.register_buffer("cached", torch.zeros(0, dtype=kernel.dtype), persistent=False)
        self.refresh()

    def with_kernel(self, kernel: torch.Tensor) -> BorderTerm:
        """The same term with another kernel (sliced rows, a folded BN's scale)."""
        return BorderTerm(kernel, self.stride, self.pad, self.dilation, self.size or None)

    def refresh(self) -> None:
        """Recompute the cached term from the current kernel."""
        if self.size:
            with torch.no_grad():
                cached = self.term(self.size, self.kernel.dtype, self.kernel.device)
            self.cached = cached
        else:
            self.cached = torch.zeros(0, dtype=self.kernel.dtype, device=self.kernel.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh()  # the kernel may have changed

    def term(self, size: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(1, out, *spatial out) for an input of spatial size `size`."""
        ones = torch.ones([1, 1] + size, dtype=dtype, device=device)
        ones = F.pad(ones, self.pad)
        if self.kernel.dim() == 3:
            return F.conv1d(ones, self.kernel, None, self.stride, 0, self.dilation)
        if self.kernel.dim() == 4:
            return F.conv2d(ones, self.kernel, None, self.stride, 0, self.dilation)
        return F.conv3d(ones, self.kernel, None, self.stride, 0, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = list(x.shape[2:])
        if (
            not torch.jit.is_tracing()  # first: a traced size comparison warns
            and size == self.size
            and self.cached.dtype == x.dtype
            and self.cached.device == x.device
        ):
            return self.cached
        return self.term(size, x.dtype, x.device)


# TorchScript cannot read string annotations (this file's `from __future__ import
# annotations`) and cannot infer the type of an empty list: say it with a type
BorderTerm.__annotations__["size"] = list[int]


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
