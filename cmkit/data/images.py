"""Named image sets that need no download: scikit-learn's 8x8 digits (grayscale and tinted RGB) and Fashion-MNIST
from Debian's package (folders of images: ``image_folders``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import DATASETS, TEST_SEED, TRAIN_SEED, Dataset, split


@DATASETS.register("digits")
def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, values 0..16) scaled to [-1, 1]; 297 held out."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0 * 2 - 1)[:, None]
    tr, te, ytr, yte = split(x, d.target.astype(np.int64), 297)
    return Dataset("digits", tr, te, ytr, yte, 10)


TINT_COPIES = 3


def tint(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour grayscale images in [-1, 1] of shape (n, 1, H, W): each image gets its own foreground colour (any hue,
    saturation 0.6-1, value 0.8-1) over its own dark background (any hue, saturation 0.3-0.8, value 0.05-0.35),
    mixed by the stroke intensity. Returns (n, 3, H, W) in [-1, 1]."""
    from matplotlib.colors import hsv_to_rgb

    n = len(gray)
    fg = hsv_to_rgb(np.stack([rng.random(n), rng.uniform(0.6, 1, n), rng.uniform(0.8, 1, n)], 1))
    bg = hsv_to_rgb(np.stack([rng.random(n), rng.uniform(0.3, 0.8, n), rng.uniform(0.05, 0.35, n)], 1))
    a = (gray + 1) / 2  # stroke intensity in [0, 1]
    rgb = bg[:, :, None, None] * (1 - a) + fg[:, :, None, None] * a
    return (rgb * 2 - 1).astype(np.float32)


@DATASETS.register("tinted_digits")
def load_tinted_digits() -> Dataset:
    """An RGB set that needs no download, for colorization: the 8x8 digits (same held-out split as ``digits``), each
    training digit tinted in ``TINT_COPIES`` random colour pairs (4500 images) and each held-out digit in one (297);
    see ``tint``. Labels are the digits'."""
    d = load_digits()
    train = tint(np.repeat(d.train.numpy(), TINT_COPIES, 0), np.random.default_rng(TRAIN_SEED))
    test = tint(d.test.numpy(), np.random.default_rng(TEST_SEED))
    return Dataset("tinted_digits", torch.from_numpy(train), torch.from_numpy(test),
                   d.train_labels.repeat_interleave(TINT_COPIES), d.test_labels, 10)


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(root=FASHION_DIR) -> Dataset:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files, 28x28 in [-1, 1]; its own test split."""
    root = Path(root)
    files = {k: root / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz" for k in
             ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} ({missing[0]} missing); install it with "
                                "`apt-get update && apt-get install -y dataset-fashion-mnist`")
    img = {k: torch.from_numpy(_read_idx(p).astype(np.float32) / 127.5 - 1)[:, None] for k, p in files.items()
           if "images" in k}
    lab = {k: torch.from_numpy(_read_idx(p).astype(np.int64)) for k, p in files.items() if "labels" in k}
    return Dataset("fashion_mnist", img["train-images"], img["t10k-images"], lab["train-labels"],
                   lab["t10k-labels"], 10)
