"""Issue 14's hardening catalogue, through the installed `fxprune` command.

Each case runs the real entry point in a subprocess (the typer and click that are
actually installed): one line on stderr, the right exit code, no traceback, and
no existing file replaced or lost.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_cli import assert_clean_error, fxprune, snapshot

USAGE = {
    "unknown option": ["compile", "zoo:resnet20", "--bogus"],
    "bad value": ["compile", "zoo:convnet", "--out", "o.ts", "--verify", "abc"],
    "missing argument": ["compile"],
    "missing option": ["compile", "zoo:convnet"],
    "unknown command": ["nosuchcommand"],
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2_with_one_line(case: str, tmp_path: Path) -> None:
    result = fxprune(*USAGE[case], cwd=tmp_path)
    assert_clean_error(result, 2)
    assert "internal error" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.iterdir())


SHAPES = {
    "memory budget": (["--input-shape", "1,3,100000,100000"], 2, "elements"),
    "int64 overflow": (["--input-shape", "1,3,9223372036854775808,2"], 2, "elements"),
    "not an integer": (["--input-shape", "1,3,2^63,2"], 2, "integers"),
    "zero": (["--input-shape", "1,3,0,32"], 2, "positive"),
    "rank 1": (["--input-shape", "7"], 2, "rank"),
    "rank 6": (["--input-shape", "1,3,2,2,2,2"], 2, "rank"),
    "nan threshold": (["--threshold", "nan"], 2, "finite"),
    "inf threshold": (["--threshold", "inf"], 2, "finite"),
    "negative threshold": (["--threshold=-0.5"], 2, "≥ 0"),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_shapes_and_thresholds_are_checked_up_front(case: str, tmp_path: Path) -> None:
    args, code, needle = SHAPES[case]
    result = fxprune("compile", "zoo:convnet", "--out", "o.ts", *args, cwd=tmp_path)
    assert_clean_error(result, code, needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["nan threshold", "inf threshold", "negative threshold"])
def test_prune_checks_thresholds_as_compile_does(case: str, tmp_path: Path) -> None:
    args, code, needle = SHAPES[case]  # `prune --threshold nan` was accepted before
    result = fxprune("prune", "zoo:convnet", "--out", "o.pt", *args, cwd=tmp_path)
    assert_clean_error(result, code, needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("factory", ["huge_shape", "text_shape", "negative_shape"])
def test_factory_input_shape_is_checked(factory: str, tmp_path: Path) -> None:
    result = fxprune("trace", f"hardening_models:{factory}", cwd=tmp_path)
    assert_clean_error(result, 1, "input_shape")


def test_checkpoint_input_shape_is_checked(tmp_path: Path) -> None:
    made = fxprune("compile", "zoo:convnet", "--out", "c.ts", "--save-checkpoint", "c.pt",
                   cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    for bad in ([1, 3, 100_000, 100_000], [1, 3, "32", 32], [3], 7):
        checkpoint["input_shape"] = bad
        torch.save(checkpoint, tmp_path / "bad.pt")
        result = fxprune("trace", "bad.pt", cwd=tmp_path)
        assert_clean_error(result, 1, "input_shape")


def _garbage_files(folder: Path) -> dict[str, Path]:
    torch.save({"layer": torch.nn.Linear(2, 2)}, folder / "objects.pt")
    (folder / "random.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy())
    (folder / "text.pt").write_text("these are not the weights you are looking for\n")
    (folder / "zipish.pt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    return {p.stem: p.name for p in folder.iterdir()}


def test_corrupt_files_are_not_called_pickles(tmp_path: Path) -> None:
    files = _garbage_files(tmp_path)
    garbage = [["trace", files[stem]] for stem in ("random", "text", "zipish")]
    for args in [*garbage, ["trace", "zoo:convnet", "--weights", files["random"]]]:
        result = fxprune(*args, cwd=tmp_path)
        assert_clean_error(result, 1, "corrupt", "not a checkpoint")
        assert "pickle" not in result.stderr, result.stderr
    source = fxprune("trace", files["objects"], cwd=tmp_path)
    assert_clean_error(source, 1, "pickles Python objects", "--trust-pickle")
    weights = fxprune("trace", "zoo:convnet", "--weights", files["objects"], cwd=tmp_path)
    assert_clean_error(weights, 1, "pickles Python objects", "state_dict")
    assert "--trust-pickle" not in weights.stderr


AUX = {
    "googlenet": ("1,3,64,64", "aux1.conv.conv.weight"),
    "inception_v3": ("1,3,80,80", "AuxLogits.conv0.conv.weight"),
}


@pytest.mark.parametrize("name", sorted(AUX))
def test_official_weights_with_aux_heads_load(name: str, tmp_path: Path) -> None:
    import torchvision

    shape, aux_key = AUX[name]
    build = getattr(torchvision.models, name)
    state = build(weights=None, aux_logits=True, init_weights=False).state_dict()
    assert aux_key in state  # the layout of the official checkpoints
    torch.save(state, tmp_path / "official.pth")
    args = ["trace", f"torchvision:{name}", "--input-shape", shape, "--weights"]
    result = fxprune(*args, "official.pth", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state["aux3.weight"] = torch.zeros(1)  # not an aux head of this model: still refused
    torch.save(state, tmp_path / "extra.pth")
    assert_clean_error(fxprune(*args, "extra.pth", cwd=tmp_path), 1, "unexpected key 'aux3.weight'")


def _depends_on_input(artifact: Path, shape: list[int]) -> bool:
    module = torch.jit.load(str(artifact))
    first, second = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        return not torch.allclose(module(first), module(second), rtol=1e-4, atol=1e-6)


def _check_floor(artifact: Path) -> dict:
    from fxprune.export import read_metadata

    meta = read_metadata(artifact)
    for layer, width in meta["channels"].items():
        assert width["after"] >= max(1, -(-width["before"] // 10)), (layer, width)
    return meta


@pytest.mark.parametrize("prune", [["--sparsity", "0.9"], ["--threshold", "10"]])
def test_pruning_keeps_a_floor_and_refuses_constant_models(prune: list[str], tmp_path) -> None:
    # without the floor, zoo:resnet20 --sparsity 0.9 zeroes whole groups (with the old
    # Eq. 2 divisor even --sparsity 0.5 did: "drift 1.003");
    # --threshold 10 selects every channel of zoo:convnet (random γ are ≤ 1)
    model = "zoo:resnet20" if prune[0] == "--sparsity" else "zoo:convnet"
    kept = fxprune("compile", model, *prune, "--out", "kept.ts", cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    meta = _check_floor(tmp_path / "kept.ts")
    assert meta["params"]["after"] < meta["params"]["before"]
    assert _depends_on_input(tmp_path / "kept.ts", meta["input_shape"])
    bare = [*prune, "--min-keep", "0", "--out", "const.ts"]
    refused = fxprune("compile", model, *bare, cwd=tmp_path)
    assert_clean_error(refused, 1, "no longer depends on its input", "--allow-constant", "group")
    assert not (tmp_path / "const.ts").exists()
    forced = fxprune("compile", model, *bare, "--allow-constant", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert not _depends_on_input(tmp_path / "const.ts", meta["input_shape"])


def _same_file_cases(folder: Path) -> dict[str, list[str]]:
    (folder / "existing.ts").write_bytes(b"precious")
    (folder / "link.json").symlink_to("new.ts")
    os.link(folder / "existing.ts", folder / "hard.json")
    return {
        "same name": ["--out", "new.ts", "--report", "new.ts"],
        "symlink": ["--out", "new.ts", "--report", "link.json"],
        "hard link": ["--out", "existing.ts", "--force", "--report", "hard.json"],
        "emit-py weights": ["--out", "new.ts", "--emit-py", "m.py", "--save-checkpoint",
                            "m.weights.pt"],
    }  # fmt: skip


def test_outputs_of_one_command_are_distinct(tmp_path: Path) -> None:
    cases = _same_file_cases(tmp_path)
    before = snapshot(tmp_path)
    for args in cases.values():
        result = fxprune("compile", "zoo:convnet", *args, cwd=tmp_path)
        assert_clean_error(result, 2, "same file")
        assert snapshot(tmp_path) == before


@contextlib.contextmanager
def _unwritable(folder: Path):
    """A directory even root cannot write in (chmod, plus chattr +i when root)."""
    folder.mkdir()
    folder.chmod(0o555)
    chattr = ["chattr", "+i", str(folder)]
    immutable = os.geteuid() == 0 and not subprocess.run(chattr, capture_output=True).returncode
    try:
        if os.access(folder, os.W_OK) and not immutable:
            pytest.skip("cannot make a directory unwritable here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_unwritable_or_too_long_outputs_fail_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "existing.ts").write_bytes(b"precious")
    with _unwritable(tmp_path / "ro"):
        before = snapshot(tmp_path)
        args = ["--out", "existing.ts", "--force", "--report", "ro/r.json"]
        result = fxprune("compile", "zoo:convnet", *args, cwd=tmp_path)
        assert_clean_error(result, 1, "cannot write in")
        assert "loading" not in result.stderr  # refused before the pipeline started
        assert snapshot(tmp_path) == before
    long_name = "a" * 250 + ".ts"
    result = fxprune("compile", "zoo:convnet", "--out", long_name, cwd=tmp_path)
    assert_clean_error(result, 1, "bytes long")
    assert "loading" not in result.stderr
    assert snapshot(tmp_path) == before


def test_outputs_are_written_all_or_nothing(tmp_path: Path) -> None:
    from fxprune.files import atomic_write, staged_writes

    (tmp_path / "a.ts").write_bytes(b"old a")

    def fail(_tmp: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError), staged_writes():
        atomic_write(tmp_path / "a.ts", lambda tmp: tmp.write_bytes(b"new a"), force=True)
        atomic_write(tmp_path / "b.json", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ts"]  # no temp litter either
    assert (tmp_path / "a.ts").read_bytes() == b"old a"
    with staged_writes():
        atomic_write(tmp_path / "a.ts", lambda tmp: tmp.write_bytes(b"new a"), force=True)
        atomic_write(tmp_path / "b.json", lambda tmp: tmp.write_bytes(b"b"))
        assert (tmp_path / "a.ts").read_bytes() == b"old a"  # nothing renamed yet
    assert (tmp_path / "a.ts").read_bytes() == b"new a" and (tmp_path / "b.json").exists()


def test_stale_temp_cleanup_does_not_glob_the_target_name(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    unrelated = tmp_path / "d" / ".other.ts.fxprune-tmp-999999999-abcd.ts"
    unrelated.write_bytes(b"someone else's")
    os.utime(unrelated, (1, 1))  # old, and its pid does not run: stale for other.ts
    result = fxprune("compile", "zoo:convnet", "--out", "d/*", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert unrelated.exists() and (tmp_path / "d" / "*").stat().st_size > 0
