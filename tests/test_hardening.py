"""Issue 14's hardening catalogue, through the installed `fxprune` command.

Each case runs the real entry point in a subprocess (the typer and click that are
actually installed): one line on stderr, the right exit code, no traceback, and
no existing file replaced or lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_error, fxprune

USAGE = {
    "unknown option": ["compile", "zoo:resnet20", "--bogus"],
    "bad value": ["compile", "zoo:convnet", "--out", "o.ts", "--verify", "abc"],
    "missing argument": ["compile"],
    "missing option": ["compile", "zoo:convnet"],
    "unknown command": ["nosuchcommand"],
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2_with_one_line(case: str, tmp_path: Path) -> None:
    result = fxprune(*USAGE[case], cwd=tmp_path)
    assert_clean_error(result, 2)
    assert "internal error" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())


SHAPES = {
    "memory budget": (["--input-shape", "1,3,100000,100000"], 2, "elements"),
    "int64 overflow": (["--input-shape", "1,3,9223372036854775808,2"], 2, "elements"),
    "not an integer": (["--input-shape", "1,3,2^63,2"], 2, "integers"),
    "zero": (["--input-shape", "1,3,0,32"], 2, "positive"),
    "rank 1": (["--input-shape", "7"], 2, "rank"),
    "rank 6": (["--input-shape", "1,3,2,2,2,2"], 2, "rank"),
    "nan threshold": (["--threshold", "nan"], 2, "finite"),
    "inf threshold": (["--threshold", "inf"], 2, "finite"),
    "negative threshold": (["--threshold=-0.5"], 2, "≥ 0"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_shapes_and_thresholds_are_checked_up_front(case: str, tmp_path: Path) -> None:
    args, code, needle = SHAPES[case]
    result = fxprune("compile", "zoo:convnet", "--out", "o.ts", *args, cwd=tmp_path)
    assert_clean_error(result, code, needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("factory", ["huge_shape", "text_shape", "negative_shape"])
def test_factory_input_shape_is_checked(factory: str, tmp_path: Path) -> None:
    result = fxprune("trace", f"hardening_models:{factory}", cwd=tmp_path)
    assert_clean_error(result, 1, "input_shape")


def test_checkpoint_input_shape_is_checked(tmp_path: Path) -> None:
    made = fxprune("compile", "zoo:convnet", "--out", "c.ts", "--save-checkpoint", "c.pt",
                   cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    for bad in ([1, 3, 100_000, 100_000], [1, 3, "32", 32], [3], 7):
        checkpoint["input_shape"] = bad
        torch.save(checkpoint, tmp_path / "bad.pt")
        result = fxprune("trace", "bad.pt", cwd=tmp_path)
        assert_clean_error(result, 1, "input_shape")
