"""Saving and restoring a model pruned in place, as data.

A pruned model is its base architecture (the same factory, config or yaml the
user built it from) plus its pruned `state_dict`: the state_dict's shapes
say how wide every layer is. `load_pruned(model, state)` narrows a freshly
built base model to those shapes and loads the weights strictly — no code is
read from the file (`torch.load(..., weights_only=True)` reads it).

`save_pruned` writes that state_dict atomically and checks, before the file
appears, that rebuilding from it gives back the pruned model's outputs. Only
where the user asks (`whole_module=True`) is the whole module pickled with
`torch.save(model)` (loading it needs `weights_only=False` and the user's
classes, and runs code from the file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fxprune.compile.in_place import wrap_borders
from fxprune.compile.rewrite import border_pad
from fxprune.errors import CheckpointError, VerificationError
from fxprune.files import atomic_write
from fxprune.load import apply_state_dict
from fxprune.modules import BorderTerm, ConvWithBorder
from fxprune.verify import TOLERANCE, relative_error, run_model

_PER_CHANNEL = ("bias", "running_mean", "running_var")


def load_pruned(
    model: nn.Module, state: dict[str, torch.Tensor], origin: str = "state_dict"
) -> None:
    """Narrow `model`'s Conv / Linear / BatchNorm layers to the shapes in `state`,
    then load `state` strictly (CheckpointError naming the first bad key). A conv
    saved with a border term (`PATH.border.kernel`) is wrapped in a ConvWithBorder."""
    _wrap_saved_borders(model, state)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state.get(f"{prefix}weight")
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or weight is None:
            continue
        if tuple(weight.shape) != tuple(module.weight.shape):
            _narrow(module, weight.shape, origin, name)
        bias = state.get(f"{prefix}bias")
        if bias is not None and "bias" in module._parameters and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(bias))  # a constant was absorbed
    apply_state_dict(model, state, origin)


def _wrap_saved_borders(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    suffix = ".border.kernel"
    borders = {}
    for key, kernel in state.items():
        path = key[: -len(suffix)]
        if key.endswith(suffix) and not isinstance(model.get_submodule(path), ConvWithBorder):
            conv = model.get_submodule(path)
            if not isinstance(conv, nn.modules.conv._ConvNd):
                raise CheckpointError(f"'{key}': {path} is not a conv in this model")
            borders[path] = BorderTerm(torch.zeros_like(kernel), conv.stride, border_pad(conv),
                                       conv.dilation)  # fmt: skip
    wrap_borders(model, borders)


def _narrow(module: nn.Module, shape: torch.Size, origin: str, name: str) -> None:
    """Set `module`'s widths and tensor shapes to a pruned weight of `shape`."""
    if isinstance(module, nn.modules.conv._ConvNd):
        depthwise = module.groups == module.in_channels == module.out_channels
        module.out_channels = shape[0]
        module.groups = shape[0] if depthwise else module.groups
        module.in_channels = shape[0] if depthwise else shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape[0], shape[1]
    elif hasattr(module, "num_features") and len(shape) == 1:
        module.num_features = shape[0]
    else:
        raise CheckpointError(f"{origin}: '{name}.weight' has shape {tuple(shape)}, "
                              f"and {type(module).__name__} cannot be narrowed to it")  # fmt: skip
    module.weight.data = torch.zeros(shape, dtype=module.weight.dtype)
    for attr in _PER_CHANNEL:
        value = getattr(module, attr, None)
        if isinstance(value, torch.Tensor):
            value.data = torch.zeros(shape[0], dtype=value.dtype)


def save_pruned(
    model: nn.Module,
    path: str | Path,
    *,
    example: torch.Tensor,
    rebuild: Callable[[], nn.Module] | None = None,
    whole_module: bool = False,
    force: bool = False,
    protect: Sequence[str | Path] = (),
) -> Path:
    """Write `model` (pruned in place) to `path`, verified before it appears.

    Default: its state_dict, checked by `load_pruned(rebuild(), ...)` from the
    written file. `whole_module=True`: `torch.save(model)`, checked by loading
    it back. Either must reproduce `model`'s outputs on `example` (≤ TOLERANCE).
    """
    if not whole_module and rebuild is None:
        raise ValueError("save_pruned needs `rebuild` (the base model factory) for a state_dict")
    expected = run_model(model, example)

    def write(tmp: Path) -> None:
        torch.save(model if whole_module else model.state_dict(), tmp)
        if whole_module:
            restored = torch.load(tmp, map_location="cpu", weights_only=False)
        else:
            restored = rebuild()
            load_pruned(restored, torch.load(tmp, map_location="cpu", weights_only=True), str(path))
        error = relative_error(expected, run_model(restored, example))
        if not error <= TOLERANCE:
            raise VerificationError(f"{path}: the saved model differs by {error:.2e} when loaded "
                                    "back; nothing was written")  # fmt: skip

    return atomic_write(path, write, force=force, protect=protect)


__all__ = ["load_pruned", "save_pruned"]
