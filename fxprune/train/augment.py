"""Image transforms for the training data: which augmentations, and how images are normalised.

`--augment` takes a comma list of ``flip`` (random horizontal flip), ``crop``
(pad by 1/8 of the side and crop back at random), ``jitter`` (random brightness
and contrast) and ``standardize`` (per-image standardisation, train and test,
instead of the data set's mean/std), or a preset: ``none``, ``standard``
(flip,crop) and ``paper`` (flip,crop,jitter,standardize: the TensorFlow CIFAR-10
pipeline Ye et al. train with, not bit-identical to it).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from fxprune.errors import UsageError

__all__ = ["AUGMENTS", "PRESETS", "parse_augment", "tensor_transforms", "PerImageStandardize"]

AUGMENTS = ("flip", "crop", "jitter", "standardize")
PRESETS = {
    "none": (),
    "standard": ("flip", "crop"),
    "paper": ("flip", "crop", "jitter", "standardize"),
}
JITTER = {"brightness": 0.25, "contrast": 0.8}  # factors in [0.75, 1.25] and [0.2, 1.8]


def parse_augment(text: str | tuple[str, ...] | None, default: str) -> tuple[str, ...]:
    """The augmentation names of `text` (a preset or a comma list); `default` when None."""
    if text is None:
        text = default
    if isinstance(text, tuple):
        names = text
    elif text in PRESETS:
        return PRESETS[text]
    else:
        names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown or not names:
        raise UsageError(
            f"--augment '{text}': use {', '.join(PRESETS)} or a comma list of {', '.join(AUGMENTS)}"
        )
    return tuple(n for n in AUGMENTS if n in names)


class PerImageStandardize:
    """(x − mean(x)) / max(std(x), 1/√N) per image (tf.image.per_image_standardization)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        adjusted = image.std().clamp_min(1.0 / math.sqrt(image.numel()))
        return (image - image.mean()) / adjusted


def tensor_transforms(
    augment: tuple[str, ...],
    native: int,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[v2.Transform, v2.Transform]:
    """Train and test transforms for uint8 (C, H, W) tensors of side `native`, resized to `size`."""
    random = []
    if "crop" in augment:
        random.append(v2.RandomCrop(native, padding=max(1, native // 8)))
    if "flip" in augment:
        random.append(v2.RandomHorizontalFlip())
    resize = [v2.Resize(size, antialias=True)] if size != native else []
    to_float = [v2.ToDtype(torch.float32, scale=True)]
    jitter = [v2.ColorJitter(**JITTER)] if "jitter" in augment else []
    normalise = [PerImageStandardize()] if "standardize" in augment else [v2.Normalize(mean, std)]
    train = v2.Compose(random + resize + to_float + jitter + normalise)
    test = v2.Compose(resize + to_float + normalise)
    return train, test
