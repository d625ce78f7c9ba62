"""Rebuild a compiled model from data: re-apply recorded compile steps.

A checkpoint of a compiled model stores its base architecture and, per
compile, the input shape and submodule it traced and the `ChannelPlan`.
`replay_steps` traces the rebuilt base exactly as that compile did and
compiles it with the plan: the same compiler, the same structure, no weight
read and nothing from the file executed. The caller loads the state_dict.
"""

from __future__ import annotations

import torch
from torch import nn

from fxprune.compile.compiler import compile_model
from fxprune.compile.plan import ChannelPlan
from fxprune.errors import CheckpointError, FxpruneError, first_line
from fxprune.trace import trace_model


def replay_steps(module: nn.Module, steps: list[dict], origin: str) -> nn.Module:
    """`module` (the rebuilt base) after each step's trace and plan compile.

    Steps are checked records (`fxprune.load.checkpoints`); a plan that does not
    fit the traced graph is a one-line CheckpointError naming `origin`.
    """
    for number, step in enumerate(steps, 1):
        plan = ChannelPlan.from_dict(step["plan"], origin)
        example = torch.zeros(step["input_shape"])
        try:
            traced = trace_model(module, example, step["submodule"])
            module = compile_model(traced, plan=plan).gm
        except FxpruneError as exc:
            message = f"{origin}: compile step {number} does not replay: {exc}"
            raise CheckpointError(message) from None
        except Exception as exc:  # a plan that names nodes the graph does not have
            message = f"{origin}: compile step {number} does not replay: "
            raise CheckpointError(message + first_line(exc, with_type=True)) from None
    return module


__all__ = ["replay_steps"]
