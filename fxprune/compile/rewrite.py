"""The graph surgery of the compiler pass: slice modules, fold constants, fix shapes.

`Rewriter.apply()` works on a GraphModule whose nodes carry channel ids and
a decided set of removed classes. Modules are replaced, never edited: the
compiler's working copy shares every module and tensor with its input.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from fxprune.analysis.vocabulary import BINARY_FUNCTIONS, BINARY_METHODS, tensor_shape
from fxprune.compile.liveness import (
    aligned_operands,
    as_array,
    channel_nodes,
    flat,
    per_row_inputs,
    zero_padded,
)
from fxprune.compile.plan import ChannelPlan
from fxprune.errors import CheckpointError
from fxprune.modules import BorderTerm


def fresh_copy(module: nn.Module) -> nn.Module:
    """A shallow copy whose parameter/buffer/submodule tables can be replaced without
    touching `module` (no tensor data is copied). (`copy.copy` plus three table
    assignments through `nn.Module.__setattr__` cost ten times as much.)"""
    new = object.__new__(type(module))
    state = dict(module.__dict__)
    for table in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        state[table] = state[table].copy()
    new.__dict__ = state
    return new


def put(module: nn.Module, name: str, value) -> None:
    """`module.name = value` for a registered parameter or buffer, written into its
    table directly (`nn.Module.__setattr__` checks every table on each call)."""
    if name in module._parameters and (value is None or isinstance(value, nn.Parameter)):
        module._parameters[name] = value
    elif name in module._buffers and not isinstance(value, nn.Parameter):
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def set_plain(module: nn.Module, name: str, value) -> None:
    """`module.name = value` for a plain attribute it has (a width, `groups`), written
    into its `__dict__` (`nn.Module.__setattr__` checks every table first)."""
    if name in module.__dict__:
        module.__dict__[name] = value
    else:
        setattr(module, name, value)


def replace_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Swap the submodule at dotted `target` for `module`."""
    *path, name = target.split(".")
    parent = gm
    for atom in path:  # submodules by their tables (get_submodule costs 20 µs a call)
        child = parent._modules.get(atom)
        parent = child if child is not None else getattr(parent, atom)
    if name in parent._modules:
        parent._modules[name] = module
    else:
        setattr(parent, name, module)


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    t = t.to(device=like.device, dtype=like.dtype).contiguous()
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _taken(t: torch.Tensor, idx: np.ndarray, dim: int) -> torch.Tensor:
    """A new tensor of `t`'s entries at `idx` along `dim` (same dtype and device)."""
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        return torch.from_numpy(np.take(t.detach().numpy(), idx, axis=dim))
    return t.detach().index_select(dim, torch.as_tensor(idx, device=t.device))


def border_pad(conv: nn.Module) -> list[int]:
    """The zero padding of `conv` as an F.pad list (last spatial dim first).

    padding="same" puts the odd extra element on the right, as torch does.
    """
    if conv.padding == "valid":
        sides = [(0, 0)] * len(conv.kernel_size)
    elif conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        sides = [(t // 2, t - t // 2) for t in totals]
    else:
        sides = [(int(p), int(p)) for p in conv.padding]
    return [p for side in reversed(sides) for p in side]


class Rewriter:
    """Applies one removal decision to a GraphModule.

    With `graph_edits=False` (the in-place back end) only modules are sliced
    and constants folded into biases and running means: the graph itself (the
    user's Python code) is left as it is, so the removal plan must not need a
    constant branch or a changed literal argument; border terms are collected in
    `borders` for the caller to place. With `replay` (a ChannelPlan), the plan's
    decisions are taken instead of reading `liveness` (then None): the same
    structure, placeholder values. `modules` is `dict(gm.named_modules())`, if the
    caller has it (the rewriter keeps it current as it replaces modules).
    """

    def __init__(
        self,
        gm,
        analysis,
        liveness,
        removed: np.ndarray,
        absorb: str,
        graph_edits: bool = True,
        replay=None,
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        self.gm, self.analysis, self.live, self.absorb = gm, analysis, liveness, absorb
        self.graph_edits = graph_edits
        self.borders: dict[str, BorderTerm] = {}  # without graph edits: conv path -> its term
        self.replay = replay
        self.modules = dict(gm.named_modules()) if modules is None else modules  # edited
        self.notes: list[str] = []
        self.removed = removed
        self.constant_branches: list[tuple[str, str]] = []  # decisions, for the plan
        self.absorbed: dict[str, str] = {}
        self.keep: dict[fx.Node, object] = {}
        self._taken: set[str] | None = None  # attribute names in use (see _free_name)
        for node in channel_nodes(gm):
            ids = node.meta["channels"]
            if isinstance(ids, list):
                self.keep[node] = [self._keep_of(i) if i is not None else None for i in ids]
            else:
                self.keep[node] = self._keep_of(ids)

    def _keep_of(self, ids: np.ndarray) -> np.ndarray:
        return ~self.removed[self.analysis.class_of[flat(ids)]]

    def apply(self) -> None:
        nodes = list(channel_nodes(self.gm))
        for node in nodes if self.graph_edits else ():
            self.prune_constant_operands(node)
        for node in nodes:
            rule = node.meta["channel_rule"]
            if node.op == "call_module" and rule in ("conv", "grouped", "depthwise"):
                self.rewrite_conv(node)
            elif node.op == "call_module" and rule == "bn":
                self.rewrite_bn(node)
            elif node.op == "call_module" and rule == "border":
                self.rewrite_border(node)
            elif node.op in ("call_function", "call_method") and self.graph_edits:
                self.rewrite_args(node)
        if self.replay is not None:
            self.check_replayed()

    def check_replayed(self) -> None:
        """Every decision of the replayed plan was taken: the plan fits this graph."""
        plan = self.replay
        if sorted(self.constant_branches) != sorted(plan.constant_branches) or sorted(
            self.absorbed
        ) != sorted(plan.absorbed):
            raise CheckpointError("the channel plan does not fit the traced base model")

    def plan(self) -> ChannelPlan:
        """The decisions taken, as a ChannelPlan (plain data, see compile/plan.py)."""
        return ChannelPlan(
            num_classes=self.analysis.num_classes,
            removed=np.nonzero(self.removed)[0].tolist(),
            constant_branches=list(self.constant_branches),
            absorbed=dict(self.absorbed),
        )

    # -- layer pruning -----------------------------------------------------
    def prune_constant_operands(self, node: fx.Node) -> None:
        """x + branch with a branch constant on every channel -> x + constant."""
        is_binary = (node.op == "call_function" and node.target in BINARY_FUNCTIONS) or (
            node.op == "call_method" and node.target in BINARY_METHODS
        )
        if not is_binary or node.meta["channel_rule"] != "elementwise":
            return
        branch = self._replayed_branch(node) if self.replay else self._constant_branch(node)
        if branch is None:
            return
        keep = self.keep[node]
        if self.replay:
            values = torch.zeros(int(keep.sum()), dtype=torch.float64)  # from the state_dict
        else:
            values = torch.tensor(self.live.values[branch][keep])
        self.constant_branches.append((node.name, branch.name))
        shape = (1, int(keep.sum())) + (1,) * (len(tensor_shape(node)) - 2)
        name = self._free_name(f"{branch.name}_constant")
        self.gm.register_buffer(name, values.reshape(shape).to(_dtype_of(node)))
        with self.gm.graph.inserting_before(node):
            const_node = self.gm.graph.get_attr(name)
        node.replace_input_with(branch, const_node)
        self.notes.append(f"{node.name}: branch {branch.name} is constant, replaced by a constant")

    def _free_name(self, name: str) -> str:
        """`name`, or `name_1`, `name_2`...: a compiled model compiled again keeps
        the attributes its first compile added."""
        if self._taken is None:  # the names are top-level: gm's own tables (hasattr: the rest)
            gm = self.gm
            self._taken = {*gm._modules, *gm._buffers, *gm._parameters}
        candidate, number = name, 0
        while candidate in self._taken or hasattr(self.gm, candidate):
            number += 1
            candidate = f"{name}_{number}"
        self._taken.add(candidate)  # the caller registers it next
        return candidate

    def _constant_branch(self, node: fx.Node) -> fx.Node | None:
        aligned, _ = aligned_operands(node)
        out_shape = tensor_shape(node)
        full = [a for a in aligned if tensor_shape(a) == out_shape and not self.live.const[a].all()]
        constant = [a for a in aligned if self.live.const[a].all() and a.op != "get_attr"]
        if not full or not constant or len(node.meta["channels"].shape) != 1:
            return None
        return constant[-1]

    def _replayed_branch(self, node: fx.Node) -> fx.Node | None:
        names = [b for n, b in self.replay.constant_branches if n == node.name]
        branch = [a for a in node.all_input_nodes if a.name in names]
        if not names or len(branch) != 1 or len(node.meta["channels"].shape) != 1:
            return None  # a plan naming anything else is caught by Rewriter.check_replayed
        return branch[0]

    # -- modules -----------------------------------------------------------
    def rewrite_conv(self, node: fx.Node) -> None:
        module, x = self.modules[node.target], node.args[0]
        in_keep, out_keep = self.keep[x], self.keep[node]
        if in_keep.all() and out_keep.all():
            return
        new = fresh_copy(module)
        if node.meta["channel_rule"] == "depthwise":
            self._slice_out(new, module, out_keep)
            width = int(out_keep.sum())
            set_plain(new, "in_channels", width)
            set_plain(new, "groups", width)
            return replace_module(self.gm, node.target, new)
        self._slice_out(new, module, out_keep)
        delta = self._absorbed(node, new, x, in_keep)  # for the kept rows only
        self._slice_in(new, module, in_keep, out_keep)
        replace_module(self.gm, node.target, new)
        if delta is not None:
            self._absorb(node, new, delta)

    def _slice_out(self, new: nn.Module, old: nn.Module, keep: np.ndarray) -> None:
        if keep.all():
            return  # `new` shares the unchanged parameters
        idx = np.nonzero(keep)[0]
        put(new, "weight", _param(_taken(old.weight, idx, 0), old.weight))
        if old.bias is not None:
            put(new, "bias", _param(_taken(old.bias, idx, 0), old.bias))
        attr = "out_features" if isinstance(old, nn.Linear) else "out_channels"
        set_plain(new, attr, len(idx))

    def _slice_in(self, new: nn.Module, old: nn.Module, in_keep: np.ndarray, out_keep) -> None:
        if in_keep.all():
            return
        groups = getattr(old, "groups", 1)
        w = new.weight.detach()
        if groups == 1:
            sliced = _taken(w, np.nonzero(in_keep)[0], 1)
        else:
            chunks = in_keep.reshape(groups, -1)
            rows_per = w.shape[0] // groups  # rows already sliced: balanced per group
            parts = [
                w[g * rows_per : (g + 1) * rows_per][:, torch.as_tensor(np.nonzero(chunks[g])[0])]
                for g in range(groups)
            ]
            sliced = torch.cat(parts)
        put(new, "weight", _param(sliced, old.weight))
        attr = "in_features" if isinstance(old, nn.Linear) else "in_channels"
        set_plain(new, attr, int(in_keep.sum()))

    def _absorbed(self, node, module, x, in_keep) -> np.ndarray | None:
        """(out, *kernel) contribution (as float64) of the removed constant inputs to
        each row of `module` (sliced to the kept rows already), or None."""
        if self.replay is not None:  # the plan says whether; the values come from the state_dict
            if node.name not in self.replay.absorbed:
                return None
            return np.zeros(module.weight.shape[:1] + module.weight.shape[2:])
        take = ~in_keep & self.live.const[x]
        if not take.any():
            return None
        values = np.where(take, self.live.values[x], 0.0)
        weight, shape = as_array(module.weight), tuple(module.weight.shape)
        weight = weight.reshape(shape[0], shape[1], -1)  # (out, in/groups, taps)
        if getattr(module, "groups", 1) == 1:  # one matrix-vector product per tap
            # in the layer's own precision (at least float32), as the conv itself sums
            # these products when it runs: a float64 copy of the weight cost 5x more,
            # for rounding below the conv's own (compact vs original: same errors)
            dtype = np.float64 if weight.dtype == np.float64 else np.float32
            w = weight.astype(dtype, copy=False).transpose(0, 2, 1)
            delta = np.matmul(w, values.astype(dtype)).astype(np.float64)  # kept columns x 0
        else:
            per_row = per_row_inputs(module, values)  # (out, in/groups)
            delta = np.einsum("oik,oi->ok", weight.astype(np.float64), per_row)
        return delta.reshape(shape[:1] + shape[2:]) if delta.any() else None

    def _absorb(self, node: fx.Node, conv: nn.Module, delta: np.ndarray) -> None:
        kind = self._absorb_kind(node, conv)
        bias = delta.reshape(delta.shape[0], -1).sum(axis=1)
        if kind == "bn" and self.replay is None and not self._fold_into_bn(node, bias):
            kind = "bias"
        self.absorbed[node.name] = kind
        if kind == "bias":
            old = as_array(conv.bias).astype(np.float64) if conv.bias is not None else 0.0
            put(conv, "bias", _param(torch.from_numpy(old + bias), conv.weight))
        elif kind == "border":
            self._add_border_term(node, conv, torch.from_numpy(delta))

    def _absorb_kind(self, node: fx.Node, conv: nn.Module) -> str:
        """bias (the paper's fold), bn (into the next BN's mean) or border (exact)."""
        if self.replay is not None:
            return self.replay.absorbed[node.name]
        uniform = isinstance(conv, nn.Linear) or not zero_padded(conv) or self.absorb == "bias"
        if not uniform:
            return "border"
        return "bn" if conv.bias is None else "bias"

    def _add_border_term(self, node: fx.Node, conv: nn.Module, delta: torch.Tensor) -> None:
        kernel = delta.unsqueeze(1).to(conv.weight.dtype)  # (out, 1, *k)
        size = tensor_shape(node.args[0])  # the traced input's: the term is cached for it
        size = size[2:] if size is not None else None
        border = BorderTerm(kernel, conv.stride, border_pad(conv), conv.dilation, size)
        if not self.graph_edits:  # the caller puts it beside the user's conv
            self.borders[node.target] = border
            return
        name = self._free_name(f"{node.target.replace('.', '_')}_border")
        self.gm.add_submodule(name, border)
        graph = self.gm.graph
        with graph.inserting_after(node):
            term = graph.call_module(name, (node.args[0],))
        with graph.inserting_after(term):
            total = graph.call_function(operator.add, (node, term))
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        self._alias(total, node)
        self.notes.append(f"{node.target}: exact border term for removed constant channels")

    def _alias(self, new: fx.Node, old: fx.Node) -> None:
        """`new` computes what `old` did (conv + border term): later rewrites of
        its users must see the same channels, keep mask and constants."""
        for key in ("channels", "tensor_meta"):
            if key in old.meta:
                new.meta[key] = old.meta[key]
        new.meta["channel_rule"] = "elementwise"
        self.keep[new] = self.keep[old]
        for table in (self.live.const, self.live.dead, self.live.values) if self.live else ():
            if old in table:
                table[new] = table[old]

    def _fold_into_bn(self, node: fx.Node, bias: torch.Tensor) -> bool:
        """The paper's variant: a conv without bias feeding one BN shifts its mean."""
        users = list(node.users)
        if len(users) != 1 or users[0].meta.get("channel_rule") != "bn":
            return False
        target = users[0].target
        if getattr(self.modules[target], "running_mean", None) is None:
            return False
        bn = fresh_copy(self.modules[target])  # modules are shared with the input: never edit
        keep = self.keep[users[0]]
        full = np.zeros(len(keep))
        full[keep] = bias
        mean = bn.running_mean
        shifted = torch.from_numpy(as_array(mean).astype(np.float64) - full)
        put(bn, "running_mean", shifted.to(device=mean.device, dtype=mean.dtype))
        replace_module(self.gm, target, bn)
        self.modules[target] = bn  # rewrite_bn slices this one
        return True

    def rewrite_border(self, node: fx.Node) -> None:
        """A border term of an earlier compile loses the rows of removed channels."""
        keep = self.keep[node]
        if keep.all():
            return
        old = self.modules[node.target]
        kernel = old.kernel[torch.as_tensor(np.nonzero(keep)[0])].clone()
        replace_module(self.gm, node.target, old.with_kernel(kernel))

    def rewrite_bn(self, node: fx.Node) -> None:
        keep = self.keep[node]
        if keep.all():
            return
        module = self.modules[node.target]
        new = fresh_copy(module)
        idx = np.nonzero(keep)[0]
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = _tensor_attribute(module, name)
            if isinstance(value, nn.Parameter):
                put(new, name, _param(_taken(value, idx, 0), value))
            elif isinstance(value, torch.Tensor):
                put(new, name, _taken(value, idx, 0))  # a copy
        if hasattr(new, "num_features"):
            set_plain(new, "num_features", len(idx))
        replace_module(self.gm, node.target, new)

    # -- literal shapes in calls ------------------------------------------
    def rewrite_args(self, node: fx.Node) -> None:
        from fxprune.compile.literal_args import fix_literal_channel_args

        fix_literal_channel_args(node, self.keep)


def _tensor_attribute(module: nn.Module, name: str):
    """`getattr(module, name, None)`, from the parameter and buffer tables first."""
    value = module._parameters.get(name)
    if value is None:
        value = module._buffers.get(name)
    return value if value is not None else getattr(module, name, None)


def _dtype_of(node: fx.Node) -> torch.dtype:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", torch.float32)


__all__ = ["Rewriter", "border_pad", "fresh_copy", "put", "replace_module"]
