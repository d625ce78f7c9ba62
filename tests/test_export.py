"""Atomic writes and verified exports: real files, real forward passes, a real child process."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fxprune import zoo
from fxprune.errors import ExportError, UsageError, VerificationError
from fxprune.export import (
    export_onnx,
    export_pt2,
    export_torchscript,
    read_metadata,
    run_artifact_isolated,
    verify_artifact,
)
from fxprune.files import TMP_MARKER, atomic_write, clean_stale_temps
from fxprune.verify import TOLERANCE, relative_error


class SmallNet(nn.Module):
    """Three conv layers with BN and a linear head: the shape of the paper's ConvNet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Unscriptable(nn.Module):
    """torch.jit.script rejects the generator expression; torch.jit.trace handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(channel for channel in self.conv(x).unbind(1))


def assert_no_litter(directory: Path) -> None:
    assert [p.name for p in directory.iterdir() if TMP_MARKER in p.name] == []


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory, example):
    torch.manual_seed(0)
    model = SmallNet().eval()
    path = tmp_path_factory.mktemp("ts") / "small.ts"
    metadata = {"fxprune": "0.1.0", "input_shape": [2, 3, 16, 16], "kept": {"conv1": 8}}
    result = export_torchscript(model, example, path, metadata=metadata)
    return model, path, metadata, result


# --------------------------------------------------------------------------- atomic_write


def write_text(text: str):
    return lambda tmp: tmp.write_text(text)


def test_atomic_write_creates_file_in_same_directory_without_litter(tmp_path: Path) -> None:
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"payload")

    target = atomic_write(tmp_path / "out.bin", writer)
    assert target == tmp_path / "out.bin" and target.read_bytes() == b"payload"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(f".out.bin{TMP_MARKER}")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert_no_litter(tmp_path)


def test_atomic_write_refuses_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ExportError, match="already exists.*--force"):
        atomic_write(target, write_text("new"))
    assert target.read_text() == "old"
    atomic_write(target, write_text("new"), force=True)
    assert target.read_text() == "new"
    assert_no_litter(tmp_path)


def test_atomic_write_refuses_protected_input_even_through_a_symlink(tmp_path: Path) -> None:
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"weights")
    link = tmp_path / "link.pt"
    link.symlink_to(model_file)
    for out in (model_file, link, tmp_path / "sub" / ".." / "model.pt"):
        with pytest.raises(ExportError, match="input file"):
            atomic_write(out, write_text("x"), force=True, protect=[model_file])
    assert model_file.read_bytes() == b"weights"


def test_atomic_write_refuses_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist") as info:
        atomic_write(tmp_path / "nope" / "out.ts", write_text("x"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "nope").exists()


def test_failed_writer_leaves_target_byte_identical_and_no_litter(tmp_path: Path) -> None:
    target = tmp_path / "out.ts"
    original = os.urandom(4096)
    target.write_bytes(original)

    def half_write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_write, force=True)
    assert target.read_bytes() == original
    assert_no_litter(tmp_path)


def test_clean_stale_temps_removes_only_this_targets_litter(tmp_path: Path) -> None:
    litter = tmp_path / f".out.ts{TMP_MARKER}dead.ts"
    other = tmp_path / f".other.ts{TMP_MARKER}dead.ts"
    litter.write_text("x")
    other.write_text("x")
    assert clean_stale_temps(tmp_path / "out.ts") == []  # too young: may be a live writer
    live = tmp_path / f".out.ts{TMP_MARKER}{os.getpid()}-abcd.ts"
    live.write_text("x")
    assert clean_stale_temps(tmp_path / "out.ts") == []  # its writer (this process) runs
    live.unlink()
    assert clean_stale_temps(tmp_path / "out.ts", min_age_s=0) == [litter]
    assert not litter.exists() and other.exists()


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_export_verifies_in_a_process_without_fxprune(small_artifact, example):
    model, path, metadata, result = small_artifact
    assert result.format == "torchscript" and result.method == "script"
    assert result.warnings == [] and result.max_rel_error <= TOLERANCE
    assert importlib.util.find_spec("fxprune") is not None  # importable here ...
    run = run_artifact_isolated(path, example)
    assert "No module named 'fxprune'" in run.fxprune_import_error  # ... but not in the child
    with torch.no_grad():
        assert relative_error(model(example), run.output) <= TOLERANCE
    assert run.metadata == metadata
    assert_no_litter(path.parent)


def test_metadata_round_trips(small_artifact):
    _, path, metadata, result = small_artifact
    assert read_metadata(path) == metadata == result.metadata


def test_verify_artifact_rejects_wrong_outputs_and_metadata(small_artifact, example):
    model, path, metadata, _ = small_artifact
    with torch.no_grad():
        wrong = model(example) * 1.01
    with pytest.raises(VerificationError, match=r"differs from the original by 0\.0099") as info:
        verify_artifact(path, example, wrong, metadata=metadata)
    assert "\n" not in str(info.value)
    with pytest.raises(VerificationError, match="metadata"):
        verify_artifact(path, example, wrong / 1.01, metadata={"other": 1})


def test_verify_artifact_reports_the_childs_error(tmp_path: Path, example):
    broken = tmp_path / "broken.ts"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(ExportError, match="does not load in a fresh Python") as info:
        verify_artifact(broken, example, example)
    assert "RuntimeError" in str(info.value) and "\n" not in str(info.value)


def test_trace_fallback_when_script_fails(tmp_path: Path, example):
    module = Unscriptable()
    result = export_torchscript(module, example, tmp_path / "traced.ts", metadata={"k": 1})
    assert result.method == "trace" and module.training  # training flag restored
    assert result.warnings[0].startswith("torch.jit.script failed (RuntimeError:")
    assert result.max_rel_error <= TOLERANCE
    assert read_metadata(result.path) == {"k": 1}


def test_fx_traced_googlenet_exports_and_verifies(tmp_path: Path):
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    graph_module = torch.fx.symbolic_trace(net)
    example = torch.randn(1, 3, 64, 64)
    result = export_torchscript(graph_module, example, tmp_path / "googlenet.ts", metadata={})
    assert result.method in ("script", "trace") and result.max_rel_error <= TOLERANCE


def test_fx_traced_inception_v3_exports_and_verifies(tmp_path: Path):
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    example = torch.randn(1, 3, 80, 80)
    result = export_torchscript(
        torch.fx.symbolic_trace(net), example, tmp_path / "i.ts", metadata={}
    )
    assert result.max_rel_error <= TOLERANCE


def test_failed_verification_keeps_the_old_artifact(tmp_path: Path, example):
    target = tmp_path / "model.ts"
    target.write_bytes(b"previous artifact")
    with pytest.raises(VerificationError):
        export_torchscript(SmallNet(), example, target, metadata={}, force=True, rtol=-1.0)
    assert target.read_bytes() == b"previous artifact"
    assert_no_litter(tmp_path)


def test_export_refuses_bad_targets_and_metadata_before_any_work(tmp_path: Path, example):
    source = tmp_path / "model.pt"
    source.write_bytes(b"input")
    with pytest.raises(ExportError, match="input file"):
        export_torchscript(SmallNet(), example, source, metadata={}, force=True, protect=[source])
    with pytest.raises(UsageError, match="JSON"):
        export_torchscript(SmallNet(), example, tmp_path / "m.ts", metadata={"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# --------------------------------------------------------------------------- output comparison


def test_relative_error_flattens_tuples_lists_and_dicts():
    a, b = torch.ones(2, 3), torch.full((4,), 2.0)
    expected = {"logits": a, "aux": (b, None)}
    assert relative_error(expected, [a, b]) == 0.0
    assert relative_error(expected, {"logits": a, "aux": [b + 0.02]}) == pytest.approx(0.01)
    with pytest.raises(VerificationError, match="returned 1 tensors, expected 2"):
        relative_error(expected, a)
    with pytest.raises(VerificationError, match="shape"):
        relative_error(a, a.t())


# --------------------------------------------------------------------------- pt2 and ONNX


def test_pt2_export_round_trips(tmp_path: Path, example):
    result = export_pt2(SmallNet(), example, tmp_path / "small.pt2", metadata={"a": [1]})
    assert result.format == "pt2" and result.max_rel_error <= TOLERANCE
    extra = {"fxprune.json": ""}
    loaded = torch.export.load(result.path, extra_files=extra)
    assert extra["fxprune.json"] == '{"a": [1]}'
    assert loaded.module()(example).shape == (2, 10)
    with pytest.raises(ExportError, match="already exists"):
        export_pt2(SmallNet(), example, result.path)
    assert_no_litter(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None, reason="onnx is installed")
def test_onnx_without_onnx_names_the_extra(tmp_path: Path, example):
    with pytest.raises(ExportError, match=r"pip install fxprune\[onnx\]"):
        export_onnx(SmallNet(), example, tmp_path / "small.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="needs fxprune[onnx]")
def test_onnx_export_is_single_file_and_verified(tmp_path: Path, example):
    result = export_onnx(SmallNet(), example, tmp_path / "small.onnx", metadata={"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]  # weights inline
    if importlib.util.find_spec("onnxruntime") is not None:
        assert result.max_rel_error <= TOLERANCE
    else:
        assert result.max_rel_error is None and "not verified" in " ".join(result.warnings)


# --------------------------------------------------------------------------- interrupted writes

# Writes a large checkpoint through atomic_write, slowly, so the test can kill it mid-write.
SLOW_WRITER = """
import sys, time
import torch
from fxprune.files import atomic_write

class Slow:
    def __init__(self, f):
        self.f = f
    def write(self, b):
        time.sleep(0.002)
        return self.f.write(b)
    def flush(self):
        self.f.flush()

def writer(tmp):
    state = {f"layer{i}": torch.randn(256, 1024) for i in range(64)}  # 64 MiB of weights
    with open(tmp, "wb") as f:
        torch.save(state, Slow(f), _use_new_zipfile_serialization=False)

atomic_write(sys.argv[1], writer, force=True)
"""


def test_kill_during_write_keeps_the_old_file_and_the_next_write_cleans_up(tmp_path: Path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the previous checkpoint")
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)])
    deadline = time.monotonic() + 120
    litter: list[Path] = []
    while time.monotonic() < deadline and child.poll() is None:
        litter = [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]
        if litter and litter[0].stat().st_size > 1 << 20:  # well into the write
            break
        time.sleep(0.02)
    assert child.poll() is None, "the writer finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_bytes() == b"the previous checkpoint"
    assert [p.exists() for p in litter] == [True]  # SIGKILL leaves the temp file behind
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"), force=True)  # the next run
    assert target.read_bytes() == b"new"
    assert_no_litter(tmp_path)


# --------------------------------------------------------------------------- compact models


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_pt2_and_onnx_of_compact_models_match(name: str, tmp_path: Path) -> None:
    """A compiled ResNet-20 and MobileNetV2 (half of every group zeroed) exported as
    .pt2 and ONNX, reloaded independently and compared with the compact model."""
    from helpers import compile_checked

    shape = (1, 3, 32, 32) if name == "resnet20" else (1, 3, 64, 64)
    traced, result, errors = compile_checked(zoo.create_model(name).eval(), shape)
    assert max(errors) <= TOLERANCE and result.removed_classes > 0
    x = torch.randn(shape)
    with torch.no_grad():
        expected = result.gm(x)
    pt2 = export_pt2(result.gm, x, tmp_path / "small.pt2")
    reloaded = torch.export.load(pt2.path).module()
    with torch.no_grad():
        assert relative_error(expected, reloaded(x)) <= TOLERANCE
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("needs fxprune[onnx] (onnxruntime) for the ONNX half")
    import onnxruntime

    onnx_file = export_onnx(result.gm, x, tmp_path / "small.onnx")
    session = onnxruntime.InferenceSession(str(onnx_file.path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert relative_error(expected, torch.from_numpy(out)) <= TOLERANCE
