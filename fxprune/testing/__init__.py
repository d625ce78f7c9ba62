"""Test patterns and the random-architecture fuzzer, importable by tests,
benchmarks and `fxprune doctor`."""

from fxprune.testing.patterns import (
    randomize_batchnorm,
    zero_random,
    zero_residual_branch,
    zero_test_pattern,
)

__all__ = ["randomize_batchnorm", "zero_random", "zero_residual_branch", "zero_test_pattern"]
