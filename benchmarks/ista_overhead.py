"""Time one training step of the paper's ConvNet with IstaOptimizer vs the bare SGD.

Two identical models train side by side on the same random batches; the two
kinds of step are interleaved (A B A B ...) so drift in machine load hits both
alike. Prints the median step time of each, their ratio (goal: ≤ 1.05×), and
the time of the proximal step alone (robust to a noisy, shared machine).

    python benchmarks/ista_overhead.py [--steps 40] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from fxprune.pipeline import open_source
from fxprune.train.ista import IstaOptimizer, param_groups_for, penalty_targets


def make_steppers(batch_size: int):
    analysed = open_source("zoo:convnet")
    loaded = analysed.loaded
    targets = penalty_targets(analysed.traced.gm, analysed.analysis)
    bare_model, ista_model = loaded.module.train(), copy.deepcopy(loaded.module).train()
    bare = torch.optim.SGD(param_groups_for(bare_model, targets, 5e-4), lr=0.01, momentum=0.9)
    sgd = torch.optim.SGD(param_groups_for(ista_model, targets, 5e-4), lr=0.01, momentum=0.9)
    ista = IstaOptimizer(sgd, ista_model, targets, rho=1e-4)
    return [("bare SGD", bare_model, bare), ("IstaOptimizer", ista_model, ista)]


def timed_step(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steppers = make_steppers(args.batch_size)
    times: dict[str, list[float]] = {name: [] for name, _, _ in steppers}
    for step in range(args.steps + 3):  # 3 warm-up steps each
        x = torch.randn(args.batch_size, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch_size,))
        order = steppers if step % 2 == 0 else steppers[::-1]
        for name, model, optimizer in order:
            elapsed = timed_step(model, optimizer, x, y)
            if step >= 3:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:>14}: {value * 1000:8.1f} ms/step (median of {args.steps})")
    ratio = medians["IstaOptimizer"] / medians["bare SGD"]
    print(f"{'ratio':>14}: {ratio:8.3f}x  (goal ≤ 1.05x)")
    prox = steppers[1][2].prox
    start = time.perf_counter()
    for _ in range(200):
        prox()
    per_prox = (time.perf_counter() - start) / 200
    share = per_prox / medians["bare SGD"]
    print(f"{'prox alone':>14}: {per_prox * 1e6:8.1f} µs/step ({share:.3%} of a bare step)")


if __name__ == "__main__":
    main()
