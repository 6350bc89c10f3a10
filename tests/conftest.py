import os
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite on both cores as two workers (README: pytest -n 2): one thread each, subprocesses included, since two
    # processes at two threads apiece on two cores spin-wait on each other's OpenMP barriers
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))
# The hub is unreachable here: fail hub look-ups at once instead of after five retries (subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def gaussian_denoiser():
    """The exact denoiser of N(mu, s^2 I) data: D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    class GaussianDenoiser(torch.nn.Module):
        def __init__(self, mu, s):
            super().__init__()
            self.mu, self.s = mu, s
            self.sigma_min, self.sigma_max = 0.002, 80.0

        def forward(self, x, sigma):
            sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)

    return GaussianDenoiser


CLI = [sys.executable, "-m", "cmkit"]


def free_port() -> str:
    """A TCP port nothing listens on, for a launcher test's rendezvous (fixed ports collide when tests run in
    parallel)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
ROOT = Path(__file__).resolve().parents[1]


def caption_data(size: int = 16, items=("bag", "boot")):
    """24 coloured random images with captions "a {colour} {item}" (20 to train on, 4 held out), the small
    captioned set the text-to-image training tests run on."""
    from cmkit.data import Dataset
    from cmkit.data.fashion_colours import paint

    g = torch.Generator().manual_seed(0)
    gray = torch.rand(24, 1, size, size, generator=g) * 2 - 1
    colours = torch.arange(24) % 3
    caps = [f"a {['red', 'green', 'blue'][c]} {items[i % 2]}" for i, c in enumerate(colours.tolist())]
    x = paint(gray, colours)
    return Dataset("tiny-captions", x[:20], x[20:], train_captions=caps[:20], test_captions=caps[20:])
