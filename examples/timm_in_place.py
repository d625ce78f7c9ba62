"""A timm model trained with ISTA in a plain PyTorch loop, pruned in place, trained on.

Nothing is downloaded: the model is built with `pretrained=False` and the data
are generated (4 classes: a bright square in one quadrant of a noisy image).

    python examples/timm_in_place.py            # resnet18 at 64×64, 40 steps
    python examples/timm_in_place.py --fast     # 32×32, 12 steps (what the test runs)

What it shows: `fxprune.ista_for` gives the paper's penalties (Eq. 2) for
*this* model and wraps the user's own optimizer; after training,
`fxprune.prune_` removes the channels whose γ reached exactly zero from the
timm model itself (still a `timm.models.resnet.ResNet`), verified against the
unpruned model to 1e-4; then the same loop simply continues.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch.nn.functional as F

import fxprune
from fxprune.verify import relative_error, run_model

LR = 0.05
SHRINK = 0.006  # the prox shrinks the median γ by this much per step (sets ρ)
ALPHA = 0.05  # γ–W rescaling: γ start at 0.05 instead of 1


def batch(size: int, n: int = 16, gen: torch.Generator | None = None):
    """Noisy images with a bright square in the quadrant given by the label."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 3, size, size, generator=gen)
    half = size // 2
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, r * half : r * half + half, c * half : c * half + half] += 1.0
    return x, y


def train_steps(model, optimizer, steps: int, size: int, gen) -> float:
    model.train()
    for _ in range(steps):
        x, y = batch(size, gen=gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return loss.item()


def main(name: str = "resnet18", size: int = 64, steps: int = 40) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4)
    example = batch(size, n=2, gen=gen)[0]

    ista = fxprune.ista_for(model, example, rho=0.0)
    ista.step_rho(SHRINK, LR)  # a strong ρ, so that a short run makes exact zeros
    refused = ista.rescale(ALPHA)  # γ–W rescaling: small γ reach zero in few steps
    sgd = torch.optim.SGD(ista.param_groups(weight_decay=1e-4), lr=LR, momentum=0.9)
    optimizer = ista.wrap(sgd)
    loss = train_steps(model, optimizer, steps, size, gen)
    ista.unscale(ALPHA)
    sparsity = ista.sparsity()  # (the penalties describe the model before pruning)
    print(
        f"{name}: {steps} ISTA steps, loss {loss:.3f}, γ sparsity {sparsity:.1%}, "
        f"{len(ista.targets)} BN layers penalised, rescaling refused on {len(refused)}"
    )

    before = copy.deepcopy(model)
    report = fxprune.prune_(model, example)
    error = relative_error(run_model(before, example), run_model(model, example))
    print(report.summary().splitlines()[0])
    print(f"still {type(model).__module__}.{type(model).__name__}; max relative error {error:.1e}")

    # the same loop goes on with a fresh optimizer (parameter shapes changed)
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss = train_steps(model, sgd, 1, size, gen)
    print(f"one more training step after pruning: loss {loss:.3f}")
    return {"model": model, "report": report, "error": error, "loss": loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--fast", action="store_true", help="32×32 inputs, 12 steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    main(args.model, *((32, 12) if args.fast else (64, 40)))
