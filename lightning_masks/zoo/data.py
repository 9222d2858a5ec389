"""Data modules that need no download: digits, Fashion-MNIST (IDX files), CIFAR-10 (pickles), synthetic."""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .._extras import extra

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "SyntheticDataModule",
    "TensorDataModule",
    "read_idx",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

Splits = tuple[Dataset, Dataset, Dataset]


class TensorDataModule(pl.LightningDataModule):
    """Base class: in-memory train/val/test tensors, loaded once by :meth:`load`.

    Args:
        batch_size: training batch size (evaluation uses the same).
        seed: seed of the train/val split (and of anything random a subclass loads).
        num_workers: DataLoader workers.
    """

    #: Shape of one input and number of classes; the model configs read them.
    input_shape: tuple[int, ...] = ()
    num_classes = 10

    def __init__(self, batch_size: int = 64, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None

    def load(self) -> Splits:
        """Return the ``(train, val, test)`` data sets."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.load()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup() loads the data sets"
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def split(inputs: Tensor, targets: Tensor, sizes: Sequence[int], seed: int) -> list[TensorDataset]:
    """Shuffle with ``seed`` and cut into consecutive data sets of ``sizes`` (the first takes the rest when -1)."""
    sizes = list(sizes)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(inputs) - sum(s for s in sizes if s != -1)
    if min(sizes) < 0 or sum(sizes) > len(inputs):
        raise ValueError(f"cannot split {len(inputs)} examples into {sizes}")
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))[: sum(sizes)]
    return [TensorDataset(inputs[part], targets[part]) for part in order.split(sizes)]


def _standardize(images: Tensor, reference: Tensor) -> Tensor:
    """Scale ``images`` by the per-channel mean and std of ``reference`` (both ``N x C x H x W``)."""
    mean = reference.mean(dim=(0, 2, 3), keepdim=True)
    std = reference.std(dim=(0, 2, 3), keepdim=True)
    return (images - mean) / std


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes, flat 64 features), shipped with scikit-learn.

    Args:
        batch_size: training batch size.
        val_fraction, test_fraction: held-out shares, split with ``seed``.
        num_workers: DataLoader workers.
    """

    input_shape = (64,)
    num_features = 64

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def load(self) -> Splits:
        with extra("app"):
            from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        inputs = torch.tensor(images, dtype=torch.float32) / 16.0
        targets = torch.tensor(labels, dtype=torch.long)
        n_val, n_test = int(len(inputs) * self.val_fraction), int(len(inputs) * self.test_fraction)
        train, val, test = split(inputs, targets, [-1, n_val, n_test], self.seed)
        return train, val, test


class SyntheticDataModule(TensorDataModule):
    """Gaussian inputs labelled by a fixed random linear map: a learnable task for tests, in milliseconds.

    Args:
        num_samples: train examples (validation and test get a quarter each).
        input_shape: shape of one input, e.g. ``[16]`` or ``[1, 28, 28]``.
        num_classes: number of classes.
        batch_size, seed, num_workers: see :class:`TensorDataModule`.
    """

    def __init__(self, num_samples: int = 256, input_shape: Sequence[int] = (16,), num_classes: int = 4,
                 batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.num_samples = num_samples
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes

    def load(self) -> Splits:
        generator = torch.Generator().manual_seed(self.seed)
        total = self.num_samples + 2 * (self.num_samples // 4)
        inputs = torch.randn(total, *self.input_shape, generator=generator)
        projection = torch.randn(inputs[0].numel(), self.num_classes, generator=generator)
        targets = (inputs.flatten(1) @ projection).argmax(1)
        quarter = self.num_samples // 4
        train, val, test = split(inputs, targets, [self.num_samples, quarter, quarter], self.seed)
        return train, val, test


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (``.gz`` or plain), the format of MNIST and Fashion-MNIST, as a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()!r})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {values.size} values")
    return torch.from_numpy(values.reshape(shape).copy())


class FashionMNISTDataModule(TensorDataModule):
    """Fashion-MNIST (28x28 grey images, 10 classes) from its four IDX files, gzipped or not.

    Args:
        root: folder of ``train-images-idx3-ubyte[.gz]`` and the three others. The default is where
            Debian's ``dataset-fashion-mnist`` package puts them.
        val_size: training images held out for validation (of the chosen classes).
        batch_size, seed, num_workers: see :class:`TensorDataModule`.
        classes: keep only these classes, labelled ``0 .. len(classes) - 1`` in this order (a transfer task:
            pretrain on some classes, fine-prune on the others); ``None``: all ten.

    Raises:
        FileNotFoundError: a file is missing; the message says how to get them.
        ValueError: ``classes`` not distinct indices in [0, 10).
    """

    input_shape = (1, 28, 28)
    files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_ROOT, val_size: int = 5000, batch_size: int = 128,
                 seed: int = 0, num_workers: int = 0, classes: Sequence[int] | None = None) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.root = Path(root).expanduser()
        self.val_size = val_size
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None:
            if not self.classes or len(set(self.classes)) != len(self.classes) or not all(
                    0 <= c < 10 for c in self.classes):
                raise ValueError(f"classes must be distinct class indices in [0, 10), got {classes!r}")
            self.num_classes = len(self.classes)

    def _find(self, name: str) -> Path:
        for candidate in (self.root / f"{name}.gz", self.root / name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"Fashion-MNIST file {name}.gz (or {name}) not found in {self.root}. Install the Debian package "
            f"(apt-get install dataset-fashion-mnist, which puts the files in {FASHION_MNIST_ROOT}) or download "
            "the four IDX files from https://github.com/zalandoresearch/fashion-mnist and pass data.root=FOLDER"
        )

    def _read(self, part: str) -> tuple[Tensor, Tensor]:
        images, labels = (read_idx(self._find(name)) for name in self.files[part])
        if len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {part}: {len(images)} images but {len(labels)} labels in {self.root}")
        return images.unsqueeze(1).float() / 255.0, labels.long()

    def _chosen(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The images of ``classes``, relabelled in their order."""
        if self.classes is None:
            return images, labels
        relabel = torch.full((10,), -1, dtype=torch.long)
        relabel[self.classes] = torch.arange(len(self.classes))
        chosen = relabel[labels] >= 0
        return images[chosen], relabel[labels[chosen]]

    def load(self) -> Splits:
        (train_x, train_y), (test_x, test_y) = self._read("train"), self._read("test")
        train_x, test_x = _standardize(train_x, train_x), _standardize(test_x, train_x)  # by all ten classes
        (train_x, train_y), (test_x, test_y) = self._chosen(train_x, train_y), self._chosen(test_x, test_y)
        train, val = split(train_x, train_y, [-1, min(self.val_size, len(train_x) // 2)], self.seed)
        return train, val, TensorDataset(test_x, test_y)


class _Augmented(Dataset):
    """Random crop (zero padding ``pad``) and horizontal flip of ``C x H x W`` images, on the fly."""

    def __init__(self, base: TensorDataset, pad: int = 4) -> None:
        self.base, self.pad = base, pad

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.base[index]
        height, width = image.shape[-2:]
        padded = torch.nn.functional.pad(image, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        image = padded[:, top:top + height, left:left + width]
        return (image.flip(-1) if torch.rand(()) < 0.5 else image), label


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 (32x32 colour images, 10 classes) from the standard python-pickle batches.

    Args:
        root: the folder holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (the
            ``cifar-10-batches-py`` folder of the official archive, or its parent).
        val_size: training images held out for validation.
        augment: random crops and flips of the training images.
        batch_size, seed, num_workers: see :class:`TensorDataModule`.

    Raises:
        FileNotFoundError: a batch is missing; the message says where it was looked for.
    """

    input_shape = (3, 32, 32)
    train_batches = tuple(f"data_batch_{i}" for i in range(1, 6))

    def __init__(self, root: str | os.PathLike, val_size: int = 5000, augment: bool = True, batch_size: int = 128,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.root = Path(root).expanduser()
        self.val_size = val_size
        self.augment = augment

    def _folder(self) -> Path:
        for folder in (self.root, self.root / "cifar-10-batches-py"):
            if (folder / "test_batch").is_file():
                return folder
        raise FileNotFoundError(
            f"CIFAR-10 batches (data_batch_1..5, test_batch) not found in {self.root} or "
            f"{self.root / 'cifar-10-batches-py'}. Download and unpack the python version of CIFAR-10 "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) and pass data.root=FOLDER"
        )

    @staticmethod
    def _read(paths: Sequence[Path]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR-10 batch {path} is missing; the folder needs data_batch_1..5 "
                                        "and test_batch")
            with open(path, "rb") as file:
                batch = pickle.load(file, encoding="bytes")
            images.append(torch.as_tensor(np.asarray(batch[b"data"], dtype=np.uint8)).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[b"labels"], dtype=torch.long))
        return torch.cat(images).float() / 255.0, torch.cat(labels)

    def load(self) -> Splits:
        folder = self._folder()
        train_x, train_y = self._read([folder / name for name in self.train_batches])
        test_x, test_y = self._read([folder / "test_batch"])
        train_x, test_x = _standardize(train_x, train_x), _standardize(test_x, train_x)
        train, val = split(train_x, train_y, [-1, min(self.val_size, len(train_x) // 2)], self.seed)
        return (_Augmented(train) if self.augment else train), val, TensorDataset(test_x, test_y)
