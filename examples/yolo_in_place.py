"""Ultralytics YOLOv8n: ISTA with Ultralytics' own loss, pruned in place, trained on,
exported with Ultralytics' own exporter.

Nothing is downloaded: the model is built from `yolov8n.yaml` (random init,
no weights), the data are generated YOLO-format targets (bright rectangles
of two classes on noise), and the exporter writes TorchScript (no fonts, no
extra packages).

    python examples/yolo_in_place.py            # 96×96, 12 steps
    python examples/yolo_in_place.py --fast     # 64×64, 3 steps (what the test runs)

What it shows: `fxprune.ista_for` analyses the `DetectionModel` (through the
torch.export front end) and wraps a plain SGD; `fxprune.prune_` shrinks the
model's own `Conv` layers in place — it stays a `DetectionModel`, so
`model.loss(batch)` trains it one more step and Ultralytics' `Exporter`
writes it; the exported file's outputs match the pruned model's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import tempfile
from pathlib import Path

import torch

import fxprune
from fxprune.verify import relative_error, run_model

LR = 0.01
SHRINK = 0.13  # the prox shrinks the median γ by this much per step (sets ρ)


def build(nc: int = 2):
    """DetectionModel('yolov8n.yaml') with Ultralytics' default hyperparameters (for its loss)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    with contextlib.redirect_stdout(io.StringIO()):  # Ultralytics prints its layer table
        model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.args = get_cfg(DEFAULT_CFG)
    model.task = "detect"  # what YOLO() sets; the exporter reads it
    return model


def yolo_batch(size: int, n: int = 4, gen: torch.Generator | None = None) -> dict:
    """Images with one rectangle each (class 0 wide, class 1 tall) and YOLO targets:
    `cls` (n, 1), `bboxes` (n, 4) normalised xywh, `batch_idx` (n,)."""
    img = 0.1 * torch.rand(n, 3, size, size, generator=gen)
    cls = torch.randint(0, 2, (n,), generator=gen)
    boxes = []
    for i, c in enumerate(cls.tolist()):
        w, h = (0.5, 0.25) if c == 0 else (0.25, 0.5)
        cx, cy = (0.3 + 0.4 * torch.rand(2, generator=gen)).tolist()
        x0, y0 = int((cx - w / 2) * size), int((cy - h / 2) * size)
        img[i, :, y0 : y0 + int(h * size), x0 : x0 + int(w * size)] = 0.9
        boxes.append([cx, cy, w, h])
    return {"img": img, "cls": cls.float()[:, None], "bboxes": torch.tensor(boxes),
            "batch_idx": torch.arange(n).float()}  # fmt: skip


def train_steps(model, optimizer, steps: int, size: int, gen) -> float:
    """`steps` steps of Ultralytics' own detection loss (`model.loss`)."""
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _items = model.loss(yolo_batch(size, gen=gen))
        loss.sum().backward()
        optimizer.step()
    return loss.sum().item()


def export_torchscript(model, size: int, folder: Path) -> Path:
    """Ultralytics' own Exporter (it fuses Conv+BN and traces) to TorchScript."""
    from ultralytics.engine.exporter import Exporter

    model = copy.deepcopy(model)
    model.yaml["yaml_file"] = "yolov8n_pruned.yaml"  # names the file, written in the cwd
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exporter = Exporter(overrides={"format": "torchscript", "imgsz": size, "batch": 1,
                                           "device": "cpu", "verbose": False})  # fmt: skip
            return folder / Path(exporter(model=model)).name
    finally:
        os.chdir(cwd)


def update_widths(model: torch.nn.Module) -> None:
    """Ultralytics keeps each C2f/C3k2 block's hidden width in `m.c`, read by the
    `split((m.c, m.c), 1)` of its export path (the traced forward uses `chunk(2)`,
    which fxprune keeps balanced): set it to the pruned width."""
    for module in model.modules():
        conv = getattr(getattr(module, "cv1", None), "conv", None)
        if isinstance(getattr(module, "c", None), int) and isinstance(conv, torch.nn.Conv2d):
            if hasattr(module, "m") and conv.out_channels % 2 == 0:
                module.c = conv.out_channels // 2


def main(size: int = 96, steps: int = 12, folder: Path | None = None) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build()
    example = yolo_batch(size, n=1, gen=gen)["img"]

    ista = fxprune.ista_for(model, example, rho=0.0)
    ista.step_rho(SHRINK, LR)  # a strong ρ, so that a handful of steps make exact zeros
    sgd = torch.optim.SGD(ista.param_groups(weight_decay=5e-4), lr=LR, momentum=0.9)
    loss = train_steps(model, ista.wrap(sgd), steps, size, gen)
    sparsity = ista.sparsity()
    print(f"{steps} ISTA steps with Ultralytics' loss: loss {loss:.2f}, γ sparsity {sparsity:.1%}")

    before = copy.deepcopy(model)
    report = fxprune.prune_(model, example)  # border="keep": Ultralytics' fuse() sees plain convs
    update_widths(model)
    error = relative_error(run_model(before, example), run_model(model, example))
    print(report.summary().splitlines()[0])
    print(f"still {type(model).__name__}; max relative error {error:.1e}")

    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss = train_steps(model, sgd, 1, size, gen)
    print(f"one more step with Ultralytics' loss after pruning: {loss:.2f}")

    folder = Path(folder or tempfile.mkdtemp(prefix="fxprune_yolo_"))
    path = export_torchscript(model, size, folder)
    exported = torch.jit.load(str(path))
    # in export mode Detect returns its decoded boxes and scores only: the first output
    export_error = relative_error(run_model(model, example)[0], exported(example))
    print(f"Ultralytics exported {path.name} ({os.path.getsize(path):,} bytes); "
          f"outputs vs the pruned model: max relative error {export_error:.1e}")  # fmt: skip
    return {"model": model, "report": report, "error": error, "loss": loss,
            "export_error": export_error, "params_before": fxprune_params(before)}  # fmt: skip


def fxprune_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="64×64 inputs, 3 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(*((64, 3) if args.fast else (96, 12)))
