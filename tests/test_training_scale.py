"""What real model sizes need from the trainer: accumulation over micro-batches gives the whole batch's update,
gradient checkpointing the same loss and gradients, and `accelerate launch --mixed_precision` is honoured where the
recipe leaves the precision unset (and loses to a recipe that sets it)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from torch import nn

from cmkit.training import Trainer
from cmkit.training.settings import TrainSettings
from cmkit.training.trainer import enable_gradient_checkpointing

ROOT = Path(__file__).resolve().parents[1]


class Regression:
    """A per-sample-mean loss on a fixed batch (no randomness): what accumulation must reproduce exactly."""

    def target_ema(self, step):
        return 0.0

    def __call__(self, model, x0, target=None, step=0, y=None):
        return (model(x0) - y).pow(2).mean()


def _weights_after(tmp_path, micro: int, steps: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randn(32, 2, generator=g, dtype=torch.float64)
    settings = TrainSettings(steps=steps, batch_size=32, lr=1e-2, ema_rates=[], micro_batch_size=micro, cpu=True)
    trainer = Trainer(model, Regression(), lambda n, device: (x[:n], {"y": y[:n]}), settings, tmp_path / f"m{micro}",
                      progress=False)
    assert trainer.accumulate == (32 // micro if micro else 1)
    losses = [trainer.step().item() for _ in range(steps)]
    return [p.detach().clone() for p in trainer.online.parameters()], losses


def test_accumulated_micro_batches_give_the_whole_batchs_update(tmp_path):
    whole, whole_losses = _weights_after(tmp_path, 0)
    parts, part_losses = _weights_after(tmp_path, 8)
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.tensor(whole_losses), torch.tensor(part_losses), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="micro_batch_size 5 does not divide"):
        _weights_after(tmp_path, 5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from cmkit.latent.families.unet import LatentDenoiser, tiny_pipeline
    from cmkit.latent.lcm import LatentConsistencyModel, LCMFunction, student_unet

    teacher = tiny_pipeline(seed=3).double()
    model = LatentConsistencyModel(LCMFunction(LatentDenoiser(student_unet(teacher.unet, 8).double(),
                                                              teacher.scheduler)), teacher).train()
    checkpointed = copy.deepcopy(model)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.unet.is_gradient_checkpointing and not model.unet.is_gradient_checkpointing
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, *teacher.sample_shape, generator=g, dtype=torch.float64)
    cond = teacher.encode_prompt(["a red bag", "a blue boot", "a green bag"])
    cond.pop("guidance_scale", None)
    cond = {k: v for k, v in cond.items() if not k.startswith("negative_")}
    grads, losses = [], []
    for m in (model, checkpointed):
        m.zero_grad(set_to_none=True)
        loss = m(z, torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64), guidance_scale=3.0, **cond).pow(2).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no network of this model supports it"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_accelerate_launch_mixed_precision_wins_over_a_recipe_that_leaves_it_unset(tmp_path):
    want = "bf16"
    sets = ["model.hidden=16", "model.depth=1", "train.batch_size=16", "train.steps=2", "train.cpu=true",
            "train.micro_batch_size=4", "train.log_every=1", "train.checkpoint_every=2", "eval.schedule_max_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # on a machine without GPUs accelerate starts several processes only under --multi_gpu (torchrun underneath);
    # train.cpu keeps them on the CPU, over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "bf16", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", free_port(),
           "-m", "cmkit", "train", "s_curve-ict", "--out", str(tmp_path / "run"), "--no-progress",
           *[f"--set={s}" for s in sets]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # two processes x micro-batch 4 x 2 accumulation steps = the recipe's global batch of 16
    assert f"batch 16 = 2 process(es) x micro-batch 4 x 2 accumulation step(s); mixed precision {want}" in proc.stdout


@pytest.mark.parametrize("kind", ["flow_cd", "lcm_lora"])
def test_the_frozen_teacher_and_text_encoders_are_held_in_the_weight_dtype(kind, tmp_path, monkeypatch):
    from conftest import caption_data

    import cmkit
    from cmkit.cli import jobs
    from cmkit.cli.recipes import load_recipe
    from cmkit.latent.families.sd3 import tiny_sd3_pipeline
    from cmkit.latent.families.unet import tiny_pipeline

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "teacher"
    (tiny_sd3_pipeline(seed=1) if kind == "flow_cd" else tiny_pipeline(seed=1)).save_pretrained(folder)
    seen = {}

    class Recording(jobs.Trainer):
        def __init__(self, model, objective, *args, **kwargs):
            seen.update(model=model, objective=objective)
            super().__init__(model, objective, *args, **kwargs)

    monkeypatch.setattr(jobs, "Trainer", Recording)
    sets = [f'objective.kind="{kind}"', 'train.weight_dtype="bfloat16"', "train.batch_size=4", "train.steps=2",
            "train.log_every=1", "train.checkpoint_every=2", "train.ema_rates=[]"]
    if kind == "lcm_lora":
        sets += ["objective.lora_rank=2", "objective.lora_alpha=2.0"]
    jobs.run_job("distill", load_recipe(None, sets), tmp_path / "run", str(folder), progress=False,
                 data=caption_data(32))
    teacher = seen["objective"].teacher
    teacher = getattr(teacher, "parts", None) or teacher  # LCM keeps the teacher's denoiser; its parts hold the rest
    parts = seen["model"].parts
    frozen = [p for p in parts.denoiser.network.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    encoders = [p for m in parts.prompt_encoder.modules() for p in m.parameters(recurse=False)]
    assert encoders and all(p.dtype == torch.bfloat16 for p in encoders)
    assert all(p.dtype == torch.float32 for p in parts.vae.parameters())
    trained = [p for p in seen["model"].parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert cmkit.load_model(tmp_path / "run" / "model") is not None


def test_tensorboard_events_and_validation_grids_appear_at_the_configured_steps(tmp_path, monkeypatch):
    from conftest import caption_data

    from cmkit.cli.jobs import run_job
    from cmkit.cli.recipes import load_recipe
    from cmkit.latent.families.unet import tiny_pipeline

    monkeypatch.setenv("CMKIT_CACHE", str(tmp_path / "cache"))
    tiny_pipeline(seed=1).save_pretrained(tmp_path / "teacher")
    sets = ['objective.kind="lcm_lora"', "objective.lora_rank=2", "objective.lora_alpha=2.0", "train.batch_size=4",
            "train.steps=4", "train.log_every=1", "train.checkpoint_every=4", "train.ema_rates=[]",
            'train.log_with="tensorboard"', "train.validate_every=2",
            'train.validation_prompts=["a red bag", "a blue boot"]']
    run_job("distill", load_recipe(None, sets), tmp_path / "run", str(tmp_path / "teacher"), progress=False,
            data=caption_data(32))
    grids = sorted(p.name for p in (tmp_path / "run" / "validation").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png"]
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("validation")] == [2, 4]
    with pytest.raises(ValueError, match="validation_prompts"):
        load_recipe(None, ["train.validate_every=2"]).train.check()


def test_the_command_line_ends_its_process_only_after_the_tracker_and_the_model_are_written(tmp_path):
    """``cmkit`` skips the interpreter's teardown (os._exit once main returns): every tracker event and the model
    must be on disk by then, and the exit code must be main's."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cmkit", "train", "s_curve-ict", "--out", str(out), "--no-progress",
           *[f"--set={s}" for s in ("model.hidden=16", "model.depth=1", "train.batch_size=16", "train.steps=3",
                                    "train.log_every=1", 'train.log_with="tensorboard"', "eval.schedule_max_steps=0")]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "saved to" in proc.stdout + proc.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(out.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert (out / "model" / "cmkit.json").is_file()
    bad = subprocess.run([*cmd[:6], str(tmp_path / "other"), "--set", "train.step=3"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and "did you mean 'train.steps'" in bad.stderr


def test_a_run_saved_before_the_precision_default_changed_resumes_and_micro_batch_may_change(tmp_path, capsys):
    from cmkit.cli.jobs import train_consistency
    from cmkit.cli.recipes import load_recipe

    base = ["model.hidden=16", "model.depth=1", "train.batch_size=16", "train.checkpoint_every=2",
            "eval.schedule_max_steps=0"]
    train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=2", 'train.mixed_precision="no"']), tmp_path,
                      progress=False)
    summary = train_consistency(load_recipe("s_curve-ict", [*base, "train.steps=4", "train.micro_batch_size=8"]),
                                tmp_path, progress=False)
    assert summary["start_step"] == 2 and summary["end_step"] == 4
    assert "micro_batch_size changed from 0 to 8" in capsys.readouterr().err


def _regression_trainer(out, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))  # 8-bit state needs >= 4096-element blocks
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=g), torch.randn(32, 2, generator=g)
    settings = TrainSettings(batch_size=32, lr=1e-2, ema_rates=[0.9], cpu=True, checkpoint_every=2, **kw)
    return Trainer(model, Regression(), lambda n, device: (x[:n], {"y": y[:n]}), settings, out, progress=False)


def test_adamw8bit_keeps_8_bit_moments_learns_and_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    def steps(trainer, n):
        for _ in range(n):
            trainer.step()
        trainer.checkpoint()
    whole = _regression_trainer(tmp_path / "whole", steps=4, optimizer="adamw8bit")
    x, cond = whole.batches(32, "cpu")
    before = Regression()(whole.online, x, **cond).item()
    steps(whole, 4)
    steps(_regression_trainer(tmp_path / "split", steps=4, optimizer="adamw8bit"), 2)
    again = _regression_trainer(tmp_path / "split", steps=4, optimizer="adamw8bit")
    assert again.step_no == 2
    steps(again, 2)
    for a, b in zip(whole.online.parameters(), again.online.parameters(), strict=True):
        assert torch.equal(a, b)
    state = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "optimizer.safetensors")
    moments = [v for k, v in state.items() if k.endswith("state1") or k.endswith("state2")]
    assert moments and all(v.dtype == torch.uint8 for v in moments if v.numel() >= 4096)
    assert Regression()(whole.online, x, **cond).item() < 0.9 * before


def test_an_ema_held_apart_from_the_online_weights_updates_as_one_held_beside_them():
    from cmkit.training.ema import EMA

    torch.manual_seed(0)
    online = nn.Linear(8, 8)
    beside, apart = copy.deepcopy(online), copy.deepcopy(online)
    with torch.no_grad():
        online.weight.add_(1.0)
    plain, staged = EMA(beside, online), EMA(apart, online)
    staged._stage = [torch.empty_like(e) for e in staged._e]  # the path a CPU EMA of GPU weights takes
    for rate in (0.9, 0.5):
        plain.update(rate), staged.update(rate)
    for a, b in zip(beside.parameters(), apart.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(beside.weight, online.weight)


def test_fsdp_over_two_cpu_processes_matches_ddp_through_a_jvp_shards_the_optimiser_and_resumes(tmp_path):
    """torch's FSDP2 on gloo: a 4-step sCT run sharded over two processes, stopped at step 2 and resumed, ends where
    the same run under DDP ends (to float rounding); its checkpoints hold full weights and half-size moments. sCT's
    tangent is one forward-mode JVP through the student, so FSDP's all-gather hooks run inside that JVP too (one
    objective covers both: each launch costs two process start-ups)."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def launch(out, steps, fsdp):
        sets = [f"--set={s}" for s in (f"train.steps={steps}", "train.checkpoint_every=2", "train.batch_size=64",
                                       "model.hidden=32", "model.depth=2", "eval.schedule_max_steps=0",
                                       "train.cpu=true", "train.grad_clip=1.0", f"train.fsdp={str(fsdp).lower()}")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "cmkit", "train", "s_curve-sct", "--out", str(tmp_path / out), "--no-progress", *sets]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    launch("ddp", 4, False)
    launch("fsdp", 2, True)
    launch("fsdp", 4, True)
    ddp, fsdp = (tmp_path / run / "checkpoints" / "step-00000004" for run in ("ddp", "fsdp"))
    for name in ("model", "ema-0.995"):
        a, b = load_file(ddp / f"{name}.safetensors"), load_file(fsdp / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    first = load_file(tmp_path / "fsdp" / "checkpoints" / "step-00000002" / "model.safetensors")
    final = load_file(fsdp / "model.safetensors")
    assert any(not torch.equal(first[k], final[k]) for k in final)  # the resumed half did train
    whole = load_file(ddp / "optimizer.safetensors")
    halves = [load_file(fsdp / f"optimizer-rank-{r}-of-2.safetensors") for r in (0, 1)]
    moments = [k for k in whole if k.endswith("exp_avg")]
    assert moments and all(sum(h[k].shape[0] for h in halves) == whole[k].shape[0] for k in moments)


def test_rcm_under_fsdp_shards_its_fake_score_too_and_ends_where_ddp_ends(tmp_path):
    """latent rCM on the tiny SD3 teacher over two CPU processes: its fake score (a whole copy of the teacher's
    network, the objective's own) is sharded beside the student under train.fsdp, and four steps (student, student,
    fake score, student) end where the same run under DDP ends, the fake score's checkpointed weights included."""
    from conftest import caption_data
    from PIL import Image
    from safetensors.torch import load_file

    data = caption_data(32)
    folder = tmp_path / "captions"
    folder.mkdir()
    for i, (x, caption) in enumerate(zip(data.train[:8], data.train_captions[:8], strict=True)):
        pixels = ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CMKIT_CACHE": str(tmp_path / "cache")}

    def launch(out, fsdp):
        sets = [f"--set={s}" for s in (f'data.path="{folder}"', 'data.name=""', "train.steps=4",
                                       "train.checkpoint_every=4", "train.batch_size=4", "train.warmup=0",
                                       "train.ema_rates=[]", "objective.tangent_warmup=1",
                                       "objective.student_update_every=2", "train.cpu=true",
                                       f"train.fsdp={str(fsdp).lower()}")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "cmkit", "distill", "tiny-sd3-rcm", "--out", str(tmp_path / out), "--no-progress", *sets]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return tmp_path / out / "checkpoints" / "step-00000004"

    ddp, fsdp = launch("ddp", False), launch("fsdp", True)
    for name in ("model", "objective"):
        a, b = load_file(ddp / f"{name}.safetensors"), load_file(fsdp / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), name
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, name
    # the optimiser's states follow its parameters: the student's, then the objective's (the fake score's)
    n_student = len(load_file(ddp / "model.safetensors"))
    whole = load_file(ddp / "optimizer.safetensors")
    halves = [load_file(fsdp / f"optimizer-rank-{r}-of-2.safetensors") for r in (0, 1)]
    fake = [k for k in whole if k.endswith(".exp_avg") and int(k.split(".")[0]) >= n_student]
    assert len(fake) > 100 and any(whole[k].abs().max() > 0 for k in fake)  # it has trained (step 2)
    assert all(sum(h[k].shape[0] for h in halves) == whole[k].shape[0] for k in fake)  # each process holds half
