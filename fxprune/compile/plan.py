"""The channel plan: one compile's structural decisions, as plain data.

`compile_model` records, in a `ChannelPlan`, everything that shapes the
compact model and that depends on the weights it saw: which channel classes
of the analysis were removed, which residual branches were constant (replaced
by a constant buffer) and how each conv absorbed removed constant inputs
(`bias`, `bn` or an exact `border` term). Compiling the same traced graph with
the plan (`compile_model(traced, plan=plan)`) rebuilds exactly the same
structure without looking at any weight; the state_dict saved beside the plan
then fills in the values. A plan holds ints and strings only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fxprune.errors import CheckpointError

__all__ = ["ABSORB_KINDS", "ChannelPlan"]

ABSORB_KINDS = ("bias", "bn", "border")
_MAX_NAME = 400


@dataclass
class ChannelPlan:
    """What one compile did to the channel classes of its traced input."""

    num_classes: int
    removed: list[int] = field(default_factory=list)
    constant_branches: list[tuple[str, str]] = field(default_factory=list)  # (node, branch)
    absorbed: dict[str, str] = field(default_factory=dict)  # conv node -> ABSORB_KINDS

    def mask(self) -> np.ndarray:
        """Boolean mask over classes: True where the class is removed."""
        removed = np.zeros(self.num_classes, bool)
        removed[self.removed] = True
        return removed

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "removed": list(self.removed),
            "constant_branches": [list(pair) for pair in self.constant_branches],
            "absorbed": dict(self.absorbed),
        }

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> ChannelPlan:
        """A plan read from a file, with every field type- and range-checked."""

        def bad(what: str) -> CheckpointError:
            return CheckpointError(f"{origin}: the channel plan's {what} is malformed")

        num = data.get("num_classes") if isinstance(data, dict) else None
        if not _is_int(num) or num < 0:
            raise bad("num_classes")
        removed = data.get("removed")
        if not isinstance(removed, list) or not all(_is_int(i) and 0 <= i < num for i in removed):
            raise bad("removed list")
        branches = data.get("constant_branches")
        if not isinstance(branches, list) or not all(_is_pair(p) for p in branches):
            raise bad("constant_branches")
        absorbed = data.get("absorbed")
        if not isinstance(absorbed, dict) or not all(
            _is_name(k) and v in ABSORB_KINDS for k, v in absorbed.items()
        ):
            raise bad("absorbed table")
        pairs = [(str(a), str(b)) for a, b in branches]
        return cls(int(num), sorted(set(removed)), pairs, dict(absorbed))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value) -> bool:
    return isinstance(value, str) and 0 < len(value) < _MAX_NAME


def _is_pair(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_name, value))
