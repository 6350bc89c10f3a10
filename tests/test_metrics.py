import math

import numpy as np
import torch

from cmkit import metrics


def test_sliced_wasserstein_of_a_shift_is_its_projection_rms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g, dtype=torch.float64)
    delta = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    # a shift moves every sorted projection by theta . delta exactly
    theta = torch.randn(4, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theta /= theta.norm(dim=0, keepdim=True)
    want = math.sqrt(((delta @ theta) ** 2).mean().item())
    assert math.isclose(metrics.sliced_wasserstein(a, a + delta, n_projections=64, seed=3), want, rel_tol=1e-9)
    assert metrics.sliced_wasserstein(a, a[torch.randperm(500)]) < 1e-12


def test_sliced_wasserstein_1d_matches_quantile_w2_and_unequal_sizes():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 1))
    b = rng.normal(0.5, 1, (3000, 1))
    # 1-D W2 between N(0,1) and N(0.5,1) is 0.5 exactly; with one dimension every projection is +-identity
    assert abs(metrics.sliced_wasserstein(a, b, n_projections=8) - 0.5) < 0.06


def naive_mmd(a, b, h):
    def k(x, y):
        return math.exp(-float(((x - y) ** 2).sum()) / (2 * h * h))
    m, n = len(a), len(b)
    saa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sbb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return saa + sbb - 2 * sab


def test_mmd_matches_naive_loops_and_median_heuristic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 3)), rng.normal(0.3, 1, size=(25, 3))
    h = metrics.median_bandwidth(a, b)
    z = np.concatenate([a, b])
    d = np.sqrt(((z[:, None] - z[None]) ** 2).sum(-1))
    assert math.isclose(h, float(np.median(d[np.triu_indices(len(z), 1)])), rel_tol=1e-12)
    assert math.isclose(metrics.mmd(a, b), naive_mmd(a, b, h), rel_tol=1e-9)


def test_mmd_gaussian_closed_form_and_identical_sets():
    rng = np.random.default_rng(2)
    d, s, h = 2, 1.0, 1.5
    mu = np.array([0.6, 0.0])
    a, b = rng.normal(0, s, (3000, d)), rng.normal(0, s, (3000, d)) + mu
    c = (h * h / (h * h + 2 * s * s)) ** (d / 2)
    want = 2 * c * (1 - math.exp(-float(mu @ mu) / (2 * (h * h + 2 * s * s))))
    assert abs(metrics.mmd(a, b, bandwidth=h) - want) < 0.01
    same = rng.normal(size=(2000, d))
    assert abs(metrics.mmd(same, rng.normal(size=(2000, d)))) < 2e-3


def test_frechet_distance_of_two_gaussians():
    rng = np.random.default_rng(3)
    ca = np.diag([1.0, 4.0])
    cb = np.diag([9.0, 1.0])
    a = rng.multivariate_normal([0, 0], ca, 200_000)
    b = rng.multivariate_normal([1, 2], cb, 200_000)
    # diagonal covariances: |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    want = 5.0 + (1 - 3) ** 2 + (2 - 1) ** 2
    assert abs(metrics.frechet_distance(a, b) - want) < 0.1
    assert metrics.frechet_distance(a[:5000], a[:5000]) < 1e-6


def test_precision_recall_knn_manifolds():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 2, generator=g, dtype=torch.float64)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100.0
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    # fakes on one half of the real cloud: precise, but they cover only part of it
    half = real[real[:, 0] > 0]
    p, r = metrics.precision_recall(real, half + 0.01)
    assert p > 0.95 and r < 0.7
    # a hand-checked case: real points 0, 1, 2, 3 on a line (k=1 radii 1), fake points 0.5, 10, 11, 12
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0], [11.0], [12.0]])
    p, r = metrics.precision_recall(real, fake, k=1)
    # precision: only 0.5 lies in a real ball (radius 1); recall: the lone fake 0.5 has radius 9.5 (to 10), which
    # covers every real point
    assert p == 0.25 and r == 1.0
