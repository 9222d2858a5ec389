"""Write small data files in the formats the zoo reads: Fashion-MNIST IDX files and CIFAR-10 pickle batches."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file: magic (0, 0, 0x08, ndim), big-endian dims, then the bytes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write_fashion_mnist(root: Path, train: int = 64, test: int = 32, gz: tuple[bool, bool] = (True, False)) -> Path:
    """Write random 28x28 images with labels; the train files gzipped and the test files plain by default."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for (part, (images, labels)), zipped, count in zip(FASHION_FILES.items(), gz, (train, test)):
        for name, array in ((images, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)),
                            (labels, rng.integers(0, 10, count, dtype=np.uint8))):
            data = idx_bytes(array)
            (root / f"{name}.gz").write_bytes(gzip.compress(data)) if zipped else (root / name).write_bytes(data)
    return root


def write_cifar10(root: Path, per_batch: int = 20) -> Path:
    """Write data_batch_1..5 and test_batch in CIFAR-10's python format (b"data" N x 3072 uint8, b"labels")."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(), b"filenames": [b"x.png"] * per_batch}
        with open(root / name, "wb") as file:
            pickle.dump(batch, file)
    return root
