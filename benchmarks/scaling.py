"""Is fxprune's compile linear in the graph's size? fxprune vs Torch-Pruning on
residual chains of N blocks (N = 8 … 256), same zeros, interleaved in one run.

Each block is conv3x3-BN-ReLU-conv3x3-BN + identity on 32 channels at 16×16:
the arithmetic is small, so the time is the tools' own. Half of every prunable
group is zeroed (fxprune's test pattern). Printed per N: each side's seconds,
milliseconds per block, and the ratio fxprune / Torch-Pruning; a linear tool
keeps ms per block flat as N grows.

    .venv/bin/python benchmarks/scaling.py [--blocks 8,16,32,64,128,256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from tabulate import tabulate
from torch import nn
from vs_torch_pruning import apply_zeros, output_error, side_by_side

from fxprune.testing import randomize_batchnorm
from fxprune.verify import run_model

warnings.filterwarnings("ignore")
WIDTH, SIZE = 32, 16


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTH)
        self.conv2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def chain(blocks: int) -> nn.Module:
    """stem → `blocks` residual blocks → pool → classifier, BN statistics random."""
    model = nn.Sequential(
        nn.Conv2d(3, WIDTH, 3, padding=1, bias=False),
        nn.BatchNorm2d(WIDTH),
        nn.ReLU(),
        *[Block() for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(WIDTH, 10),
    ).eval()
    randomize_batchnorm(model)
    return model


def compare(blocks: int, repeats: int) -> list:
    x = torch.randn(1, 3, SIZE, SIZE)
    model = apply_zeros(chain(blocks), x)
    expected = run_model(model, x)
    fx_s, fx_model, tp_s, tp_model = side_by_side(model, x, repeats)
    tp_col = f"failed: {type(tp_model).__name__}" if isinstance(tp_model, Exception) else tp_s
    return [blocks, fx_s, 1e3 * fx_s / blocks, tp_col, 1e3 * tp_s / blocks, fx_s / tp_s,
            output_error(expected, fx_model, x)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="8,16,32,64,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    compare(4, 1)  # untimed: first calls (imports, caches) would land on the first row
    rows = [compare(int(n), args.repeats) for n in args.blocks.split(",")]
    print(f"residual chains, {WIDTH} channels at {SIZE}x{SIZE}, 1 thread, median of "
          f"{args.repeats} (fxprune and Torch-Pruning interleaved)")  # fmt: skip
    headers = ["blocks", "fxprune s", "fxprune ms/block", "Torch-Pruning s", "TP ms/block",
               "ratio fx/TP", "fxprune error"]  # fmt: skip
    print(tabulate(rows, headers=headers, floatfmt=".3g"))


if __name__ == "__main__":
    main()
