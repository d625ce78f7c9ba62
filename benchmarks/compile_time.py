"""Time trace + analysis + compile + verification per model (goal: < 3 s each).

Run: .venv/bin/python benchmarks/compile_time.py [MODEL ...]
Half of every prunable group is zeroed first (random BN statistics), so the
compiler has real work; verification is one forward pass of each model.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from fxprune import zoo
from fxprune.analysis import analyse
from fxprune.compile import compile_model
from fxprune.testing import randomize_batchnorm, zero_random
from fxprune.trace import trace_model
from fxprune.verify import relative_error, run_model

warnings.filterwarnings("ignore")
MODELS = ["resnet50", "densenet201", "efficientnet_b0", "mobilenet_v3_large"]


def main() -> None:
    torch.set_num_threads(2)
    print(f"{'model':22} {'trace+analyse':>14} {'compile':>9} {'verify':>8} {'total':>8}  error")
    for name in sys.argv[1:] or MODELS:
        model = zoo.create_model(name).eval()
        randomize_batchnorm(model)
        x = torch.randn(zoo.model_info(name).input_shape)
        t0 = time.perf_counter()
        traced = trace_model(model, x)
        analyse(traced.gm)
        t1 = time.perf_counter()
        zero_random(traced.gm, 0.5)
        t2 = time.perf_counter()
        result = compile_model(traced)
        t3 = time.perf_counter()
        error = relative_error(run_model(traced.gm, x), run_model(result.gm, x))
        t4 = time.perf_counter()
        total = (t1 - t0) + (t3 - t2) + (t4 - t3)
        print(
            f"{name:22} {t1 - t0:13.2f}s {t3 - t2:8.2f}s {t4 - t3:7.2f}s {total:7.2f}s  {error:.1e}"
        )


if __name__ == "__main__":
    main()
