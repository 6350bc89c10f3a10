"""sCT / sCD in TrigFlow and MeanFlow: the JVP tangent against a finite difference, TrigFlow <-> sigma space against
torchdiffeq, the MeanFlow identity against a closed form, the loss formulas, shared dropout masks, boundaries,
resume, two processes and bad inputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torchdiffeq import odeint

import cmkit
from cmkit.core import sigma_to_trig, trig_scalings, trig_to_sigma, trig_velocity_from_x0
from cmkit.core.scalings import edm_scalings
from cmkit.models import EDMDenoiser, MeanFlowModel, TimeMLP, TrigFlowConsistencyModel
from cmkit.objectives.base import replaying_draws
from cmkit.objectives.meanflow import MeanFlowLoss, adaptive_l2, meanflow_target
from cmkit.objectives.scm import AdaptiveWeight, SCMLoss, adaptive_weighted_loss, normalise_tangent, scm_tangent
from cmkit.solvers import ode_solve

ROOT = Path(__file__).resolve().parents[1]
SD = 0.5


def _trig_model(dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return TrigFlowConsistencyModel(TimeMLP(2, 32, 2, 16, dropout=dropout), 0.002, 80.0, SD).to(dtype)


def test_jvp_tangent_equals_central_difference_of_the_target_network():
    """g = cos(t) df^-/dt along x_t = cos t x0 + sin t z: the JVP against a central difference of f (float64)."""
    model = _trig_model()
    torch.manual_seed(1)
    x0, z = 0.5 * torch.randn(6, 2, dtype=torch.float64), SD * torch.randn(6, 2, dtype=torch.float64)
    t = torch.linspace(0.05, 1.5, 6, dtype=torch.float64)

    def x_at(tt):
        return torch.cos(tt)[:, None] * x0 + torch.sin(tt)[:, None] * z

    dxdt = torch.cos(t)[:, None] * z - torch.sin(t)[:, None] * x0
    f_minus, g = scm_tangent(model, x_at(t), t, dxdt, SD)
    h = 1e-5
    with torch.no_grad():
        fd = (model.trig_f(x_at(t + h), t + h) - model.trig_f(x_at(t - h), t - h)) / (2 * h)
        assert torch.equal(f_minus, model(x_at(t) / SD, raw_time=t))
    assert torch.allclose(g, torch.cos(t)[:, None] * fd, atol=1e-4, rtol=0)
    assert g.abs().max() > 1e-2  # not trivially zero
    # the finite-difference fallback approximates the same tangent
    _, g_fd = scm_tangent(model, x_at(t), t, dxdt, SD, method="finite_difference", fd_step=1e-5)
    assert torch.allclose(g_fd, g, atol=1e-6)
    # the warm-up factor scales the second term only
    _, g0 = scm_tangent(model, x_at(t), t, dxdt, SD, r=0.0)
    assert torch.allclose(g0, -torch.cos(t)[:, None] ** 2 * (SD * f_minus - dxdt))


def test_trigflow_parameterisation_is_edm_with_the_output_negated():
    sigma = torch.tensor([0.01, 0.3, 2.0, 70.0], dtype=torch.float64)
    t = sigma_to_trig(sigma, SD)
    assert torch.allclose(trig_to_sigma(t, SD), sigma, rtol=1e-12)
    c_skip, c_out, c_in = trig_scalings(t, SD)
    e_skip, e_out, e_in = edm_scalings(sigma, SD)
    assert torch.allclose(c_skip, e_skip, rtol=1e-12) and torch.allclose(c_in, e_in, rtol=1e-12)
    assert torch.allclose(c_out, -e_out, rtol=1e-12)
    # the model in sigma space is f(x_t, t) of TrigFlow with x_t = cos(t) x_sigma; and f(x, 0) = x exactly
    model = _trig_model()
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(x, sigma), model.trig_f(torch.cos(t)[:, None] * x, t), atol=1e-12)
        assert torch.equal(model(x, 0.0), x)


def test_trigflow_and_sigma_space_give_the_same_pf_ode_solution():
    """One EDM teacher, its PF-ODE solved in sigma (cmkit's ode_solve) and in TrigFlow time (torchdiffeq directly on
    dx_t/dt = (cos t x_t - D) / sin t): the same end point after the exact conversion x_sigma = x_t / cos t."""
    torch.manual_seed(0)
    den = EDMDenoiser(TimeMLP(2, 32, 2, 16), SD, 0.002, 80.0).double().eval()
    x_start = 80.0 * torch.randn(5, 2, dtype=torch.float64)
    s_end = 0.05
    with torch.no_grad():
        ours = ode_solve(den, x_start, [80.0, s_end], method="dopri5", rtol=1e-10, atol=1e-10)
        t0, t1 = (sigma_to_trig(torch.tensor(s, dtype=torch.float64), SD) for s in (80.0, s_end))

        def v(t, x_t):
            return trig_velocity_from_x0(x_t, den(x_t / torch.cos(t), SD * torch.tan(t)), t)

        x_t = odeint(v, torch.cos(t0) * x_start, torch.stack([t0, t1]), method="dopri5", rtol=1e-10, atol=1e-10)[-1]
    assert torch.allclose(x_t / torch.cos(t1), ours, atol=1e-6)
    assert (ours - x_start / 80).abs().max() > 0.1


def test_meanflow_identity_holds_for_the_exact_average_velocity():
    """1-D Gaussian data x ~ N(0, s^2): z_t = (1 - t) x + t e has variance V(t) = (1 - t)^2 s^2 + t^2, the flow is
    linear, z_r = z_t sqrt(V(r) / V(t)), so u(z, r, t) = z (1 - sqrt(V(r) / V(t))) / (t - r) and the marginal
    velocity is v(z, t) = z V'(t) / (2 V(t)). The MeanFlow target of the exact u is u itself."""
    s2 = 0.3

    def var(t):
        return (1 - t) ** 2 * s2 + t**2

    def u_exact(z, r, t):
        return z * ((1 - torch.sqrt(var(r) / var(t))) / (t - r))[:, None]

    torch.manual_seed(0)
    t = 0.2 + 0.75 * torch.rand(64, dtype=torch.float64)
    r = t * torch.rand(64, dtype=torch.float64) * 0.9
    z = torch.randn(64, 1, dtype=torch.float64)
    v = z * ((t - (1 - t) * s2) / var(t))[:, None]
    target = meanflow_target(u_exact, z, r, t, v)
    assert torch.allclose(target, u_exact(z, r, t), atol=1e-5)
    # a wrong u (the instantaneous velocity) does not satisfy the identity
    assert (meanflow_target(lambda zz, rr, tt: zz * ((tt - (1 - tt) * s2) / var(tt))[:, None], z, r, t, v)
            - v).abs().max() > 1e-2


def test_loss_formulas_on_given_inputs():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.6, 0.8]])
    assert torch.allclose(normalise_tangent(g, 0.1), torch.tensor([[3 / 5.1, 4 / 5.1], [0, 0], [0.6 / 1.1, 0.8 / 1.1]]))
    sq, w = torch.tensor([2.0, 0.5]), torch.tensor([0.0, -1.0])
    assert torch.allclose(adaptive_weighted_loss(sq, w, 4), torch.tensor([0.5, math.exp(-1) * 0.125 + 1]))
    delta = torch.tensor([[1.0, 3.0], [0.1, 0.1]])
    assert torch.allclose(adaptive_l2(delta, 0.5, 1e-3),
                          torch.tensor([5.0 / (5.0 + 1e-3) ** 0.5, 0.01 / (0.01 + 1e-3) ** 0.5]))
    w_phi = AdaptiveWeight(8)
    assert torch.equal(w_phi(torch.tensor([0.1, 1.2])), torch.zeros(2))  # starts at weight e^0 = 1


def test_jvp_and_online_pass_share_dropout_masks():
    model = _trig_model(dropout=0.5, dtype=torch.float32).train()
    x = torch.randn(16, 2)
    t = torch.full((16,), 0.7)
    dxdt = torch.randn(16, 2)
    replay = replaying_draws(model, x.device)
    f_minus, _ = scm_tangent(model, x, t, dxdt, SD, replay=replay)
    with replay():
        online = model(x / SD, raw_time=t)
    assert torch.equal(f_minus, online.detach())
    assert not torch.equal(model(x / SD, raw_time=t), online)  # dropout is live: unshared passes differ


def test_meanflow_model_maps_sigma_space_and_samples_deterministically(tmp_path):
    torch.manual_seed(0)
    model = MeanFlowModel(TimeMLP(2, 32, 2, 16, second_time=True))
    x = torch.randn(3, 2)
    with torch.no_grad():
        assert torch.equal(model(x, 0.0), x)
        # one jump from sigma to 0 is z - t u(z, 0, t) scaled back; two jumps chain through the middle
        s = torch.full((3,), 3.0)
        z, tt = x / 4, torch.full((3,), 0.75)
        assert torch.allclose(model(x, s), z - 0.75 * model.average_velocity(z, torch.zeros(3), tt), atol=1e-6)
    assert model.sigmas_for_steps(2)[1] == pytest.approx((999 / 1000 / 2) / (1 - 999 / 1000 / 2))
    a = cmkit.sample(model, 5, steps=2, generator=torch.Generator().manual_seed(1))
    b = cmkit.sample(model, 5, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    model.save_pretrained(tmp_path / "mf")
    loaded = cmkit.load_model(tmp_path / "mf")
    assert isinstance(loaded, MeanFlowModel)
    assert torch.equal(cmkit.sample(loaded, 5, steps=2, generator=torch.Generator().manual_seed(1)), a)


def test_a_trigflow_model_saves_loads_and_edits(tmp_path):
    from cmkit.models import small_unet
    torch.manual_seed(0)
    model = TrigFlowConsistencyModel(small_unet(8, 1, 16, 2, 1, attention=True), 0.002, 80.0, SD)
    model.save_pretrained(tmp_path / "scm")
    loaded = cmkit.load_model(tmp_path / "scm")
    assert isinstance(loaded, TrigFlowConsistencyModel)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x, 1.3), model(x, 1.3), atol=1e-6)
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., :4] = 1
    out = cmkit.inpaint(loaded, x, mask, steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :4], x[..., :4])  # known pixels kept
    # the JVP runs through the UNet's attention (the math kernel has forward-mode AD)
    t = torch.full((3,), 0.8)
    _, g = scm_tangent(model, x, t, torch.randn_like(x), SD)
    assert torch.isfinite(g).all() and g.abs().max() > 0


def _recipe_run(tmp_path, name, kind_sets, steps, out, teacher=None):
    from cmkit.cli.jobs import run_job
    from cmkit.cli.recipes import load_recipe
    recipe = load_recipe(name, [f"train.steps={steps}", "train.batch_size=64", "train.checkpoint_every=2",
                                "train.log_every=1", "eval.schedule_max_steps=0", *kind_sets])
    job = "distill" if teacher else "train"
    return run_job(job, recipe, out, teacher_path=teacher, progress=False)


@pytest.mark.parametrize("name", ["s_curve-sct", "s_curve-meanflow"])
def test_resume_gives_identical_weights(tmp_path, name):
    sets = (["model.dropout=0.1", "objective.tangent_warmup=3", "objective.adaptive_weight=true"] if "sct" in name
            else ["model.dropout=0.1"])
    _recipe_run(tmp_path, name, sets, 4, tmp_path / "whole")
    _recipe_run(tmp_path, name, sets, 2, tmp_path / "part")
    _recipe_run(tmp_path, name, sets, 4, tmp_path / "part")
    for f in ("model", "objective") if "sct" in name else ("model",):
        a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / f"{f}.safetensors")
        b = load_file(tmp_path / "part" / "checkpoints" / "step-00000004" / f"{f}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if "sct" in name:  # the learnt weighting trained (it starts at zero)
        assert load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "objective.safetensors")[
            "weight.linear.bias"].abs().item() > 0


def _fit(model, loss, draw, steps, lr=1e-3, seed=0):
    torch.manual_seed(seed)
    params = list(model.parameters()) + (list(loss.parameters()) if isinstance(loss, torch.nn.Module) else [])
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        value = loss(model, draw(), step=step)
        opt.zero_grad()
        value.backward()
        opt.step()
    return model


def _gaussian_consistency_error(model, s2):
    """RMS error of one-step samples from sigma = 80 against the exact consistency map of N(0, s2) data,
    f*(x, sigma) = x sqrt(s2 / (s2 + sigma^2))."""
    z = torch.randn(2000, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(80 * z, 80.0) - 80 * z * math.sqrt(s2 / (s2 + 6400))).pow(2).mean().sqrt().item()


def test_scd_and_sct_learn_the_exact_map_of_gaussian_data():
    """1-D data x ~ N(0, 0.3): sCD with the exact teacher D(x, sigma) = x s2 / (s2 + sigma^2) and sCT from the data
    alone both approach the exact one-step map, from an error of ~0.5 at the start."""
    s2 = 0.3

    def teacher(x, sigma):
        return x * s2 / (s2 + sigma[:, None] ** 2)

    def draw():
        return math.sqrt(s2) * torch.randn(256, 1)

    errors = {}
    for name, teacher_ in (("scd", teacher), ("sct", None)):
        torch.manual_seed(0)
        model = TrigFlowConsistencyModel(TimeMLP(1, 64, 2, 32), 0.002, 80.0, SD)
        start = _gaussian_consistency_error(model, s2)
        loss = SCMLoss(SD, 0.002, 80.0, teacher=teacher_, tangent_warmup=200, p_mean=-0.8, p_std=1.6)
        errors[name] = (start, _gaussian_consistency_error(_fit(model, loss, draw, 800), s2))
    assert errors["scd"][0] > 0.4 and errors["scd"][1] < 0.1, errors
    assert errors["sct"][1] < 0.2, errors


def test_meanflow_learns_the_exact_one_step_map_of_gaussian_data():
    s2 = 0.3
    torch.manual_seed(0)
    model = MeanFlowModel(TimeMLP(1, 64, 2, 32, second_time=True))
    start = _gaussian_consistency_error(model, s2)
    _fit(model, MeanFlowLoss(), lambda: math.sqrt(s2) * torch.randn(256, 1), 1600)
    # MeanFlow starts at sigma_max = 999 in sampling; from 80 its one jump is as good a test of u(z, 0, t). Its long
    # jumps (r = 0, t near 1) are a rare draw of the (r, t) sampler and converge slowly: on this machine's current
    # install 800 steps reach 0.33 against 0.55 at the start (0.23 on an earlier one), 1600 steps 0.19, where sCD's
    # error is under a fifth
    assert start > 0.5 and _gaussian_consistency_error(model, s2) < 0.5 * start


def test_two_processes_end_with_identical_weights(tmp_path):
    """torch.func.jvp runs on the unwrapped network; gradients of the model (DDP) and of the objective's own
    weighting (averaged by the trainer) stay in sync, so both ranks hold the same weights after training."""
    script = tmp_path / "ddp_scm.py"
    script.write_text(
        "import os, sys, torch\n"
        "from accelerate import Accelerator\n"
        "from safetensors.torch import save_file\n"
        "from cmkit.cli.recipes import load_recipe\n"
        "from cmkit.cli.jobs import build_run, dataset_for\n"
        "from cmkit.training import train\n"
        "out, name = sys.argv[1], sys.argv[2]\n"
        "extra = ['objective.adaptive_weight=true'] if 'sct' in name else []  # the weighting's gradients averaged\n"
        "recipe = load_recipe(name, ['train.steps=3', 'train.batch_size=32', 'train.cpu=true', 'model.dropout=0.1',\n"
        "                            *extra])\n"
        "data = dataset_for(recipe)\n"
        "model, objective = build_run(recipe, data)\n"
        "acc = Accelerator(cpu=True)\n"
        "os.makedirs(out, exist_ok=True)\n"
        "init = {f'm.{k}': v.detach().clone().contiguous() for k, v in model.state_dict().items()}\n"
        "save_file(init, f'{out}/init{acc.process_index}.safetensors', {'model': type(model).__name__})\n"
        "def batches(n, device):\n"
        "    return data.train[torch.randint(0, len(data.train), (n,))].to(device), {}\n"
        "train(model, objective, batches, recipe.train, out, progress=False, accelerator=acc)\n"
        "state = {f'm.{k}': v.contiguous() for k, v in model.state_dict().items()}\n"
        "if isinstance(objective, torch.nn.Module):\n"
        "    state.update({f'o.{k}': v.contiguous() for k, v in objective.state_dict().items()})\n"
        "save_file(state, f'{out}/rank{acc.process_index}.safetensors')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("s_curve-sct", "s_curve-meanflow"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(script), str(out), name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        a, b = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the run trained the model meant: every weight tensor left rank 0's initialisation (which DDP gives both
        # ranks; three optimiser steps move each parameter that gets a gradient)
        with safe_open(out / "init0.safetensors", "pt") as f:
            assert f.metadata()["model"] == ("MeanFlowModel" if "meanflow" in name else "TrigFlowConsistencyModel")
        init = load_file(out / "init0.safetensors")
        weights = [k for k in init if k.endswith(".weight")]
        moved = [k for k in weights if not torch.equal(a[k], init[k])]
        assert weights and moved == weights, sorted(set(weights) - set(moved))[:5]
        assert any(k.startswith("o.") for k in a) == ("sct" in name)


def test_bad_inputs_get_one_line_errors(tmp_path):
    for t in (0.0, math.pi / 2, 2.0, -0.1):
        with pytest.raises(ValueError, match=r"must lie in \(0, pi/2\)"):
            trig_to_sigma(torch.tensor([0.5, t]))
    for p in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="objective.power"):
            MeanFlowLoss(power=p)
    with pytest.raises(ValueError, match="objective.tangent"):
        SCMLoss(SD, 0.002, 80.0, tangent="autodiff")
    with pytest.raises(ValueError, match="set model.times = 2"):
        _recipe_run(tmp_path, "s_curve-meanflow", ["model.times=1"], 2, tmp_path / "one-time")
    with pytest.raises(ValueError, match="model.times must be 1 or 2"):
        _recipe_run(tmp_path, "s_curve-meanflow", ["model.times=3"], 2, tmp_path / "three")
    with pytest.raises(ValueError, match="runs with `cmkit train`"):
        _recipe_run(tmp_path, "s_curve-sct", [], 2, tmp_path / "t", teacher="cmkit:digits-edm")
