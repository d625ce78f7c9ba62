"""Deployment fusions on a compact model: fold every eval-mode BatchNorm into the
conv or Linear that feeds it, including through an exact border term.

BN(y) = s·y + t with s = γ/√(var+ε), t = β − s·μ. For y = conv(x) the fold is
the usual one (`torch.nn.utils.fusion`). For y = conv(x) + border(x) — the
compiler's exact absorption at padded borders — the conv takes s and t and the
border kernel is scaled by s, so the sum is still exact. A BN that is read by
anything else, a module called from more than one place, or a training-mode BN
is left as it is.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fxprune.analysis.vocabulary import is_batchnorm
from fxprune.compile.dce import eliminate_dead_code
from fxprune.compile.rewrite import fresh_copy, replace_module
from fxprune.modules import BorderTerm


def fuse_for_deployment(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of `gm` with BatchNorms folded into their producers; returns the
    copy and one note per fold. The input is never mutated."""
    gm = copy.deepcopy(gm).eval()
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    notes: list[str] = []
    for node in list(gm.graph.nodes):
        if _foldable_bn(gm, node, calls):
            folded = _fold(gm, node, calls)
            if folded:
                notes.append(f"{node.target} folded into {folded}")
    gm.graph.lint()
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, notes


def _foldable_bn(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]) -> bool:
    if node.op != "call_module" or calls[node.target] != 1 or len(node.args) != 1:
        return False
    bn = gm.get_submodule(node.target)
    return is_batchnorm(bn) and not bn.training and getattr(bn, "running_var", None) is not None


def _producer(gm: fx.GraphModule, node: fx.Node, calls: dict[str, int]):
    """The conv/Linear call feeding `node` alone, or None."""
    if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
        return None
    module = gm.get_submodule(node.target)
    plain_conv = isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
    return node if plain_conv or isinstance(module, nn.Linear) else None


def _fold(gm: fx.GraphModule, bn_node: fx.Node, calls: dict[str, int]) -> str | None:
    """Fold the BN at `bn_node` into its producer; the producer's name, or None."""
    bn = gm.get_submodule(bn_node.target)
    x = bn_node.args[0]
    border = None
    if _is_border_sum(gm, x, calls):
        conv_node, border = x.args[0], x.args[1]
    else:
        conv_node = x
    producer = _producer(gm, conv_node, calls) if isinstance(conv_node, fx.Node) else None
    if producer is None or (border is None and len(x.users) != 1):
        return None
    module = gm.get_submodule(producer.target)
    if isinstance(module, nn.Linear):
        shape = getattr(producer.meta.get("tensor_meta"), "shape", None)
        if shape is None or len(shape) != 2 or module.out_features != bn.num_features:
            return None  # a Linear over another axis than BN's features
    replace_module(gm, producer.target, _fused(module, bn))
    if border is not None:
        term = gm.get_submodule(border.target)
        scale = bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features)
        scale = scale / torch.sqrt(bn.running_var + bn.eps)
        kernel = term.kernel * scale.reshape(-1, *([1] * (term.kernel.dim() - 1)))
        replace_module(gm, border.target, term.with_kernel(kernel))
    bn_node.replace_all_uses_with(x)
    gm.graph.erase_node(bn_node)
    return producer.target


def _is_border_sum(gm: fx.GraphModule, x, calls: dict[str, int]) -> bool:
    """x = conv(..) + border(..), as the compiler emits it, read only by the BN."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is operator.add):
        return False
    if len(x.users) != 1 or len(x.args) != 2:
        return False
    term = x.args[1]
    return (
        isinstance(term, fx.Node)
        and term.op == "call_module"
        and calls.get(term.target) == 1
        and len(term.users) == 1
        and isinstance(gm.get_submodule(term.target), BorderTerm)
    )


def _fused(module: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of conv/Linear `module` computing BN(module(x))."""
    new = fresh_copy(module)
    args = (bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    if isinstance(module, nn.Linear):
        weight, bias = fuse_linear_bn_weights(module.weight, module.bias, *args)
    else:
        weight, bias = fuse_conv_bn_weights(module.weight, module.bias, *args)
    new.weight, new.bias = weight, bias
    return new


__all__ = ["fuse_for_deployment"]
