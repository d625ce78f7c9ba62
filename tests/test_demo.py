"""`make demo`, the README's lead command: it must prune (about half the channels;
≥ 45 % asserted, 50.0 % measured here, because ρ sits near a cliff and another CPU's
arithmetic may land a little lower) at ≤ 2 points accuracy loss and write a verified
artifact. It takes 5-15 minutes, so
it runs in `make test-slow`; `make test` checks the recipe's pieces."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from fxprune.train import demo_recipe


def test_demo_recipe_prunes_then_fine_tunes():
    recipe = demo_recipe()
    assert recipe.ista.mode == "ista" and recipe.ista.recalibrate > 0
    assert recipe.finetune is not None and recipe.finetune.mode == "none"


@pytest.mark.slow
def test_make_demo_prunes_half_the_channels_and_keeps_accuracy(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fxprune.demo"], cwd=tmp_path, capture_output=True, text=True,
        timeout=3600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout
    base = float(re.search(r"base accuracy ([0-9.]+)%", line).group(1))
    tuned = float(re.search(r"fine-tuned ([0-9.]+)%", line).group(1))
    sparsity = float(re.search(r"channel sparsity ([0-9.]+)%", line).group(1))
    error = float(re.search(r"compile max relative error ([0-9.e+-]+)", line).group(1))
    assert sparsity >= 45, line
    assert tuned >= base - 2, line
    assert error <= 1e-4, line
    assert (tmp_path / "out" / "demo" / "small.ts").stat().st_size > 0
