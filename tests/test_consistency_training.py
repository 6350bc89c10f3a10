"""CT / iCT / ECT: schedules pinned to their formulas, the discretised lognormal sampler against its
probabilities, shared dropout masks, no gradient through the target, and the objectives' errors; CD's target pinned
to a teacher step written out by hand on Gaussian data."""

import math

import pytest
import torch

import cmkit
from cmkit import core as S
from cmkit.models import ConsistencyModel
from cmkit.objectives import ConsistencyTraining, EasyConsistencyTuning, ImprovedConsistencyTraining
from cmkit.objectives import ct as C
from cmkit.objectives.ect import ect_r


@pytest.mark.parametrize("k,total", [(0, 1000), (1, 1000), (250, 1000), (999, 1000), (1000, 1000), (12345, 800000)])
def test_ct_schedule_formulas(k, total):
    s0, s1, mu0 = 2, 150, 0.9
    n = math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1
    assert C.ct_num_points(k, total, s0, s1) == n
    assert math.isclose(C.ct_target_mu(k, total, s0, s1, mu0, "paper"), math.exp(s0 * math.log(mu0) / n))
    assert math.isclose(C.ct_target_mu(k, total, s0, s1, mu0, "openai"), math.exp(s0 * math.log(mu0) / (n - 1)))
    assert C.ct_num_points(0, total) == 2 and C.ct_num_points(total, total) == 151


def test_ict_curriculum_and_stage_boundaries():
    total = 8000
    k_prime = math.floor(total / (math.log2(math.floor(1280 / 10)) + 1))
    assert k_prime == 1000
    for k in (0, 999):
        assert C.ict_num_points(k, total) == 11
    assert C.ict_num_points(1000, total) == 21
    assert C.ict_num_points(2999, total) == 41 and C.ict_num_points(3000, total) == 81
    assert C.ict_num_points(7000, total) == 1281 and C.ict_num_points(7999, total) == 1281
    assert C.ict_num_points(10**6, total) == 1281  # capped at s1 + 1


def test_ect_pairs_and_stages():
    t = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
    for stage in (0, 1, 3):
        n = 1 + 8 * torch.sigmoid(-t)
        want = (t * (1 - n / 2.0 ** (stage + 1))).clamp_min(0)
        torch.testing.assert_close(ect_r(t, stage, 2.0), want)
    assert ect_r(torch.tensor([0.01]), 0).item() == 0.0  # small t pairs with the data itself
    ect = EasyConsistencyTuning(stage_steps=250)
    assert [ect.stage(k) for k in (0, 249, 250, 999, 1000)] == [0, 0, 1, 3, 4]


def test_discretised_lognormal_chi_square():
    grid = S.karras_sigmas(41).flip(0)
    p = C.lognormal_index_probs(grid, -1.1, 2.0)
    e = torch.erf((grid.double().log() + 1.1) / (math.sqrt(2) * 2.0))
    want = (e[1:] - e[:-1]) / (e[-1] - e[0])
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    draws = torch.multinomial(p, n, replacement=True, generator=g)
    counts = torch.bincount(draws, minlength=len(p)).double()
    expected = n * p.double()
    keep = expected >= 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    # chi-square 99.9% quantile for dof ~ 39 is about 72; a wrong sampler lands far above
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof), (chi2, dof)


def dropout_cm():
    torch.manual_seed(0)
    return ConsistencyModel(cmkit.TimeMLP(dim=3, hidden=32, depth=2, dropout=0.5)).train()


@pytest.mark.parametrize("make", [lambda: ImprovedConsistencyTraining(total_steps=100, distance="l2"),
                                  lambda: EasyConsistencyTuning(distance="l2")])
def test_online_and_target_share_dropout_masks(make):
    cm = dropout_cm()
    masks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: masks.append((out == 0) & (inp[0] != 0)))
             for m in cm.modules() if isinstance(m, torch.nn.Dropout)]
    make()(cm, torch.randn(64, 3), target=cm, step=10)
    for h in hooks:
        h.remove()
    half = len(masks) // 2
    assert half > 0
    for a, b in zip(masks[:half], masks[half:], strict=True):  # target pass first, then online
        assert torch.equal(a, b)
        assert 0.3 < a.float().mean() < 0.7


def test_stop_gradient_target_gives_no_gradient_through_target():
    cm = dropout_cm().eval()
    obj = ImprovedConsistencyTraining(total_steps=100, distance="l2")
    x0 = torch.randn(32, 3)
    torch.manual_seed(1)
    obj(cm, x0, target=cm, step=0).backward()
    grads = [p.grad.clone() for p in cm.parameters()]
    cm.zero_grad()
    # the same loss with the target's output frozen by hand: gradients must be identical
    torch.manual_seed(1)
    grid = obj.grid(0)
    probs = C.lognormal_index_probs(grid)
    n = torch.multinomial(probs, 32, replacement=True)
    z = torch.randn_like(x0)
    s_n, s_np1 = grid[n], grid[n + 1]
    with torch.no_grad():
        tgt = cm(x0 + s_n[:, None] * z, s_n)
    loss = (1 / (s_np1 - s_n) * (cm(x0 + s_np1[:, None] * z, s_np1) - tgt).pow(2).mean(1)).mean()
    loss.backward()
    for g, p in zip(grads, cm.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert obj.target_ema(5) == 0.0


def test_ct_target_mu_follows_schedule():
    obj = ConsistencyTraining(total_steps=1000, distance="l2")
    assert obj.target_ema(0) == pytest.approx(math.exp(2 * math.log(0.9) / 1))
    assert obj.num_points(1000) == 151
    with pytest.raises(ValueError, match="mu_variant 'other'"):
        ConsistencyTraining(total_steps=1000, mu_variant="other")


def test_ect_late_stages_stay_finite():
    """Stages are capped where the gap t - r reaches 1e-3 t, so the 1/(t - r) weight never divides by zero."""
    cm = dropout_cm()
    ect = EasyConsistencyTuning(q=2.0, stage_steps=1, distance="l2")
    assert ect.stage(10**6) == ect.max_stage == 9
    loss = ect(cm, torch.randn(256, 3), target=cm, step=10**6)
    assert torch.isfinite(loss)


class Recorded(torch.nn.Module):
    """A stand-in network ``f(x, sigma) = x * scale(sigma)`` that records each call's inputs."""

    def __init__(self, scale):
        super().__init__()
        self.scale, self.calls = scale, []

    def forward(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return x * self.scale(sigma)[:, None]


def hand_step(mu, s2, x, s_from, s_to, solver):
    """One step of dx/dsigma = (x - D(x, sigma)) / sigma for N(mu, s2) data, D(x, s) = mu + s2 / (s2 + s^2) (x - mu),
    written out: Euler, or Heun's trapezoid with the drift at Euler's endpoint."""
    den = lambda v, s: mu + s2 / (s2 + s[:, None] ** 2) * (v - mu)  # noqa: E731
    drift = lambda v, s: (v - den(v, s)) / s[:, None]  # noqa: E731
    h = (s_to - s_from)[:, None]
    d0 = drift(x, s_from)
    euler = x + h * d0
    return euler if solver == "euler" else x + h * (d0 + drift(euler, s_to)) / 2


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("weighting", ["uniform", "inverse_gap"])
def test_cd_target_is_one_teacher_step_then_the_target_network(gaussian_denoiser, solver, weighting):
    """CD on Gaussian data: the online network sees x_{n+1} = x0 + sigma_{n+1} z at a point of the 6-point Karras grid
    (rho = 7, written out here); the target network sees the teacher's step from there to the grid point below,
    computed here by hand; the loss is lambda * mean((f(x_{n+1}) - f_target(x_n))^2)."""
    from cmkit.objectives import ConsistencyDistillation

    mu, s2, smin, smax, n_points = 0.3, 0.25, 0.002, 80.0, 6
    obj = ConsistencyDistillation(gaussian_denoiser(mu, s2**0.5), n_points, solver, "l2", weighting, target_mu=0.9)
    online, target = Recorded(lambda s: 1 / (1 + s)), Recorded(lambda s: torch.cos(s))
    x0 = torch.randn(512, 2, dtype=torch.float64)
    torch.manual_seed(0)
    loss = obj(online, x0, target=target)
    (x_hi, s_hi), = online.calls
    (x_lo, s_lo), = target.calls
    ramp = torch.linspace(0, 1, n_points, dtype=torch.float64)
    grid = (smin ** (1 / 7) + ramp * (smax ** (1 / 7) - smin ** (1 / 7))) ** 7  # ascending, grid[0] = sigma_min
    i = (s_hi[:, None] - grid).abs().argmin(1)
    torch.testing.assert_close(s_hi, grid[i], rtol=1e-6, atol=0)  # the grid is built in float32
    assert i.min() == 1 and i.max() == n_points - 1  # every pair (n, n + 1) is drawn
    torch.testing.assert_close(s_lo, grid[i - 1], rtol=1e-6, atol=0)
    z = (x_hi - x0) / s_hi[:, None]
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    torch.testing.assert_close(x_lo, hand_step(mu, s2, x_hi, s_hi, s_lo, solver), rtol=1e-10, atol=1e-10)
    lam = torch.ones_like(s_hi) if weighting == "uniform" else 1 / (s_hi - s_lo)
    f_on, f_tgt = x_hi / (1 + s_hi[:, None]), x_lo * torch.cos(s_lo)[:, None]
    torch.testing.assert_close(loss, (lam * (f_on - f_tgt).pow(2).mean(1)).mean(), rtol=1e-10, atol=0)
    # no target network: the online network, under no_grad, gives the target
    online.calls.clear()
    torch.manual_seed(0)
    obj(online, x0)
    (x_lo2, s_lo2), (x_hi2, s_hi2) = online.calls
    assert torch.equal(x_lo2, x_lo) and torch.equal(s_lo2, s_lo) and torch.equal(x_hi2, x_hi)


def vp_denoiser(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    return cmkit.DiffusersDenoiser(cmkit.models.small_unet(8, 1, 8, 1, 1, False),
                                   DDPMScheduler(prediction_type=prediction_type))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_consistency_model_formula_and_boundary(prediction_type):
    """f = c_skip x + c_out / c_out^EDM (D - c_skip^EDM x), spelled out with the division; exact at sigma_min."""
    den = vp_denoiser(prediction_type).double()
    cm = cmkit.DenoiserConsistencyModel.from_teacher(den, sigma_min=0.002).double()
    assert cm.sigma_min == pytest.approx(den.sigma_min)  # the teacher's table starts above 0.002
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([cm.sigma_min, 0.3, 40.0], dtype=torch.float64)
    c_skip, c_out, _ = cmkit.core.boundary_scalings(sigma, cm.sigma_min, cm.sigma_data)
    c_skip_e, c_out_e, _ = cmkit.core.edm_scalings(sigma, cm.sigma_data)
    with torch.no_grad():
        d = den(x, sigma)
        want = c_skip[:, None, None, None] * x + (c_out / c_out_e)[:, None, None, None] * (
            d - c_skip_e[:, None, None, None] * x)
        got = cm(x, sigma)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(cm(x, cm.sigma_min), x) and torch.equal(cm.float()(x.float(), cm.sigma_min), x.float())
    # far from sigma_min the student is the teacher to O(sigma_min / sigma): ECT's starting point
    torch.testing.assert_close(got[2], d[2], rtol=0, atol=2 * cm.sigma_min / 40 * d[2].abs().max().item())


def test_denoiser_consistency_model_saves_loads_and_refuses_pipeline_export(tmp_path):
    cm = cmkit.DenoiserConsistencyModel.from_teacher(vp_denoiser("v_prediction"), default_sigmas={2: [80.0, 0.5]})
    cm.save_pretrained(tmp_path / "m")
    back = cmkit.ConsistencyModel.from_pretrained(tmp_path / "m")
    assert isinstance(back, cmkit.DenoiserConsistencyModel)
    assert back.denoiser.prediction_type == "v_prediction" and back.sigmas_for_steps(2) == [80.0, 0.5]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x, 1.5), cm(x, 1.5))
    with pytest.raises(ValueError, match="save_pretrained"):
        cm.to_diffusers(tmp_path / "pipe")


def test_ect_from_a_vp_teacher_trains_the_whole_denoiser(tmp_path):
    from cmkit.cli.jobs import train_consistency
    from cmkit.cli.recipes import load_recipe

    den = vp_denoiser()
    recipe = load_recipe("s_curve-ect", ['data.name="digits"', "train.steps=2", "train.batch_size=8",
                                         "train.checkpoint_every=2", "eval.schedule_max_steps=0"])
    train_consistency(recipe, tmp_path, teacher=den, progress=False)
    cm = cmkit.ConsistencyModel.from_pretrained(tmp_path / "model")
    assert isinstance(cm, cmkit.DenoiserConsistencyModel)
    assert isinstance(cm.denoiser.unet, type(den.unet))
    moved = {n: not torch.equal(a, b) for (n, a), (_, b) in
             zip(cm.denoiser.unet.named_parameters(), den.unet.named_parameters(), strict=True)}
    # the whole UNet trains, first and last layers included (not just a head, not a frozen copy)
    assert moved["conv_in.weight"] and moved["conv_out.weight"] and moved["time_embedding.linear_1.weight"]
    assert sum(moved.values()) >= 0.9 * len(moved), [n for n, m in moved.items() if not m]


def test_cd_student_can_keep_a_vp_teachers_parameterisation(tmp_path):
    """model.student = "teacher": the CD student starts as the teacher denoiser itself (identical outputs at large
    sigma before training); "edm" keeps the exportable copied-UNet student; anything else is a clear error."""
    from cmkit.cli.jobs import build_run, dataset_for
    from cmkit.cli.recipes import load_recipe

    den = vp_denoiser()
    recipe = load_recipe("digits-cd", ['model.student="teacher"'])
    data = dataset_for(recipe)
    student, objective = build_run(recipe, data, den)
    assert isinstance(student, cmkit.DenoiserConsistencyModel) and objective.teacher is den
    x = 40 * torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(student(x, 40.0), den(x, 40.0), rtol=0, atol=1e-3 * den(x, 40.0).abs().max())
    edm, _ = build_run(load_recipe("digits-cd"), data, den)
    assert type(edm) is cmkit.ConsistencyModel
    with pytest.raises(ValueError, match="model.student"):
        build_run(load_recipe("digits-cd", ['model.student="vp"']), data, den)
