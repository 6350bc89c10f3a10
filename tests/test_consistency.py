import torch

import cmkit
from cmkit import EDMDenoiser, TimeMLP
from cmkit.models import ConsistencyModel


def make_cm(**kw):
    torch.manual_seed(0)
    return ConsistencyModel(TimeMLP(dim=3, hidden=32, depth=2), **kw)


def test_boundary_condition_exact():
    cm = make_cm()
    # scramble the weights so F is far from zero
    for p in cm.parameters():
        p.data.normal_(0, 3)
    x = torch.randn(16, 3) * 5
    assert torch.equal(cm(x, 0.002), x)
    assert torch.equal(cm(x, torch.full((16,), 0.002)), x)
    assert not torch.allclose(cm(x, 0.5), x)


def test_parameterisation_matches_formula():
    """f = c_skip x + c_out F(c_in x, 250 log sigma) with the scalings written out by hand (sigma_min 0.002,
    sigma_data 0.5), and the scalings equal diffusers' CMStochasticIterativeScheduler's (an independent
    implementation: its boundary-condition scalings and its model-input scaling)."""
    from diffusers import CMStochasticIterativeScheduler

    cm = make_cm().double()
    x = torch.randn(8, 3, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.01, 0.1, 0.5, 1, 2, 10, 80.0], dtype=torch.float64)
    c_skip = 0.25 / ((sigma - 0.002) ** 2 + 0.25)
    c_out = (sigma - 0.002) * 0.5 / (sigma**2 + 0.25).sqrt()
    c_in = 1 / (sigma**2 + 0.25).sqrt()
    f = cm.backbone(c_in[:, None] * x, 250 * sigma.log())
    torch.testing.assert_close(cm(x, sigma), c_skip[:, None] * x + c_out[:, None] * f, rtol=1e-12, atol=1e-12)
    sched = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    d_skip, d_out = sched.get_scalings_for_boundary_condition(sigma)
    ours = cmkit.boundary_scalings(sigma)
    torch.testing.assert_close(ours[0], d_skip, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ours[1], d_out, rtol=1e-12, atol=1e-15)
    sched.set_timesteps(timesteps=[39, 0])  # scale_model_input divides by sqrt(sigma^2 + sigma_data^2)
    s0 = float(sched.sigmas[0])
    torch.testing.assert_close(sched.scale_model_input(torch.ones(1, dtype=torch.float64), sched.timesteps[0]),
                               cmkit.boundary_scalings(torch.tensor([s0], dtype=torch.float64))[2])


def test_save_and_load_roundtrip(tmp_path):
    cm = make_cm(default_sigmas={2: [80.0, 0.7]})
    cm.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    back = ConsistencyModel.from_pretrained(tmp_path / "m")
    x = torch.randn(4, 3)
    torch.testing.assert_close(back(x, 3.0), cm(x, 3.0), rtol=0, atol=0)
    assert back.sigmas_for_steps(2) == [80.0, 0.7]
    assert back.sigmas_for_steps(3)[0] == 80.0


def test_student_starts_from_teacher_weights():
    torch.manual_seed(0)
    teacher = EDMDenoiser(TimeMLP(dim=3, hidden=32, depth=2))
    teacher.requires_grad_(False)
    cm = ConsistencyModel.from_teacher(teacher)
    for (n, a), (_, b) in zip(cm.backbone.named_parameters(), teacher.backbone.named_parameters(), strict=True):
        assert torch.equal(a, b), n
        assert a.requires_grad and a.data_ptr() != b.data_ptr()


def test_sample_per_sample_noise_independent_of_batch_size():
    cm = make_cm()
    a = cmkit.sample(cm, 3, steps=2, generator=torch.Generator().manual_seed(7))
    b = cmkit.sample(cm, 10, steps=2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b[:3])


def test_multistep_is_algorithm_1():
    cm = make_cm()
    sig = [80.0, 2.0, 0.5]
    g = torch.Generator().manual_seed(1)
    out = cmkit.sample(cm, 5, sigmas=sig, generator=g)
    from cmkit.sampling import per_sample_noise

    z = per_sample_noise(5, 3, (3,), torch.Generator().manual_seed(1))
    x = cm(80.0 * z[0], 80.0)
    for k, s in enumerate(sig[1:]):
        x = cm(x + (s**2 - 0.002**2) ** 0.5 * z[k + 1], s)
    torch.testing.assert_close(out, x)


def test_sample_rejects_bad_sigmas():
    import pytest

    cm = make_cm()
    with pytest.raises(ValueError, match="descending"):
        cmkit.sample(cm, 2, sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="sigma_min, sigma_max"):
        cmkit.sample(cm, 2, sigmas=[100.0, 1.0])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cmkit.sample(cm, 2, steps=0)


def test_schedule_search_is_stored_and_used(tmp_path):
    from cmkit.sampling import search_schedule

    cm = make_cm()
    ref = torch.randn(300, 3) * 0.5
    def score(x, reference, seed):
        return cmkit.metrics.sliced_wasserstein(x, reference, n_projections=64, seed=seed)

    found = search_schedule(cm, ref, score, max_steps=3, candidates=4, num=200, progress=False)
    assert set(found) == {2, 3}
    for steps, r in found.items():
        assert len(r["sigmas"]) == steps and r["sigmas"][0] == cm.sigma_max
        assert r["score"] <= r["karras_score"]
    # the 2-step choice is the best of its candidates (or the Karras default), scored independently here
    candidates = [[cm.sigma_max, s] for s in cmkit.core.log_spaced(cm.sigma_max, cm.sigma_min * 1.5, 4)]
    candidates.append(cm.karras_schedule(2))

    def rescore(sig):
        x = cmkit.sample(cm, 200, sigmas=sig, generator=torch.Generator().manual_seed(12345))
        return score(x, ref[:200], 12345)

    best = min(candidates, key=rescore)
    assert found[2]["sigmas"] == best and found[2]["score"] == rescore(best)
    cm.save_pretrained(tmp_path / "m")
    back = ConsistencyModel.from_pretrained(tmp_path / "m")
    assert back.sigmas_for_steps(2) == found[2]["sigmas"]
    g = torch.Generator().manual_seed(0)
    explicit = cmkit.sample(back, 4, sigmas=found[2]["sigmas"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cmkit.sample(back, 4, steps=2, generator=g), explicit)
