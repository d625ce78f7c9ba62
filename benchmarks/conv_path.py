"""Why small convolutions at batch 1 run slowly: PyTorch's default CPU path vs oneDNN.

Run: .venv/bin/python benchmarks/conv_path.py
For each of ResNet-50's last-stage convolutions at 7x7, before (512/2048 channels)
and after halving (256/1024), times `torch.conv2d` (which picks im2col for small
inputs at batch 1) beside `aten.mkldnn_convolution` on the same tensors.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

SHAPES = [(256, 1024, 1), (256, 256, 3), (512, 2048, 1), (512, 512, 3)]  # (in, out, kernel)


def median_us(fn: Callable[[], object], repeats: int = 50) -> float:
    for _ in range(5):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.set_num_threads(2)
    print(f"{'in':>5} {'out':>5} {'kernel':>6} {'torch.conv2d':>13} {'oneDNN':>9}")
    with torch.no_grad():
        for cin, cout, k in SHAPES:
            x, w, pad = torch.randn(1, cin, 7, 7), torch.randn(cout, cin, k, k), k // 2
            default = median_us(lambda: torch.conv2d(x, w, None, 1, pad))  # noqa: B023
            onednn = median_us(
                lambda: torch.ops.aten.mkldnn_convolution(x, w, None, [pad] * 2, [1, 1], [1, 1], 1)  # noqa: B023
            )
            print(f"{cin:5} {cout:5} {k:>4}x{k} {default:10.0f} µs {onednn:6.0f} µs")


if __name__ == "__main__":
    main()
