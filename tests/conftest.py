"""Shared test set-up: deterministic, quiet, at most two threads."""

from __future__ import annotations

import warnings

import pytest
import torch

torch.set_num_threads(2)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*TorchScript.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
