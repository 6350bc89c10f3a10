"""Per-sample distances between two batches and the loss weightings over noise levels, each a registry.

Every distance maps two ``(batch, ...)`` tensors to a ``(batch,)`` tensor; ``DISTANCES`` holds factories
``(huber_c) -> distance`` so that a network-based distance (LPIPS) is built once. Every weighting maps the pair of
noise levels ``(sigma_hi, sigma_lo)`` to per-sample weights.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..core import Registry
from ..core.checks import in_range
from ..core.files import check_weights_file

DISTANCES: Registry[Callable] = Registry("objective.distance")
WEIGHTINGS: Registry[Callable] = Registry("objective.weighting")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def pseudo_huber_c(dim: int) -> float:
    """iCT's default ``c = 0.00054 sqrt(d)`` for data scaled to about [-1, 1]."""
    return 0.00054 * math.sqrt(dim)


def l2(x, y):
    """Mean squared error per sample."""
    return (_flat(x) - _flat(y)).pow(2).mean(1)


def l1(x, y):
    """Mean absolute error per sample."""
    return (_flat(x) - _flat(y)).abs().mean(1)


def pseudo_huber(x, y, c: float | None = None):
    """``sqrt(||x - y||^2 + c^2) - c`` over the whole sample (c defaults to ``0.00054 sqrt(d)``)."""
    diff = _flat(x) - _flat(y)
    c = pseudo_huber_c(diff.shape[1]) if c is None else c
    return (diff.pow(2).sum(1) + c * c).sqrt() - c


def l2_32(x, y):
    """Mean squared error after a bilinear resize to 32x32 (the CM paper's l2 for larger images)."""
    return l2(resize(x, 32), resize(y, 32))


DISTANCES.register("l2", lambda huber_c=None: l2)
DISTANCES.register("l1", lambda huber_c=None: l1)
DISTANCES.register("pseudo_huber", lambda huber_c=None: lambda x, y: pseudo_huber(x, y, huber_c))
DISTANCES.register("l2-32", lambda huber_c=None: l2_32)


def distance(name: str, x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """The per-sample distance ``name`` between two batches (``c``: pseudo-Huber's constant)."""
    return DISTANCES[name](c)(x, y)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an image batch to size x size (no-op when already that size)."""
    if x.ndim != 4:
        raise ValueError(f"this distance needs image batches (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2:] == (size, size):
        return x
    return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# torchvision's file names for the ImageNet backbones lpips builds on
LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, per sample: inputs in [-1, 1], grayscale repeated
    to 3 channels, images smaller than 224 upsampled bilinearly to 224 (as the CM paper does for CIFAR-10).

    lpips's calibrated linear heads ship inside the package; the VGG / AlexNet backbone comes from torchvision's
    weight server, which may be unreachable: then construction fails with one line naming the file to place in
    ``$TORCH_HOME/hub/checkpoints``. ``random_backbone=True`` skips the download (tests of the loss path only).
    """

    def __init__(self, net: str = "vgg", random_backbone: bool = False, upsample_to: int = 224):
        super().__init__()
        import lpips

        if net not in LPIPS_BACKBONE_FILES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; choose vgg or alex")
        if not random_backbone:
            _require_backbone_file(net)
        with warnings.catch_warnings():  # torchvision's deprecation notes about lpips's `pretrained=` calls
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=random_backbone, verbose=False)
        self.model.eval().requires_grad_(False)
        self.upsample_to = upsample_to

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS needs 1- or 3-channel images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        if x.shape[-1] < self.upsample_to:
            x, y = resize(x, self.upsample_to), resize(y, self.upsample_to)
        return self.model(x, y, normalize=False).reshape(x.shape[0])


def _require_backbone_file(net: str) -> None:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    file = checkpoints / LPIPS_BACKBONE_FILES[net]
    if not file.is_file():
        raise FileNotFoundError(
            f"LPIPS-{net} needs torchvision's ImageNet weights {file.name}, which are not in {checkpoints} "
            f"and cannot be downloaded here; copy {file.name} there ($TORCH_HOME/hub/checkpoints) or use "
            "objective.distance = 'l2-32' or 'pseudo_huber'")
    # lpips has torchvision load it through torch.hub without a hash check: the name's hash prefix is checked here
    check_weights_file(file, f"LPIPS-{net} backbone weights", file.stem.rsplit("-", 1)[1])


for _name, _net in (("lpips", "vgg"), ("lpips-vgg", "vgg"), ("lpips-alex", "alex")):
    DISTANCES.register(_name, lambda huber_c=None, _net=_net: LPIPSDistance(_net))


def make_distance(name: str, huber_c: float | None = None):
    """A per-sample distance ``(x, y) -> (batch,)`` by name; LPIPS variants build their network once."""
    if huber_c is not None:
        in_range(huber_c, "objective.huber_c", 0, low_open=True, fix="or leave it unset: 0.00054 sqrt(d)")
    return DISTANCES[name](huber_c)


@WEIGHTINGS.register("uniform")
def uniform(sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(sigma_hi)


@WEIGHTINGS.register("inverse_gap")
def inverse_gap(sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    """iCT's lambda: ``1 / (sigma_{n+1} - sigma_n)``."""
    return 1 / (sigma_hi - sigma_lo)


def weighting(name: str, sigma_hi: torch.Tensor, sigma_lo: torch.Tensor) -> torch.Tensor:
    return WEIGHTINGS[name](sigma_hi, sigma_lo)
