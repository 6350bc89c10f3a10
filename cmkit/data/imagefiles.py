"""Reading and writing image batches for the command line: ``.npy`` arrays (B, C, H, W) in [-1, 1] and PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.files import atomic_write


def load_images(path, channels: int | None = None, pixels: bool = True) -> torch.Tensor:
    """A ``.npy`` batch (B, C, H, W) or (C, H, W) in [-1, 1], or one PNG/JPEG image scaled to [-1, 1]. ``pixels``
    False (masks) takes integer arrays too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a plain .npy array ({e})") from None
        from .dataset import check_real

        check_real(arr, str(path))
        if pixels and np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path} holds {arr.dtype} pixels; cmkit wants floats in [-1, 1] (x / 127.5 - 1 for "
                             "0..255 pixels)")
        arr = arr.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"{path}: expected an array of shape (B, C, H, W), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{path} has NaN or inf values")
        return torch.from_numpy(arr)
    from PIL import Image

    from .image_folders import GREY_MODES, read_image

    try:
        with Image.open(path) as im:
            grey = im.mode in (*GREY_MODES, "LA")
    except Image.DecompressionBombError:
        grey = False  # read_image says so in one line
    except OSError as e:
        raise ValueError(f"{path} is not an image PIL can read ({e})") from None
    arr = read_image(path, {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if grey else "RGB")) / 127.5 - 1
    arr = arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]
    return torch.from_numpy(np.ascontiguousarray(arr))


def save_images(x: torch.Tensor, path) -> Path:
    """``.npy`` keeps the raw values; ``.png`` writes a grid scaled from [-1, 1]."""
    path = Path(path)
    if path.suffix not in (".npy", ".png"):
        raise ValueError(f"output must end in .npy or .png, got {path.name!r}")
    try:  # to a temporary name, then renamed: two writers of one file never leave a mix of both (a device or a link
        # to one, such as /dev/stdout, is written as it is)
        if path.exists() and not path.is_file():
            _save(x, path, path.suffix)
        else:
            atomic_write(path, lambda tmp: _save(x, tmp, path.suffix))
    except OSError as e:  # a full disk, a read-only folder: name the file, never a success line
        raise OSError(f"could not write {path}: {e.strerror or e}; free space or choose another --out") from None
    return path


def _save(x: torch.Tensor, path: Path, suffix: str) -> None:
    if suffix == ".npy":
        with open(path, "wb") as f:  # a file object: np.save given a name would add ".npy" to one that lacks it
            np.save(f, x.detach().cpu().numpy())
    else:
        from torchvision.utils import save_image

        if x.ndim != 4:
            raise ValueError(f"a .png grid needs images (B, C, H, W), got shape {tuple(x.shape)}; write .npy instead")
        save_image((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, path, nrow=max(1, int(len(x) ** 0.5)),
                   padding=1, pad_value=1, format="png")


def side_by_side(panels: list[tuple[str, torch.Tensor]], path) -> Path:
    """A figure with one column per (title, batch): input / output / reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (title, x) in zip(np.atleast_1d(axes), panels, strict=True):
        g = make_grid((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=max(1, int(len(x) ** 0.5)), padding=1,
                      pad_value=1)
        ax.imshow(g[0] if x.shape[1] == 1 else g.permute(1, 2, 0), cmap="gray" if x.shape[1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def named_mask(kind: str, shape, seed: int = 0) -> torch.Tensor:
    """Masks (1 = known) for quick experiments: random-half (pixels), left-half, center (a hole in the middle)."""
    b, _, h, w = shape
    if kind == "random-half":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(b, 1, h, w, generator=g) < 0.5).float()
    m = torch.ones(b, 1, h, w)
    if kind == "left-half":
        m[..., w // 2:] = 0
    elif kind == "center":
        m[..., h // 4: h - h // 4, w // 4: w - w // 4] = 0
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose random-half, left-half or center, or give --mask FILE")
    return m
