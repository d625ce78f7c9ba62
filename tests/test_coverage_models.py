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
# make test: one small model of each family, end to end (fxprune, in place, Torch-Pruning)
FAST = [("torchvision", "mnasnet0_5"), ("timm", "resnet10t"), ("ultralytics", "yolov8n-cls"),
        ("transformers", "MobileNetV1")]  # fmt: skip


def coverage_row(family: str, name: str) -> dict:
    """The table's row for one model, from `coverage.py --one` in a fresh process."""
    pytest.importorskip(family)  # each family is named after its package
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "coverage.py"), "--one", family, name],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])


def check_row(row: dict) -> None:
    """No internal error or mismatch in either fxprune path; every status one line;
    every success exact, the in-place one of the same class and trainable."""
    for key in ("fx_status", "ip_status"):
        status = row[key]
        assert "INTERNAL" not in status and status != "MISMATCH", row
        assert len(status.splitlines()) == 1
    if row["fx_status"] == "ok":
        assert max(row["fx_error"], row["artifact_error"]) <= 1e-4, row
    if row["ip_status"] == "ok":
        assert row["ip_error"] <= 1e-4 and row["ip_type_kept"] and row["ip_trains"], row


@pytest.mark.parametrize("family, name", FAST, ids=[f"{f}-{n}" for f, n in FAST])
def test_one_model_per_family_is_pruned_exactly_both_ways(family, name):
    row = coverage_row(family, name)
    check_row(row)
    assert row["fx_status"] == "ok" and row["ip_status"] == "ok", row
    assert row["tp_status"], row  # Torch-Pruning's outcome is recorded, whatever it is


@pytest.mark.slow
@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_model_is_pruned_exactly_or_says_why(family, name):
    check_row(coverage_row(family, name))
