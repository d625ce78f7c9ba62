"""`fxprune compile` wall time against a bare import plus the in-process compile, in one run.

Each repeat runs three fresh processes, interleaved (medians over --repeats):

1. bare import: `python -c "import torch, torchvision"`;
2. in-process compile: a Python that imports torch, torchvision and fxprune (not
   timed), then times what a library user calls for the same result as the CLI:
   load → trace → analyse → zero (--sparsity) → compile → verify
   (`pipeline.compile_analysed` with the CLI's defaults: 3 verification inputs,
   the input-dependence check). Printed as the compiler alone (load to compact
   model) and the verification forward passes beside it;
3. the command: `fxprune compile SOURCE --sparsity S --out TMP/x.ts` (wall time:
   everything, including the FLOP table, BN folding and its check, TorchScript
   and the artifact's check in a fresh process).

ratio = command / (import + in-process compile); the goal is ≤ 2. The ratio
against import + compiler alone (no verification forward) is printed too.

    .venv/bin/python benchmarks/cli_wall.py [--source torchvision:resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_IN_PROCESS = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, torchvision  # noqa: F401  (imports are not the compile)
import fxprune.pipeline.stages as pipeline  # where compile_analysed looks them up
source, sparsity = sys.argv[1], float(sys.argv[2])
spent = {"compiler": 0.0}
def timed(function):  # the compiler's own steps inside compile_analysed
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent["compiler"] += time.perf_counter() - start
    return call
pipeline.zero_channels = timed(pipeline.zero_channels)
pipeline.compile_model = timed(pipeline.compile_model)
cpu, start = time.process_time(), time.perf_counter()
analysed = pipeline.open_source(source)
opened = time.perf_counter()
compiled = pipeline.compile_analysed(analysed, sparsity=sparsity)
total, cpu = time.perf_counter() - start, time.process_time() - cpu
compiler = (opened - start) + spent["compiler"]
print(json.dumps({"total": total, "compiler": compiler, "cpu": cpu}))
"""


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wall(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and the children it waited for)."""
    cpu, start = _cpu_children(), time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _cpu_children() - cpu


def _in_process(source: str, sparsity: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, source, str(sparsity)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="torchvision:resnet50")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fxprune = str(Path(sys.executable).with_name("fxprune"))
    rows: dict[str, list[float]] = {k: [] for k in KEYS}
    with tempfile.TemporaryDirectory() as tmp:
        cli = [fxprune, "compile", args.source, "--sparsity", str(args.sparsity),
               "--out", str(Path(tmp) / "x.ts"), "--force"]  # fmt: skip
        for _ in range(args.repeats):
            wall, cpu = _wall([sys.executable, "-c", "import torch, torchvision"])
            rows["import"].append(wall)
            rows["import cpu"].append(cpu)
            timing = _in_process(args.source, args.sparsity)
            rows["compile"].append(timing["total"])
            rows["compiler"].append(timing["compiler"])
            rows["compile cpu"].append(timing["cpu"])
            wall, cpu = _wall(cli)
            rows["cli"].append(wall)
            rows["cli cpu"].append(cpu)
    report(rows, args)


KEYS = ("import", "compile", "compiler", "cli", "import cpu", "compile cpu", "cli cpu")


def report(rows: dict[str, list[float]], args: argparse.Namespace) -> None:
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["cli"] / (med["import"] + med["compile"])
    ratio_compiler = med["cli"] / (med["import"] + med["compiler"])
    ratio_cpu = med["cli cpu"] / (med["import cpu"] + med["compile cpu"])
    print(f"fxprune compile {args.source} --sparsity {args.sparsity}: median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
    print(f"  bare import (torch, torchvision)   {med['import']:6.2f} s")
    print(f"  in-process compile, verified       {med['compile']:6.2f} s")
    print(f"    of which the compiler alone      {med['compiler']:6.2f} s (load to compact model)")
    print(f"  command wall time                  {med['cli']:6.2f} s")
    print(f"  ratio command / (import + compile) {ratio:6.2f}  (goal ≤ 2)")
    print(f"  ratio command / (import + compiler alone, no verification) {ratio_compiler:.2f}")
    print(
        f"  the same in CPU seconds (steadier on a shared machine; the command's include "
        f"its verification process): import {med['import cpu']:.2f}, compile "
        f"{med['compile cpu']:.2f}, command {med['cli cpu']:.2f}, ratio {ratio_cpu:.2f}"
    )
    for key, values in rows.items():
        print(f"  {key:12} " + "  ".join(f"{v:6.2f}" for v in values))


if __name__ == "__main__":
    main()
