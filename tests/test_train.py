"""Training: resume reproduces a straight run, snapshots, baselines, DDP, and the CLI."""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from typer.testing import CliRunner

from fxprune.analysis import analyse
from fxprune.compile import compile_model
from fxprune.errors import UsageError
from fxprune.load import load_source
from fxprune.trace import trace_model
from fxprune.train import TrainConfig, evaluate, snapshot_path, train
from fxprune.train.data import load_data
from fxprune.train.ista import penalty_targets
from fxprune.verify import TOLERANCE, relative_error, run_model

torch.set_num_threads(2)
SOURCE = "zoo:resnet20"  # fully convolutional: trains on 16x16 images, fast


@pytest.fixture(scope="module")
def tiny():
    return load_data("synthetic", train_size=64, test_size=32, batch_size=32, image_size=16)


@pytest.fixture(scope="module")
def resnet():
    loaded = load_source(SOURCE)
    traced = trace_model(loaded.module, torch.randn(1, 3, 16, 16))
    return loaded.module, traced.gm, analyse(traced.gm)


def run(resnet, data, config, out, **kwargs):
    module, gm, analysis = resnet
    model = copy.deepcopy(module)
    result = train(model, data, config, gm=gm, analysis=analysis, out_path=out, source=SOURCE,
                   **kwargs)  # fmt: skip
    return model, result


class Killed(Exception):
    pass


def kill_after_epoch(n: int):
    def progress(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == n:
            raise Killed

    return progress


def test_resume_reproduces_the_uninterrupted_run(resnet, tiny, tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, mode="ista", alpha=0.5)
    straight, result = run(resnet, tiny, config, tmp_path / "straight.pt")
    with pytest.raises(Killed):  # killed right after epoch 1's checkpoint was written
        run(resnet, tiny, config, tmp_path / "killed.pt", progress=kill_after_epoch(1))
    events: list[dict] = []
    resumed, again = run(resnet, tiny, config, tmp_path / "killed.pt",
                         resume=tmp_path / "killed.pt", progress=events.append)  # fmt: skip
    assert events[0]["event"] == "resume" and (events[0]["epoch"], events[0]["step"]) == (1, 2)
    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    assert [r["ce"] for r in result.history] == [r["ce"] for r in again.history]
    assert result.history[0]["rho"] > 0  # picked on the first batch, restored on resume
    with pytest.raises(UsageError, match="finished run"):
        run(resnet, tiny, config, tmp_path / "x.pt", resume=tmp_path / "killed.pt")


def test_ista_snapshots_checkpoints_and_compile(resnet, tiny, tmp_path):
    out = tmp_path / "run.pt"
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, mode="ista", rho=2.0, alpha=0.5,
                         snapshot_at=[0.3, 0.5])  # fmt: skip
    model, result = run(resnet, tiny, config, out)
    assert result.sparsity >= 0.5 and result.refused == []
    assert result.snapshots == [snapshot_path(out, 0.3), snapshot_path(out, 0.5)]
    for level, path in zip((0.3, 0.5), result.snapshots, strict=True):
        loaded = load_source(str(path))
        assert loaded.meta["snapshot"]["level"] == level
        assert loaded.meta["snapshot"]["sparsity"] >= level
    final = load_source(str(out))
    for (key, a), b in zip(
        final.module.state_dict().items(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert_compiles_away(model, tiny)


def assert_compiles_away(model, data) -> None:
    """Exact zeros compile away and the compact model computes the same function."""
    x = next(iter(data.test))[0][:8]
    traced = trace_model(model, x[:1])
    compact = compile_model(traced)
    assert compact.removed_classes > 0
    assert relative_error(run_model(model, x), run_model(compact.gm, x)) <= TOLERANCE
    assert evaluate(compact.gm, data.test)[1] == pytest.approx(evaluate(model, data.test)[1])


@pytest.mark.parametrize("mode", ["slimming", "l1", "sfp"])
def test_baselines_end_in_exact_zeros(resnet, tiny, tmp_path, mode):
    config = TrainConfig(epochs=1, batch_size=32, mode=mode, sparsity=0.4, l1_rate=0.4,
                         sfp_rate=0.4)  # fmt: skip
    model, result = run(resnet, tiny, config, tmp_path / f"{mode}.pt")
    targets = penalty_targets(resnet[1], resnet[2])
    zeros = {t.module: int((model.get_submodule(t.module).weight == 0).sum()) for t in targets}
    if mode == "slimming":  # one global threshold
        assert sum(zeros.values()) == int(0.4 * sum(len(t.positions) for t in targets))
    else:  # the same rate in every layer
        assert zeros == {t.module: int(0.4 * len(t.positions)) for t in targets}
    assert_compiles_away(model, tiny)


def test_evaluate_counts_loss_and_accuracy(tiny):
    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.bias.expand(len(x), 10)

    loss, accuracy = evaluate(Constant(), tiny.test)
    labels = torch.cat([y for _, y in tiny.test])
    assert loss == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert accuracy == pytest.approx((labels == 0).float().mean().item())


def ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loaded = load_source(SOURCE)
        data = load_data("synthetic", train_size=64, test_size=32, batch_size=32, image_size=16)
        traced = trace_model(loaded.module, torch.randn(1, 3, 16, 16))
        config = TrainConfig(epochs=1, batch_size=32, mode="ista", rho=2.0, alpha=0.5)
        train(loaded.module, data, config, gm=traced.gm, analysis=analyse(traced.gm),
              out_path=os.path.join(out, "ddp.pt"), source=SOURCE)  # fmt: skip
        torch.save(loaded.module.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_gammas(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    gamma = states[0]["layer3.0.bn1.weight"]
    assert (gamma == 0).any()  # the prox ran, identically on both ranks
    assert (tmp_path / "ddp.pt").exists()


@pytest.fixture(scope="module")
def app():
    from fxprune.cli.train_cmd import register

    app = typer.Typer()
    register(app)
    return app


def test_cli_train_evaluate_finetune(app, tmp_path, monkeypatch):
    import fxprune.train.data

    small = functools.partial(fxprune.train.data.load_data, test_size=32, image_size=16)
    monkeypatch.setattr(fxprune.train.data, "load_data", small)  # keep the test set tiny
    runner = CliRunner()
    out = tmp_path / "cli.pt"
    args = [
        "train",
        SOURCE,
        "--data",
        "synthetic:64",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--rho",
        "20",
        "--alpha",
        "0.5",
        "--snapshot-at",
        "0.3",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.stderr and f"wrote {out}" in result.stdout
    assert (tmp_path / "cli.sparsity30.pt").exists()
    again = runner.invoke(app, args)  # refuses to overwrite without --force
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    evaluated = runner.invoke(app, ["evaluate", str(out), "--data", "synthetic:64"])
    assert evaluated.exit_code == 0 and "accuracy" in evaluated.stdout
    tuned = tmp_path / "tuned.pt"
    finetuned = runner.invoke(app, ["finetune", str(out), "--data", "synthetic:64", "--out",
                                    str(tuned), "--epochs", "1"])  # fmt: skip
    assert finetuned.exit_code == 0, finetuned.output
    assert load_source(str(tuned)).meta["train"]["config"]["mode"] == "none"
    bad = runner.invoke(app, ["train", SOURCE, "--data", "synthetic:64", "--out",
                              str(tmp_path / "b.pt"), "--mode", "magic"])  # fmt: skip
    assert isinstance(bad.exception, UsageError)


def test_fxprune_train_under_torchrun(tmp_path):
    """The real command under torchrun: 2 CPU ranks, one checkpoint, one report line."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "fxprune.cli.main", "train",
               "zoo:resnet20", "--data", "synthetic:256", "--epochs", "1",
               "--out", "run.pt"]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote") == 1, run.stdout
    loaded = load_source(str(tmp_path / "run.pt"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.module.modules())


@pytest.mark.slow
def test_paper_benchmark_smoke_run(tmp_path):
    """benchmarks/paper_cifar10.py end to end on a sliver of the built-in data: every
    compiled model computes its trained model's function and the table is written."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_cifar10.py"
    out = tmp_path / "paper.md"
    args = ["--data", "synthetic", "--epochs-scale", "0.001", "--train-size", "128",
            "--test-size", "64", "--batch-size", "32", "--rho", "0.01/0.02/0.04",
            "--out", str(out)]  # fmt: skip
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| base " in text and "| ISTA C " in text and "1,986,760" in text
    for line in text.splitlines():
        if line.startswith("| ISTA") or line.startswith("| SFP"):
            assert float(line.split("|")[6]) < TOLERANCE, line  # max relative error column
