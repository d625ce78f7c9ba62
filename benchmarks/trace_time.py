"""Time `fxprune trace torchvision:densenet201` end to end (goal: < 10 s).

Run: .venv/bin/python benchmarks/trace_time.py
Measures the installed command in a subprocess (start-up included) and the
library call (trace + analysis) in-process, side by side.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from fxprune import zoo
from fxprune.analysis import analyse
from fxprune.trace import trace_model


def main() -> None:
    exe = Path(sys.executable).with_name("fxprune")
    start = time.perf_counter()
    subprocess.run([str(exe), "trace", "torchvision:densenet201"], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    command = time.perf_counter() - start
    model = zoo.create_model("densenet201")
    start = time.perf_counter()
    analyse(trace_model(model, torch.randn(1, 3, 224, 224)).gm)
    library = time.perf_counter() - start
    print(f"fxprune trace torchvision:densenet201: {command:.2f} s (command), "
          f"{library:.2f} s (trace + analysis in-process); goal < 10 s")  # fmt: skip


if __name__ == "__main__":
    main()
