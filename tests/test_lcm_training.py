"""LCM and LCM-LoRA distillation through the real job path on a tiny random teacher: resume is exact, two processes
train, a v-prediction teacher distils, and bad recipes get one-line errors; the skipping-step loss is pinned to its
equation on a closed-form teacher."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cmkit.cli.jobs import run_job
from cmkit.cli.recipes import load_recipe
from cmkit.latent.families.unet import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red bag", "a green boot", "a blue bag", "a red boot"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    rng = np.random.default_rng(0)
    data = root / "captions"
    data.mkdir()
    (root / "shards").mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(CAPTIONS[i % 4])
    for s in range(3):  # the same images as webdataset shards
        with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
            for i in range(8 * s, 8 * s + 8):
                tar.add(data / f"{i}.png", f"{i:04d}.png")
                tar.add(data / f"{i}.txt", f"{i:04d}.txt")
    for pred in ("epsilon", "v_prediction"):
        tiny_pipeline("sd", pred, texts=CAPTIONS, seed=1, image_size=16).save_pretrained(root / pred)
    return root


def _recipe(root, kind="lcm", steps=4, teacher="epsilon", extra=()):
    base = [f'data.path="{root / "captions"}"', f'teacher.path="{root / teacher}"', f'objective.kind="{kind}"',
            "objective.w_min=1.0", "objective.w_max=3.0", "train.batch_size=4", "train.log_every=1",
            "train.checkpoint_every=2", f"train.steps={steps}", "train.lr=1e-3"]
    if kind == "lcm":
        base += ["objective.w_embedding_dim=8", "train.ema_rates=[0.9]"]
    else:
        base += ["objective.lora_rank=2", "objective.lora_alpha=2.0", "train.ema_rates=[]",
                 'objective.lora_targets=["to_q","to_v","conv1"]']
    return load_recipe(None, [*base, *extra])


def test_lora_resume_gives_identical_adapter_weights(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    run_job("distill", _recipe(setup, "lcm_lora", 4), tmp_path / "whole", progress=False)
    run_job("distill", _recipe(setup, "lcm_lora", 2), tmp_path / "split", progress=False)
    run_job("distill", _recipe(setup, "lcm_lora", 4), tmp_path / "split", progress=False)
    a = load_file(tmp_path / "whole" / "model" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "model" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    # the exported adapter opens on the base it records
    from cmkit import load_model

    assert load_model(tmp_path / "whole" / "model").lora
    # the checkpoint holds the adapter alone, not the base UNet
    ckpt = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)


def test_two_cpu_processes_run_lcm_encoding_disjoint_shares_of_the_shards(setup, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CMKIT_CACHE": str(tmp_path / "cache")}
    sets = [f"--set={s}" for s in (f'data.path="{setup / "shards"}"', "data.image_size=16", 'objective.kind="lcm"',
                                   "objective.w_embedding_dim=8", "train.batch_size=4", "train.steps=2",
                                   "train.cpu=true", "train.checkpoint_every=2", "train.log_every=1",
                                   "train.ema_rates=[0.9]")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "cmkit", "distill", "tiny-t2i-lcm", "--teacher", str(setup / "epsilon"), "--out",
           str(tmp_path / "dd"), "--no-progress", *sets]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # shard i is process i mod 2's: process 0 encodes shards 0 and 2, process 1 shard 1, and both train on all three
    assert "encoding 2 of the 3 shard(s) of shards (process 0 of 2" in proc.stderr, proc.stderr[-2000:]
    assert "encoding 1 of the 3 shard(s) of shards (process 1 of 2" in proc.stderr
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 3
    assert (tmp_path / "dd" / "checkpoints" / "step-00000002").is_dir()
    assert (tmp_path / "dd" / "model" / "model_index.json").is_file()


def test_v_prediction_teacher_distils_to_beat_it_at_two_passes(setup, tmp_path, monkeypatch):
    """On the teacher's own terms: from the same noise, the LCM's one step (one pass) lands closer to the teacher's
    50-step DDIM solution than the teacher's own one guided step (two passes) does. (Per-sample distances need the
    deterministic one-step map: a multistep LCM re-noises, so its samples leave the starting noise's trajectory.)"""
    from cmkit import load_model, load_teacher
    from cmkit.sampling import lcm_sample, text_to_image

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    run_job("distill", _recipe(setup, "lcm", 150, "v_prediction",
                               ["train.batch_size=16", "train.checkpoint_every=150", "train.log_every=50"]),
            tmp_path / "v", progress=False)
    teacher, lcm = load_teacher(str(setup / "v_prediction")), load_model(tmp_path / "v" / "model")
    prompts = CAPTIONS * 8
    z = torch.randn(len(prompts), *teacher.sample_shape, generator=torch.Generator().manual_seed(9))
    ref = text_to_image(teacher, prompts, 50, guidance_scale=2.0, latents=z, output="latent")
    one, passes = text_to_image(teacher, prompts, 1, guidance_scale=2.0, latents=z, output="latent",
                                return_nfe=True)
    ours, our_passes = lcm_sample(lcm, prompts, 1, guidance_scale=2.0, latents=z, output="latent", return_nfe=True)
    assert (passes, our_passes) == (2, 1)
    err_teacher, err_lcm = (one - ref).square().mean().item(), (ours - ref).square().mean().item()
    assert err_lcm < 0.9 * err_teacher, (err_lcm, err_teacher)


class ClosedFormUNet(torch.nn.Module):
    """A stand-in UNet predicting x0 ("sample") in closed form: ``gain (1 + t / 20) x_t + mean(prompt embedding)``."""

    def __init__(self, gain):
        super().__init__()
        self.gain, self.config = gain, {"time_cond_proj_dim": None}
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, timestep_cond=None):
        from types import SimpleNamespace

        shape = (-1, *[1] * (x.ndim - 1))
        return SimpleNamespace(sample=self.gain * (1 + t / 20).reshape(shape) * x +
                               encoder_hidden_states.mean((1, 2)).reshape(shape))


class Recorded(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, z, sigma, **cond):
        self.calls.append((z.clone(), sigma.clone(), dict(cond)))
        return self.fn(z, sigma, **cond)


def test_skipping_step_target_is_the_guided_ddim_step_then_the_boundary_scaled_target():
    """LCM's loss on a 20-step VP table with k = 4 (t_n in {3, 7, 11, 15, 19}), written out by hand: the guided teacher
    x0_w = D(neg) + (1 + w)(D(pos) - D(neg)), the DDIM step z_lo = x0_w + (sigma_lo / sigma_hi)(z_hi - x0_w) from t_n
    to max(t_n - k, 0), and f = c_skip z / sqrt(1 + sigma^2) + c_out D(z) with c_skip = sd^2 / ((10 t)^2 + sd^2),
    c_out = 10 t / sqrt((10 t)^2 + sd^2), sd = 0.5, on the target network at t_lo and the online one at t_n."""
    from diffusers import DDPMScheduler

    from cmkit.latent.families.unet import LatentDenoiser
    from cmkit.latent.lcm import LCMFunction
    from cmkit.objectives.lcm import LatentConsistencyDistillation, LCMConfig

    sched = DDPMScheduler(num_train_timesteps=20)
    table = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    gains = {"teacher": 0.9, "online": 0.5, "target": 0.7}
    den = {k: LatentDenoiser(ClosedFormUNet(g), sched, prediction_type="sample") for k, g in gains.items()}
    online, target = Recorded(LCMFunction(den["online"])), Recorded(LCMFunction(den["target"]))
    cfg = LCMConfig(num_ddim_timesteps=5, w_min=1.0, w_max=3.0, target_ema=0.9)
    obj = LatentConsistencyDistillation(den["teacher"], None, None, cfg)
    n, g = 64, torch.Generator().manual_seed(0)
    z0 = torch.randn(n, 2, 2, 2, generator=g)
    pos, neg = torch.randn(n, 3, 4, generator=g), torch.randn(n, 3, 4, generator=g)
    torch.manual_seed(0)
    loss = obj(online, z0, target=target, prompt_embeds=pos, negative_prompt_embeds=neg)
    (z_hi, s_hi, c_on), = online.calls
    (z_lo, s_lo, c_tgt), = target.calls
    # the draws: a skipping-step timestep, a guidance in [w_min, w_max], the student's conditioning without negatives
    t_hi = (s_hi.double()[:, None] - table).abs().argmin(1)
    assert set(t_hi.tolist()) == {3, 7, 11, 15, 19}
    t_lo = (t_hi - 4).clamp_min(0)
    torch.testing.assert_close(s_hi.double(), table[t_hi], rtol=1e-6, atol=0)
    torch.testing.assert_close(s_lo.double(), table[t_lo], rtol=1e-6, atol=0)
    w = c_on["guidance_scale"] - 1
    assert 1.0 <= w.min() and w.max() <= 3.0 and w.std() > 0.3
    for c in (c_on, c_tgt):
        assert set(c) == {"prompt_embeds", "guidance_scale"} and torch.equal(c["prompt_embeds"], pos)
    assert torch.equal(c_tgt["guidance_scale"], c_on["guidance_scale"])
    eps = (z_hi - z0) / s_hi[:, None, None, None]
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1

    def bc(v):
        return v.double().reshape(-1, 1, 1, 1)

    def d(name, z, t, emb):  # the closed-form x0 at the table point t (sigma = table[t])
        return gains[name] * (1 + bc(t) / 20) * z.double() / (1 + bc(table[t]) ** 2).sqrt() + bc(emb.mean((1, 2)))

    def f(name, z, t):
        st = 10 * bc(t)
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / (st**2 + 0.25).sqrt()
        return c_skip * z.double() / (1 + bc(table[t]) ** 2).sqrt() + c_out * d(name, z, t, pos)

    x0_w = d("teacher", z_hi, t_hi, neg) + bc(1 + w) * (d("teacher", z_hi, t_hi, pos) - d("teacher", z_hi, t_hi, neg))
    step = x0_w + bc(table[t_lo] / table[t_hi]) * (z_hi.double() - x0_w)
    torch.testing.assert_close(z_lo.double(), step, rtol=1e-5, atol=1e-5)
    expected = (f("online", z_hi, t_hi) - f("target", step, t_lo)).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    # no target network (LCM-LoRA): the online function, under no_grad, gives the target from the same step
    online.calls.clear()
    torch.manual_seed(0)
    obj(online, z0, prompt_embeds=pos, negative_prompt_embeds=neg)
    (z_lo2, s_lo2, _), (z_hi2, _, _) = online.calls  # the no-grad target pass comes first
    assert torch.equal(z_hi2, z_hi) and torch.equal(z_lo2, z_lo) and torch.equal(s_lo2, s_lo)


def test_bad_recipes_get_one_line_errors(setup, tmp_path):
    with pytest.raises(ValueError, match=r"w_min \(5.0\) must be >= 0 and <= objective.w_max \(3.0\)"):
        run_job("distill", _recipe(setup, extra=["objective.w_min=5.0"]), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        run_job("distill", _recipe(setup, "lcm_lora", extra=["objective.lora_rank=0"]), tmp_path / "b",
                progress=False)
    with pytest.raises(ValueError, match="for an SDXL teacher but the teacher given has the SD layout"):
        run_job("distill", _recipe(setup, extra=['objective.teacher_layout="sdxl"']), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="distils a text-to-image teacher"):
        run_job("distill", _recipe(setup, extra=['teacher.path="cmkit:digits-ddpm"', 'data.path=""',
                                                 'data.name="digits"']), tmp_path / "d", progress=False)
