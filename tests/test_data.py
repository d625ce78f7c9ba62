"""Data sets: the built-in synthetic shapes, CIFAR-10 batches and image folders on disk."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fxprune.errors import DataError
from fxprune.train.data import CIFAR_MEAN, CIFAR_STD, SHAPE_CLASSES, DataBundle, load_data


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def all_labels(loader: torch.utils.data.DataLoader) -> torch.Tensor:
    return torch.cat([labels for _, labels in loader])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_bundle_shapes_and_classes() -> None:
    bundle = load_data("synthetic", batch_size=32, train_size=200, test_size=50)
    assert isinstance(bundle, DataBundle)
    assert (bundle.name, bundle.num_classes, bundle.classes) == ("synthetic", 10, SHAPE_CLASSES)
    assert bundle.input_shape == (1, 3, 32, 32)
    assert (len(bundle.train.dataset), len(bundle.test.dataset)) == (200, 50)
    images, labels = first_batch(bundle.train)
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 10


def test_synthetic_default_sizes_balanced_and_normalised() -> None:
    bundle = load_data("synthetic")
    images, labels = bundle.train.dataset.tensors
    assert len(labels) == 5000 and len(bundle.test.dataset) == 1000
    assert labels.bincount().tolist() == [500] * 10
    assert abs(images.mean().item()) < 0.1 and abs(images.std().item() - 1) < 0.1


def test_synthetic_is_deterministic_for_a_seed() -> None:
    a = load_data("synthetic", train_size=300, test_size=100, seed=3)
    b = load_data("synthetic", train_size=300, test_size=100, seed=3)
    tensors_a = a.train.dataset.tensors + a.test.dataset.tensors
    tensors_b = b.train.dataset.tensors + b.test.dataset.tensors
    assert all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b, strict=True))
    assert torch.equal(all_labels(a.train), all_labels(b.train))  # same shuffle order
    other = load_data("synthetic", train_size=300, test_size=100, seed=4)
    assert not torch.equal(other.train.dataset.tensors[0], a.train.dataset.tensors[0])


def test_synthetic_shuffles_each_epoch() -> None:
    loader = load_data("synthetic", train_size=100, test_size=10).train
    assert not torch.equal(all_labels(loader), all_labels(loader))


def test_synthetic_test_split_does_not_depend_on_train_size() -> None:
    small = load_data("synthetic:100", test_size=40)
    large = load_data("synthetic:300", test_size=40)
    assert len(small.train.dataset) == 100 and len(large.train.dataset) == 300
    assert torch.equal(small.test.dataset.tensors[0], large.test.dataset.tensors[0])


def test_synthetic_classes_look_different() -> None:
    # A nearest-class-mean classifier on raw pixels must beat chance: the
    # labels carry signal (the real learnability check trains a CNN).
    images, labels = load_data("synthetic:2000", test_size=10).train.dataset.tensors
    gray = images.mean(1).abs().flatten(1)  # contrast-polarity invariant
    means = torch.stack([gray[labels == k].mean(0) for k in range(10)])
    predicted = torch.cdist(gray, means).argmin(1)
    assert (predicted == labels).float().mean() > 0.2


def test_synthetic_image_size() -> None:
    bundle = load_data("synthetic", image_size=48, train_size=20, test_size=10, batch_size=4)
    assert bundle.input_shape == (1, 3, 48, 48)
    assert first_batch(bundle.test)[0].shape == (4, 3, 48, 48)


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("synthetic:abc", {}, "N must be a positive integer"),
        ("synthetic:0", {}, "N must be a positive integer"),
        ("synthetic:100", {"train_size": 200}, "conflicts with train size 200"),
        ("synthetic", {"test_size": 0}, "sizes must be positive"),
    ],
)
def test_synthetic_bad_count(spec: str, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_data(spec, **kwargs)


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "imagefolder:", "", "cifar100:/x"])
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(DataError, match="expected one of: synthetic, synthetic:N, cifar10:DIR"):
        load_data(spec)


# --------------------------------------------------------------------------- cifar10

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar_batch(path: Path, first_label: int, count: int = 10) -> np.ndarray:
    """Write one batch in the CIFAR-10 python format (pickled dict, bytes keys)."""
    rng = np.random.default_rng(first_label)
    data = rng.integers(0, 256, size=(count, 3072), dtype=np.uint8)
    labels = [(first_label + i) % 10 for i in range(count)]
    batch = {b"batch_label": b"fake", b"labels": labels, b"data": data, b"filenames": []}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return data


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate(CIFAR_FILES):
        write_cifar_batch(folder / name, first_label=i)
    return folder


def test_cifar10_loads_real_format(cifar_dir: Path) -> None:
    bundle = load_data(f"cifar10:{cifar_dir}", batch_size=4)
    assert (bundle.name, bundle.num_classes, bundle.input_shape) == ("cifar10", 10, (1, 3, 32, 32))
    assert (len(bundle.train.dataset), len(bundle.test.dataset)) == (50, 10)
    images, labels = first_batch(bundle.test)  # test split: no augmentation, no shuffle
    raw = write_cifar_batch(cifar_dir.parent / "again", first_label=5)[:4]
    expected = torch.from_numpy(raw.reshape(4, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(images, (expected - mean) / std)
    assert labels.tolist() == [5, 6, 7, 8]
    train_images, _ = first_batch(bundle.train)
    assert train_images.shape == (4, 3, 32, 32) and train_images.dtype == torch.float32


def test_cifar10_accepts_parent_folder_subset_and_resize(cifar_dir: Path) -> None:
    bundle = load_data(f"cifar10:{cifar_dir.parent}", image_size=40, train_size=20, batch_size=8)
    assert len(bundle.train.dataset) == 20 and bundle.input_shape == (1, 3, 40, 40)
    assert first_batch(bundle.train)[0].shape == (8, 3, 40, 40)
    with pytest.raises(DataError, match="asked for 100 examples but the data set has 50"):
        load_data(f"cifar10:{cifar_dir}", train_size=100)


def test_cifar10_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"cifar10: {missing} is not a directory"):
        load_data(f"cifar10:{missing}")


@pytest.mark.parametrize("removed", ["data_batch_1", "data_batch_4", "test_batch"])
def test_cifar10_missing_batch_names_file_and_layout(cifar_dir: Path, removed: str) -> None:
    (cifar_dir / removed).unlink()
    with pytest.raises(DataError, match=f"has no {removed} \\(expected the CIFAR-10 python"):
        load_data(f"cifar10:{cifar_dir}")


def test_cifar10_malformed_batches(cifar_dir: Path) -> None:
    (cifar_dir / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load_data(f"cifar10:{cifar_dir}")
    bad_shape = {b"data": np.zeros((10, 100), dtype=np.uint8), b"labels": [0] * 10}
    (cifar_dir / "data_batch_2").write_bytes(pickle.dumps(bad_shape, protocol=2))
    with pytest.raises(DataError, match="data \\(10, 100\\)"):
        load_data(f"cifar10:{cifar_dir}")


class _Payload:
    """Unpickling this would create a directory: the loader must refuse it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.target),))


def test_cifar10_refuses_pickled_code(cifar_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    (cifar_dir / "test_batch").write_bytes(pickle.dumps({b"data": _Payload(target)}))
    with pytest.raises(DataError, match="unexpected object"):
        load_data(f"cifar10:{cifar_dir}")
    assert not target.exists()


# --------------------------------------------------------------------------- imagefolder


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("size", [32, 96])
def test_imagefolder_loads_and_resizes(image_dir: Path, size: int) -> None:
    bundle = load_data(f"imagefolder:{image_dir}", image_size=size, batch_size=6)
    assert (bundle.num_classes, bundle.classes) == (2, ("cat", "dog"))
    assert bundle.input_shape == (1, 3, size, size)
    for loader in (bundle.train, bundle.test):
        images, labels = first_batch(loader)
        assert images.shape == (6, 3, size, size) and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_imagefolder_default_size_is_224(image_dir: Path) -> None:
    assert load_data(f"imagefolder:{image_dir}").input_shape == (1, 3, 224, 224)


def test_imagefolder_missing_split(image_dir: Path) -> None:
    shutil.rmtree(image_dir / "val")
    with pytest.raises(DataError, match="has no val/ folder \\(expected DIR/train/CLASS"):
        load_data(f"imagefolder:{image_dir}")


def test_imagefolder_empty_split(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="imagefolder: .*train"):
        load_data(f"imagefolder:{tmp_path}")
