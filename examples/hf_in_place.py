"""A Hugging Face transformers image classifier fine-tuned with ISTA, pruned in place.

Nothing is downloaded: `ResNetForImageClassification` is built from a small
`ResNetConfig` (random init), the data are generated (3 classes: a bright
square in one of three places on a noisy image), and the loss is the model's
own (`model(pixel_values=x, labels=y).loss`).

    python examples/hf_in_place.py            # 64×64, 30 steps
    python examples/hf_in_place.py --fast     # 32×32, 8 steps (what the test runs)

After `fxprune.prune_` the model is still a `ResNetForImageClassification`
(a `PreTrainedModel`); its config's widths (`embedding_size`, `hidden_sizes`:
the stem and each stage's output) are updated to what the pruned layers have.
The widths inside each block are not in the config: `from_pretrained` cannot
rebuild them, so the pruned weights are saved as data with
`save_pruned` and loaded into a model built from the original config with
`load_pruned`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from transformers import ResNetConfig, ResNetForImageClassification

import fxprune
from fxprune.compile.in_place_save import load_pruned, save_pruned
from fxprune.verify import relative_error, run_model

LR = 0.05
SHRINK = 0.2  # the prox shrinks the median γ by this much per step (sets ρ)


def config() -> ResNetConfig:
    return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                        layer_type="basic", num_labels=3)  # fmt: skip


def batch(size: int, n: int = 8, gen: torch.Generator | None = None):
    y = torch.randint(0, 3, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 3, size, size, generator=gen)
    third = size // 3
    for i, label in enumerate(y.tolist()):
        x[i, :, third : 2 * third, label * third : (label + 1) * third] += 1.0
    return x, y


def train_steps(model, optimizer, steps: int, size: int, gen) -> float:
    model.train()
    for _ in range(steps):
        x, y = batch(size, gen=gen)
        optimizer.zero_grad()
        loss = model(pixel_values=x, labels=y).loss  # the library's own loss
        loss.backward()
        optimizer.step()
    return loss.item()


def update_config_widths(model: ResNetForImageClassification) -> None:
    """Write the pruned stem and stage output widths back into `model.config`."""
    resnet = model.resnet
    model.config.embedding_size = resnet.embedder.embedder.convolution.out_channels
    model.config.hidden_sizes = [
        stage.layers[-1].layer[-1].convolution.out_channels for stage in resnet.encoder.stages
    ]


def main(size: int = 64, steps: int = 30) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = ResNetForImageClassification(config())
    example = batch(size, n=2, gen=gen)[0]

    ista = fxprune.ista_for(model, example, rho=0.0)
    ista.step_rho(SHRINK, LR)  # a strong ρ, so that a few steps make exact zeros
    sgd = torch.optim.SGD(ista.param_groups(weight_decay=1e-4), lr=LR, momentum=0.9)
    loss = train_steps(model, ista.wrap(sgd), steps, size, gen)
    print(f"{steps} ISTA steps: loss {loss:.3f}, γ sparsity {ista.sparsity():.1%}")

    before = copy.deepcopy(model)
    report = fxprune.prune_(model, example)
    error = relative_error(run_model(before, example), run_model(model, example))
    update_config_widths(model)
    print(report.summary().splitlines()[0])
    print(f"still {type(model).__name__}; config hidden_sizes {model.config.hidden_sizes}; "
          f"max relative error {error:.1e}")  # fmt: skip

    loss = train_steps(model, torch.optim.SGD(model.parameters(), lr=LR), 1, size, gen)
    print(f"one more fine-tuning step: loss {loss:.3f}")

    path = Path(tempfile.mkdtemp(prefix="fxprune_hf_")) / "pruned.pt"
    save_pruned(model, path, example=example,
                rebuild=lambda: ResNetForImageClassification(config()))  # fmt: skip
    restored = ResNetForImageClassification(config())
    load_pruned(restored, torch.load(path, weights_only=True))
    restore_error = relative_error(run_model(model, example), run_model(restored, example))
    print(f"restored from {path.name} into a model built from the original config: "
          f"max relative error {restore_error:.1e}")  # fmt: skip
    return {"model": model, "report": report, "error": error, "loss": loss,
            "restore_error": restore_error, "before": before}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="32×32 inputs, 8 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(*((32, 8) if args.fast else (64, 30)))
