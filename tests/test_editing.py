"""Zero-shot editing: orthogonal operators, known pixels / coefficients kept, and the one-sigma reduction."""

import math

import pytest
import torch

import cmkit
from cmkit.models import small_unet
from cmkit.sampling.editing import LUMA, ColorBasis, PatchBasis, orthonormal_basis


def cm_rgb(channels=3, size=8):
    torch.manual_seed(0)
    net = small_unet(sample_size=size, channels=channels, base=8, levels=1, attention=False)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    return cmkit.ConsistencyModel(net, sigma_min=0.002, sigma_max=80.0)


@pytest.mark.parametrize("first", [torch.tensor(LUMA), torch.ones(4), torch.ones(9), torch.tensor([0.0, -2.0, 1.0])])
def test_bases_are_orthogonal_with_the_right_first_axis(first):
    q = orthonormal_basis(first)
    torch.testing.assert_close(q @ q.T, torch.eye(len(first), dtype=torch.float64))
    torch.testing.assert_close(q[0], first.double() / first.double().norm())


def test_transforms_invert_and_preserve_norm():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for t in (ColorBasis(), PatchBasis(2), PatchBasis(4)):
        c = t.forward(x)
        torch.testing.assert_close(t.inverse(c), x)
        torch.testing.assert_close(c.pow(2).sum(), x.pow(2).sum())
    c = PatchBasis(2).forward(x)
    torch.testing.assert_close(c[..., 0], 2 * torch.nn.functional.avg_pool2d(x, 2))


def test_inpaint_keeps_known_pixels_exactly_any_batch():
    cm = cm_rgb()
    for b in (1, 3, 7):
        images = torch.rand(b, 3, 8, 8) * 2 - 1
        mask = (torch.rand(b, 1, 8, 8) < 0.5).float()
        out = cmkit.inpaint(cm, images, mask, sigmas=[80.0, 1.0, 0.2], generator=torch.Generator().manual_seed(0))
        keep = mask.expand_as(images).bool()
        assert torch.equal(out[keep], images[keep])
        assert not torch.allclose(out[~keep], images[~keep])


def test_colorize_keeps_luminance():
    cm = cm_rgb()
    gray = torch.rand(5, 1, 8, 8) * 2 - 1
    out = cmkit.colorize(cm, gray, sigmas=[80.0, 0.5])
    lum = sum(w * out[:, i] for i, w in enumerate(LUMA))
    torch.testing.assert_close(lum, gray[:, 0], rtol=0, atol=1e-5)
    assert out.shape == (5, 3, 8, 8)
    with pytest.raises(ValueError, match="RGB model"):
        cmkit.colorize(cm_rgb(channels=1), gray)


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_keeps_patch_means(factor):
    cm = cm_rgb()
    low = torch.rand(2, 3, 8 // factor, 8 // factor) * 2 - 1
    out = cmkit.superres(cm, low, factor, sigmas=[80.0, 0.3])
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(out, factor), low, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="does not give the model"):
        cmkit.superres(cm, low, factor * 2)


def test_single_sigma_is_one_denoise_plus_replacement():
    cm = cm_rgb().eval()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    g = torch.Generator().manual_seed(3)
    out = cmkit.inpaint(cm, images, mask, sigmas=[80.0], generator=g)
    from cmkit.sampling import per_sample_noise

    z = per_sample_noise(2, 1, (3, 8, 8), torch.Generator().manual_seed(3))[0]
    with torch.no_grad():
        den = cm(mask * images + 80.0 * z, 80.0)
    torch.testing.assert_close(out, mask * images + (1 - mask) * den)


def test_denoise_interpolate_sdedit_shapes_and_errors():
    cm = cm_rgb()
    x = torch.rand(2, 3, 8, 8)
    assert cmkit.denoise(cm, x, 0.5).shape == x.shape
    with pytest.raises(ValueError, match="outside the model's range"):
        cmkit.denoise(cm, x, 500.0)
    z0, z1 = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
    path = cmkit.interpolate(cm, z0, z1, [0.0, 0.5, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(path[0], cm(80.0 * z0[None], 80.0)[0], rtol=1e-5, atol=1e-5)
    assert cmkit.sdedit(cm, x, 2.0, sigmas=[2.0, 0.5]).shape == x.shape
    with pytest.raises(ValueError, match="image model"):
        cmkit.inpaint(cmkit.ConsistencyModel(cmkit.TimeMLP(dim=2, hidden=8, depth=1)), torch.zeros(1, 2), 1)


class GaussianCM(torch.nn.Module):
    """The exact consistency function of N(0, s2 I) data: x_sigma / sqrt(s2 + sigma^2) is constant along a PF-ODE
    trajectory, so f(x, sigma) = x sqrt((s2 + sigma_min^2) / (s2 + sigma^2)) (+ ``shift``, a condition to pass
    through). In training mode it answers 2 f, as a dropout network would answer differently."""

    sigma_min, sigma_max, sample_shape = 0.002, 80.0, (3, 8, 8)

    def __init__(self, s2=0.3):
        super().__init__()
        self.s2 = s2
        # editing reads the device and dtype off a parameter
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, sigma, shift=0.0):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        f = x * ((self.s2 + self.sigma_min**2) / (self.s2 + sigma**2)).sqrt() + shift
        return 2 * f if self.training else f


def exact_f(x, sigma, s2=0.3, shift=0.0):
    return x * math.sqrt((s2 + 0.002**2) / (s2 + sigma**2)) + shift


def test_denoise_is_one_evaluation_of_the_consistency_function_in_eval_mode():
    cm = GaussianCM().train()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for sigma in (0.002, 0.5, 80.0):
        torch.testing.assert_close(cmkit.denoise(cm, x, sigma), exact_f(x, sigma), rtol=1e-12, atol=0)
    torch.testing.assert_close(cmkit.denoise(cm, x, 1.5, shift=0.25), exact_f(x, 1.5, shift=0.25), rtol=1e-12, atol=0)
    assert cm.training  # the caller's mode comes back
    # a real consistency model: f(x, sigma_min) = x exactly, and elsewhere one eval-mode pass of the network
    real = cm_rgb().train()
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(cmkit.denoise(real, y, real.sigma_min), y)
    with torch.no_grad():
        torch.testing.assert_close(cmkit.denoise(real, y, 0.7), real.eval()(y, 0.7), rtol=0, atol=0)


def test_sdedit_noises_the_guide_to_sigma_start_then_runs_algorithm_1():
    from cmkit.sampling import per_sample_noise

    cm = GaussianCM().train()
    guide = torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    # default: one step, f(guide + sigma_start z_0, sigma_start)
    out = cmkit.sdedit(cm, guide, 2.0, generator=torch.Generator().manual_seed(5), shift=0.1)
    z = per_sample_noise(3, 1, (3, 8, 8), torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(out, exact_f(guide + 2.0 * z[0], 2.0, shift=0.1), rtol=1e-12, atol=1e-12)
    # a chain: after each denoise, re-noise to the next sigma with sqrt(sigma^2 - sigma_min^2) z_k, denoise again
    sig = [2.0, 0.5, 0.1]
    out = cmkit.sdedit(cm, guide, 2.0, sigmas=sig, generator=torch.Generator().manual_seed(5))
    z = per_sample_noise(3, 3, (3, 8, 8), torch.Generator().manual_seed(5), dtype=torch.float64)
    x = exact_f(guide + 2.0 * z[0], 2.0)
    for k, s in enumerate(sig[1:], 1):
        x = exact_f(x + math.sqrt(s**2 - 0.002**2) * z[k], s)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert cm.training
    with pytest.raises(ValueError, match="must start at sigma_start"):
        cmkit.sdedit(cm, guide, 2.0, sigmas=[1.0, 0.5])
