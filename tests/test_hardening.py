"""Issue 14's hardening catalogue, through the installed `fxprune` command.

Each case runs the real entry point in a subprocess (the typer and click that are
actually installed): one line on stderr, the right exit code, no traceback, and
no existing file replaced or lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
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
