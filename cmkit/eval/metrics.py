"""Sample-quality metrics between two sets of samples of equal dimension, shape (n, d) or (n, C, H, W).

Depends on torch only.
"""

from __future__ import annotations

import torch


def _flat(a) -> torch.Tensor:
    a = torch.as_tensor(a)
    return a.reshape(a.shape[0], -1).to(torch.float64)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("each sample set needs at least 2 samples")


def sliced_wasserstein(a, b, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: ``sqrt(E_theta W2^2(theta.a, theta.b))`` over ``n_projections`` random unit
    directions (fixed by ``seed``). Unequal set sizes are compared through their quantile functions on a common grid.
    """
    a, b = _flat(a), _flat(b)
    _check_pair(a, b)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    b = b.to(a.device)
    pa, _ = (a @ theta).sort(0)
    pb, _ = (b @ theta).sort(0)
    if pa.shape[0] != pb.shape[0]:
        n = max(pa.shape[0], pb.shape[0])
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa, pb = _quantiles(pa, q), _quantiles(pb, q)
    return float((pa - pb).pow(2).mean(0).mean().sqrt())


def _quantiles(sorted_proj: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Empirical quantile function (step function) of each column, evaluated at levels q."""
    n = sorted_proj.shape[0]
    idx = (q * n).floor().long().clamp(0, n - 1)
    return sorted_proj[idx]


def median_bandwidth(a, b) -> float:
    """Median heuristic: the median pairwise Euclidean distance over the pooled sample (distinct pairs)."""
    z = torch.cat([_flat(a), _flat(b)])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(len(z), len(z), 1)
    return float(d[iu[0], iu[1]].median())


def mmd(a, b, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the RBF kernel ``exp(-|x - y|^2 / (2 h^2))``; ``h`` by the median heuristic.

    MMD^2 = mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j).
    """
    a, b = _flat(a), _flat(b)
    _check_pair(a, b)
    h = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if h <= 0:
        raise ValueError("bandwidth must be positive (are all samples identical?)")

    def k(x, y):
        return torch.exp(-torch.cdist(x, y).pow(2) / (2 * h * h))

    m, n = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    saa = (kaa.sum() - kaa.diagonal().sum()) / (m * (m - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (n * (n - 1))
    return float(saa + sbb - 2 * k(a, b).mean())


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    f = _flat(features)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets:
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^(1/2) C_b C_a^(1/2))^(1/2))``."""
    a, b = _flat(a), _flat(b)
    _check_pair(a, b)
    mu_a, ca = gaussian_stats(a)
    mu_b, cb = gaussian_stats(b)
    return frechet_from_stats(mu_a, ca, mu_b, cb)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_from_stats(mu_a, ca, mu_b, cb) -> float:
    ra = _sqrtm_psd(ca)
    cross = _sqrtm_psd(ra @ cb @ ra)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(ca) + torch.trace(cb) - 2 * torch.trace(cross))


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour; precision = share of fake points inside the real
    manifold, recall = share of real points inside the fake manifold."""
    real, fake = _flat(real), _flat(fake)
    _check_pair(real, fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(1).double().mean()
    return float(precision), float(recall)
