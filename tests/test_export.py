"""A model exported with to_diffusers samples the same through diffusers' ConsistencyModelPipeline as through
cmkit from the same starting noise."""

import pytest
import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

import cmkit
from cmkit.models import small_unet
from cmkit.sampling import multistep


def make_cm(channels, num_classes):
    torch.manual_seed(0)
    net = small_unet(sample_size=8, channels=channels, base=16, num_classes=num_classes)
    for p in net.parameters():  # random, not zero-initialised outputs: a real test of the pass-through
        p.data.normal_(0, 0.05)
    return cmkit.ConsistencyModel(net, sigma_min=0.01, sigma_max=80.0)


@pytest.mark.parametrize("channels,num_classes", [(1, None), (3, None), (1, 10)])
@pytest.mark.parametrize("timesteps", [[0], [20, 0]])
def test_pipeline_matches_cmkit(tmp_path, channels, num_classes, timesteps):
    cm = make_cm(channels, num_classes).eval()
    cm.to_diffusers(tmp_path / "pipe")
    pipe = ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    n = 3
    labels = torch.tensor([1, 5, 9]) if num_classes else None
    cond = {"class_labels": labels} if num_classes else {}
    # The stock pipeline refuses `latents=` of other than 3 channels, so let it draw its own starting noise and
    # draw the same stream here: first the start noise, then one re-noise per step.
    got = pipe(batch_size=n, timesteps=timesteps, generator=torch.Generator().manual_seed(1), output_type="pt",
               **cond).images
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, channels, 8, 8, generator=g)
    renoise = torch.randn(n, channels, 8, 8, generator=g)[None]
    sigmas = pipe.scheduler.sigmas[:-1].tolist() if len(timesteps) > 1 else [80.0]
    with torch.no_grad():
        ours = multistep(cm, 80.0 * z, sigmas, noise=renoise, **cond)
    torch.testing.assert_close(got, (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-4)


def test_roundtrip_through_pipeline_folder(tmp_path):
    cm = make_cm(1, None)
    cm.to_diffusers(tmp_path / "pipe")
    back = cmkit.ConsistencyModel.from_pretrained(tmp_path / "pipe")
    assert (back.sigma_min, back.sigma_max, back.sigma_data) == (0.01, 80.0, 0.5)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x, 1.5), cm(x, 1.5))


def test_pipeline_timesteps_reproduce_the_schedule():
    cm = make_cm(1, None)
    sched = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.01, sigma_max=80.0)
    grid = sched.sigmas  # Karras points the pipeline can reach
    cm.default_sigmas[2] = [80.0, float(grid[25])]
    ts = cm.pipeline_timesteps(2)
    sched.set_timesteps(timesteps=ts)
    torch.testing.assert_close(sched.sigmas[:2].double(), torch.tensor([80.0, float(grid[25])], dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_mlp_models_cannot_export(tmp_path):
    cm = cmkit.ConsistencyModel(cmkit.TimeMLP(dim=2, hidden=8, depth=1))
    with pytest.raises(ValueError, match="UNet2DModel"):
        cm.to_diffusers(tmp_path / "x")
