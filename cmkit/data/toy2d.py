"""Offline 2-D sets (scikit-learn's generators and two classics), standardised to std 0.5 by the training split."""

from __future__ import annotations

import numpy as np
import torch

from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset

N_TRAIN_2D, N_TEST_2D = 20_000, 5_000
TARGET_STD = 0.5


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


def _standardise(train: np.ndarray, test: np.ndarray):
    """Centre and scale both splits with the training split's statistics so its overall std is 0.5."""
    mean = train.mean(0, keepdims=True)
    scale = TARGET_STD / (train - mean).std()
    return (train - mean) * scale, (test - mean) * scale


def _register(name: str, make) -> None:
    def load() -> Dataset:
        train, test = _standardise(make(N_TRAIN_2D, TRAIN_SEED), make(N_TEST_2D, TEST_SEED))
        return Dataset(name, torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32))
    DATASETS.register(name, load)


TWO_D = {"s_curve": _s_curve, "swiss_roll": _swiss_roll, "moons": _moons, "eight_gaussians": _eight_gaussians,
         "checkerboard": _checkerboard}
for _name, _make in TWO_D.items():
    _register(_name, _make)
