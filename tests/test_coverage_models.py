"""The coverage table's models, one process each (make test-slow).

Each must end exact or say in one line why nothing was pruned: no internal
error, no mismatch. The table itself is docs/coverage.md (benchmarks/coverage.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from coverage_models import FAMILIES  # noqa: E402

CASES = [(family, name) for family, names in FAMILIES.items() for name in names]


@pytest.mark.slow
@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_model_is_pruned_exactly_or_says_why(family, name):
    pytest.importorskip(family)  # each family is named after its package
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "coverage.py"), "--one", family, name],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])
    status = row["fx_status"]
    assert "INTERNAL" not in status and status != "MISMATCH", row
    assert len(status.splitlines()) == 1
    if status == "ok":
        assert max(row["fx_error"], row["artifact_error"]) <= 1e-4, row
