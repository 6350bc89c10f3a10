"""Datasets: named offline 2-D sets and ``.npy`` arrays, each with a fixed held-out split.

Layer 6. Everything comes back as a ``Dataset`` of tensors already in the sigma_data convention (std about 0.5 for
2-D sets); models never see files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TRAIN_SEED, TEST_SEED = 0, 1
N_TRAIN_2D, N_TEST_2D = 20_000, 5_000
TARGET_STD = 0.5


@dataclass
class Dataset:
    name: str
    train: torch.Tensor            # (n, d) or (n, C, H, W)
    test: torch.Tensor             # fixed held-out split
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_classes: int | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def batches(self, conditional: bool = False):
        """A batch source for the trainer: ``(n, device) -> (x0, cond)``, drawn with torch's global generator."""
        def draw(n: int, device):
            idx = torch.randint(0, self.train.shape[0], (n,))
            cond = {}
            if conditional:
                cond["class_labels"] = self.train_labels[idx].to(device)
            return self.train[idx].to(device), cond
        return draw


def _s_curve(n, rng):
    from sklearn.datasets import make_s_curve
    x, _ = make_s_curve(n, noise=0.0, random_state=rng)
    return x[:, [0, 2]]


def _swiss_roll(n, rng):
    from sklearn.datasets import make_swiss_roll
    x, _ = make_swiss_roll(n, noise=0.25, random_state=rng)
    return x[:, [0, 2]]


def _moons(n, rng):
    from sklearn.datasets import make_moons
    x, _ = make_moons(n, noise=0.05, random_state=rng)
    return x


def _eight_gaussians(n, rng):
    r = np.random.default_rng(rng)
    angles = r.integers(0, 8, n) * (np.pi / 4)
    centers = np.stack([np.cos(angles), np.sin(angles)], 1) * 2.0
    return centers + 0.1 * r.standard_normal((n, 2))


def _checkerboard(n, rng):
    r = np.random.default_rng(rng)
    x = r.uniform(-2, 2, n)
    col = np.floor(x + 2).astype(int)  # 0..3
    row = r.integers(0, 2, n) * 2 + (col % 2)  # rows of the same parity as the column: a checkerboard
    y = row - 2 + r.uniform(0, 1, n)
    return np.stack([x, y], 1)


TWO_D = {"s_curve": _s_curve, "swiss_roll": _swiss_roll, "moons": _moons, "eight_gaussians": _eight_gaussians,
         "checkerboard": _checkerboard}


def dataset_names() -> list[str]:
    return sorted(TWO_D)


def _standardise(train: np.ndarray, test: np.ndarray):
    """Centre and scale both splits with the training split's statistics so its overall std is 0.5."""
    mean = train.mean(0, keepdims=True)
    scale = TARGET_STD / (train - mean).std()
    return (train - mean) * scale, (test - mean) * scale


def _check_finite(arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(1).sum())
        raise ValueError(f"{where} has {bad} samples with NaN or inf values; clean or drop them")


def load_npy(path, test_fraction: float = 0.1) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path} is not a plain .npy array ({e})") from None
    if arr.ndim not in (2, 4):
        raise ValueError(f"{path}: expected shape (n, d) or (n, C, H, W), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    _check_finite(arr, str(path))
    if len(arr) < 2:
        raise ValueError(f"{path}: need at least 2 samples, got {len(arr)}")
    perm = np.random.default_rng(TEST_SEED).permutation(len(arr))
    n_test = max(1, int(round(test_fraction * len(arr))))
    test, train = arr[perm[:n_test]], arr[perm[n_test:]]
    return Dataset(path.stem, torch.from_numpy(train), torch.from_numpy(test))


def load_dataset(name: str | None = None, path: str | None = None) -> Dataset:
    """A named dataset or a ``.npy`` file. One-line errors name the known choices."""
    if path:
        return load_npy(path)
    if name in TWO_D:
        train = TWO_D[name](N_TRAIN_2D, TRAIN_SEED)
        test = TWO_D[name](N_TEST_2D, TEST_SEED)
        train, test = _standardise(train, test)
        return Dataset(name, torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32))
    import difflib

    hint = difflib.get_close_matches(str(name), dataset_names(), n=1)
    raise ValueError(f"unknown dataset {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                     + f" (known: {', '.join(dataset_names())}; or set data.path to a .npy file)")
