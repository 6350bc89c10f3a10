"""Editing's defaults work (issue 14, item 6): with neither ``steps`` nor ``sigmas``, inpainting and super-resolution
run along the model's editing schedule and beat the simple baselines on held-out digits.

Uses the consistency model that ships with cmkit (``cmkit:digits-cd``, ``recipes/digits-cd.toml``), so it runs on a
clean clone with no ``runs/`` folder.
"""

import pytest
import torch
import torch.nn.functional as F

import cmkit
from cmkit.core import karras_steps
from cmkit.data import load_dataset


@pytest.fixture(scope="module")
def cm_and_digits():
    torch.manual_seed(0)
    return cmkit.ConsistencyModel.from_pretrained("cmkit:digits-cd"), load_dataset("digits").test


def test_the_shipped_model_stores_its_editing_schedule(cm_and_digits, tmp_path):
    cm, _ = cm_and_digits
    assert cm.editing_schedule() == karras_steps(18, cm.sigma_min, cm.sigma_max)
    cm2 = cmkit.ConsistencyModel.from_pretrained(cm.save_pretrained(tmp_path / "m"))
    assert cm2.editing_sigmas == cm.editing_schedule()  # written at export, read back
    cm2.editing_sigmas = [80.0, 2.0, 0.5]
    cm3 = cmkit.ConsistencyModel.from_pretrained(cm2.save_pretrained(tmp_path / "m2"))
    assert cm3.editing_schedule() == [80.0, 2.0, 0.5]


def test_default_inpainting_beats_mean_fill(cm_and_digits):
    cm, x = cm_and_digits
    mask = (torch.rand(x.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    missing = (1 - mask).expand_as(x).bool()
    known_mean = (x * mask).sum((1, 2, 3), keepdim=True) / mask.sum((1, 2, 3), keepdim=True)
    mean_fill = float(((known_mean.expand_as(x) - x) ** 2)[missing].mean())
    out = cmkit.inpaint(cm, x, mask, generator=torch.Generator().manual_seed(0))  # one sample, default schedule
    assert torch.equal(out[~missing], x[~missing])
    mse = float(((out - x) ** 2)[missing].mean())
    print(f"inpaint a random half of {x.shape[0]} held-out digits, one default sample: MSE {mse:.3f} on the "
          f"missing pixels, mean-fill {mean_fill:.3f}")
    assert mse < 0.8 * mean_fill  # measured 0.39 against 0.59


def test_default_superres_beats_bicubic(cm_and_digits):
    cm, x = cm_and_digits
    low = F.avg_pool2d(x, 2)
    bicubic = float(((F.interpolate(low, scale_factor=2, mode="bicubic").clamp(-1, 1) - x) ** 2).mean())
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([cmkit.superres(cm, low, 2, generator=gen) for _ in range(4)])
    torch.testing.assert_close(F.avg_pool2d(draws[0], 2), low, rtol=0, atol=1e-5)  # patch means kept
    posterior_mean = float(((draws.mean(0) - x) ** 2).mean())
    one = float(((draws[0] - x) ** 2).mean())
    print(f"superres x2 of {x.shape[0]} held-out digits, default schedule: mean of 4 draws MSE {posterior_mean:.3f}, "
          f"one draw {one:.3f}, bicubic {bicubic:.3f}")
    # a single draw is a sample of the posterior, so its MSE carries the posterior's variance; the mean of a few
    # draws estimates the posterior mean and is the fair match for a deterministic upsampler
    assert posterior_mean < 0.85 * bicubic  # measured 0.13 against 0.18
    one_step = cmkit.superres(cm, low, 2, steps=1, generator=torch.Generator().manual_seed(0))
    assert one < float(((one_step - x) ** 2).mean())  # the old default (one step) is worse: 0.35
