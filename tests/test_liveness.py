"""The weight questions of liveness (zero rows, rows reading some inputs, inputs read
by live rows) answered by probing equal their dense definitions, whatever the zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.compile.liveness import inputs_read, nonzero_taps, rows_reading, zero_rows


def _dense_taps(module: nn.Module) -> np.ndarray:
    w = module.weight.detach().float().numpy()
    return (w.reshape(w.shape[0], w.shape[1], -1) != 0).any(-1)


def _layers(rng: np.random.Generator):
    """Convs and linears with planted zeros: whole rows, whole columns, single taps,
    first taps, -0.0, and a NaN (which reads, as `!= 0` says)."""
    for make in (
        lambda: nn.Conv2d(6, 5, 3),
        lambda: nn.Conv2d(6, 5, 1),
        lambda: nn.Linear(7, 4),
        lambda: nn.Conv1d(4, 6, 2),
        lambda: nn.Conv2d(6, 4, 3, groups=2),
        lambda: nn.Conv2d(4, 4, 3, groups=4),
    ):
        for density in (1.0, 0.7, 0.2, 0.0):
            layer = make()
            w = layer.weight.detach()
            flat = w.view(w.shape[0], w.shape[1], -1)
            flat.mul_(torch.from_numpy(rng.random(flat.shape) < density))
            if density == 1.0:
                flat[1] = 0  # a zero row
                flat[:, 0, 0] = 0  # first taps zero, the rest not
                flat[0, -1] = -0.0
                flat[-1, -1, -1] = float("nan")
            yield layer


@pytest.mark.parametrize("seed", range(8))
def test_probing_equals_the_dense_definitions(seed):
    rng = np.random.default_rng(seed)
    for layer in _layers(rng):
        taps = _dense_taps(layer)  # (out, in/groups)
        groups = getattr(layer, "groups", 1)
        out, per_group = taps.shape
        group_of_row = np.arange(out) // (out // groups)
        dense = np.zeros((out, per_group * groups), bool)  # (out, in): taps in their group
        for row in range(out):
            g = group_of_row[row]
            dense[row, g * per_group : (g + 1) * per_group] = taps[row]
        assert (nonzero_taps(layer) == taps).all()
        assert (zero_rows(layer) == ~taps.any(1)).all()
        for _ in range(4):
            inputs = rng.random(dense.shape[1]) < rng.random()
            assert (rows_reading(layer, inputs) == (dense & inputs).any(1)).all()
            live = rng.random(out) < rng.random()
            assert (inputs_read(layer, live) == dense[live].any(0)).all()
