"""Datasets: named offline 2-D sets, 8x8 digits (grayscale and tinted RGB), Fashion-MNIST, ``.npy`` arrays and
image folders, each with a fixed held-out split.

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


def _split(x: np.ndarray, y: np.ndarray | None, n_test: int):
    perm = np.random.default_rng(TEST_SEED).permutation(len(x))
    te, tr = perm[:n_test], perm[n_test:]
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[tr]), t(x[te]), (t(y[tr]) if y is not None else None), (t(y[te]) if y is not None else None)


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, values 0..16) scaled to [-1, 1]; 297 held out."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0 * 2 - 1)[:, None]
    tr, te, ytr, yte = _split(x, d.target.astype(np.int64), 297)
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image_folder(path, size: int = 0, channels: int = 0, test_fraction: float = 0.1) -> Dataset:
    """A folder of images (optionally one subfolder per class) scaled to [-1, 1]. ``size`` resizes to size x size;
    ``channels`` 1 or 3 converts the mode (0 keeps what the first image has)."""
    from PIL import Image

    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    labelled = len(classes) > 1 or classes != ["."]
    first = Image.open(files[0])
    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if first.mode in ("L", "1", "I;16") else "RGB")
    arrays = []
    for p in files:
        im = Image.open(p).convert(mode)
        if size:
            im = im.resize((size, size), Image.BICUBIC)
        arrays.append(np.asarray(im, dtype=np.float32))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images under {root} differ in size ({sorted(shapes)[:2]} ...); set data.image_size")
    x = np.stack(arrays) / 127.5 - 1
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.array([classes.index(p.parent.relative_to(root).as_posix()) for p in files]) if labelled else None
    n_test = max(1, int(round(test_fraction * len(x))))
    tr, te, ytr, yte = _split(x.astype(np.float32), y, n_test)
    return Dataset(root.name, tr, te, ytr, yte, len(classes) if labelled else None)


IMAGE_SETS = {"digits": load_digits, "tinted_digits": load_tinted_digits, "fashion_mnist": load_fashion_mnist}

TWO_D = {"s_curve": _s_curve, "swiss_roll": _swiss_roll, "moons": _moons, "eight_gaussians": _eight_gaussians,
         "checkerboard": _checkerboard}


def dataset_names() -> list[str]:
    return sorted(TWO_D) + sorted(IMAGE_SETS)


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


def load_dataset(name: str | None = None, path: str | None = None, image_size: int = 0,
                 channels: int = 0) -> Dataset:
    """A named dataset, a ``.npy`` file or a folder of images. One-line errors name the known choices."""
    if path:
        if Path(path).is_dir():
            return load_image_folder(path, image_size, channels)
        return load_npy(path)
    if name in IMAGE_SETS:
        return IMAGE_SETS[name]()
    if name in TWO_D:
        train = TWO_D[name](N_TRAIN_2D, TRAIN_SEED)
        test = TWO_D[name](N_TEST_2D, TEST_SEED)
        train, test = _standardise(train, test)
        return Dataset(name, torch.tensor(train, dtype=torch.float32), torch.tensor(test, dtype=torch.float32))
    import difflib

    hint = difflib.get_close_matches(str(name), dataset_names(), n=1)
    raise ValueError(f"unknown dataset {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                     + f" (known: {', '.join(dataset_names())}; or set data.path to a .npy file)")
