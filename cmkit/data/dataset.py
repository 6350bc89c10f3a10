"""The ``Dataset`` every source returns (tensors already in the sigma_data convention, a fixed held-out split), the
dataset registry (``data.name``) and ``load_dataset``, which also reads ``.npy`` arrays and image folders
(``data.path``). Models never see files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import Registry

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

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def caption_source(self):
        """The captioned images as a source of latent-cache shards (None for a set without captions)."""
        if self.train_captions is None:
            return None
        from ..latent.caption_sources import ArraySource  # the latent stack loads on use

        return ArraySource(self.train, self.train_captions, self.name)

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


def _split(x: np.ndarray, y: np.ndarray | None, n_test: int):
    perm = np.random.default_rng(TEST_SEED).permutation(len(x))
    te, tr = perm[:n_test], perm[n_test:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[tr]), t(x[te]), (t(y[tr]) if y is not None else None), (t(y[te]) if y is not None else None)


def _check_finite(arr: np.ndarray, where: str) -> None:
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
    check_real(arr, str(path))
    arr = arr.astype(np.float32)
    _check_finite(arr, str(path))
    if len(arr) < 2:
        raise ValueError(f"{path}: need at least 2 samples, got {len(arr)}")
    perm = np.random.default_rng(TEST_SEED).permutation(len(arr))
    n_test = max(1, int(round(test_fraction * len(arr))))
    test, train = arr[perm[:n_test]], arr[perm[n_test:]]
    return Dataset(path.stem, torch.from_numpy(train), torch.from_numpy(test))


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(name: str | None = None, path: str | None = None, image_size: int = 0,
                 channels: int = 0) -> Dataset:
    """A named dataset, a ``.npy`` file or a folder of images. One-line errors name the known choices."""
    if channels not in (0, 1, 3):
        raise ValueError(f"data.channels must be 1 (gray), 3 (RGB) or 0 (as the first image), got {channels}")
    if path:
        if Path(path).is_dir():
            from .captions import has_captions, load_caption_folder
            from .images import load_image_folder

            if has_captions(path):
                return load_caption_folder(path, image_size)

            return load_image_folder(path, image_size, channels)
        return load_npy(path)
    try:
        loader = DATASETS[name]
    except ValueError as e:
        raise ValueError(f"{e}; or set data.path to a .npy file or an image folder") from None
    data = loader()
    size = data.sample_shape[-1] if len(data.sample_shape) == 3 else None
    if image_size and image_size != size:  # a named set comes at its own size: silently ignoring the key misleads
        raise ValueError(f"data.image_size = {image_size}, but data.name {name!r} comes at "
                         f"{f'{size}x{size}' if size else 'no image size'} and is not resized; remove "
                         "data.image_size (it resizes image folders given as data.path)")
    return data
