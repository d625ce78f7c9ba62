"""One op vocabulary for every front end: functional layers become modules.

`F.conv2d(x, self.weight, ...)`, `F.batch_norm(x, self.running_mean, ...)`
(timm's norm-act layers) and their aten forms (`aten.conv2d`,
`aten.convolution`, `aten.batch_norm`, `aten.linear`, from the export front
end) whose tensors are parameters and buffers of one user module become
`call_module` nodes of the equivalent plain `nn.Conv*d` / `nn.BatchNorm*d` /
`nn.Linear`, which shares those tensors and sits at the user's module path
(so reports use the user's names). Only when every argument matches what the
plain module computes; otherwise the call stays and the analysis freezes it
with a reason: skip, never guess.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.operator_schemas import normalize_function

from fxprune.trace.foreign_sizes import foreign_channel_sizes

__all__ = ["canonicalise", "functional_layers"]

aten = torch.ops.aten

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
            "eps")  # fmt: skip
_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
_LINEAR_ARGS = ("input", "weight", "bias")

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_ATEN = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
              aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}  # fmt: skip
_CONV_CLASSES = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
_BN_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict | None:
    """Arguments of a Python-level call by name, or None if they do not fit."""
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound if all(n in bound for n in names) else None


def _bind_aten(node: fx.Node) -> dict | None:
    pair = normalize_function(node.target, node.args, node.kwargs,
                              normalize_to_only_use_kwargs=True)  # fmt: skip
    return dict(pair.kwargs) if pair is not None else None


def functional_layers(gm: fx.GraphModule) -> list[str]:
    """The names of the functional conv / batch-norm / linear calls still in `gm`
    (after `canonicalise`: the ones it could not read as a module)."""
    return [node.name for node in gm.graph.nodes if _layer_call(node) is not None]


def _layer_call(node: fx.Node) -> tuple[str, dict] | None:
    """('conv' | 'bn' | 'linear', arguments by name) for a functional layer call."""
    if node.op != "call_function":
        return None
    target = node.target
    if target in _CONV_FUNCTIONS:
        return _some("conv", _bind(node, _CONV_ARGS, _CONV_DEFAULTS))
    if target in (F.batch_norm,):
        return _some("bn", _bind(node, _BN_ARGS, _BN_DEFAULTS))
    if target in (F.linear, torch._C._nn.linear):
        return _some("linear", _bind(node, _LINEAR_ARGS, {"bias": None}))
    if target in _CONV_ATEN:
        return _some("conv", _bind_aten(node))
    if target is aten.convolution.default:
        args = _bind_aten(node)
        if args is None or args.pop("transposed") or any(args.pop("output_padding")):
            return None
        return "conv", args
    if target is aten.batch_norm.default:
        args = _bind_aten(node)
        return None if args is None or args.pop("cudnn_enabled", None) is None else ("bn", args)
    if target is aten.linear.default:
        return _some("linear", _bind_aten(node))
    return None


def _some(kind: str, args: dict | None) -> tuple[str, dict] | None:
    return None if args is None else (kind, args)


def _attr_of(gm: fx.GraphModule, value, owner: str | None, name: str) -> tuple[str, bool]:
    """Check that `value` is `owner.name` read by a get_attr used only here.
    Returns (owner path, ok); value None is fine (an absent bias)."""
    if value is None:
        return owner or "", True
    if not isinstance(value, fx.Node) or value.op != "get_attr" or len(value.users) != 1:
        return "", False
    path, _, attr = value.target.rpartition(".")
    if attr != name or not path or (owner is not None and path != owner):
        return "", False
    return path, True


def _plain_module(
    gm: fx.GraphModule, kind: str, args: dict, x: fx.Node
) -> tuple[str, nn.Module] | None:
    """The owner path and an equivalent plain module, or None."""
    names = {"conv": ("weight", "bias"), "linear": ("weight", "bias"),
             "bn": ("running_mean", "running_var", "weight", "bias")}[kind]  # fmt: skip
    owner = None
    for name in names:
        path, ok = _attr_of(gm, args.get(name), owner, name)
        if not ok:
            return None
        owner = owner or path or None
    if owner is None:
        return None
    old = gm.get_submodule(owner)
    weight = getattr(old, "weight", None)
    if kind == "conv":
        return owner, _conv(old, weight, args)
    if kind == "linear":
        return owner, _linear(old, weight, args)
    return owner, _batchnorm(old, args, x)


def _conv(old: nn.Module, weight, args: dict) -> nn.Module | None:
    cls = _CONV_CLASSES.get(weight.dim()) if isinstance(weight, nn.Parameter) else None
    if cls is None or not isinstance(args["groups"], int):
        return None
    new = cls(weight.shape[1] * args["groups"], weight.shape[0], tuple(weight.shape[2:]),
              stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
              groups=args["groups"], bias=args["bias"] is not None, device="meta")  # fmt: skip
    return _share(new, old)


def _linear(old: nn.Module, weight, args: dict) -> nn.Module | None:
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=args["bias"] is not None,
                    device="meta")  # fmt: skip
    return _share(new, old)


def _batchnorm(old: nn.Module, args: dict, x: fx.Node) -> nn.Module | None:
    meta = x.meta.get("tensor_meta")
    rank = len(meta.shape) if hasattr(meta, "shape") else None
    cls = _BN_CLASSES.get(rank)
    mean = getattr(old, "running_mean", None)
    if cls is None or args["training"] or args["running_mean"] is None or mean is None:
        return None
    affine = args["weight"] is not None
    if affine != (args["bias"] is not None):
        return None
    new = cls(mean.shape[0], eps=args["eps"], momentum=args["momentum"], affine=affine,
              device="meta")  # fmt: skip
    return _share(new, old)


def _share(new: nn.Module, old: nn.Module) -> nn.Module | None:
    """Give `new` every parameter, buffer and child of `old` (shared, not copied)."""
    for name in list(new._parameters):
        if name not in old._parameters or old._parameters[name] is None:
            new._parameters[name] = None
    for name in list(new._buffers):
        if name not in old._buffers:
            del new._buffers[name]
    for name, value in old._parameters.items():
        if value is not None and not isinstance(value, nn.Parameter):
            return None
        new._parameters[name] = value
    new._buffers.update(old._buffers)
    new._modules.update(old._modules)
    new.train(old.training)
    return new


def canonicalise(gm: fx.GraphModule, *, recompile: bool = False) -> list[str]:
    """The passes below, with one recompile at the end when the graph changed
    (or always, with `recompile`: a front end that left it to us). Returns the
    notes of the passes."""
    notes, turned = _functional_layers_to_modules(gm)
    pad_notes, padded = _fold_zero_padding(gm)
    size_notes, sized = foreign_channel_sizes(gm)
    if turned or padded or sized:
        gm.graph.lint()
    if turned or padded or sized or recompile:
        gm.recompile()  # costs about as much as tracing: once, and only when needed
    return notes + pad_notes + size_notes


def _functional_layers_to_modules(gm: fx.GraphModule) -> tuple[list[str], bool]:
    """Turn functional conv / batch-norm / linear calls on one module's
    parameters into `call_module` nodes (module docstring). Needs shapes
    (`node.meta["tensor_meta"]`); returns one note per call turned and whether
    the graph changed (the caller recompiles)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    notes: list[str] = []
    for node in list(gm.graph.nodes):
        found = _layer_call(node)
        x = found[1].get("input") if found else None
        if found is None or not isinstance(x, fx.Node):
            continue
        plain = _plain_module(gm, found[0], found[1], x)
        if plain is None or plain[1] is None or plain[0] in called:
            continue
        owner, module = plain
        _replace_module(gm, owner, module)
        called.add(owner)
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        node.op, node.target, node.args, node.kwargs = "call_module", owner, (x,), {}
        for attr in attrs:
            if not attr.users:
                gm.graph.erase_node(attr)
        notes.append(f"{owner}: functional {found[0]} read as {type(module).__name__}")
    return notes, bool(notes)


def _replace_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, module)


_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d)  # fmt: skip


def _fold_zero_padding(gm: fx.GraphModule) -> tuple[list[str], bool]:
    """`ZeroPad2d` modules become `F.pad` calls; an `F.pad` with zeros whose
    only reader is a conv without padding becomes that conv's own padding
    when it is the same on both sides (Hugging Face's TF-style padding), and
    disappears when it pads nothing. The same computation, written so the
    analysis sees a padded conv (exact border terms) instead of an opaque pad.
    Returns the notes and whether the graph changed (the caller recompiles)."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    notes, changed = [], False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], _PAD_MODULES):
            pad, changed = modules[node.target], True
            node.op, node.target = "call_function", F.pad
            node.args, node.kwargs = (node.args[0], list(pad.padding), "constant", pad.value), {}
        widths = _zero_pad(node)
        if widths is None or len(node.users) != 1:
            continue
        conv_node = next(iter(node.users))
        conv = modules.get(conv_node.target) if conv_node.op == "call_module" else None
        if not _unpadded_conv(conv, conv_node, node) or calls[conv_node.target] != 1:
            continue
        sides = list(zip(widths[0::2], widths[1::2], strict=True))[::-1]  # (before, after) per axis
        if len(sides) != conv.weight.dim() - 2 or any(a != b for a, b in sides):
            continue
        conv.padding = tuple(a for a, _ in sides)
        conv_node.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        notes.append(f"{conv_node.target}: explicit zero padding read as the conv's own")
    return notes, bool(notes) or changed


def _zero_pad(node: fx.Node) -> list[int] | None:
    """The widths of an `F.pad(x, widths)` with constant zeros, else None."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    args = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    if args is None or args["mode"] != "constant" or args["value"] not in (None, 0, 0.0):
        return None
    widths = args["pad"]
    ok = isinstance(widths, (list, tuple)) and all(isinstance(w, int) and w >= 0 for w in widths)
    return list(widths) if ok and len(widths) % 2 == 0 else None


def _unpadded_conv(conv, conv_node: fx.Node, pad_node: fx.Node) -> bool:
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or conv.padding_mode != "zeros":
        return False
    if conv_node.args[:1] != (pad_node,) or conv_node.kwargs or len(conv_node.args) != 1:
        return False
    padding = conv.padding
    return padding == "valid" or (not isinstance(padding, str) and not any(padding))
