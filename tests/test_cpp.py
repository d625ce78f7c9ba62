"""examples/cpp: build the libtorch loader against the installed torch wheel, run small.ts.

Slow (the build compiles against the libtorch headers: about a minute on two cores);
run with `make test-slow`. Skipped, with the reason, without cmake or a C++ compiler,
without the wheel's headers, or when the build takes more than 8 minutes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cpp"
BUILD_TIMEOUT_S = 8 * 60

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning"),
]


def _toolchain_or_skip() -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler (c++/g++) is installed")
    root = Path(torch.__file__).parent
    if not (root / "include" / "torch" / "script.h").is_file():
        pytest.skip(f"the torch wheel at {root} ships no C++ headers (include/torch/script.h)")
    if not list((root / "lib").glob("*torch_cpu*")):
        pytest.skip(f"the torch wheel at {root} ships no libtorch_cpu library")


def _run(cmd: list[str], cwd: Path, timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.skip(f"building the C++ example took more than {BUILD_TIMEOUT_S // 60} minutes")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def infer_binary(tmp_path_factory) -> Path:
    _toolchain_or_skip()
    build = tmp_path_factory.mktemp("cpp-build")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    configure = ["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DTORCH_CXX11_ABI={abi}"]  # fmt: skip
    _run(configure, build, BUILD_TIMEOUT_S)
    _run(["cmake", "--build", str(build), "-j", "2"], build, BUILD_TIMEOUT_S)
    binary = build / "fxprune_infer"
    assert binary.is_file()
    return binary


@pytest.fixture(scope="module")
def small_ts(tmp_path_factory) -> Path:
    """What `fxprune compile zoo:resnet20 --sparsity 0.5 --out small.ts` writes."""
    from fxprune.pipeline import CompileConfig, compile_source

    out = tmp_path_factory.mktemp("cpp") / "small.ts"
    compile_source(CompileConfig(source="zoo:resnet20", out=out, sparsity=0.5, verify=1))
    return out


def _printed(binary: Path, *args: str) -> list[float]:
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [float(line) for line in proc.stdout.split()]


def test_cpp_loader_prints_what_python_computes(infer_binary, small_ts):
    module = torch.jit.load(str(small_ts)).eval()
    with torch.no_grad():
        expected = module(torch.ones(1, 3, 32, 32)).flatten().double()
    printed = torch.tensor(_printed(infer_binary, str(small_ts)), dtype=torch.float64)
    assert printed.shape == expected.shape
    torch.testing.assert_close(printed, expected, rtol=1e-6, atol=1e-7)

    with torch.no_grad():
        batch = module(torch.ones(2, 3, 32, 32)).flatten().double()
    printed = torch.tensor(_printed(infer_binary, str(small_ts), "2,3,32,32"), dtype=torch.float64)
    torch.testing.assert_close(printed, batch, rtol=1e-6, atol=1e-7)


def test_cpp_loader_fails_cleanly_on_a_missing_file(infer_binary, tmp_path):
    proc = subprocess.run([str(infer_binary), str(tmp_path / "missing.ts")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot load")
