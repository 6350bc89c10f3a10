"""The ``Dataset`` every source returns (tensors already in the sigma_data convention, a fixed held-out split), the
registry of named sets (``data.name``), the held-out split and the checks every array loader shares. Imports nothing
else of ``cmkit.data`` but the caption-source type a captioned set hands the latent cache: every loader builds on
this module, never the other way round. Models never see files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core import Registry
from .caption_sources import ArraySource

TRAIN_SEED, TEST_SEED = 0, 1

# data.name -> a loader () -> Dataset; each source module registers its sets
DATASETS: Registry[Callable[[], Dataset]] = Registry("dataset")


@dataclass
class Dataset:
    name: str
    train: torch.Tensor            # (n, d) or (n, C, H, W)
    test: torch.Tensor             # fixed held-out split
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    num_classes: int | None = None
    train_captions: list[str] | None = None    # text-to-image sets: one caption per image
    test_captions: list[str] | None = None
    train_sizes: torch.Tensor | None = None    # (n, 4) original height, width, crop top, left of cropped images

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def caption_source(self):
        """The captioned images as a source of latent-cache shards (None for a set without captions)."""
        if self.train_captions is None:
            return None
        return ArraySource(self.train, self.train_captions, self.name, sizes=self.train_sizes)

    def batches(self, conditional: bool = False, hflip: bool = False):
        """A batch source for the trainer: ``(n, device) -> (x0, cond)``, drawn with torch's global generator.
        ``hflip`` mirrors a random half of each image batch."""
        if conditional and self.train_labels is None:
            raise ValueError(f"dataset {self.name!r} has no class labels; a class-conditional model needs them")
        if hflip and self.train.ndim != 4:
            raise ValueError("data.hflip needs image data of shape (n, C, H, W)")

        def draw(n: int, device):
            idx = torch.randint(0, self.train.shape[0], (n,))
            x = self.train[idx]
            if hflip:
                flip = torch.rand(n) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            cond = {"class_labels": self.train_labels[idx].to(device)} if conditional else {}
            return x.to(device), cond
        return draw


def split(x: np.ndarray, y: np.ndarray | None, n_test: int):
    """``(train, test, train labels, test labels)`` as tensors: ``n_test`` rows held out, the same ones on every
    call (a permutation drawn from ``TEST_SEED``); labels None where ``y`` is."""
    perm = np.random.default_rng(TEST_SEED).permutation(len(x))
    te, tr = perm[:n_test], perm[n_test:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[tr]), t(x[te]), (t(y[tr]) if y is not None else None), (t(y[te]) if y is not None else None)


def check_finite(arr: np.ndarray, where: str) -> None:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).reshape(len(arr), -1).any(1).sum())
        raise ValueError(f"{where} has {bad} samples with NaN or inf values; clean or drop them")


def check_real(arr: np.ndarray, where: str) -> None:
    """A real numeric array: complex values (whose imaginary part a float cast drops) and non-numbers are refused."""
    if np.iscomplexobj(arr):
        raise ValueError(f"{where}: complex values ({arr.dtype}); save the real part (np.real) or the magnitude "
                         "(np.abs) as a float array")
    if not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        raise ValueError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
