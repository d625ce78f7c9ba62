"""``sklearn-digits``: scikit-learn's bundled copy of the UCI handwritten digits.

1,797 real 8×8 scans of digits 0-9 (grey levels 0-16), shipped inside
scikit-learn (nothing is downloaded; install the ``digits`` extra). They are
upscaled once to 32×32 (bilinear), repeated over 3 channels so the CIFAR models
take them unchanged, and split once and for all: a permutation seeded with
`SPLIT_SEED` (not the run's seed) puts `TEST_COUNT` = 360 images in the test
split and 1,437 in the training split. Default augmentation: none (a flipped
digit is another digit).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fxprune.errors import DataError
from fxprune.train.augment import parse_augment, tensor_transforms

__all__ = ["digits_datasets", "DIGIT_CLASSES", "TEST_COUNT", "SPLIT_SEED"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
TEST_COUNT = 360  # 20 % of 1,797
SPLIT_SEED = 0
NATIVE, UPSCALED = 8, 32


def _load() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "sklearn-digits needs scikit-learn: pip install 'fxprune[digits]'"
        ) from None
    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def upscale(images: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) grey levels 0-16 -> (N, 3, 32, 32) uint8 0-255."""
    x = torch.from_numpy(images)[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(UPSCALED, UPSCALED), mode="bilinear", align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)


def digits_datasets(size: int, augment: str | None):
    """The fixed train and test splits, transformed to side `size`."""
    from fxprune.train.data import TensorImages  # the one tensor-images dataset

    images, labels = _load()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_idx, train_idx = order[:TEST_COUNT], order[TEST_COUNT:]
    pixels = upscale(images)
    train_pixels = pixels[train_idx].float() / 255
    mean = tuple(float(v) for v in train_pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in train_pixels.std(dim=(0, 2, 3)))
    chosen = parse_augment(augment, default="none")
    train_tf, test_tf = tensor_transforms(chosen, UPSCALED, size, mean, std)
    target = torch.from_numpy(labels)
    train = TensorImages(pixels[train_idx], target[train_idx], train_tf)
    test = TensorImages(pixels[test_idx], target[test_idx], test_tf)
    return train, test, DIGIT_CLASSES
