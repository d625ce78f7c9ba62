"""Checkpoints are data: planted files through every command that reads one.

Every file of `planted.planted_files` would create a sentinel if fxprune ran
anything read from it. Each is run through the installed `fxprune` command in
a subprocess, as a user would: no sentinel, exit 1, one line on stderr, no
traceback, no output file (the whole matrix in `make test-slow`, a rotation
in `make test`; every file also goes through the loader in process).
Chaining: compiled -> ISTA-trained -> compiled again, each artifact checked
against its source with real forward passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from planted import SOURCE_PAYLOADS, planted_files, planted_names

from fxprune.analysis import analyse
from fxprune.compile import CompileOptions, compile_model
from fxprune.errors import CheckpointError
from fxprune.modules import BorderTerm
from fxprune.pipeline import load_model
from fxprune.testing import randomize_batchnorm, zero_random, zero_test_pattern
from fxprune.trace import trace_model
from fxprune.verify import TOLERANCE, relative_error, run_model

ROOT = Path(__file__).parent.parent
EXE = shutil.which("fxprune", path=str(Path(sys.executable).parent)) or "fxprune"
DATA = ["--data", "synthetic:16", "--epochs", "1", "--batch-size", "8"]
# Every command that reads a checkpoint, with the planted file as CK.
COMMANDS = {
    "compile": ["compile", "CK", "--out", "out.ts"],
    "compile --weights": ["compile", "zoo:convnet", "--weights", "CK", "--out", "out.ts"],
    "report": ["report", "CK"],
    "evaluate": ["evaluate", "CK", "--data", "synthetic:16"],
    "trace": ["trace", "CK"],
    "export": ["export", "CK", "--format", "torchscript", "--out", "out.ts"],
    "doctor": ["doctor", "CK"],
    "finetune": ["finetune", "CK", *DATA, "--out", "out.pt"],
    "train": ["train", "CK", *DATA, "--out", "out.pt"],
    "train --resume": ["train", "zoo:convnet", *DATA, "--out", "out.pt", "--resume", "CK"],
    "bench": ["bench", "CK", "--repeats", "1"],
    "bench compact": ["bench", "zoo:convnet", "CK", "--repeats", "1"],
    "plot": ["plot", "CK", "--out", "out.png"],
}
# The default run: each command refuses one kind of payload (rotating), and
# `compile` one file of each bypass class; `make test-slow` runs every file
# through every command. The in-process test below covers every file too.
KINDS = ["attrgetter_globals", "plan_factory_without_arch", "reduce_in_state_dict",
         "source_os_abort"]  # fmt: skip
ROTATION = [(c, KINDS[i % len(KINDS)]) for i, c in enumerate(sorted(COMMANDS))]
REPRESENTATIVE = ["module_attribute_exec", "default_argument", "pickle_loads_via_serialization",
                  "source_tempfile_mkdtemp", "source_this_file", "plan_base_builtins_exec",
                  "zip_with_reduce", "plan_unknown_node", "torchscript_archive"]  # fmt: skip
NAMES = planted_names()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    directory = tmp_path_factory.mktemp("planted")
    sentinel = directory / "SENTINEL"
    return planted_files(directory, sentinel), sentinel


def run_installed(args: list[str], cwd: Path, sentinel: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FXPRUNE_SENTINEL=str(sentinel))
    return subprocess.run(
        [EXE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_refused(result: subprocess.CompletedProcess, sentinel: Path, cwd: Path) -> None:
    """Exit 1, one `error:` line (progress aside), no traceback, nothing ran or was written."""
    assert not sentinel.exists(), f"payload ran: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[fxprune]")]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not [p.name for p in cwd.iterdir() if p.name.startswith("out")]


def _run_case(planted, tmp_path, command: str, name: str) -> None:
    files, sentinel = planted
    args = [str(files[name]) if a == "CK" else a for a in COMMANDS[command]]
    assert_refused(run_installed(args, tmp_path, sentinel), sentinel, tmp_path)


@pytest.mark.parametrize("command, name", ROTATION)
def test_every_command_refuses_planted_files(planted, tmp_path, command, name):
    _run_case(planted, tmp_path, command, name)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_compile_refuses_each_bypass_class(planted, tmp_path, name):
    _run_case(planted, tmp_path, "compile", name)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_whole_matrix(planted, tmp_path, command, name):
    _run_case(planted, tmp_path, command, name)


def test_every_planted_file_refused_in_process(planted):
    """The one loader, called as a library: a CheckpointError each, nothing runs."""
    files, sentinel = planted
    for name, path in files.items():
        with pytest.raises(CheckpointError):
            load_model(str(path))
        assert not sentinel.exists(), name


def test_stored_source_refusal_names_the_safe_way(planted):
    files, _ = planted
    for name in SOURCE_PAYLOADS:
        with pytest.raises(CheckpointError, match="no longer runs: rebuild it from its base"):
            load_model(str(files[name]))


def test_factory_base_needs_the_same_arch(planted, tmp_path):
    """A factory named by the file runs only when the user names it too."""
    files, sentinel = planted
    path = str(files["plan_factory_without_arch"])
    with pytest.raises(CheckpointError, match="add --arch tests.planted:touch_sentinel"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not on --arch os:getcwd"):
        load_model(path, arch="os:getcwd")
    assert not sentinel.exists()
    with pytest.raises(CheckpointError, match="--arch zoo:convnet does not apply"):
        load_model(str(files["plan_unknown_node"]), arch="zoo:convnet")


# -- chaining: A -> B -> C ----------------------------------------------------
def _outputs_match(a: torch.nn.Module, b, shape: tuple[int, ...]) -> float:
    gen = torch.Generator().manual_seed(7)
    inputs = [torch.randn(shape, generator=gen) for _ in range(3)]
    return max(relative_error(run_model(a, x), run_model(b, x)) for x in inputs)


def test_compiled_model_trains_and_compiles_again(tmp_path):
    """compile (checkpoint) -> ISTA train the compact model -> compile again;
    every artifact and checkpoint matches its source to 1e-4."""
    sentinel = tmp_path / "unused"
    steps = [
        ["compile", "zoo:resnet20", "--sparsity", "0.3", "--out", "a.ts", "--save-checkpoint",
         "a.pt"],
        ["train", "a.pt", *DATA, "--mode", "ista", "--rho", "20", "--alpha", "1", "--out", "b.pt"],
        ["compile", "b.pt", "--out", "c.ts", "--save-checkpoint", "c.pt"],  # ISTA's exact zeros
    ]  # fmt: skip
    for args in steps:
        result = run_installed(args, tmp_path, sentinel)
        assert result.returncode == 0, result.stderr
    removed = [line for line in result.stdout.splitlines() if line.startswith("removed ")]
    assert removed and not removed[0].startswith("removed 0 "), result.stdout
    shape = (1, 3, 32, 32)
    a, b, c = (load_model(str(tmp_path / f"{n}.pt")).module for n in "abc")
    assert _outputs_match(b, c, shape) <= TOLERANCE
    assert _outputs_match(c, torch.jit.load(str(tmp_path / "c.ts")), shape) <= TOLERANCE
    assert _outputs_match(a, torch.jit.load(str(tmp_path / "a.ts")), shape) <= TOLERANCE
    params = [sum(p.numel() for p in m.parameters()) for m in (a, b, c)]
    assert params[2] < params[1] == params[0]
    record = torch.load(tmp_path / "c.pt", weights_only=True)["architecture"]
    assert record["base"] == "zoo:resnet20" and len(record["steps"]) == 2


# -- the plan, in process -----------------------------------------------------
@pytest.mark.parametrize("source, absorb", [("zoo:resnet20", "exact"), ("zoo:convnet", "bias")])
def test_plan_replay_rebuilds_the_same_model(source, absorb):
    """compile records a plan; compiling a fresh base with it gives the same
    structure (strict state_dict load) and the same outputs."""
    loaded = load_model(source)
    randomize_batchnorm(loaded.module, 0)
    traced = trace_model(loaded.module, loaded.example)
    analyse(traced.gm)
    zero_test_pattern(traced.gm, 0.5, 0)
    result = compile_model(traced, CompileOptions(absorb=absorb))
    assert result.plan.removed and result.plan.absorbed
    fresh = load_model(source)
    replayed = compile_model(trace_model(fresh.module, loaded.example), plan=result.plan).gm
    replayed.load_state_dict(result.gm.state_dict(), strict=True)
    assert _outputs_match(result.gm, replayed, tuple(loaded.example.shape)) == 0.0
    if absorb == "exact":  # the bias fold is the paper's, inexact at padded borders
        assert _outputs_match(traced.gm, replayed, tuple(loaded.example.shape)) <= TOLERANCE


def test_compiled_model_is_analysed_and_compiles_again():
    """Border terms are understood (not frozen leaves): a compiled model's
    channels are prunable again, and a second compile is exact."""
    loaded = load_model("zoo:convnet")
    randomize_batchnorm(loaded.module, 0)
    traced = trace_model(loaded.module, loaded.example)
    analyse(traced.gm)
    zero_random(traced.gm, 0.5, 0)
    first = compile_model(traced)
    assert any(isinstance(m, BorderTerm) for m in first.gm.modules())
    again = trace_model(first.gm, loaded.example)
    analysis = analyse(again.gm)
    rules = {n.meta.get("channel_rule") for n in again.gm.graph.nodes}
    assert "border" in rules and not again.leaves
    border_groups = {g.index for g in analysis.groups if g.prunable_channels > 0}
    assert border_groups
    randomize_batchnorm(again.gm, 1)
    zero_random(again.gm, 0.5, 1)
    second = compile_model(again)
    assert second.removed_classes > 0
    assert _outputs_match(again.gm, second.gm, tuple(loaded.example.shape)) <= TOLERANCE
