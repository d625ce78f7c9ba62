"""Does a pruned model still depend on its input?

Zeroing every channel of a group that the whole signal passes through (a ResNet's
residual stream, a plain CNN's last conv) leaves a model that answers every input
with the same output. The compiler computes that constant exactly, so the equality
check passes; this check is what notices. A model's dependence on its input is
measured on two random inputs: `dependence = relative_error(f(x1), f(x2))`, per
output tensor. An output that depended on the input before (dependence > 10 ×
CONSTANT_TOLERANCE) and no longer does (≤ CONSTANT_TOLERANCE) is refused, and so
is a model none of whose outputs depends on its input any more (whatever it did
before: a trained model whose exact zeros cut the input off compiles to that).
The one line names the first layer whose output stopped depending on the input,
and its channel group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis import get_analysis
from fxprune.errors import VerificationError
from fxprune.verify import TOLERANCE, flatten_outputs, relative_error, run_model

__all__ = ["ConstantOutputError", "check_input_dependence", "dependence", "probe_input"]

CONSTANT_TOLERANCE = TOLERANCE  # an output moving less than this (relative) is constant
VARYING_FACTOR = 10  # the original must move 10× more for the check to apply


class ConstantOutputError(VerificationError):
    """The compiled model's output no longer depends on its input."""


def probe_input(example: torch.Tensor, seed: int) -> torch.Tensor:
    """A second random input of the example's shape, independent of the example."""
    generator = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(example.shape, generator=generator, dtype=example.dtype)


def dependence(outputs_a: Any, outputs_b: Any) -> list[float]:
    """Per output tensor: how far the outputs for two inputs are apart (relative)."""
    pairs = zip(flatten_outputs(outputs_a), flatten_outputs(outputs_b), strict=True)
    return [relative_error(a, b) for a, b in pairs]


def check_input_dependence(
    original: Sequence[float] | Callable[[], Sequence[float]],
    compiled: nn.Module,
    zeroed: fx.GraphModule,
    inputs: tuple[torch.Tensor, torch.Tensor],
    outputs: tuple[Any, Any] | None = None,
) -> None:
    """Raise ConstantOutputError if an output that depended on the input (`original`,
    from `dependence` on the unzeroed model) is constant in `compiled`, or if every
    output of `compiled` is. `zeroed` is the analysed, zeroed graph the compiler
    read: it is searched for the culprit. `original` may be a function that
    computes it: it is called only when some output of `compiled` is constant.
    `outputs`: `compiled`'s outputs on `inputs`, when they are already known."""
    now = dependence(*(outputs or [run_model(compiled, x) for x in inputs]))
    constant = [not after > CONSTANT_TOLERANCE for after in now]
    if not any(constant):
        return
    original = original() if callable(original) else original
    lost = [
        i
        for i, before in enumerate(original)
        if constant[i] and (before > VARYING_FACTOR * CONSTANT_TOLERANCE or all(constant))
    ]
    if not lost:
        return
    which = "output" if len(now) == 1 else f"output {lost[0]} of {len(now)}"
    raise ConstantOutputError(
        f"the pruned model's {which} no longer depends on its input "
        f"(moves {now[lost[0]]:.1e} between random inputs, {original[lost[0]]:.1e} before): "
        f"{describe_culprit(zeroed, inputs)}; nothing was written — prune less "
        "(lower --sparsity/--threshold, keep the --min-keep floor) or pass --allow-constant"
    )


def describe_culprit(gm: fx.GraphModule, inputs: tuple[torch.Tensor, torch.Tensor]) -> str:
    """Name the first node (graph order) whose tensor output is the same for both
    inputs while a tensor it reads differs, with the channel group it belongs to."""
    first, second = (_node_values(gm, x) for x in inputs)

    def varies(node: fx.Node) -> bool:
        a, b = first.get(node.name), second.get(node.name)
        return a is not None and b is not None and relative_error(a, b) > CONSTANT_TOLERANCE

    for node in gm.graph.nodes:
        if node.name not in first or node.op in ("placeholder", "output") or varies(node):
            continue
        if any(varies(arg) for arg in node.all_input_nodes):
            return f"{_node_label(node)} outputs a constant{_group_label(gm, node)}"
    return "no single layer found (the input's influence fades gradually)"


def _node_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor a node produces for input `x`, copied (in-place ops follow)."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                values[n.name] = result.detach().clone()
            return result

    gm.eval()
    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def _node_label(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"layer {node.target}"
    return f"{getattr(node.target, '__name__', node.target)} ({node.name})"


def _group_label(gm: fx.GraphModule, node: fx.Node) -> str:
    ids = node.meta.get("channels")
    try:
        analysis = get_analysis(gm)
    except KeyError:
        return ""
    if ids is None:
        return ""
    groups = sorted({int(analysis.group_of_class[analysis.class_of[i]]) for i in ids.reshape(-1)})
    if len(groups) != 1 or groups[0] < 0:
        return ""
    group = analysis.groups[groups[0]]
    sites = ", ".join(s.module for s in group.bn_sites[:3])
    more = f" +{len(group.bn_sites) - 3}" if len(group.bn_sites) > 3 else ""
    return f" (channel group {group.index}: {group.width} channels, BN {sites}{more})"
