"""Data sets for training and evaluation, behind one entry point: ``load_data(spec)``.

Accepted specs:

- ``synthetic`` / ``synthetic:N`` -- built in, nothing to download: 10 classes
  of coloured geometric shapes at random position, size and colour, with
  noise. Deterministic for a given seed; a small CNN learns it to > 80 % in a
  couple of epochs, so tests and the demo train on real signal.
- ``cifar10:DIR`` -- the CIFAR-10 python batches from a local folder (DIR or
  DIR/cifar-10-batches-py), with the usual crop + flip augmentation.
- ``imagefolder:DIR`` -- ``DIR/train/CLASS/*`` and ``DIR/val/CLASS/*`` images.
- ``sklearn-digits`` -- the 1,797 UCI handwritten digits bundled with
  scikit-learn, upscaled to 32×32, fixed split (``fxprune.train.digits``).

``augment`` chooses the training augmentation for cifar10, imagefolder and
sklearn-digits (``fxprune.train.augment``: none, standard, paper or a list of flip,
crop, jitter, standardize; default standard, none for digits).

Missing or malformed data raises ``DataError`` naming the path and the
expected layout. Training loaders shuffle with a ``torch.Generator`` seeded
from ``seed``; random augmentations draw from torch's global RNG (seed it with
``torch.manual_seed`` for bit-identical runs).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from fxprune.errors import DataError
from fxprune.train.augment import JITTER, PerImageStandardize, parse_augment, tensor_transforms

SPEC_FORMS = "synthetic, synthetic:N, cifar10:DIR, imagefolder:DIR, sklearn-digits"


@dataclass
class DataBundle:
    """Train and test loaders plus what a model needs to know about the data.

    ``input_shape`` is one example batch's shape, ``(1, C, H, W)``.
    """

    train: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    classes: tuple[str, ...] = field(default=())


def load_data(
    spec: str,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    image_size: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    augment: str | None = None,
) -> DataBundle:
    """Build the data set named by ``spec`` (see module docstring) and its two loaders.

    ``train_size`` / ``test_size`` cap the number of examples (a seeded random
    subset for folders; the generated count for ``synthetic``, default
    5000 / 1000). ``image_size`` resizes to a square side (defaults: 32 for
    synthetic and cifar10, 224 for imagefolder).
    """
    kind, _, arg = spec.partition(":")
    size = image_size or (224 if kind == "imagefolder" else 32)
    train, test, classes = build_datasets(kind, arg, size, train_size, test_size, seed, augment)
    return DataBundle(
        train=make_loader(train, batch_size, num_workers, shuffle=True, seed=seed),
        test=make_loader(test, batch_size, num_workers, shuffle=False, seed=seed),
        num_classes=len(classes),
        input_shape=(1, 3, size, size),
        name=kind,
        classes=tuple(classes),
    )


def build_datasets(
    kind: str,
    arg: str,
    size: int,
    train_size: int | None,
    test_size: int | None,
    seed: int,
    augment: str | None = None,
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """Train and test datasets for ``kind:arg``; ``DataError`` for an unknown spec."""
    if kind == "synthetic":
        if augment not in (None, "none"):
            raise DataError("synthetic: --augment does not apply (the images are generated)")
        return synthetic_datasets(arg, size, train_size, test_size, seed)
    if kind == "cifar10" and arg:
        train, test, classes = cifar10_datasets(Path(arg).expanduser(), size, augment)
    elif kind == "imagefolder" and arg:
        train, test, classes = imagefolder_datasets(Path(arg).expanduser(), size, augment)
    elif kind == "sklearn-digits" and not arg:
        from fxprune.train.digits import digits_datasets

        train, test, classes = digits_datasets(size, augment)
    else:
        spec = f"{kind}:{arg}" if arg else kind
        raise DataError(f"unknown data set {spec!r}; expected one of: {SPEC_FORMS}")
    train = take_subset(train, train_size, seed, f"{kind}: {arg} train")
    test = take_subset(test, test_size, seed, f"{kind}: {arg} test")
    return train, test, classes


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, *, shuffle: bool, seed: int
) -> DataLoader:
    """A DataLoader whose shuffle order (and worker seeds) depend only on ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        generator=generator,
    )  # fmt: skip


def take_subset(dataset: Dataset, size: int | None, seed: int, what: str) -> Dataset:
    """The first ``size`` examples of a seeded permutation; all of them when ``size`` is None."""
    total = len(dataset)  # type: ignore[arg-type]
    if size is None or size == total:
        return dataset
    if not 0 < size <= total:
        raise DataError(f"{what}: asked for {size} examples but the data set has {total}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


# --------------------------------------------------------------------------- synthetic

SHAPE_CLASSES = (
    "circle", "square", "triangle", "cross", "horizontal_bars",
    "vertical_bars", "diagonal", "ring", "dot_grid", "checker",
)  # fmt: skip
SYNTHETIC_SIZES = (5000, 1000)
SHAPE_RADIUS = (0.14, 0.32)  # fraction of the image side
BRIGHT_RANGE, DARK_RANGE = (0.5, 1.0), (0.0, 0.4)  # per colour channel
PIXEL_NOISE = 0.2  # std of the Gaussian noise added to every pixel
# Pixel statistics of the renderer, measured on 100k images (the three channels
# agree to 1e-3); fixed, so normalisation does not depend on the split sizes.
SYNTHETIC_MEAN = 0.476
SYNTHETIC_STD = 0.364


def synthetic_datasets(
    arg: str, image_size: int, train_size: int | None, test_size: int | None, seed: int
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """Generate the train and test splits of ``synthetic[:N]`` (N = train size)."""
    n_train = parse_count(arg, train_size)
    n_test = test_size if test_size is not None else SYNTHETIC_SIZES[1]
    if n_train <= 0 or n_test <= 0:
        raise DataError(f"synthetic: sizes must be positive, got {n_train} train, {n_test} test")
    # Independent streams per split: the test set does not change with N.
    train = make_shapes(n_train, image_size, np.random.SeedSequence([seed, 0]))
    test = make_shapes(n_test, image_size, np.random.SeedSequence([seed, 1]))
    return train, test, SHAPE_CLASSES


def parse_count(arg: str, train_size: int | None) -> int:
    """The train size from ``synthetic:N`` or ``train_size``; they must agree if both given."""
    if not arg:
        return train_size if train_size is not None else SYNTHETIC_SIZES[0]
    if not arg.isdecimal() or int(arg) == 0:
        raise DataError(f"synthetic:{arg}: N must be a positive integer (e.g. synthetic:5000)")
    if train_size is not None and train_size != int(arg):
        raise DataError(f"synthetic:{arg} conflicts with train size {train_size}; give one")
    return int(arg)


def make_shapes(count: int, size: int, seed: np.random.SeedSequence) -> TensorDataset:
    """``count`` normalised images (N, 3, size, size) float32 with balanced int64 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(SHAPE_CLASSES))
    images = render_shapes(labels, size, rng)
    images = (images - SYNTHETIC_MEAN) / SYNTHETIC_STD
    return TensorDataset(torch.from_numpy(images), torch.from_numpy(labels).long())


def render_shapes(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one shape per label, vectorised over all images: (N, 3, size, size) in ~[0, 1]."""
    n = len(labels)
    centre = rng.uniform(0.3, 0.7, size=(2, n, 1, 1)) * size
    radius = rng.uniform(*SHAPE_RADIUS, size=(n, 1, 1)) * size
    pixel = np.arange(size, dtype=np.float32) + 0.5
    dx = (pixel[None, None, :] - centre[0]).astype(np.float32)  # (N, 1, S) -> broadcast
    dy = (pixel[None, :, None] - centre[1]).astype(np.float32)  # (N, S, 1)
    dx, dy = np.broadcast_arrays(dx, dy)
    mask = np.zeros((n, size, size), dtype=bool)
    for label, draw in enumerate(SHAPE_DRAWERS):
        sel = labels == label
        mask[sel] = draw(dx[sel], dy[sel], radius[sel])
    fg, bg = contrasting_colours(n, rng)
    images = np.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])
    # torch draws the 3*S*S*N normals about twice as fast as numpy.
    noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
    images += PIXEL_NOISE * torch.randn(images.shape, generator=noise).numpy()
    return images


def contrasting_colours(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (N, 3) foreground and background colours, one bright and one dark."""
    bright = rng.uniform(*BRIGHT_RANGE, size=(n, 3))
    dark = rng.uniform(*DARK_RANGE, size=(n, 3))
    swap = rng.random(n)[:, None] < 0.5
    fg, bg = np.where(swap, dark, bright), np.where(swap, bright, dark)
    return fg.astype(np.float32), bg.astype(np.float32)


def _box(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)


def _stripes(t: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Four bands of width r/2 across the box, two of them on.
    return np.floor((t + r) / (r / 2)) % 2 == 0


def _triangle(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Apex up: the half-width grows from 0 at dy = -r to r at dy = +r.
    return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)


def _cross(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    arm = 0.3 * r
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))


def _dot_grid(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    pitch = 2 * r / 3  # 3x3 dots
    u = np.mod(dx + r, pitch) - pitch / 2
    v = np.mod(dy + r, pitch) - pitch / 2
    return _box(dx, dy, r) & (u**2 + v**2 <= (0.3 * pitch) ** 2)


def _checker(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    cell = r / 2  # 4x4 cells
    parity = np.floor((dx + r) / cell) + np.floor((dy + r) / cell)
    return _box(dx, dy, r) & (parity % 2 == 0)


SHAPE_DRAWERS = (
    lambda dx, dy, r: dx**2 + dy**2 <= r**2,  # circle
    lambda dx, dy, r: _box(dx, dy, 0.8 * r),  # square
    _triangle,
    _cross,
    lambda dx, dy, r: _box(dx, dy, r) & _stripes(dy, r),  # horizontal bars
    lambda dx, dy, r: _box(dx, dy, r) & _stripes(dx, r),  # vertical bars
    lambda dx, dy, r: _box(dx, dy, r) & (np.abs(dx - dy) <= 0.3 * r),  # diagonal
    lambda dx, dy, r: (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2),  # ring
    _dot_grid,
    _checker,
)


# --------------------------------------------------------------------------- cifar10

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_LAYOUT = "expected the CIFAR-10 python batches: data_batch_1..5, test_batch"
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) and labels, transformed one example at a time."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: v2.Transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def cifar10_datasets(
    root: Path, image_size: int, augment: str | None = None
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """The CIFAR-10 train (augmented) and test splits from ``root``."""
    folder = find_cifar_folder(root)
    train_parts = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    train_images = torch.cat([images for images, _ in train_parts])
    train_labels = torch.cat([labels for _, labels in train_parts])
    test_images, test_labels = read_cifar_batch(folder / CIFAR_TEST_FILE)
    chosen = parse_augment(augment, default="standard")
    train_tf, test_tf = tensor_transforms(chosen, 32, image_size, CIFAR_MEAN, CIFAR_STD)
    train = TensorImages(train_images, train_labels, train_tf)
    test = TensorImages(test_images, test_labels, test_tf)
    return train, test, CIFAR_CLASSES


def find_cifar_folder(root: Path) -> Path:
    """``root`` or ``root/cifar-10-batches-py``, whichever holds all six batch files."""
    if not root.is_dir():
        raise DataError(f"cifar10: {root} is not a directory ({CIFAR_LAYOUT})")
    folder = root if (root / "data_batch_1").is_file() else root / "cifar-10-batches-py"
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        if not (folder / name).is_file():
            raise DataError(f"cifar10: {root} has no {name} ({CIFAR_LAYOUT})")
    return folder


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one CIFAR-10 python batch."""
    malformed = f"cifar10: {path} is not a CIFAR-10 python batch ({CIFAR_LAYOUT})"
    try:
        # The CIFAR-10 python batches are pickled dicts: that is the data set's
        # own format. Only the six named files are unpickled, after checking
        # they exist, and the unpickler refuses anything but arrays and lists.
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as error:
        raise DataError(f"{malformed}: {error}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(f"{malformed}: data {data.shape}, labels {labels.shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CIFAR_CLASSES):
        raise DataError(f"{malformed}: labels outside 0..9")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, row-major.
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


# --------------------------------------------------------------------------- imagefolder

IMAGEFOLDER_LAYOUT = "expected DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagefolder_datasets(
    root: Path, size: int, augment: str | None = None
) -> tuple[Dataset, Dataset, tuple[str, ...]]:
    """``root/train`` (augmented) and ``root/val`` as torchvision ImageFolders of side ``size``."""
    train_tf, test_tf = imagefolder_transforms(size, parse_augment(augment, default="standard"))
    train = open_imagefolder(root, "train", train_tf)
    test = open_imagefolder(root, "val", test_tf)
    if train.classes != test.classes:
        raise DataError(f"imagefolder: {root}/train and {root}/val have different class folders")
    return train, test, tuple(train.classes)


def open_imagefolder(root: Path, split: str, transform: v2.Transform) -> Dataset:
    """One split as an ImageFolder; a missing or empty folder is a ``DataError``."""
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise DataError(f"imagefolder: {root} has no {split}/ folder ({IMAGEFOLDER_LAYOUT})")
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise DataError(f"imagefolder: {folder}: {error} ({IMAGEFOLDER_LAYOUT})") from None


def imagefolder_transforms(
    size: int, augment: tuple[str, ...] = ("flip", "crop")
) -> tuple[v2.Transform, v2.Transform]:
    """ImageNet-style crops for large sides; CIFAR-style pad-and-crop for sides up to 64."""
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    jitter = [v2.ColorJitter(**JITTER)] if "jitter" in augment else []
    standard = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    normalise = [PerImageStandardize()] if "standardize" in augment else standard
    flip = [v2.RandomHorizontalFlip()] if "flip" in augment else []
    if size <= 64:
        fit = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        crop = [v2.RandomCrop(size, padding=size // 8)] if "crop" in augment else []
        train, test = fit + crop + flip, fit
    else:
        test = [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)]
        crop = [v2.RandomResizedCrop(size, antialias=True)] if "crop" in augment else test
        train = crop + flip
    train_tf = v2.Compose(train + to_tensor + jitter + normalise)
    return train_tf, v2.Compose(test + to_tensor + normalise)


__all__ = [
    "CIFAR_CLASSES",
    "CIFAR_LAYOUT",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "CIFAR_TEST_FILE",
    "CIFAR_TRAIN_FILES",
    "DataBundle",
    "IMAGEFOLDER_LAYOUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PIXEL_NOISE",
    "SHAPE_CLASSES",
    "SHAPE_DRAWERS",
    "SHAPE_RADIUS",
    "SPEC_FORMS",
    "SYNTHETIC_MEAN",
    "SYNTHETIC_SIZES",
    "SYNTHETIC_STD",
    "TensorImages",
    "build_datasets",
    "cifar10_datasets",
    "contrasting_colours",
    "find_cifar_folder",
    "imagefolder_datasets",
    "imagefolder_transforms",
    "load_data",
    "make_loader",
    "make_shapes",
    "open_imagefolder",
    "parse_count",
    "read_cifar_batch",
    "render_shapes",
    "synthetic_datasets",
    "take_subset",
]
