"""``data.path`` a ``.npy`` array of samples, (n, d) vectors or (n, C, H, W) images already in the model's units; a
tenth held out. The broadest format: any file no other format claims is read as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import TEST_SEED, Dataset, check_finite, check_real
from .formats import PATH_FORMATS, PathFormat
from .paths import data_file


def load_npy(path, test_fraction: float = 0.1) -> Dataset:
    path = data_file(path)  # a FIFO named .npy is refused, not waited on
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a plain .npy array ({e})") from None
    if arr.ndim not in (2, 4):
        raise ValueError(f"{path}: expected shape (n, d) or (n, C, H, W), got {arr.shape}")
    check_real(arr, str(path))
    arr = arr.astype(np.float32)
    check_finite(arr, str(path))
    if len(arr) < 2:
        raise ValueError(f"{path}: need at least 2 samples, got {len(arr)}")
    perm = np.random.default_rng(TEST_SEED).permutation(len(arr))
    n_test = max(1, int(round(test_fraction * len(arr))))
    test, train = arr[perm[:n_test]], arr[perm[n_test:]]
    return Dataset(path.stem, torch.from_numpy(train), torch.from_numpy(test))


PATH_FORMATS.register("npy", PathFormat(
    claims=lambda path: Path(path).suffix == ".npy" or Path(path).is_file(),
    load=lambda path, d, seed: load_npy(path), what="a .npy array file (any other file is read as one)", order=100))
