"""DiffusersDenoiser against an independent computation of x0 from the same UNet, for every prediction type."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

import cmkit
from cmkit.models import small_unet


def unet(num_classes=None, out_mult=1):
    torch.manual_seed(0)
    net = small_unet(sample_size=8, channels=1, base=16, num_classes=num_classes)
    if out_mult == 2:
        net = UNet2DModel(**{**net.config, "out_channels": 2})
    return net.double().eval()


def reference_x0(net, sched, x0, eps, t_float, labels=None):
    """Independent: abar at a (possibly fractional) timestep by interpolating log sigma ourselves, the VP sample,
    the UNet at that timestep, and the textbook conversion of its output."""
    abar = sched.alphas_cumprod.double()
    log_sig = (((1 - abar) / abar).sqrt()).log()
    lo = int(math.floor(t_float))
    frac = t_float - lo
    ls = log_sig[lo] if frac == 0 else (1 - frac) * log_sig[lo] + frac * log_sig[lo + 1]
    sigma = math.exp(float(ls))
    a = 1 / math.sqrt(1 + sigma**2)      # sqrt(abar)
    b = sigma / math.sqrt(1 + sigma**2)  # sqrt(1 - abar)
    x_t = a * x0 + b * eps
    kwargs = {"class_labels": labels} if labels is not None else {}
    out = net(x_t, torch.full((x0.shape[0],), t_float, dtype=torch.float64), **kwargs).sample[:, : x0.shape[1]]
    kind = sched.config.prediction_type
    if kind == "epsilon":
        x0_hat = (x_t - b * out) / a
    elif kind == "v_prediction":
        x0_hat = a * x_t - b * out
    else:
        x0_hat = out
    return sigma, x0 + sigma * eps, x0_hat


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [0.0, 17.0, 499.0, 999.0, 250.5, 37.25])
def test_matches_independent_x0(prediction, t):
    net = unet()
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    den = cmkit.DiffusersDenoiser(net, sched)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64).clamp(-1, 1), torch.randn(
        3, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        sigma, x_sigma, ref = reference_x0(net, sched, x0, eps, t)
        got = den(x_sigma, sigma)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_table_timesteps_agree_with_scheduler_maths():
    """At table entries, our sigma-space input equals diffusers' own add_noise, and x0 equals DDPMScheduler.step's
    pred_original_sample."""
    net = unet()
    sched = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    den = cmkit.DiffusersDenoiser(net, sched)
    g = torch.Generator().manual_seed(2)
    x0, eps = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    for t in (3, 400, 998):
        abar = sched.alphas_cumprod[t].double()
        sigma = float(((1 - abar) / abar).sqrt())
        x_t = sched.add_noise(x0, eps, torch.tensor([t]))
        with torch.no_grad():
            out = net(x_t, t).sample
            ref = sched.step(out, t, x_t).pred_original_sample
            got = den(x0 + sigma * eps, sigma)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_class_conditional_and_learned_variance():
    net = unet(num_classes=10)
    sched = DDIMScheduler(num_train_timesteps=1000)
    den = cmkit.DiffusersDenoiser(net, sched)
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        sigma, x_sigma, ref = reference_x0(net, sched, x0, eps, 123.5, labels)
        got = den(x_sigma, sigma, class_labels=labels)
        other = den(x_sigma, sigma, class_labels=torch.tensor([4, 1]))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, other)
    wide = unet(out_mult=2)
    den2 = cmkit.DiffusersDenoiser(wide, DDPMScheduler(num_train_timesteps=1000))
    with torch.no_grad():
        sigma, x_sigma, ref = reference_x0(wide, den2.scheduler, x0, eps, 10.0)
        torch.testing.assert_close(den2(x_sigma, sigma), ref, rtol=1e-5, atol=1e-5)


def test_sigma_range_and_load_teacher_from_pipeline_folder(tmp_path):
    net = unet().float()
    sched = DDPMScheduler(num_train_timesteps=1000)
    DDPMPipeline(unet=net, scheduler=sched).save_pretrained(tmp_path / "ddpm")
    den = cmkit.load_teacher(tmp_path / "ddpm")
    abar = sched.alphas_cumprod.double()
    assert math.isclose(den.sigma_min, float(((1 - abar[0]) / abar[0]).sqrt()), rel_tol=1e-6)
    assert math.isclose(den.sigma_max, float(((1 - abar[-1]) / abar[-1]).sqrt()), rel_tol=1e-6)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(den(x, 1.0), cmkit.DiffusersDenoiser(net, sched)(x, 1.0))


def test_hub_id_is_the_real_from_pretrained_call(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not load teacher 'nobody/no-such-ddpm': no such folder here"):
        cmkit.load_teacher("nobody/no-such-ddpm")
