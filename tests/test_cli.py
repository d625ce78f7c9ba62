"""The catalogue of bad inputs, through the installed `fxprune` command.

Each case: one line on stderr naming the problem, the right exit code, no
traceback, and every existing file left byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fxprune import zoo
from fxprune.cli.main import app

TESTS = Path(__file__).parent
EXE = shutil.which("fxprune", path=str(Path(sys.executable).parent)) or "fxprune"


def fxprune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run(
        [EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_clean_error(result, code: int, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:") or "Usage" in line]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert errors, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    torch.save(zoo.create_model("convnet").state_dict(), tmp_path / "convnet.pth")
    (tmp_path / "empty.pt").write_bytes(b"")
    data = (tmp_path / "convnet.pth").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "existing.ts").write_bytes(b"precious")
    (tmp_path / "adir").mkdir()
    return tmp_path


CASES = {
    "missing file": (["compile", "nope.pt", "--out", "o.ts"], 1, ["no such file"]),
    "directory": (["compile", "adir", "--out", "o.ts"], 1, ["directory"]),
    "empty file": (["compile", "empty.pt", "--out", "o.ts"], 1, ["empty"]),
    "truncated": (["compile", "truncated.pt", "--out", "o.ts"], 1, ["corrupt or truncated"]),
    "bare state_dict": (["compile", "convnet.pth", "--out", "o.ts"], 1, ["--weights"]),
    "wrong weights": (
        ["compile", "zoo:resnet20", "--weights", "convnet.pth", "--out", "o.ts"], 1, ["key"],
    ),
    "untraceable": (
        ["trace", "cli_models:untraceable"], 1, ["DataDependent", "--submodule"],
    ),
    "bad input shape": (["trace", "zoo:convnet", "--input-shape", "1,x,3"], 2, ["input-shape"]),
    "incompatible input shape": (
        ["trace", "zoo:convnet", "--input-shape", "1,3,8,8"], 1, ["does not run"],
    ),
    "out is input": (
        ["compile", "zoo:convnet", "--weights", "convnet.pth", "--out", "convnet.pth", "--force"],
        1, ["input"],
    ),
    "out in missing dir": (["compile", "zoo:convnet", "--out", "no/such/o.ts"], 1, ["director"]),
    "out exists": (["compile", "zoo:convnet", "--out", "existing.ts"], 1, ["--force"]),
    "unknown zoo name": (["trace", "zoo:resnet5"], 1, ["did you mean", "resnet56"]),
    "unknown torchvision name": (["trace", "torchvision:resnet21"], 1, ["did you mean"]),
    "conflicting flags": (
        ["compile", "zoo:convnet", "--threshold", "0.1", "--sparsity", "0.5", "--out", "o.ts"],
        2, ["not both"],
    ),
    "bad absorb": (["compile", "zoo:convnet", "--absorb", "x", "--out", "o.ts"], 2, ["absorb"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clean_line(case, work):
    args, code, needles = CASES[case]
    before = snapshot(work)
    result = fxprune(*args, cwd=work)
    assert_clean_error(result, code, *needles)
    assert snapshot(work) == before


def test_nan_weights_are_refused(work):
    state = zoo.create_model("convnet").state_dict()
    state["features.0.weight"] = state[next(iter(state))].clone()
    key = next(iter(state))
    state = zoo.create_model("convnet").state_dict()
    state[key][0] = float("nan")
    torch.save(state, work / "nan.pth")
    result = fxprune("compile", "zoo:convnet", "--weights", "nan.pth", "--out", "o.ts", cwd=work)
    assert_clean_error(result, 1, "NaN")
    assert not (work / "o.ts").exists()


def test_pickled_module_needs_trust_pickle(work):
    torch.save(zoo.create_model("convnet"), work / "whole.pt")
    result = fxprune("trace", "whole.pt", cwd=work)
    assert_clean_error(result, 1, "--trust-pickle", "arbitrary code")
    trusted = fxprune("trace", "whole.pt", "--trust-pickle", "--input-shape", "1,3,32,32", cwd=work)
    assert trusted.returncode == 0, trusted.stderr


def test_planted_pickle_does_not_run(work):
    sys.path.insert(0, str(TESTS))
    try:
        from cli_models import Planted
    finally:
        sys.path.remove(str(TESTS))
    marker = work / "pwned"
    torch.save({"format": "x", "payload": Planted(str(marker))}, work / "evil.pt")
    assert not marker.exists()
    result = fxprune("compile", "evil.pt", "--out", "o.ts", cwd=work)
    assert_clean_error(result, 1)
    assert not marker.exists()


def test_model_without_batchnorm_exits_zero_with_explanation(work):
    result = fxprune("trace", "cli_models:no_batchnorm", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "prunable" in result.stdout


def test_channels_last_artifact_stores_weights_channels_last_with_the_same_outputs(work):
    """`--channels-last`: every 4-D weight of the (folded) artifact is stored
    channels-last, and it computes what the default artifact computes."""
    common = ("compile", "zoo:resnet20", "--sparsity", "0.5", "--report")
    last = fxprune(*common, "cl.json", "--channels-last", "--out", "cl.ts", cwd=work)
    plain = fxprune(*common, "plain.json", "--out", "plain.ts", cwd=work)
    assert last.returncode == 0 and plain.returncode == 0, last.stderr + plain.stderr
    notes = json.loads((work / "cl.json").read_text())["notes"]
    assert "4-D weights stored channels-last" in notes
    cl, default = (torch.jit.load(str(work / f"{n}.ts")) for n in ("cl", "plain"))
    weights = [p for p in cl.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    kxk = [p for p in default.parameters() if p.dim() == 4 and p.shape[2:] != (1, 1)]
    assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in kxk)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = cl(x), default(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_compile_end_to_end_and_debug_traceback(work):
    result = fxprune("compile", "cli_models:tiny", "--out", "tiny.ts", "--emit-py", "tiny.py",
                     "--save-checkpoint", "tiny.pt", "--report", "r.json", cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "removed 2 of" in result.stdout
    for name in ("tiny.ts", "tiny.py", "tiny.weights.pt", "tiny.pt", "r.json"):
        assert (work / name).stat().st_size > 0
    refused = fxprune("compile", "tiny.pt", "--out", "tiny2.ts", cwd=work)
    assert_clean_error(refused, 1)
    assert "--arch cli_models:tiny" in refused.stderr and not (work / "tiny2.ts").exists()
    again = fxprune(
        "compile", "tiny.pt", "--arch", "cli_models:tiny", "--out", "tiny2.ts", cwd=work
    )
    assert again.returncode == 0 and "nothing to prune" in again.stdout, again.stderr
    debug = fxprune("--debug", "trace", "zoo:resnet5", cwd=work)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compile_names_pt2_when_torchscript_cannot_capture_the_model(work):
    refused = fxprune("compile", "cli_models:dataclass_output", "--out", "m.ts", cwd=work)
    assert_clean_error(refused, 1, "TorchScript cannot capture", "--out m.pt2")
    assert not (work / "m.ts").exists() and not (work / "m.pt2").exists()
    for args in (["--out", "m.pt2"], ["--out", "m.ts", "--pt2-fallback"]):
        done = fxprune("compile", "cli_models:dataclass_output", *args, "--force", cwd=work)
        assert done.returncode == 0, done.stderr
        assert "removed 2 of" in done.stdout and f"wrote {work / 'm.pt2'}" in done.stdout
        assert not (work / "m.ts").exists()
        sys.path.insert(0, str(TESTS))  # the .pt2 names cli_models.Maps
        import cli_models

        model = cli_models.dataclass_output().eval()
        x = torch.randn(model.input_shape)
        program = torch.export.load(work / "m.pt2").module()
        with torch.no_grad():
            expected, actual = model(x).maps, program(x).maps
        assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-5)


def test_cli_runner_help_and_version():
    runner = CliRunner()
    assert "fxprune" in runner.invoke(app, ["--version"]).stdout
    for command in ("trace", "compile", "report", "doctor", "zoo"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_zoo_list_and_trace_summary():
    runner = CliRunner()
    listing = runner.invoke(app, ["zoo", "list"]).stdout
    for name in ("convnet", "resnet20", "resnet110", "densenet121", "fcn_resnet50", "r3d_18"):
        assert name in listing
    traced = runner.invoke(app, ["trace", "zoo:resnet20", "--format", "json"])
    assert traced.exit_code == 0
    assert '"summary": "14 groups, 12 prunable' in traced.stdout


def test_report_compares_base_and_compact_with_accuracy(tmp_path, monkeypatch):
    """The paper's table: base and compact ConvNet, fvcore counts, accuracy on --data."""
    import json

    from fxprune.report import FORMATS

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    compiled = runner.invoke(app, ["compile", "zoo:convnet", "--sparsity", "0.5", "--out",
                                   "small.ts", "--save-checkpoint", "small.pt"])  # fmt: skip
    assert compiled.exit_code == 0, compiled.output
    args = ["report", "zoo:convnet", "small.pt", "--names", "base,compact"]
    for fmt in FORMATS:
        result = runner.invoke(app, [*args, "--format", fmt])
        assert result.exit_code == 0, result.output
        assert "compact" in result.stdout
    measured = runner.invoke(app, [*args, "--data", "synthetic", "--format", "json"])
    base, compact = json.loads(measured.stdout)["models"]
    assert base["channels"] == [96, 192, 192, 384]
    assert compact["params"] < base["params"] and compact["flops"] < base["flops"]
    assert 0.0 <= compact["accuracy"] <= 100.0 and 0.0 <= base["accuracy"] <= 100.0
    wrong = runner.invoke(app, ["report", "zoo:convnet", "--names", "a,b"])
    assert wrong.exit_code == 2 and "--names has 2 names for 1 models" in wrong.output
