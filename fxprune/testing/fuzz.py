"""Random-architecture fuzzer for the compiler's correctness contract.

Builds small random CNNs from block specs (conv-BN-act, residuals, concats,
splits and slices, squeeze-excite, channel shuffles, grouped and depthwise
convs, pooling, upsampling, spatial gates, flatten/view/pool heads), zeroes a
random share of their channels, compiles them with `fxprune.compile` and
checks the compact model against the zeroed reference (DESIGN.md,
"Correctness contract"): on the traced input, on a fresh input of the same
shape and, for fully convolutional models, on another resolution.

    python -m fxprune.testing.fuzz --graphs 2000 --seed 0 [--absorb exact|bias] [--verbose]

Every failure prints its seed; `--seed S --graphs 1 --verbose` reproduces it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxprune.analysis import analyse, get_analysis
from fxprune.compile import CompileOptions, compile_model, prunable_classes, zero_classes
from fxprune.testing.patterns import randomize_batchnorm, zero_random
from fxprune.trace import trace_model
from fxprune.verify import TOLERANCE, relative_error, run_model

# Rare features that hit open fxprune bugs: `--skip-known-bugs` (and the test
# suite) leave them out; delete an entry once its bug is fixed.
KNOWN_BUGS: dict[str, str] = {}  # none open; tests/test_fuzz.py keeps the fixed ones
ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu_": lambda: nn.ReLU(inplace=True),
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "none": nn.Identity,
}


def make_act(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


# -- blocks --------------------------------------------------------------------
# Each block is an nn.Module whose forward branches only on Python attributes
# fixed at construction, so torch.fx traces it; `describe()` is a one-liner.


class ConvBNAct(nn.Module):
    """conv, bn and act applied in `order` (e.g. "cba", "cab", "bac", "ca")."""

    def __init__(self, conv: nn.Conv2d, order: str, act: str) -> None:
        super().__init__()
        self.order, self.act_name = order, act
        self.conv = conv
        if "b" in order:
            before_conv = order.index("b") < order.index("c")
            self.bn = nn.BatchNorm2d(conv.in_channels if before_conv else conv.out_channels)
        self.act = make_act(act)

    def forward(self, x):
        for op in self.order:
            x = {"c": self.conv, "b": getattr(self, "bn", None), "a": self.act}[op](x)
        return x

    def describe(self) -> str:
        c = self.conv
        pad = c.padding if isinstance(c.padding, str) else c.padding[0]
        extra = f"g{c.groups}" if c.groups > 1 else ""
        extra += f"d{c.dilation[0]}" if c.dilation[0] > 1 else ""
        extra += "" if c.bias is None else "+b"
        extra += "" if c.padding_mode == "zeros" else f" {c.padding_mode}"
        return (
            f"{self.order}({c.in_channels}->{c.out_channels} k{c.kernel_size[0]} s{c.stride[0]} "
            f"p{pad}{extra} {self.act_name})"
        )


class Residual(nn.Module):
    def __init__(self, body: nn.Sequential, shortcut: nn.Module, combine: str, act: str) -> None:
        super().__init__()
        self.body, self.shortcut, self.combine, self.act_name = body, shortcut, combine, act
        self.act = make_act(act)

    def forward(self, x):
        y, s = self.body(x), self.shortcut(x)
        if self.combine == "add":
            out = y + s
        elif self.combine == "torch.add":
            out = torch.add(s, y)
        elif self.combine == "sub":
            out = s - y
        else:
            out = torch.maximum(y, s)
        return self.act(out)

    def describe(self) -> str:
        short = "id" if isinstance(self.shortcut, nn.Identity) else _describe(self.shortcut)
        body = ", ".join(b.describe() for b in self.body)
        return f"res[{self.combine} {self.act_name}]({body} | {short})"


class PoolProject(nn.Module):
    """ResNet-D shortcut: 2x2 average (ceil, padding-free count), 1x1 conv, BN."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.conv, self.bn = nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(self.pool(x)))

    def describe(self) -> str:
        return f"avgpool-proj({self.conv.in_channels}->{self.conv.out_channels})"


class LongSkip(nn.Module):
    """x (+ or cat) inner(x) around several blocks, resized back when they stride."""

    def __init__(self, inner: list[nn.Module], combine: str, resize: bool, project) -> None:
        super().__init__()
        self.inner = nn.ModuleList(inner)
        self.combine, self.resize, self.project = combine, resize, project

    def forward(self, x):
        y = x
        for block in self.inner:
            y = block(y)
        if self.resize:
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
        if self.project is not None:
            y = self.project(y)
        if self.combine == "add":
            return x + y
        return torch.cat([y, x], dim=1)

    def describe(self) -> str:
        inner = " -> ".join(_describe(b) for b in self.inner)
        proj = f" proj {_describe(self.project)}" if self.project is not None else ""
        return f"skip[{self.combine} resize={self.resize}{proj}]({inner})"


class Concat(nn.Module):
    def __init__(self, branches: list[nn.Module], with_input: bool, reverse: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.with_input, self.reverse = with_input, reverse

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.with_input:
            outs = [x] + outs
        if self.reverse:
            outs = outs[::-1]
        return torch.cat(outs, dim=1)

    def describe(self) -> str:
        parts = ", ".join(_describe(b) for b in self.branches)
        return f"cat[in={self.with_input} rev={self.reverse}]({parts})"


class SplitMerge(nn.Module):
    """Split the channels in two (split/chunk/slice/narrow), process, merge."""

    def __init__(self, mode: str, first: int, channels: int, left, right, merge: str) -> None:
        super().__init__()
        self.mode, self.first, self.channels, self.merge = mode, first, channels, merge
        self.left, self.right = left, right

    def forward(self, x):
        a, c = self.first, self.channels
        if self.mode == "chunk":
            x1, x2 = x.chunk(2, dim=1)
        elif self.mode == "torch.chunk":
            x1, x2 = torch.chunk(x, 2, 1)
        elif self.mode == "split":
            x1, x2 = x.split([a, c - a], dim=1)
        elif self.mode == "torch.split":
            x1, x2 = torch.split(x, a, dim=1)
        elif self.mode == "slice":
            x1, x2 = x[:, :a], x[:, a:]
        else:
            x1, x2 = x.narrow(1, 0, a), torch.narrow(x, 1, a, c - a)
        y1, y2 = self.left(x1), self.right(x2)
        if self.merge == "cat":
            return torch.cat([y1, y2], dim=1)
        if self.merge == "cat_rev":
            return torch.cat((y2, y1), 1)
        return y1 + y2

    def describe(self) -> str:
        return (
            f"split[{self.mode} {self.first}/{self.channels} {self.merge}]"
            f"({_describe(self.left)} | {_describe(self.right)})"
        )


class SqueezeExcite(nn.Module):
    def __init__(self, channels, hidden, pool: str, act: str, gate: str, expand=False) -> None:
        super().__init__()
        self.pool_kind, self.channels, self.act_name, self.expand = pool, channels, act, expand
        linear = pool.startswith("linear")
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden) if linear else nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Linear(hidden, channels) if linear else nn.Conv2d(hidden, channels, 1)
        self.act = make_act(act)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()

    def forward(self, x):
        if self.pool_kind == "module":
            s = self.avg(x)
        elif self.pool_kind == "functional":
            s = F.adaptive_avg_pool2d(x, 1)
        elif self.pool_kind == "mean":
            s = x.mean((2, 3), keepdim=True)
        elif self.pool_kind == "sum":
            s = x.sum((2, 3), keepdim=True) * 0.01
        else:
            s = torch.flatten(self.avg(x), 1) if self.pool_kind == "linear_view" else x.mean((2, 3))
        s = self.gate(self.fc2(self.act(self.fc1(s))))
        if self.pool_kind == "linear_view":
            s = s.view(s.size(0), self.channels, 1, 1)
        elif self.pool_kind == "linear_index":
            s = s[:, :, None, None]
        if self.expand:
            return s.expand_as(x) * x
        return x * s

    def describe(self) -> str:
        return f"se[{self.pool_kind} {self.channels}->{self.fc1.weight.shape[0]} {self.act_name}]"


class ChannelShuffle(nn.Module):
    """ShuffleNetV2's view/transpose/view, with computed or literal sizes."""

    def __init__(self, groups: int, style: str, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.groups, self.style, self.shape = groups, style, shape

    def forward(self, x):
        g, (c, h, w) = self.groups, self.shape
        if self.style == "size":
            b, c, h, w = x.size()
            x = x.view(b, g, c // g, h, w)
            x = torch.transpose(x, 1, 2).contiguous()
            return x.view(b, -1, h, w)
        n = x.size(0)
        if self.style == "literal":
            x = x.view(n, g, c // g, h, w).transpose(1, 2).contiguous()
            return x.view(n, c, h, w)
        x = x.reshape(n, g, c // g, x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)
        return x.reshape(n, c, x.size(3), x.size(4))

    def describe(self) -> str:
        return f"shuffle[g{self.groups} {self.style} c{self.shape[0]}]"


class Pool(nn.Module):
    def __init__(self, kind: str, k: int, s: int, p: int, include_pad: bool, **extra) -> None:
        super().__init__()
        self.kind, self.k, self.s, self.p, self.include_pad = kind, k, s, p, include_pad
        self.ceil, self.divisor = extra.get("ceil", False), extra.get("divisor")
        if kind == "max":
            self.pool = nn.MaxPool2d(k, s, p, ceil_mode=self.ceil)
        elif kind == "avg":
            self.pool = nn.AvgPool2d(k, s, p, self.ceil, include_pad, self.divisor)

    def forward(self, x):
        if self.kind == "F.max":
            return F.max_pool2d(x, self.k, self.s, self.p, ceil_mode=self.ceil)
        if self.kind == "F.avg":
            return F.avg_pool2d(
                x, self.k, self.s, padding=self.p, ceil_mode=self.ceil,
                count_include_pad=self.include_pad, divisor_override=self.divisor,
            )  # fmt: skip
        return self.pool(x)

    def describe(self) -> str:
        extra = " ceil" if self.ceil else ""
        extra += f" div={self.divisor}" if self.divisor else ""
        return f"pool[{self.kind} k{self.k} s{self.s} p{self.p} incl={self.include_pad}{extra}]"


class Upsample(nn.Module):
    def __init__(self, kind: str, mode: str) -> None:
        super().__init__()
        self.kind, self.mode = kind, mode
        self.up = nn.Upsample(scale_factor=2, mode=mode)

    def forward(self, x):
        if self.kind == "module":
            return self.up(x)
        return F.interpolate(x, scale_factor=2.0, mode=self.mode)

    def describe(self) -> str:
        return f"up[{self.kind} {self.mode}]"


class SpatialGate(nn.Module):
    """x (op) m with m an N×1×H×W map from a conv (or a channel mean: frozen)."""

    def __init__(self, channels: int, k: int, op: str, source: str) -> None:
        super().__init__()
        self.op, self.source, self.k = op, source, k
        self.conv = nn.Conv2d(channels, 1, k, padding=k // 2)

    def forward(self, x):
        if self.source == "conv":
            m = torch.sigmoid(self.conv(x))
        else:
            m = x.mean(1, keepdim=True)
        if self.op == "mul":
            return x * m
        if self.op == "add":
            return x + m
        return m * x - m

    def describe(self) -> str:
        return f"gate[{self.source} k{self.k} {self.op}]"


class ChannelSlice(nn.Module):
    def __init__(self, mode: str, start: int, stop: int, channels: int) -> None:
        super().__init__()
        self.mode, self.start, self.stop, self.channels = mode, start, stop, channels

    def forward(self, x):
        if self.mode == "slice":
            return x[:, self.start : self.stop]
        if self.mode == "negative":
            return x[:, self.start - self.channels :]
        if self.mode == "ellipsis":
            return x[:, self.start : self.stop, ...]
        if self.mode == "computed_slice":  # a bound computed from x.size(1) in the graph
            return x[:, : x.size(1) // 2]
        if self.mode == "ellipsis_slice":
            return x[..., self.start : self.stop, :, :]
        if self.mode == "narrow_negative_dim":
            return x.narrow(-3, self.start, self.stop - self.start)
        if self.mode == "narrow_kwargs":
            return torch.narrow(x, dim=1, start=self.start, length=self.stop - self.start)
        return x.narrow(1, self.start, self.stop - self.start)

    def describe(self) -> str:
        return f"slice[{self.mode} {self.start}:{self.stop} of {self.channels}]"


class Misc(nn.Module):
    """Scalar arithmetic, functional activations, duplicated and spatial concats,
    padding, in-place residuals, and ops the analysis must freeze (channel flips
    and rolls, GroupNorm, transposed convs, channels-last LayerNorm + Linear, a
    conv called twice)."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind, c = kind, channels
        if kind == "groupnorm":
            self.norm = nn.GroupNorm(1, c)
        elif kind == "deconv":
            self.conv = nn.ConvTranspose2d(c, c, 2, 2)
        elif kind == "channels_last":
            self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)
        elif kind in ("shared", "inplace_res"):
            self.conv, self.bn = nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c)
            self.bn2 = nn.BatchNorm2d(c, affine=kind == "inplace_res")

    def forward(self, x):
        k = self.kind
        if k == "scalar":
            return x * 0.5 + 0.25
        if k == "functional":
            return F.relu(-x) + torch.clamp(x, -1.0, 1.0)
        if k == "dupcat":
            return torch.cat([x, x], dim=1)
        if k == "spatial_cat":
            return torch.cat([x, F.relu(x)], dim=3)
        if k in ("pad", "pad_reflect"):
            return F.pad(x, (1, 1, 1, 1), mode="constant" if k == "pad" else "reflect")
        if k == "flip":
            return torch.flip(x, [1])
        if k == "roll":
            return torch.roll(x, 1, 1)
        if k == "deconv":
            return self.conv(x)
        if k == "channels_last":  # (N, C, H, W) -> (N, H, W, C) -> back
            return self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2).contiguous()
        if k == "shared":
            return self.bn2(self.conv(F.relu(self.bn(self.conv(x)))))
        if k == "inplace_res":
            y = self.bn(self.conv(x))
            y += x
            return self.bn2(F.relu(y, inplace=True))
        return self.norm(x)

    def describe(self) -> str:
        return f"misc[{self.kind}]"


FLAT_HEADS = ("flatten", "nn.flatten", "view", "view_literal", "view_batch")


class Head(nn.Module):
    """Classifier heads; "none" keeps the model fully convolutional."""

    def __init__(self, kind: str, shape: tuple[int, int, int], classes: int, hidden: int) -> None:
        super().__init__()
        self.kind, self.shape = kind, shape
        c, h, w = shape
        features = c * h * w if kind in FLAT_HEADS else c
        if kind in ("conv", "pair"):
            self.out = nn.Conv2d(c, classes, 1)
        elif kind == "mlp_bn":
            self.fc1 = nn.Linear(c, hidden, bias=hidden % 2 == 0)
            self.bn = nn.BatchNorm1d(hidden)
            self.out = nn.Linear(hidden, classes)
        elif kind != "none":
            self.out = nn.Linear(features, classes)
        self.flat = nn.Flatten()
        self.avg = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        k = self.kind
        if k == "none":
            return x
        if k == "conv":
            return self.out(x)
        if k == "pair":  # two outputs: a 1x1 conv and the features themselves
            return self.out(x), x
        if k == "flatten":
            return self.out(torch.flatten(x, 1))
        if k == "nn.flatten":
            return self.out(self.flat(x))
        if k == "view":
            return self.out(x.view(x.size(0), -1))
        if k == "view_literal":
            return self.out(x.reshape(x.size(0), self.shape[0] * self.shape[1] * self.shape[2]))
        if k == "view_batch":
            return self.out(x.view(-1, self.shape[0] * self.shape[1] * self.shape[2]))
        if k == "mean":
            return self.out(torch.mean(x, (2, 3)))
        if k == "sum":
            return self.out(torch.flatten(x.sum((2, 3), keepdim=True), 1) * 0.01)
        x = self.flat(self.avg(x))
        if k == "mlp_bn":
            return self.out(F.relu(self.bn(self.fc1(x))))
        return self.out(x)

    def describe(self) -> str:
        return f"head[{self.kind}]"


def _describe(m: nn.Module) -> str:
    return m.describe() if hasattr(m, "describe") else type(m).__name__


class RandomNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], head: Head, fixed_size: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.fixed_size = fixed_size

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def describe(self) -> str:
        return " -> ".join(_describe(b) for b in [*self.blocks, self.head])


# -- random construction -----------------------------------------------------


@dataclass
class Builder:
    """Draws blocks for the current activation shape (C, H, W)."""

    rng: random.Random
    shape: tuple[int, int, int]
    skip: frozenset[str] = frozenset()
    fixed_size: bool = False

    def allows(self, feature: str, p: float) -> bool:
        """Draw a rare feature; the draw happens even when it is skipped, so a
        seed builds the same model, but for the skipped feature, whatever `skip` holds."""
        return self.rng.random() < p and feature not in self.skip

    def width(self) -> int:
        return self.rng.randint(2, 16)

    def out_shape(self, block: nn.Module) -> tuple[int, int, int]:
        block.eval()
        with torch.no_grad():
            return tuple(block(torch.zeros(1, *self.shape)).shape[1:])

    def conv(self, cin: int, cout: int, *, keep: bool, stride: int = 1, groups: str = "any"):
        """A random Conv2d; `keep` makes the output size depend only on the stride."""
        r = self.rng
        k = r.choice([1, 3, 3, 5])
        d = 2 if k > 1 and r.random() < 0.15 and min(self.shape[1:]) >= 6 else 1
        even_same = self.allows("even_same", 0.02) and stride == 1
        even_k = r.choice([2, 4])
        g = 1
        if groups == "any" and r.random() < 0.3:
            options = [x for x in (2, 4) if cin % x == 0 and cin >= x] + ["dw"]
            choice = r.choice(options)
            if choice == "dw":
                g, cout = cin, cin
            else:
                g, cout = choice, max(choice, cout - cout % choice)
        if keep or r.random() < 0.5:
            padding = "same" if stride == 1 and r.random() < 0.25 else d * (k - 1) // 2
        else:
            padding = r.choice([0, 1, 2])
            if min(self.shape[1:]) + 2 * padding - d * (k - 1) < 1:
                padding = d * (k - 1) // 2
        bias = r.random() < 0.4
        if even_same:
            k, d, padding = even_k, 1, "same"
        mode = "zeros"
        if padding not in (0, "same") and min(self.shape[1:]) > 4 and r.random() < 0.05:
            mode = r.choice(["reflect", "replicate", "circular"])  # frozen by the analysis
        return nn.Conv2d(cin, cout, k, stride, padding, d, g, bias, padding_mode=mode)

    def conv_block(self, cin: int, cout: int, *, keep: bool, stride: int = 1, groups="any"):
        r = self.rng
        order = r.choice(["cba"] * 6 + ["cab", "ca", "cb", "c", "bac", "cba"])
        act = r.choice(list(ACTIVATIONS))
        return ConvBNAct(self.conv(cin, cout, keep=keep, stride=stride, groups=groups), order, act)

    def stride(self) -> int:
        return 2 if min(self.shape[1:]) >= 6 and self.rng.random() < 0.25 else 1

    # each maker returns a block for input shape self.shape
    def make_conv(self):
        return self.conv_block(self.shape[0], self.width(), keep=False, stride=self.stride())

    def make_residual(self):
        r, c = self.rng, self.shape[0]
        stride = self.stride()
        cout = c if r.random() < 0.5 and stride == 1 else self.width()
        if r.random() < 0.3:  # MobileNetV2 inverted residual
            hidden = self.width()
            body = [
                self.conv_block(c, hidden, keep=True, groups="none"),
                ConvBNAct(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden), "cba", "relu6"),
                self.conv_block(hidden, cout, keep=True, groups="none"),
            ]
        else:
            depth = r.choice([1, 2])
            body = [self.conv_block(c, cout, keep=True, stride=stride, groups="none")]
            body += [self.conv_block(cout, cout, keep=True) for _ in range(depth - 1)]
        if r.random() < 0.25:
            body.append(SqueezeExcite(cout, max(1, cout // 2), "module", "relu", "sigmoid"))
        if cout == c and stride == 1 and r.random() < 0.7:
            shortcut = nn.Identity()
        elif stride == 2 and r.random() < 0.3:  # ResNet-D: average, then project
            shortcut = PoolProject(c, cout)
        else:
            conv = nn.Conv2d(c, cout, 1, stride, 0, bias=r.random() < 0.3)
            shortcut = ConvBNAct(conv, r.choice(["cb", "c"]), "none")
        combine = r.choice(["add", "add", "torch.add", "sub", "max"])
        return Residual(nn.Sequential(*body), shortcut, combine, r.choice(["relu", "none", "silu"]))

    def sequence(self, count: int, makers: dict[str, int]) -> list[nn.Module]:
        """`count` random blocks, advancing self.shape through them."""
        blocks = []
        for _ in range(count):
            kind = self.rng.choices(list(makers), weights=list(makers.values()))[0]
            block = getattr(self, f"make_{kind}")()
            self.shape = self.out_shape(block)
            blocks.append(block)
        return blocks

    def make_skip(self):
        r, start = self.rng, self.shape
        inner = self.sequence(r.randint(1, 3), INNER_MAKERS)
        end, self.shape = self.shape, start
        combine = r.choice(["add", "cat"])
        project = None
        if combine == "add" and end[0] != start[0]:
            project = ConvBNAct(nn.Conv2d(end[0], start[0], 1, bias=False), "cb", "none")
        return LongSkip(inner, combine, end[1:] != start[1:], project)

    def make_concat(self):
        r, c = self.rng, self.shape[0]
        branches: list[nn.Module] = []
        for _ in range(r.choice([1, 2, 2, 3])):
            if r.random() < 0.2:
                branches.append(Pool("max", 3, 1, 1, True))
            else:
                branches.append(self.conv_block(c, self.width(), keep=True))
        with_input = r.random() < 0.4 or all(isinstance(b, Pool) for b in branches)
        return Concat(branches, with_input, r.random() < 0.3)

    def make_split(self):
        r, c = self.rng, self.shape[0]
        if c < 2:
            return self.make_conv()
        mode = r.choice(["chunk", "torch.chunk", "split", "torch.split", "slice", "narrow"])
        first = (c + 1) // 2 if "chunk" in mode else r.randint(1, c - 1)
        if mode == "torch.split":
            first = c // 2 if c % 2 == 0 else first
            mode = mode if c % 2 == 0 else "split"
        merge = r.choice(["cat", "cat_rev", "add"])
        second = c - first
        if merge == "add":
            out = self.width()
            left = self.conv_block(first, out, keep=True, groups="none")
            right = self.conv_block(second, out, keep=True, groups="none")
        else:
            left = nn.Identity() if r.random() < 0.6 else self.conv_block(first, first, keep=True)
            right = self.conv_block(second, self.width(), keep=True)
        return SplitMerge(mode, first, c, left, right, merge)

    def make_se(self):
        r, c = self.rng, self.shape[0]
        pool = r.choice(["module", "functional", "mean", "sum", "linear_view", "linear_index"])
        if pool == "sum" and "sum_pool" in self.skip:
            pool = "mean"
        gate, act = r.choice(["sigmoid", "hardsigmoid"]), r.choice(["relu", "silu"])
        return SqueezeExcite(c, r.randint(1, c), pool, act, gate, r.random() < 0.2)

    def make_shuffle(self):
        r, c = self.rng, self.shape[0]
        divisors = [g for g in (2, 3, 4) if c % g == 0]
        if not divisors:
            return self.make_conv()
        style = r.choice(["size", "literal", "reshape"])
        self.fixed_size |= style == "literal"
        return ChannelShuffle(r.choice(divisors), style, self.shape)

    def make_grouped(self):
        r, c = self.rng, self.shape[0]
        g = r.choice([x for x in (2, 4) if c % x == 0] or [1])
        if g == 1:
            return self.make_conv()
        cout = g * r.randint(1, max(1, 16 // g))
        conv = nn.Conv2d(c, cout, r.choice([1, 3]), 1, r.choice([0, 1]), groups=g, bias=True)
        if min(self.shape[1:]) < 3:
            conv.padding = (1, 1)
        return ConvBNAct(conv, r.choice(["cba", "cab", "ca"]), r.choice(list(ACTIVATIONS)))

    def make_pool(self):
        r = self.rng
        if min(self.shape[1:]) < 4:
            return self.make_conv()
        kind = r.choice(["max", "F.max", "avg", "F.avg"])
        k = r.choice([2, 3])
        ceil = r.random() < 0.2
        divisor = r.choice([k * k, 5]) if self.allows("divisor_override", 0.15) else None
        divisor = divisor if "avg" in kind else None
        s, p = r.choice([1, 2]), r.choice([0, k // 2])
        return Pool(kind, k, s, p, r.random() < 0.5, ceil=ceil, divisor=divisor)

    def make_upsample(self):
        r = self.rng
        if max(self.shape[1:]) > 10:
            return self.make_pool()
        return Upsample(r.choice(["module", "functional"]), r.choice(["nearest", "bilinear"]))

    def make_gate(self):
        r = self.rng
        source = "conv" if r.random() < 0.85 else "mean"
        return SpatialGate(self.shape[0], r.choice([1, 3]), r.choice(["mul", "add", "sub"]), source)

    def make_slice(self):
        r, c = self.rng, self.shape[0]
        if c < 3:
            return self.make_conv()
        start = r.randint(0, c - 2)
        stop = r.randint(start + 1, c)
        mode = r.choice(["slice", "negative", "ellipsis", "narrow"])
        for rare in ("ellipsis_slice", "narrow_negative_dim", "narrow_kwargs"):
            mode = rare if self.allows(rare, 0.1) else mode
        if self.allows("computed_slice", 0.1):
            mode, start, stop = "computed_slice", 0, c // 2
        if mode == "negative":
            stop = c
        return ChannelSlice(mode, start, stop, c)

    def make_misc(self):
        kinds = {
            "scalar": 3, "functional": 3, "dupcat": 2, "spatial_cat": 1, "pad": 1,
            "pad_reflect": 1, "flip": 1, "roll": 1, "groupnorm": 1, "deconv": 1,
            "channels_last": 1, "shared": 1, "inplace_res": 2,
        }  # fmt: skip
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        c, h, w = self.shape
        if (kind == "dupcat" and c > 8) or (kind in ("deconv", "spatial_cat") and max(h, w) > 10):
            kind = "scalar"
        return Misc(kind, c)

    def make_head(self) -> Head:
        r = self.rng
        kind = r.choice(["none", "conv", "pair", "gap", "mean", "mlp_bn", "sum", *FLAT_HEADS])
        if kind in FLAT_HEADS and np.prod(self.shape) > 2048:
            kind = "gap"
        if kind == "sum" and "sum_pool" in self.skip:
            kind = "mean"
        self.fixed_size |= kind in FLAT_HEADS
        return Head(kind, self.shape, r.randint(2, 10), self.width())


MAKERS = {
    "conv": 6,
    "residual": 5,
    "concat": 3,
    "split": 3,
    "se": 2,
    "shuffle": 2,
    "grouped": 2,
    "pool": 2,
    "upsample": 1,
    "gate": 2,
    "slice": 2,
    "misc": 1,
    "skip": 2,
}


INNER_MAKERS = {"conv": 4, "residual": 3, "concat": 2, "split": 2, "se": 1, "shuffle": 1}


def random_model(seed: int, skip=frozenset()) -> tuple[nn.Module, tuple[int, ...]]:
    """A random small CNN and the input shape it was built for; `skip` names
    rare features (see KNOWN_BUGS) not to use."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    n, c = rng.randint(1, 2), rng.randint(3, 8)
    h, w = rng.randint(8, 16), rng.randint(8, 16)
    builder = Builder(rng, (c, h, w), frozenset(skip))
    blocks = [builder.make_conv()]  # a stem, so the model input's frozen ids end here
    builder.shape = builder.out_shape(blocks[0])
    blocks += builder.sequence(rng.randint(1, 6), MAKERS)
    head = builder.make_head()
    return RandomNet(blocks, head, builder.fixed_size), (n, c, h, w)


# -- sparsification ------------------------------------------------------------


def perturb_batchnorm(model: nn.Module, rng: np.random.Generator) -> None:
    """Larger, signed BN shifts so absorbed constants are visible in the output."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.bias.mul_(float(rng.choice([1.0, 5.0, 10.0])))


def zero_channels(gm, rng: np.random.Generator, seed: int) -> str:
    """zero_random plus whole groups, zero conv rows/columns and all-zero layers."""
    fraction = float(rng.choice([0.0, 1.0, rng.random(), rng.random(), rng.random()]))
    zero_random(gm, fraction, seed)
    steps = [f"fraction {fraction:.2f}"]
    for group in get_analysis(gm).groups:
        classes = prunable_classes(group)
        if len(classes) and rng.random() < 0.15:
            zero_classes(gm, group, classes, producers=True)
            steps.append(f"group {group.index}")
    for name, m in gm.named_modules():
        with torch.no_grad():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and rng.random() < 0.2:
                rows = rng.random(m.weight.shape[0]) < 0.5
                m.weight[torch.as_tensor(rows)] = 0
                if m.bias is not None and rng.random() < 0.5:
                    m.bias[torch.as_tensor(rows)] = 0
                steps.append(f"rows {name}")
            if isinstance(m, (nn.Conv2d, nn.Linear)) and rng.random() < 0.15:
                cols = rng.random(m.weight.shape[1]) < 0.5
                m.weight[:, torch.as_tensor(cols)] = 0
                steps.append(f"cols {name}")
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and rng.random() < 0.1:
                m.weight.zero_()
                if rng.random() < 0.5:
                    m.bias.zero_()
                steps.append(f"layer {name}")
    return ", ".join(steps)


# -- checking ------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    status: str = "ok"  # ok | mismatch | error
    reason: str = ""
    removed: int = 0
    total: int = 0
    params_before: int = 0
    params_after: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def shrank(self) -> bool:
        return self.params_after < self.params_before


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _inputs(shape, fixed: bool, seed: int, example: torch.Tensor):
    gen = torch.Generator().manual_seed(seed + 1)
    yield "traced", example
    yield "fresh", torch.randn(shape, generator=gen)
    if not fixed:
        n, c, h, w = shape
        yield "resized", torch.randn((n + 1, c, h + 3, w + 5), generator=gen)


def check_seed(seed: int, absorb: str = "exact", skip=frozenset()) -> Outcome:
    """Build, zero, compile and compare one random model."""
    out = Outcome(seed)
    torch.manual_seed(seed)
    model, shape = random_model(seed, skip)
    rng = np.random.default_rng(seed)
    randomize_batchnorm(model, seed)
    perturb_batchnorm(model, rng)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    out.log.append(f"input {shape}: {model.describe()}")
    try:
        tr = trace_model(model, example)
        analysis = analyse(tr.gm)
    except Exception as exc:
        return _fail(out, "error", f"trace/analyse: {type(exc).__name__}: {_line(exc)}")
    out.log.append(f"analysis: {analysis.summary()}")
    out.log.append(f"zeroed: {zero_channels(tr.gm, rng, seed)}")
    before = _state(tr.gm)
    try:
        res = compile_model(tr, CompileOptions(absorb=absorb))
    except Exception as exc:
        return _fail(out, "error", f"compile: {type(exc).__name__}: {_line(exc)}")
    out.removed, out.total = res.removed_classes, res.total_classes
    out.params_before, out.params_after = count_params(tr.gm), count_params(res.gm)
    out.log += [f"removed {out.removed}/{out.total} classes"] + [f"note: {n}" for n in res.notes]
    if any(not torch.equal(v, tr.gm.state_dict()[k]) for k, v in before.items()):
        return _fail(out, "error", "compile mutated the input model")
    return _compare(out, tr.gm, res.gm, shape, model.fixed_size, seed, example)


def _compare(out: Outcome, ref, small, shape, fixed, seed, example) -> Outcome:
    for name, x in _inputs(shape, fixed, seed, example):
        try:
            expected = run_model(ref, x)
        except Exception as exc:
            if name == "traced":  # a fuzzer bug, not an fxprune one
                return _fail(out, "error", f"fuzzer: reference fails: {_line(exc)}")
            continue  # the reference does not run at this size
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # fx prints the traceback
                err = relative_error(expected, run_model(small, x))
        except Exception as exc:
            return _fail(out, "error", f"run {name}: {type(exc).__name__}: {_line(exc)}")
        out.log.append(f"{name} {tuple(x.shape)}: relative error {err:.2e}")
        if not err <= TOLERANCE:
            return _fail(out, "mismatch", f"{name} input {tuple(x.shape)}: rel err {err:.3g}")
    return out


def _fail(out: Outcome, status: str, reason: str) -> Outcome:
    out.status, out.reason = status, reason
    return out


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


@dataclass
class Summary:
    outcomes: list[Outcome]
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def shrank(self) -> int:
        return sum(o.shrank for o in self.outcomes if o.status == "ok")

    def line(self) -> str:
        compiled = [o for o in self.outcomes if o.total]
        removed = np.mean([o.removed for o in compiled]) if compiled else 0.0
        share = np.mean([o.removed / o.total for o in compiled]) if compiled else 0.0
        return (
            f"graphs {len(self.outcomes)}, mismatches {self.count('mismatch')}, "
            f"errors {self.count('error')}, compiled-smaller {self.shrank}, "
            f"mean removed channels {removed:.1f} ({share:.0%} of classes), "
            f"{self.seconds:.1f}s"
        )


def run_fuzz(seeds, absorb="exact", skip=frozenset(), verbose=False, echo=None) -> Summary:
    """Check every seed; `echo` (e.g. print) gets failures, or everything when verbose."""
    start = time.perf_counter()
    outcomes = []
    for seed in seeds:
        o = check_seed(seed, absorb, skip)
        outcomes.append(o)
        if echo and (verbose or o.status != "ok"):
            if verbose:
                echo("\n".join(o.log))
            echo(f"seed {o.seed}: {o.status.upper()} {o.reason}".rstrip())
    return Summary(outcomes, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=100, help="number of random models")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--absorb", choices=["exact", "bias"], default="exact")
    parser.add_argument("--verbose", action="store_true", help="print every model and result")
    parser.add_argument(
        "--skip-known-bugs", action="store_true", help="leave out the features in KNOWN_BUGS"
    )
    args = parser.parse_args(argv)
    # torch notes that an even kernel with padding="same" copies the input: expected here
    warnings.filterwarnings("ignore", message="Using padding='same' with even kernel")
    torch.set_num_threads(1)
    seeds = range(args.seed, args.seed + args.graphs)
    skip = frozenset(KNOWN_BUGS) if args.skip_known_bugs else frozenset()
    summary = run_fuzz(seeds, args.absorb, skip, args.verbose, echo=print)
    print(summary.line())
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ACTIVATIONS",
    "Builder",
    "ChannelShuffle",
    "ChannelSlice",
    "Concat",
    "ConvBNAct",
    "FLAT_HEADS",
    "Head",
    "INNER_MAKERS",
    "KNOWN_BUGS",
    "LongSkip",
    "MAKERS",
    "Misc",
    "Outcome",
    "Pool",
    "PoolProject",
    "RandomNet",
    "Residual",
    "SpatialGate",
    "SplitMerge",
    "SqueezeExcite",
    "Summary",
    "Upsample",
    "check_seed",
    "count_params",
    "main",
    "make_act",
    "perturb_batchnorm",
    "random_model",
    "run_fuzz",
    "zero_channels",
]
